//! The CUDA backend against the CPU reference (`ops` through `Cpu`), kernel by kernel and for a
//! whole forward+backward of a small model. Every test that needs a GPU is `#[ignore]`d: run them
//! on a GPU machine with `cargo test --features cuda --release -- --include-ignored`
//! (tools/device-check.sh does).
//!
//! Inputs are fresh random numbers on every run (the seed is printed, `CUDA_TEST_SEED` replays
//! one); every output buffer is filled with NaN when it is allocated, before the kernel that must
//! write it, and NaN never passes a comparison. Errors are ‖got − want‖ / ‖want‖: ~1e-5 for f32
//! kernels, ~2e-2 where bf16 tensor cores are used.
#![cfg(feature = "cuda")]
mod common;

use llama_cpt::backend::{AdamWConfig, AdamWTensor, AttnShape, Backend};
use llama_cpt::batch::Batch;
use llama_cpt::config::LlamaConfig;
use llama_cpt::cpu::Cpu;
use llama_cpt::cuda::{AttnKernel, Cuda, CudaBuf, DType, GemmPrecision};
use llama_cpt::model::{Llama, StepOptions};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::sync::atomic::{AtomicU64, Ordering};

const F32_TOL: f64 = 1e-5;
const BF16_TOL: f64 = 2e-2;

fn gpu() -> Cuda {
    let c = Cuda::new(0).unwrap_or_else(|e| panic!("these tests need a CUDA GPU: {e}"));
    c.set_poison_allocations(true);
    c.set_sync_each_launch(true);
    c.set_gemm_precision(GemmPrecision::F32);
    c.set_attention_kernel(AttnKernel::Auto);
    c
}

/// A fresh generator per call: a per-process base seed (time, or CUDA_TEST_SEED) plus a counter.
fn rng() -> StdRng {
    static BASE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static N: AtomicU64 = AtomicU64::new(0);
    let base = *BASE.get_or_init(|| {
        let s = std::env::var("CUDA_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
        });
        eprintln!("cuda_kernels: CUDA_TEST_SEED={s}");
        s
    });
    StdRng::seed_from_u64(base.wrapping_add(N.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9e37_79b9_7f4a_7c15)))
}

fn rand_vec(n: usize, scale: f32) -> Vec<f32> {
    let mut r = rng();
    (0..n).map(|_| r.gen_range(-1.0f32..1.0) * scale).collect()
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f64::INFINITY;
        }
        num += ((g - w) as f64).powi(2);
        den += (w as f64).powi(2);
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

#[track_caller]
fn check(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(got, want);
    let nan = got.iter().filter(|x| x.is_nan()).count();
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e} ({nan} NaN of {})", got.len());
}

