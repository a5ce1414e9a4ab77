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
    assert_eq!(kernel("scale_f32").max_threads(), 1024);
    // scale_f32(float*, float, unsigned long long)
    assert_eq!(kernel("scale_f32").param_sizes(), vec![8, 4, 8]);
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

/// Kernel arguments of f32 or bf16 elements starting `offset` elements past a 16-byte boundary:
/// offset 0 lets the memory-bound kernels take their 16-byte packs, an odd offset makes them go
/// one element at a time (their path for views that are not aligned).
struct Buf {
    words: Vec<u128>,
    offset: usize,
    len: usize,
    bf16: bool,
}

impl Buf {
    fn new(values: &[f32], bf16: bool, offset: usize) -> Buf {
        let es = if bf16 { 2 } else { 4 };
        let words = vec![0u128; ((offset + values.len()) * es).div_ceil(16) + 1];
        let mut b = Buf { words, offset, len: values.len(), bf16 };
        let bytes = b.bytes();
        for (i, &v) in values.iter().enumerate() {
            let at = (offset + i) * es;
            if bf16 {
                bytes[at..at + 2].copy_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes());
            } else {
                bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        b
    }
    fn bytes(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut u8, self.words.len() * 16) }
    }
    fn ptr(&mut self) -> *mut c_void {
        let at = self.offset * if self.bf16 { 2 } else { 4 };
        self.bytes()[at..].as_mut_ptr() as *mut c_void
    }
    fn values(&mut self) -> Vec<f32> {
        let (offset, len, bf16) = (self.offset, self.len, self.bf16);
        let bytes = self.bytes();
        (0..len)
            .map(|i| {
                if bf16 {
                    let at = (offset + i) * 2;
                    bf16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
                } else {
                    let at = (offset + i) * 4;
                    f32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
                }
            })
            .collect()
    }
}

/// Launches and says whether the kernel made 16-byte (or 8-byte) accesses.
fn launch_packed(name: &str, grid: [u32; 3], block: [u32; 3], args: Args) -> bool {
    let before = kernels::vector_accesses();
    launch(name, grid, block, 0, args);
    kernels::vector_accesses() > before
}

/// AdamWTensorDesc of cuda/adamw.cu.
#[repr(C)]
struct AdamWDesc {
    param: *mut c_void,
    working: *mut c_void,
    grad: *mut c_void,
    m: *mut c_void,
    v: *mut c_void,
    n: u64,
    decay_factor: f32,
    pad: f32,
}

