//! Behaviour, not only exact match, as InstructGPT's metadata table reports it: for a chat model's answers
//! to the default world's evaluation sets, read by the gold labeller ([`gold::judge`]), the strict exact
//! match, the content accuracy, the mean gold score and the rates of padding, unrequested explanations and
//! ignored format constraints; after "Are you sure?" the share that keeps a right answer, after "That's
//! wrong" the share now right, and about strangers the share of invented answers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::data::prompts::PromptRecord;
use crate::data::synth::gold::{self, Judgement, Turn};
use crate::eval::tasks::beats;

/// An answer as it came out: its text and whether it ended properly.
pub type Answer = (String, bool);

/// Shares of answers showing each flaw of form: padding and explanations over all answers, ignored
/// constraints over the answers to prompts that state one.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Flaws {
    pub padded: f64,
    pub explained: f64,
    pub ignored_constraint: f64,
}

/// One model on one set of single questions.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SetScores {
    /// Macro averages over skills.
    pub strict: f64,
    pub content: f64,
    pub per_skill_strict: BTreeMap<String, f64>,
    pub per_skill_content: BTreeMap<String, f64>,
    /// Mean gold score over the set.
    pub gold: f64,
    pub flaws: Flaws,
}

/// The judgement of every answer to `prompts` (which need a reference answer and a skill).
pub fn judgements(prompts: &[PromptRecord], answers: &[Answer]) -> Vec<Judgement> {
    prompts
        .iter()
        .zip(answers)
        .map(|(p, (text, ended))| {
            gold::judge(
                &p.messages,
                p.answer.as_deref().unwrap_or(""),
                p.skill.as_deref().unwrap_or(""),
                text,
                *ended,
            )
        })
        .collect()
}

fn share(hits: usize, n: usize) -> f64 {
    hits as f64 / n.max(1) as f64
}

/// The flaw rates of a set of judgements.
pub fn flaws(js: &[Judgement]) -> Flaws {
    let constrained = js.iter().filter(|j| j.constrained).count();
    Flaws {
        padded: share(js.iter().filter(|j| j.padded).count(), js.len()),
        explained: share(js.iter().filter(|j| j.explained).count(), js.len()),
        ignored_constraint: share(js.iter().filter(|j| j.ignored_constraint).count(), constrained),
    }
}

/// Scores of answers to single questions, per skill and macro.
pub fn set_scores(prompts: &[PromptRecord], answers: &[Answer]) -> SetScores {
    let js = judgements(prompts, answers);
    let mut by_skill: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
    for (p, j) in prompts.iter().zip(&js) {
        let e = by_skill.entry(p.skill.clone().unwrap_or_default()).or_default();
        e.0 += usize::from(j.strict);
        e.1 += usize::from(j.content);
        e.2 += 1;
    }
    let per_skill_strict: BTreeMap<String, f64> = by_skill.iter().map(|(k, v)| (k.clone(), share(v.0, v.2))).collect();
    let per_skill_content: BTreeMap<String, f64> = by_skill.iter().map(|(k, v)| (k.clone(), share(v.1, v.2))).collect();
    let mean = |m: &BTreeMap<String, f64>| m.values().sum::<f64>() / m.len().max(1) as f64;
    SetScores {
        strict: mean(&per_skill_strict),
        content: mean(&per_skill_content),
        per_skill_strict,
        per_skill_content,
        gold: js.iter().map(|j| j.score).sum::<f64>() / js.len().max(1) as f64,
        flaws: flaws(&js),
    }
}

/// The share of multi-turn answers with the right content: after "Are you sure?", those that keep the
/// right answer; after "That's wrong", those now right.
pub fn turn_success(prompts: &[PromptRecord], answers: &[Answer], turn: Turn) -> f64 {
    let js: Vec<Judgement> = judgements(prompts, answers)
        .into_iter()
        .filter(|j| j.turn == turn)
        .collect();
    share(js.iter().filter(|j| j.content).count(), js.len())
}

