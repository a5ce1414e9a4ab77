//! Causal self-attention with grouped-query heads and per-document masking, written as the
//! FlashAttention-2 algorithm so that it is the oracle of the GPU kernel:
//! - forward: query blocks against key blocks with an online softmax (running max `m` and sum `l`
//!   per row), output normalised once at the end, `lse = m + ln l` saved for the backward;
//! - backward: `Dᵢ = dOᵢ·Oᵢ`, probabilities recomputed from `lse` block by block, never an S×S
//!   matrix; work is split by key/value head so that dK and dV need no atomics.
//!
//! Shapes: `q` is `[tokens, heads, head_dim]`, `k`/`v` are `[tokens, kv_heads, head_dim]`, query
//! head `h` reads key/value head `h / (heads / kv_heads)` (transformers' `repeat_kv` order) without
//! copying. Documents are given by `cu_seqlens = [0, len₀, len₀+len₁, …, tokens]`: a token attends to
//! itself and earlier tokens of its own document only.
use crate::real::{axpy, dot};
use crate::Real;
use rayon::prelude::*;

/// Block sizes of the CPU reference (rows of Q and of K/V per tile).
pub const BLOCK_Q: usize = 64;
pub const BLOCK_K: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    fn group(&self) -> usize {
        assert!(
            self.kv_heads > 0 && self.heads.is_multiple_of(self.kv_heads),
            "attention: kv_heads {} must divide heads {}",
            self.kv_heads,
            self.heads
        );
        self.heads / self.kv_heads
    }
    fn scale<T: Real>(&self) -> T {
        T::from_f64(1.0 / (self.head_dim as f64).sqrt())
    }
}

/// Checks `cu_seqlens` against the token count and returns the documents as ranges.
pub fn documents(cu_seqlens: &[u32], tokens: usize) -> Vec<(usize, usize)> {
    assert!(cu_seqlens.len() >= 2 && cu_seqlens[0] == 0, "attention: cu_seqlens must start at 0");
    assert_eq!(*cu_seqlens.last().unwrap() as usize, tokens, "attention: cu_seqlens must end at the token count");
    cu_seqlens
        .windows(2)
        .map(|w| {
            assert!(w[0] <= w[1], "attention: cu_seqlens must not decrease");
            (w[0] as usize, w[1] as usize)
        })
        .filter(|(a, b)| a < b)
        .collect()
}

/// Pointer that parallel tasks write through at disjoint offsets.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}
impl<T> Shared<T> {
    /// SAFETY: callers guarantee that no two tasks touch the same `[offset, offset + len)`.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, offset: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(offset), len)
    }
}

/// Forward with the default blocks. `out` is `[tokens, heads, head_dim]`, `lse` is `[tokens, heads]`.
pub fn attention_forward<T: Real>(
    out: &mut [T],
    lse: &mut [T],
    q: &[T],
    k: &[T],
    v: &[T],
    cu_seqlens: &[u32],
    shape: AttnShape,
) {
    attention_forward_blocked(out, lse, q, k, v, cu_seqlens, shape, BLOCK_Q, BLOCK_K)
}

