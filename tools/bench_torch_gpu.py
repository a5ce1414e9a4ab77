#!/usr/bin/env python3
"""PyTorch on the shapes of benches/kernels.rs (GPU), the card's two ceilings, and the table.

Measures: device-to-device copy bandwidth (bytes read + written) and the bf16 matmul rate
(8192^3) of the card; PyTorch's time for each kernel of ours (F.scaled_dot_product_attention
causal bf16 at seq 4096 head_dim 128, F.rms_norm, silu*up, cross-entropy at vocab 69,104,
torch.optim.AdamW(fused=True), the sum of squares, matmuls). Then, with --ours (the JSON lines of
`LLAMA_CPT_BENCH_JSON=... kernels_bench`), prints one table last: kernel, shape, time, GB/s or
TFLOP/s, % of the measured roofline, and our time over PyTorch's (below 1 = we are faster).

`--smoke` runs the same code on the CPU with tiny shapes (a test of this script, not a
measurement): the device check runs once per lent GPU, so it must not fail on a typo.
"""
import time
import argparse
import json

import torch
import torch.nn.functional as F

ROWS, DIM, FF, VOCAB, SEQ, HQ, HK, D = 4096, 4096, 11008, 69104, 4096, 32, 8, 128
ADAM_N, GEMM = 64 << 20, 4096


SMOKE_SHAPES = dict(ROWS=64, DIM=128, FF=256, VOCAB=1000, SEQ=128, HQ=4, HK=2, D=64, ADAM_N=1 << 12, GEMM=128)
COPY_ELEMS, MATMUL_N = 1 << 28, 8192
# Set by --smoke, not by torch.cuda.is_available(): smoke mode runs on the CPU on a GPU host too,
# where CUDA events around CPU work would time nothing.
SMOKE = False


