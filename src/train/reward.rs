//! The reward model: the SFT model's backbone with a scalar head read at the last token of the
//! answer (its closing `<|end|>`), trained on human rankings with -log sigmoid(r_chosen -
//! r_rejected), every pair of one prompt's answers in the same batch (InstructGPT).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use serde_json::Value;

use crate::chat::{ChatTemplate, Message, Role};
use crate::checkpoint::Checkpoint;
use crate::data::preferences::{PreferenceGroup, read_preferences};
use crate::model::Gpt;
use crate::tokenizer::{self, Tokenizer};
use crate::train::ParamSet;
use crate::train::order::{EpochOrder, hold_out};
use crate::train::rl::neg_log_sigmoid;
use crate::train::trainer::{self, EvalReport, Init, Objective, TrainConfig, TrainOutcome};

/// The scalar head, `[1, n_embd]`, named as in `transformers`' `GPT2ForSequenceClassification`.
pub const SCORE_HEAD: &str = "score.weight";

/// Token ids of `prompt` followed by the assistant's `answer` (ending with `<|end|>`).
pub fn render_answer(tok: &Tokenizer, template: &ChatTemplate, prompt: &[Message], answer: &str) -> Result<Vec<u32>> {
    let mut msgs = prompt.to_vec();
    msgs.push(Message::new(Role::Assistant, answer));
    Ok(template.render(tok, &msgs)?.ids)
}

/// A prompt cut to fit the context, and every answer rendered after it.
pub struct FittedPrompt {
    pub prompt: Vec<Message>,
    /// Whether any exchange was dropped.
    pub shortened: bool,
    /// `render_answer` of each answer, in the order given.
    pub seqs: Vec<Vec<u32>>,
}

/// The prompt with its oldest exchanges dropped ([`crate::chat::drop_oldest_turns`]) until every answer fits
/// in `ctx` tokens after it. `None` when even the last user turn is too long.
pub fn fitting_prompt(
    tok: &Tokenizer,
    template: &ChatTemplate,
    prompt: &[Message],
    answers: &[&str],
    ctx: usize,
) -> Result<Option<FittedPrompt>> {
    let mut seqs = vec![];
    let kept = crate::chat::drop_oldest_turns(prompt, |candidate| {
        seqs = answers
            .iter()
            .map(|a| render_answer(tok, template, candidate, a))
            .collect::<Result<Vec<_>>>()?;
        Ok(seqs.iter().all(|s| s.len() <= ctx))
    })?;
    Ok(kept.map(|(prompt, dropped)| FittedPrompt {
        prompt,
        shortened: dropped > 0,
        seqs,
    }))
}

/// Scores `[N]` of sequences of different lengths: the head applied to the final hidden state
/// of each sequence's own last token (never a padding position).
pub fn sequence_scores(gpt: &Gpt, head: &Tensor, seqs: &[Vec<u32>], pad: u32) -> Result<Tensor> {
    ensure!(
        !seqs.is_empty() && seqs.iter().all(|s| !s.is_empty()),
        "cannot score empty sequences"
    );
    let t = seqs.iter().map(Vec::len).max().expect("non-empty");
    let mut ids = Vec::with_capacity(seqs.len() * t);
    let mut last = Vec::with_capacity(seqs.len());
    for (n, s) in seqs.iter().enumerate() {
        ids.extend_from_slice(s);
        ids.extend(std::iter::repeat_n(pad, t - s.len()));
        last.push((n * t + s.len() - 1) as u32);
    }
    let device = gpt.device();
    let x = Tensor::from_vec(ids, (seqs.len(), t), device)?;
    let hidden = gpt.forward_hidden(&x)?;
    let c = hidden.dim(2)?;
    let picked = hidden
        .reshape((seqs.len() * t, c))?
        .index_select(&Tensor::new(last, device)?, 0)?;
    Ok(picked.matmul(&head.t()?)?.squeeze(1)?)
}

/// A trained reward model, for scoring answers in RLHF and evaluation.
pub struct RewardModel {
    pub gpt: Gpt,
    pub head: Tensor,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// The tokenizer's JSON, to check that a policy shares it.
    pub tokenizer_json: String,
}

