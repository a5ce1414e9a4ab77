//! The CPU backend: f32 buffers, every operator straight from the `ops` reference crate
//! (multithreaded through rayon and the `gemm` crate).
//!
//! [`Cpu::bf16`] is the reference of mixed-precision training: the same f32 buffers, but every
//! value that the CUDA backend stores in bf16 (parameters made by [`Backend::to_working`], each
//! operator's activation outputs) is rounded to bf16, while statistics (rstd, lse), gradient
//! accumulators, moments and masters stay f32. One difference is left on purpose: an activation
//! gradient summed in place (`add_assign`) is not rounded, since a buffer here does not know
//! whether the device would hold it in bf16.
use crate::backend::{AdamWConfig, AttnShape, Backend};
use llama_cpt_ops as ops;

/// The CPU backend; `Cpu` (the constant) computes in f32, [`Cpu::bf16`] emulates mixed precision.
#[derive(Clone, Debug, Default)]
pub struct Cpu {
    bf16: bool,
}

/// The f32 CPU backend (a value, so that `&Cpu` reads like a unit struct).
#[allow(non_upper_case_globals)]
pub const Cpu: Cpu = Cpu { bf16: false };

impl Cpu {
    /// Mixed precision emulated on the CPU: bf16 parameters and activations, f32 everything else.
    pub const fn bf16() -> Cpu {
        Cpu { bf16: true }
    }

    /// An operator's output as the device would store it: rounded to bf16 in mixed precision.
    fn act(&self, mut x: Vec<f32>) -> Vec<f32> {
        if self.bf16 {
            x.iter_mut().for_each(|v| *v = ops::convert::round_to_bf16(*v));
        }
        x
    }
}

/// Makes glibc's malloc keep freed memory for reuse instead of returning it to the kernel: a
/// training step allocates and frees the same large buffers (the `[tokens, vocab]` logits and
/// their gradient, every activation) each step, and by default each one above 32 MiB is a fresh
/// `mmap` whose pages fault in again (measured: 710k page faults in 4 bench steps, 309k with
/// this). Costs resident memory: freed buffers stay mapped (≈ +20% peak RSS on the bench
/// shape). Call once, early (before the buffers it should govern exist); a no-op off glibc.
pub fn retain_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_MAX: i32 = -4;
        // SAFETY: mallopt only sets allocator parameters; it is safe to call at any time.
        unsafe {
            // Large blocks come from the heap (reusable) rather than from one mmap each ...
            mallopt(M_MMAP_MAX, 0);
            // ... and free memory at the heap's top is kept, up to 1 GiB.
            mallopt(M_TRIM_THRESHOLD, 1 << 30);
        }
    }
}

impl Backend for Cpu {
    type Buf = Vec<f32>;

