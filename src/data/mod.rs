//! Data pipeline: tokenizer, shards, packing, bucket ordering, loader (issue 4).
