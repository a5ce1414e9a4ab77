//! Embedding lookup: `out[t] = table[ids[t]]`.
use crate::Real;

/// `out[t, :] = table[ids[t], :]` with rows of `dim` values.
pub fn embedding_forward<T: Real>(out: &mut [T], table: &[T], ids: &[u32], dim: usize) {
    assert_eq!(out.len(), ids.len() * dim);
    let vocab = table.len() / dim;
    for (row, &id) in out.chunks_exact_mut(dim).zip(ids) {
        let id = id as usize;
        assert!(id < vocab, "embedding: token id {id} >= vocab {vocab}");
        row.copy_from_slice(&table[id * dim..(id + 1) * dim]);
    }
}

/// `dtable[ids[t], :] += dout[t, :]`, in token order (deterministic; repeated ids accumulate).
pub fn embedding_backward<T: Real>(dtable: &mut [T], dout: &[T], ids: &[u32], dim: usize) {
    assert_eq!(dout.len(), ids.len() * dim);
    for (row, &id) in dout.chunks_exact(dim).zip(ids) {
        let id = id as usize;
        for (d, &g) in dtable[id * dim..(id + 1) * dim].iter_mut().zip(row) {
            *d += g;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_gradient, random_vec};

    #[test]
    fn lookup_and_gradient_with_repeated_ids_and_large_vocab() {
        let dim = 3;
        let vocab = 70_000; // above u16: ids are u32 everywhere
        let table = random_vec(vocab * dim, 1);
        let ids = [69_999u32, 5, 5, 0, 65_536];
        let mut out = vec![f64::NAN; ids.len() * dim];
        embedding_forward(&mut out, &table, &ids, dim);
        assert_eq!(&out[0..3], &table[69_999 * 3..70_000 * 3]);
        assert_eq!(&out[12..15], &table[65_536 * 3..65_537 * 3]);
        let dy = random_vec(ids.len() * dim, 2);
        let mut dtable = vec![0.0; vocab * dim];
        embedding_backward(&mut dtable, &dy, &ids, dim);
        assert_eq!(dtable[5 * 3], dy[3] + dy[6]);
        // Finite differences on a small table (the check walks every coordinate).
        let small = random_vec(6 * dim, 3);
        let ids = [1u32, 4, 1];
        let dy = random_vec(ids.len() * dim, 4);
        let mut d = vec![0.0; small.len()];
        embedding_backward(&mut d, &dy, &ids, dim);
        check_gradient("embedding", &small, &d, &dy, |t| {
            let mut o = vec![0.0; ids.len() * dim];
            embedding_forward(&mut o, t, &ids, dim);
            o
        });
    }
}
