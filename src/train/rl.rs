//! The maths of learning from preferences, as small functions tested on hand-computed cases:
//! generalised advantage estimation, the clipped PPO surrogate and value losses, KL estimators,
//! the adaptive KL controller, reward normalisation, and the DPO loss.

use anyhow::Result;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// GAE over one answer: per-token `rewards` and `values` (the critic's estimate before each
/// token). Returns (advantages, returns = advantages + values). The value after the last token
/// is 0 (the episode ends).
pub fn gae(rewards: &[f64], values: &[f64], gamma: f64, lambda: f64) -> (Vec<f64>, Vec<f64>) {
    let n = rewards.len();
    let mut adv = vec![0.0; n];
    let mut running = 0.0;
    for t in (0..n).rev() {
        let next = if t + 1 < n { values[t + 1] } else { 0.0 };
        let delta = rewards[t] + gamma * next - values[t];
        running = delta + gamma * lambda * running;
        adv[t] = running;
    }
    let ret = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, ret)
}

/// Shifts and scales to mean 0, standard deviation 1 (unchanged when constant).
pub fn whiten(x: &mut [f64]) {
    whiten_with(x, |_| Ok(())).expect("sums within one process cannot fail");
}

/// [`whiten`] over values spread across processes: `sum` replaces a slice with its element-wise
/// sum over all of them (the identity for one process), so every process uses the global mean and
/// standard deviation.
pub fn whiten_with(x: &mut [f64], mut sum: impl FnMut(&mut [f64]) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let mut totals = [x.len() as f64, x.iter().sum::<f64>()];
    sum(&mut totals)?;
    let n = totals[0];
    if n < 2.0 {
        return Ok(());
    }
    let mean = totals[1] / n;
    let mut squares = [x.iter().map(|v| (v - mean).powi(2)).sum::<f64>()];
    sum(&mut squares)?;
    let std = (squares[0] / n).sqrt();
    for v in x.iter_mut() {
        *v = if std > 1e-8 { (*v - mean) / std } else { *v - mean };
    }
    Ok(())
}

/// Per-token KL estimators of KL(policy || reference) from log-probabilities of the sampled
/// token under each (Schulman's k1, k2, k3). k1 is unbiased but can be negative; k3 is unbiased
/// and never negative; k2 is biased, low variance, never negative.
pub fn kl_k1(logp: f64, logp_ref: f64) -> f64 {
    logp - logp_ref
}

pub fn kl_k2(logp: f64, logp_ref: f64) -> f64 {
    0.5 * (logp - logp_ref).powi(2)
}

pub fn kl_k3(logp: f64, logp_ref: f64) -> f64 {
    let r = logp_ref - logp;
    r.exp() - 1.0 - r
}

/// The adaptive KL controller (Ziegler et al. 2019): moves the KL coefficient so the measured
/// KL tracks a target, by at most 20% of the error per horizon.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KlController {
    pub coef: f64,
    /// `None` keeps the coefficient fixed.
    pub target: Option<f64>,
    pub horizon: f64,
}

impl KlController {
    /// Updates the coefficient after `n` samples with mean KL `kl`.
    pub fn update(&mut self, kl: f64, n: usize) {
        if let Some(target) = self.target {
            let error = (kl / target - 1.0).clamp(-0.2, 0.2);
            self.coef *= 1.0 + error * n as f64 / self.horizon;
        }
    }
}

/// Running mean and variance (Welford), to normalise rewards across steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RunningStats {
    pub count: f64,
    pub mean: f64,
    pub m2: f64,
}

impl RunningStats {
    pub fn push(&mut self, x: f64) {
        self.count += 1.0;
        let d = x - self.mean;
        self.mean += d / self.count;
        self.m2 += d * (x - self.mean);
    }

    pub fn std(&self) -> f64 {
        if self.count < 2.0 {
            1.0
        } else {
            (self.m2 / (self.count - 1.0)).sqrt().max(1e-6)
        }
    }

    /// `(x - mean) / std`, clipped to `±clip`.
    pub fn normalise(&self, x: f64, clip: f64) -> f64 {
        ((x - self.mean) / self.std()).clamp(-clip, clip)
    }
}

/// Per-prompt baseline: each score minus the mean score of the answers to the same prompt (`groups[i]`
/// names the prompt of answer `i`; only answers with `counted[i]` enter the means). Removes the prompt's
/// difficulty from the reward, so a prompt whose answers all score alike carries no signal (RLOO/GRPO-style
/// variance reduction, used under the critic's GAE).
pub fn group_centred(scores: &[f64], groups: &[usize], counted: &[bool]) -> Vec<f64> {
    let mut sums: std::collections::HashMap<usize, (f64, f64)> = std::collections::HashMap::new();
    for ((s, g), c) in scores.iter().zip(groups).zip(counted) {
        if *c {
            let e = sums.entry(*g).or_default();
            e.0 += s;
            e.1 += 1.0;
        }
    }
    scores
        .iter()
        .zip(groups)
        .map(|(s, g)| sums.get(g).map_or(0.0, |(sum, n)| s - sum / n))
        .collect()
}

