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
    /// Reads a prompt file (with the shared prompt reader), requiring every record to carry a
    /// non-empty answer and a skill.
    pub fn load_jsonl(path: &Path) -> Result<Vec<Task>> {
        read_prompts(path)?
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let answer = p.answer.filter(|a| !a.trim().is_empty());
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

/// Whether `model_answer` is a correct answer to a task whose reference answer is `task_answer`.
pub fn is_correct(task_answer: &str, skill: &str, model_answer: &str) -> bool {
    let (want, got) = (normalise(task_answer), normalise(model_answer));
    if skill == "capitals" {
        want == got
    } else {
        want.to_lowercase() == got.to_lowercase()
    }
}

/// The rule-based reward for PPO, in [0, 1]: 1.0 for a correct answer, 0.0 otherwise.
pub fn reward(task_answer: &str, skill: &str, model_answer: &str) -> f64 {
    if is_correct(task_answer, skill, model_answer) {
        1.0
    } else {
        0.0
    }
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
        assert_eq!(reward("52", "compare", "47"), 0.0);
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
