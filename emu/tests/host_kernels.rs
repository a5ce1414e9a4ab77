//! The emulator's kernel side (emu/cxx/): the block runtime (barrier, warp shuffles, the errors for
//! a lane that never arrives and a deadlock), bf16 rounding, the mma.m16n8k16 emulation against a
//! plain matrix product, and real kernels of cuda/*.cu launched through the generated registry
//! against the CPU reference in llama-cpt-ops.
// Fragment layouts are formulas of the lane and element index: index loops say that best.
#![allow(clippy::needless_range_loop)]

use half::bf16;
use llama_cpt_emu::kernels::{self, Kernel};
use std::ffi::c_void;

/// A kernelParams array: each argument boxed, so that its address is stable.
struct Args {
    ptrs: Vec<*mut c_void>,
    keep: Vec<Box<dyn std::any::Any>>,
}

impl Args {
    fn new() -> Self {
        Args { ptrs: Vec::new(), keep: Vec::new() }
    }
    fn arg<T: 'static>(mut self, v: T) -> Self {
        let mut b = Box::new(v);
        self.ptrs.push(&mut *b as *mut T as *mut c_void);
        self.keep.push(b);
        self
    }
    fn ptr<T: 'static>(self, p: *const T) -> Self {
        self.arg(p)
    }
}

fn kernel(name: &str) -> Kernel {
    kernels::find(name).unwrap_or_else(|| panic!("kernel {name} is not in the host registry"))
}

fn launch(name: &str, grid: [u32; 3], block: [u32; 3], smem: u32, mut args: Args) {
    let k = kernel(name);
    unsafe { k.launch(grid, block, smem, &mut args.ptrs) }.unwrap_or_else(|e| panic!("{name}: {e}"));
}

/// Deterministic values in [-1, 1) (an LCG; the tests need no statistical quality).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[test]
fn registry_lists_every_entry_point_with_its_signature_and_bounds() {
    assert!(kernels::count() >= 56, "only {} kernels in the host registry", kernels::count());
    for k in kernels::all() {
        assert!(!k.param_sizes().is_empty(), "{} has no parameters", k.name());
        assert_eq!(kernels::find(k.name()), Some(k));
    }
    assert_eq!(kernel("attn_fwd_d64_bf16").max_threads(), 128);
    assert_eq!(kernel("rmsnorm_fwd_f32").max_threads(), 256);
    assert_eq!(kernel("cross_entropy_fwd_f32").max_threads(), 512);
    assert_eq!(kernel("fill_f32").max_threads(), 1024);
    // fill_f32(float*, float, unsigned long long)
    assert_eq!(kernel("fill_f32").param_sizes(), vec![8, 4, 8]);
    assert!(kernels::find("no_such_kernel").is_none());
}

#[test]
fn barrier_orders_shared_memory_across_the_block() {
    for threads in [32u32, 96, 1024] {
        let mut out = vec![0f32; threads as usize * 4];
        kernels::self_test("barrier", threads, &mut out).unwrap();
        for t in 0..threads as usize {
            let next = ((t + 1) % threads as usize) as f32;
            assert_eq!(out[t], 3.0 * next * 10.0 + 3.0, "thread {t} of {threads}");
        }
    }
}

#[test]
fn shuffles_exchange_among_the_lanes_of_each_warp() {
    let threads = 64u32;
    let mut out = vec![0f32; threads as usize * 4];
    kernels::self_test("shuffle", threads, &mut out).unwrap();
    for t in 0..threads as usize {
        for k in 0..3 {
            assert_eq!(out[4 * t + k], (t ^ (1 << k)) as f32 + 0.5, "thread {t}, xor {}", 1 << k);
        }
        let warp = t / 32 * 32;
        let sum: usize = (warp..warp + 32).sum();
        assert_eq!(out[4 * t + 3], sum as f32, "warp sum seen by thread {t}");
    }
}

#[test]
fn a_lane_that_never_arrives_fails_the_launch_with_a_message() {
    let mut out = vec![0f32; 128];
    let e = kernels::self_test("missing_lane", 32, &mut out).unwrap_err();
    assert_eq!(e.code, 719, "{e}");
    assert!(e.message.contains("missing_lane_test") && e.message.contains("__shfl_xor_sync"), "{e}");
    assert!(e.message.contains("has returned and never arrives"), "{e}");
}

