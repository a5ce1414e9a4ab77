//! Attention on the device: the tensor-core FlashAttention-2 kernels for head_dim 64 and 128 (their
//! tiles must match cuda/attention.cu; the forward on bf16 storage is cuda/attention_fa2.cu's
//! pipelined one), the simple kernels otherwise, over documents packed in a row.
use super::*;

/// Tile sizes of the tensor-core attention kernels (must match cuda/attention.cu).
const ATTN_BM: usize = 64;
const ATTN_BN: usize = 64;
const ATTN_BMQ: usize = 32;
/// Tile sizes of the pipelined forward (must match cuda/attention_fa2.cu).
const FA2_BM: usize = 128;
const FA2_BN: usize = 64;

/// Threads per block of the pipelined forward: 4 warps at head_dim 64, 8 at 128.
fn fa2_threads(d: usize) -> u32 {
    if d == 64 {
        128
    } else {
        256
    }
}

/// Dynamic shared memory of the tensor-core attention kernels, in bytes.
pub(super) fn attn_smem(kind: &str, d: usize) -> usize {
    let ld = d + 8;
    match kind {
        "fwd" => (ATTN_BM * ld + ATTN_BN * ld + d * (ATTN_BN + 8)) * 2,
        "dq" => (2 * ATTN_BM * ld + 2 * ATTN_BN * ld + d * (ATTN_BN + 8)) * 2,
        "dkdv" => (2 * ATTN_BN * ld + 2 * ATTN_BMQ * ld + 2 * d * (ATTN_BMQ + 8)) * 2 + 2 * ATTN_BMQ * 4,
        // dK/dV's, then Kᵀ and the dSᵀ tile for dQ.
        "fused" => attn_smem("dkdv", d) + (d * (ATTN_BN + 8) + ATTN_BN * (ATTN_BMQ + 8)) * 2,
        // Q, K and V tiles, unpadded (swizzled) bf16.
        "fa2_fwd" => (FA2_BM + 2 * FA2_BN) * d * 2,
        _ => unreachable!(),
    }
}