#[allow(clippy::too_many_arguments)]
pub fn attention_forward_blocked<T: Real>(
    out: &mut [T],
    lse: &mut [T],
    q: &[T],
    k: &[T],
    v: &[T],
    cu_seqlens: &[u32],
    shape: AttnShape,
    block_q: usize,
    block_k: usize,
) {
    let AttnShape { heads, kv_heads, head_dim: d } = shape;
    let group = shape.group();
    let tokens = q.len() / (heads * d);
    assert_eq!(q.len(), tokens * heads * d);
    assert_eq!(k.len(), tokens * kv_heads * d);
    assert_eq!(v.len(), k.len());
    assert_eq!(out.len(), q.len());
    assert_eq!(lse.len(), tokens * heads);
    let scale: T = shape.scale();
    let docs = documents(cu_seqlens, tokens);
    // One task per (document, query head, query block).
    let tasks: Vec<(usize, usize, usize, usize)> = docs
        .iter()
        .flat_map(|&(s0, s1)| {
            (0..heads).flat_map(move |h| (s0..s1).step_by(block_q).map(move |i0| (s0, h, i0, (i0 + block_q).min(s1))))
        })
        .collect();
    let (out_p, lse_p) = (Shared(out.as_mut_ptr()), Shared(lse.as_mut_ptr()));
    tasks.par_iter().for_each(|&(s0, h, i0, i1)| {
        let kvh = h / group;
        let rows = i1 - i0;
        let mut m = vec![T::NEG_INFINITY; rows];
        let mut l = vec![T::ZERO; rows];
        let mut acc = vec![T::ZERO; rows * d];
        let mut s = vec![T::ZERO; block_k];
        // Causal: this query block needs keys s0..i1 only.
        for j0 in (s0..i1).step_by(block_k) {
            let j1 = (j0 + block_k).min(i1);
            for r in 0..rows {
                let i = i0 + r;
                let jend = j1.min(i + 1);
                if jend <= j0 {
                    continue;
                }
                let qi = &q[(i * heads + h) * d..][..d];
                let mut row_max = T::NEG_INFINITY;
                for j in j0..jend {
                    let kj = &k[(j * kv_heads + kvh) * d..][..d];
                    let sv = dot(qi, kj) * scale;
                    s[j - j0] = sv;
                    row_max = row_max.max(sv);
                }
                let m_new = m[r].max(row_max);
                let alpha = (m[r] - m_new).exp();
                let a = &mut acc[r * d..(r + 1) * d];
                for x in a.iter_mut() {
                    *x *= alpha;
                }
                let mut sum = T::ZERO;
                for j in j0..jend {
                    let p = (s[j - j0] - m_new).exp();
                    sum += p;
                    axpy(p, &v[(j * kv_heads + kvh) * d..][..d], a);
                }
                l[r] = l[r] * alpha + sum;
                m[r] = m_new;
            }
        }
        for r in 0..rows {
            let i = i0 + r;
            // SAFETY: (i, h) rows are owned by exactly one task.
            let o = unsafe { out_p.slice((i * heads + h) * d, d) };
            let inv = T::ONE / l[r];
            for (oi, &ai) in o.iter_mut().zip(&acc[r * d..(r + 1) * d]) {
                *oi = ai * inv;
            }
            unsafe { lse_p.slice(i * heads + h, 1)[0] = m[r] + l[r].ln() };
        }
    });
}

/// Backward with the default blocks: writes `dq`, `dk`, `dv` (overwritten).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: Real>(
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    dout: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    lse: &[T],
    cu_seqlens: &[u32],
    shape: AttnShape,
) {
    attention_backward_blocked(dq, dk, dv, dout, q, k, v, out, lse, cu_seqlens, shape, BLOCK_K)
}

#[allow(clippy::too_many_arguments)]
pub fn attention_backward_blocked<T: Real>(
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    dout: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    lse: &[T],
    cu_seqlens: &[u32],
    shape: AttnShape,
    block_k: usize,
) {
    let AttnShape { heads, kv_heads, head_dim: d } = shape;
    let group = shape.group();
    let tokens = q.len() / (heads * d);
    assert!(dq.len() == q.len() && dout.len() == q.len() && out.len() == q.len());
    assert!(dk.len() == k.len() && dv.len() == v.len() && k.len() == tokens * kv_heads * d);
    assert_eq!(lse.len(), tokens * heads);
    let scale: T = shape.scale();
    let docs = documents(cu_seqlens, tokens);
    // D_i = dO_i · O_i for every (token, head).
    let mut delta = vec![T::ZERO; tokens * heads];
    delta.par_iter_mut().enumerate().for_each(|(ih, dlt)| {
        *dlt = dot(&dout[ih * d..(ih + 1) * d], &out[ih * d..(ih + 1) * d]);
    });
    // Tokens outside every document (none, by construction) would keep zero gradients.
    dq.fill(T::ZERO);
    dk.fill(T::ZERO);
    dv.fill(T::ZERO);
    let tasks: Vec<(usize, usize, usize)> =
        docs.iter().flat_map(|&(s0, s1)| (0..kv_heads).map(move |kvh| (s0, s1, kvh))).collect();
    let (dq_p, dk_p, dv_p) = (Shared(dq.as_mut_ptr()), Shared(dk.as_mut_ptr()), Shared(dv.as_mut_ptr()));
    tasks.par_iter().for_each(|&(s0, s1, kvh)| {
        for j0 in (s0..s1).step_by(block_k) {
            let j1 = (j0 + block_k).min(s1);
            for h in kvh * group..(kvh + 1) * group {
                // Causal: rows before the block see none of its keys.
                for i in j0..s1 {
                    let qi = &q[(i * heads + h) * d..][..d];
                    let doi = &dout[(i * heads + h) * d..][..d];
                    let (lse_i, delta_i) = (lse[i * heads + h], delta[i * heads + h]);
                    // SAFETY: (i, h) for h in this kv head's group and i in this document belongs
                    // to this task alone; likewise (j, kvh) for dk and dv.
                    let dqi = unsafe { dq_p.slice((i * heads + h) * d, d) };
                    for j in j0..j1.min(i + 1) {
                        let kj = &k[(j * kv_heads + kvh) * d..][..d];
                        let vj = &v[(j * kv_heads + kvh) * d..][..d];
                        let p = (dot(qi, kj) * scale - lse_i).exp();
                        let dp = dot(doi, vj);
                        let ds = p * (dp - delta_i) * scale;
                        axpy(p, doi, unsafe { dv_p.slice((j * kv_heads + kvh) * d, d) });
                        axpy(ds, kj, dqi);
                        axpy(ds, qi, unsafe { dk_p.slice((j * kv_heads + kvh) * d, d) });
                    }
                }
            }
        }
    });
}