#[test]
fn a_deadlock_fails_the_launch_naming_what_each_side_waits_for() {
    let mut out = vec![0f32; 128];
    let e = kernels::self_test("deadlock", 32, &mut out).unwrap_err();
    assert_eq!(e.code, 719, "{e}");
    assert!(e.message.contains("deadlock") && e.message.contains("16 of 32 threads wait at __syncthreads"), "{e}");
    assert!(
        e.message.contains("waits at __shfl_xor_sync") && e.message.contains("which waits at __syncthreads"),
        "{e}"
    );
    // The runtime is usable after a failed launch.
    kernels::self_test("shuffle", 32, &mut out).unwrap();
}

/// The PTX ISA's ldmatrix figure, read row by row: of an 8×8 b16 matrix, row r's eight elements
/// go to lanes 4r..4r+3, two each in column order (lane 4r + p gets columns 2p, 2p + 1, the first
/// in the low half); `.trans` distributes the transposed matrix the same way.
fn ldmatrix_register(matrix: &[[u16; 8]; 8], lane: usize, trans: bool) -> u32 {
    for r in 0..8 {
        for p in 0..4 {
            if 4 * r + p == lane {
                let at = |c: usize| if trans { matrix[c][r] } else { matrix[r][c] } as u32;
                return at(2 * p) | at(2 * p + 1) << 16;
            }
        }
    }
    unreachable!()
}

#[test]
fn ldmatrix_distributes_rows_as_the_ptx_isa_says() {
    let mut out = vec![0f32; 6 * 32 * 4];
    kernels::self_test("ldmatrix", 32, &mut out).unwrap();
    let got: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
    let matrix = |i: usize| {
        let mut m = [[0u16; 8]; 8];
        for (r, row) in m.iter_mut().enumerate() {
            for (c, e) in row.iter_mut().enumerate() {
                *e = (i << 8 | r << 4 | c) as u16;
            }
        }
        m
    };
    for (v, (num, trans)) in
        [(1, false), (2, false), (4, false), (1, true), (2, true), (4, true)].into_iter().enumerate()
    {
        for lane in 0..32 {
            for reg in 0..4 {
                let want = if reg < num { ldmatrix_register(&matrix(reg), lane, trans) } else { 0 };
                assert_eq!(got[(v * 32 + lane) * 4 + reg], want, "x{num} trans {trans}: lane {lane} register {reg}");
            }
        }
    }
}

#[test]
fn cp_async_lands_a_group_only_when_a_wait_completes_it() {
    let threads = 64u32;
    let mut out = vec![0f32; threads as usize * 32];
    kernels::self_test("cp_async_groups", threads, &mut out).unwrap();
    const POISON: [u32; 2] = [u32::MAX; 2];
    // After wait_group 2, 1, 0 (three groups committed, one copy not), then commit + wait_group 0;
    // the uncommitted copy read 8 of its 16 bytes (value 4), the rest zero-filled.
    let want = [
        [[1, 1], POISON, POISON, POISON],
        [[1, 1], [2, 2], POISON, POISON],
        [[1, 1], [2, 2], [3, 3], POISON],
        [[1, 1], [2, 2], [3, 3], [4, 0]],
    ];
    for t in 0..threads as usize {
        for (step, slots) in want.iter().enumerate() {
            for (slot, words) in slots.iter().enumerate() {
                let at = t * 32 + (step * 4 + slot) * 2;
                assert_eq!([out[at].to_bits(), out[at + 1].to_bits()], *words, "thread {t} step {step} slot {slot}");
            }
        }
    }
}

#[test]
fn a_missing_cp_async_wait_or_barrier_reads_the_poison() {
    let threads = 96u32;
    let n = threads as usize;
    let mut out = vec![0f32; n * 4];
    kernels::self_test("cp_async_exchange", threads, &mut out).unwrap();
    for t in 0..n {
        assert_eq!(out[t], ((t + 1) % n) as f32 + 0.5, "thread {t}");
    }
    // Without the barrier, a thread reads its neighbour's slot before the neighbour's copy landed
    // (in thread order the neighbour has not even issued it); waiting for all but the newest group
    // leaves the only group in flight at the barrier. Either way the NaN poison of fresh shared
    // memory is read, by every thread but the last (thread 0, run before it, has landed its copy
    // by then).
    for broken in ["cp_async_no_barrier", "cp_async_wait_too_few"] {
        kernels::self_test(broken, threads, &mut out).unwrap();
        assert!(out[..n - 1].iter().all(|v| v.is_nan()), "{broken}: {:?}", &out[..4]);
    }
    let e = kernels::self_test("cp_async_never_waited", 32, &mut out).unwrap_err();
    assert!(e.message.contains("returned with 1 cp.async copies never waited for"), "{e}");
}

