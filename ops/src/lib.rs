//! CPU reference operators for llama-cpt.
//!
//! Every operator the model uses is defined here once, forward and backward, on plain slices,
//! generic over [`Real`] (f32 for running, f64 for finite-difference gradient checks). This crate is
//! the oracle: the CPU backend calls it directly and every CUDA kernel is tested against it.
//!
//! Layout conventions (row-major throughout):
//! - activations are `[tokens, features]`; a batch of sequences is flattened to `tokens`;
//! - attention inputs are `[tokens, heads, head_dim]`, documents given as cumulative lengths
//!   (`cu_seqlens`, FlashAttention's varlen convention): a token attends causally inside its own
//!   document only;
//! - linear weights are `[out_features, in_features]` as in PyTorch/Hugging Face (`y = x Wᵀ`).

pub mod adamw;
pub mod attention;
pub mod convert;
pub mod cross_entropy;
pub mod cross_entropy_fused;
pub mod embedding;
pub mod gradnorm;
pub mod matmul;
pub mod real;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;

#[cfg(test)]
pub(crate) mod gradcheck;

pub use real::Real;

/// Label value whose token contributes no loss (PyTorch's `ignore_index` default).
pub const IGNORE_INDEX: i32 = -100;
