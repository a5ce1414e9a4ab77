//! [`Backend`] on the device: each op allocates its outputs from the pool and launches its kernel
//! (or cuBLASLt) on the one stream; attention lives in [`super::attention`].
use super::*;
use crate::backend::{mean_of_row_losses, StepLoss};

impl Backend for Cuda {
    type Buf = CudaBuf;

    fn check_forward_shape(&self, s: &crate::backend::ForwardShape) -> anyhow::Result<()> {
        super::limits::check(s)
    }
    fn set_profiling(&self, on: bool) {
        Cuda::set_profiling(self, on);
    }
    fn profile_range(&self, name: &'static str) {
        Cuda::profile_range(self, name);
    }
    fn memory_stats(&self) -> Option<crate::backend::MemStats> {
        Some(Cuda::memory_stats(self))
    }
    fn reset_peak_memory(&self) {
        Cuda::reset_peak_memory(self);
    }
    fn release_cached_memory(&self) {
        self.bind();
        let stream = self.stream();
        self.inner.home.pool.lock().unwrap().release_cached(stream).expect("returning cached device memory");
    }
    fn set_memory_use(&self, what: crate::backend::MemoryUse) -> crate::backend::MemoryUse {
        std::mem::replace(&mut self.inner.home.pool.lock().unwrap().current_use, what)
    }
    fn profile_report(&self) -> Option<String> {
        let m = self.memory_stats();
        let mib = |b: usize| b as f64 / 1048576.0;
        Some(format!(
            "{}\nallocator: peak {:.1} MiB in use, {:.1} MiB reserved, {} cuMemAlloc calls, {} served from the cache\n",
            super::profile::report(&self.profile()),
            mib(m.peak_in_use),
            mib(m.peak_reserved),
            m.driver_allocs,
            m.cache_hits
        ))
    }

    fn name(&self) -> String {
        let arithmetic = if self.mixed_precision() {
            "bf16 mixed precision".to_string()
        } else {
            format!("f32, gemm {:?}", self.gemm_precision())
        };
        format!(
            "cuda:{} ({}, sm_{}{}, {arithmetic})",
            self.inner.ordinal, self.inner.device_name, self.inner.cc.0, self.inner.cc.1
        )
    }

    /// Dense tensor-core peak of the GEMM compute type in use, for the cards we know.
    fn peak_flops(&self) -> Option<f64> {
        let name = self.inner.device_name.to_ascii_uppercase();
        let (bf16, tf32, f32) = if name.contains("H100") || name.contains("H200") || name.contains("GH200") {
            if name.contains("PCIE") {
                (756e12, 378e12, 51e12)
            } else {
                (989e12, 494e12, 67e12)
            }
        } else if name.contains("A100") {
            (312e12, 156e12, 19.5e12)
        } else {
            return None;
        };
        if self.mixed_precision() {
            return Some(bf16);
        }
        Some(match self.gemm_precision() {
            GemmPrecision::Bf16 => bf16,
            GemmPrecision::Tf32 => tf32,
            GemmPrecision::F32 => f32,
        })
    }

