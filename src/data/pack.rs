//! Packing documents into rows of `seq_len` tokens, and rows into [`Batch`]es.
//!
//! The documents come in epoch order, epoch after epoch, and fill rows one after the other; no
//! token is dropped. How a row ends depends on [`Packing`]:
//! * [`Packing::Concat`] (default): row `r` is tokens `[r·L, (r+1)·L)` of the concatenated
//!   stream; a document longer than the space left in a row continues at the start of the next.
//! * [`Packing::WholeDocs`]: a document that fits in a row never straddles rows. When it does not
//!   fit in the space left, the row is padded and the document starts the next row; a document
//!   longer than `L` starts a fresh row and is cut into pieces of `L` tokens (its last piece is
//!   followed by the next documents as usual).
//!
//! Inside a [`Batch`]:
//! * every fragment of a document is its own `cu_seqlens` segment, and row boundaries are always
//!   segment boundaries. A fragment that continues a document at the start of a row starts a new
//!   segment and its positions restart at 0 (it does not see its earlier part: the simple,
//!   standard choice for packed varlen attention);
//! * `positions` count from 0 inside each segment;
//! * `targets[i]` is the next token of the same document when that token has loss mask 1, and
//!   `IGNORE_INDEX` otherwise — in particular at each document's last token (it would predict the
//!   next document). The last token of a row whose document continues in the next row *does*
//!   predict that continuation token (no token is wasted as a target);
//! * padding (at the end of a row in `WholeDocs`, and at the very end of a finite stream) has
//!   target `IGNORE_INDEX`, positions 0, 1, … and its own segment. (A `WholeDocs` row holding only
//!   the one-token last piece of a long document has no target; the loader skips it like any
//!   all-masked row — that token was the target of the row before.)
use std::sync::Arc;

use anyhow::{ensure, Result};
use llama_cpt_ops::IGNORE_INDEX;

use super::order::{epoch_order, order_tokens, Catalog, DocRef, Ordering};
use crate::batch::Batch;

/// How documents are laid into rows (`data.packing` in the trainer config).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Packing {
    /// Rows are consecutive `seq_len` slices of the concatenated documents: no padding, but any
    /// document may be cut in two.
    #[default]
    Concat,
    /// A document that fits in a row is never cut (QA/SFT records keep their prompt): rows are
    /// padded instead. Longer documents are cut into `seq_len` pieces.
    WholeDocs,
}

/// Tokens `[start, end)` of one document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fragment {
    pub doc: DocRef,
    pub start: u32,
    pub end: u32,
}

/// The contents of one row: fragments, then `pad` pad tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowSpec {
    pub frags: Vec<Fragment>,
    pub pad: usize,
}

/// Whether any position of the row has a target other than `IGNORE_INDEX`.
pub fn row_has_loss(cat: &Catalog, row: &RowSpec) -> bool {
    row.frags.iter().any(|f| {
        let sh = cat.shard(f.doc);
        let r = sh.doc_range(f.doc.doc as usize);
        let len = r.len();
        let mask = &sh.mask()[r];
        let (lo, hi) = (f.start as usize + 1, (f.end as usize + 1).min(len));
        lo < hi && mask[lo..hi].contains(&1)
    })
}

/// Builds the batch of `rows` (each exactly `seq_len` tokens long).
pub fn materialize(cat: &Catalog, rows: &[RowSpec], seq_len: usize, pad_id: u32) -> Batch {
    let n = rows.len() * seq_len;
    let mut tokens = Vec::with_capacity(n);
    let mut targets = Vec::with_capacity(n);
    let mut positions = Vec::with_capacity(n);
    let mut cu_seqlens = vec![0u32];
    for row in rows {
        for f in &row.frags {
            let sh = cat.shard(f.doc);
            let (toks, mask) = sh.doc(f.doc.doc as usize);
            let (a, b) = (f.start as usize, f.end as usize);
            toks.slice(a, b).extend_into(&mut tokens);
            for p in a..b {
                let q = p + 1;
                targets.push(if q < toks.len() && mask[q] == 1 { toks.get(q) as i32 } else { IGNORE_INDEX });
            }
            positions.extend(0..(b - a) as u32);
            cu_seqlens.push(tokens.len() as u32);
        }
        if row.pad > 0 {
            tokens.extend(std::iter::repeat_n(pad_id, row.pad));
            targets.extend(std::iter::repeat_n(IGNORE_INDEX, row.pad));
            positions.extend(0..row.pad as u32);
            cu_seqlens.push(tokens.len() as u32);
        }
        debug_assert_eq!(tokens.len() % seq_len, 0);
    }
    Batch { rows: rows.len(), seq_len, tokens, targets, cu_seqlens, positions }
}

