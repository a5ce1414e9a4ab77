//! Cross-entropy and its gradient in one pass over the logits: the training path of the CPU
//! backend. [`cross_entropy`](crate::cross_entropy) stays the reference it is tested against.
//!
//! Why: the two-pass reference computes every exponential twice (forward for the log-sum-exp,
//! backward for the softmax) and reads the `[tokens, vocab]` logits twice. When the upstream
//! gradient is known before the backward (the loss scale seeds it), each row's exponentials can be
//! written once, into the gradient buffer, and normalised in place.
use crate::cross_entropy::count_valid;
use crate::{Real, IGNORE_INDEX};
use rayon::prelude::*;

/// Independent f64 partial sums per row: the denominator's rounding error does not grow with the
/// vocabulary as one running f32 sum's does, and the fixed lane order keeps it deterministic.
const SUM_LANES: usize = 8;

/// Mean loss over the counted targets (as [`cross_entropy_forward`](crate::cross_entropy::cross_entropy_forward))
/// and, in the same pass, `dlogits = dloss / n_valid · (softmax − onehot(target))` (0 on ignored
/// rows), as [`cross_entropy_backward`](crate::cross_entropy::cross_entropy_backward) would give.
/// Each row is independent, so the result does not depend on the thread count.
pub fn cross_entropy_with_grad<T: Real>(
    dlogits: &mut [T],
    logits: &[T],
    targets: &[i32],
    vocab: usize,
    dloss: f64,
) -> f64 {
    assert_eq!(logits.len(), targets.len() * vocab, "cross_entropy_with_grad: logits are not [targets, vocab]");
    assert_eq!(dlogits.len(), logits.len(), "cross_entropy_with_grad: dlogits and logits differ in length");
    let n = count_valid(targets);
    let scale = if n == 0 { 0.0 } else { dloss / n as f64 };
    let losses: Vec<f64> = dlogits
        .par_chunks_mut(vocab)
        .zip(logits.par_chunks(vocab))
        .zip(targets.par_iter())
        .map(|((d, row), &t)| {
            if t == IGNORE_INDEX {
                d.fill(T::ZERO);
                return 0.0;
            }
            assert!(t >= 0 && (t as usize) < vocab, "cross_entropy: target {t} outside 0..{vocab}");
            let mx = row.iter().fold(T::NEG_INFINITY, |m, &x| m.max(x));
            // Three simple passes over the row (it stays in cache) so that each one vectorises.
            for (di, &x) in d.iter_mut().zip(row) {
                *di = (x - mx).exp_vectorizable();
            }
            let mut lanes = [0.0f64; SUM_LANES];
            let mut whole = d.chunks_exact(SUM_LANES);
            for chunk in &mut whole {
                for (lane, &e) in lanes.iter_mut().zip(chunk) {
                    *lane += e.to_f64();
                }
            }
            for (lane, &e) in lanes.iter_mut().zip(whole.remainder()) {
                *lane += e.to_f64();
            }
            let sum: f64 = lanes.iter().sum();
            let lse = mx.to_f64() + sum.ln();
            let norm = T::from_f64(scale / sum);
            d.iter_mut().for_each(|di| *di *= norm);
            d[t as usize] -= T::from_f64(scale);
            lse - row[t as usize].to_f64()
        })
        .collect();
    if n == 0 {
        0.0
    } else {
        losses.iter().sum::<f64>() / n as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cross_entropy::{cross_entropy_backward, cross_entropy_forward};
    use crate::gradcheck::{assert_close, check_gradient, random_vec};

    #[test]
    fn matches_the_two_pass_reference_with_ignored_targets() {
        let vocab = 37;
        let targets = [3, IGNORE_INDEX, 36, 0, IGNORE_INDEX, 17];
        let logits: Vec<f64> = random_vec(targets.len() * vocab, 7).iter().map(|v| v * 8.0).collect();
        let mut lse = vec![0.0; targets.len()];
        let want_loss = cross_entropy_forward(&mut lse, &logits, &targets, vocab);
        let mut want = vec![f64::NAN; logits.len()];
        cross_entropy_backward(&mut want, &logits, &lse, &targets, vocab, 0.75);
        let mut d = vec![f64::NAN; logits.len()];
        let loss = cross_entropy_with_grad(&mut d, &logits, &targets, vocab, 0.75);
        assert!((loss - want_loss).abs() < 1e-12, "{loss} vs {want_loss}");
        assert_close(&d, &want, 1e-12, "fused dlogits");
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let vocab = 11;
        let targets = [4, IGNORE_INDEX, 10];
        let logits: Vec<f64> = random_vec(targets.len() * vocab, 3).iter().map(|v| v * 5.0).collect();
        let mut d = vec![f64::NAN; logits.len()];
        cross_entropy_with_grad(&mut d, &logits, &targets, vocab, 1.0);
        check_gradient("cross_entropy_with_grad", &logits, &d, &[1.0], |x| {
            let mut scratch = vec![0.0; x.len()];
            vec![cross_entropy_with_grad(&mut scratch, x, &targets, vocab, 1.0)]
        });
    }

    #[test]
    fn f32_large_vocab_agrees_with_f64_and_all_ignored_is_zero() {
        let vocab = 49_152;
        let targets = [5, 49_151];
        let logits64: Vec<f64> = random_vec(targets.len() * vocab, 11).iter().map(|v| v * 6.0).collect();
        let logits32: Vec<f32> = logits64.iter().map(|&v| v as f32).collect();
        let mut d64 = vec![0.0; logits64.len()];
        let mut d32 = vec![0.0f32; logits32.len()];
        let want = cross_entropy_with_grad(&mut d64, &logits64, &targets, vocab, 1.0);
        let got = cross_entropy_with_grad(&mut d32, &logits32, &targets, vocab, 1.0);
        assert!((got - want).abs() < 1e-5 * want.abs().max(1.0), "{got} vs {want}");
        let d32_as_64: Vec<f64> = d32.iter().map(|&v| v as f64).collect();
        assert_close(&d32_as_64, &d64, 1e-5, "f32 dlogits");
        let ignored = [IGNORE_INDEX; 2];
        let mut d = vec![f32::NAN; logits32.len()];
        assert_eq!(cross_entropy_with_grad(&mut d, &logits32, &ignored, vocab, 1.0), 0.0);
        assert!(d.iter().all(|&x| x == 0.0));
    }
}