    fn name(&self) -> String {
        format!("cpu ({} threads{})", rayon::current_num_threads(), if self.bf16 { ", bf16 emulated" } else { "" })
    }
    fn peak_flops(&self) -> Option<f64> {
        None
    }
    fn mixed_precision(&self) -> bool {
        self.bf16
    }
    fn to_working(&self, x: &Vec<f32>) -> Vec<f32> {
        self.act(x.clone())
    }
    /// MPI between processes (a build with `--features mpi`, launched by mpirun or srun).
    fn communicator(
        &self,
        launch: &llama_cpt_parallel::launch::Launch,
        timeout: std::time::Duration,
    ) -> anyhow::Result<Box<dyn llama_cpt_parallel::Communicator<Vec<f32>>>> {
        if launch.world_size == 1 {
            return Ok(Box::new(llama_cpt_parallel::SingleProcess::default()));
        }
        #[cfg(feature = "mpi")]
        {
            let mpi = llama_cpt_parallel::mpi::Mpi::init(timeout)?;
            let world = llama_cpt_parallel::Communicator::<Vec<f32>>::world_size(&mpi);
            if world != launch.world_size {
                anyhow::bail!(
                    "the {} launch says {} ranks but MPI sees {world}: CPU ranks communicate through MPI, so mpirun or srun --mpi=pmix must start them (tools/launch/single-node.sh); a launch without MPI (torchrun-style RANK/WORLD_SIZE) needs --device cuda (NCCL)",
                    launch.launcher,
                    launch.world_size
                );
            }
            Ok(Box::new(mpi))
        }
        #[cfg(not(feature = "mpi"))]
        {
            let _ = timeout;
            anyhow::bail!(
                "{} ranks were launched ({}): multi-process CPU training needs a build with `--features mpi`",
                launch.world_size,
                launch.launcher
            )
        }
    }
    fn upload(&self, data: &[f32]) -> Vec<f32> {
        data.to_vec()
    }
    fn download(&self, buf: &Vec<f32>) -> Vec<f32> {
        buf.clone()
    }
    fn zeros(&self, len: usize) -> Vec<f32> {
        vec![0.0; len]
    }
    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn slice(&self, buf: &Vec<f32>, start: usize, len: usize) -> Vec<f32> {
        buf[start..start + len].to_vec()
    }
    fn write_slice(&self, dst: &mut Vec<f32>, start: usize, src: &Vec<f32>) {
        dst[start..start + src.len()].copy_from_slice(src);
    }
    fn add(&self, a: &Vec<f32>, b: &Vec<f32>) -> Vec<f32> {
        assert_eq!(a.len(), b.len());
        self.act(a.iter().zip(b).map(|(x, y)| x + y).collect())
    }
    fn add_assign(&self, a: &mut Vec<f32>, b: &Vec<f32>) {
        assert_eq!(a.len(), b.len());
        a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
    }
    fn scale_assign(&self, a: &mut Vec<f32>, s: f32) {
        a.iter_mut().for_each(|x| *x *= s);
    }
    fn linear(&self, x: &Vec<f32>, w: &Vec<f32>, m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut y = vec![0.0; m * n];
        ops::matmul::linear_forward(&mut y, x, w, m, k, n);
        self.act(y)
    }
    fn linear_backward(
        &self,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        dw: &mut Vec<f32>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Vec<f32> {
        let mut dx = vec![0.0; m * k];
        ops::matmul::linear_backward(&mut dx, dw, dy, x, w, m, k, n);
        self.act(dx)
    }
    fn embedding(&self, table: &Vec<f32>, ids: &[u32], dim: usize) -> Vec<f32> {
        let mut out = vec![0.0; ids.len() * dim];
        ops::embedding::embedding_forward(&mut out, table, ids, dim);
        self.act(out)
    }
    fn embedding_backward(&self, dout: &Vec<f32>, ids: &[u32], dim: usize, dtable: &mut Vec<f32>) {
        ops::embedding::embedding_backward(dtable, dout, ids, dim);
    }
    fn rmsnorm(&self, x: &Vec<f32>, w: &Vec<f32>, dim: usize, eps: f64) -> (Vec<f32>, Vec<f32>) {
        let mut y = vec![0.0; x.len()];
        let mut rstd = vec![0.0; x.len() / dim];
        ops::rmsnorm::rmsnorm_forward(&mut y, &mut rstd, x, w, dim, eps);
        (self.act(y), rstd)
    }
    fn rmsnorm_backward(
        &self,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        rstd: &Vec<f32>,
        dim: usize,
        dw: &mut Vec<f32>,
    ) -> Vec<f32> {
        let mut dx = vec![0.0; x.len()];
        ops::rmsnorm::rmsnorm_backward(&mut dx, dw, dy, x, w, rstd, dim);
        self.act(dx)
    }
    fn rope(
        &self,
        x: &Vec<f32>,
        positions: &[u32],
        heads: usize,
        head_dim: usize,
        theta: f64,
        inverse: bool,
    ) -> Vec<f32> {
        let (cos, sin) = ops::rope::rope_tables::<f32>(positions, head_dim, theta);
        let mut y = x.clone();
        ops::rope::rope_apply(&mut y, &cos, &sin, heads, head_dim, inverse);
        self.act(y)
    }
    fn attention(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        cu_seqlens: &[u32],
        shape: AttnShape,
    ) -> (Vec<f32>, Vec<f32>) {
        let mut out = vec![0.0; q.len()];
        let mut lse = vec![0.0; q.len() / shape.head_dim];
        ops::attention::attention_forward(&mut out, &mut lse, q, k, v, cu_seqlens, shape);
        (self.act(out), lse)
    }
    fn attention_backward(
        &self,
        dout: &Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        out: &Vec<f32>,
        lse: &Vec<f32>,
        cu_seqlens: &[u32],
        shape: AttnShape,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        ops::attention::attention_backward(&mut dq, &mut dk, &mut dv, dout, q, k, v, out, lse, cu_seqlens, shape);
        (self.act(dq), self.act(dk), self.act(dv))
    }
    fn swiglu(&self, gate: &Vec<f32>, up: &Vec<f32>) -> Vec<f32> {
        let mut out = vec![0.0; gate.len()];
        ops::swiglu::swiglu_forward(&mut out, gate, up);
        self.act(out)
    }
    fn swiglu_backward(&self, dout: &Vec<f32>, gate: &Vec<f32>, up: &Vec<f32>) -> (Vec<f32>, Vec<f32>) {
        let (mut dg, mut du) = (vec![0.0; gate.len()], vec![0.0; up.len()]);
        ops::swiglu::swiglu_backward(&mut dg, &mut du, dout, gate, up);
        (self.act(dg), self.act(du))
    }
    fn cross_entropy(&self, logits: &Vec<f32>, targets: &[i32], vocab: usize) -> (f64, Vec<f32>) {
        let mut lse = vec![0.0; targets.len()];
        let loss = ops::cross_entropy::cross_entropy_forward(&mut lse, logits, targets, vocab);
        (loss, lse)
    }
    fn cross_entropy_backward(
        &self,
        logits: &Vec<f32>,
        lse: &Vec<f32>,
        targets: &[i32],
        vocab: usize,
        dloss: f64,
    ) -> Vec<f32> {
        let mut d = vec![0.0; logits.len()];
        ops::cross_entropy::cross_entropy_backward(&mut d, logits, lse, targets, vocab, dloss);
        self.act(d)
    }
    fn cross_entropy_with_grad(&self, logits: &Vec<f32>, targets: &[i32], vocab: usize, dloss: f64) -> (f64, Vec<f32>) {
        let mut d = vec![0.0; logits.len()];
        let loss = ops::cross_entropy_fused::cross_entropy_with_grad(&mut d, logits, targets, vocab, dloss);
        (loss, self.act(d))
    }
    fn sum_squares(&self, x: &Vec<f32>) -> f64 {
        ops::gradnorm::sum_squares(x)
    }
    fn adamw_step(
        &self,
        param: &mut Vec<f32>,
        grad: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        cfg: &AdamWConfig,
        lr: f64,
        step: u64,
        decay: bool,
        grad_scale: f32,
        working: Option<&mut Vec<f32>>,
    ) {
        ops::adamw::adamw_step(param, grad, m, v, cfg, lr, step, decay, grad_scale);
        if let Some(w) = working {
            *w = self.to_working(param);
        }
    }
}
