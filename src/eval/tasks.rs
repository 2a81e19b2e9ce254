//! Task accuracy: exact match per skill on held-out prompts (greedy decoding), for chat models
//! (through the chat template) and for base models (few-shot prompted in plain text), plus the
//! win-rate of one chat model against another as judged by a reward model and by the verifier.

use std::collections::BTreeMap;

use anyhow::{Context, Result};

use crate::chat::ChatTemplate;
use crate::data::prompts::PromptRecord;
use crate::data::synth;
use crate::data::synth::verify;
use crate::engine::{self, EngineConfig, Request};
use crate::model::Gpt;
use crate::tokenizer::{self, Tokenizer};
use crate::train::reward::RewardModel;

/// Correct and total answers of one skill.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub correct: usize,
    pub total: usize,
}

impl Tally {
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.total.max(1) as f64
    }
}

/// Per-skill tallies and the answers given, in prompt order.
#[derive(Debug, Clone, Default)]
pub struct SkillReport {
    pub by_skill: BTreeMap<String, Tally>,
    pub answers: Vec<String>,
}

impl SkillReport {
    /// The mean of the per-skill accuracies.
    pub fn macro_accuracy(&self) -> f64 {
        if self.by_skill.is_empty() {
            return 0.0;
        }
        self.by_skill.values().map(Tally::accuracy).sum::<f64>() / self.by_skill.len() as f64
    }

    pub fn record(&mut self, p: &PromptRecord, answer: String) {
        if let (Some(want), Some(skill)) = (&p.answer, &p.skill) {
            let t = self.by_skill.entry(skill.clone()).or_default();
            t.total += 1;
            t.correct += usize::from(verify::is_correct(want, skill, &answer));
        }
        self.answers.push(answer);
    }
}

/// What is appended to an answer that ran out of tokens before it ended, in a [`SkillReport`].
pub const NO_END: &str = " [no end]";

/// Exact-match accuracy of a chat model, per skill.
pub fn chat_accuracy(
    model: &Gpt,
    tok: &Tokenizer,
    template: &ChatTemplate,
    prompts: &[PromptRecord],
    max_new: usize,
) -> Result<SkillReport> {
    let mut r = SkillReport::default();
    let convs: Vec<&[crate::chat::Message]> = prompts.iter().map(|p| p.messages.as_slice()).collect();
    for (p, (answer, ended)) in prompts
        .iter()
        .zip(engine::chat_answers(model, tok, template, &convs, max_new)?)
    {
        r.record(p, if ended { answer } else { format!("{answer}{NO_END}") });
    }
    Ok(r)
}

/// Exact-match accuracy of a base (pretrained-only) model, prompted with `shots` solved
/// examples of the same skill in the plain `Q: ...\nA: ...` form; the answer is the text up to
/// the first newline. A prompt without a skill has no examples to show and gets an empty answer, so
/// that the answers stay in prompt order.
pub fn few_shot_accuracy(
    model: &Gpt,
    tok: &Tokenizer,
    prompts: &[PromptRecord],
    shots: usize,
    seed: u64,
    max_new: usize,
) -> Result<SkillReport> {
    let mut prefixes: BTreeMap<String, String> = BTreeMap::new();
    let eot: Vec<u32> = tok.special_id(crate::tokenizer::EOT).into_iter().collect();
    let ctx = model.config().n_positions;
    let mut requests = vec![];
    for p in prompts {
        let Some(skill) = &p.skill else { continue };
        if !prefixes.contains_key(skill) {
            prefixes.insert(skill.clone(), synth::few_shot_prefix(seed, skill, shots)?);
        }
        let question = &p.messages[p.messages.len() - 1].content;
        let mut ids = tok.encode(&synth::few_shot_prompt(&prefixes[skill], question))?;
        tokenizer::keep_last(&mut ids, ctx.saturating_sub(max_new));
        let mut r = Request::greedy(ids, max_new, eot.clone());
        r.stop_strings = vec!["\n".into()];
        requests.push(r);
    }
    let mut done = engine::generate_batch(model, Some(tok), requests, EngineConfig::default(), |_| {})?.into_iter();
    let mut r = SkillReport::default();
    for p in prompts {
        let text = match p.skill {
            Some(_) => done
                .next()
                .context("the engine returned fewer answers than it was asked for")?[0]
                .text
                .trim()
                .to_string(),
            None => String::new(),
        };
        r.record(p, text);
    }
    Ok(r)
}

/// How often model A's answers beat model B's.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WinRate {
    /// Wins of A by reward-model score (ties count half).
    pub by_reward_model: Option<f64>,
    /// Wins of A by the verifier: A right and B wrong is a win, both right or both wrong a tie.
    pub by_verifier: Option<f64>,
    /// Mean reward-model score of A's and B's answers.
    pub reward_a: Option<f64>,
    pub reward_b: Option<f64>,
    /// The prompts where the verifier tells the two answers apart (one right, one wrong)...
    pub separated: usize,
    /// ...and the share of them where the reward model scores the right answer higher: its accuracy on the
    /// models' own answers, which is what RL optimises against (ties count half).
    pub rm_agreement: Option<f64>,
}

