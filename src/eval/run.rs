//! Evaluation of a speedrun directory: the base model few-shot, the SFT model and every RLHF stage on the
//! held-out prompts, win-rates against SFT, the reward model on its held-out pairs and on SFT's own mistakes,
//! and each stage's time and throughput, written to `eval.json` for the report.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use serde_json::Value;

use crate::chat::{ChatTemplate, Message};
use crate::checkpoint::Checkpoint;
use crate::data::prompts::{PromptRecord, read_prompts};
use crate::data::synth::gold::{self, Turn};
use crate::engine::{Completion, FinishReason, Sampling, SamplingParams, chat_answers, chat_samples};
use crate::eval::behaviour::{
    Answer, Behaviour, Difference, content_changes, difference, flaws, gold_win_rate, invented, judgements, set_scores,
    turn_success,
};
use crate::eval::report::{EvalSummary, StageEval};
use crate::eval::tasks::{NO_END, SkillReport, beats, few_shot_accuracy, reward_on_mistakes, win_rate};
use crate::metrics::{METRICS_FILE, read_metrics};
use crate::model::Gpt;
use crate::tokenizer::Tokenizer;
use crate::train::answers::{exact_kl, grouped_batch};
use crate::train::reward::{RewardModel, evaluate_reward_model};

/// The summary a speedrun stage writes into its directory when it finishes (its key, wall time and outcome).
pub const DONE_FILE: &str = "stage.json";

fn last_metric(run: &Path, stage: &str, key: &str) -> Option<f64> {
    read_metrics(&run.join(METRICS_FILE), Some(stage))
        .ok()?
        .iter()
        .rev()
        .find_map(|r| r[key].as_f64())
}

fn tokens_per_s(run: &Path, stage: &str, wall: f64) -> Option<f64> {
    let tokens = read_metrics(&run.join(METRICS_FILE), Some(stage))
        .ok()?
        .iter()
        .rev()
        .find_map(|r| r["tokens"].as_f64())?;
    (wall > 0.0).then(|| tokens / wall)
}

fn stage_eval(name: &str, r: &SkillReport) -> StageEval {
    StageEval {
        name: name.into(),
        macro_accuracy: r.macro_accuracy(),
        per_skill: r.by_skill.iter().map(|(k, t)| (k.clone(), t.accuracy())).collect(),
        ..StageEval::default()
    }
}

/// The default world's evaluation sets (all but `eval_prompts.jsonl` optional, for worlds of older
/// generator versions).
struct Sets {
    /// `eval_prompts.jsonl`: the corpus's three wordings (strict exact match, comparable across versions).
    legacy: Vec<PromptRecord>,
    /// `eval_seen_prompts.jsonl`: the seen phrasings with format constraints (`eval_prompts.jsonl` for worlds
    /// without it): the behaviour evaluation.
    seen: Vec<PromptRecord>,
    heldout: Option<Vec<PromptRecord>>,
    challenge: Option<Vec<PromptRecord>>,
    correction: Option<Vec<PromptRecord>>,
    unknown: Option<Vec<PromptRecord>>,
}

impl Sets {
    fn load(world: &Path) -> Result<Self> {
        let optional = |f: &str| -> Result<Option<Vec<PromptRecord>>> {
            let p = world.join(f);
            p.exists().then(|| read_prompts(&p)).transpose()
        };
        let legacy = read_prompts(&world.join("eval_prompts.jsonl"))?;
        Ok(Self {
            seen: optional("eval_seen_prompts.jsonl")?.unwrap_or_else(|| legacy.clone()),
            legacy,
            heldout: optional("eval_heldout_prompts.jsonl")?,
            challenge: optional("eval_challenge.jsonl")?,
            correction: optional("eval_correction.jsonl")?,
            unknown: optional("eval_unknown.jsonl")?,
        })
    }
}

/// A chat model's answers to every set: greedy, plus one sample at temperature 1 per seen prompt.
struct Answers {
    legacy: Vec<Answer>,
    seen: Vec<Answer>,
    heldout: Option<Vec<Answer>>,
    challenge: Option<Vec<Answer>>,
    correction: Option<Vec<Answer>>,
    unknown: Option<Vec<Answer>>,
    /// The samples, with their tokens (the stop token included) for the exact KL.
    sampled: Vec<Completion>,
}

