//! The shard format: one file of tokenized documents, read zero-copy through `memmap2`.
//!
//! Layout (all integers little-endian; see `docs/data-format.md`):
//!
//! ```text
//! offset  size  field
//!      0     8  magic  b"LCPTSHRD"
//!      8     4  version (u32) = 1
//!     12     4  token dtype: bytes per token (u32): 2 = u16, 4 = u32
//!     16     8  vocab size (u64)
//!     24     8  token count N (u64)
//!     32     8  document count D (u64)
//!     40     8  payload length in bytes (u64) = file length - 64
//!     48     8  XXH64 (seed 0) of the payload
//!     56     8  reserved, zero
//!     64        tokens      N × dtype, zero-padded to a multiple of 8 bytes
//!               loss mask   N × u8 (0 = no loss when this token is predicted, 1 = loss),
//!                           zero-padded to a multiple of 8 bytes
//!               doc index   (D + 1) × u64: token offset of each document's start, then N
//! ```
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use memmap2::Mmap;

use super::hash::{xxh64, Xxh64};

pub const MAGIC: &[u8; 8] = b"LCPTSHRD";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 64;

#[cfg(target_endian = "big")]
compile_error!("the shard format is little-endian and read zero-copy; big-endian hosts are not supported");

/// Width of the stored token ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TokenDtype {
    U16,
    U32,
}

impl TokenDtype {
    /// u16 when every id `< vocab_size` fits (vocab ≤ 65,536), u32 otherwise.
    pub fn for_vocab(vocab_size: u64) -> TokenDtype {
        if vocab_size <= 1 << 16 {
            TokenDtype::U16
        } else {
            TokenDtype::U32
        }
    }
    pub fn bytes(self) -> usize {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }
}

/// What the header says.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardMeta {
    pub dtype: TokenDtype,
    pub vocab_size: u64,
    pub n_tokens: u64,
    pub n_docs: u64,
    pub checksum: u64,
}

fn pad8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

/// Byte offsets of the three payload sections, relative to the file start.
fn layout(dtype: TokenDtype, n_tokens: usize, n_docs: usize) -> (usize, usize, usize, usize) {
    let tok = HEADER_LEN;
    let mask = tok + pad8(n_tokens * dtype.bytes());
    let docs = mask + pad8(n_tokens);
    let end = docs + (n_docs + 1) * 8;
    (tok, mask, docs, end)
}

/// Accumulates documents in memory and writes one shard (atomically: temp file, then rename).
pub struct ShardWriter {
    path: PathBuf,
    vocab_size: u64,
    dtype: TokenDtype,
    tokens: Vec<u32>,
    mask: Vec<u8>,
    offsets: Vec<u64>,
}

impl ShardWriter {
    pub fn new(path: impl Into<PathBuf>, vocab_size: u64) -> ShardWriter {
        ShardWriter {
            path: path.into(),
            vocab_size,
            dtype: TokenDtype::for_vocab(vocab_size),
            tokens: Vec::new(),
            mask: Vec::new(),
            offsets: vec![0],
        }
    }

    pub fn n_tokens(&self) -> usize {
        self.tokens.len()
    }
    pub fn n_docs(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Appends one document. `mask[i]` is 1 where token `i` carries loss when predicted.
    /// Errors on an empty document, a length mismatch or an id outside the vocabulary.
    pub fn push_doc(&mut self, tokens: &[u32], mask: &[u8]) -> Result<()> {
        ensure!(!tokens.is_empty(), "{}: empty document", self.path.display());
        ensure!(
            tokens.len() == mask.len(),
            "{}: {} tokens but {} mask entries",
            self.path.display(),
            tokens.len(),
            mask.len()
        );
        if let Some(&bad) = tokens.iter().find(|&&t| t as u64 >= self.vocab_size) {
            bail!("{}: token id {bad} outside the vocabulary ({})", self.path.display(), self.vocab_size);
        }
        if let Some(&bad) = mask.iter().find(|&&m| m > 1) {
            bail!("{}: mask value {bad} (must be 0 or 1)", self.path.display());
        }
        self.tokens.extend_from_slice(tokens);
        self.mask.extend_from_slice(mask);
        self.offsets.push(self.tokens.len() as u64);
        Ok(())
    }

    /// Serialises the shard into bytes (header included).
    pub fn to_bytes(&self) -> Vec<u8> {
        let (tok, mask_off, docs_off, end) = layout(self.dtype, self.tokens.len(), self.n_docs());
        let mut buf = vec![0u8; end];
        match self.dtype {
            TokenDtype::U16 => {
                for (i, &t) in self.tokens.iter().enumerate() {
                    buf[tok + 2 * i..tok + 2 * i + 2].copy_from_slice(&(t as u16).to_le_bytes());
                }
            }
            TokenDtype::U32 => {
                for (i, &t) in self.tokens.iter().enumerate() {
                    buf[tok + 4 * i..tok + 4 * i + 4].copy_from_slice(&t.to_le_bytes());
                }
            }
        }
        buf[mask_off..mask_off + self.mask.len()].copy_from_slice(&self.mask);
        for (i, &o) in self.offsets.iter().enumerate() {
            buf[docs_off + 8 * i..docs_off + 8 * i + 8].copy_from_slice(&o.to_le_bytes());
        }
        let checksum = xxh64(&buf[HEADER_LEN..], 0);
        let h = &mut buf[..HEADER_LEN];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(self.dtype.bytes() as u32).to_le_bytes());
        h[16..24].copy_from_slice(&self.vocab_size.to_le_bytes());
        h[24..32].copy_from_slice(&(self.tokens.len() as u64).to_le_bytes());
        h[32..40].copy_from_slice(&(self.n_docs() as u64).to_le_bytes());
        h[40..48].copy_from_slice(&((end - HEADER_LEN) as u64).to_le_bytes());
        h[48..56].copy_from_slice(&checksum.to_le_bytes());
        buf
    }