/// Attention of `n` new queries against a cache of `t ≥ n` keys/values of one sequence (KV-cached
/// decoding): query `i` sits at position `t − n + i` and attends to keys `0..=t − n + i`. The same
/// math as [`attention_forward`] on the whole sequence, restricted to its last `n` rows.
pub fn attention_decode<T: Real>(out: &mut [T], q: &[T], k: &[T], v: &[T], shape: AttnShape) {
    let AttnShape { heads, kv_heads, head_dim: d } = shape;
    let group = shape.group();
    let n = q.len() / (heads * d);
    let t = k.len() / (kv_heads * d);
    assert!(n <= t && out.len() == q.len() && v.len() == k.len());
    let scale: T = shape.scale();
    out.par_chunks_mut(d).enumerate().for_each(|(ih, o)| {
        let (i, h) = (ih / heads, ih % heads);
        let kvh = h / group;
        let qi = &q[ih * d..(ih + 1) * d];
        let last = t - n + i;
        let s: Vec<T> = (0..=last).map(|j| dot(qi, &k[(j * kv_heads + kvh) * d..][..d]) * scale).collect();
        let m = s.iter().fold(T::NEG_INFINITY, |a, &b| a.max(b));
        o.fill(T::ZERO);
        let mut sum = T::ZERO;
        for (j, &sj) in s.iter().enumerate() {
            let p = (sj - m).exp();
            sum += p;
            axpy(p, &v[(j * kv_heads + kvh) * d..][..d], o);
        }
        let inv = T::ONE / sum;
        o.iter_mut().for_each(|x| *x *= inv);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{assert_close, check_gradient, random_vec};

    /// Dense reference: explicit masked softmax over all keys.
    fn naive(q: &[f64], k: &[f64], v: &[f64], cu: &[u32], s: AttnShape) -> Vec<f64> {
        let (hq, hk, d) = (s.heads, s.kv_heads, s.head_dim);
        let t = q.len() / (hq * d);
        let mut out = vec![0.0; q.len()];
        let doc_of = |i: usize| cu.windows(2).position(|w| (w[0] as usize) <= i && i < w[1] as usize).unwrap();
        for i in 0..t {
            for h in 0..hq {
                let kvh = h / (hq / hk);
                let keys: Vec<usize> = (0..=i).filter(|&j| doc_of(j) == doc_of(i)).collect();
                let sc: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        (0..d).map(|x| q[(i * hq + h) * d + x] * k[(j * hk + kvh) * d + x]).sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
                for (n, &j) in keys.iter().enumerate() {
                    let p = (sc[n] - mx).exp() / z;
                    for x in 0..d {
                        out[(i * hq + h) * d + x] += p * v[(j * hk + kvh) * d + x];
                    }
                }
            }
        }
        out
    }

    fn cases() -> Vec<(AttnShape, Vec<u32>)> {
        let sh = |heads, kv_heads, head_dim| AttnShape { heads, kv_heads, head_dim };
        vec![
            (sh(2, 2, 4), vec![0, 13]),          // MHA, one odd-length document
            (sh(4, 2, 6), vec![0, 5, 6, 11]),    // GQA 2:1, head_dim 6, a one-token document
            (sh(4, 1, 3), vec![0, 1, 2, 3, 12]), // GQA 4:1, head_dim 3, documents of length 1
            (sh(1, 1, 5), vec![0, 1]),           // a single token
            (sh(4, 4, 8), vec![0, 9, 9, 17]),    // an empty document in the list
        ]
    }

    #[test]
    fn blocked_forward_matches_dense_softmax() {
        for (shape, cu) in cases() {
            let t = *cu.last().unwrap() as usize;
            let q = random_vec(t * shape.heads * shape.head_dim, 1);
            let k = random_vec(t * shape.kv_heads * shape.head_dim, 2);
            let v = random_vec(k.len(), 3);
            let want = naive(&q, &k, &v, &cu, shape);
            for (bq, bk) in [(4, 4), (3, 5), (64, 64)] {
                let mut out = vec![f64::NAN; q.len()];
                let mut lse = vec![f64::NAN; t * shape.heads];
                attention_forward_blocked(&mut out, &mut lse, &q, &k, &v, &cu, shape, bq, bk);
                assert_close(&out, &want, 1e-12, &format!("attention {shape:?} {cu:?} blocks {bq}x{bk}"));
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        for (shape, cu) in cases() {
            let t = *cu.last().unwrap() as usize;
            let q = random_vec(t * shape.heads * shape.head_dim, 4);
            let k = random_vec(t * shape.kv_heads * shape.head_dim, 5);
            let v = random_vec(k.len(), 6);
            let dy = random_vec(q.len(), 7);
            let fwd = |q: &[f64], k: &[f64], v: &[f64]| {
                let mut out = vec![0.0; q.len()];
                let mut lse = vec![0.0; t * shape.heads];
                attention_forward_blocked(&mut out, &mut lse, q, k, v, &cu, shape, 4, 4);
                (out, lse)
            };
            let (out, lse) = fwd(&q, &k, &v);
            let (mut dq, mut dk, mut dv) = (vec![f64::NAN; q.len()], vec![f64::NAN; k.len()], vec![f64::NAN; v.len()]);
            attention_backward_blocked(&mut dq, &mut dk, &mut dv, &dy, &q, &k, &v, &out, &lse, &cu, shape, 3);
            let what = format!("{shape:?} {cu:?}");
            check_gradient(&format!("attention dq {what}"), &q, &dq, &dy, |q| fwd(q, &k, &v).0);
            check_gradient(&format!("attention dk {what}"), &k, &dk, &dy, |k| fwd(&q, k, &v).0);
            check_gradient(&format!("attention dv {what}"), &v, &dv, &dy, |v| fwd(&q, &k, v).0);
        }
    }

    #[test]
    fn decode_matches_the_last_rows_of_full_attention() {
        let shape = AttnShape { heads: 4, kv_heads: 2, head_dim: 6 };
        let t = 11;
        let q = random_vec(t * 4 * 6, 8);
        let k = random_vec(t * 2 * 6, 9);
        let v = random_vec(k.len(), 10);
        let (mut full, mut lse) = (vec![0.0; q.len()], vec![0.0; t * 4]);
        attention_forward(&mut full, &mut lse, &q, &k, &v, &[0, t as u32], shape);
        for n in [1, 3, t] {
            let mut out = vec![f64::NAN; n * 4 * 6];
            attention_decode(&mut out, &q[(t - n) * 24..], &k, &v, shape);
            assert_close(&out, &full[(t - n) * 24..], 1e-12, &format!("decode n={n}"));
        }
    }

    #[test]
    fn lse_is_log_sum_exp_of_scores() {
        let shape = AttnShape { heads: 1, kv_heads: 1, head_dim: 2 };
        let q = [1.0f64, 0.0, 0.5, 2.0];
        let k = [0.3f64, -1.0, 2.0, 1.0];
        let v = [0.0f64; 4];
        let (mut out, mut lse) = ([0.0; 4], [0.0; 2]);
        attention_forward(&mut out, &mut lse, &q, &k, &v, &[0, 2], shape);
        let s = 1.0 / 2f64.sqrt();
        assert!((lse[0] - 0.3 * s).abs() < 1e-14);
        let (a, b) = ((0.5 * 0.3 - 2.0) * s, (0.5 * 2.0 + 2.0) * s);
        assert!((lse[1] - (a.exp() + b.exp()).ln()).abs() < 1e-14);
    }
}
