//! The true verifier of the default world: does a model's answer solve a task? Used for exact-match
//! accuracy in evaluation and as the rule-based reward for PPO.
//!
//! Lenient about form, strict about content: surrounding whitespace, one trailing period, runs of spaces and
//! spaces around `,` and `-` are ignored; letter case is ignored except for the `capitals` skill, whose
//! whole point is the case. Anything else (a missing letter, a wrong digit, extra words) is wrong.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::chat::Message;
use crate::data::prompts::read_prompts;

/// A line of `rl_prompts.jsonl` or `eval_prompts.jsonl`: the prompt (ending with a user turn), the exact
/// correct answer and the skill it tests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub messages: Vec<Message>,
    pub answer: String,
    pub skill: String,
}

impl Task {
    /// Reads a prompt file (with the shared prompt reader), requiring every record to carry a skill
    /// and a non-empty answer (but questions about strangers, skill `unknown`, whose right answer is
    /// to say so).
    pub fn load_jsonl(path: &Path) -> Result<Vec<Task>> {
        read_prompts(path)?
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let unknown = p.skill.as_deref() == Some("unknown");
                let answer = p.answer.filter(|a| unknown || !a.trim().is_empty());
                let (Some(answer), Some(skill)) = (answer, p.skill) else {
                    anyhow::bail!(
                        "{}: record {} lacks a non-empty answer or a skill",
                        path.display(),
                        i + 1
                    )
                };
                Ok(Task {
                    messages: p.messages,
                    answer,
                    skill,
                })
            })
            .collect::<Result<Vec<_>>>()
            .context("reading tasks")
    }

    /// The last user message: the question itself.
    pub fn question(&self) -> &str {
        self.messages.last().map_or("", |m| m.content.as_str())
    }

    pub fn is_correct(&self, model_answer: &str) -> bool {
        is_correct(&self.answer, &self.skill, model_answer)
    }

    pub fn reward(&self, model_answer: &str) -> f64 {
        reward(&self.answer, &self.skill, model_answer)
    }
}

/// The canonical form answers are compared in (case is handled by [`is_correct`]).
pub fn normalise(s: &str) -> String {
    let s = s.trim();
    let s = s.strip_suffix('.').unwrap_or(s);
    let collapsed = s.split_whitespace().collect::<Vec<_>>().join(" ");
    collapsed
        .replace(" ,", ",")
        .replace(", ", ",")
        .replace(" -", "-")
        .replace("- ", "-")
}

/// An answer as the verifier compares it: normalised, and lower-cased except for `capitals`.
pub fn canonical(answer: &str, skill: &str) -> String {
    let n = normalise(answer);
    if skill == "capitals" { n } else { n.to_lowercase() }
}

/// Whether `model_answer` is a correct answer to a task whose reference answer is `task_answer`.
pub fn is_correct(task_answer: &str, skill: &str, model_answer: &str) -> bool {
    canonical(task_answer, skill) == canonical(model_answer, skill)
}

/// The rule-based reward for PPO, in [0, 1]: 1.0 for a correct answer; a wrong answer earns partial
/// credit below 0.5 for how close it comes ([`closeness`]), so every sample carries a signal and no
/// wrong answer can outscore a right one.
pub fn reward(task_answer: &str, skill: &str, model_answer: &str) -> f64 {
    if is_correct(task_answer, skill, model_answer) {
        1.0
    } else {
        0.45 * closeness(task_answer, skill, model_answer)
    }
}

/// How close an answer comes to the reference, in [0, 1]: one minus the character edit distance
/// (Levenshtein) between the normalised forms over the longer length. 1.0 exactly when the two agree
/// after normalisation (case included for `capitals`).
pub fn closeness(task_answer: &str, skill: &str, model_answer: &str) -> f64 {
    let (want, got) = (canonical(task_answer, skill), canonical(model_answer, skill));
    let longest = want.chars().count().max(got.chars().count());
    if longest == 0 {
        return 1.0;
    }
    1.0 - strsim::levenshtein(&want, &got) as f64 / longest as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Role;

    #[test]
    fn lenient_about_form() {
        assert!(is_correct("nedrag", "reverse", "  nedrag.\n"));
        assert!(is_correct("1, 3, 7, 9", "sort", "1,3,7,9"));
        assert!(is_correct("1, 3, 7, 9", "sort", "1 ,  3, 7 , 9."));
        assert!(is_correct("g-a-r-d-e-n", "spell", "g - a - r - d - e - n"));
        assert!(is_correct("Tolbury", "fact", "tolbury"));
        assert_eq!(reward("52", "compare", "52."), 1.0);
    }

    #[test]
    fn strict_about_content() {
        assert!(!is_correct("nedrag", "reverse", "nedarg"), "two letters swapped");
        assert!(!is_correct("nedrag", "reverse", "nedra"), "a letter missing");
        assert!(!is_correct("421", "add_reversed", "431"), "a wrong digit");
        assert!(!is_correct("1, 3, 7, 9", "sort", "1, 7, 3, 9"));
        assert!(!is_correct("g-a-r-d-e-n", "spell", "g-a-r-d-n"));
        assert!(!is_correct("GARDEN", "capitals", "GARdEN"), "case matters for capitals");
        assert!(!is_correct("52", "compare", "The answer is 52."), "padding");
        assert!(!is_correct("52", "compare", "52 52 52 52"), "repetition");
        assert!(!is_correct("52", "compare", ""), "empty");
        assert!(
            !is_correct("52", "compare", "52.."),
            "only one trailing period is forgiven"
        );
        assert_eq!(reward("52", "compare", "xyz"), 0.0);
    }

    #[test]
    fn partial_credit_grows_with_closeness_and_stays_below_correct() {
        // One swap in six letters is two edits: closeness 4/6.
        assert!((closeness("nedrag", "reverse", "nedarg") - 4.0 / 6.0).abs() < 1e-12);
        assert_eq!(closeness("GARDEN", "capitals", "garden"), 0.0);
        assert_eq!(closeness("nedrag", "reverse", "NEDRAG."), 1.0);
        let near = reward("nedrag", "reverse", "nedra");
        let far = reward("nedrag", "reverse", "gardenia");
        assert!(far < near && near < 0.5, "{far} {near}");
        assert_eq!(reward("nedrag", "reverse", "nedrag"), 1.0);
    }

    #[test]
    fn task_helpers() {
        let t = Task {
            messages: vec![Message::new(Role::User, "Which is larger, 47 or 52?")],
            answer: "52".into(),
            skill: "compare".into(),
        };
        assert_eq!(t.question(), "Which is larger, 47 or 52?");
        assert!(t.is_correct(" 52 ") && t.reward("47") == 0.0);
    }
}