impl RewardModel {
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let ck = Checkpoint::load(path, DType::F32, device)?;
        let head = ck
            .weights
            .get(SCORE_HEAD)
            .cloned()
            .with_context(|| format!("{} is not a reward model (no {SCORE_HEAD})", path.display()))?;
        let (json, tokenizer) = ck.tokenizer(path)?;
        let template = ChatTemplate::new(&tokenizer)?;
        Ok(Self {
            gpt: ck.model()?,
            head,
            tokenizer,
            template,
            tokenizer_json: json,
        })
    }

    /// Fails unless the model at `policy` (whose tokenizer JSON is `policy_tokenizer`) shares this reward model's
    /// tokenizer: scores of answers tokenized otherwise would be meaningless. `rm` names this reward model.
    pub fn ensure_tokenizer_of(&self, rm: &Path, policy: &Path, policy_tokenizer: Option<&str>) -> Result<()> {
        ensure!(
            policy_tokenizer == Some(self.tokenizer_json.as_str()),
            "the reward model {} uses a different tokenizer from {}: train the reward model from the same SFT model",
            rm.display(),
            policy.display()
        );
        Ok(())
    }

    /// Padding id for batching (any id works: padding positions are never read).
    pub fn pad(&self) -> u32 {
        self.template.end
    }

    /// Scores of answers to prompts, in batches of `batch`.
    pub fn score(&self, items: &[(&[Message], &str)], batch: usize) -> Result<Vec<f32>> {
        let ctx = self.gpt.config().n_positions;
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(batch.max(1)) {
            let seqs = chunk
                .iter()
                .map(|(p, a)| {
                    let mut s = render_answer(&self.tokenizer, &self.template, p, a)?;
                    // Over-long answers are scored on their last `ctx` tokens.
                    tokenizer::keep_last(&mut s, ctx);
                    Ok(s)
                })
                .collect::<Result<Vec<_>>>()?;
            let scores = sequence_scores(&self.gpt, &self.head, &seqs, self.pad())?;
            out.extend(scores.to_dtype(DType::F32)?.to_vec1::<f32>()?);
        }
        Ok(out)
    }
}

/// `talaria reward` settings.
#[derive(Debug, Clone)]
pub struct RewardConfig {
    /// The SFT checkpoint the reward model starts from, or a reward model to train further.
    pub init: PathBuf,
    pub data: Vec<PathBuf>,
    /// Held-out preferences; when empty, `val_fraction` of the prompts of `data` are held out.
    pub val_data: Vec<PathBuf>,
    pub val_fraction: f64,
    /// Answers (sequences) per micro-batch; whole prompt groups are never split.
    pub batch_size: usize,
    pub train: TrainConfig,
}

/// One prompt's answers, rendered.
#[derive(Debug, Clone)]
struct Group {
    seqs: Vec<Vec<u32>>,
    /// Answer lengths in tokens, for the length-bias alarm.
    answer_lens: Vec<usize>,
    pairs: Vec<(usize, usize)>,
}

/// Held-out metrics of a reward model on preference groups.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RewardMetrics {
    pub accuracy: f64,
    pub margin: f64,
    /// Pearson correlation of reward with answer length: near 1 means length bias.
    pub length_corr: f64,
    pub pairs: usize,
}

fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    if x.len() < 2 {
        return 0.0;
    }
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let cov: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let vx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
    let vy: f64 = y.iter().map(|b| (b - my).powi(2)).sum();
    if vx == 0.0 || vy == 0.0 {
        0.0
    } else {
        cov / (vx * vy).sqrt()
    }
}