    /// NCCL between processes (one GPU each, the local rank's).
    fn communicator(
        &self,
        launch: &llama_cpt_parallel::launch::Launch,
        timeout: std::time::Duration,
    ) -> Result<Box<dyn llama_cpt_parallel::Communicator<CudaBuf>>> {
        if launch.world_size == 1 {
            return Ok(Box::new(llama_cpt_parallel::SingleProcess::default()));
        }
        Ok(Box::new(self.nccl(launch, timeout)?))
    }
    fn mixed_precision(&self) -> bool {
        self.act_dtype() == DType::Bf16
    }
    fn to_working(&self, x: &CudaBuf) -> CudaBuf {
        self.bind();
        self.act(x).into_owned()
    }
    fn slice(&self, buf: &CudaBuf, start: usize, len: usize) -> CudaBuf {
        assert!(start + len <= buf.len, "slice [{start}, {}) of {} elements", start + len, buf.len);
        self.bind();
        let out = self.alloc_as(len, buf.dtype);
        let es = buf.dtype.size();
        if len > 0 {
            self.inner.home.profile.transfer("D2D", es * len);
            unsafe { result::memcpy_dtod_async(out.ptr, buf.ptr + (es * start) as u64, es * len, self.stream()) }
                .expect("device copy");
        }
        out
    }
    fn write_slice(&self, dst: &mut CudaBuf, start: usize, src: &CudaBuf) {
        assert!(start + src.len <= dst.len, "write [{start}, {}) into {} elements", start + src.len, dst.len);
        self.bind();
        let src = self.as_type(src, dst.dtype);
        let es = dst.dtype.size();
        if src.len > 0 {
            self.inner.home.profile.transfer("D2D", es * src.len);
            unsafe { result::memcpy_dtod_async(dst.ptr + (es * start) as u64, src.ptr, es * src.len, self.stream()) }
                .expect("device copy");
        }
    }
    fn assemble(&self, len: usize, parts: &[(usize, &CudaBuf)]) -> CudaBuf {
        self.bind();
        let mut out = self.alloc(len);
        let mut parts = parts.to_vec();
        parts.sort_by_key(|&(offset, _)| offset);
        let mut filled = 0;
        for (offset, part) in parts {
            assert!(offset >= filled, "assemble: a part at {offset} overlaps the one ending at {filled}");
            self.memset_zero_range(&out, filled, offset - filled);
            self.write_slice(&mut out, offset, part);
            filled = offset + part.len;
        }
        self.memset_zero_range(&out, filled, len - filled);
        out
    }
    fn upload(&self, data: &[f32]) -> CudaBuf {
        self.upload_raw(data)
    }
    fn download(&self, buf: &CudaBuf) -> Vec<f32> {
        match buf.dtype {
            DType::F32 => self.download_raw(buf.ptr, buf.len),
            DType::Bf16 => self.download_bf16(buf).into_iter().map(f32::from).collect(),
        }
    }
    fn zeros(&self, len: usize) -> CudaBuf {
        self.bind();
        let b = self.alloc(len);
        self.memset_zero(&b);
        b
    }
    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len
    }

    fn add(&self, a: &CudaBuf, b: &CudaBuf) -> CudaBuf {
        assert_eq!(a.len, b.len);
        self.bind();
        let (a, b) = (self.act(a), self.act(b));
        let out = self.alloc_act(a.len);
        let (o, x, y, n) = (out.ptr, a.ptr, b.ptr, a.len as u64);
        self.elementwise(&Self::typed("add", out.dtype), a.len, args![o, x, y, n]);
        out
    }
    fn add_assign(&self, a: &mut CudaBuf, b: &CudaBuf) {
        assert_eq!(a.len, b.len);
        self.bind();
        let b = self.as_type(b, a.dtype);
        let (x, y, n) = (a.ptr, b.ptr, a.len as u64);
        self.elementwise(&Self::typed("add_assign", a.dtype), a.len, args![x, y, n]);
    }
    fn scale_assign(&self, a: &mut CudaBuf, s: f32) {
        self.bind();
        let (x, n) = (a.ptr, a.len as u64);
        self.elementwise(&Self::typed("scale", a.dtype), a.len, args![x, s, n]);
    }

    fn linear(&self, x: &CudaBuf, w: &CudaBuf, m: usize, k: usize, n: usize) -> CudaBuf {
        assert_eq!(x.len, m * k, "linear: x has {} elements, expected {m}x{k}", x.len);
        assert_eq!(w.len, n * k, "linear: w has {} elements, expected {n}x{k}", w.len);
        self.bind();
        let (x, w) = (self.act(x), self.act(w));
        let y = self.alloc_act(m * n);
        if m == 0 || n == 0 {
            return y;
        }
        if k == 0 {
            self.memset_zero(&y);
            return y;
        }
        // yᵀ[n,m] = w[n,k]·xᵀ[k,m] in column-major terms.
        self.gemm_colmajor((n, m, k), &w, true, k, &x, false, k, &y, n, 0.0);
        y
    }

    fn linear_backward(
        &self,
        dy: &CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        dw: &mut CudaBuf,
        m: usize,
        k: usize,
        n: usize,
    ) -> CudaBuf {
        self.linear_backward_into(dy, x, w, dw, (m, k, n), 1.0)
    }

    fn linear_backward_new_dw(
        &self,
        dy: &CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        m: usize,
        k: usize,
        n: usize,
    ) -> (CudaBuf, CudaBuf) {
        self.bind();
        let mut dw = self.alloc(n * k);
        if m == 0 && n * k > 0 {
            // No rows: the GEMM below does not run, and dw must still read as zeros.
            self.memset_zero(&dw);
        }
        let dx = self.linear_backward_into(dy, x, w, &mut dw, (m, k, n), 0.0);
        (dx, dw)
    }

    fn embedding(&self, table: &CudaBuf, ids: &[u32], dim: usize) -> CudaBuf {
        let vocab = table.len / dim;
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            panic!("embedding: token id {id} >= vocab {vocab}");
        }
        self.bind();
        let table = self.act(table);
        let out = self.alloc_act(ids.len() * dim);
        let dids = self.upload_cached(ids);
        let (o, t, i, d) = (out.ptr, table.ptr, dids.ptr, dim as i32);
        self.launch(
            &Self::typed("embedding_fwd", out.dtype),
            (ids.len() as u32, div_ceil(dim.div_ceil(16 / out.dtype.size()), 256) as u32, 1),
            (256, 1, 1),
            0,
            args![o, t, i, d],
        );
        out
    }

    fn embedding_backward(&self, dout: &CudaBuf, ids: &[u32], dim: usize, dtable: &mut CudaBuf) {
        assert_eq!(dout.len, ids.len() * dim);
        assert_eq!(dtable.dtype, DType::F32, "embedding: the gradient table accumulates in f32");
        let vocab = dtable.len / dim;
        assert!(ids.iter().all(|&id| (id as usize) < vocab), "embedding: token id >= vocab {vocab}");
        if ids.is_empty() {
            return;
        }
        self.bind();
        let dout = self.act(dout);
        // Token indices grouped by id, each group in token order (a stable sort).
        let mut order: Vec<u32> = (0..ids.len() as u32).collect();
        order.sort_by_key(|&t| ids[t as usize]);
        let (mut seg_start, mut seg_ids) = (Vec::new(), Vec::new());
        for (n, &t) in order.iter().enumerate() {
            if n == 0 || ids[t as usize] != ids[order[n - 1] as usize] {
                seg_start.push(n as u32);
                seg_ids.push(ids[t as usize]);
            }
        }
        seg_start.push(order.len() as u32);
        let segs = seg_ids.len();
        let (o, s, i) = (self.upload_cached(&order), self.upload_cached(&seg_start), self.upload_cached(&seg_ids));
        let (dt, dy, op, sp, ip, d) = (dtable.ptr, dout.ptr, o.ptr, s.ptr, i.ptr, dim as i32);
        self.launch(
            &Self::typed("embedding_bwd", dout.dtype),
            (segs as u32, div_ceil(dim.div_ceil(16 / dout.dtype.size()), 256) as u32, 1),
            (256, 1, 1),
            0,
            args![dt, dy, op, sp, ip, d],
        );
    }

    fn rmsnorm(&self, x: &CudaBuf, w: &CudaBuf, dim: usize, eps: f64) -> (CudaBuf, CudaBuf) {
        assert_eq!(w.len, dim);
        assert_eq!(x.len % dim, 0);
        let rows = x.len / dim;
        self.bind();
        let (x, w) = (self.act(x), self.act(w));
        let (y, rstd) = (self.alloc_act(x.len), self.alloc(rows));
        let (yp, rp, xp, wp, d, e, inv) =
            (y.ptr, rstd.ptr, x.ptr, w.ptr, dim as i32, eps as f32, (1.0 / dim as f64) as f32);
        self.launch(
            &Self::typed("rmsnorm_fwd", y.dtype),
            (rows as u32, 1, 1),
            (256, 1, 1),
            0,
            args![yp, rp, xp, wp, d, e, inv],
        );
        (y, rstd)
    }

    fn add_rmsnorm(&self, x: &CudaBuf, r: &CudaBuf, w: &CudaBuf, dim: usize, eps: f64) -> (CudaBuf, CudaBuf, CudaBuf) {
        assert!(w.len == dim && x.len == r.len && x.len.is_multiple_of(dim));
        let rows = x.len / dim;
        self.bind();
        let (x, r, w) = (self.act(x), self.act(r), self.act(w));
        let (h, y, rstd) = (self.alloc_act(x.len), self.alloc_act(x.len), self.alloc(rows));
        let (hp, yp, rsp, xp, rp, wp, d, e, inv) =
            (h.ptr, y.ptr, rstd.ptr, x.ptr, r.ptr, w.ptr, dim as i32, eps as f32, (1.0 / dim as f64) as f32);
        self.launch(
            &Self::typed("add_rmsnorm_fwd", h.dtype),
            (rows as u32, 1, 1),
            (256, 1, 1),
            0,
            args![hp, yp, rsp, xp, rp, wp, d, e, inv],
        );
        (h, y, rstd)
    }

    fn rmsnorm_backward(
        &self,
        dy: &CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        rstd: &CudaBuf,
        dim: usize,
        dw: &mut CudaBuf,
    ) -> CudaBuf {
        let rows = x.len / dim;
        assert!(dy.len == x.len && w.len == dim && rstd.len == rows && dw.len == dim);
        assert!(rstd.dtype == DType::F32 && dw.dtype == DType::F32, "rmsnorm: rstd and dw are f32");
        self.bind();
        let (dy, x, w) = (self.act(dy), self.act(x), self.act(w));
        let t = self.act_dtype();
        let dx = self.alloc_act(x.len);
        if rows == 0 {
            return dx;
        }
        let (dxp, dyp, xp, wp, rp, d, inv) =
            (dx.ptr, dy.ptr, x.ptr, w.ptr, rstd.ptr, dim as i32, (1.0 / dim as f64) as f32);
        self.launch(
            &Self::typed("rmsnorm_bwd_dx", t),
            (rows as u32, 1, 1),
            (256, 1, 1),
            0,
            args![dxp, dyp, xp, wp, rp, d, inv],
        );
        let rows_per_chunk = div_ceil(rows, 128).max(16).min(rows);
        let chunks = div_ceil(rows, rows_per_chunk);
        let partial = self.alloc(chunks * dim);
        let (pp, nrows, rpc, nch) = (partial.ptr, rows as u64, rows_per_chunk as i32, chunks as i32);
        // Threads stride over a row's 16-byte packs of columns (cuda/rmsnorm.cu).
        let cols = div_ceil(dim.div_ceil(16 / t.size()), 256) as u32;
        self.launch(
            &Self::typed("rmsnorm_bwd_dw_partial", t),
            (cols, chunks as u32, 1),
            (256, 1, 1),
            0,
            args![pp, dyp, xp, rp, nrows, d, rpc],
        );
        let dwp = dw.ptr;
        let cols = div_ceil(dim.div_ceil(4), 256) as u32;
        self.launch("rmsnorm_bwd_dw_reduce", (cols, 1, 1), (256, 1, 1), 0, args![dwp, pp, nch, d]);
        dx
    }

    fn rope(
        &self,
        x: &CudaBuf,
        positions: &[u32],
        heads: usize,
        head_dim: usize,
        theta: f64,
        inverse: bool,
    ) -> CudaBuf {
        assert!(head_dim.is_multiple_of(2), "rope: head_dim {head_dim} must be even");
        let tokens = positions.len();
        assert_eq!(x.len, tokens * heads * head_dim, "rope: x does not match the positions");
        self.bind();
        let x = self.act(x);
        let y = self.alloc_act(x.len);
        let pos = self.upload_cached(positions);
        // Inverse frequencies exactly as ops::rope::rope_tables computes them (f32 powf).
        let base = theta as f32;
        let inv_freq: Vec<u32> =
            (0..head_dim / 2).map(|i| (1.0f32 / base.powf((2 * i) as f32 / head_dim as f32)).to_bits()).collect();
        let freqs = self.upload_cached(&inv_freq);
        // A thread per (token, run of a pack's pairs, group of heads): each thread's sin/cos serve
        // its group's heads; groups as large as still fills the device.
        let runs = (head_dim / 2).div_ceil(16 / y.dtype.size());
        let heads_per_thread = (tokens * runs * heads / self.resident_threads()).clamp(1, heads.max(1));
        let units = tokens * runs * heads.div_ceil(heads_per_thread);
        let (yp, xp, pp, fp, t, h, d, inv, hpt) = (
            y.ptr,
            x.ptr,
            pos.ptr,
            freqs.ptr,
            tokens as u64,
            heads as i32,
            head_dim as i32,
            inverse as i32,
            heads_per_thread as i32,
        );
        self.grid_stride(&Self::typed("rope_fwd", y.dtype), units, args![yp, xp, pp, fp, t, h, d, inv, hpt]);
        y
    }

    fn attention(
        &self,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        cu_seqlens: &[u32],
        shape: AttnShape,
    ) -> (CudaBuf, CudaBuf) {
        self.attention_forward(q, k, v, cu_seqlens, shape)
    }

    fn attention_backward(
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
        self.attention_backward_pass(dout, q, k, v, out, lse, cu_seqlens, shape)
    }

    fn swiglu(&self, gate: &CudaBuf, up: &CudaBuf) -> CudaBuf {
        assert_eq!(gate.len, up.len);
        self.bind();
        let (gate, up) = (self.act(gate), self.act(up));
        let out = self.alloc_act(gate.len);
        let (o, g, u, n) = (out.ptr, gate.ptr, up.ptr, gate.len as u64);
        self.elementwise(&Self::typed("swiglu_fwd", out.dtype), gate.len, args![o, g, u, n]);
        out
    }

    fn swiglu_backward(&self, dout: &CudaBuf, gate: &CudaBuf, up: &CudaBuf) -> (CudaBuf, CudaBuf) {
        assert!(dout.len == gate.len && gate.len == up.len);
        self.bind();
        let (dout, gate, up) = (self.act(dout), self.act(gate), self.act(up));
        let (dg, du) = (self.alloc_act(gate.len), self.alloc_act(gate.len));
        let (dgp, dup, dp, g, u, n) = (dg.ptr, du.ptr, dout.ptr, gate.ptr, up.ptr, gate.len as u64);
        self.elementwise(&Self::typed("swiglu_bwd", dg.dtype), gate.len, args![dgp, dup, dp, g, u, n]);
        (dg, du)
    }

    fn cross_entropy(&self, logits: &CudaBuf, targets: &[i32], vocab: usize) -> (f64, CudaBuf) {
        let (rows, lse) = self.cross_entropy_rows(logits, targets, vocab);
        let n = llama_cpt_ops::cross_entropy::count_valid(targets);
        (mean_of_row_losses(&self.download_raw::<f32>(rows.ptr, rows.len), n), lse)
    }

    fn cross_entropy_with_grad_deferred(
        &self,
        logits: &CudaBuf,
        targets: &[i32],
        vocab: usize,
        dloss: f64,
    ) -> (StepLoss<CudaBuf>, CudaBuf) {
        let (rows, lse) = self.cross_entropy_rows(logits, targets, vocab);
        let dlogits = self.cross_entropy_backward(logits, &lse, targets, vocab, dloss);
        (StepLoss::Rows { rows, valid: llama_cpt_ops::cross_entropy::count_valid(targets) }, dlogits)
    }

    fn cross_entropy_backward(
        &self,
        logits: &CudaBuf,
        lse: &CudaBuf,
        targets: &[i32],
        vocab: usize,
        dloss: f64,
    ) -> CudaBuf {
        let rows = targets.len();
        assert!(logits.len == rows * vocab && lse.len == rows && lse.dtype == DType::F32);
        self.bind();
        let logits = self.act(logits);
        let d = self.alloc_act(logits.len);
        let n = llama_cpt_ops::cross_entropy::count_valid(targets);
        let scale = if n == 0 { 0.0f32 } else { (dloss / n as f64) as f32 };
        let t = self.upload_cached(bytemuck::cast_slice(targets));
        let (dp, xp, lp, tp, v) = (d.ptr, logits.ptr, lse.ptr, t.ptr, vocab as i32);
        self.launch(
            &Self::typed("cross_entropy_bwd", d.dtype),
            (rows as u32, 1, 1),
            (512, 1, 1),
            0,
            args![dp, xp, lp, tp, v, scale],
        );
        d
    }

    fn sum_squares(&self, x: &CudaBuf) -> f64 {
        self.sum_squares_all(&[x])
    }

    fn sum_squares_all(&self, xs: &[&CudaBuf]) -> f64 {
        self.losses_and_sum_squares(&[], xs).1
    }

    fn losses_and_sum_squares(&self, losses: &[StepLoss<CudaBuf>], xs: &[&CudaBuf]) -> (Vec<f64>, f64) {
        // Each buffer's per-block partial sums (f64) side by side, then every loss row (f32),
        // all in one buffer: one download.
        let blocks: Vec<usize> =
            xs.iter().map(|x| if x.len == 0 { 0 } else { div_ceil(x.len, 4096).clamp(1, 1024) }).collect();
        let total: usize = blocks.iter().sum();
        let row_lens: Vec<usize> = losses
            .iter()
            .map(|l| match l {
                StepLoss::Rows { rows, .. } => rows.len,
                StepLoss::Host(_) => 0,
            })
            .collect();
        let mut staging = self.alloc(total * 2 + row_lens.iter().sum::<usize>());
        let mut at = 0;
        for (x, &b) in xs.iter().zip(&blocks).filter(|(_, &b)| b > 0) {
            let (pp, xp, n) = (staging.ptr + 8 * at as u64, x.ptr, x.len as u64);
            self.launch(
                &Self::typed("sum_squares_partial", x.dtype),
                (b as u32, 1, 1),
                (256, 1, 1),
                0,
                args![pp, xp, n],
            );
            at += b;
        }
        let mut at = total * 2;
        for l in losses {
            if let StepLoss::Rows { rows, .. } = l {
                self.write_slice(&mut staging, at, rows);
                at += rows.len;
            }
        }
        let host = if staging.len == 0 { Vec::new() } else { self.download_raw::<f32>(staging.ptr, staging.len) };
        let (partials, mut rows) = host.split_at(total * 2);
        let partials: Vec<f64> = bytemuck::pod_collect_to_vec(partials);
        let means = losses
            .iter()
            .zip(&row_lens)
            .map(|(l, &len)| match l {
                StepLoss::Host(mean) => *mean,
                StepLoss::Rows { valid, .. } => {
                    let (mine, rest) = rows.split_at(len);
                    rows = rest;
                    mean_of_row_losses(mine, *valid)
                }
            })
            .collect();
        let mut at = 0;
        let sum = blocks
            .iter()
            .map(|&b| {
                at += b;
                partials[at - b..at].iter().sum::<f64>()
            })
            .sum();
        (means, sum)
    }

    fn adamw_step(
        &self,
        param: &mut CudaBuf,
        grad: &CudaBuf,
        m: &mut CudaBuf,
        v: &mut CudaBuf,
        cfg: &AdamWConfig,
        lr: f64,
        step: u64,
        decay: bool,
        grad_scale: f32,
        working: Option<&mut CudaBuf>,
    ) {
        self.adamw_steps(&mut [AdamWTensor { param, grad, m, v, working, decay }], cfg, lr, step, grad_scale);
    }

    /// Every tensor in one `adamw_multi` launch (per 65,535 tensors, the grid's y limit): a table
    /// of `{param, bf16 copy or null, grad, m, v, n, decay_factor}` (cuda/adamw.cu
    /// `AdamWTensorDesc`, 56 bytes each). A working copy that is not bf16 is copied from the
    /// updated values after the launch.
    fn adamw_steps(
        &self,
        tensors: &mut [AdamWTensor<'_, CudaBuf>],
        cfg: &AdamWConfig,
        lr: f64,
        step: u64,
        grad_scale: f32,
    ) {
        self.bind();
        // Gradients of another type are cast first; the casts live until the launch.
        let mut casts = Vec::new();
        let mut table: Vec<u64> = Vec::new();
        let mut max_n = 0usize;
        for t in tensors.iter() {
            assert!(t.param.len == t.grad.len && t.m.len == t.grad.len && t.v.len == t.grad.len);
            assert!(
                t.param.dtype == DType::F32 && t.m.dtype == DType::F32 && t.v.dtype == DType::F32,
                "adamw: parameters (masters) and moments are f32"
            );
            if t.param.len == 0 {
                continue;
            }
            let grad = match self.as_type(t.grad, DType::F32) {
                Cow::Borrowed(g) => g.ptr,
                Cow::Owned(g) => {
                    let ptr = g.ptr;
                    casts.push(g);
                    ptr
                }
            };
            let working = match t.working.as_deref() {
                Some(w) if w.dtype == DType::Bf16 => {
                    assert_eq!(w.len, t.param.len);
                    w.ptr
                }
                _ => 0,
            };
            let decay_factor = llama_cpt_ops::adamw::AdamWScalars::new(cfg, lr, step, t.decay).decay_factor;
            table.extend_from_slice(&[
                t.param.ptr,
                working,
                grad,
                t.m.ptr,
                t.v.ptr,
                t.param.len as u64,
                decay_factor.to_bits() as u64,
            ]);
            max_n = max_n.max(t.param.len);
        }
        // The same scalars as the ops reference; all but the decay factor are shared by every tensor.
        let llama_cpt_ops::adamw::AdamWScalars { beta1: b1, beta2: b2, eps, step_size, bc2_sqrt, .. } =
            llama_cpt_ops::adamw::AdamWScalars::new(cfg, lr, step, false);
        const PER_TENSOR: usize = 7;
        for chunk in table.chunks(PER_TENSOR * 65_535) {
            let count = chunk.len() / PER_TENSOR;
            let desc = self.upload_raw::<u32>(bytemuck::cast_slice(chunk));
            let (dp, gs) = (desc.ptr, grad_scale);
            self.launch(
                "adamw_multi",
                (self.blocks_for(div_ceil(max_n, 4), 256), count as u32, 1),
                (256, 1, 1),
                0,
                args![dp, b1, b2, eps, step_size, bc2_sqrt, gs],
            );
        }
        drop(casts);
        for t in tensors.iter_mut() {
            if let Some(w) = t.working.as_deref_mut().filter(|w| w.dtype != DType::Bf16) {
                self.write_slice(w, 0, t.param);
            }
        }
    }
}

