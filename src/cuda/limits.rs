//! What the kernels' launch geometry and argument types allow, checked before a forward starts so
//! that an unsupported model or batch is refused with the op and the limit instead of failing in a
//! launch (or, worse, overflowing an `int` inside one).
use crate::backend::{check_common_limits, ForwardShape};
use anyhow::{bail, Result};
use llama_cpt_ops::attention::AttnShape;

/// `gridDim.x` (one block per token row in the norms, embedding and cross-entropy kernels).
pub const MAX_GRID_X: usize = i32::MAX as usize;
/// `gridDim.y` (heads in the tensor-core attention kernels).
pub const MAX_GRID_Y: usize = 65_535;
/// The simple attention kernels keep `head_dim / 32` values per lane in registers (MAXC = 8).
pub const MAX_HEAD_DIM: usize = 256;

/// Every limit of the CUDA kernels for one forward of `s`.
pub fn check(s: &ForwardShape) -> Result<()> {
    check_common_limits(s)?;
    let AttnShape { heads, kv_heads, head_dim } = s.attn;
    if head_dim > MAX_HEAD_DIM {
        bail!("attention: head_dim {head_dim} is beyond the CUDA kernels' {MAX_HEAD_DIM}");
    }
    if heads > MAX_GRID_Y {
        bail!("attention: {heads} heads, beyond the {MAX_GRID_Y} blocks of a grid's y dimension");
    }
    if s.tokens > MAX_GRID_X {
        bail!(
            "rmsnorm: {} tokens in one forward, beyond the {MAX_GRID_X} blocks of a grid's x dimension (one per row)",
            s.tokens
        );
    }
    // The simple attention kernels run one warp per (token, head), 8 warps a block.
    if (s.tokens * heads.max(kv_heads)).div_ceil(8) > MAX_GRID_X {
        bail!(
            "attention: {} tokens × {heads} heads, beyond {} warps ({MAX_GRID_X} blocks of 8)",
            s.tokens,
            MAX_GRID_X * 8
        );
    }
    for (op, what, n) in
        [("rmsnorm", "hidden size", s.hidden), ("swiglu", "FFN size", s.ffn), ("cross_entropy", "vocabulary", s.vocab)]
    {
        if n > i32::MAX as usize {
            bail!("{op}: {what} {n} beyond the kernels' int argument ({})", i32::MAX);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(tokens: usize, heads: usize, kv_heads: usize, head_dim: usize) -> ForwardShape {
        ForwardShape {
            tokens,
            hidden: heads * head_dim,
            ffn: 4 * heads * head_dim,
            vocab: 69_104,
            attn: AttnShape { heads, kv_heads, head_dim },
        }
    }

    #[test]
    fn each_limit_names_its_op_and_the_limit() {
        assert!(check(&shape(4096 * 8, 32, 32, 128)).is_ok(), "LLaMA-2-7B at 8 × 4k");
        assert!(check(&shape(4096, 64, 8, 128)).is_ok(), "LLaMA-2-70B's GQA");
        let err = |s: ForwardShape| check(&s).unwrap_err().to_string();
        assert_eq!(err(shape(16, 4, 4, 272)), "attention: head_dim 272 is beyond the CUDA kernels' 256");
        assert_eq!(err(shape(16, 4, 4, 63)), "rope: head_dim 63 must be even (rotary pairs)");
        assert_eq!(err(shape(16, 6, 4, 64)), "attention: 4 KV heads must divide the 6 query heads");
        assert!(err(shape(16, 70_000, 70_000, 2)).starts_with("attention: 70000 heads, beyond the 65535 blocks"));
        assert!(err(shape(1 << 31, 1, 1, 2)).starts_with("rmsnorm: 2147483648 tokens in one forward"));
        assert!(err(shape(1 << 29, 32, 32, 2)).starts_with("attention: 536870912 tokens × 32 heads"));
        let mut big_vocab = shape(16, 4, 4, 64);
        big_vocab.vocab = 1 << 31;
        assert!(err(big_vocab).starts_with("cross_entropy: vocabulary 2147483648 beyond the i32 targets"));
    }
}