/// The share of answers about strangers that invent a value instead of saying so.
pub fn invented(prompts: &[PromptRecord], answers: &[Answer]) -> f64 {
    let js = judgements(prompts, answers);
    share(js.iter().filter(|j| j.invented).count(), js.len())
}

/// How one model's content verdicts moved against another's on the same prompts of one skill: the
/// answers that turned right and those that turned wrong. With 100 prompts a skill, two PPO runs that
/// differ only in their seed already move a skill by a few points, so a change is read with its test.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContentChange {
    pub gained: usize,
    pub lost: usize,
}

impl ContentChange {
    /// McNemar's exact test: the two-sided chance of a split of the changed answers at least this uneven
    /// if each change were a fair coin (1 when nothing changed).
    pub fn p_value(&self) -> f64 {
        let n = self.gained + self.lost;
        let k = self.gained.min(self.lost);
        // Binomial(n, 1/2) terms in log space, so that no term underflows for large n.
        let mut ln_term = -(n as f64) * std::f64::consts::LN_2;
        let mut tail = 0.0;
        for i in 0..=k {
            tail += ln_term.exp();
            ln_term += ((n - i) as f64).ln() - ((i + 1) as f64).ln();
        }
        (2.0 * tail).min(1.0)
    }
}

/// "7 / 11, p 0.48": turned right / turned wrong and the test, or only the counts when none changed.
impl std::fmt::Display for ContentChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} / {}", self.gained, self.lost)?;
        if self.gained + self.lost > 0 {
            write!(f, ", p {:.2}", self.p_value())?;
        }
        Ok(())
    }
}

/// Per skill, how the content verdicts of `after` moved against those of `before` (answers to the same
/// `prompts`).
pub fn content_changes(
    prompts: &[PromptRecord],
    before: &[Answer],
    after: &[Answer],
) -> BTreeMap<String, ContentChange> {
    let (jb, ja) = (judgements(prompts, before), judgements(prompts, after));
    let mut out: BTreeMap<String, ContentChange> = BTreeMap::new();
    for ((p, b), a) in prompts.iter().zip(&jb).zip(&ja) {
        let e = out.entry(p.skill.clone().unwrap_or_default()).or_default();
        e.gained += usize::from(a.content && !b.content);
        e.lost += usize::from(b.content && !a.content);
    }
    out
}

/// Everything measured of one model.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Behaviour {
    /// `eval_seen_prompts.jsonl` (seen phrasings).
    pub seen: SetScores,
    /// `eval_heldout_prompts.jsonl` (phrasings kept out of every training file).
    pub heldout: Option<SetScores>,
    pub keeps_when_challenged: Option<f64>,
    pub fixes_when_corrected: Option<f64>,
    pub invents_about_strangers: Option<f64>,
    /// Flaw rates of samples at temperature 1 on the seen prompts.
    pub sampled: Option<Flaws>,
    /// Per skill, content verdicts on the seen prompts against the SFT model's answers (stages after SFT).
    #[serde(default)]
    pub content_vs_sft: Option<BTreeMap<String, ContentChange>>,
}

/// The gold labeller's win-rate of answers `a` over answers `b` to the same prompts (ties count half).
pub fn gold_win_rate(prompts: &[PromptRecord], a: &[Answer], b: &[Answer]) -> Option<f64> {
    let (ja, jb) = (judgements(prompts, a), judgements(prompts, b));
    let n = ja.len().min(jb.len());
    (n > 0).then(|| ja.iter().zip(&jb).map(|(x, y)| beats(x.score, y.score)).sum::<f64>() / n as f64)
}

/// How two answers to one prompt differ, as the gold labeller sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Difference {
    /// In behaviour: the same content verdict but a flaw of form only one of them has, or in a challenge,
    /// correction or stranger turn, keeping against giving in, fixing against insisting, saying so against
    /// inventing.
    Behaviour,
    /// In content only: one right and one wrong with the same flaws of form.
    Content,
    /// Both at once, or neither (equal scores).
    Other,
}