#[test]
fn constructing_without_a_gpu_is_an_error_not_a_panic() {
    let made = std::panic::catch_unwind(|| Cuda::new(0).map(|_| ()));
    let made = made.expect("Cuda::new must not panic");
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        let e = made.expect_err("no driver: Cuda::new must fail");
        assert!(format!("{e}").contains("no CUDA driver found"), "{e}");
    }
    // A device ordinal that cannot exist is an error too, wherever this runs.
    let far = std::panic::catch_unwind(|| Cuda::new(4096).is_err()).expect("Cuda::new must not panic");
    assert!(far);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn upload_download_clone_and_elementwise() {
    let g = gpu();
    for n in [1usize, 7, 1000, 1 << 20 | 3] {
        let (a, b) = (rand_vec(n, 2.0), rand_vec(n, 2.0));
        let (da, db) = (g.upload(&a), g.upload(&b));
        assert_eq!(g.download(&da), a);
        let copy = da.clone();
        let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        check("add", &g.download(&g.add(&da, &db)), &want, 0.0);
        let mut acc = da.clone();
        g.add_assign(&mut acc, &db);
        check("add_assign", &g.download(&acc), &want, 0.0);
        g.scale_assign(&mut acc, 0.5);
        let half: Vec<f32> = want.iter().map(|x| x * 0.5).collect();
        check("scale_assign", &g.download(&acc), &half, 0.0);
        assert_eq!(g.download(&copy), a, "a clone is independent of the original");
        assert!(g.download(&g.zeros(n)).iter().all(|&x| x == 0.0));
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn linear_forward_backward_matches_cpu() {
    let g = gpu();
    for prec in [GemmPrecision::F32, GemmPrecision::Tf32, GemmPrecision::Bf16] {
        g.set_gemm_precision(prec);
        let tol = if prec == GemmPrecision::F32 { F32_TOL } else { BF16_TOL };
        for &(m, k, n) in &[(1, 1, 1), (3, 5, 7), (17, 33, 9), (70, 65, 130), (257, 96, 1000)] {
            let (x, w, dy) = (rand_vec(m * k, 1.0), rand_vec(n * k, 1.0), rand_vec(m * n, 1.0));
            let dw0 = rand_vec(n * k, 1.0);
            let what = format!("{prec:?} {m}x{k}x{n}");
            check(
                &format!("linear {what}"),
                &g.download(&g.linear(&g.upload(&x), &g.upload(&w), m, k, n)),
                &Cpu.linear(&x, &w, m, k, n),
                tol,
            );
            let (mut dw_c, mut dw_g) = (dw0.clone(), g.upload(&dw0));
            let dx_c = Cpu.linear_backward(&dy, &x, &w, &mut dw_c, m, k, n);
            let dx_g = g.linear_backward(&g.upload(&dy), &g.upload(&x), &g.upload(&w), &mut dw_g, m, k, n);
            check(&format!("linear dx {what}"), &g.download(&dx_g), &dx_c, tol);
            check(&format!("linear dw (accumulated) {what}"), &g.download(&dw_g), &dw_c, tol);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn embedding_forward_and_deterministic_backward() {
    let g = gpu();
    for (vocab, dim) in [(70_000usize, 3usize), (1000, 256), (50, 1000)] {
        let table = rand_vec(vocab * dim, 1.0);
        let mut r = rng();
        let mut ids: Vec<u32> = (0..300).map(|_| r.gen_range(0..vocab as u32)).collect();
        ids.extend_from_slice(&[vocab as u32 - 1, 5, 5, 0, 5]);
        let out = g.download(&g.embedding(&g.upload(&table), &ids, dim));
        assert_eq!(out, Cpu.embedding(&table, &ids, dim), "embedding forward is a copy");
        let dy = rand_vec(ids.len() * dim, 1.0);
        let d0 = rand_vec(vocab * dim, 1.0);
        let mut dc = d0.clone();
        Cpu.embedding_backward(&dy, &ids, dim, &mut dc);
        let mut dg = g.upload(&d0);
        g.embedding_backward(&g.upload(&dy), &ids, dim, &mut dg);
        assert_eq!(g.download(&dg), dc, "embedding backward: same sums in the same order as the CPU");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rmsnorm_forward_backward_matches_cpu() {
    let g = gpu();
    for &(rows, dim) in &[(1usize, 1usize), (5, 7), (33, 24), (300, 4096), (7, 4099)] {
        let (x, w, dy) = (rand_vec(rows * dim, 3.0), rand_vec(dim, 1.0), rand_vec(rows * dim, 1.0));
        let (y_c, r_c) = Cpu.rmsnorm(&x, &w, dim, 1e-5);
        let (xg, wg) = (g.upload(&x), g.upload(&w));
        let (y_g, r_g) = g.rmsnorm(&xg, &wg, dim, 1e-5);
        check(&format!("rmsnorm y {rows}x{dim}"), &g.download(&y_g), &y_c, F32_TOL);
        check(&format!("rmsnorm rstd {rows}x{dim}"), &g.download(&r_g), &r_c, F32_TOL);
        let dw0 = rand_vec(dim, 1.0);
        let (mut dw_c, mut dw_g) = (dw0.clone(), g.upload(&dw0));
        let dx_c = Cpu.rmsnorm_backward(&dy, &x, &w, &r_c, dim, &mut dw_c);
        let dx_g = g.rmsnorm_backward(&g.upload(&dy), &xg, &wg, &r_g, dim, &mut dw_g);
        check(&format!("rmsnorm dx {rows}x{dim}"), &g.download(&dx_g), &dx_c, F32_TOL);
        check(&format!("rmsnorm dw {rows}x{dim}"), &g.download(&dw_g), &dw_c, F32_TOL);
        // The fused residual add + norm against the two reference operators.
        let res = rand_vec(rows * dim, 2.0);
        let (h_c, y2_c, r2_c) = Cpu.add_rmsnorm(&x, &res, &w, dim, 1e-5);
        let (h_g, y2_g, r2_g) = g.add_rmsnorm(&xg, &g.upload(&res), &wg, dim, 1e-5);
        check(&format!("add_rmsnorm h {rows}x{dim}"), &g.download(&h_g), &h_c, 0.0);
        check(&format!("add_rmsnorm y {rows}x{dim}"), &g.download(&y2_g), &y2_c, F32_TOL);
        check(&format!("add_rmsnorm rstd {rows}x{dim}"), &g.download(&r2_g), &r2_c, F32_TOL);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rope_both_directions_match_cpu() {
    let g = gpu();
    for &(heads, hd) in &[(3usize, 6usize), (4, 64), (2, 128)] {
        let mut r = rng();
        let mut pos: Vec<u32> = (0..37).map(|_| r.gen_range(0..4096)).collect();
        pos.extend_from_slice(&[0, 1, 4095, 131_071]);
        let x = rand_vec(pos.len() * heads * hd, 1.0);
        for theta in [10_000.0, 500_000.0] {
            for inverse in [false, true] {
                let want = Cpu.rope(&x, &pos, heads, hd, theta, inverse);
                let got = g.download(&g.rope(&g.upload(&x), &pos, heads, hd, theta, inverse));
                check(&format!("rope h{heads} d{hd} θ{theta} inverse {inverse}"), &got, &want, F32_TOL);
            }
        }
    }
}

fn attention_cases() -> Vec<(AttnShape, Vec<u32>)> {
    let sh = |heads, kv_heads, head_dim| AttnShape { heads, kv_heads, head_dim };
    vec![
        (sh(2, 2, 64), vec![0, 13]),
        (sh(4, 2, 64), vec![0, 64, 65, 129, 300]),
        (sh(4, 1, 128), vec![0, 1, 2, 66, 130, 130, 387]),
        (sh(8, 2, 128), vec![0, 520]),
        (sh(2, 1, 64), vec![0, 63, 127, 191]),
        (sh(4, 2, 6), vec![0, 5, 6, 11]),
        (sh(3, 3, 80), vec![0, 40, 97]),
        (sh(2, 1, 256), vec![0, 33]),
    ]
}

fn attention_against_cpu(g: &Cuda, shape: AttnShape, cu: &[u32], tol: f64) {
    let t = *cu.last().unwrap() as usize;
    let (hq, hk, d) = (shape.heads, shape.kv_heads, shape.head_dim);
    let (q, k, v) = (rand_vec(t * hq * d, 2.0), rand_vec(t * hk * d, 2.0), rand_vec(t * hk * d, 1.0));
    let dout = rand_vec(t * hq * d, 1.0);
    let what = format!("{shape:?} cu {cu:?} {:?}", g.attention_kernel());
    let (o_c, l_c) = Cpu.attention(&q, &k, &v, cu, shape);
    let (qg, kg, vg) = (g.upload(&q), g.upload(&k), g.upload(&v));
    let (o_g, l_g) = g.attention(&qg, &kg, &vg, cu, shape);
    check(&format!("attention out {what}"), &g.download(&o_g), &o_c, tol);
    check(&format!("attention lse {what}"), &g.download(&l_g), &l_c, tol);
    let (dq_c, dk_c, dv_c) = Cpu.attention_backward(&dout, &q, &k, &v, &o_c, &l_c, cu, shape);
    let (dq_g, dk_g, dv_g) = g.attention_backward(&g.upload(&dout), &qg, &kg, &vg, &o_g, &l_g, cu, shape);
    check(&format!("attention dq {what}"), &g.download(&dq_g), &dq_c, tol * 1.5);
    check(&format!("attention dk {what}"), &g.download(&dk_g), &dk_c, tol * 1.5);
    check(&format!("attention dv {what}"), &g.download(&dv_g), &dv_c, tol * 1.5);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_tensor_core_kernels_match_cpu() {
    let g = gpu();
    for (shape, cu) in attention_cases() {
        let tol = if shape.head_dim == 64 || shape.head_dim == 128 { BF16_TOL } else { 1e-4 };
        attention_against_cpu(&g, shape, &cu, tol);
    }
}

/// The pipelined forward (cuda/attention_fa2.cu, bf16 storage) against the CPU on the same bf16
/// inputs and against the first tensor-core forward (`AttnKernel::Tiled`): 128-row query tiles
/// cut raggedly (documents of one token, rows not a multiple of the tile), GQA 1, 2, 4 and 8,
/// head_dim 64 and 128; then the backward from its output and lse.
#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_pipelined_forward_matches_the_cpu_and_the_tiled_kernel() {
    let g = gpu();
    g.set_mixed_precision(true);
    let sh = |heads, kv_heads, head_dim| AttnShape { heads, kv_heads, head_dim };
    let cases = [
        (sh(2, 2, 64), vec![0u32, 13]),
        (sh(4, 2, 64), vec![0, 64, 65, 129, 300]),
        (sh(8, 1, 64), vec![0, 200, 457]),
        (sh(2, 1, 64), vec![0, 127, 128, 256, 257]),
        (sh(4, 1, 128), vec![0, 1, 2, 66, 130, 130, 387]),
        (sh(8, 2, 128), vec![0, 520]),
        (sh(8, 1, 128), vec![0, 129]),
    ];
    let bf16 = |v: Vec<f32>| -> Vec<f32> { v.into_iter().map(llama_cpt_ops::convert::round_to_bf16).collect() };
    for (shape, cu) in cases {
        let t = *cu.last().unwrap() as usize;
        let (hq, hk, d) = (shape.heads, shape.kv_heads, shape.head_dim);
        let (q, k, v) =
            (bf16(rand_vec(t * hq * d, 2.0)), bf16(rand_vec(t * hk * d, 2.0)), bf16(rand_vec(t * hk * d, 1.0)));
        let dout = bf16(rand_vec(t * hq * d, 1.0));
        let what = format!("{shape:?} cu {cu:?}");
        let (o_c, l_c) = Cpu.attention(&q, &k, &v, &cu, shape);
        let (qg, kg, vg) = (g.upload(&q), g.upload(&k), g.upload(&v));
        g.set_attention_kernel(AttnKernel::Tiled);
        let (o_t, l_t) = g.attention(&qg, &kg, &vg, &cu, shape);
        g.set_attention_kernel(AttnKernel::Auto);
        let (o_g, l_g) = g.attention(&qg, &kg, &vg, &cu, shape);
        assert_eq!(o_g.dtype(), DType::Bf16);
        let (o, l) = (g.download(&o_g), g.download(&l_g));
        // P and the output are rounded to bf16 (relative 2^-9 each); lse sums f32 probabilities.
        check(&format!("pipelined attention out {what}"), &o, &o_c, 1e-2);
        check(&format!("pipelined attention lse {what}"), &l, &l_c, 1e-5);
        check(&format!("pipelined vs tiled out {what}"), &o, &g.download(&o_t), 5e-3);
        check(&format!("pipelined vs tiled lse {what}"), &l, &g.download(&l_t), 1e-6);
        let (dq_c, dk_c, dv_c) = Cpu.attention_backward(&dout, &q, &k, &v, &o_c, &l_c, &cu, shape);
        let (dq_g, dk_g, dv_g) = g.attention_backward(&g.upload(&dout), &qg, &kg, &vg, &o_g, &l_g, &cu, shape);
        check(&format!("attention dq after the pipelined forward {what}"), &g.download(&dq_g), &dq_c, BF16_TOL * 1.5);
        check(&format!("attention dk after the pipelined forward {what}"), &g.download(&dk_g), &dk_c, BF16_TOL * 1.5);
        check(&format!("attention dv after the pipelined forward {what}"), &g.download(&dv_g), &dv_c, BF16_TOL * 1.5);
    }
    g.set_mixed_precision(false);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_simple_kernels_match_cpu() {
    let g = gpu();
    g.set_attention_kernel(AttnKernel::Simple);
    // One warp per (query, head): the widest case (8 × 128 at 520 tokens) would only add time,
    // under the emulated sanitizers most of all.
    for (shape, cu) in attention_cases().into_iter().filter(|(s, _)| s.heads * s.head_dim <= 512) {
        attention_against_cpu(&g, shape, &cu, 1e-4);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn swiglu_forward_backward_matches_cpu() {
    let g = gpu();
    for n in [1usize, 37, 100_003] {
        let (gate, up, dy) = (rand_vec(n, 6.0), rand_vec(n, 1.0), rand_vec(n, 1.0));
        let (gg, ug) = (g.upload(&gate), g.upload(&up));
        check("swiglu", &g.download(&g.swiglu(&gg, &ug)), &Cpu.swiglu(&gate, &up), F32_TOL);
        let (dg_c, du_c) = Cpu.swiglu_backward(&dy, &gate, &up);
        let (dg_g, du_g) = g.swiglu_backward(&g.upload(&dy), &gg, &ug);
        check("swiglu dgate", &g.download(&dg_g), &dg_c, F32_TOL);
        check("swiglu dup", &g.download(&du_g), &du_c, F32_TOL);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cross_entropy_matches_cpu_with_ignored_targets() {
    let g = gpu();
    for &(rows, vocab) in &[(1usize, 11usize), (37, 1001), (64, 69_104), (3, 128_256)] {
        let logits = rand_vec(rows * vocab, 8.0);
        let mut r = rng();
        let mut targets: Vec<i32> = (0..rows).map(|_| r.gen_range(0..vocab as i32)).collect();
        if rows > 2 {
            targets[1] = -100;
            targets[rows - 1] = vocab as i32 - 1;
        }
        let (_, lse_c) = Cpu.cross_entropy(&logits, &targets, vocab);
        // The loss against the f64 reference: the f32 CPU reference sums a row's 128k
        // exponentials one after the other and its log-sum-exp is then ~1.1e-4 too low (a bias,
        // not noise: found on the emulated device, measured with numpy), more than this bound;
        // the kernel's per-thread online sums and tree merge are far more accurate.
        let logits64: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
        let loss_c =
            llama_cpt_ops::cross_entropy::cross_entropy_forward(&mut vec![0f64; rows], &logits64, &targets, vocab);
        let lg = g.upload(&logits);
        let (loss_g, lse_g) = g.cross_entropy(&lg, &targets, vocab);
        assert!(
            (loss_g - loss_c).abs() <= 1e-5 * loss_c.abs().max(1.0),
            "loss {loss_g} vs {loss_c} (f64 reference, {rows}x{vocab})"
        );
        check(&format!("ce lse {rows}x{vocab}"), &g.download(&lse_g), &lse_c, F32_TOL);
        let d_c = Cpu.cross_entropy_backward(&logits, &lse_c, &targets, vocab, 0.7);
        let d_g = g.cross_entropy_backward(&lg, &lse_g, &targets, vocab, 0.7);
        check(&format!("ce dlogits {rows}x{vocab}"), &g.download(&d_g), &d_c, F32_TOL);
    }
    // All ignored: loss 0, gradient 0 (never 0/0).
    let logits = rand_vec(2 * 70_000, 1.0);
    let lg = g.upload(&logits);
    let (loss, lse) = g.cross_entropy(&lg, &[-100, -100], 70_000);
    assert_eq!(loss, 0.0);
    assert!(g.download(&g.cross_entropy_backward(&lg, &lse, &[-100, -100], 70_000, 1.0)).iter().all(|&x| x == 0.0));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn sum_squares_and_adamw_match_cpu() {
    let g = gpu();
    for n in [1usize, 1000, 1 << 20 | 5] {
        let x = rand_vec(n, 3.0);
        let (c, d) = (Cpu.sum_squares(&x), g.sum_squares(&g.upload(&x)));
        assert!((c - d).abs() <= 1e-9 * c, "sum_squares {d} vs {c}");
    }
    let cfg = AdamWConfig { lr: 1e-2, ..Default::default() };
    for (n, decay) in [(1usize, true), (1001, false), (300_007, true)] {
        let (mut p_c, mut m_c, mut v_c) = (rand_vec(n, 1.0), vec![0.0f32; n], vec![0.0f32; n]);
        let (mut p_g, mut m_g, mut v_g) = (g.upload(&p_c), g.zeros(n), g.zeros(n));
        for step in 1..=4u64 {
            let grad = rand_vec(n, 1.0);
            Cpu.adamw_step(&mut p_c, &grad, &mut m_c, &mut v_c, &cfg, cfg.lr, step, decay, 0.7, None);
            g.adamw_step(&mut p_g, &g.upload(&grad), &mut m_g, &mut v_g, &cfg, cfg.lr, step, decay, 0.7, None);
        }
        check("adamw param", &g.download(&p_g), &p_c, 1e-6);
        check("adamw m", &g.download(&m_g), &m_c, 1e-6);
        check("adamw v", &g.download(&v_g), &v_c, 1e-6);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn bf16_casts_round_to_nearest_even() {
    let g = gpu();
    let mut x = rand_vec(1001, 100.0);
    x.extend_from_slice(&[f32::NAN, f32::INFINITY, f32::MAX, 1.0 + 2f32.powi(-8), -0.0, 1e-30]);
    let b = g.to_bf16(&g.upload(&x));
    assert_eq!((b.dtype(), b.len(), b.bytes()), (DType::Bf16, x.len(), 2 * x.len()));
    let got = g.download_bf16(&b);
    let mut want = vec![half::bf16::ZERO; x.len()];
    llama_cpt_ops::convert::f32_to_bf16(&x, &mut want);
    for (i, (a, w)) in got.iter().zip(&want).enumerate() {
        assert!(a.to_bits() == w.to_bits() || (a.is_nan() && w.is_nan()), "{i}: {} -> {a} vs {w}", x[i]);
    }
    let back = g.download(&g.to_f32(&b));
    for (i, (a, w)) in back.iter().zip(&want).enumerate() {
        assert!(a.to_bits() == w.to_f32().to_bits() || (a.is_nan() && w.is_nan()), "{i}");
    }
}

fn small_model_case(g: &Cuda, head_dim: usize, tol: f64) {
    // hidden = heads · head_dim; GQA 2:1; an untied head; two documents in the second row.
    let heads = 4;
    let cfg = LlamaConfig::small(1000, heads * head_dim, 3 * head_dim, 2, heads, 2, false);
    assert_eq!(cfg.head_dim, head_dim);
    let cpu_model = Llama::random(&Cpu, cfg.clone(), 11);
    let gpu_model = Llama::random(g, cfg, 11);
    let (rows, seq) = (2, 77);
    let mut r = rng();
    let tokens: Vec<u32> = (0..rows * seq).map(|_| r.gen_range(0..1000)).collect();
    let labels: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
    let mut b = Batch::from_rows(rows, seq, tokens, &labels);
    b.cu_seqlens = vec![0, seq as u32, seq as u32 + 30, 2 * seq as u32];
    for i in seq + 30..2 * seq {
        b.positions[i] = (i - seq - 30) as u32;
    }
    b.targets[seq + 29] = -100;
    for checkpoint in [false, true] {
        let opts = StepOptions { checkpoint_layers: checkpoint };
        let (l_c, g_c) = cpu_model.loss_and_grads(&Cpu, &b, 1.0, opts).unwrap();
        let (l_g, g_g) = gpu_model.loss_and_grads(g, &b, 1.0, opts).unwrap();
        assert!((l_c - l_g).abs() <= tol * l_c.abs(), "loss {l_g} vs {l_c} (head_dim {head_dim})");
        for (p, (a, bb)) in cpu_model.params.iter().zip(g_c.iter().zip(&g_g)) {
            check(&format!("grad {} (head_dim {head_dim}, checkpoint {checkpoint})", p.name), &g.download(bb), a, tol);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn whole_model_forward_backward_matches_cpu() {
    let g = gpu();
    g.set_sync_each_launch(false);
    // f32 GEMMs and the simple f32 attention: round-off only.
    g.set_attention_kernel(AttnKernel::Simple);
    small_model_case(&g, 64, 1e-3);
    small_model_case(&g, 6, 1e-3);
    // Tensor-core attention (bf16 tiles) for head_dim 64 and 128.
    g.set_attention_kernel(AttnKernel::Auto);
    small_model_case(&g, 64, 5e-2);
    small_model_case(&g, 128, 5e-2);
}

/// `--profile`'s counts: launches by kernel, GEMMs by shape, copies with their bytes, host syncs at
/// the line that asked (the download's `#[track_caller]` reaches this file), nothing while off.
#[test]
#[ignore = "needs a CUDA GPU"]
fn the_profile_counts_launches_gemms_copies_and_syncs_where_they_happen() {
    let g = gpu();
    g.set_poison_allocations(false);
    g.set_sync_each_launch(false);
    g.set_profiling(true);
    g.profile_range("test");
    let (x, w) = (g.upload(&rand_vec(64 * 32, 1.0)), g.upload(&rand_vec(16 * 32, 1.0)));
    let y = g.linear(&x, &w, 64, 32, 16);
    let z = g.swiglu(&y, &y);
    let line = line!() + 1;
    let host = g.download(&z);
    assert_eq!(host.len(), 64 * 16);
    g.set_profiling(false);
    let _ = g.download(&g.swiglu(&z, &z));
    let all = g.profile();
    let p = &all["test"];
    assert_eq!(p.entered, 1);
    assert_eq!(p.total_gemms(), 1, "{:?}", p.gemms);
    assert_eq!(p.launches.get("swiglu_fwd_f32"), Some(&1), "{:?}", p.launches);
    assert_eq!(p.syncs.iter().collect::<Vec<_>>(), [(&format!("tests/cuda_kernels.rs:{line} (download)"), &1)]);
    assert_eq!(p.transfers.get("H2D"), Some(&(2, (64 * 32 + 16 * 32) * 4)));
    assert_eq!(p.transfers.get("D2H"), Some(&(1, 64 * 16 * 4)));
    let table = llama_cpt::cuda::profile::report(&all);
    assert!(table.contains("test (all 1 times together): 1 launches, 1 GEMMs, 1 host syncs"), "{table}");
}

/// A training step asks the host to wait once (the losses of every micro-step and the gradient
/// norm in one download), whatever the depth, the micro-steps and the ZeRO stage (one process:
/// its all-reduces need no device); and nothing parameter-sized is zero-filled: a linear's dW is
/// written by its GEMM, the gradient buckets and the masters' shards are assembled over their
/// gaps only; what is set to zero per step is the embedding's and the norms' scatter targets.
#[test]
#[ignore = "needs a CUDA GPU"]
fn a_train_step_syncs_once_at_any_depth_and_fills_no_weight_gradient() {
    use llama_cpt::backend::PROFILE_TRAIN_STEP;
    use llama_cpt::dist::{DataParallel, ZeroStage};
    use llama_cpt_parallel::SingleProcess;
    let g = gpu();
    g.set_poison_allocations(false);
    g.set_sync_each_launch(false);
    let (vocab, hidden, micro) = (256, 64, 3);
    let tokens: Vec<u32> = (0..micro * 32).map(|i| (i * 7 % vocab) as u32).collect();
    let labels: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
    let batches: Vec<Batch> =
        (0..micro).map(|j| Batch::from_rows(1, 32, tokens[j * 32..][..32].to_vec(), &labels[j * 32..][..32])).collect();
    let mut syncs = Vec::new();
    for (layers, stage, mixed) in [
        (2, ZeroStage::Zero0, false),
        (6, ZeroStage::Zero0, false),
        (2, ZeroStage::Zero2, true),
        (6, ZeroStage::Zero2, true),
    ] {
        g.set_mixed_precision(mixed);
        let cfg = LlamaConfig::small(vocab, hidden, 160, layers, 4, 2, false);
        let single = SingleProcess::default();
        let mut model = Llama::random(&g, cfg.clone(), 3);
        let trainable = vec![true; model.params.len()];
        let adamw = AdamWConfig { lr: 1e-3, ..Default::default() };
        let mut dp = DataParallel::new(&g, &single, &model.params, &trainable, stage, 1 << 20, adamw);
        dp.refresh_params(&g, &mut model.params).unwrap();
        g.set_profiling(true);
        let before = g.profile().get(PROFILE_TRAIN_STEP).cloned().unwrap_or_default();
        for _ in 0..2 {
            g.profile_range(PROFILE_TRAIN_STEP);
            let r = dp
                .step(&g, &mut model, &batches, StepOptions::default(), 1e-3, Some(1.0), &Default::default())
                .unwrap();
            assert!(r.applied && r.loss.is_finite());
            g.profile_range("other");
        }
        g.set_profiling(false);
        let p = g.profile()[PROFILE_TRAIN_STEP].since(&before);
        assert_eq!(p.entered, 2);
        let per_step = p.total_syncs() / 2;
        assert_eq!(per_step, 1, "{layers} layers, ZeRO-{stage}: {:?}", p.syncs);
        // Zero-filled per step: the embedding's and the norms' gradients per micro-step (scatter
        // targets), bucket padding; no linear's dW, no whole bucket or shard.
        let scatter = vocab * hidden + (2 * layers + 1) * hidden;
        let allowed = 4 * micro * scatter + (16 << 10);
        let memset = p.transfers.get("memset").map_or(0, |&(_, bytes)| bytes as usize / 2);
        assert!(
            memset <= allowed,
            "{layers} layers, ZeRO-{stage}: {memset} bytes set to zero per step, the design's {allowed}"
        );
        syncs.push(format!("{layers} layers ZeRO-{stage}: {per_step} sync, {memset} B memset (≤ {allowed})"));
    }
    g.set_mixed_precision(false);
    eprintln!("{}", syncs.join("\n"));
}

/// A model the kernels cannot run (head_dim 272: the simple attention kernels hold at most 256)
/// is refused before any launch with the op and the limit, as a `Result` like every bad batch;
/// the CPU, which has no such limit, runs it.
#[test]
#[ignore = "needs a CUDA GPU"]
fn unsupported_shapes_are_refused_before_the_launch() {
    let g = gpu();
    let cfg = LlamaConfig::small(100, 2 * 272, 64, 1, 2, 2, true);
    let tokens: Vec<u32> = (0..8).collect();
    let labels: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
    let b = Batch::from_rows(1, 8, tokens, &labels);
    let err = Llama::random(&g, cfg.clone(), 1).loss_and_grads(&g, &b, 1.0, StepOptions::default()).unwrap_err();
    assert_eq!(err.to_string(), "attention: head_dim 272 is beyond the CUDA kernels' 256");
    assert!(Llama::random(&Cpu, cfg, 1).loss_and_grads(&Cpu, &b, 1.0, StepOptions::default()).is_ok());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn allocator_is_warm_after_two_steps_and_tracks_the_peak() {
    let g = gpu();
    g.set_poison_allocations(false);
    g.set_sync_each_launch(false);
    let cfg = LlamaConfig::small(500, 256, 512, 2, 4, 2, true);
    let model = Llama::random(&g, cfg, 3);
    let tokens: Vec<u32> = (0..4 * 64).map(|i| (i * 7 % 500) as u32).collect();
    let labels: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
    let b = Batch::from_rows(4, 64, tokens, &labels);
    // Two steps to warm up: the first step creates the content cache's device copies of the
    // positions, ids and targets (upload_cached) at their first use, after some of that step's
    // temporaries were taken from the pool; from the second step on they are alive from the
    // start, so its peak is higher by them (found on the emulated device: 2 more cuMemAlloc of
    // 1 KiB in step 2).
    for _ in 0..2 {
        let _ = model.loss_and_grads(&g, &b, 1.0, StepOptions::default()).unwrap();
    }
    g.synchronize().unwrap();
    let warm = g.memory_stats();
    for _ in 0..3 {
        let _ = model.loss_and_grads(&g, &b, 1.0, StepOptions::default()).unwrap();
    }
    g.synchronize().unwrap();
    let after = g.memory_stats();
    assert_eq!(after.driver_allocs, warm.driver_allocs, "no cuMemAlloc once warm: {warm:?} -> {after:?}");
    assert!(after.peak_in_use >= after.in_use && after.peak_in_use > 0);
    eprintln!("allocator after 4 steps: {after:?}");
}

#[test]
#[ignore = "needs a CUDA GPU and libnccl"]
fn nccl_at_world_size_1_runs_the_data_parallel_path_like_one_process() {
    use llama_cpt::dist::{DataParallel, ZeroStage};
    use llama_cpt_parallel::{launch::Launch, Communicator, SingleProcess};
    let g = gpu();
    g.set_sync_each_launch(false);
    let nccl = g.nccl(&Launch::single(), std::time::Duration::from_secs(60)).expect("NCCL communicator");
    // The collectives themselves (identity at one rank), on poisoned-then-written buffers.
    let x: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 3.0).collect();
    for (name, got) in [
        ("all-reduce", nccl.all_reduce(g.upload(&x)).wait().unwrap()),
        ("reduce-scatter", nccl.reduce_scatter(g.upload(&x)).wait().unwrap()),
        ("all-gather", nccl.all_gather(g.upload(&x)).wait().unwrap()),
        ("broadcast", nccl.broadcast(g.upload(&x), 0).wait().unwrap()),
    ] {
        assert_eq!(g.download(&got), x, "{name}");
    }
    let mut s = [1.5, -2.0];
    nccl.all_reduce_scalars(&mut s).unwrap();
    assert_eq!(s, [1.5, -2.0]);
    // A ZeRO-1 step through NCCL equals the same step through the single-process communicator.
    let cfg = LlamaConfig::small(300, 128, 256, 2, 4, 2, false);
    let tokens: Vec<u32> = (0..4 * 32).map(|i| (i * 11 % 300) as u32).collect();
    let labels: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
    let batches = vec![
        Batch::from_rows(2, 32, tokens[..64].to_vec(), &labels[..64]),
        Batch::from_rows(2, 32, tokens[64..].to_vec(), &labels[64..]),
    ];
    let single = SingleProcess::default();
    let mut results = Vec::new();
    for comm in [&nccl as &dyn Communicator<_>, &single] {
        let mut model = Llama::random(&g, cfg.clone(), 5);
        let trainable = vec![true; model.params.len()];
        let mut dp = DataParallel::new(
            &g,
            comm,
            &model.params,
            &trainable,
            ZeroStage::Zero1,
            20_000,
            AdamWConfig { lr: 1e-3, ..Default::default() },
        );
        let mut losses = Vec::new();
        for _ in 0..3 {
            losses.push(
                dp.step(&g, &mut model, &batches, StepOptions::default(), 1e-3, Some(1.0), &Default::default())
                    .unwrap()
                    .loss,
            );
        }
        results.push((losses, model.params.iter().map(|p| g.download(&p.value.buf)).collect::<Vec<_>>()));
    }
    assert_eq!(results[0].0, results[1].0, "losses");
    assert!(results[0].1 == results[1].1, "parameters after 3 steps");
    eprintln!("nccl world 1: losses {:?}", results[0].0);
    // bf16 buffers travel as bf16 (the mixed-precision all-gather of parameters).
    let xb = g.to_bf16(&g.upload(&x));
    let gathered = nccl.all_gather(xb.clone()).wait().unwrap();
    assert_eq!((gathered.dtype(), g.download(&gathered)), (DType::Bf16, g.download(&xb)));
}

/// Every operator once, on inputs already in the working precision (bf16 values under mixed
/// precision), as `(name, output)` pairs: the same code runs on `Cpu::bf16()` and on `Cuda` in
/// mixed precision.
fn mixed_op_outputs<B: Backend>(be: &B, seed: u64) -> Vec<(String, Vec<f32>, bool)> {
    let mut r = StdRng::seed_from_u64(seed);
    let mut host = |n: usize, scale: f32| -> Vec<f32> { (0..n).map(|_| r.gen_range(-1.0f32..1.0) * scale).collect() };
    let (rows, dim, vocab, ffn) = (37usize, 96usize, 1003usize, 160usize);
    let w = |x: Vec<f32>| be.to_working(&be.upload(&x));
    let x = w(host(rows * dim, 2.0));
    let norm_w = w(host(dim, 1.0));
    let lin_w = w(host(ffn * dim, 0.3));
    let emb = w(host(vocab * dim, 1.0));
    let dy = w(host(rows * ffn, 1.0));
    let mut out: Vec<(String, Vec<f32>, bool)> = Vec::new();
    let mut push = |name: &str, b: &B::Buf, working: bool| out.push((name.to_string(), be.download(b), working));
    push("add", &be.add(&x, &x), true);
    // An odd length (443 packs of 8 and a tail of 7) for the elementwise kernels.
    let odd = be.slice(&x, 1, rows * dim - 1);
    let mut scaled = be.add(&odd, &odd);
    be.add_assign(&mut scaled, &odd);
    push("add_assign", &scaled, true);
    be.scale_assign(&mut scaled, 0.375);
    push("scale", &scaled, true);
    let (h2, y2, rstd2) = be.add_rmsnorm(&x, &w(host(rows * dim, 2.0)), &norm_w, dim, 1e-5);
    push("add_rmsnorm h", &h2, true);
    push("add_rmsnorm y", &y2, true);
    push("add_rmsnorm rstd", &rstd2, false);
    let (y, rstd) = be.rmsnorm(&x, &norm_w, dim, 1e-5);
    push("rmsnorm y", &y, true);
    push("rmsnorm rstd", &rstd, false);
    let mut dnorm = be.zeros(dim);
    push("rmsnorm dx", &be.rmsnorm_backward(&x, &x, &norm_w, &rstd, dim, &mut dnorm), true);
    push("rmsnorm dw", &dnorm, false);
    let h = be.linear(&x, &lin_w, rows, dim, ffn);
    push("linear y", &h, true);
    let mut dlin = be.zeros(ffn * dim);
    push("linear dx", &be.linear_backward(&dy, &x, &lin_w, &mut dlin, rows, dim, ffn), true);
    push("linear dw", &dlin, false);
    let ids: Vec<u32> = (0..rows as u32).map(|i| (i * 37) % vocab as u32).collect();
    push("embedding", &be.embedding(&emb, &ids, dim), true);
    let mut demb = be.zeros(vocab * dim);
    be.embedding_backward(&x, &ids, dim, &mut demb);
    push("embedding dtable", &demb, false);
    let pos: Vec<u32> = (0..rows as u32).map(|i| i * 3).collect();
    push("rope", &be.rope(&x, &pos, 3, 32, 10000.0, false), true);
    let half = rows * ffn / 2;
    let (gate, up) = (be.slice(&h, 0, half), be.slice(&h, half, half));
    push("swiglu", &be.swiglu(&gate, &up), true);
    let (dg, du) = be.swiglu_backward(&be.slice(&dy, 0, half), &gate, &up);
    push("swiglu dgate", &dg, true);
    push("swiglu dup", &du, true);
    let logits = w(host(rows * vocab, 4.0));
    let targets: Vec<i32> = (0..rows as i32).map(|i| if i % 5 == 0 { -100 } else { (i * 13) % vocab as i32 }).collect();
    let (loss, lse) = be.cross_entropy(&logits, &targets, vocab);
    out.push(("cross-entropy loss".into(), vec![loss as f32], false));
    out.push(("sum of squares".into(), vec![be.sum_squares(&be.slice(&x, 1, rows * dim - 1)) as f32], false));
    out.push(("cross-entropy lse".into(), be.download(&lse), false));
    out.push((
        "cross-entropy dlogits".into(),
        be.download(&be.cross_entropy_backward(&logits, &lse, &targets, vocab, 1.0)),
        true,
    ));
    for hd in [64usize, 128, 6] {
        let shape = AttnShape { heads: 4, kv_heads: 2, head_dim: hd };
        let t = 150;
        let (q, k, v) = (w(host(t * 4 * hd, 1.0)), w(host(t * 2 * hd, 1.0)), w(host(t * 2 * hd, 1.0)));
        let cu = [0u32, 70, t as u32];
        let (o, l) = be.attention(&q, &k, &v, &cu, shape);
        out.push((format!("attention out d{hd}"), be.download(&o), true));
        out.push((format!("attention lse d{hd}"), be.download(&l), false));
        let dout = w(host(t * 4 * hd, 1.0));
        let (dq, dk, dv) = be.attention_backward(&dout, &q, &k, &v, &o, &l, &cu, shape);
        for (n, b) in [("dq", dq), ("dk", dk), ("dv", dv)] {
            out.push((format!("attention {n} d{hd}"), be.download(&b), true));
        }
    }
    out
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn mixed_precision_kernels_match_the_bf16_cpu_reference() {
    let g = gpu();
    g.set_mixed_precision(true);
    assert!(g.mixed_precision());
    let seed = rng().gen();
    let want = mixed_op_outputs(&Cpu::bf16(), seed);
    let got = mixed_op_outputs(&g, seed);
    for ((name, w, working), (_, x, _)) in want.iter().zip(&got) {
        // Working-precision outputs: both sides round to bf16 (a few ulps apart at most; the
        // tensor-core attention also rounds P); f32 statistics and gradients: f32 round-off on
        // the same bf16 inputs (attention lse with bf16 tiles: bf16 products).
        let tol = if *working || name.starts_with("attention") { BF16_TOL } else { 1e-4 };
        check(name, x, w, tol);
        if *working {
            assert!(
                x.iter().all(|v| llama_cpt_ops::convert::round_to_bf16(*v).to_bits() == v.to_bits() || v.is_nan()),
                "{name}: not bf16 values"
            );
        }
    }
    // Parameters and activations are stored in bf16 (half the bytes), statistics in f32.
    let x = g.to_working(&g.upload(&rand_vec(64 * 32, 1.0)));
    let (y, rstd) = g.rmsnorm(&x, &g.to_working(&g.upload(&[1.0; 32])), 32, 1e-5);
    assert_eq!((x.dtype(), y.dtype(), rstd.dtype()), (DType::Bf16, DType::Bf16, DType::F32));
    g.set_mixed_precision(false);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn fused_adamw_writes_the_master_and_its_bf16_parameter() {
    let g = gpu();
    let cfg = AdamWConfig { lr: 1e-2, ..Default::default() };
    for n in [1usize, 1001, 300_007] {
        let cpu = Cpu::bf16();
        let (mut p_c, mut m_c, mut v_c) = (rand_vec(n, 1.0), vec![0.0f32; n], vec![0.0f32; n]);
        let mut w_c = cpu.to_working(&p_c);
        let (mut p_g, mut m_g, mut v_g) = (g.upload(&p_c), g.zeros(n), g.zeros(n));
        let mut w_g = g.to_bf16(&p_g);
        for step in 1..=4u64 {
            let grad = rand_vec(n, 1.0);
            cpu.adamw_step(&mut p_c, &grad, &mut m_c, &mut v_c, &cfg, cfg.lr, step, step % 2 == 0, 0.7, Some(&mut w_c));
            g.adamw_step(
                &mut p_g,
                &g.upload(&grad),
                &mut m_g,
                &mut v_g,
                &cfg,
                cfg.lr,
                step,
                step % 2 == 0,
                0.7,
                Some(&mut w_g),
            );
        }
        let master = g.download(&p_g);
        check("adamw master", &master, &p_c, 1e-6);
        check("adamw m", &g.download(&m_g), &m_c, 1e-6);
        check("adamw v", &g.download(&v_g), &v_c, 1e-6);
        assert_eq!(w_g.dtype(), DType::Bf16);
        let working = g.download(&w_g);
        for (i, (w, m)) in working.iter().zip(&master).enumerate() {
            assert_eq!(
                w.to_bits(),
                llama_cpt_ops::convert::round_to_bf16(*m).to_bits(),
                "{i}: the bf16 parameter is its master rounded"
            );
        }
        check("adamw bf16 parameter", &working, &w_c, 1e-2);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn mixed_precision_training_follows_the_bf16_cpu_reference() {
    use llama_cpt::dist::{DataParallel, ZeroStage};
    use llama_cpt_parallel::SingleProcess;
    let g = gpu();
    g.set_sync_each_launch(false);
    g.set_mixed_precision(true);
    let cfg = LlamaConfig::small(512, 256, 512, 2, 4, 2, false);
    let tokens: Vec<u32> = (0..4 * 64).map(|i| (i * 11 % 512) as u32).collect();
    let labels: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
    let batches = vec![
        Batch::from_rows(2, 64, tokens[..128].to_vec(), &labels[..128]),
        Batch::from_rows(2, 64, tokens[128..].to_vec(), &labels[128..]),
    ];
    fn run<B: Backend>(be: &B, cfg: &LlamaConfig, batches: &[Batch], stage: ZeroStage) -> (Vec<f64>, Vec<Vec<f32>>) {
        let single = SingleProcess::default();
        let mut model = Llama::random(be, cfg.clone(), 5);
        let trainable = vec![true; model.params.len()];
        let mut dp = DataParallel::new(
            be,
            &single,
            &model.params,
            &trainable,
            stage,
            50_000,
            AdamWConfig { lr: 1e-3, ..Default::default() },
        );
        dp.refresh_params(be, &mut model.params).unwrap();
        let losses = (0..5)
            .map(|_| {
                dp.step(be, &mut model, batches, StepOptions::default(), 1e-3, Some(1.0), &Default::default())
                    .unwrap()
                    .loss
            })
            .collect();
        (losses, model.params.iter().map(|p| be.download(&p.value.buf)).collect())
    }
    for stage in [ZeroStage::Zero0, ZeroStage::Zero1] {
        let (l_c, p_c) = run(&Cpu::bf16(), &cfg, &batches, stage);
        let (l_g, p_g) = run(&g, &cfg, &batches, stage);
        eprintln!("mixed precision ZeRO-{stage}: cpu {l_c:?} gpu {l_g:?}");
        for (a, b) in l_c.iter().zip(&l_g) {
            assert!((a - b).abs() <= 2e-2 * a.abs(), "loss {b} vs {a} (ZeRO-{stage})");
        }
        assert!(l_g[4] < l_g[0], "the loss falls: {l_g:?}");
        for (a, b) in p_c.iter().zip(&p_g) {
            check(&format!("parameters after 5 steps (ZeRO-{stage})"), b, a, 2e-2);
        }
    }
    g.set_mixed_precision(false);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn multi_tensor_adamw_equals_one_launch_per_tensor() {
    let g = gpu();
    let cfg = AdamWConfig { lr: 3e-3, ..Default::default() };
    // Sizes from one element to a large matrix, with and without decay and a bf16 copy.
    let sizes = [1usize, 4096, 77, 1 << 20, 3];
    let init: Vec<Vec<f32>> = sizes.iter().map(|&n| rand_vec(n, 1.0)).collect();
    let make = |with_working: bool| -> Vec<(CudaBuf, CudaBuf, CudaBuf, Option<CudaBuf>)> {
        init.iter()
            .enumerate()
            .map(|(i, p)| {
                let buf = g.upload(p);
                let w = (with_working && i % 2 == 0).then(|| g.to_bf16(&buf));
                (buf, g.zeros(p.len()), g.zeros(p.len()), w)
            })
            .collect()
    };
    let (mut one, mut multi) = (make(true), make(true));
    for step in 1..=3u64 {
        let grads: Vec<CudaBuf> = sizes.iter().map(|&n| g.upload(&rand_vec(n, 1.0))).collect();
        for (i, ((p, m, v, w), gr)) in one.iter_mut().zip(&grads).enumerate() {
            g.adamw_step(p, gr, m, v, &cfg, cfg.lr, step, i % 3 != 1, 0.8, w.as_mut());
        }
        let mut tensors: Vec<AdamWTensor<'_, CudaBuf>> = multi
            .iter_mut()
            .zip(&grads)
            .enumerate()
            .map(|(i, ((p, m, v, w), gr))| AdamWTensor {
                param: p,
                grad: gr,
                m,
                v,
                working: w.as_mut(),
                decay: i % 3 != 1,
            })
            .collect();
        g.adamw_steps(&mut tensors, &cfg, cfg.lr, step, 0.8);
    }
    for (i, (a, b)) in one.iter().zip(&multi).enumerate() {
        assert_eq!(g.download(&a.0), g.download(&b.0), "tensor {i}: parameter");
        assert_eq!(g.download(&a.1), g.download(&b.1), "tensor {i}: m");
        assert_eq!(g.download(&a.2), g.download(&b.2), "tensor {i}: v");
        if let (Some(x), Some(y)) = (&a.3, &b.3) {
            assert_eq!(g.download(x), g.download(y), "tensor {i}: bf16 copy");
        }
    }
}

/// The PyTorch half of the device check on the CPU with tiny shapes: the script that prints the
/// final table runs once per lent GPU, so a Python error must show here first. Rows of ours in
/// both precisions find their PyTorch peer (a ratio, not "-"). It also runs on the GPU machine
/// (tools/device-check.sh), from a binary built elsewhere: every path is found at run time.
#[test]
fn the_side_by_side_script_runs_and_pairs_every_row_with_pytorch() {
    let dir = std::env::temp_dir().join(format!("llama-cpt-side-by-side-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ours = dir.join("ours.jsonl");
    let rows = [
        ("rmsnorm_fwd", 0.0),
        ("rmsnorm_fwd_bf16", 0.0),
        ("rmsnorm_bwd", 0.0),
        ("swiglu_bwd_bf16", 0.0),
        ("add_bf16", 0.0),
        ("rope_bf16", 0.0),
        ("embedding_fwd_bf16", 0.0),
        ("cross_entropy_bwd_bf16", 0.0),
        ("attention_bwd_bf16", 1e6),
        ("attention_bwd_bf16_deterministic", 1e6),
        ("grid_fwd_d64_s128_causal", 1e6),
        ("grid_bwd_d64_s128_docs", 1e6),
        ("adamw_bf16", 0.0),
        ("linear_bf16_storage", 4e6),
    ];
    let lines: String = rows
        .iter()
        .map(|(k, f)| {
            format!(
                "{{\"kernel\": \"{k}\", \"shape\": \"tiny\", \"seconds\": 1e-5, \"bytes\": 65536, \"flops\": {f}}}\n"
            )
        })
        .collect();
    std::fs::write(&ours, lines).unwrap();
    let out = common::run_python(
        "bench_torch_gpu.py",
        &[
            std::path::Path::new("--smoke"),
            std::path::Path::new("--ours"),
            &ours,
            std::path::Path::new("--json"),
            &dir.join("torch.json"),
        ],
    );
    for (k, _) in rows {
        let line = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(k))
            .unwrap_or_else(|| panic!("no table row for {k}:\n{out}"));
        assert!(!line.trim_end().ends_with('-'), "{k} has no PyTorch peer: {line}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The launch of rank 0 or 1 of two ranks of this process (one thread each), with a free port
/// for the NCCL id rendezvous.
fn two_ranks_in_this_process() -> impl Fn(usize) -> llama_cpt_parallel::launch::Launch + Send + Copy {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    move |rank| llama_cpt_parallel::launch::Launch {
        rank,
        world_size: 2,
        local_rank: rank,
        master: Some(("127.0.0.1".into(), port)),
        launcher: "none",
    }
}

/// A collective's input goes back to the allocator once the collective has read it, not at its
/// `wait` (a backward's gradient buckets would otherwise all stay alive until the optimizer step),
/// and never while it may still be read: two ranks in one process, rank 1 holding back its half of
/// the reduce-scatter so that rank 0's collective cannot finish.
#[test]
#[ignore = "needs a CUDA GPU and libnccl, or the emulated device (tools/emu-check.sh)"]
fn a_collective_gives_its_input_back_once_read_and_never_before() {
    use llama_cpt_parallel::Communicator;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};
    // A size class no other buffer of this test has.
    const N: usize = 2 * 150_001;
    let launch = two_ranks_in_this_process();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let peer = std::thread::spawn(move || {
        let cuda = Cuda::new(0).unwrap();
        let comm = cuda.nccl(&launch(1), Duration::from_secs(60)).unwrap();
        for round in 0..2 {
            go_rx.recv().unwrap();
            let x = cuda.upload(&vec![10.0 + round as f32; N]);
            comm.reduce_scatter(x).wait().unwrap();
        }
    });
    let cuda = Cuda::new(0).unwrap();
    let comm = cuda.nccl(&launch(0), Duration::from_secs(60)).unwrap();
    let input: Vec<f32> = (0..N).map(|i| i as f32).collect();
    let retiring = |c: &Cuda| c.memory_stats().retiring;

    // Round 1: the peer has not joined, so the collective is still reading rank 0's input.
    let x = cuda.upload(&input);
    let x_ptr = x.device_ptr();
    let pending = comm.reduce_scatter(x);
    std::thread::sleep(Duration::from_millis(100));
    let other = cuda.upload(&vec![-1.0; N]);
    let (reused, stats) = (other.device_ptr() == x_ptr, cuda.memory_stats());
    // The peer goes on before any assertion, so that a failure fails instead of hanging.
    go_tx.send(()).unwrap();
    assert!(!reused, "the input of an unfinished collective was handed out again");
    assert!(stats.retiring >= N * 4, "the input is retired, still counted: {stats:?}");
    let got = cuda.download(&pending.wait().unwrap());
    let want: Vec<f32> = (0..N / 2).map(|i| i as f32 + 10.0).collect();
    assert_eq!(got, want, "rank 0's half of the sum");
    assert_eq!(retiring(&cuda), 0, "after the wait nothing is retiring");
    drop(other);

    // Round 2: once both ranks have run the collective, its input is reused without a wait.
    let x = cuda.upload(&input);
    let x_ptr = x.device_ptr();
    let pending = comm.reduce_scatter(x);
    go_tx.send(()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let probe = cuda.upload(&[0.0; N]);
        if probe.device_ptr() == x_ptr {
            break;
        }
        assert!(Instant::now() < deadline, "the finished collective's input never came back before its wait");
        drop(probe);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(retiring(&cuda), 0);
    let got = cuda.download(&pending.wait().unwrap());
    assert_eq!(got, (0..N / 2).map(|i| i as f32 + 11.0).collect::<Vec<_>>());
    peer.join().unwrap();
}

/// A retired input whose collective has not finished is handed out again only in stream order:
/// the compute stream waits (on the device) for the collective before the new owner writes. Two
/// reduce-scatters of rank 0 are held back by rank 1; an allocation of their size class takes the
/// older one's block, and its new contents, written at once by the host, must not reach the
/// collective (the emulated NCCL reads its input in rounds, the later ones after the peer joins).
#[test]
#[ignore = "needs a CUDA GPU and libnccl, or the emulated device (tools/emu-check.sh)"]
fn a_retired_input_is_reused_in_stream_order_after_its_collective() {
    use llama_cpt_parallel::Communicator;
    use std::sync::mpsc;
    use std::time::Duration;
    const N: usize = 2 * 2_000_003; // 16 MB: many rounds of the emulated NCCL's 1 MiB slots
    let launch = two_ranks_in_this_process();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let peer = std::thread::spawn(move || {
        let cuda = Cuda::new(0).unwrap();
        let comm = cuda.nccl(&launch(1), Duration::from_secs(60)).unwrap();
        go_rx.recv().unwrap();
        for round in 0..2 {
            let x = cuda.upload(&vec![100.0 * (round + 1) as f32; N]);
            comm.reduce_scatter(x).wait().unwrap();
        }
    });
    let cuda = Cuda::new(0).unwrap();
    let comm = cuda.nccl(&launch(0), Duration::from_secs(60)).unwrap();
    let first: Vec<f32> = (0..N).map(|i| (i % 1000) as f32).collect();
    let second: Vec<f32> = (0..N).map(|i| (i % 7) as f32).collect();
    let x1 = cuda.upload(&first);
    let x1_ptr = x1.device_ptr();
    let p1 = comm.reduce_scatter(x1);
    let p2 = comm.reduce_scatter(cuda.upload(&second));
    let reused_before = cuda.memory_stats().reused_in_stream_order;
    // The older retired block, while rank 1 has not joined: the write is queued behind the wait.
    let overwrite = cuda.upload(&vec![-1.0; N]);
    let (reused, stats) = (overwrite.device_ptr() == x1_ptr, cuda.memory_stats());
    go_tx.send(()).unwrap();
    assert!(reused, "the older retired input was not reused: {stats:?}");
    assert_eq!(stats.reused_in_stream_order, reused_before + 1);
    let want = |x: &[f32], add: f32| -> Vec<f32> { x[..N / 2].iter().map(|v| v + add).collect() };
    assert_eq!(
        cuda.download(&p1.wait().unwrap()),
        want(&first, 100.0),
        "the first collective read the new owner's data"
    );
    assert_eq!(cuda.download(&p2.wait().unwrap()), want(&second, 200.0));
    assert_eq!(cuda.download(&overwrite), vec![-1.0; N], "the new owner's write happened");
    peer.join().unwrap();
}

/// The five-matmul backward (`AttnKernel::Auto`: dK, dV and dQ in one pass, dQ added with
/// red.add) against the seven-matmul one (`Deterministic`: the same bf16 products, dQ summed in a
/// fixed order) and the CPU: head_dim 64/128, GQA 1/2/4/8, ragged documents, both storage types.
/// The deterministic one repeats bit for bit.
#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_fused_backward_matches_the_deterministic_one_and_the_cpu() {
    let g = gpu();
    let sh = |heads, kv_heads, head_dim| AttnShape { heads, kv_heads, head_dim };
    let cases = [
        (sh(2, 2, 64), vec![0u32, 13]),
        (sh(4, 2, 64), vec![0, 64, 65, 129, 300]),
        (sh(8, 1, 64), vec![0, 200, 457]),
        (sh(4, 1, 128), vec![0, 1, 2, 66, 130, 130, 387]),
        (sh(8, 2, 128), vec![0, 520]),
        (sh(8, 8, 128), vec![0, 33, 161]),
    ];
    for mixed in [false, true] {
        g.set_mixed_precision(mixed);
        for (shape, cu) in &cases {
            let t = *cu.last().unwrap() as usize;
            let (hq, hk, d) = (shape.heads, shape.kv_heads, shape.head_dim);
            let (q, k, v) = (rand_vec(t * hq * d, 2.0), rand_vec(t * hk * d, 2.0), rand_vec(t * hk * d, 1.0));
            let dout = rand_vec(t * hq * d, 1.0);
            let (qg, kg, vg, dg) = (g.upload(&q), g.upload(&k), g.upload(&v), g.upload(&dout));
            let what = format!("{shape:?} cu {cu:?} mixed {mixed}");
            let (o_g, l_g) = g.attention(&qg, &kg, &vg, cu, *shape);
            let mut runs = Vec::new();
            for kernel in [AttnKernel::Auto, AttnKernel::Deterministic, AttnKernel::Deterministic] {
                g.set_attention_kernel(kernel);
                let (dq, dk, dv) = g.attention_backward(&dg, &qg, &kg, &vg, &o_g, &l_g, cu, *shape);
                runs.push([g.download(&dq), g.download(&dk), g.download(&dv)]);
            }
            g.set_attention_kernel(AttnKernel::Auto);
            let (o, l) = (g.download(&o_g), g.download(&l_g));
            let inputs = |x: &[f32]| -> Vec<f32> {
                if mixed {
                    x.iter().map(|&v| llama_cpt_ops::convert::round_to_bf16(v)).collect()
                } else {
                    x.to_vec()
                }
            };
            let (dq_c, dk_c, dv_c) =
                Cpu.attention_backward(&inputs(&dout), &inputs(&q), &inputs(&k), &inputs(&v), &o, &l, cu, *shape);
            let want = [dq_c, dk_c, dv_c];
            for (i, name) in ["dq", "dk", "dv"].iter().enumerate() {
                check(&format!("fused {name} vs cpu {what}"), &runs[0][i], &want[i], BF16_TOL * 1.5);
                // Same bf16 products, other summation order (and bf16 storage rounds the result).
                let tol = if mixed { 8e-3 } else { 1e-5 };
                check(&format!("fused {name} vs deterministic {what}"), &runs[0][i], &runs[1][i], tol);
                assert!(
                    runs[1][i].iter().zip(&runs[2][i]).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "deterministic {name} repeats bit for bit {what}"
                );
            }
        }
    }
    g.set_mixed_precision(false);
}
