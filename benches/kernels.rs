//! Kernel benchmarks: the CPU reference operators always; the CUDA kernels when built with
//! `--features cuda` and a GPU is present. Throughput is reported by criterion as bytes/s for
//! memory-bound kernels and as "elements"/s = FLOP/s for attention and GEMMs.
//!
//! `LLAMA_CPT_BENCH_JSON=path` skips criterion and times the CUDA cases directly (median of
//! repeated runs, synchronised), writing one JSON object per line:
//! `{"kernel", "shape", "seconds", "bytes", "flops"}` — what tools/device-check.sh feeds to
//! tools/bench_torch_gpu.py for the side-by-side table.
use criterion::{black_box, Criterion, Throughput};
use llama_cpt::backend::{AdamWConfig, AttnShape, Backend};
use llama_cpt::cpu::Cpu;
use rand::{rngs::StdRng, Rng, SeedableRng};

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut r = StdRng::seed_from_u64(seed);
    (0..n).map(|_| r.gen_range(-1.0f32..1.0)).collect()
}

fn cpu_benches(c: &mut Criterion) {
    let be = Cpu;
    let mut g = c.benchmark_group("cpu");
    g.sample_size(10);
    let (rows, dim) = (256, 4096);
    let x = rand_vec(rows * dim, 1);
    let w = rand_vec(dim, 2);
    g.throughput(Throughput::Bytes((2 * rows * dim * 4) as u64));
    g.bench_function(format!("rmsnorm {rows}x{dim}"), |b| b.iter(|| black_box(be.rmsnorm(&x, &w, dim, 1e-5))));
    let n = 1 << 20;
    let (gate, up) = (rand_vec(n, 3), rand_vec(n, 4));
    g.throughput(Throughput::Bytes((3 * n * 4) as u64));
    g.bench_function(format!("swiglu {n}"), |b| b.iter(|| black_box(be.swiglu(&gate, &up))));
    let (r, vocab) = (8, 69_104);
    let logits = rand_vec(r * vocab, 5);
    let targets: Vec<i32> = (0..r as i32).map(|i| i * 7).collect();
    g.throughput(Throughput::Bytes((r * vocab * 4) as u64));
    g.bench_function(format!("cross_entropy {r}x{vocab}"), |b| {
        b.iter(|| black_box(be.cross_entropy(&logits, &targets, vocab)))
    });
    let shape = AttnShape { heads: 4, kv_heads: 2, head_dim: 64 };
    let t = 512;
    let (q, k, v) = (rand_vec(t * 4 * 64, 6), rand_vec(t * 2 * 64, 7), rand_vec(t * 2 * 64, 8));
    g.throughput(Throughput::Elements((2 * t * t * 4 * 64) as u64));
    g.bench_function(format!("attention fwd t{t} {shape:?} (FLOP)"), |b| {
        b.iter(|| black_box(be.attention(&q, &k, &v, &[0, t as u32], shape)))
    });
    let n = 1 << 20;
    let (mut p, grad, mut m, mut vv) = (rand_vec(n, 9), rand_vec(n, 10), vec![0.0; n], vec![0.0; n]);
    let cfg = AdamWConfig::default();
    g.throughput(Throughput::Bytes((7 * n * 4) as u64));
    g.bench_function(format!("adamw {n}"), |b| {
        b.iter(|| be.adamw_step(&mut p, &grad, &mut m, &mut vv, &cfg, 1e-4, 1, true, 1.0, None))
    });
    g.finish();
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use llama_cpt::cuda::{AttnKernel, Cuda, CudaBuf, GemmPrecision};
    use std::rc::Rc;

    /// One timed case: name, shape, bytes moved (at least), FLOPs, and the work.
    pub struct Case<'a> {
        pub kernel: String,
        pub shape: String,
        pub bytes: f64,
        pub flops: f64,
        pub run: Box<dyn FnMut() + 'a>,
    }

    pub struct Inputs {
        pub be: Cuda,
        /// Mixed precision: activations and parameters in bf16 (kernel names get `_bf16`).
        mixed: bool,
        working: CudaBuf,
        x: CudaBuf,
        w: CudaBuf,
        gate: CudaBuf,
        up: CudaBuf,
        logits: CudaBuf,
        lse_ce: CudaBuf,
        table: CudaBuf,
        q: CudaBuf,
        k: CudaBuf,
        v: CudaBuf,
        o: CudaBuf,
        lse: CudaBuf,
        p: CudaBuf,
        g: CudaBuf,
        m: CudaBuf,
        vv: CudaBuf,
        a: CudaBuf,
        bm: CudaBuf,
    }

    /// The shapes timed: LLaMA-2-7B's at 4,096 tokens; with `LLAMA_CPT_BENCH_SMOKE=1` the tiny
    /// shapes of `tools/bench_torch_gpu.py --smoke` (the device check on the emulated device,
    /// where times mean nothing and the full shapes would take hours).
    #[allow(non_snake_case)]
    pub struct Sizes {
        pub ROWS: usize,
        pub DIM: usize,
        pub FF: usize,
        pub VOCAB: usize,
        pub SEQ: usize,
        pub ATTN: AttnShape,
        pub ADAM_N: usize,
        pub GEMM: usize,
    }

    pub fn sizes() -> Sizes {
        if std::env::var("LLAMA_CPT_BENCH_SMOKE").as_deref() == Ok("1") {
            let attn = AttnShape { heads: 4, kv_heads: 2, head_dim: 64 };
            Sizes { ROWS: 64, DIM: 128, FF: 256, VOCAB: 1000, SEQ: 128, ATTN: attn, ADAM_N: 1 << 12, GEMM: 128 }
        } else {
            let attn = AttnShape { heads: 32, kv_heads: 8, head_dim: 128 };
            Sizes {
                ROWS: 4096,
                DIM: 4096,
                FF: 11_008,
                VOCAB: 69_104,
                SEQ: 4096,
                ATTN: attn,
                ADAM_N: 64 << 20,
                GEMM: 4096,
            }
        }
    }

    impl Inputs {
        pub fn new(be: Cuda, mixed: bool) -> Inputs {
            #[allow(non_snake_case)]
            let Sizes { ROWS, DIM, FF, VOCAB, SEQ, ATTN, ADAM_N, GEMM } = sizes();
            be.set_mixed_precision(mixed);
            // Activations and parameters in the working precision; optimizer state in f32.
            let up = |n: usize, s: u64| be.to_working(&be.upload(&rand_vec(n, s)));
            let up32 = |n: usize, s: u64| be.upload(&rand_vec(n, s));
            let (hq, hk, d) = (ATTN.heads, ATTN.kv_heads, ATTN.head_dim);
            let x = up(ROWS * DIM, 1);
            let w = up(DIM, 2);
            let gate = up(ROWS * FF, 3);
            let upb = up(ROWS * FF, 4);
            let logits = up(ROWS * VOCAB, 5);
            let targets: Vec<i32> = (0..ROWS as i32).map(|i| (i * 131) % VOCAB as i32).collect();
            let (_, lse_ce) = be.cross_entropy(&logits, &targets, VOCAB);
            let table = up(VOCAB * DIM, 13);
            let (q, k, v) = (up(SEQ * hq * d, 6), up(SEQ * hk * d, 7), up(SEQ * hk * d, 8));
            let (o, lse) = be.attention(&q, &k, &v, &[0, SEQ as u32], ATTN);
            let (p, g, m, vv) = (up32(ADAM_N, 9), up32(ADAM_N, 10), be.zeros(ADAM_N), be.zeros(ADAM_N));
            let working = be.to_working(&p);
            let (a, bm) = (up(GEMM * GEMM, 11), up(GEMM * GEMM, 12));
            Inputs {
                be,
                mixed,
                working,
                x,
                w,
                gate,
                up: upb,
                logits,
                lse_ce,
                table,
                q,
                k,
                v,
                o,
                lse,
                p,
                g,
                m,
                vv,
                a,
                bm,
            }
        }

        #[allow(clippy::type_complexity)] // one annotated tuple re-borrows every buffer the cases share
        pub fn cases(&mut self) -> Vec<Case<'_>> {
            #[allow(non_snake_case)]
            let Sizes { ROWS, DIM, FF, VOCAB, SEQ, ATTN, ADAM_N, GEMM } = sizes();
            let Inputs {
                be,
                mixed,
                working,
                x,
                w,
                gate,
                up,
                logits,
                lse_ce,
                table,
                q,
                k,
                v,
                o,
                lse,
                p,
                g,
                m,
                vv,
                a,
                bm,
            } = self;
            let table: &CudaBuf = table;
            let be: &Cuda = be;
            let mixed = *mixed;
            be.set_mixed_precision(mixed);
            // Bytes per activation element, and the suffix that tells the two precisions apart.
            let (es, sfx) = if mixed { (2, "_bf16") } else { (4, "") };
            #[rustfmt::skip]
            let (x, w, gate, up, logits, lse_ce, q, k, v, o, lse, g, a, bm): (&CudaBuf, &CudaBuf, &CudaBuf, &CudaBuf, &CudaBuf, &CudaBuf, &CudaBuf, &CudaBuf, &CudaBuf, &CudaBuf, &CudaBuf, &CudaBuf, &CudaBuf, &CudaBuf) =
                (x, w, gate, up, logits, lse_ce, q, k, v, o, lse, g, a, bm);
            let targets: Vec<i32> = (0..ROWS as i32).map(|i| (i * 131) % VOCAB as i32).collect();
            let t2 = targets.clone();
            let (hq, d) = (ATTN.heads, ATTN.head_dim);
            let attn_flops = 2.0 * (SEQ * SEQ) as f64 * (hq * d) as f64; // causal: half of 4·S²·H·D
            let q_bytes = (SEQ * hq * d * es) as f64;
            let kv_bytes = (SEQ * ATTN.kv_heads * d * es) as f64;
            let dout = o.clone();
            let cfg = AdamWConfig::default();
            let gemm_flops = 2.0 * (GEMM as f64).powi(3);
            // Backward inputs: the forward's rstd, dy = x, d(out) = gate; RoPE at positions 0..SEQ;
            // the embedding looks up ROWS ids spread over the vocabulary.
            let (_, rstd) = be.rmsnorm(x, w, DIM, 1e-5);
            let mut dw = be.zeros(DIM);
            let positions: Vec<u32> = (0..SEQ as u32).collect();
            let ids: Vec<u32> = (0..ROWS as u32).map(|i| (i * 7919) % VOCAB as u32).collect();
            // Bytes are what the operation must move at least (inputs read once, outputs written
            // once): a kernel that reads a tensor twice shows it as a lower share of the copy rate.
            let mut cases = vec![
                Case {
                    kernel: format!("rmsnorm_fwd{sfx}"),
                    shape: format!("{ROWS}x{DIM}"),
                    bytes: (2 * ROWS * DIM * es) as f64,
                    flops: 0.0,
                    run: Box::new(move || drop(be.rmsnorm(x, w, DIM, 1e-5))),
                },
                Case {
                    kernel: format!("rmsnorm_bwd{sfx}"),
                    shape: format!("{ROWS}x{DIM}"),
                    bytes: (3 * ROWS * DIM * es) as f64,
                    flops: 0.0,
                    run: Box::new(move || drop(be.rmsnorm_backward(x, x, w, &rstd, DIM, &mut dw))),
                },
                Case {
                    kernel: format!("add{sfx}"),
                    shape: format!("{ROWS}x{DIM}"),
                    bytes: (3 * ROWS * DIM * es) as f64,
                    flops: 0.0,
                    run: Box::new(move || drop(be.add(x, x))),
                },
                Case {
                    kernel: format!("rope{sfx}"),
                    shape: format!("s{SEQ} h{hq} d{d}"),
                    bytes: 2.0 * q_bytes,
                    flops: 0.0,
                    run: Box::new(move || drop(be.rope(q, &positions, hq, d, 10_000.0, false))),
                },
                Case {
                    kernel: format!("embedding_fwd{sfx}"),
                    shape: format!("{ROWS}x{DIM} of {VOCAB}"),
                    bytes: (2 * ROWS * DIM * es) as f64,
                    flops: 0.0,
                    run: Box::new(move || drop(be.embedding(table, &ids, DIM))),
                },
                Case {
                    kernel: format!("swiglu_bwd{sfx}"),
                    shape: format!("{ROWS}x{FF}"),
                    bytes: (5 * ROWS * FF * es) as f64,
                    flops: 0.0,
                    run: Box::new(move || drop(be.swiglu_backward(gate, gate, up))),
                },
                Case {
                    kernel: format!("swiglu_fwd{sfx}"),
                    shape: format!("{ROWS}x{FF}"),
                    bytes: (3 * ROWS * FF * es) as f64,
                    flops: 0.0,
                    run: Box::new(move || drop(be.swiglu(gate, up))),
                },
                Case {
                    kernel: format!("cross_entropy_fwd{sfx}"),
                    shape: format!("{ROWS}x{VOCAB}"),
                    bytes: (ROWS * VOCAB * es) as f64,
                    flops: 0.0,
                    run: Box::new(move || drop(be.cross_entropy(logits, &targets, VOCAB))),
                },
                Case {
                    kernel: format!("cross_entropy_bwd{sfx}"),
                    shape: format!("{ROWS}x{VOCAB}"),
                    bytes: (2 * ROWS * VOCAB * es) as f64,
                    flops: 0.0,
                    run: Box::new(move || drop(be.cross_entropy_backward(logits, lse_ce, &t2, VOCAB, 1.0))),
                },
                Case {
                    kernel: format!("attention_fwd{sfx}"),
                    shape: format!("s{SEQ} h{hq}/{} d{d} causal", ATTN.kv_heads),
                    bytes: 2.0 * q_bytes + 2.0 * kv_bytes,
                    flops: attn_flops,
                    run: Box::new(move || drop(be.attention(q, k, v, &[0, SEQ as u32], ATTN))),
                },
                Case {
                    kernel: format!("attention_bwd{sfx}"),
                    shape: format!("s{SEQ} h{hq}/{} d{d} causal", ATTN.kv_heads),
                    bytes: 4.0 * q_bytes + 4.0 * kv_bytes,
                    flops: 2.5 * attn_flops,
                    run: Box::new(move || drop(be.attention_backward(&dout, q, k, v, o, lse, &[0, SEQ as u32], ATTN))),
                },
                Case {
                    kernel: format!("sum_squares{sfx}"),
                    shape: format!("{ADAM_N}"),
                    bytes: (ADAM_N * 4) as f64,
                    flops: 0.0,
                    run: Box::new(move || {
                        black_box(be.sum_squares(g));
                    }),
                },
            ];
            let gr = g;
            // Mixed precision: the fused step also writes the bf16 parameter (+2 bytes).
            let mut working = mixed.then_some(working);
            cases.push(Case {
                kernel: format!("adamw{sfx}"),
                shape: format!("{ADAM_N}"),
                bytes: ((7 * 4 + if mixed { 2 } else { 0 }) * ADAM_N) as f64,
                flops: 0.0,
                run: Box::new(move || be.adamw_step(p, gr, m, vv, &cfg, 1e-4, 3, true, 1.0, working.as_deref_mut())),
            });
            if mixed {
                // The first tensor-core forward beside the pipelined one (AttnKernel::Auto on bf16):
                // the gain measured in one run, not assumed.
                cases.push(Case {
                    kernel: "attention_fwd_bf16_tiled".into(),
                    shape: format!("s{SEQ} h{hq}/{} d{d} causal", ATTN.kv_heads),
                    bytes: 2.0 * q_bytes + 2.0 * kv_bytes,
                    flops: attn_flops,
                    run: Box::new(move || {
                        be.set_attention_kernel(AttnKernel::Tiled);
                        drop(be.attention(q, k, v, &[0, SEQ as u32], ATTN));
                        be.set_attention_kernel(AttnKernel::Auto);
                    }),
                });
                // The seven-matmul backward (dQ in its own kernel, no atomics) beside the fused one.
                let dout2 = o.clone();
                cases.push(Case {
                    kernel: "attention_bwd_bf16_deterministic".into(),
                    shape: format!("s{SEQ} h{hq}/{} d{d} causal", ATTN.kv_heads),
                    bytes: 4.0 * q_bytes + 4.0 * kv_bytes,
                    flops: 2.5 * attn_flops,
                    run: Box::new(move || {
                        be.set_attention_kernel(AttnKernel::Deterministic);
                        drop(be.attention_backward(&dout2, q, k, v, o, lse, &[0, SEQ as u32], ATTN));
                        be.set_attention_kernel(AttnKernel::Auto);
                    }),
                });
                cases.push(Case {
                    kernel: "linear_bf16_storage".into(),
                    shape: format!("{GEMM}x{GEMM}x{GEMM}"),
                    bytes: (3 * GEMM * GEMM * 2) as f64,
                    flops: gemm_flops,
                    run: Box::new(move || drop(be.linear(a, bm, GEMM, GEMM, GEMM))),
                });
                return cases;
            }
            for prec in [GemmPrecision::F32, GemmPrecision::Tf32, GemmPrecision::Bf16] {
                cases.push(Case {
                    kernel: format!("linear_{prec:?}").to_lowercase(),
                    shape: format!("{GEMM}x{GEMM}x{GEMM}"),
                    bytes: (3 * GEMM * GEMM * 4) as f64,
                    flops: gemm_flops,
                    run: Box::new(move || {
                        be.set_gemm_precision(prec);
                        drop(be.linear(a, bm, GEMM, GEMM, GEMM));
                        be.set_gemm_precision(GemmPrecision::F32);
                    }),
                });
            }
            cases
        }
    }

    pub fn gpu() -> Option<Cuda> {
        match Cuda::new(0) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("kernels bench: CUDA benches skipped: {e}");
                None
            }
        }
    }

    pub fn criterion_benches(c: &mut Criterion) {
        let Some(be) = gpu() else { return };
        let mut g = c.benchmark_group("cuda");
        g.sample_size(20);
        for mixed in [false, true] {
            let mut inputs = Inputs::new(be.clone(), mixed);
            for mut case in inputs.cases() {
                if case.flops > 0.0 {
                    g.throughput(Throughput::Elements(case.flops as u64));
                } else {
                    g.throughput(Throughput::Bytes(case.bytes as u64));
                }
                g.bench_function(format!("{} {}", case.kernel, case.shape), |b| {
                    b.iter(|| {
                        (case.run)();
                        be.synchronize().unwrap();
                    })
                });
            }
        }
        g.finish();
    }

    /// FlashAttention-2's benchmark grid on bf16 storage: head_dim 64 and 128 × sequence 1k–8k ×
    /// causal or per-document (4 equal documents per sequence, so that PyTorch's peer is SDPA on
    /// the documents as sequences), batch 16 × 16 heads; forward and backward. Smoke shapes:
    /// head_dim 64, sequence 128, batch 2 × 2 heads.
    pub fn attention_grid(be: &Cuda) -> Vec<Case<'static>> {
        let smoke = std::env::var("LLAMA_CPT_BENCH_SMOKE").as_deref() == Ok("1");
        let (dims, seqs, batch, heads): (&[usize], &[usize], usize, usize) =
            if smoke { (&[64], &[128], 2, 2) } else { (&[64, 128], &[1024, 2048, 4096, 8192], 16, 16) };
        be.set_mixed_precision(true);
        let mut cases = Vec::new();
        for &d in dims {
            for &seq in seqs {
                let shape = AttnShape { heads, kv_heads: heads, head_dim: d };
                let n = batch * seq * heads * d;
                // One random draw per shape, rotated for K, V and dO: the host RNG would take
                // longer than the timings (3 G values over the grid).
                let base = rand_vec(n, 21);
                let up = |shift: usize| {
                    let mut x = base.clone();
                    x.rotate_left(shift % n);
                    Rc::new(be.to_working(&be.upload(&x)))
                };
                let (q, k, v, dout) = (up(0), up(7919), up(104_729), up(1_299_709));
                for docs in [1usize, 4] {
                    let cu: Vec<u32> = (0..=batch * docs).map(|i| (i * seq / docs) as u32).collect();
                    let (o, lse) = be.attention(&q, &k, &v, &cu, shape);
                    let (o, lse) = (Rc::new(o), Rc::new(lse));
                    // Causal FLOPs: half of 4·S²·H·D per document, forward; the backward 2.5×.
                    let flops = (batch * docs) as f64 * 2.0 * ((seq / docs) as f64).powi(2) * (heads * d) as f64;
                    let mask = if docs == 1 { "causal" } else { "docs" };
                    let shape_s = format!("b{batch} h{heads} s{seq} d{d} {mask}");
                    let bytes = 4.0 * (n * 2) as f64;
                    let (bf, qf, kf, vf, cf) = (be.clone(), q.clone(), k.clone(), v.clone(), cu.clone());
                    cases.push(Case {
                        kernel: format!("grid_fwd_d{d}_s{seq}_{mask}"),
                        shape: shape_s.clone(),
                        bytes,
                        flops,
                        run: Box::new(move || drop(bf.attention(&qf, &kf, &vf, &cf, shape))),
                    });
                    let (bb, qb, kb, vb, db) = (be.clone(), q.clone(), k.clone(), v.clone(), dout.clone());
                    cases.push(Case {
                        kernel: format!("grid_bwd_d{d}_s{seq}_{mask}"),
                        shape: shape_s,
                        bytes: 2.0 * bytes,
                        flops: 2.5 * flops,
                        run: Box::new(move || drop(bb.attention_backward(&db, &qb, &kb, &vb, &o, &lse, &cu, shape))),
                    });
                }
            }
        }
        cases
    }

    /// Median of 15 synchronised runs after 3 warm-up runs, as one JSON line.
    fn time_case(be: &Cuda, case: &mut Case<'_>, lines: &mut String) {
        for _ in 0..3 {
            (case.run)();
        }
        be.synchronize().unwrap();
        let mut times = Vec::new();
        for _ in 0..15 {
            let t = std::time::Instant::now();
            (case.run)();
            be.synchronize().unwrap();
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let s = times[times.len() / 2];
        eprintln!("{:<20} {:<28} {:>10.3} ms", case.kernel, case.shape, s * 1e3);
        lines.push_str(&format!(
            "{{\"kernel\": \"{}\", \"shape\": \"{}\", \"seconds\": {s:.9}, \"bytes\": {}, \"flops\": {}}}\n",
            case.kernel, case.shape, case.bytes, case.flops
        ));
    }

    pub fn json_table(path: &str) {
        let Some(be) = gpu() else { return };
        let mut lines = String::new();
        for mixed in [false, true] {
            let mut inputs = Inputs::new(be.clone(), mixed);
            for mut case in inputs.cases() {
                time_case(&be, &mut case, &mut lines);
            }
        }
        // The attention grid last, its buffers made and freed apart from the cases above.
        for mut case in attention_grid(&be) {
            time_case(&be, &mut case, &mut lines);
        }
        be.set_mixed_precision(false);
        let stats = be.memory_stats();
        eprintln!("allocator: {stats:?}");
        std::fs::write(path, lines).expect("writing the bench table");
    }
}

fn main() {
    #[cfg(feature = "cuda")]
    if let Ok(path) = std::env::var("LLAMA_CPT_BENCH_JSON") {
        gpu::json_table(&path);
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    cpu_benches(&mut c);
    #[cfg(feature = "cuda")]
    gpu::criterion_benches(&mut c);
    c.final_summary();
}