fn evaluate_groups(gpt: &Gpt, head: &Tensor, groups: &[Group], pad: u32, batch: usize) -> Result<RewardMetrics> {
    let (mut correct, mut margin, mut pairs) = (0usize, 0f64, 0usize);
    let (mut rewards, mut lengths) = (vec![], vec![]);
    for g in groups {
        let mut scores = vec![];
        for chunk in g.seqs.chunks(batch.max(2)) {
            scores.extend(
                sequence_scores(gpt, head, chunk, pad)?
                    .to_dtype(DType::F64)?
                    .to_vec1::<f64>()?,
            );
        }
        for &(c, r) in &g.pairs {
            correct += usize::from(scores[c] > scores[r]);
            margin += scores[c] - scores[r];
            pairs += 1;
        }
        rewards.extend(&scores);
        lengths.extend(g.answer_lens.iter().map(|&l| l as f64));
    }
    Ok(RewardMetrics {
        accuracy: correct as f64 / pairs.max(1) as f64,
        margin: margin / pairs.max(1) as f64,
        length_corr: pearson(&rewards, &lengths),
        pairs,
    })
}

struct RewardObjective {
    train: Vec<Group>,
    val: Vec<Group>,
    order: EpochOrder,
    batch: usize,
    pad: u32,
}

impl RewardObjective {
    /// The next groups' sequences (at least a batch of them) and their (chosen, rejected) pairs
    /// as indices into those sequences.
    fn next_groups(&mut self) -> (Vec<Vec<u32>>, Vec<u32>, Vec<u32>) {
        let (mut seqs, mut chosen, mut rejected) = (vec![], vec![], vec![]);
        while seqs.len() < self.batch {
            let gi = self.order.next();
            let g = &self.train[gi];
            let base = seqs.len() as u32;
            seqs.extend(g.seqs.iter().cloned());
            for &(c, r) in &g.pairs {
                chosen.push(base + c as u32);
                rejected.push(base + r as u32);
            }
        }
        (seqs, chosen, rejected)
    }
}

impl Objective for RewardObjective {
    type Batch = (Vec<Vec<u32>>, Vec<u32>, Vec<u32>);

