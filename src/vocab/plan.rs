//! Merge planning: the extender's vocabulary, merges and BPE simulator, and the merge trees that
//! make a piece one token.
use std::collections::{HashMap, HashSet};

use anyhow::{bail, Result};

use super::base::BaseTokenizer;

/// The extender's working state: vocabulary, merges and a BPE simulator.
pub(super) struct Extender<'a> {
    pub(super) base: &'a BaseTokenizer,
    pub(super) vocab: HashMap<String, u32>,
    pub(super) id_tok: HashMap<u32, String>,
    pub(super) merges: Vec<(String, String)>,
    pub(super) merge_map: HashMap<(u32, u32), (u32, u32)>,
    pub(super) next_id: u32,
    pub(super) byte_ids: Vec<Option<u32>>,
    pub(super) byte_fallback: bool,
    pub(super) unk: Option<u32>,
    pub(super) added_contents: HashSet<String>,
    pub(super) new: Vec<(u32, String, bool)>,
}

#[derive(Clone, Copy)]
pub(super) struct Mark {
    new: usize,
    merges: usize,
    next_id: u32,
}

pub(super) enum Outcome {
    Added,
    Present,
    Failed(Vec<String>),
}

impl<'a> Extender<'a> {
    pub(super) fn new(base: &'a BaseTokenizer) -> Result<Self> {
        let bpe = base.bpe();
        let vocab: HashMap<String, u32> = bpe.get_vocab().into_iter().collect();
        let id_tok: HashMap<u32, String> = vocab.iter().map(|(k, &v)| (v, k.clone())).collect();
        let merges = base.merges()?;
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, (a, b)) in merges.iter().enumerate() {
            let (Some(&ia), Some(&ib)) = (vocab.get(a), vocab.get(b)) else {
                bail!("{}: merge ({a:?}, {b:?}) uses a token outside the vocabulary", base.path.display());
            };
            let Some(&r) = vocab.get(&format!("{a}{b}")) else {
                bail!("{}: merge ({a:?}, {b:?}) produces a token outside the vocabulary", base.path.display());
            };
            merge_map.entry((ia, ib)).or_insert((rank as u32, r));
        }
        let byte_ids = (0..256).map(|b| vocab.get(&format!("<0x{b:02X}>")).copied()).collect();
        let unk = bpe.unk_token.as_ref().and_then(|u| vocab.get(u).copied());
        let added_contents = base.tok.get_added_tokens_decoder().values().map(|t| t.content.clone()).collect();
        Ok(Extender {
            base,
            vocab,
            id_tok,
            merges,
            merge_map,
            next_id: base.size,
            byte_ids,
            byte_fallback: bpe.byte_fallback,
            unk,
            added_contents,
            new: Vec::new(),
        })
    }

    pub(super) fn mark(&self) -> Mark {
        Mark { new: self.new.len(), merges: self.merges.len(), next_id: self.next_id }
    }

    pub(super) fn rollback(&mut self, m: Mark) {
        for (a, b) in self.merges.drain(m.merges..) {
            self.merge_map.remove(&(self.vocab[&a], self.vocab[&b]));
        }
        for (id, tok, _) in self.new.drain(m.new..) {
            self.vocab.remove(&tok);
            self.id_tok.remove(&id);
        }
        self.next_id = m.next_id;
    }

    fn add_token(&mut self, tok: &str, requested: bool) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        self.vocab.insert(tok.to_string(), id);
        self.id_tok.insert(id, tok.to_string());
        self.new.push((id, tok.to_string(), requested));
        id
    }

    /// The BPE model's first split: characters, byte fallback, unknown.
    fn initial(&self, w: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4];
        for c in w.chars() {
            let s = c.encode_utf8(&mut buf);
            if let Some(&id) = self.vocab.get(&*s) {
                out.push(id);
                continue;
            }
            if self.byte_fallback {
                let ids: Option<Vec<u32>> = s.bytes().map(|b| self.byte_ids[b as usize]).collect();
                if let Some(ids) = ids {
                    out.extend(ids);
                    continue;
                }
            }
            out.push(self.unk.unwrap_or(u32::MAX));
        }
        out
    }

    /// BPE merging as the `tokenizers` crate does it: the lowest-ranked pair first, leftmost on ties.
    fn merge_all(&self, mut syms: Vec<u32>) -> Vec<u32> {
        loop {
            let mut best: Option<(u32, usize, u32)> = None;
            for i in 0..syms.len().saturating_sub(1) {
                if let Some(&(rank, new)) = self.merge_map.get(&(syms[i], syms[i + 1])) {
                    if best.is_none_or(|b| rank < b.0) {
                        best = Some((rank, i, new));
                    }
                }
            }
            let Some((_, i, new)) = best else { return syms };
            syms[i] = new;
            syms.remove(i + 1);
        }
    }

    fn tokenize(&self, w: &str) -> Vec<u32> {
        if let Some(&id) = self.vocab.get(w) {
            if self.base.bpe().ignore_merges {
                return vec![id];
            }
        }
        self.merge_all(self.initial(w))
    }

    fn names(&self, ids: &[u32]) -> Vec<String> {
        ids.iter().map(|i| self.id_tok.get(i).cloned().unwrap_or_else(|| "<unk>".into())).collect()
    }

    /// Split points of a merge tree over `parts` (strategy 0: fewest new intermediates; 1:
    /// balanced; 2: left chain; 3: right chain). `split[i][j]` = where span i..j splits.
    #[allow(clippy::needless_range_loop)] // the split table is triangular: [i][j] reads clearer than iterators
    fn plan(&self, parts: &[String], strategy: usize) -> Vec<Vec<usize>> {
        let n = parts.len();
        let mut split = vec![vec![0usize; n + 1]; n + 1];
        let span = |i: usize, j: usize| parts[i..j].concat();
        match strategy {
            0 => {
                let mut cost = vec![vec![0usize; n + 1]; n + 1];
                for len in 2..=n {
                    for i in 0..=n - len {
                        let j = i + len;
                        let own = usize::from(!self.vocab.contains_key(&span(i, j)));
                        let (k, c) = (i + 1..j).map(|k| (k, cost[i][k] + cost[k][j])).min_by_key(|&(_, c)| c).unwrap();
                        cost[i][j] = c + own;
                        split[i][j] = k;
                    }
                }
            }
            1 => {
                for i in 0..n {
                    for j in i + 2..=n {
                        split[i][j] = i + (j - i) / 2;
                    }
                }
            }
            2 => {
                for i in 0..n {
                    for j in i + 2..=n {
                        split[i][j] = j - 1;
                    }
                }
            }
            _ => {
                for i in 0..n {
                    for j in i + 2..=n {
                        split[i][j] = i + 1;
                    }
                }
            }
        }
        split
    }

    fn emit(&mut self, syms: &[u32], split: &[Vec<usize>], i: usize, j: usize) -> u32 {
        if j - i == 1 {
            return syms[i];
        }
        let k = split[i][j];
        let l = self.emit(syms, split, i, k);
        let r = self.emit(syms, split, k, j);
        if let Some(&(_, res)) = self.merge_map.get(&(l, r)) {
            return res;
        }
        let (a, b) = (self.id_tok[&l].clone(), self.id_tok[&r].clone());
        let joined = format!("{a}{b}");
        let res = match self.vocab.get(&joined) {
            Some(&id) => id,
            None => self.add_token(&joined, false),
        };
        self.merge_map.insert((l, r), (self.merges.len() as u32, res));
        self.merges.push((a, b));
        res
    }

    /// Adds one piece (internal form) so that the BPE model gives it as one token.
    pub(super) fn add_piece(&mut self, piece: &str) -> Outcome {
        if self.vocab.contains_key(piece) || self.added_contents.contains(piece) {
            return Outcome::Present;
        }
        let start = self.mark();
        let mut buf = [0u8; 4];
        for c in piece.chars() {
            let s = c.encode_utf8(&mut buf).to_string();
            if !self.vocab.contains_key(&s) {
                self.add_token(&s, false);
            }
        }
        let after_chars = self.mark();
        let syms = self.tokenize(piece);
        let mut got = self.names(&syms);
        if syms.len() > 1 {
            let parts = got.clone();
            for strategy in 0..4 {
                let split = self.plan(&parts, strategy);
                self.emit(&syms, &split, 0, parts.len());
                let out = self.tokenize(piece);
                if out.len() == 1 && self.id_tok[&out[0]] == piece {
                    break;
                }
                got = self.names(&out);
                self.rollback(after_chars);
            }
        }
        match self.vocab.get(piece) {
            Some(&id) if self.tokenize(piece) == [id] => {
                if let Some(t) = self.new.iter_mut().find(|t| t.0 == id) {
                    t.2 = true;
                }
                Outcome::Added
            }
            _ => {
                self.rollback(start);
                Outcome::Failed(got)
            }
        }
    }
}