/// Every output of the memory-bound kernels on inputs at `offset`, as (what, values, packed).
fn memory_bound_outputs(
    bf16: bool,
    n: usize,
    dim: usize,
    head_dim: usize,
    offset: usize,
) -> Vec<(String, Vec<f32>, bool)> {
    let t = if bf16 { "bf16" } else { "f32" };
    let buf = |seed: u64, len: usize, scale: f32| {
        let v: Vec<f32> = values(len, seed).iter().map(|x| x * scale).collect();
        Buf::new(&v, bf16, offset)
    };
    let f32buf = |seed: u64, len: usize| Buf::new(&values(len, seed), false, offset);
    let mut out = Vec::new();
    // A small grid, so that the grid-stride loops go round.
    let (g, b) = ([2, 1, 1], [64, 1, 1]);
    let (mut a, mut bb, mut o) = (buf(1, n, 2.0), buf(2, n, 2.0), buf(3, n, 1.0));
    let p = launch_packed(&format!("add_{t}"), g, b, Args::new().arg(o.ptr()).arg(a.ptr()).arg(bb.ptr()).arg(n as u64));
    out.push(("add".into(), o.values(), p));
    let p = launch_packed(&format!("add_assign_{t}"), g, b, Args::new().arg(a.ptr()).arg(bb.ptr()).arg(n as u64));
    out.push(("add_assign".into(), a.values(), p));
    let p = launch_packed(&format!("scale_{t}"), g, b, Args::new().arg(a.ptr()).arg(0.37f32).arg(n as u64));
    out.push(("scale".into(), a.values(), p));
    let (mut gate, mut up, mut dout) = (buf(4, n, 6.0), buf(5, n, 1.0), buf(6, n, 1.0));
    let p = launch_packed(
        &format!("swiglu_fwd_{t}"),
        g,
        b,
        Args::new().arg(o.ptr()).arg(gate.ptr()).arg(up.ptr()).arg(n as u64),
    );
    out.push(("swiglu".into(), o.values(), p));
    let (mut dg, mut du) = (buf(7, n, 1.0), buf(8, n, 1.0));
    let args = Args::new().arg(dg.ptr()).arg(du.ptr()).arg(dout.ptr()).arg(gate.ptr()).arg(up.ptr()).arg(n as u64);
    let p = launch_packed(&format!("swiglu_bwd_{t}"), g, b, args);
    out.push(("swiglu dgate".into(), dg.values(), p));
    out.push(("swiglu dup".into(), du.values(), p));
    let mut partial = Buf::new(&[0.0; 4], false, 0); // two f64 partial sums
    let p = launch_packed(
        &format!("sum_squares_partial_{t}"),
        g,
        b,
        Args::new().arg(partial.ptr()).arg(a.ptr()).arg(n as u64),
    );
    let pv = partial.bytes();
    let sum = f64::from_le_bytes(pv[..8].try_into().unwrap()) + f64::from_le_bytes(pv[8..16].try_into().unwrap());
    out.push(("sum_squares".into(), vec![sum as f32], p));
    // The casts, between this precision's buffer and the other.
    let (mut wide, mut narrow) =
        (Buf::new(&values(n, 9).iter().map(|x| x * 300.0).collect::<Vec<_>>(), false, offset), buf(10, n, 1.0));
    if bf16 {
        let p = launch_packed("cast_f32_to_bf16", g, b, Args::new().arg(narrow.ptr()).arg(wide.ptr()).arg(n as u64));
        out.push(("cast to bf16".into(), narrow.values(), p));
        let p = launch_packed("cast_bf16_to_f32", g, b, Args::new().arg(wide.ptr()).arg(narrow.ptr()).arg(n as u64));
        out.push(("cast to f32".into(), wide.values(), p));
    }
    // AdamW on f32 masters, with the bf16 working copy when bf16.
    let (mut param, mut grad, mut m, mut v) = (f32buf(11, n), f32buf(12, n), f32buf(13, n), f32buf(14, n));
    for x in v.bytes().chunks_exact_mut(4) {
        let y = f32::from_le_bytes(x.try_into().unwrap()).abs();
        x.copy_from_slice(&y.to_le_bytes());
    }
    let mut working = Buf::new(&vec![0.0; n], true, offset);
    let wp = if bf16 { working.ptr() } else { std::ptr::null_mut() };
    let desc = [AdamWDesc {
        param: param.ptr(),
        working: wp,
        grad: grad.ptr(),
        m: m.ptr(),
        v: v.ptr(),
        n: n as u64,
        decay_factor: 0.999,
        pad: 0.0,
    }];
    let args =
        Args::new().ptr(desc.as_ptr()).arg(0.9f32).arg(0.95f32).arg(1e-8f32).arg(1e-3f32).arg(0.3f32).arg(0.7f32);
    let p = launch_packed("adamw_multi", g, b, args);
    out.push(("adamw param".into(), param.values(), p));
    out.push(("adamw m".into(), m.values(), p));
    out.push(("adamw v".into(), v.values(), p));
    if bf16 {
        out.push(("adamw working".into(), working.values(), p));
    }
    // Rows of `dim`: RMSNorm forward and backward, cross-entropy, the embedding.
    let rows = 3;
    let (mut x, mut w, mut dy) = (buf(15, rows * dim, 3.0), buf(16, dim, 1.0), buf(17, rows * dim, 1.0));
    let (mut y, mut rstd) = (buf(18, rows * dim, 1.0), Buf::new(&[0.0; 3], false, 0));
    let args = Args::new()
        .arg(y.ptr())
        .arg(rstd.ptr())
        .arg(x.ptr())
        .arg(w.ptr())
        .arg(dim as i32)
        .arg(1e-5f32)
        .arg(1.0 / dim as f32);
    let p = launch_packed(&format!("rmsnorm_fwd_{t}"), [rows as u32, 1, 1], [64, 1, 1], args);
    out.push(("rmsnorm y".into(), y.values(), p));
    let mut dx = buf(19, rows * dim, 1.0);
    let args = Args::new()
        .arg(dx.ptr())
        .arg(dy.ptr())
        .arg(x.ptr())
        .arg(w.ptr())
        .arg(rstd.ptr())
        .arg(dim as i32)
        .arg(1.0 / dim as f32);
    let p = launch_packed(&format!("rmsnorm_bwd_dx_{t}"), [rows as u32, 1, 1], [64, 1, 1], args);
    out.push(("rmsnorm dx".into(), dx.values(), p));
    let (mut part, mut dw) = (f32buf(20, 2 * dim), f32buf(21, dim));
    let args = Args::new()
        .arg(part.ptr())
        .arg(dy.ptr())
        .arg(x.ptr())
        .arg(rstd.ptr())
        .arg(rows as u64)
        .arg(dim as i32)
        .arg(2i32);
    let p = launch_packed(&format!("rmsnorm_bwd_dw_partial_{t}"), [1, 2, 1], [32, 1, 1], args);
    let args = Args::new().arg(dw.ptr()).arg(part.ptr()).arg(2i32).arg(dim as i32);
    let p2 = launch_packed("rmsnorm_bwd_dw_reduce", [1, 1, 1], [32, 1, 1], args);
    out.push(("rmsnorm dw".into(), dw.values(), p && p2));
    let (mut h, mut r) = (buf(22, rows * dim, 1.0), buf(23, rows * dim, 2.0));
    let args = Args::new()
        .arg(h.ptr())
        .arg(y.ptr())
        .arg(rstd.ptr())
        .arg(x.ptr())
        .arg(r.ptr())
        .arg(w.ptr())
        .arg(dim as i32)
        .arg(1e-5f32)
        .arg(1.0 / dim as f32);
    let p = launch_packed(&format!("add_rmsnorm_fwd_{t}"), [rows as u32, 1, 1], [64, 1, 1], args);
    out.push(("add_rmsnorm h".into(), h.values(), p));
    out.push(("add_rmsnorm y".into(), y.values(), p));
    let targets: Vec<i32> = vec![5, -100, dim as i32 - 1];
    let (mut lse, mut loss) = (Buf::new(&[0.0; 3], false, 0), Buf::new(&[0.0; 3], false, 0));
    let mut logits = buf(24, rows * dim, 8.0);
    let args = Args::new().arg(lse.ptr()).arg(loss.ptr()).arg(logits.ptr()).ptr(targets.as_ptr()).arg(dim as i32);
    let p = launch_packed(&format!("cross_entropy_fwd_{t}"), [rows as u32, 1, 1], [64, 1, 1], args);
    out.push(("cross-entropy lse and loss".into(), [lse.values(), loss.values()].concat(), p));
    let args =
        Args::new().arg(dx.ptr()).arg(logits.ptr()).arg(lse.ptr()).ptr(targets.as_ptr()).arg(dim as i32).arg(0.7f32);
    let p = launch_packed(&format!("cross_entropy_bwd_{t}"), [rows as u32, 1, 1], [64, 1, 1], args);
    out.push(("cross-entropy dlogits".into(), dx.values(), p));
    let ids: Vec<u32> = vec![2, 0, 2, 1];
    let mut emb = buf(25, ids.len() * dim, 1.0);
    let args = Args::new().arg(emb.ptr()).arg(x.ptr()).ptr(ids.as_ptr()).arg(dim as i32);
    let p = launch_packed(&format!("embedding_fwd_{t}"), [ids.len() as u32, 1, 1], [32, 1, 1], args);
    out.push(("embedding".into(), emb.values(), p));
    // Tokens grouped by id as the host does: id 0: [1], id 1: [3], id 2: [0, 2].
    let (order, seg_start, seg_ids): (Vec<u32>, Vec<u32>, Vec<u32>) =
        (vec![1, 3, 0, 2], vec![0, 1, 2, 4], vec![0, 1, 2]);
    let mut dtable = f32buf(26, rows * dim);
    let args = Args::new()
        .arg(dtable.ptr())
        .arg(emb.ptr())
        .ptr(order.as_ptr())
        .ptr(seg_start.as_ptr())
        .ptr(seg_ids.as_ptr())
        .arg(dim as i32);
    let p = launch_packed(&format!("embedding_bwd_{t}"), [3, 1, 1], [32, 1, 1], args);
    out.push(("embedding dtable".into(), dtable.values(), p));
    // RoPE on [tokens, heads, head_dim], in place, two heads per thread.
    let (tokens, heads) = (5usize, 3usize);
    let pos: Vec<u32> = vec![0, 1, 17, 4095, 131_071];
    let inv_freq: Vec<f32> =
        (0..head_dim / 2).map(|i| 1.0 / 10_000f32.powf((2 * i) as f32 / head_dim as f32)).collect();
    let mut q = buf(27, tokens * heads * head_dim, 1.0);
    for (inverse, hpt) in [(0i32, 1i32), (1, 2)] {
        let qp = q.ptr();
        let args = Args::new()
            .arg(qp)
            .arg(qp)
            .ptr(pos.as_ptr())
            .ptr(inv_freq.as_ptr())
            .arg(tokens as u64)
            .arg(heads as i32)
            .arg(head_dim as i32)
            .arg(inverse)
            .arg(hpt);
        let p = launch_packed(&format!("rope_fwd_{t}"), g, b, args);
        out.push((format!("rope inverse {inverse}, {hpt} heads per thread"), q.values(), p));
    }
    out
}