/// Lets every tensor-core attention kernel take its dynamic shared memory (above the 48 KiB
/// default at head_dim 128).
pub(super) fn allow_attention_smem(funcs: &HashMap<String, sys::CUfunction>) -> Result<()> {
    let tiled = [
        ("attn_fwd_d64", "fwd", 64),
        ("attn_fwd_d128", "fwd", 128),
        ("attn_bwd_dq_d64", "dq", 64),
        ("attn_bwd_dq_d128", "dq", 128),
        ("attn_bwd_dkdv_d64", "dkdv", 64),
        ("attn_bwd_dkdv_d128", "dkdv", 128),
        ("attn_bwd_fused_d64", "fused", 64),
        ("attn_bwd_fused_d128", "fused", 128),
    ]
    .into_iter()
    .flat_map(|(b, k, d)| [DType::F32, DType::Bf16].map(|t| (format!("{b}_{}", t.suffix()), k, d)));
    let pipelined =
        [("attn_fa2_fwd_d64_bf16".to_string(), "fa2_fwd", 64), ("attn_fa2_fwd_d128_bf16".to_string(), "fa2_fwd", 128)];
    for (name, kind, d) in tiled.chain(pipelined) {
        let bytes = attn_smem(kind, d);
        unsafe {
            result::function::set_function_attribute(
                funcs[&name],
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
        }
        .map_err(|e| anyhow::anyhow!("{name}: {bytes} B of dynamic shared memory: {e}"))?;
    }
    Ok(())
}

impl Cuda {
    /// Tiles of `block` tokens that never cross a document: `[doc_start, doc_end, tile_start, 0]`.
    pub(super) fn doc_tiles(&self, cu_seqlens: &[u32], tokens: usize, block: usize) -> (Arc<CudaBuf>, usize) {
        let docs = llama_cpt_ops::attention::documents(cu_seqlens, tokens);
        let mut tiles = Vec::new();
        for (s0, s1) in docs {
            for t in (s0..s1).step_by(block) {
                tiles.extend_from_slice(&[s0 as u32, s1 as u32, t as u32, 0]);
            }
        }
        let n = tiles.len() / 4;
        (self.upload_cached(&tiles), n)
    }

    /// Per-token document start and end, for the simple attention kernels.
    pub(super) fn doc_bounds(&self, cu_seqlens: &[u32], tokens: usize) -> (Arc<CudaBuf>, Arc<CudaBuf>) {
        let docs = llama_cpt_ops::attention::documents(cu_seqlens, tokens);
        let (mut start, mut end) = (vec![0u32; tokens], vec![0u32; tokens]);
        for (s0, s1) in docs {
            for t in s0..s1 {
                start[t] = s0 as u32;
                end[t] = s1 as u32;
            }
        }
        (self.upload_cached(&start), self.upload_cached(&end))
    }

    pub(super) fn use_mma(&self, shape: AttnShape) -> bool {
        self.attention_kernel() != AttnKernel::Simple && (shape.head_dim == 64 || shape.head_dim == 128)
    }

    /// The pipelined forward runs on bf16 storage (its tiles are copied as they are).
    fn use_fa2(&self, shape: AttnShape, t: DType) -> bool {
        matches!(self.attention_kernel(), AttnKernel::Auto | AttnKernel::Deterministic)
            && t == DType::Bf16
            && self.use_mma(shape)
    }

    pub(super) fn check_attn(shape: AttnShape, q: &CudaBuf, k: &CudaBuf, v: &CudaBuf) -> usize {
        let AttnShape { heads, kv_heads, head_dim: d } = shape;
        assert!(kv_heads > 0 && heads % kv_heads == 0, "attention: kv_heads {kv_heads} must divide heads {heads}");
        assert!(d % 2 == 0 && d <= 256 && d > 0, "attention: head_dim {d} must be even and at most 256");
        let tokens = q.len / (heads * d);
        assert_eq!(q.len, tokens * heads * d);
        assert_eq!(k.len, tokens * kv_heads * d);
        assert_eq!(v.len, k.len);
        tokens
    }

    pub(super) fn attention_forward(
        &self,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        cu_seqlens: &[u32],
        shape: AttnShape,
    ) -> (CudaBuf, CudaBuf) {
        let tokens = Self::check_attn(shape, q, k, v);
        let AttnShape { heads, kv_heads, head_dim: d } = shape;
        self.bind();
        let (q, k, v) = (self.act(q), self.act(k), self.act(v));
        let t = self.act_dtype();
        let (out, lse) = (self.alloc_act(q.len), self.alloc(tokens * heads));
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        let (op, lp, qp, kp, vp, h, kvh) = (out.ptr, lse.ptr, q.ptr, k.ptr, v.ptr, heads as i32, kv_heads as i32);
        if self.use_fa2(shape, t) {
            let (tiles, n) = self.doc_tiles(cu_seqlens, tokens, FA2_BM);
            let (tp, sl2) = (tiles.ptr, scale * std::f32::consts::LOG2_E);
            self.launch(
                if d == 64 { "attn_fa2_fwd_d64_bf16" } else { "attn_fa2_fwd_d128_bf16" },
                (n as u32, heads as u32, 1),
                (fa2_threads(d), 1, 1),
                attn_smem("fa2_fwd", d) as u32,
                args![op, lp, qp, kp, vp, tp, h, kvh, sl2],
            );
        } else if self.use_mma(shape) {
            let (tiles, n) = self.doc_tiles(cu_seqlens, tokens, ATTN_BM);
            let (tp, sl2) = (tiles.ptr, scale * std::f32::consts::LOG2_E);
            let name = Self::typed(if d == 64 { "attn_fwd_d64" } else { "attn_fwd_d128" }, t);
            self.launch(
                &name,
                (n as u32, heads as u32, 1),
                (128, 1, 1),
                attn_smem("fwd", d) as u32,
                args![op, lp, qp, kp, vp, tp, h, kvh, sl2],
            );
        } else {
            let (start, _) = self.doc_bounds(cu_seqlens, tokens);
            let (sp, nt, dd) = (start.ptr, tokens as u64, d as i32);
            let warps = tokens * heads;
            self.launch(
                &Self::typed("attn_fwd_simple", t),
                (div_ceil(warps * 32, 256) as u32, 1, 1),
                (256, 1, 1),
                0,
                args![op, lp, qp, kp, vp, sp, nt, h, kvh, dd, scale],
            );
        }
        (out, lse)
    }

    #[allow(clippy::too_many_arguments)] // the arguments of Backend::attention_backward
    pub(super) fn attention_backward_pass(
        &self,
        dout: &CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        out: &CudaBuf,
        lse: &CudaBuf,
        cu_seqlens: &[u32],
        shape: AttnShape,
    ) -> (CudaBuf, CudaBuf, CudaBuf) {
        let tokens = Self::check_attn(shape, q, k, v);
        let AttnShape { heads, kv_heads, head_dim: d } = shape;
        assert!(dout.len == q.len && out.len == q.len && lse.len == tokens * heads && lse.dtype == DType::F32);
        self.bind();
        let (dout, q, k, v, out) = (self.act(dout), self.act(q), self.act(k), self.act(v), self.act(out));
        let t = self.act_dtype();
        let delta = self.alloc(tokens * heads);
        let rows = tokens * heads;
        let (delp, dop, outp, nrows, dd) = (delta.ptr, dout.ptr, out.ptr, rows as u64, d as i32);
        self.launch(
            &Self::typed("attn_delta", t),
            (div_ceil(rows * 32, 256) as u32, 1, 1),
            (256, 1, 1),
            0,
            args![delp, dop, outp, nrows, dd],
        );
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        let (qp, kp, vp, lp, h, kvh) = (q.ptr, k.ptr, v.ptr, lse.ptr, heads as i32, kv_heads as i32);
        if self.use_mma(shape) && self.attention_kernel() == AttnKernel::Auto {
            // Five matmuls: dK, dV and dQ in one pass, one block per (key tile, query head), all
            // three added into f32 accumulators, then cast to the storage type (in f32 they are
            // the results).
            let (tiles, n) = self.doc_tiles(cu_seqlens, tokens, ATTN_BM);
            let (tp, sl2) = (tiles.ptr, scale * std::f32::consts::LOG2_E);
            let (dq, dk, dv) = (self.alloc(q.len), self.alloc(k.len), self.alloc(v.len));
            for acc in [&dq, &dk, &dv] {
                self.memset_zero(acc);
            }
            let (dqp, dkp, dvp) = (dq.ptr, dk.ptr, dv.ptr);
            self.launch(
                &Self::typed(if d == 64 { "attn_bwd_fused_d64" } else { "attn_bwd_fused_d128" }, t),
                (n as u32, heads as u32, 1),
                (128, 1, 1),
                attn_smem("fused", d) as u32,
                args![dkp, dvp, dqp, qp, kp, vp, dop, lp, delp, tp, h, kvh, scale, sl2],
            );
            let stored = |acc: CudaBuf| if t == DType::F32 { acc } else { self.as_type(&acc, t).into_owned() };
            return (stored(dq), stored(dk), stored(dv));
        }
        let (dq, dk, dv) = (self.alloc_act(q.len), self.alloc_act(k.len), self.alloc_act(v.len));
        let (dqp, dkp, dvp) = (dq.ptr, dk.ptr, dv.ptr);
        if self.use_mma(shape) {
            let (tiles, n) = self.doc_tiles(cu_seqlens, tokens, ATTN_BM);
            let (tp, sl2) = (tiles.ptr, scale * std::f32::consts::LOG2_E);
            let (dq_name, dkdv_name) = if d == 64 {
                ("attn_bwd_dq_d64", "attn_bwd_dkdv_d64")
            } else {
                ("attn_bwd_dq_d128", "attn_bwd_dkdv_d128")
            };
            self.launch(
                &Self::typed(dq_name, t),
                (n as u32, heads as u32, 1),
                (128, 1, 1),
                attn_smem("dq", d) as u32,
                args![dqp, qp, kp, vp, dop, lp, delp, tp, h, kvh, scale, sl2],
            );
            // Key tiles are the same 64-token cuts of each document (ATTN_BN == ATTN_BM).
            self.launch(
                &Self::typed(dkdv_name, t),
                (n as u32, kv_heads as u32, 1),
                (128, 1, 1),
                attn_smem("dkdv", d) as u32,
                args![dkp, dvp, qp, kp, vp, dop, lp, delp, tp, h, kvh, scale, sl2],
            );
        } else {
            let (start, end) = self.doc_bounds(cu_seqlens, tokens);
            let (sp, ep, nt) = (start.ptr, end.ptr, tokens as u64);
            self.launch(
                &Self::typed("attn_bwd_dq_simple", t),
                (div_ceil(tokens * heads * 32, 256) as u32, 1, 1),
                (256, 1, 1),
                0,
                args![dqp, qp, kp, vp, dop, lp, delp, sp, nt, h, kvh, dd, scale],
            );
            self.launch(
                &Self::typed("attn_bwd_dkdv_simple", t),
                (div_ceil(tokens * kv_heads * 32, 256) as u32, 1, 1),
                (256, 1, 1),
                0,
                args![dkp, dvp, qp, kp, vp, dop, lp, delp, ep, nt, h, kvh, dd, scale],
            );
        }
        (dq, dk, dv)
    }
}
