//! The unit of work the model consumes.

/// One micro-batch: `rows` sequences of `seq_len` tokens, flattened row after row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub rows: usize,
    pub seq_len: usize,
    /// Input token ids, `[rows * seq_len]`.
    pub tokens: Vec<u32>,
    /// The id each position must predict (the next token), or
    /// [`IGNORE_INDEX`](llama_cpt_ops::IGNORE_INDEX) where no loss is taken.
    pub targets: Vec<i32>,
    /// Document boundaries over the flattened tokens, FlashAttention-varlen style:
    /// `[0, …, rows * seq_len]`, every row boundary included. A token attends only inside its own
    /// document.
    pub cu_seqlens: Vec<u32>,
    /// Each token's position inside its document (RoPE restarts at every document).
    pub positions: Vec<u32>,
}

impl Batch {
    /// A batch of whole rows without packing: every row is one document, targets are the next
    /// token of the row (the last position of each row predicts nothing), as transformers'
    /// `LlamaForCausalLM` shifts `labels`.
    pub fn from_rows(rows: usize, seq_len: usize, tokens: Vec<u32>, labels: &[i32]) -> Batch {
        assert_eq!(tokens.len(), rows * seq_len);
        assert_eq!(labels.len(), rows * seq_len);
        let mut targets = vec![llama_cpt_ops::IGNORE_INDEX; rows * seq_len];
        for r in 0..rows {
            for t in 0..seq_len.saturating_sub(1) {
                targets[r * seq_len + t] = labels[r * seq_len + t + 1];
            }
        }
        let cu_seqlens = (0..=rows).map(|r| (r * seq_len) as u32).collect();
        let positions = (0..rows * seq_len).map(|i| (i % seq_len) as u32).collect();
        Batch { rows, seq_len, tokens, targets, cu_seqlens, positions }
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }
}