fn convs(ps: &[PromptRecord]) -> Vec<&[Message]> {
    ps.iter().map(|p| p.messages.as_slice()).collect()
}

impl Answers {
    fn of(
        model: &Gpt,
        tok: &Tokenizer,
        template: &ChatTemplate,
        sets: &Sets,
        seed: u64,
        max_new: usize,
    ) -> Result<Self> {
        let greedy = |ps: &[PromptRecord]| chat_answers(model, tok, template, &convs(ps), max_new);
        let opt = |ps: &Option<Vec<PromptRecord>>| ps.as_deref().map(greedy).transpose();
        let sampling = Sampling {
            params: SamplingParams::plain(1.0),
            seed: seed ^ 0x7a11,
        };
        let sampled = chat_samples(model, tok, template, &convs(&sets.seen), &[sampling], max_new)?
            .into_iter()
            .map(|mut c| c.remove(0))
            .collect();
        Ok(Self {
            legacy: greedy(&sets.legacy)?,
            seen: greedy(&sets.seen)?,
            heldout: opt(&sets.heldout)?,
            challenge: opt(&sets.challenge)?,
            correction: opt(&sets.correction)?,
            unknown: opt(&sets.unknown)?,
            sampled,
        })
    }

    fn behaviour(&self, sets: &Sets) -> Behaviour {
        let sampled: Vec<Answer> = self
            .sampled
            .iter()
            .map(|c| (c.text.clone(), c.finish.ended()))
            .collect();
        Behaviour {
            seen: set_scores(&sets.seen, &self.seen),
            heldout: sets
                .heldout
                .as_ref()
                .zip(self.heldout.as_ref())
                .map(|(p, a)| set_scores(p, a)),
            keeps_when_challenged: sets
                .challenge
                .as_ref()
                .zip(self.challenge.as_ref())
                .map(|(p, a)| turn_success(p, a, Turn::Challenge)),
            fixes_when_corrected: sets
                .correction
                .as_ref()
                .zip(self.correction.as_ref())
                .map(|(p, a)| turn_success(p, a, Turn::Correction)),
            invents_about_strangers: sets
                .unknown
                .as_ref()
                .zip(self.unknown.as_ref())
                .map(|(p, a)| invented(p, a)),
            sampled: Some(flaws(&judgements(&sets.seen, &sampled))),
            content_vs_sft: None,
        }
    }
}

/// The exact KL to `reference` per answer, along `policy`'s own samples of `prompts`.
fn exact_kl_of(
    policy: &Gpt,
    reference: &Gpt,
    tok: &Tokenizer,
    template: &ChatTemplate,
    prompts: &[PromptRecord],
    sampled: &[Completion],
) -> Result<f64> {
    let mut seqs = vec![];
    for (p, c) in prompts.iter().zip(sampled) {
        let prompt = template.render_prompt(tok, &p.messages)?;
        let mut answer = c.tokens.clone();
        if let FinishReason::StopToken(t) = c.finish {
            answer.push(t);
        }
        if !answer.is_empty() {
            seqs.push((prompt, answer));
        }
    }
    let mut kl = vec![];
    for chunk in seqs.chunks(32) {
        let groups: Vec<(&[u32], Vec<&[u32]>)> =
            chunk.iter().map(|(p, a)| (p.as_slice(), vec![a.as_slice()])).collect();
        let b = grouped_batch(&groups, template.end, policy.device())?;
        kl.extend(exact_kl(policy, reference, &b)?);
    }
    Ok(kl.iter().sum::<f64>() / kl.len().max(1) as f64)
}

