//! Evaluation of one checkpoint (`talaria eval CKPT ...`): held-out prompts of the default world
//! (per skill, chat or few-shot), the reward model's verdicts on the model's own mistakes, a
//! win-rate against another checkpoint, MMLU- and GSM8K-format benchmarks, and a reward model's
//! pairwise accuracy on a preference file.

use std::collections::BTreeMap;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use candle_core::{DType, Device};
use serde_json::json;

use crate::chat::ChatTemplate;
use crate::checkpoint::Checkpoint;
use crate::data::prompts::{PromptRecord, read_prompts};
use crate::eval::tasks::{self, MistakeVerdicts, SkillReport, WinRate};
use crate::eval::{behaviour, benchmarks};
use crate::model::Gpt;
use crate::tokenizer::Tokenizer;
use crate::train::reward::{RewardMetrics, RewardModel, evaluate_reward_model};

/// What to measure on a checkpoint.
#[derive(Debug, Clone)]
pub struct CheckpointEvalConfig {
    pub target: PathBuf,
    /// Held-out prompts with reference answers (the default world's format).
    pub prompts: Option<PathBuf>,
    /// With `prompts`: where to write every answer beside the gold labeller's reading of it (JSON lines).
    pub answers: Option<PathBuf>,
    /// Prompt a base model few-shot in plain text instead of through the chat template.
    pub few_shot: bool,
    pub mmlu: Option<PathBuf>,
    pub mmlu_dev: Option<PathBuf>,
    pub gsm8k: Option<PathBuf>,
    pub gsm8k_train: Option<PathBuf>,
    /// At most this many items of each benchmark file.
    pub limit: Option<usize>,
    /// With `prompts`: another checkpoint to compare against.
    pub against: Option<PathBuf>,
    /// A reward model: its accuracy on `prefs`, its verdicts on the mistakes, its win-rate verdicts.
    pub reward: Option<PathBuf>,
    pub prefs: Option<PathBuf>,
    pub max_new_tokens: usize,
    pub seed: u64,
    /// The precision the decoding kernels read the weights in (the evaluated model's answers).
    pub dtype: crate::model::WeightDtype,
    /// Where the models run (`--device`).
    pub device: Device,
}

/// What was measured; a field is `None` when it was not asked for.
#[derive(Debug, Clone, Default)]
pub struct CheckpointEval {
    pub skills: Option<SkillReport>,
    /// The gold labeller's reading of the answers to `prompts` (when every prompt has a reference and a skill).
    pub behaviour: Option<behaviour::SetScores>,
    /// The reward model on this model's wrong answers.
    pub mistakes: Option<MistakeVerdicts>,
    /// The other checkpoint's accuracy and the win-rate of this one against it.
    pub against: Option<(SkillReport, WinRate)>,
    /// Per skill, this model's content verdicts against the other checkpoint's (with `behaviour`).
    pub content_vs_against: Option<BTreeMap<String, behaviour::ContentChange>>,
    /// Questions and accuracy.
    pub mmlu: Option<(usize, f64)>,
    pub gsm8k: Option<(usize, f64)>,
    pub reward: Option<RewardMetrics>,
}