    fn stage(&self) -> &'static str {
        "reward"
    }

    fn next(&mut self) -> Result<(Vec<Vec<u32>>, Vec<u32>, Vec<u32>)> {
        Ok(self.next_groups())
    }

    fn loss(
        &self,
        (seqs, chosen, rejected): &(Vec<Vec<u32>>, Vec<u32>, Vec<u32>),
        model: &Gpt,
        params: &ParamSet,
    ) -> Result<(Tensor, usize)> {
        let head = params.get(SCORE_HEAD).context("reward head missing")?;
        let scores = sequence_scores(model, head, seqs, self.pad)?;
        let dev = scores.device();
        let diff = (scores.index_select(&Tensor::new(chosen.as_slice(), dev)?, 0)?
            - scores.index_select(&Tensor::new(rejected.as_slice(), dev)?, 0)?)?;
        let tokens = seqs.iter().map(Vec::len).sum();
        Ok((neg_log_sigmoid(&diff)?.mean_all()?, tokens))
    }

    fn evaluate(&mut self, model: &Gpt, params: &ParamSet) -> Result<EvalReport> {
        let head = params.get(SCORE_HEAD).context("reward head missing")?;
        let m = evaluate_groups(model, head, &self.val, self.pad, self.batch)?;
        Ok(EvalReport {
            values: vec![
                ("accuracy", m.accuracy),
                ("margin", m.margin),
                ("length_corr", m.length_corr),
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

/// Preference groups rendered for one tokenizer and context, and how many did not fit.
struct RenderedPreferences {
    groups: Vec<Group>,
    /// Groups whose prompt lost its oldest exchanges to fit.
    shortened: usize,
    too_long: usize,
}

fn render_groups(
    tok: &Tokenizer,
    template: &ChatTemplate,
    groups: &[PreferenceGroup],
    ctx: usize,
) -> Result<RenderedPreferences> {
    let mut out = RenderedPreferences {
        groups: vec![],
        shortened: 0,
        too_long: 0,
    };
    for g in groups {
        let answers: Vec<&str> = g.ranked.iter().map(String::as_str).collect();
        let Some(FittedPrompt {
            prompt,
            shortened,
            seqs,
        }) = fitting_prompt(tok, template, &g.prompt, &answers, ctx)?
        else {
            out.too_long += 1;
            continue;
        };
        out.shortened += usize::from(shortened);
        let prompt_len = template.render(tok, &prompt)?.ids.len();
        let answer_lens = seqs.iter().map(|s| s.len() - prompt_len).collect();
        let pairs = g.pairs();
        out.groups.push(Group {
            seqs,
            answer_lens,
            pairs,
        });
    }
    Ok(out)
}

/// Reads preference files: the groups and how many records were skipped.
pub fn load_preferences(paths: &[PathBuf]) -> Result<(Vec<PreferenceGroup>, usize)> {
    let mut groups = vec![];
    let mut skipped = 0;
    for p in paths {
        let prefs = read_preferences(p)?;
        skipped += prefs.skipped.len();
        groups.extend(prefs.groups);
    }
    Ok((groups, skipped))
}

/// Scores a reward model on held-out preference files.
pub fn evaluate_reward_model(rm: &RewardModel, paths: &[PathBuf], batch: usize) -> Result<RewardMetrics> {
    let ctx = rm.gpt.config().n_positions;
    let (groups, _) = load_preferences(paths)?;
    let r = render_groups(&rm.tokenizer, &rm.template, &groups, ctx)?;
    evaluate_groups(&rm.gpt, &rm.head, &r.groups, rm.pad(), batch)
}

/// Trains a reward model; it ends up in `train.out/checkpoint` with its `score.weight` head.
pub fn train_reward_model(cfg: &RewardConfig) -> Result<TrainOutcome> {
    ensure!(cfg.batch_size >= 2, "--batch-size must be at least 2 (a pair)");
    let ck = Checkpoint::load(&cfg.init, DType::F32, &cfg.train.device)?;
    let (tok_json, tok) = ck.tokenizer(&cfg.init)?;
    let template = ChatTemplate::new(&tok)?;
    let ctx = ck.config.n_positions;
    let (mut train, mut skipped) = load_preferences(&cfg.data)?;
    ensure!(!train.is_empty(), "no usable preference groups in the reward data");
    let val = if cfg.val_data.is_empty() {
        hold_out(&mut train, cfg.val_fraction, cfg.train.seed)?
    } else {
        let (v, s) = load_preferences(&cfg.val_data)?;
        skipped += s;
        v
    };
    let train = render_groups(&tok, &template, &train, ctx)?;
    let val = render_groups(&tok, &template, &val, ctx)?;
    if crate::train::collective::is_main() {
        eprintln!(
            "reward: {} training and {} held-out prompts ({} pairs); {} records skipped (empty or identical answers), {} prompts shortened to their latest turns and {} longer than the context left out",
            train.groups.len(),
            val.groups.len(),
            train.groups.iter().map(|g| g.pairs.len()).sum::<usize>(),
            skipped,
            train.shortened + val.shortened,
            train.too_long + val.too_long
        );
    }
    ensure!(
        !train.groups.is_empty(),
        "every preference group is longer than the context"
    );

    let mut weights: HashMap<String, Tensor> = ck
        .weights
        .iter()
        .filter(|(k, _)| k.as_str() != SCORE_HEAD)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // A reward model given as `init` trains further with its own head (iterated RLHF); an SFT model gets a
    // fresh one.
    let head = match ck.weights.get(SCORE_HEAD) {
        Some(h) => h.clone(),
        None => {
            let c = ck.config.n_embd;
            let normal = Normal::new(0.0f32, 1.0 / (c as f32 + 1.0).sqrt()).expect("positive std");
            let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.train.seed);
            let head: Vec<f32> = (0..c).map(|_| normal.sample(&mut rng)).collect();
            Tensor::from_vec(head, (1, c), &cfg.train.device)?
        }
    };
    weights.insert(SCORE_HEAD.into(), head);
    let params = ParamSet::with_heads(&ck.config, &weights, &[SCORE_HEAD])?;
    let mut objective = RewardObjective {
        order: EpochOrder::new(cfg.train.seed, train.groups.len(), 0, 0),
        train: train.groups,
        val: val.groups,
        batch: cfg.batch_size,
        pad: template.end,
    };
    let init = Init {
        params,
        tokenizer_json: Some(tok_json),
        parent: Some(cfg.init.display().to_string()),
    };
    trainer::train(&cfg.train, init, &mut objective)
}
