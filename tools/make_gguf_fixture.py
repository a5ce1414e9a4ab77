#!/usr/bin/env python3
"""Writes a small random LLaMA as a GGUF file with the `gguf` package (llama.cpp's own writer and
quantizers), plus the transformers model it stands for, for tests/gguf_import.rs.

    python tools/make_gguf_fixture.py OUT_DIR

OUT_DIR/
  model.gguf              hidden 64, 2 layers, 4 heads, 2 KV heads, FFN 128, untied, a 320-token
                          byte-level BPE (pre-tokenizer "smollm"), alignment 64, tensors in Q8_0,
                          Q4_0, Q4_1, F16, BF16 and F32, Q/K rows permuted as convert_hf_to_gguf.py
                          does
  metadata.gguf           one metadata key of every GGUF value type (llama_cpt.test.*), one tensor
  pre-<name>.gguf         the same with tokenizer.ggml.pre = gpt2 / llama-bpe (+ BOS) / qwen2
  hf/                     transformers' LlamaForCausalLM (F32) whose weights are the dequantised
                          GGUF tensors (in transformers' row order), and the original tokenizer.json
  dequant.safetensors     gguf.quants.dequantize of every GGUF tensor, named as in the GGUF
  reference.safetensors   input_ids and transformers' logits for them
  tokens.json             texts, and their ids by the original tokenizer and by transformers'
                          GGUF tokenizer reading (AutoTokenizer(..., gguf_file=...)) of every file

Quantisation works row by row (blocks of 32 along a row), so quantising the permuted Q/K equals
permuting the quantised one: the HF reference needs no inverse permutation, and llama-cpt's import
must find it on its own.
"""
import json
import os
import sys

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter, quants
from safetensors.numpy import save_file as save_np
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, VOCAB = 64, 2, 4, 2, 128, 320
THETA, EPS, CONTEXT = 50000.0, 1e-5, 256
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# GGUF name → type. Every supported type appears, in Q and K too.
TYPES = {
    "token_embd.weight": T.Q8_0,
    "output.weight": T.Q4_1,
    "output_norm.weight": T.F32,
    "blk.0.attn_norm.weight": T.F32,
    "blk.0.attn_q.weight": T.Q4_1,
    "blk.0.attn_k.weight": T.Q4_0,
    "blk.0.attn_v.weight": T.Q8_0,
    "blk.0.attn_output.weight": T.F16,
    "blk.0.ffn_norm.weight": T.F32,
    "blk.0.ffn_gate.weight": T.BF16,
    "blk.0.ffn_up.weight": T.Q4_1,
    "blk.0.ffn_down.weight": T.Q4_0,
    "blk.1.attn_norm.weight": T.F16,
    "blk.1.attn_q.weight": T.Q8_0,
    "blk.1.attn_k.weight": T.Q4_1,
    "blk.1.attn_v.weight": T.BF16,
    "blk.1.attn_output.weight": T.Q4_0,
    "blk.1.ffn_norm.weight": T.F32,
    "blk.1.ffn_gate.weight": T.Q8_0,
    "blk.1.ffn_up.weight": T.F32,
    "blk.1.ffn_down.weight": T.Q4_1,
}

HF_NAMES = {
    "token_embd": "model.embed_tokens", "output": "lm_head", "output_norm": "model.norm",
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}

CORPUS = [
    "The river runs past the old mill, and the miller counts 12 sacks of flour every morning.",
    "We'll meet at the harbour at 7; bring the maps, the lantern and 3 ropes.",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "离离原上草，一岁一枯荣。野火烧不尽，春风吹又生。",
    "Numbers like 2024 and 1999 are split into digits before merging.",
] * 20

TEXTS = [
    "The miller's harbour lantern runs past the river.",
    "离离原上草，一岁一枯荣",
    "In 2024 we counted 12345 sacks<|im_end|>\n\n  and   more\ttabs",
    "I'm sure they've seen it, haven't they? ¿Qué?",
]

VARIANTS = {"gpt2": {}, "llama-bpe": {"add_bos": True}, "qwen2": {}}


def hf_name(gguf_name):
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{HF_NAMES[parts[2]]}.weight"
    return HF_NAMES[parts[0]] + ".weight"


def permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute: rows reordered for GGML's rotary."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def train_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    return tok