/// Runs every evaluation `cfg` asks for.
pub fn evaluate_checkpoint(cfg: &CheckpointEvalConfig) -> Result<CheckpointEval> {
    ensure!(
        cfg.reward.is_none() || cfg.prefs.is_some() || cfg.prompts.is_some(),
        "--reward needs --prefs (its pairwise accuracy) or --prompts (its verdicts on the model's own answers)"
    );
    ensure!(
        cfg.answers.is_none() || cfg.prompts.is_some(),
        "--answers needs --prompts (the prompts whose answers it writes)"
    );
    ensure!(
        cfg.against.is_none() || cfg.prompts.is_some(),
        "--against needs --prompts (the prompts both models answer)"
    );
    let device = cfg.device.clone();
    let ck = Checkpoint::load(&cfg.target, DType::F32, &device)?;
    let mut model = ck.model()?;
    model.set_decode_dtype(cfg.dtype);
    let tok = Tokenizer::from_json(
        ck.tokenizer_json
            .as_deref()
            .context("the checkpoint has no tokenizer.json")?,
    )?;
    let rm = cfg
        .reward
        .as_deref()
        .map(|p| RewardModel::load(p, &device))
        .transpose()?;
    let mut out = CheckpointEval::default();
    if let Some(p) = &cfg.prompts {
        let prompts = read_prompts(p)?;
        let template = ChatTemplate::new(&tok)?;
        // Both models of an --against comparison are prompted the same way.
        let answer = |m: &Gpt| {
            if cfg.few_shot {
                tasks::few_shot_accuracy(m, &tok, &prompts, 3, cfg.seed, cfg.max_new_tokens)
            } else {
                tasks::chat_accuracy(m, &tok, &template, &prompts, cfg.max_new_tokens)
            }
        };
        let r = answer(&model)?;
        if prompts.iter().all(|p| p.answer.is_some() && p.skill.is_some()) {
            let answered = ended_answers(&r.answers);
            if let Some(path) = &cfg.answers {
                write_answers(path, &prompts, &answered)?;
            }
            out.behaviour = Some(behaviour::set_scores(&prompts, &answered));
        } else {
            ensure!(
                cfg.answers.is_none(),
                "--answers needs a reference answer and a skill on every prompt of {}",
                p.display()
            );
        }
        if let (Some(rm), Some(rm_path)) = (&rm, &cfg.reward) {
            rm.ensure_tokenizer_of(rm_path, &cfg.target, ck.tokenizer_json.as_deref())?;
            out.mistakes = Some(tasks::reward_on_mistakes(&prompts, &r.answers, rm)?);
        }
        if let Some(other) = &cfg.against {
            let ck_b = Checkpoint::load(other, DType::F32, &device)?;
            ensure!(
                ck_b.tokenizer_json == ck.tokenizer_json,
                "--against {} uses a different tokenizer from {}",
                other.display(),
                cfg.target.display()
            );
            let rb = answer(&ck_b.model()?)?;
            let w = tasks::win_rate(&prompts, &r.answers, &rb.answers, rm.as_ref())?;
            if out.behaviour.is_some() {
                let (this, that) = (ended_answers(&r.answers), ended_answers(&rb.answers));
                out.content_vs_against = Some(behaviour::content_changes(&prompts, &that, &this));
            }
            out.against = Some((rb, w));
        }
        out.skills = Some(r);
    }
    if let Some(p) = &cfg.mmlu {
        let test = benchmarks::read_mmlu(p, cfg.limit)?;
        let dev = cfg
            .mmlu_dev
            .as_deref()
            .map(|d| benchmarks::read_mmlu(d, None))
            .transpose()?
            .unwrap_or_default();
        out.mmlu = Some((test.len(), benchmarks::mmlu_accuracy(&model, &tok, &test, &dev, 5)?));
    }
    if let Some(p) = &cfg.gsm8k {
        let test = benchmarks::read_gsm8k(p, cfg.limit)?;
        let train = cfg
            .gsm8k_train
            .as_deref()
            .map(|d| benchmarks::read_gsm8k(d, Some(8)))
            .transpose()?
            .unwrap_or_default();
        let acc = benchmarks::gsm8k_accuracy(&model, &tok, &test, &train, 2, cfg.max_new_tokens)?;
        out.gsm8k = Some((test.len(), acc));
    }
    if let (Some(rm), Some(p)) = (&rm, &cfg.prefs) {
        out.reward = Some(evaluate_reward_model(rm, std::slice::from_ref(p), 16)?);
    }
    Ok(out)
}

/// A report's answers as text and whether each ended (the report marks the ones that did not).
fn ended_answers(answers: &[String]) -> Vec<behaviour::Answer> {
    answers
        .iter()
        .map(|a| match a.strip_suffix(tasks::NO_END) {
            Some(cut) => (cut.to_string(), false),
            None => (a.clone(), true),
        })
        .collect()
}

/// Writes one JSON line per prompt: the conversation, the reference, the model's answer and the gold
/// labeller's reading of it (src/data/synth/gold.rs), so that a reader can see what the scores count.
fn write_answers(path: &Path, prompts: &[PromptRecord], answers: &[behaviour::Answer]) -> Result<()> {
    ensure!(
        answers.len() == prompts.len(),
        "{} answers to {} prompts",
        answers.len(),
        prompts.len()
    );
    let mut text = String::new();
    for ((p, (answer, ended)), j) in prompts.iter().zip(answers).zip(behaviour::judgements(prompts, answers)) {
        let line = json!({
            "messages": p.messages,
            "reference": p.answer,
            "skill": p.skill,
            "answer": answer,
            "ended": ended,
            "turn": format!("{:?}", j.turn).to_lowercase(),
            "strict": j.strict,
            "content": j.content,
            "padded": j.padded,
            "explained": j.explained,
            "constrained": j.constrained,
            "ignored_constraint": j.ignored_constraint,
            "invented": j.invented,
            "gold_score": j.score,
        });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    crate::checkpoint::write_file(path, text.as_bytes())
}
