#!/usr/bin/env python3
"""Side-by-side baseline for prepare-data: the Python `tokenizers` package encoding the same
texts in batch (`Tokenizer.encode_batch`, add_special_tokens=False).

    .venv/bin/python tools/bench_tokenize_python.py --tokenizer tok.json --input data/corpora \
        [--threads 1] [--repeat 3]

Prints one JSON line: {"tokens": N, "secs": best wall time, "tokens_per_s": ..., "threads": ...}.
--threads 1 sets TOKENIZERS_PARALLELISM=false and RAYON_NUM_THREADS=1 before the import, so the
number is per core; without it the package uses all cores.
"""
import argparse
import json
import os
import sys
import time


def load_texts(path):
    files = []
    if os.path.isfile(path):
        files = [path]
    else:
        for root, _, names in os.walk(path):
            files += [os.path.join(root, n) for n in names if n.endswith((".jsonl", ".json")) and not n.startswith(".")]
    texts = []
    for f in sorted(files):
        with open(f, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    v = json.loads(line)
                except json.JSONDecodeError:
                    continue
                t = v.get("text")
                if t is None and "target" in v:
                    t = v.get("source", "") + v["target"]
                if isinstance(t, str) and t.strip():
                    texts.append(t)
    return texts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--threads", type=int, default=0, help="1 = single core; 0 = package default (all cores)")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    if a.threads:
        os.environ["RAYON_NUM_THREADS"] = str(a.threads)
        if a.threads == 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer, __version__

    tok = Tokenizer.from_file(a.tokenizer)
    texts = load_texts(a.input)
    if not texts:
        sys.exit(f"no texts under {a.input}")
    tok.encode_batch(texts[:100], add_special_tokens=False)  # warm-up
    best = None
    tokens = 0
    for _ in range(a.repeat):
        t = time.perf_counter()
        enc = tok.encode_batch(texts, add_special_tokens=False)
        dt = time.perf_counter() - t
        tokens = sum(len(e.ids) for e in enc)
        best = dt if best is None else min(best, dt)
    print(json.dumps({
        "tokens": tokens,
        "texts": len(texts),
        "bytes": sum(len(t.encode()) for t in texts),
        "secs": best,
        "tokens_per_s": tokens / best,
        "threads": a.threads or os.cpu_count(),
        "tokenizers_version": __version__,
    }))


if __name__ == "__main__":
    main()