/// The mean of `x` over the positions where `mask` is 1.
pub fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let total = mask.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?.max(1.0);
    Ok(((x * mask)?.sum_all()? / total)?)
}

/// The clipped PPO surrogate `-min(ratio A, clip(ratio, 1-e, 1+e) A)`, averaged over the mask,
/// and the fraction of tokens where clipping was active.
pub fn policy_loss(logp: &Tensor, logp_old: &Tensor, adv: &Tensor, mask: &Tensor, clip: f64) -> Result<(Tensor, f64)> {
    let ratio = (logp - logp_old)?.exp()?;
    let unclipped = (&ratio * adv)?;
    let clipped = (ratio.clamp(1.0 - clip, 1.0 + clip)? * adv)?;
    let loss = masked_mean(&unclipped.minimum(&clipped)?.neg()?, mask)?;
    let active = unclipped.gt(&clipped)?.to_dtype(DType::F32)?;
    let frac = masked_mean(&active, &mask.to_dtype(DType::F32)?)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    Ok((loss, frac))
}

/// The clipped value loss `0.5 max((v - R)^2, (v_old + clip(v - v_old, -c, c) - R)^2)`.
pub fn value_loss(values: &Tensor, old: &Tensor, returns: &Tensor, mask: &Tensor, clip: f64) -> Result<Tensor> {
    let plain = (values - returns)?.sqr()?;
    let clipped = ((old + (values - old)?.clamp(-clip, clip)?)? - returns)?.sqr()?;
    Ok((masked_mean(&plain.maximum(&clipped)?, mask)? * 0.5)?)
}

/// The DPO loss `-log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r)))` over answer
/// log-likelihoods `[N]`, averaged, with the implicit reward margin for logging.
pub fn dpo_loss(pi_c: &Tensor, pi_r: &Tensor, ref_c: &Tensor, ref_r: &Tensor, beta: f64) -> Result<(Tensor, Tensor)> {
    let margin = (((pi_c - ref_c)? - (pi_r - ref_r)?)? * beta)?;
    Ok((neg_log_sigmoid(&margin)?.mean_all()?, margin))
}

/// The mean per-token negative log-likelihood of answers, from their summed log-likelihoods `[N]` and
/// token counts `[N]`: the term RPO adds to the DPO loss for the chosen answers.
pub fn answer_nll(logprob_sums: &Tensor, lengths: &Tensor) -> Result<Tensor> {
    Ok((logprob_sums.sum_all()?.neg()? / lengths.sum_all()?)?)
}

