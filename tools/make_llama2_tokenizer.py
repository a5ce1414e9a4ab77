#!/usr/bin/env python3
"""A tokenizer.json in the layouts LLaMA-2's SentencePiece tokenizer ships in, for the
vocabulary-extension tests and measurements (Meta's file cannot be downloaded here).

    python tools/make_llama2_tokenizer.py --layout normalizer|metaspace --vocab-size N \
        --out DIR TEXTS.txt

Trains a SentencePiece BPE model on TEXTS.txt (one sentence per line) with the trainer settings
LLaMA-2's tokenizer.model records (byte fallback, split digits, identity normalization, no extra
whitespace removal, <unk>/<s>/</s> at ids 0..2) and converts it with transformers' own slow→fast
converter (`LlamaConverter`):

* `normalizer`: `legacy=True`, the layout of Meta's Llama-2-7b-hf tokenizer.json (and LLaMA-1,
  Mistral-7B-v0.1): normalizer Prepend("▁") + Replace(" ", "▁"), `pre_tokenizer: null`.
* `metaspace`: `legacy=False`: no normalizer, a Metaspace pre-tokenizer (prepend_scheme "first",
  split false).

Both: BPE with byte_fallback and fuse_unk, a TemplateProcessing post-processor adding <s>, decoder
Replace/ByteFallback/Fuse/Strip. The script checks those fields and fails if the converter wrote
anything else. DIR gets tokenizer.json, tokenizer_config.json and the SentencePiece tokenizer.model.
"""
import argparse
import json
import os
import sys
import tempfile

import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer, processors
from tokenizers.models import BPE
from transformers.convert_slow_tokenizer import LlamaConverter, SentencePieceExtractor


class SlowTokenizerStandIn:
    """What LlamaConverter reads from a slow LlamaTokenizer."""

    def __init__(self, vocab_file, legacy):
        self.vocab_file = vocab_file
        self.legacy = legacy
        self.add_prefix_space = True

    def convert_ids_to_tokens(self, i):
        return ["<unk>", "<s>", "</s>"][i]


class MergesByPieceId(SentencePieceExtractor):
    """transformers 5.24's SpmConverter hands the vocabulary scores to `extract` where it expects a
    model type; asking for BPE explicitly gives the merges ordered by piece id, which for a
    SentencePiece BPE model is its merge order."""

    def extract(self, vocab_scores=None):
        found = super().extract(BPE)
        return found["vocab"], found["merges"]


class Llama2Converter(LlamaConverter):
    SpmExtractor = MergesByPieceId


def expect(cond, what):
    if not cond:
        sys.exit(f"make_llama2_tokenizer: the converted tokenizer.json does not have the LLaMA-2 layout: {what}")


def check_layout(tj, layout):
    model = tj["model"]
    expect(model["type"] == "BPE", "model.type")
    expect(model.get("byte_fallback") is True, "model.byte_fallback")
    expect(model.get("fuse_unk") is True, "model.fuse_unk")
    expect(model.get("unk_token") == "<unk>", "model.unk_token")
    vocab = model["vocab"]
    expect([vocab.get(t) for t in ("<unk>", "<s>", "</s>", "<0x00>", "<0xFF>")] == [0, 1, 2, 3, 258], "ids of <unk>/<s>/</s>/<0x00>/<0xFF>")
    norm, pre = tj.get("normalizer"), tj.get("pre_tokenizer")
    if layout == "normalizer":
        expect(pre is None, "pre_tokenizer must be null")
        expect(norm is not None and norm["type"] == "Sequence", "normalizer must be a Sequence")
        steps = norm["normalizers"]
        expect([s["type"] for s in steps] == ["Prepend", "Replace"], "normalizer must be Prepend, Replace")
        expect(steps[0]["prepend"] == "▁", "normalizer Prepend(▁)")
        expect(steps[1]["pattern"] == {"String": " "} and steps[1]["content"] == "▁", "normalizer Replace(' ', ▁)")
    else:
        expect(norm is None, "normalizer must be null")
        expect(pre is not None and pre["type"] == "Metaspace", "pre_tokenizer must be Metaspace")
        expect(pre["replacement"] == "▁" and pre["prepend_scheme"] == "first" and pre["split"] is False, "Metaspace(▁, first, split false)")
    post = tj.get("post_processor")
    expect(post is not None and post["type"] == "TemplateProcessing", "post_processor TemplateProcessing")
    expect([list(x)[0] for x in post["single"]] == ["SpecialToken", "Sequence"] and post["single"][0]["SpecialToken"]["id"] == "<s>", "post_processor single = <s> $A")
    dec = tj.get("decoder")
    expect(dec is not None and [d["type"] for d in dec["decoders"]] == ["Replace", "ByteFallback", "Fuse", "Strip"], "decoder Replace/ByteFallback/Fuse/Strip")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", choices=["normalizer", "metaspace"], required=True)
    ap.add_argument("--vocab-size", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--character-coverage", type=float, default=0.99995)
    ap.add_argument("texts")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "sp")
        spm.SentencePieceTrainer.train(
            input=a.texts,
            model_prefix=prefix,
            model_type="bpe",
            vocab_size=a.vocab_size,
            character_coverage=a.character_coverage,
            byte_fallback=True,
            split_digits=True,
            split_by_whitespace=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            max_sentence_length=4192,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=2,
            minloglevel=2,
        )
        model_file = prefix + ".model"
        tok = Llama2Converter(SlowTokenizerStandIn(model_file, legacy=a.layout == "normalizer")).converted()
        # Meta's file lists all three specials as added tokens (the converter adds the control ones).
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
        # The BOS template: LlamaTokenizerFast installs it when it loads; Meta's file carries it.
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", 1)]
        )
        tj = json.loads(tok.to_str())
        check_layout(tj, a.layout)
        Tokenizer.from_str(json.dumps(tj))  # the tokenizers library reads it back
        with open(model_file, "rb") as f:
            sp_bytes = f.read()
    files = {
        "tokenizer.json": json.dumps(tj, ensure_ascii=False, indent=2).encode(),
        "tokenizer_config.json": json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "legacy": a.layout == "normalizer",
                "model_max_length": 4096,
            },
            indent=2,
        ).encode(),
        "tokenizer.model": sp_bytes,
    }
    for name, data in files.items():
        tmp_path = os.path.join(a.out, name + ".tmp")
        with open(tmp_path, "wb") as f:
            f.write(data)
        os.replace(tmp_path, os.path.join(a.out, name))
    print(f"{a.out}: {a.layout} layout, {len(tj['model']['vocab'])} ids, {len(tj['model']['merges'])} merges")


if __name__ == "__main__":
    main()