/// 1 when the first is higher (a score, or `true` over `false`), 0.5 on a tie, 0 otherwise.
pub(crate) fn beats<T: PartialOrd>(x: T, y: T) -> f64 {
    if x > y {
        1.0
    } else if x == y {
        0.5
    } else {
        0.0
    }
}

/// The reward model's verdicts on a model's own mistakes, per skill: for each skill, in how many of the model's
/// wrong answers the reference answer scored higher (ties count half), and how many wrong answers there were.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MistakeVerdicts {
    pub by_skill: BTreeMap<String, (f64, usize)>,
}

impl MistakeVerdicts {
    /// Wrong answers judged, over all skills.
    pub fn mistakes(&self) -> usize {
        self.by_skill.values().map(|(_, n)| n).sum()
    }

    /// The share of all wrong answers where the reference scored higher (`None` without mistakes).
    pub fn accuracy(&self) -> Option<f64> {
        let n = self.mistakes();
        (n > 0).then(|| self.by_skill.values().map(|(right, _)| right).sum::<f64>() / n as f64)
    }
}

/// The reward model on a model's own mistakes: on every prompt whose greedy answer the verifier marks wrong, does
/// the reward model score the reference answer above it? Unlike held-out preference pairs, these are the errors
/// RL has to tell apart. Empty answers are not attempts and are left out.
pub fn reward_on_mistakes(prompts: &[PromptRecord], answers: &[String], rm: &RewardModel) -> Result<MistakeVerdicts> {
    let (mut refs, mut wrong, mut skills) = (vec![], vec![], vec![]);
    for (p, x) in prompts.iter().zip(answers) {
        let (Some(want), Some(skill)) = (&p.answer, &p.skill) else {
            continue;
        };
        if !x.trim().is_empty() && !verify::is_correct(want, skill, x) {
            refs.push((p.messages.as_slice(), want.as_str()));
            wrong.push((p.messages.as_slice(), x.as_str()));
            skills.push(skill.clone());
        }
    }
    let mut out = MistakeVerdicts::default();
    if refs.is_empty() {
        return Ok(out);
    }
    let (sr, sw) = (rm.score(&refs, 16)?, rm.score(&wrong, 16)?);
    for ((r, w), skill) in sr.iter().zip(&sw).zip(skills) {
        let e = out.by_skill.entry(skill).or_default();
        e.0 += beats(r, w);
        e.1 += 1;
    }
    Ok(out)
}

/// (conversation, answer) pairs for the reward model.
fn scored<'a>(prompts: &'a [PromptRecord], answers: &'a [String]) -> Vec<(&'a [crate::chat::Message], &'a str)> {
    prompts
        .iter()
        .zip(answers)
        .map(|(p, x)| (p.messages.as_slice(), x.as_str()))
        .collect()
}

/// Compares two sets of answers to the same prompts.
pub fn win_rate(prompts: &[PromptRecord], a: &[String], b: &[String], rm: Option<&RewardModel>) -> Result<WinRate> {
    let mut out = WinRate::default();
    let n = prompts.len().min(a.len()).min(b.len());
    if n == 0 {
        return Ok(out);
    }
    let scores = match rm {
        Some(rm) => {
            let (sa, sb) = (
                rm.score(&scored(&prompts[..n], a), 16)?,
                rm.score(&scored(&prompts[..n], b), 16)?,
            );
            out.by_reward_model = Some(sa.iter().zip(&sb).map(|(x, y)| beats(x, y)).sum::<f64>() / n as f64);
            out.reward_a = Some(sa.iter().map(|&x| x as f64).sum::<f64>() / n as f64);
            out.reward_b = Some(sb.iter().map(|&x| x as f64).sum::<f64>() / n as f64);
            Some((sa, sb))
        }
        None => None,
    };
    let (mut judged, mut agreed) = (vec![], vec![]);
    for (i, (p, (x, y))) in prompts[..n].iter().zip(a.iter().zip(b)).enumerate() {
        let (Some(want), Some(skill)) = (&p.answer, &p.skill) else {
            continue;
        };
        let (ca, cb) = (verify::is_correct(want, skill, x), verify::is_correct(want, skill, y));
        judged.push(beats(ca, cb));
        if ca != cb {
            out.separated += 1;
            if let Some((sa, sb)) = &scores {
                let (right, wrong) = if ca { (sa[i], sb[i]) } else { (sb[i], sa[i]) };
                agreed.push(beats(right, wrong));
            }
        }
    }
    if !judged.is_empty() {
        out.by_verifier = Some(judged.iter().sum::<f64>() / judged.len() as f64);
    }
    if !agreed.is_empty() {
        out.rm_agreement = Some(agreed.iter().sum::<f64>() / agreed.len() as f64);
    }
    Ok(out)
}