def bench(fn, warmup=3, reps=15):
    if SMOKE:  # wall-clock on the CPU
        fn()
        t = time.perf_counter()
        fn()
        return max(time.perf_counter() - t, 1e-9)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", help="JSON lines from kernels_bench")
    ap.add_argument("--json", help="write PyTorch's numbers here")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks this script only")
    args = ap.parse_args()
    global ROWS, DIM, FF, VOCAB, SEQ, HQ, HK, D, ADAM_N, GEMM, COPY_ELEMS, MATMUL_N, SMOKE
    SMOKE = args.smoke
    if args.smoke:
        ROWS, DIM, FF, VOCAB, SEQ, HQ, HK, D, ADAM_N, GEMM = SMOKE_SHAPES.values()
        COPY_ELEMS, MATMUL_N = 1 << 16, 128
        dev = torch.device("cpu")
        card = "cpu (smoke test, not a measurement)"
        print(f"device: {card}, torch {torch.__version__}")
    else:
        dev = torch.device("cuda")
        props = torch.cuda.get_device_properties(0)
        card = props.name
        print(f"device: {card}, {props.multi_processor_count} SMs, torch {torch.__version__}")
    torch.manual_seed(0)

    # Ceilings.
    src = torch.randn(COPY_ELEMS, device=dev)  # 1 GiB
    dst = torch.empty_like(src)
    t = bench(lambda dst=dst, src=src: dst.copy_(src))
    copy_bw = 2 * src.numel() * 4 / t
    a = torch.randn(MATMUL_N, MATMUL_N, device=dev, dtype=torch.bfloat16)
    b = torch.randn(MATMUL_N, MATMUL_N, device=dev, dtype=torch.bfloat16)
    t = bench(lambda a=a, b=b: a @ b, reps=10)
    mm_rate = 2 * MATMUL_N**3 / t
    del src, dst, a, b
    print(f"measured copy bandwidth {copy_bw / 1e9:.0f} GB/s, bf16 matmul {mm_rate / 1e12:.0f} TFLOP/s")

    torch_t = {}
    x = torch.randn(ROWS, DIM, device=dev)
    w = torch.randn(DIM, device=dev)
    torch_t["rmsnorm_fwd"] = bench(lambda x=x, w=w: F.rms_norm(x, (DIM,), w, 1e-5))
    g = torch.randn(ROWS, FF, device=dev)
    u = torch.randn(ROWS, FF, device=dev)
    torch_t["swiglu_fwd"] = bench(lambda g=g, u=u: F.silu(g) * u)
    # Mixed precision (our `_bf16` rows): the same ops on bf16 tensors.
    xb, wb, gb16, ub = x.bfloat16(), w.bfloat16(), g.bfloat16(), u.bfloat16()
    torch_t["rmsnorm_fwd_bf16"] = bench(lambda xb=xb, wb=wb: F.rms_norm(xb, (DIM,), wb, 1e-5))
    torch_t["swiglu_fwd_bf16"] = bench(lambda gb16=gb16, ub=ub: F.silu(gb16) * ub)
    # The backward of both, the residual add, RoPE (HF's rotate-half form, cos/sin precomputed as
    # transformers does) and the embedding lookup, in both precisions, as our rows.
    table = torch.randn(VOCAB, DIM, device=dev)
    ids = (torch.arange(ROWS, device=dev) * 7919) % VOCAB
    pos = torch.arange(SEQ, device=dev, dtype=torch.float32)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, device=dev, dtype=torch.float32) / D)
    ang = torch.cat([torch.outer(pos, inv_freq)] * 2, dim=-1)[:, None, :]
    qr = torch.randn(SEQ, HQ, D, device=dev)

    def rope(q, cos, sin):
        q1, q2 = q[..., : D // 2], q[..., D // 2:]
        return q * cos + torch.cat((-q2, q1), dim=-1) * sin

    for sfx, dt in (("", torch.float32), ("_bf16", torch.bfloat16)):
        xr = x.to(dt).requires_grad_()
        wr = w.to(dt).requires_grad_()
        y = F.rms_norm(xr, (DIM,), wr, 1e-5)
        dy = torch.randn_like(y)
        torch_t["rmsnorm_bwd" + sfx] = bench(lambda y=y, xr=xr, wr=wr, dy=dy: torch.autograd.grad(y, (xr, wr), dy, retain_graph=True))
        gr, ur = g.to(dt).requires_grad_(), u.to(dt).requires_grad_()
        s_ = F.silu(gr) * ur
        ds = torch.randn_like(s_)
        torch_t["swiglu_bwd" + sfx] = bench(lambda s_=s_, gr=gr, ur=ur, ds=ds: torch.autograd.grad(s_, (gr, ur), ds, retain_graph=True))
        xd = x.to(dt)
        torch_t["add" + sfx] = bench(lambda xd=xd: xd + xd)
        cos, sin, qd = ang.cos().to(dt), ang.sin().to(dt), qr.to(dt)
        torch_t["rope" + sfx] = bench(lambda qd=qd, cos=cos, sin=sin: rope(qd, cos, sin))
        td = table.to(dt)
        torch_t["embedding_fwd" + sfx] = bench(lambda td=td: F.embedding(ids, td))
        del xr, wr, y, dy, gr, ur, s_, ds, xd, cos, sin, qd, td
    del x, g, u, xb, wb, gb16, ub, table, qr
    logits = torch.randn(ROWS, VOCAB, device=dev, requires_grad=True)
    tgt = torch.randint(0, VOCAB, (ROWS,), device=dev)
    torch_t["cross_entropy_fwd"] = bench(lambda logits=logits: F.cross_entropy(logits, tgt))
    loss = F.cross_entropy(logits, tgt)
    torch_t["cross_entropy_bwd"] = bench(lambda loss=loss, logits=logits: torch.autograd.grad(loss, logits, retain_graph=True))
    del logits, loss
    logits = torch.randn(ROWS, VOCAB, device=dev, dtype=torch.bfloat16, requires_grad=True)
    torch_t["cross_entropy_fwd_bf16"] = bench(lambda logits=logits: F.cross_entropy(logits, tgt))
    loss = F.cross_entropy(logits, tgt)
    torch_t["cross_entropy_bwd_bf16"] = bench(lambda loss=loss, logits=logits: torch.autograd.grad(loss, logits, retain_graph=True))
    del logits, loss
    q = torch.randn(1, HQ, SEQ, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, HK, SEQ, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, HK, SEQ, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    def sdpa(q=q, k=k, v=v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    torch_t["attention_fwd"] = bench(sdpa)
    o = sdpa()
    do = torch.randn_like(o)
    torch_t["attention_bwd"] = bench(lambda o=o, q=q, k=k, v=v, do=do: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
    # SDPA runs in bf16 for both of our rows (ours reads f32 or bf16 and computes on bf16 tiles).
    torch_t["attention_fwd_bf16"], torch_t["attention_bwd_bf16"] = torch_t["attention_fwd"], torch_t["attention_bwd"]
    torch_t["attention_fwd_bf16_tiled"] = torch_t["attention_fwd"]  # our first forward, beside the pipelined one
    torch_t["attention_bwd_bf16_deterministic"] = torch_t["attention_bwd"]  # our seven-matmul backward
    del q, k, v, o, do
    # FlashAttention-2's grid (our grid_* rows, benches/kernels.rs): batch 16 × 16 heads, bf16,
    # causal, or 4 equal documents per sequence (SDPA on the documents as sequences); flash_attn
    # beside it where the image has the package.
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        flash_attn_func = None
    fa_t = {}
    g_dims, g_seqs, g_batch, g_heads = ((64,), (128,), 2, 2) if SMOKE else ((64, 128), (1024, 2048, 4096, 8192), 16, 16)
    for d_ in g_dims:
        for seq in g_seqs:
            for docs, mask in ((1, "causal"), (4, "docs")):
                shp = (g_batch * docs, g_heads, seq // docs, d_)
                qg, kg, vg = (torch.randn(shp, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
                og = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
                dog = torch.randn_like(og)
                torch_t[f"grid_fwd_d{d_}_s{seq}_{mask}"] = bench(
                    lambda qg=qg, kg=kg, vg=vg: F.scaled_dot_product_attention(qg, kg, vg, is_causal=True))
                torch_t[f"grid_bwd_d{d_}_s{seq}_{mask}"] = bench(
                    lambda og=og, qg=qg, kg=kg, vg=vg, dog=dog: torch.autograd.grad(og, (qg, kg, vg), dog, retain_graph=True))
                if flash_attn_func is not None and not SMOKE:
                    qf, kf, vf = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (qg, kg, vg))
                    of = flash_attn_func(qf, kf, vf, causal=True)
                    dof = torch.randn_like(of)
                    fa_t[f"grid_fwd_d{d_}_s{seq}_{mask}"] = bench(lambda qf=qf, kf=kf, vf=vf: flash_attn_func(qf, kf, vf, causal=True))
                    fa_t[f"grid_bwd_d{d_}_s{seq}_{mask}"] = bench(
                        lambda of=of, qf=qf, kf=kf, vf=vf, dof=dof: torch.autograd.grad(of, (qf, kf, vf), dof, retain_graph=True))
                    del qf, kf, vf, of, dof
                del qg, kg, vg, og, dog
    p = torch.nn.Parameter(torch.randn(ADAM_N, device=dev))
    p.grad = torch.randn(ADAM_N, device=dev)
    opt = torch.optim.AdamW([p], lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    torch_t["adamw"] = bench(opt.step)
    # torch's fused AdamW keeps no fp32 master of a bf16 parameter: the f32 step is the peer.
    torch_t["adamw_bf16"] = torch_t["adamw"]
    torch_t["sum_squares"] = bench(lambda p=p: torch.linalg.vector_norm(p.grad, dtype=torch.float64))
    del p, opt
    ga = torch.randn(GEMM, GEMM, device=dev)
    gb = torch.randn(GEMM, GEMM, device=dev)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch_t["linear_f32"] = bench(lambda: ga @ gb.t())
    torch.backends.cuda.matmul.allow_tf32 = True
    torch_t["linear_tf32"] = bench(lambda: ga @ gb.t())
    torch.backends.cuda.matmul.allow_tf32 = False
    ha, hb = ga.bfloat16(), gb.bfloat16()
    torch_t["linear_bf16"] = bench(lambda: ha @ hb.t())
    torch_t["linear_bf16_storage"] = torch_t["linear_bf16"]

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_bw": copy_bw, "bf16_matmul": mm_rate, "torch_seconds": torch_t, "flash_attn_seconds": fa_t}, f, indent=1)

    rows = []
    if args.ours:
        with open(args.ours) as f:
            for line in f:
                if line.strip():
                    rows.append(json.loads(line))
    print()
    print(f"{'kernel':<20} {'shape':<26} {'time ms':>9} {'rate':>14} {'% roof':>7} {'torch ms':>9} {'ours/torch':>10}")
    print("-" * 101)
    for r in rows:
        s = r["seconds"]
        if r["flops"] > 0:
            rate, roof = r["flops"] / s, r["flops"] / s / mm_rate
            rate_s = f"{rate / 1e12:8.1f} TFLOP/s"
        else:
            rate, roof = r["bytes"] / s, r["bytes"] / s / copy_bw
            rate_s = f"{rate / 1e9:9.0f} GB/s"
        tt = torch_t.get(r["kernel"])
        tt_s = f"{tt * 1e3:9.3f}" if tt else f"{'-':>9}"
        ratio = f"{s / tt:10.2f}" if tt else f"{'-':>10}"
        print(f"{r['kernel']:<20} {r['shape']:<26} {s * 1e3:9.3f} {rate_s:>14} {100 * roof:6.0f}% {tt_s} {ratio}")
    if fa_t:
        print("flash_attn (the package) on the grid rows, ms: "
              + ", ".join(f"{k_} {v_ * 1e3:.3f}" for k_, v_ in fa_t.items()))
    elif not SMOKE:
        print("flash_attn: not installed in this image; the grid rows' peer is SDPA only")
    if not rows:
        print("(no timings of ours: pass --ours)")
        for k_, v_ in torch_t.items():
            print(f"torch {k_:<20} {v_ * 1e3:9.3f} ms")
    print(f"roofline: copy {copy_bw / 1e9:.0f} GB/s, bf16 matmul {mm_rate / 1e12:.0f} TFLOP/s ({card}); "
          "attention and our GEMMs' FLOPs against the bf16 rate, the rest bytes against the copy bandwidth")


if __name__ == "__main__":
    main()