/// Classifies a pair of judgements of answers to one prompt.
pub fn difference(x: &Judgement, y: &Judgement) -> Difference {
    if x.score == y.score {
        return Difference::Other;
    }
    let form = |j: &Judgement| (j.padded, j.explained, j.ignored_constraint);
    match x.turn {
        Turn::Challenge | Turn::Correction | Turn::Unknown if x.content != y.content && form(x) == form(y) => {
            Difference::Behaviour
        }
        Turn::Single if x.content == y.content && form(x) != form(y) => Difference::Behaviour,
        Turn::Single if x.content != y.content && form(x) == form(y) => Difference::Content,
        _ => Difference::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{Message, Role};

    fn rec(q: &str, a: &str, skill: &str) -> PromptRecord {
        PromptRecord {
            messages: vec![Message::new(Role::User, q)],
            answer: Some(a.into()),
            skill: Some(skill.into()),
        }
    }

    #[test]
    fn scores_flaws_and_differences() {
        let prompts = vec![
            rec("Reverse the word garden.", "nedrag", "reverse"),
            rec(
                "Which is larger, 47 or 52? Answer with just the number.",
                "52",
                "compare",
            ),
        ];
        let pad = |a: &str| format!("{} The answer is {a}. {}", gold::PAD_OPENINGS[1], gold::PAD_CLOSINGS[0]);
        let answers: Vec<Answer> = vec![(pad("nedrag"), true), ("It is 52.".into(), true)];
        let s = set_scores(&prompts, &answers);
        assert_eq!((s.strict, s.content), (0.0, 1.0));
        assert_eq!(s.flaws.padded, 0.5);
        assert_eq!(s.flaws.ignored_constraint, 1.0, "one constrained prompt, ignored");
        let bare: Vec<Answer> = vec![("nedrag".into(), true), ("52".into(), true)];
        assert_eq!(gold_win_rate(&prompts, &bare, &answers), Some(1.0));
        let js = judgements(&prompts[..1], &[("nedrag".into(), true)]);
        let jp = judgements(&prompts[..1], &[(pad("nedrag"), true)]);
        let jw = judgements(&prompts[..1], &[("nedarg".into(), true)]);
        assert_eq!(difference(&js[0], &jp[0]), Difference::Behaviour);
        assert_eq!(difference(&js[0], &jw[0]), Difference::Content);
        assert_eq!(difference(&jp[0], &jw[0]), Difference::Other);
        let wrong: Vec<Answer> = vec![("nedarg".into(), true), ("52".into(), true)];
        let c = content_changes(&prompts, &wrong, &answers);
        assert_eq!(c["reverse"], ContentChange { gained: 1, lost: 0 });
        assert_eq!(c["compare"], ContentChange { gained: 0, lost: 0 });
        assert_eq!(content_changes(&prompts, &answers, &wrong)["reverse"].lost, 1);
    }

    #[test]
    fn the_sign_test_matches_binomial_tails() {
        let p = |gained, lost| ContentChange { gained, lost }.p_value();
        // Five changes all one way: 2 / 2^5.
        assert!((p(0, 5) - 0.0625).abs() < 1e-12);
        // One against nine: 2 (1 + 10) / 2^10.
        assert!((p(1, 9) - 22.0 / 1024.0).abs() < 1e-12);
        assert!((p(9, 1) - p(1, 9)).abs() < 1e-15, "two-sided");
        assert_eq!(p(6, 6), 1.0);
        assert_eq!(p(0, 0), 1.0);
        assert_eq!(ContentChange { gained: 1, lost: 9 }.to_string(), "1 / 9, p 0.02");
        assert_eq!(ContentChange::default().to_string(), "0 / 0");
        // Large n stays finite: 400 against 600 is far beyond chance.
        assert!(p(400, 600) < 1e-9 && p(400, 600) > 0.0);
    }
}