#[test]
fn bf16_conversion_rounds_to_nearest_even_like_the_device() {
    let mut x: Vec<f32> = values(4096, 7).iter().map(|v| v * 1e3).collect();
    // Ties (both directions), a carry into the exponent, the largest finite values, subnormals, ±0, ±inf.
    for bits in [
        0x3f80_8000u32,
        0x3f81_8000,
        0x3f80_8001,
        0x3fff_8000,
        0x7f7f_ffff,
        0xff7f_ffff,
        0x0000_8000,
        0x0001_8000,
        0x8000_0000,
        0,
        0x7f80_0000,
        0xff80_0000,
    ] {
        x.push(f32::from_bits(bits));
    }
    let nans = [0x7fc0_0000u32, 0xffc0_0001, 0x7f80_0001, 0x7fff_ffff];
    x.extend(nans.iter().map(|&b| f32::from_bits(b)));
    let n = x.len();
    let mut out = vec![bf16::ZERO; n];
    launch(
        "cast_f32_to_bf16",
        [4, 1, 1],
        [256, 1, 1],
        0,
        Args::new().ptr(out.as_mut_ptr()).ptr(x.as_ptr()).arg(n as u64),
    );
    for (i, (&got, &src)) in out.iter().zip(&x).enumerate() {
        if src.is_nan() {
            // cvt.rn.bf16.f32 gives the canonical NaN for every NaN input.
            assert_eq!(got.to_bits(), 0x7fff, "NaN {:#x}", src.to_bits());
        } else {
            assert_eq!(got.to_bits(), bf16::from_f32(src).to_bits(), "element {i}: {src:e} ({:#x})", src.to_bits());
        }
    }
    let mut back = vec![0f32; n];
    launch(
        "cast_bf16_to_f32",
        [1, 1, 1],
        [128, 1, 1],
        0,
        Args::new().ptr(back.as_mut_ptr()).ptr(out.as_ptr()).arg(n as u64),
    );
    for (b, o) in back.iter().zip(&out) {
        assert_eq!(b.to_bits(), o.to_f32().to_bits());
    }
}

/// The PTX ISA's fragment tables for mma.m16n8k16 with .bf16 inputs, written per element index
/// (a0..a7, b0..b3, c0..c3 of a lane), independently of emu/cxx/mma.cpp's per-register loops.
fn a_element(lane: usize, i: usize) -> (usize, usize) {
    let (group, tid) = (lane / 4, lane % 4);
    let row = if i < 2 || (4..6).contains(&i) { group } else { group + 8 };
    let col = tid * 2 + (i & 1) + if i >= 4 { 8 } else { 0 };
    (row, col)
}
fn b_element(lane: usize, i: usize) -> (usize, usize) {
    let (group, tid) = (lane / 4, lane % 4);
    let row = tid * 2 + (i & 1) + if i >= 2 { 8 } else { 0 };
    (row, group)
}
fn c_element(lane: usize, i: usize) -> (usize, usize) {
    let (group, tid) = (lane / 4, lane % 4);
    (if i < 2 { group } else { group + 8 }, tid * 2 + (i & 1))
}

#[test]
fn mma_m16n8k16_matches_a_plain_matrix_product() {
    for seed in 0..4u64 {
        let a: Vec<bf16> = values(256, 100 + seed).iter().map(|&v| bf16::from_f32(v * 4.0)).collect(); // [16][16]
        let b: Vec<bf16> = values(128, 200 + seed).iter().map(|&v| bf16::from_f32(v)).collect(); // [16][8]
        let c: Vec<f32> = values(128, 300 + seed); // [16][8]
        let pack = |lo: bf16, hi: bf16| lo.to_bits() as u32 | (hi.to_bits() as u32) << 16;
        let mut af = [[0u32; 4]; 32];
        let mut bfr = [[0u32; 2]; 32];
        let mut d = [[0f32; 4]; 32];
        for lane in 0..32 {
            for r in 0..4 {
                let (r0, c0) = a_element(lane, 2 * r);
                let (r1, c1) = a_element(lane, 2 * r + 1);
                af[lane][r] = pack(a[r0 * 16 + c0], a[r1 * 16 + c1]);
            }
            for r in 0..2 {
                let (k0, n0) = b_element(lane, 2 * r);
                let (k1, n1) = b_element(lane, 2 * r + 1);
                bfr[lane][r] = pack(b[k0 * 8 + n0], b[k1 * 8 + n1]);
            }
            for i in 0..4 {
                let (m, n) = c_element(lane, i);
                d[lane][i] = c[m * 8 + n];
            }
        }
        kernels::test_mma(&mut d, &af, &bfr).unwrap();
        for lane in 0..32 {
            for i in 0..4 {
                let (m, n) = c_element(lane, i);
                let exact: f64 =
                    c[m * 8 + n] as f64 + (0..16).map(|k| a[m * 16 + k].to_f64() * b[k * 8 + n].to_f64()).sum::<f64>();
                let got = d[lane][i] as f64;
                // 16 f32 additions of exact products: a few ulp of the magnitudes involved.
                let scale: f64 = (c[m * 8 + n].abs() as f64)
                    + (0..16).map(|k| (a[m * 16 + k].to_f64() * b[k * 8 + n].to_f64()).abs()).sum::<f64>();
                assert!(
                    (got - exact).abs() <= 16.0 * f32::EPSILON as f64 * scale,
                    "lane {lane} D[{m}][{n}] = {got}, want {exact}"
                );
            }
        }
    }
}

