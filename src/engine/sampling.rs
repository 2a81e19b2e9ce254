//! How the next token is chosen from a row of logits: greedy, temperature, top-k and nucleus
//! (top-p) sampling, each sequence with its own seeded random stream.

use anyhow::{Result, bail};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy); higher values flatten the distribution.
    pub temperature: f64,
    /// Keep only the k most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches p (nucleus).
    pub top_p: Option<f64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::plain(1.0)
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::plain(0.0)
    }

    /// Sampling from the whole distribution at `temperature` (no top-k or top-p cut), as RL needs:
    /// its loss scores the same distribution the answers were drawn from.
    pub fn plain(temperature: f64) -> Self {
        Self {
            temperature,
            top_k: None,
            top_p: None,
        }
    }

    /// Rejects values that have no meaning, naming the field.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 || self.temperature > 100.0 {
            bail!("temperature must be between 0 and 100, got {}", self.temperature);
        }
        if self.top_k == Some(0) {
            bail!("top_k must be at least 1");
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            bail!("top_p must be in (0, 1], got {p}");
        }
        Ok(())
    }
}

/// A seeded sampler: the same seed and logits give the same tokens.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Buffers kept across tokens, so that a sequence's steady-state draws allocate nothing.
    weights: Vec<f32>,
    cand: Vec<(u32, f64)>,
    probs: Vec<f64>,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Result<Self> {
        params.validate()?;
        Ok(Self {
            params,
            rng: StdRng::seed_from_u64(seed),
            weights: vec![],
            cand: vec![],
            probs: vec![],
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks a token id from one row of logits. Non-finite logits are never picked (unless every
    /// logit is, when the first largest is).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / p.temperature;
        if p.top_k.is_none() && p.top_p.is_none() {
            return self.sample_plain(logits, inv_t as f32);
        }
        let cand = &mut self.cand;
        cand.clear();
        cand.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_finite())
                .map(|(i, &l)| (i as u32, l as f64 * inv_t)),
        );
        if cand.is_empty() {
            return argmax(logits);
        }
        let by_logit = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        // Only a cut needs the candidates in order; plain sampling draws in vocabulary order.
        if let Some(k) = p.top_k.filter(|&k| k < cand.len()) {
            cand.select_nth_unstable_by(k - 1, by_logit);
            cand.truncate(k);
            cand.sort_unstable_by(by_logit);
        } else if p.top_k.is_some() || p.top_p.is_some() {
            cand.sort_unstable_by(by_logit);
        }
        let max = cand.iter().map(|c| c.1).fold(f64::NEG_INFINITY, f64::max);
        let probs = &mut self.probs;
        probs.clear();
        probs.extend(cand.iter().map(|(_, l)| (l - max).exp()));
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(top_p) = p.top_p {
            let mut cum = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    cum += p;
                    cum >= top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        let mut u: f64 = self.rng.random();
        for (i, p) in probs.iter().enumerate() {
            if u < *p {
                return cand[i].0;
            }
            u -= p;
        }
        cand[probs.len() - 1].0
    }
}

impl Sampler {
    /// A draw from the whole distribution `softmax(logits / t)` (`inv_t` = 1 / t), in vocabulary
    /// order: one vectorised pass for the weights, then a scan. Non-finite logits weigh nothing.
    fn sample_plain(&mut self, logits: &[f32], inv_t: f32) -> u32 {
        let m = logits
            .iter()
            .copied()
            .filter(|l| l.is_finite())
            .fold(f32::NEG_INFINITY, f32::max);
        if m == f32::NEG_INFINITY {
            return argmax(logits);
        }
        let w = &mut self.weights;
        w.resize(logits.len(), 0.0);
        weights(w, logits, m, inv_t);
        let total: f64 = w.iter().map(|&x| x as f64).sum();
        let mut u = self.rng.random::<f64>() * total;
        let mut last = 0;
        for (i, &x) in w.iter().enumerate() {
            if x > 0.0 {
                if u < x as f64 {
                    return i as u32;
                }
                u -= x as f64;
                last = i;
            }
        }
        last as u32
    }
}

/// `w[i] = e^((l[i] - m) / t)`, 0 for a non-finite logit, with the branch-free exponential the
/// kernels use (libm's would be one opaque call per vocabulary entry and token).
fn weights(w: &mut [f32], logits: &[f32], m: f32, inv_t: f32) {
    for (w, &l) in w.iter_mut().zip(logits) {
        let e = crate::model::fused::exp((l - m) * inv_t);
        *w = if l.is_finite() { e } else { 0.0 };
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_and_top_k_1_is_greedy() {
        let logits = [0.1f32, 2.0, -1.0, 1.9];
        let mut s = Sampler::new(SamplingParams::greedy(), 0).unwrap();
        assert_eq!(s.sample(&logits), 1);
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 5.0,
                top_k: Some(1),
                top_p: None,
            },
            7,
        )
        .unwrap();
        for _ in 0..20 {
            assert_eq!(s.sample(&logits), 1);
        }
    }

    #[test]
    fn top_k_keeps_the_k_most_likely() {
        let logits = [0.0f32, 3.0, 1.0, 2.9, -4.0];
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 1.0,
                top_k: Some(2),
                top_p: None,
            },
            3,
        )
        .unwrap();
        let mut seen = [0; 5];
        for _ in 0..2000 {
            seen[s.sample(&logits) as usize] += 1;
        }
        assert_eq!(seen[0] + seen[2] + seen[4], 0, "{seen:?}");
        assert!(seen[1] > 800 && seen[3] > 700, "{seen:?}");
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.7 keeps the first two.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 1.0,
                top_k: None,
                top_p: Some(0.7),
            },
            1,
        )
        .unwrap();
        let mut seen = [0; 4];
        for _ in 0..2000 {
            seen[s.sample(&logits) as usize] += 1;
        }
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
        assert!(seen[1] > 400 && seen[0] > 1200, "{seen:?}");
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        let logits = [0.0f32, 2f32.ln(), f32::NEG_INFINITY]; // p = [1/3, 2/3, 0]
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams::default(), seed).unwrap();
            (0..3000).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        let a = draw(3);
        assert_eq!(a, draw(3));
        assert_ne!(a, draw(4));
        assert!(!a.contains(&2));
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / 3000.0;
        assert!((ones - 2.0 / 3.0).abs() < 0.03, "{ones}");
    }

    #[test]
    fn invalid_params_are_named() {
        for (p, want) in [
            (
                SamplingParams {
                    temperature: -1.0,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_k: Some(0),
                    ..Default::default()
                },
                "top_k",
            ),
            (
                SamplingParams {
                    top_p: Some(1.5),
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    temperature: f64::NAN,
                    ..Default::default()
                },
                "temperature",
            ),
        ] {
            let e = Sampler::new(p, 0).err().unwrap().to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