/// A cursor over the packed row stream.
pub struct Stream {
    cat: Arc<Catalog>,
    ordering: Ordering,
    packing: Packing,
    seed: u64,
    max_epochs: Option<u64>,
    seq_len: usize,
    epoch: u64,
    order: Vec<DocRef>,
    idx: usize,
    offset: usize,
    row: u64,
    ended: bool,
}

impl Stream {
    /// A cursor at the start of raw row `row` (rows counted from the start of epoch 0, skipped
    /// rows included).
    pub fn seek(
        cat: Arc<Catalog>,
        ordering: Ordering,
        packing: Packing,
        seed: u64,
        max_epochs: Option<u64>,
        seq_len: usize,
        row: u64,
    ) -> Result<Stream> {
        ensure!(seq_len > 0, "seq_len must be positive");
        // Concat: row r starts at token r·L of the stream, found arithmetically. WholeDocs: where
        // a row starts depends on the padding before it, so the rows are walked from the start
        // below (document lengths only, once per resume).
        let (start_row, mut skip) = match packing {
            Packing::Concat => (row, row as u128 * seq_len as u128),
            Packing::WholeDocs => (0, 0),
        };
        let mut s = Stream {
            cat,
            ordering,
            packing,
            seed,
            max_epochs,
            seq_len,
            epoch: 0,
            order: Vec::new(),
            idx: 0,
            offset: 0,
            row: start_row,
            ended: false,
        };
        loop {
            if s.max_epochs.is_some_and(|m| s.epoch >= m) {
                s.ended = true;
                return Ok(s);
            }
            s.order = epoch_order(&s.cat, ordering, seed, s.epoch)?;
            let tot = order_tokens(&s.cat, &s.order) as u128;
            ensure!(tot > 0, "epoch {} selects no token (are all weights 0?)", s.epoch);
            if skip < tot {
                break;
            }
            skip -= tot;
            s.epoch += 1;
        }
        let mut skip = skip as usize;
        while skip > 0 {
            let len = s.cat.doc_len(s.order[s.idx]);
            if skip >= len {
                skip -= len;
                s.idx += 1;
            } else {
                s.offset = skip;
                skip = 0;
            }
        }
        while s.row < row && s.next_row()?.is_some() {}
        Ok(s)
    }

    /// The epoch of the next token.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    /// The raw index of the next row.
    pub fn row_index(&self) -> u64 {
        self.row
    }

    /// The next row, or `None` at the end of a finite stream.
    pub fn next_row(&mut self) -> Result<Option<RowSpec>> {
        if self.ended {
            return Ok(None);
        }
        let mut frags = Vec::new();
        let mut filled = 0usize;
        while filled < self.seq_len {
            if self.idx == self.order.len() {
                let next = self.epoch + 1;
                if self.max_epochs.is_some_and(|m| next >= m) {
                    self.ended = true;
                    break;
                }
                self.order = epoch_order(&self.cat, self.ordering, self.seed, next)?;
                ensure!(order_tokens(&self.cat, &self.order) > 0, "epoch {next} selects no token");
                self.epoch = next;
                self.idx = 0;
                self.offset = 0;
            }
            let d = self.order[self.idx];
            let len = self.cat.doc_len(d);
            if self.packing == Packing::WholeDocs && filled > 0 && len - self.offset > self.seq_len - filled {
                break; // it does not fit: pad this row, the document starts the next one
            }
            let take = (len - self.offset).min(self.seq_len - filled);
            frags.push(Fragment { doc: d, start: self.offset as u32, end: (self.offset + take) as u32 });
            filled += take;
            self.offset += take;
            if self.offset == len {
                self.idx += 1;
                self.offset = 0;
            }
        }
        if filled == 0 {
            return Ok(None);
        }
        self.row += 1;
        Ok(Some(RowSpec { frags, pad: self.seq_len - filled }))
    }
}