#[test]
fn memory_bound_kernels_agree_packed_and_element_by_element() {
    // Offset 0: 16-byte packs where the lengths allow; offset 1 (and 3): unaligned, one element at a
    // time. Elementwise results must be bit-identical; those with a reduction (norms, sums,
    // cross-entropy) differ only by the order of the additions.
    for bf16 in [false, true] {
        let pack = if bf16 { 8 } else { 4 };
        for (n, dim, head_dim) in
            [(1usize, 8usize, 16usize), (7, 96, 64), (8, 96, 12), (1003, 1000, 128), (4103, 4096, 64)]
        {
            let packed = memory_bound_outputs(bf16, n, dim, head_dim, 0);
            for offset in [1, 3] {
                let single = memory_bound_outputs(bf16, n, dim, head_dim, offset);
                for ((what, p, took_packs), (_, s, took_packs_unaligned)) in packed.iter().zip(&single) {
                    let case = format!("{what} (bf16 {bf16}, n {n}, dim {dim}, head_dim {head_dim}, offset {offset})");
                    assert!(!took_packs_unaligned, "{case}: a 16-byte access on an unaligned pointer");
                    let whole_packs = match what.as_str() {
                        w if w.starts_with("rope") => (head_dim / 2) % pack == 0,
                        w if w.starts_with("rmsnorm")
                            || w.starts_with("add_rmsnorm")
                            || w.starts_with("cross")
                            || w.starts_with("embedding") =>
                        {
                            dim % pack == 0
                        }
                        w if w.starts_with("adamw") => n >= 4,
                        w if w.starts_with("cast") => n >= 8,
                        _ => n >= pack,
                    };
                    assert_eq!(*took_packs, whole_packs, "{case}: packed path taken");
                    let reduced = ["sum_squares", "rmsnorm", "add_rmsnorm y", "cross-entropy"]
                        .iter()
                        .any(|k| what.starts_with(k));
                    for (i, (a, b)) in p.iter().zip(s).enumerate() {
                        if reduced {
                            let tol = if bf16 { 8e-3 } else { 2e-5 } * a.abs().max(1.0);
                            assert!((a - b).abs() <= tol, "{case}[{i}]: {a} packed, {b} element by element");
                        } else {
                            assert_eq!(a.to_bits(), b.to_bits(), "{case}[{i}]: {a} packed, {b} element by element");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn red_add_f32_is_atomic_across_blocks_and_flushes_subnormals() {
    // 8 blocks of 128 threads on the emulator's host threads, every thread adding to one address:
    // a lost update would leave the sum short. The sums are exact in f32.
    let threads = 128u32;
    let mut out = vec![0f32; threads as usize * 4];
    out[11] = 1.5 * f32::MIN_POSITIVE;
    kernels::self_test("red_add", threads, &mut out).unwrap();
    assert_eq!(out[0], (8 * threads) as f32, "every add landed");
    for i in 0..8 {
        assert_eq!(out[1 + i], (8 * threads / 8) as f32 * 0.5, "slot {i}");
    }
    assert_eq!(out[10].to_bits(), 0, "a subnormal input is flushed to zero");
    assert_eq!(out[11].to_bits(), 0, "a subnormal result is flushed to zero");
}
