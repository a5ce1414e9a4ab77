//! The data pipeline: tokenization, shards, packing, ordering and the distributed loader.
//!
//! * [`corpus`]: reading JSONL / plain-text inputs into documents, reporting bad input.
//! * [`tokenizer`]: Hugging Face `tokenizer.json` through the `tokenizers` crate, BOS/EOS.
//! * [`shard`]: the binary shard format (see `docs/data-format.md`), writer and zero-copy reader.
//! * [`prepare`]: corpus directory → tokenized sub-dataset (shards + manifest), in parallel.
//! * [`order`]: bucket-based and global-shuffle document ordering, deterministic from a seed.
//! * [`pack`]: packing documents into fixed-length rows (concatenated, or whole documents),
//!   producing [`crate::batch::Batch`].
//! * [`loader`]: per-rank micro-batches with resumable state and a prefetch thread.
//! * [`report`]: tokens per character / per sample, per language, for tokenizer comparison.
pub mod corpus;
pub mod hash;
pub mod loader;
pub mod order;
pub mod pack;
pub mod prepare;
pub mod report;
pub mod shard;
pub mod tokenizer;

pub use loader::{Loader, LoaderConfig, LoaderState, LoaderStats, Ordering, Packing, SubsetSpec};
pub use shard::{ShardMeta, ShardReader, ShardWriter, TokenDtype};
