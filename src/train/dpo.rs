//! Direct preference optimisation (Rafailov et al. 2023): the policy learns from preference
//! pairs directly, with the frozen SFT model as reference and no reward model or sampling.

use std::path::PathBuf;

use anyhow::{Result, ensure};
use candle_core::{DType, Tensor};
use serde_json::Value;

use crate::chat::ChatTemplate;
use crate::checkpoint::Checkpoint;
use crate::model::Gpt;
use crate::tokenizer::Tokenizer;
use crate::train::ParamSet;
use crate::train::answers::{answer_logprobs, batch};
use crate::train::order::{EpochOrder, hold_out};
use crate::train::reward::{fitting_prompt, load_preferences};
use crate::train::rl::{answer_nll, dpo_loss};
use crate::train::trainer::{self, EvalReport, Init, Objective, TrainConfig, TrainOutcome};

/// `talaria dpo` settings.
#[derive(Debug, Clone)]
pub struct DpoConfig {
    /// The SFT checkpoint: the starting policy and the frozen reference.
    pub policy: PathBuf,
    pub data: Vec<PathBuf>,
    /// Held-out preferences; when empty, `val_fraction` of the prompts of `data` are held out.
    pub val_data: Vec<PathBuf>,
    pub val_fraction: f64,
    pub beta: f64,
    /// Weight of the chosen answers' mean token negative log-likelihood added to the DPO loss (RPO, Pang et
    /// al. 2024; `rpo_alpha` in TRL). Plain DPO can lower the chosen answers' likelihood along with the
    /// rejected ones; this term holds it up. 0 is plain DPO.
    pub nll_coef: f64,
    /// Preference pairs per micro-batch.
    pub batch_size: usize,
    pub train: TrainConfig,
}

/// A rendered (prompt + chosen, prompt + rejected) pair.
struct Pair {
    chosen: Vec<u32>,
    rejected: Vec<u32>,
    prompt_len: usize,
}

struct Dpo {
    reference: Gpt,
    train: Vec<Pair>,
    val: Vec<Pair>,
    order: EpochOrder,
    beta: f64,
    nll_coef: f64,
    batch: usize,
    pad: u32,
}

impl Dpo {
    /// Summed answer log-likelihoods `[2N]` (chosen first, then rejected) under `model`, and the
    /// answer token counts `[2N]`.
    fn answer_ll(&self, model: &Gpt, pairs: &[&Pair]) -> Result<(Tensor, Tensor)> {
        let seqs: Vec<(&[u32], usize)> = pairs
            .iter()
            .map(|p| (p.chosen.as_slice(), p.prompt_len))
            .chain(pairs.iter().map(|p| (p.rejected.as_slice(), p.prompt_len)))
            .collect();
        let b = batch(&seqs, self.pad, model.device())?;
        let lp = answer_logprobs(model, &b, 1.0)?;
        Ok(((lp * &b.mask)?.sum(1)?, b.mask.sum(1)?))
    }

    /// The loss (DPO plus the weighted NLL of the chosen answers) and the DPO margins `[N]`.
    fn loss_on(&self, model: &Gpt, pairs: &[&Pair]) -> Result<(Tensor, Tensor)> {
        let n = pairs.len();
        let (pi, lens) = self.answer_ll(model, pairs)?;
        let rf = self.answer_ll(&self.reference, pairs)?.0.detach();
        let pi_c = pi.narrow(0, 0, n)?;
        let (loss, margin) = dpo_loss(
            &pi_c,
            &pi.narrow(0, n, n)?,
            &rf.narrow(0, 0, n)?,
            &rf.narrow(0, n, n)?,
            self.beta,
        )?;
        if self.nll_coef == 0.0 {
            return Ok((loss, margin));
        }
        let nll = answer_nll(&pi_c, &lens.narrow(0, 0, n)?)?;
        Ok(((loss + (nll * self.nll_coef)?)?, margin))
    }
}

impl Objective for Dpo {
    type Batch = Vec<usize>;