/// The reward model's pairwise accuracy on the SFT model's own answers to the held-out prompts (its
/// greedy answer and three samples), on the pairs that differ in behaviour and on those that differ in
/// content only ([`difference`]): (behaviour accuracy, pairs, content accuracy, pairs).
fn rm_on_policy(
    rm: &RewardModel,
    sft: &Gpt,
    tok: &Tokenizer,
    template: &ChatTemplate,
    sets: &Sets,
    seed: u64,
    max_new: usize,
) -> Result<(Option<f64>, usize, Option<f64>, usize)> {
    let mut prompts: Vec<PromptRecord> = sets.seen.clone();
    for extra in [&sets.challenge, &sets.correction, &sets.unknown].into_iter().flatten() {
        prompts.extend(extra.iter().cloned());
    }
    let samples: Vec<Sampling> = (0..4)
        .map(|k| Sampling {
            params: SamplingParams::plain(if k == 0 { 0.0 } else { 1.0 }),
            seed: seed ^ 0x0b5e ^ k,
        })
        .collect();
    let done = chat_samples(sft, tok, template, &convs(&prompts), &samples, max_new)?;
    let (mut items, mut meta) = (vec![], vec![]);
    for (i, (p, cs)) in prompts.iter().zip(&done).enumerate() {
        for c in cs {
            let j = gold::judge(
                &p.messages,
                p.answer.as_deref().unwrap_or(""),
                p.skill.as_deref().unwrap_or(""),
                &c.text,
                c.finish.ended(),
            );
            items.push((p.messages.as_slice(), c.text.as_str()));
            meta.push((i, j));
        }
    }
    let scores = rm.score(&items, 32)?;
    let (mut beh, mut con) = ((0.0, 0usize), (0.0, 0usize));
    for a in 0..meta.len() {
        for b in a + 1..meta.len() {
            if meta[a].0 != meta[b].0 || items[a].1 == items[b].1 {
                continue;
            }
            let (ja, jb) = (&meta[a].1, &meta[b].1);
            let verdict = if ja.score > jb.score {
                beats(scores[a], scores[b])
            } else {
                beats(scores[b], scores[a])
            };
            match difference(ja, jb) {
                Difference::Behaviour => {
                    beh.0 += verdict;
                    beh.1 += 1;
                }
                Difference::Content => {
                    con.0 += verdict;
                    con.1 += 1;
                }
                Difference::Other => {}
            }
        }
    }
    let acc = |(s, n): (f64, usize)| (n > 0).then(|| s / n as f64);
    Ok((acc(beh), beh.1, acc(con), con.1))
}

/// The chat stages a run may have, in report order: (name in the report, directory).
const CHAT_STAGES: [(&str, &str); 5] = [
    ("sft", "sft"),
    ("ppo", "ppo"),
    ("ppo_round2", "ppo_round2"),
    ("ppo_gold", "ppo_gold"),
    ("dpo", "dpo"),
];