def write_gguf(path, pre, tok, quantized, add_bos=False):
    w = GGUFWriter(path, "llama")
    w.add_name("llama-cpt GGUF fixture")
    w.add_custom_alignment(64)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(EPS)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_vocab_size(VOCAB)
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])  # 3: control
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_pad_token_id(vocab["<|endoftext|>"])
    w.add_unk_token_id(vocab["<|endoftext|>"])
    w.add_add_bos_token(add_bos)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    for name, (qtype, data) in quantized.items():
        if data.dtype == np.uint8:  # quantised or BF16 bytes; the writer derives the element shape
            w.add_tensor(name, data, raw_dtype=qtype)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_metadata_gguf(path):
    """One key of every GGUF value type, a nested array too (transformers' reader cannot read
    those, so they live in their own file), and one tensor; read back by the Rust test."""
    w = GGUFWriter(path, "llama")
    w.add_uint8("llama_cpt.test.u8", 200)
    w.add_int8("llama_cpt.test.i8", -100)
    w.add_uint16("llama_cpt.test.u16", 60000)
    w.add_int16("llama_cpt.test.i16", -30000)
    w.add_uint32("llama_cpt.test.u32", 4000000000)
    w.add_int32("llama_cpt.test.i32", -2000000000)
    w.add_float32("llama_cpt.test.f32", 0.25)
    w.add_bool("llama_cpt.test.bool", True)
    w.add_string("llama_cpt.test.str", "离离原上草")
    w.add_uint64("llama_cpt.test.u64", 2**63 + 5)
    w.add_int64("llama_cpt.test.i64", -(2**62))
    w.add_float64("llama_cpt.test.f64", -1.5e300)
    w.add_array("llama_cpt.test.array", [1.5, -2.0])
    w.add_array("llama_cpt.test.nested", [[1, 2], [3]])

    w.add_tensor("x", np.arange(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    out = sys.argv[1]
    os.makedirs(os.path.join(out, "hf"), exist_ok=True)
    torch.manual_seed(7)
    torch.set_num_threads(1)
    tok = train_tokenizer()
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rope_theta=THETA, rms_norm_eps=EPS,
                      max_position_embeddings=CONTEXT, tie_word_embeddings=False, initializer_range=0.1,
                      bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).float().eval()
    params = dict(model.named_parameters())

    quantized, dequant = {}, {}
    with torch.no_grad():
        for name, qtype in TYPES.items():
            p = params[hf_name(name)]
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))  # away from 1, so that norms are tested too
            w = p.detach().numpy().astype(np.float32)
            heads = HEADS if ".attn_q." in name else KV_HEADS if ".attn_k." in name else None
            stored = permute(w, heads) if heads else w
            q = quants.quantize(stored, qtype)
            quantized[name] = (qtype, q)
            dequant[name] = np.ascontiguousarray(quants.dequantize(q, qtype).astype(np.float32).reshape(stored.shape))
            # The HF model gets the same values in its own row order (quantisation is per row).
            back = quants.dequantize(quants.quantize(w, qtype), qtype).astype(np.float32).reshape(w.shape)
            if heads:
                assert np.array_equal(permute(back, heads).view(np.uint32), dequant[name].view(np.uint32)), name
            p.copy_(torch.from_numpy(back))

    write_gguf(os.path.join(out, "model.gguf"), "smollm", tok, quantized)
    for pre, opts in VARIANTS.items():
        write_gguf(os.path.join(out, f"pre-{pre}.gguf"), pre, tok, quantized, **opts)
    write_metadata_gguf(os.path.join(out, "metadata.gguf"))
    save_np(dequant, os.path.join(out, "dequant.safetensors"))
    model.save_pretrained(os.path.join(out, "hf"))
    tok.save(os.path.join(out, "hf", "tokenizer.json"))

    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    save_file({"input_ids": ids.contiguous(), "logits": logits.contiguous()}, os.path.join(out, "reference.safetensors"))

    tokens = {"texts": TEXTS, "original": [tok.encode(t, add_special_tokens=False).ids for t in TEXTS]}
    for file in ["model.gguf"] + [f"pre-{p}.gguf" for p in VARIANTS]:
        t = AutoTokenizer.from_pretrained(out, gguf_file=file)
        tokens[file] = {"plain": [t(x, add_special_tokens=False)["input_ids"] for x in TEXTS],
                        "special": [t(x)["input_ids"] for x in TEXTS]}
    with open(os.path.join(out, "tokens.json"), "w", encoding="utf-8") as f:
        json.dump(tokens, f, ensure_ascii=False, indent=1)
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters())} parameters, "
          f"types {sorted({q.name for q in TYPES.values()})}")


if __name__ == "__main__":
    main()