/// `-log sigmoid(x)` computed stably as `relu(-x) + log(1 + exp(-|x|))`.
pub fn neg_log_sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    x.neg()?.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f64]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn gae_matches_hand_computation() {
        // gamma 1, lambda 0.5: deltas d2 = 1 - 0.5, d1 = 0 + 0.5 - 0.2, d0 = 0 + 0.2 - 0.1.
        let (adv, ret) = gae(&[0.0, 0.0, 1.0], &[0.1, 0.2, 0.5], 1.0, 0.5);
        let want = [0.1 + 0.5 * (0.3 + 0.5 * 0.5), 0.3 + 0.5 * 0.5, 0.5];
        for (a, w) in adv.iter().zip(want) {
            assert!((a - w).abs() < 1e-12, "{adv:?}");
        }
        assert!((ret[0] - (want[0] + 0.1)).abs() < 1e-12);
        // lambda 1, gamma 1: advantage = sum of future rewards - value.
        let (adv, _) = gae(&[1.0, 2.0], &[0.5, 0.25], 1.0, 1.0);
        assert!((adv[0] - 2.5).abs() < 1e-12 && (adv[1] - 1.75).abs() < 1e-12);
    }

    #[test]
    fn kl_estimators_agree_on_hand_values() {
        let (lp, lq) = (-1.0f64, -2.0f64);
        assert_eq!(kl_k1(lp, lq), 1.0);
        assert_eq!(kl_k2(lp, lq), 0.5);
        assert!((kl_k3(lp, lq) - ((-1f64).exp() - 1.0 + 1.0)).abs() < 1e-12);
        assert!(kl_k1(lq, lp) < 0.0 && kl_k3(lq, lp) >= 0.0 && kl_k3(lp, lp) == 0.0);
    }

    #[test]
    fn kl_controller_moves_toward_the_target_by_at_most_20_percent() {
        let mut c = KlController {
            coef: 0.1,
            target: Some(1.0),
            horizon: 100.0,
        };
        c.update(10.0, 100); // error clipped to +0.2
        assert!((c.coef - 0.12).abs() < 1e-12);
        c.update(0.9, 50); // error -0.1 over half a horizon
        assert!((c.coef - 0.12 * 0.95).abs() < 1e-12);
        let mut fixed = KlController {
            coef: 0.1,
            target: None,
            horizon: 100.0,
        };
        fixed.update(10.0, 100);
        assert_eq!(fixed.coef, 0.1);
    }

    #[test]
    fn clipped_surrogate_matches_hand_computation() {
        // ratios e^0.5 = 1.65 (clipped to 1.2 for A > 0) and e^-0.5 = 0.61 (clipped to 0.8 for A < 0,
        // where min keeps the unclipped, more pessimistic 0.61 * -1... i.e. -0.8 vs -0.61 -> -0.8).
        let lp = t(&[0.5, -0.5, 0.0]);
        let old = t(&[0.0, 0.0, 0.0]);
        let adv = t(&[1.0, -1.0, 2.0]);
        let mask = t(&[1.0, 1.0, 0.0]);
        let (loss, frac) = policy_loss(&lp, &old, &adv, &mask, 0.2).unwrap();
        let want = -(1.2 + -0.8) / 2.0;
        assert!((loss.to_scalar::<f64>().unwrap() - want).abs() < 1e-9);
        assert_eq!(frac, 1.0);
        let (loss, frac) = policy_loss(&old, &old, &adv, &mask, 0.2).unwrap();
        assert!((loss.to_scalar::<f64>().unwrap() - 0.0).abs() < 1e-12 && frac == 0.0);
    }

    #[test]
    fn clipped_value_loss_takes_the_larger_error() {
        // v moved from 0 to 1 with clip 0.2: clipped value 0.2; return 0 -> max(1, 0.04) = 1.
        // v moved from 0 to 0.1 (inside the clip): both equal (0.1 - 1)^2 = 0.81.
        let loss = value_loss(&t(&[1.0, 0.1]), &t(&[0.0, 0.0]), &t(&[0.0, 1.0]), &t(&[1.0, 1.0]), 0.2).unwrap();
        assert!((loss.to_scalar::<f64>().unwrap() - 0.5 * (1.0 + 0.81) / 2.0).abs() < 1e-9);
    }

    #[test]
    fn dpo_loss_matches_hand_computation() {
        let (loss, margin) = dpo_loss(&t(&[-1.0]), &t(&[-3.0]), &t(&[-2.0]), &t(&[-2.0]), 0.5).unwrap();
        // margin = 0.5 * ((-1 + 2) - (-3 + 2)) = 1; loss = -ln sigmoid(1) = ln(1 + e^-1).
        assert!((margin.to_vec1::<f64>().unwrap()[0] - 1.0).abs() < 1e-12);
        assert!((loss.to_scalar::<f64>().unwrap() - (1.0 + (-1f64).exp()).ln()).abs() < 1e-12);
    }

    #[test]
    fn running_stats_normalise_and_clip() {
        let mut s = RunningStats::default();
        for x in [1.0, 2.0, 3.0, 4.0] {
            s.push(x);
        }
        assert!((s.mean - 2.5).abs() < 1e-12);
        assert!((s.std() - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(s.normalise(1000.0, 5.0), 5.0);
        let mut w = vec![1.0, 3.0];
        whiten(&mut w);
        assert_eq!(w, vec![-1.0, 1.0]);
    }

    #[test]
    fn group_centring_subtracts_each_prompts_mean() {
        // Prompt 0: scores 1, 0, 0 (mean 1/3); prompt 1: 1, 1 (no signal); the uncounted 5 is left out of
        // prompt 0's mean and centred on it.
        let c = group_centred(
            &[1.0, 0.0, 0.0, 1.0, 1.0, 5.0],
            &[0, 0, 0, 1, 1, 0],
            &[true, true, true, true, true, false],
        );
        let want = [2.0 / 3.0, -1.0 / 3.0, -1.0 / 3.0, 0.0, 0.0, 5.0 - 1.0 / 3.0];
        for (a, b) in c.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{c:?}");
        }
    }

    #[test]
    fn answer_nll_is_per_token_over_the_batch() {
        // Two answers of 1 and 3 tokens with log-likelihoods -2 and -4: 6 nats over 4 tokens.
        let nll = answer_nll(&t(&[-2.0, -4.0]), &t(&[1.0, 3.0])).unwrap();
        assert!((nll.to_scalar::<f64>().unwrap() - 1.5).abs() < 1e-12);
    }
}
