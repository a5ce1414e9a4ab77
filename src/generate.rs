//! Text generation with a KV cache: greedy, temperature, top-k and top-p (nucleus) sampling.
use crate::backend::Backend;
use crate::model::{KvCache, Llama};
use anyhow::{bail, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0 = greedy (argmax, the lowest id on ties as `torch.argmax`).
    pub temperature: f64,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1 = all).
    pub top_p: f64,
    pub seed: u64,
}

impl Sampling {
    pub const GREEDY: Sampling = Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 };
}

/// Index of the largest value (the first one on ties).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// Picks the next token from `logits` (only ids below `limit` are candidates).
pub fn sample(logits: &[f32], limit: usize, s: &Sampling, rng: &mut StdRng) -> u32 {
    let logits = &logits[..limit.min(logits.len())];
    if s.temperature <= 0.0 {
        return argmax(logits) as u32;
    }
    let mut cand: Vec<(usize, f64)> = logits.iter().enumerate().map(|(i, &l)| (i, l as f64 / s.temperature)).collect();
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if s.top_k > 0 {
        cand.truncate(s.top_k);
    }
    let m = cand[0].1;
    let mut probs: Vec<f64> = cand.iter().map(|(_, l)| (l - m).exp()).collect();
    let z: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= z);
    if s.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs.iter().position(|p| {
            acc += p;
            acc >= s.top_p
        });
        let keep = keep.map_or(probs.len(), |k| k + 1);
        probs.truncate(keep);
        cand.truncate(keep);
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
    }
    let mut u: f64 = rng.gen();
    for (i, p) in probs.iter().enumerate() {
        if u < *p {
            return cand[i].0 as u32;
        }
        u -= p;
    }
    cand[probs.len() - 1].0 as u32
}

/// Continues `prompt` by up to `max_new` tokens, stopping after any of `stop` (which is kept in
/// the output). `on_token` sees each token as it is produced (streaming). Tokens at or above
/// `vocab_limit` (padding rows of a grown vocabulary) are never produced.
#[allow(clippy::too_many_arguments)]
pub fn generate<B: Backend>(
    model: &Llama<B>,
    backend: &B,
    prompt: &[u32],
    max_new: usize,
    sampling: &Sampling,
    stop: &[u32],
    vocab_limit: Option<usize>,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        bail!("generate: the prompt is empty");
    }
    let max_pos = model.config.max_position_embeddings;
    let limit = vocab_limit.unwrap_or(model.config.vocab_size).min(model.config.vocab_size);
    let mut rng = StdRng::seed_from_u64(sampling.seed);
    let mut cache = KvCache::new(model.config.num_hidden_layers);
    let mut logits = model.forward_cached(backend, prompt, &mut cache)?;
    let mut out = Vec::new();
    while out.len() < max_new && cache.len < max_pos {
        let next = sample(&logits, limit, sampling, &mut rng);
        out.push(next);
        on_token(next);
        if stop.contains(&next) || out.len() == max_new {
            break;
        }
        logits = model.forward_cached(backend, &[next], &mut cache)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Batch;
    use crate::config::LlamaConfig;
    use crate::cpu::Cpu;

    #[test]
    fn cached_decoding_matches_the_full_forward() {
        let mut m = Llama::random(&Cpu, LlamaConfig::small(60, 32, 48, 2, 4, 2, false), 3);
        for p in m.params.iter_mut().filter(|p| p.decay) {
            p.value.buf_mut().iter_mut().for_each(|x| *x *= 10.0);
        }
        let tokens: Vec<u32> = (0..12).map(|i| (i * 17 % 60) as u32).collect();
        let full = m.logits(&Cpu, &Batch::from_rows(1, 12, tokens.clone(), &[-100; 12])).unwrap();
        let mut cache = KvCache::new(2);
        let mut got = m.forward_cached(&Cpu, &tokens[..5], &mut cache).unwrap();
        for t in 5..=12 {
            let want = &full[(t - 1) * 60..t * 60];
            let err = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(err < 1e-4, "position {t}: max error {err}");
            if t < 12 {
                got = m.forward_cached(&Cpu, &tokens[t..t + 1], &mut cache).unwrap();
            }
        }
        assert_eq!(cache.len, 12);
    }

    #[test]
    fn sampling_rules() {
        let logits = [0.0f32, 3.0, 3.0, 1.0, 10.0];
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(sample(&logits, 5, &Sampling::GREEDY, &mut rng), 4);
        assert_eq!(sample(&logits, 4, &Sampling::GREEDY, &mut rng), 1, "limit excludes id 4; ties take the lowest id");
        let top1 = Sampling { temperature: 1.0, top_k: 1, top_p: 1.0, seed: 0 };
        assert!((0..20).all(|_| sample(&logits, 5, &top1, &mut rng) == 4));
        let nucleus = Sampling { temperature: 1.0, top_k: 0, top_p: 0.5, seed: 0 };
        assert!((0..20).all(|_| sample(&logits, 5, &nucleus, &mut rng) == 4), "id 4 alone holds > 0.5");
        let hot = Sampling { temperature: 100.0, top_k: 0, top_p: 1.0, seed: 0 };
        let seen: std::collections::HashSet<u32> = (0..200).map(|_| sample(&logits, 5, &hot, &mut rng)).collect();
        assert_eq!(seen.len(), 5, "a high temperature reaches every token");
    }
}