    fn stage(&self) -> &'static str {
        "dpo"
    }

    fn next(&mut self) -> Result<Vec<usize>> {
        Ok((0..self.batch).map(|_| self.order.next()).collect())
    }

    fn loss(&self, idx: &Vec<usize>, model: &Gpt, _params: &ParamSet) -> Result<(Tensor, usize)> {
        let pairs: Vec<&Pair> = idx.iter().map(|&i| &self.train[i]).collect();
        let tokens = pairs.iter().map(|p| p.chosen.len() + p.rejected.len()).sum();
        Ok((self.loss_on(model, &pairs)?.0, tokens))
    }

    fn evaluate(&mut self, model: &Gpt, _params: &ParamSet) -> Result<EvalReport> {
        let (mut loss, mut correct, mut margin, mut n) = (0.0, 0usize, 0.0, 0usize);
        for chunk in self.val.chunks(self.batch) {
            let pairs: Vec<&Pair> = chunk.iter().collect();
            let (l, m) = self.loss_on(model, &pairs)?;
            let m = m.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            loss += l.to_dtype(DType::F64)?.to_scalar::<f64>()? * pairs.len() as f64;
            correct += m.iter().filter(|&&x| x > 0.0).count();
            margin += m.iter().sum::<f64>();
            n += pairs.len();
        }
        let n = n.max(1) as f64;
        Ok(EvalReport {
            values: vec![
                ("val_loss", loss / n),
                ("accuracy", correct as f64 / n),
                ("margin", margin / n),
            ],
            samples: vec![],
        })
    }

    fn state(&self) -> Value {
        self.order.state()
    }

    fn restore(&mut self, state: &Value) -> Result<()> {
        self.order.restore(state)
    }
}

fn render_pairs(
    tok: &Tokenizer,
    template: &ChatTemplate,
    groups: &[crate::data::preferences::PreferenceGroup],
    ctx: usize,
) -> Result<(Vec<Pair>, usize)> {
    let (mut out, mut too_long) = (vec![], 0);
    for g in groups {
        for (c, r) in g.pairs() {
            let answers = [g.ranked[c].as_str(), g.ranked[r].as_str()];
            let Some(fit) = fitting_prompt(tok, template, &g.prompt, &answers, ctx)? else {
                too_long += 1;
                continue;
            };
            let prompt_len = template.render_prompt(tok, &fit.prompt)?.len();
            let [chosen, rejected]: [Vec<u32>; 2] = fit.seqs.try_into().expect("two answers, two sequences");
            out.push(Pair {
                chosen,
                rejected,
                prompt_len,
            });
        }
    }
    Ok((out, too_long))
}

/// Runs DPO; the policy ends up in `train.out/checkpoint`.
pub fn dpo(cfg: &DpoConfig) -> Result<TrainOutcome> {
    ensure!(
        cfg.beta > 0.0 && cfg.beta.is_finite(),
        "--beta must be positive, got {}",
        cfg.beta
    );
    ensure!(
        cfg.nll_coef >= 0.0 && cfg.nll_coef.is_finite(),
        "--nll-coef must be zero or positive, got {}",
        cfg.nll_coef
    );
    ensure!(cfg.batch_size >= 1, "--batch-size must be at least 1");
    let ck = Checkpoint::load(&cfg.policy, DType::F32, &cfg.train.device)?;
    let (tok_json, tok) = ck.tokenizer(&cfg.policy)?;
    let template = ChatTemplate::new(&tok)?;
    let ctx = ck.config.n_positions;
    let (mut train, skipped) = load_preferences(&cfg.data)?;
    ensure!(!train.is_empty(), "no usable preference pairs in the DPO data");
    let val = if cfg.val_data.is_empty() {
        hold_out(&mut train, cfg.val_fraction, cfg.train.seed)?
    } else {
        load_preferences(&cfg.val_data)?.0
    };
    let (train, long_t) = render_pairs(&tok, &template, &train, ctx)?;
    let (val, long_v) = render_pairs(&tok, &template, &val, ctx)?;
    if crate::train::collective::is_main() {
        eprintln!(
            "dpo: {} training and {} held-out pairs; {skipped} records skipped (empty or identical answers), {} pairs longer than the context left out (prompts are first shortened to their latest turns)",
            train.len(),
            val.len(),
            long_t + long_v
        );
    }
    ensure!(!train.is_empty(), "every preference pair is longer than the context");
    let mut objective = Dpo {
        reference: ck.model()?,
        order: EpochOrder::new(cfg.train.seed, train.len(), 0, 0),
        train,
        val,
        beta: cfg.beta,
        nll_coef: cfg.nll_coef,
        batch: cfg.batch_size,
        pad: template.end,
    };
    let init = Init {
        params: ParamSet::from_weights(&ck.config, &ck.weights)?,
        tokenizer_json: Some(tok_json),
        parent: Some(cfg.policy.display().to_string()),
    };
    trainer::train(&cfg.train, init, &mut objective)
}