impl Cuda {
    /// Each row's cross-entropy (0 for an ignored target) and log-sum-exp, left on the device.
    fn cross_entropy_rows(&self, logits: &CudaBuf, targets: &[i32], vocab: usize) -> (CudaBuf, CudaBuf) {
        let rows = targets.len();
        assert_eq!(logits.len, rows * vocab);
        let ignored = llama_cpt_ops::IGNORE_INDEX;
        if let Some(&t) = targets.iter().find(|&&t| t != ignored && (t < 0 || t as usize >= vocab)) {
            panic!("cross_entropy: target {t} outside 0..{vocab}");
        }
        self.bind();
        let logits = self.act(logits);
        let lse = self.alloc(rows);
        let loss = self.alloc(rows);
        let t = self.upload_cached(bytemuck::cast_slice(targets));
        let (lp, lsp, xp, tp, v) = (lse.ptr, loss.ptr, logits.ptr, t.ptr, vocab as i32);
        self.launch(
            &Self::typed("cross_entropy_fwd", logits.dtype),
            (rows as u32, 1, 1),
            (512, 1, 1),
            0,
            args![lp, lsp, xp, tp, v],
        );
        (loss, lse)
    }

    /// `dx = dy·w`, and `dw = dyᵀ·x + beta·dw` (β = 0: `dw` is written, not read).
    fn linear_backward_into(
        &self,
        dy: &CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        dw: &mut CudaBuf,
        (m, k, n): (usize, usize, usize),
        beta: f32,
    ) -> CudaBuf {
        assert_eq!(dy.len, m * n);
        assert_eq!(x.len, m * k);
        assert_eq!(w.len, n * k);
        assert_eq!(dw.len, n * k);
        self.bind();
        let (dy, x, w) = (self.act(dy), self.act(x), self.act(w));
        let dx = self.alloc_act(m * k);
        if m == 0 || k == 0 {
            return dx;
        }
        if n == 0 {
            self.memset_zero(&dx);
            return dx;
        }
        // dxᵀ[k,m] = wᵀ[k,n]·dyᵀ[n,m]
        self.gemm_colmajor((k, m, n), &w, false, k, &dy, false, n, &dx, k, 0.0);
        // dwᵀ[k,n] (+)= xᵀ[k,m]·dy[m,n], in dw's own type (f32 in mixed precision).
        self.gemm_colmajor((k, n, m), &x, false, k, &dy, true, n, dw, k, beta);
        dx
    }
}