#[test]
fn rmsnorm_forward_kernel_matches_the_cpu_reference() {
    for dim in [96usize, 90] {
        // dim % 4 == 0 takes the float4 path, the other the scalar one.
        let rows = 5;
        let x = values(rows * dim, 1);
        let w: Vec<f32> = values(dim, 2).iter().map(|v| 1.0 + v * 0.5).collect();
        let eps = 1e-5f32;
        let (mut y, mut rstd) = (vec![0f32; rows * dim], vec![0f32; rows]);
        launch(
            "rmsnorm_fwd_f32",
            [rows as u32, 1, 1],
            [64, 1, 1],
            0,
            Args::new()
                .ptr(y.as_mut_ptr())
                .ptr(rstd.as_mut_ptr())
                .ptr(x.as_ptr())
                .ptr(w.as_ptr())
                .arg(dim as i32)
                .arg(eps)
                .arg(1.0f32 / dim as f32),
        );
        let (mut y_ref, mut rstd_ref) = (vec![0f32; rows * dim], vec![0f32; rows]);
        llama_cpt_ops::rmsnorm::rmsnorm_forward(&mut y_ref, &mut rstd_ref, &x, &w, dim, eps as f64);
        for (i, (g, r)) in y.iter().zip(&y_ref).enumerate() {
            assert!((g - r).abs() <= 1e-5 * r.abs().max(1.0), "dim {dim}: y[{i}] = {g}, reference {r}");
        }
        for (g, r) in rstd.iter().zip(&rstd_ref) {
            assert!((g - r).abs() <= 1e-5 * r, "rstd {g} vs {r}");
        }
    }
}

#[test]
fn cross_entropy_forward_kernel_matches_the_cpu_reference() {
    let (rows, vocab) = (6usize, 1000usize);
    let logits: Vec<f32> = values(rows * vocab, 3).iter().map(|v| v * 8.0).collect();
    let targets: Vec<i32> = vec![0, 999, -100, 17, 500, 3];
    let (mut lse, mut loss) = (vec![0f32; rows], vec![0f32; rows]);
    launch(
        "cross_entropy_fwd_f32",
        [rows as u32, 1, 1],
        [512, 1, 1],
        0,
        Args::new()
            .ptr(lse.as_mut_ptr())
            .ptr(loss.as_mut_ptr())
            .ptr(logits.as_ptr())
            .ptr(targets.as_ptr())
            .arg(vocab as i32),
    );
    let mut lse_ref = vec![0f32; rows];
    let mean = llama_cpt_ops::cross_entropy::cross_entropy_forward(&mut lse_ref, &logits, &targets, vocab);
    for (g, r) in lse.iter().zip(&lse_ref) {
        assert!((g - r).abs() <= 1e-5 * r.abs().max(1.0), "lse {g} vs {r}");
    }
    let counted: f64 = loss.iter().map(|&l| l as f64).sum::<f64>() / 5.0;
    assert_eq!(loss[2], 0.0, "an ignored row has loss 0");
    assert!((counted - mean).abs() <= 1e-5 * mean.abs(), "mean loss {counted} vs {mean}");
}