/// Evaluates a run's base, SFT and RLHF models on the held-out sets and writes `eval.json`.
pub fn evaluate_run(run: &Path, world: &Path, seed: u64, max_new: usize, device: &Device) -> Result<EvalSummary> {
    let device = device.clone();
    let sets = Sets::load(world)?;
    let (legacy, prompts) = (&sets.legacy, &sets.seen);
    let base = Checkpoint::load(&run.join("pretrain"), DType::F32, &device)?;
    let tok = Tokenizer::from_json(
        base.tokenizer_json
            .as_deref()
            .context("the base model has no tokenizer")?,
    )?;
    let template = ChatTemplate::new(&tok)?;
    let rm_dir = run.join("reward");
    let rm = if rm_dir.join("checkpoint").exists() {
        Some(RewardModel::load(&rm_dir, &device)?)
    } else {
        None
    };
    let mut summary = EvalSummary {
        eval_prompts: legacy.len(),
        ..EvalSummary::default()
    };
    summary.val_loss = last_metric(&run.join("pretrain"), "pretrain", "val_loss");
    summary.val_bpb = last_metric(&run.join("pretrain"), "pretrain", "val_bpb");

    // The base model, few-shot: exact match and the gold labeller's reading of its answers.
    let base_model = base.model()?;
    let mut e = stage_eval("base", &few_shot_accuracy(&base_model, &tok, legacy, 3, seed, max_new)?);
    let base_seen = few_shot_accuracy(&base_model, &tok, prompts, 3, seed, max_new)?;
    let base_answers: Vec<Answer> = base_seen.answers.iter().map(|a| (a.clone(), true)).collect();
    e.behaviour = Some(Behaviour {
        seen: set_scores(prompts, &base_answers),
        ..Behaviour::default()
    });
    stage_times(run, "pretrain", "pretrain", &mut e);
    let mut evals = vec![(e, None)];

    let sft_model = Checkpoint::load(&run.join("sft"), DType::F32, &device)?.model()?;
    let sft_answers = Answers::of(&sft_model, &tok, &template, &sets, seed, max_new)?;
    // Answers as text for the verifier and the reward model, marked when they never ended.
    let marked = |answers: &[Answer]| -> Vec<String> {
        answers
            .iter()
            .map(|a| if a.1 { a.0.clone() } else { format!("{}{}", a.0, NO_END) })
            .collect()
    };
    let sft_texts = marked(&sft_answers.seen);
    for (name, dir) in CHAT_STAGES {
        if !run.join(dir).join("checkpoint").exists() {
            continue;
        }
        let (model, answers) = if name == "sft" {
            (None, None)
        } else {
            let m = Checkpoint::load(&run.join(dir), DType::F32, &device)?.model()?;
            let a = Answers::of(&m, &tok, &template, &sets, seed, max_new)?;
            (Some(m), Some(a))
        };
        let ans = answers.as_ref().unwrap_or(&sft_answers);
        let mut report = SkillReport::default();
        for (p, t) in legacy.iter().zip(marked(&ans.legacy)) {
            report.record(p, t);
        }
        let mut e = stage_eval(name, &report);
        e.behaviour = Some(ans.behaviour(&sets));
        let w = win_rate(prompts, &marked(&ans.seen), &sft_texts, rm.as_ref())?;
        e.reward = w.reward_a;
        if name != "sft" {
            e.win_vs_sft_rm = w.by_reward_model;
            e.win_vs_sft_verifier = w.by_verifier;
            e.win_vs_sft_gold = gold_win_rate(prompts, &ans.seen, &sft_answers.seen);
            if let Some(b) = e.behaviour.as_mut() {
                b.content_vs_sft = Some(content_changes(prompts, &sft_answers.seen, &ans.seen));
            }
            e.rm_agreement = w.rm_agreement;
            e.separated_from_sft = Some(w.separated);
        }
        if let Some(m) = &model
            && name.starts_with("ppo")
        {
            e.kl_to_sft = Some(exact_kl_of(m, &sft_model, &tok, &template, prompts, &ans.sampled)?);
        }
        stage_times(run, dir, if name.starts_with("ppo") { "ppo" } else { name }, &mut e);
        evals.push((e, None::<()>));
    }
    summary.stages = evals.into_iter().map(|(e, _)| e).collect();
    if let Some(rm) = &rm {
        let m = evaluate_reward_model(rm, &[world.join("prefs_val.jsonl")], 16)?;
        summary.reward_accuracy = Some(m.accuracy);
        summary.reward_margin = Some(m.margin);
        summary.reward_length_corr = Some(m.length_corr);
        let v = reward_on_mistakes(prompts, &sft_texts, rm)?;
        summary.reward_on_sft_mistakes = v.accuracy();
        summary.sft_mistakes = Some(v.mistakes());
        let (beh, nb, con, nc) = rm_on_policy(rm, &sft_model, &tok, &template, &sets, seed, max_new)?;
        summary.reward_on_policy_behaviour = beh;
        summary.reward_on_policy_behaviour_pairs = Some(nb);
        summary.reward_on_policy_content = con;
        summary.reward_on_policy_content_pairs = Some(nc);
    }
    std::fs::write(run.join("eval.json"), serde_json::to_string_pretty(&summary)?)?;
    Ok(summary)
}

/// A stage's wall time (from its `stage.json`) and training throughput (`logged_as`: the stage name of
/// its metrics).
fn stage_times(run: &Path, dir: &str, logged_as: &str, e: &mut StageEval) {
    let done: Option<Value> = std::fs::read_to_string(run.join(dir).join(DONE_FILE))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    e.wall_s = done.as_ref().and_then(|d| d["wall_s"].as_f64());
    e.tokens_per_s = e.wall_s.and_then(|w| tokens_per_s(&run.join(dir), logged_as, w));
}
