//! Gradient buckets and shard ownership for data parallelism (index arithmetic only; the engine
//! that moves tensors is `llama_cpt::dist`, the planner that prices them is [`crate::plan`]).
//!
//! Buckets are runs of whole parameters taken in the order the backward finishes them (reverse
//! model order), closed once they hold `bucket_elems` elements, each padded to a multiple of the
//! world size. Rank `r` owns slice `r` (`padded / world` elements) of every bucket.

/// Whole parameters whose gradients are reduced together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bucket {
    /// Parameter indices, in the order their gradients become final.
    pub params: Vec<usize>,
    /// Offset of each of `params` in the bucket's flat buffer.
    pub offsets: Vec<usize>,
    /// Elements of each of `params`.
    pub sizes: Vec<usize>,
    /// Elements of all its parameters.
    pub len: usize,
    /// `len` rounded up to a multiple of the world size.
    pub padded: usize,
}

/// A piece of a parameter that one rank updates: elements `[start, start + len)` of parameter
/// `param`, found at `shard_offset` in that rank's slice of bucket `bucket` (ZeRO-1/2) or at
/// `shard_offset` in the whole bucket (ZeRO-0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub param: usize,
    pub start: usize,
    pub len: usize,
    pub bucket: usize,
    pub shard_offset: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub world: usize,
    pub buckets: Vec<Bucket>,
    /// For each parameter: its bucket and position in it (None: frozen, not in the layout).
    pub bucket_of: Vec<Option<(usize, usize)>>,
}

impl Layout {
    /// Buckets over the trainable parameters, in reverse model order (the order the backward
    /// finishes them), closed once they hold at least `bucket_elems` elements.
    pub fn new(sizes: &[usize], trainable: &[bool], bucket_elems: usize, world: usize) -> Layout {
        let mut buckets: Vec<Bucket> = Vec::new();
        let mut bucket_of = vec![None; sizes.len()];
        let mut open: Option<Bucket> = None;
        for p in (0..sizes.len()).rev().filter(|&p| trainable[p]) {
            let b = open.get_or_insert_with(|| Bucket {
                params: vec![],
                offsets: vec![],
                sizes: vec![],
                len: 0,
                padded: 0,
            });
            bucket_of[p] = Some((buckets.len(), b.params.len()));
            b.params.push(p);
            b.offsets.push(b.len);
            b.sizes.push(sizes[p]);
            b.len += sizes[p];
            if b.len >= bucket_elems {
                buckets.push(open.take().unwrap());
            }
        }
        buckets.extend(open);
        for b in &mut buckets {
            b.padded = b.len.div_ceil(world) * world;
        }
        Layout { world, buckets, bucket_of }
    }

    /// Elements every rank hands to the gradient collective per reduction (padding included).
    pub fn reduced_elems(&self) -> usize {
        self.buckets.iter().map(|b| b.padded).sum()
    }

    /// The pieces rank `rank` owns under ZeRO-1/2: slice `rank` of every bucket, cut at parameter
    /// boundaries.
    pub fn shard_pieces(&self, rank: usize) -> Vec<Piece> {
        let mut pieces = Vec::new();
        for (bi, b) in self.buckets.iter().enumerate() {
            let k = b.padded / self.world;
            let (lo, hi) = (rank * k, ((rank + 1) * k).min(b.len));
            for ((&param, &off), &n) in b.params.iter().zip(&b.offsets).zip(&b.sizes) {
                let (s, e) = (lo.max(off), hi.min(off + n));
                if s < e {
                    pieces.push(Piece { param, start: s - off, len: e - s, bucket: bi, shard_offset: s - lo });
                }
            }
        }
        pieces
    }

    /// Every trainable parameter whole, in model order (ZeRO-0: every rank updates everything).
    pub fn whole_pieces(&self, sizes: &[usize]) -> Vec<Piece> {
        (0..sizes.len())
            .filter_map(|p| {
                self.bucket_of[p].map(|(bucket, i)| Piece {
                    param: p,
                    start: 0,
                    len: sizes[p],
                    bucket,
                    shard_offset: self.buckets[bucket].offsets[i],
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_the_backward_and_shards_cover_every_element_once() {
        let sizes = [10, 3, 7, 5, 1, 9];
        let trainable = [true, true, false, true, true, true];
        for world in 1..=4 {
            let l = Layout::new(&sizes, &trainable, 8, world);
            // Reverse order, frozen parameter 2 left out, buckets closed at ≥ 8 elements.
            let order: Vec<Vec<usize>> = l.buckets.iter().map(|b| b.params.clone()).collect();
            assert_eq!(order, vec![vec![5], vec![4, 3, 1], vec![0]]);
            assert!(l.buckets.iter().all(|b| b.padded % world == 0 && b.padded >= b.len && b.padded < b.len + world));
            let mut covered: Vec<Vec<u32>> = sizes.iter().map(|&n| vec![0; n]).collect();
            for r in 0..world {
                for p in l.shard_pieces(r) {
                    assert!(p.shard_offset + p.len <= l.buckets[p.bucket].padded / world);
                    covered[p.param][p.start..p.start + p.len].iter_mut().for_each(|c| *c += 1);
                }
            }
            for (p, c) in covered.iter().enumerate() {
                let want = if trainable[p] { 1 } else { 0 };
                assert!(c.iter().all(|&x| x == want), "world {world}, param {p}: {c:?}");
            }
        }
    }
}