#[test]
fn simple_attention_forward_kernel_matches_the_cpu_reference() {
    // The embedded default's attention shape: head_dim 32 takes the simple kernels; 8 documents of 128 tokens.
    let (docs, len, heads, kv_heads, d) = (8usize, 128usize, 4usize, 2usize, 32usize);
    let tokens = docs * len;
    let q = values(tokens * heads * d, 11);
    let k = values(tokens * kv_heads * d, 12);
    let v = values(tokens * kv_heads * d, 13);
    let doc_start: Vec<i32> = (0..tokens).map(|t| (t / len * len) as i32).collect();
    let (mut out, mut lse) = (vec![0f32; tokens * heads * d], vec![0f32; tokens * heads]);
    let scale = 1.0 / (d as f32).sqrt();
    let warps = tokens * heads;
    launch(
        "attn_fwd_simple_f32",
        [(warps * 32).div_ceil(256) as u32, 1, 1],
        [256, 1, 1],
        0,
        Args::new()
            .ptr(out.as_mut_ptr())
            .ptr(lse.as_mut_ptr())
            .ptr(q.as_ptr())
            .ptr(k.as_ptr())
            .ptr(v.as_ptr())
            .ptr(doc_start.as_ptr())
            .arg(tokens as u64)
            .arg(heads as i32)
            .arg(kv_heads as i32)
            .arg(d as i32)
            .arg(scale),
    );
    let cu: Vec<u32> = (0..=docs).map(|i| (i * len) as u32).collect();
    let (mut out_ref, mut lse_ref) = (vec![0f32; out.len()], vec![0f32; lse.len()]);
    let shape = llama_cpt_ops::attention::AttnShape { heads, kv_heads, head_dim: d };
    llama_cpt_ops::attention::attention_forward(&mut out_ref, &mut lse_ref, &q, &k, &v, &cu, shape);
    for (i, (g, r)) in out.iter().zip(&out_ref).enumerate() {
        assert!((g - r).abs() <= 1e-5, "out[{i}] = {g}, reference {r}");
    }
    for (i, (g, r)) in lse.iter().zip(&lse_ref).enumerate() {
        assert!((g - r).abs() <= 1e-5 * r.abs().max(1.0), "lse[{i}] = {g}, reference {r}");
    }
}

#[test]
fn tensor_core_attention_forward_kernel_matches_the_cpu_reference() {
    // head_dim 64: the mma kernel, with bf16 tiles in dynamic shared memory. Two documents (100
    // and 60 tokens) cut into tiles of 64 queries that never cross a document, as the host does.
    let (heads, kv_heads, d) = (4usize, 2usize, 64usize);
    let docs = [(0usize, 100usize), (100, 160)];
    let tokens = 160;
    let q = values(tokens * heads * d, 21);
    let k = values(tokens * kv_heads * d, 22);
    let v = values(tokens * kv_heads * d, 23);
    let mut tiles: Vec<[i32; 4]> = Vec::new();
    for &(s, e) in &docs {
        tiles.extend((s..e).step_by(64).map(|t| [s as i32, e as i32, t as i32, 0]));
    }
    let (mut out, mut lse) = (vec![0f32; tokens * heads * d], vec![0f32; tokens * heads]);
    let scale = 1.0 / (d as f32).sqrt();
    let ld = d + 8;
    let smem = ((64 * ld + 64 * ld + d * (64 + 8)) * 2) as u32;
    launch(
        "attn_fwd_d64_f32",
        [tiles.len() as u32, heads as u32, 1],
        [128, 1, 1],
        smem,
        Args::new()
            .ptr(out.as_mut_ptr())
            .ptr(lse.as_mut_ptr())
            .ptr(q.as_ptr())
            .ptr(k.as_ptr())
            .ptr(v.as_ptr())
            .ptr(tiles.as_ptr())
            .arg(heads as i32)
            .arg(kv_heads as i32)
            .arg(scale * std::f32::consts::LOG2_E),
    );
    let cu: Vec<u32> = vec![0, 100, 160];
    let (mut out_ref, mut lse_ref) = (vec![0f32; out.len()], vec![0f32; lse.len()]);
    let shape = llama_cpt_ops::attention::AttnShape { heads, kv_heads, head_dim: d };
    llama_cpt_ops::attention::attention_forward(&mut out_ref, &mut lse_ref, &q, &k, &v, &cu, shape);
    // Q, K, V and the probabilities are rounded to bf16 (relative 2⁻⁹) on their way into the
    // tensor cores; outputs are averages of values in [-1, 1), so a few 2⁻⁹ absolute.
    for (i, (g, r)) in out.iter().zip(&out_ref).enumerate() {
        assert!((g - r).abs() <= 1e-2, "out[{i}] = {g}, reference {r}");
    }
    for (i, (g, r)) in lse.iter().zip(&lse_ref).enumerate() {
        assert!((g - r).abs() <= 1e-2, "lse[{i}] = {g}, reference {r}");
    }
    let max_err = out.iter().zip(&out_ref).map(|(g, r)| (g - r).abs()).fold(0f32, f32::max);
    assert!(max_err > 0.0, "bf16 tiles cannot give the f32 reference exactly: is the mma path running?");
}