    /// Writes the shard and returns its header.
    pub fn finish(self) -> Result<ShardMeta> {
        let bytes = self.to_bytes();
        let tmp = self.path.with_extension("tmp");
        {
            let f = File::create(&tmp).with_context(|| format!("creating shard {}", tmp.display()))?;
            let mut w = BufWriter::new(f);
            w.write_all(&bytes).with_context(|| format!("writing shard {}", tmp.display()))?;
            w.into_inner()
                .map_err(|e| e.into_error())
                .and_then(|f| f.sync_all())
                .with_context(|| format!("flushing shard {}", tmp.display()))?;
        }
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), self.path.display()))?;
        Ok(ShardMeta {
            dtype: self.dtype,
            vocab_size: self.vocab_size,
            n_tokens: self.tokens.len() as u64,
            n_docs: self.n_docs() as u64,
            checksum: u64::from_le_bytes(bytes[48..56].try_into().unwrap()),
        })
    }
}

/// A memory-mapped shard. Slices point into the mapping; nothing is copied.
pub struct ShardReader {
    path: PathBuf,
    mmap: Mmap,
    meta: ShardMeta,
    mask_off: usize,
    docs_off: usize,
}

/// Token ids of one document, borrowed from the mapping.
#[derive(Clone, Copy, Debug)]
pub enum Tokens<'a> {
    U16(&'a [u16]),
    U32(&'a [u32]),
}

impl<'a> Tokens<'a> {
    pub fn len(&self) -> usize {
        match self {
            Tokens::U16(t) => t.len(),
            Tokens::U32(t) => t.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    #[inline]
    pub fn get(&self, i: usize) -> u32 {
        match self {
            Tokens::U16(t) => t[i] as u32,
            Tokens::U32(t) => t[i],
        }
    }
    pub fn slice(&self, a: usize, b: usize) -> Tokens<'a> {
        match *self {
            Tokens::U16(t) => Tokens::U16(&t[a..b]),
            Tokens::U32(t) => Tokens::U32(&t[a..b]),
        }
    }
    /// Appends the ids widened to u32.
    pub fn extend_into(&self, out: &mut Vec<u32>) {
        match self {
            Tokens::U16(t) => out.extend(t.iter().map(|&x| x as u32)),
            Tokens::U32(t) => out.extend_from_slice(t),
        }
    }
    pub fn to_vec(&self) -> Vec<u32> {
        let mut v = Vec::with_capacity(self.len());
        self.extend_into(&mut v);
        v
    }
}

impl ShardReader {
    /// Maps the shard, validates the header and sizes, and verifies the payload checksum.
    pub fn open(path: impl AsRef<Path>) -> Result<ShardReader> {
        let r = Self::open_unverified(path)?;
        r.verify()?;
        Ok(r)
    }

    /// Maps the shard and validates header and sizes, without hashing the payload.
    pub fn open_unverified(path: impl AsRef<Path>) -> Result<ShardReader> {
        let path = path.as_ref().to_path_buf();
        let p = path.display();
        let file = File::open(&path).with_context(|| format!("opening shard {p}"))?;
        // SAFETY: shards are written once (temp file + rename) and never modified in place.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("mapping shard {p}"))?;
        ensure!(
            mmap.len() >= HEADER_LEN,
            "shard {p}: truncated: {} bytes, shorter than the {HEADER_LEN}-byte header",
            mmap.len()
        );
        let h = &mmap[..HEADER_LEN];
        let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap());
        ensure!(&h[0..8] == MAGIC, "shard {p}: bad magic {:?} (not a llama-cpt shard)", &h[0..8]);
        let version = u32_at(8);
        ensure!(version == VERSION, "shard {p}: unsupported version {version} (this build reads {VERSION})");
        let dtype = match u32_at(12) {
            2 => TokenDtype::U16,
            4 => TokenDtype::U32,
            d => bail!("shard {p}: bad token dtype {d} (expected 2 or 4 bytes)"),
        };
        let vocab_size = u64_at(16);
        let n_tokens = u64_at(24);
        let n_docs = u64_at(32);
        let payload_len = u64_at(40);
        let checksum = u64_at(48);
        ensure!(
            dtype == TokenDtype::for_vocab(vocab_size),
            "shard {p}: dtype {dtype:?} inconsistent with vocab size {vocab_size}"
        );
        ensure!(
            n_tokens < 1 << 40 && n_docs <= n_tokens,
            "shard {p}: implausible counts ({n_tokens} tokens, {n_docs} documents)"
        );
        let (_, mask_off, docs_off, end) = layout(dtype, n_tokens as usize, n_docs as usize);
        ensure!(
            payload_len == (end - HEADER_LEN) as u64,
            "shard {p}: header payload length {payload_len} does not match its counts ({})",
            end - HEADER_LEN
        );
        ensure!(
            mmap.len() == end,
            "shard {p}: truncated or oversized: {} bytes on disk, header says {end}",
            mmap.len()
        );
        let r = ShardReader {
            path,
            mmap,
            meta: ShardMeta { dtype, vocab_size, n_tokens, n_docs, checksum },
            mask_off,
            docs_off,
        };
        // Cheap structural check of the index (monotone, starts at 0, ends at N, no empty doc).
        let offs = r.doc_offsets();
        ensure!(
            offs.first() == Some(&0) && offs.last() == Some(&n_tokens),
            "shard {}: document index does not span the tokens",
            r.path.display()
        );
        ensure!(
            offs.windows(2).all(|w| w[0] < w[1]),
            "shard {}: document index is not strictly increasing",
            r.path.display()
        );
        Ok(r)
    }

    /// Recomputes the payload checksum.
    pub fn verify(&self) -> Result<()> {
        let mut h = Xxh64::new(0);
        h.update(&self.mmap[HEADER_LEN..]);
        let got = h.digest();
        ensure!(
            got == self.meta.checksum,
            "shard {}: checksum mismatch (header {:016x}, payload {:016x}): the file is corrupted",
            self.path.display(),
            self.meta.checksum,
            got
        );
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn meta(&self) -> &ShardMeta {
        &self.meta
    }
    pub fn n_docs(&self) -> usize {
        self.meta.n_docs as usize
    }
    pub fn n_tokens(&self) -> usize {
        self.meta.n_tokens as usize
    }

    /// All tokens.
    pub fn tokens(&self) -> Tokens<'_> {
        let n = self.n_tokens();
        let b = &self.mmap[HEADER_LEN..HEADER_LEN + n * self.meta.dtype.bytes()];
        match self.meta.dtype {
            TokenDtype::U16 => Tokens::U16(bytemuck::cast_slice(b)),
            TokenDtype::U32 => Tokens::U32(bytemuck::cast_slice(b)),
        }
    }
    /// The whole loss mask (one byte per token).
    pub fn mask(&self) -> &[u8] {
        &self.mmap[self.mask_off..self.mask_off + self.n_tokens()]
    }
    /// `n_docs + 1` token offsets.
    pub fn doc_offsets(&self) -> &[u64] {
        bytemuck::cast_slice(&self.mmap[self.docs_off..self.docs_off + (self.n_docs() + 1) * 8])
    }
    pub fn doc_range(&self, d: usize) -> std::ops::Range<usize> {
        let o = self.doc_offsets();
        o[d] as usize..o[d + 1] as usize
    }
    pub fn doc_len(&self, d: usize) -> usize {
        let o = self.doc_offsets();
        (o[d + 1] - o[d]) as usize
    }
    /// Tokens and loss mask of document `d`.
    pub fn doc(&self, d: usize) -> (Tokens<'_>, &[u8]) {
        let r = self.doc_range(d);
        (self.tokens().slice(r.start, r.end), &self.mask()[r])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_both_dtypes() {
        let dir = std::env::temp_dir().join(format!("lcpt-shard-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for vocab in [32_000u64, 69_104] {
            let path = dir.join(format!("s{vocab}.bin"));
            let mut w = ShardWriter::new(&path, vocab);
            w.push_doc(&[1, 2, 3], &[0, 1, 1]).unwrap();
            w.push_doc(&[(vocab - 1) as u32], &[1]).unwrap();
            assert!(w.push_doc(&[], &[]).is_err());
            assert!(w.push_doc(&[vocab as u32], &[1]).is_err());
            let meta = w.finish().unwrap();
            assert_eq!(meta.dtype, TokenDtype::for_vocab(vocab));
            let r = ShardReader::open(&path).unwrap();
            assert_eq!(r.n_docs(), 2);
            assert_eq!(r.doc(0).0.to_vec(), vec![1, 2, 3]);
            assert_eq!(r.doc(0).1, &[0, 1, 1]);
            assert_eq!(r.doc(1).0.to_vec(), vec![(vocab - 1) as u32]);
        }
        assert_eq!(TokenDtype::for_vocab(69_104), TokenDtype::U32);
        assert_eq!(TokenDtype::for_vocab(65_536), TokenDtype::U16);
        std::fs::remove_dir_all(&dir).ok();
    }
}
