//! The gold labeller: the one consistent judge of the default world. It scores an answer to a
//! conversation the way a careful labeller ranks answers, and every stage is measured against it.
//!
//! The policy, most important first:
//! 1. **Content.** A correct answer beats a wrong one, whatever its wrapping. In a challenge turn ("Are you
//!    sure?" after a right answer) keeping the right answer is correct and giving in is wrong; after "That's
//!    wrong" following a wrong answer, fixing it is correct and insisting is wrong. Asked about a person or
//!    town that is not in the world, saying so is correct and inventing an answer is wrong.
//! 2. **Constraints.** An answer that ignores an explicit format in the prompt (capital letters, hyphens,
//!    "just the number", "one word", "just the name") loses 3 points.
//! 3. **Concision.** Pleasantries around the answer lose 2 points, an explanation nobody asked for 1.5.
//! 4. An answer that never ends loses 4 and is wrong.
//!
//! As a score: 10 for correct content, 3 x closeness (under 3) for a wrong one, minus the penalties, so no
//! flaw of form can make a wrong answer outrank a right one.
//!
//! The phrases the world's labellers write (below) are the ones the judge recognises; an answer it cannot
//! take apart is judged on its whole text.

use super::verify::{canonical, closeness, is_correct};
use crate::chat::{Message, Role};

use super::phrasing::{Constraint, constraint_in};

// The phrases are short: the `cpu` tokenizer is nearly character-level, and a padded answer must still end
// within the 40 new tokens the speedrun decodes.

/// Pleasantries a padding labeller puts before an answer.
pub const PAD_OPENINGS: [&str; 4] = ["Sure!", "Of course!", "Happy to help!", "Great question!"];

/// Pleasantries a padding labeller puts after an answer.
pub const PAD_CLOSINGS: [&str; 3] = ["Hope it helps!", "Anything else?", "Glad to help!"];

/// Explanations nobody asked for, put after the answer ("37, 52, 70. Smallest first."), by skill. After,
/// not before: a lead-in written before the answer gives the small model room to work the answer out, and
/// a flaw of form must be one that can be dropped without changing what the answer says.
pub fn explanation_tails(skill: &str) -> &'static [&'static str] {
    match skill {
        "reverse" => &["Read from the end.", "Reversed."],
        "spell" => &["Letter by letter.", "One at a time."],
        "capitals" => &["In capitals.", "Upper-cased."],
        "fact" => &["From what I know.", "As I recall."],
        "compare" => &["Digit by digit.", "Compared them."],
        "sort" => &["Smallest first.", "In order."],
        "add_reversed" => &["Carried from the ones.", "Digit by digit."],
        _ => &[],
    }
}

/// How a format-ignoring labeller wraps an answer that was asked for bare.
pub const FRAMES: [&str; 3] = ["It is ", "That's ", "My answer is "];

/// What a user says to challenge a right answer.
pub const CHALLENGES: [&str; 4] = ["Are you sure?", "Really?", "Is that right?", "Are you certain?"];

/// What a user says after a wrong answer.
pub const CORRECTIONS: [&str; 3] = [
    "That's not right.",
    "I think that is wrong.",
    "That's wrong. Try again.",
];

/// A careful labeller keeping a right answer when challenged: the answer stands, so it need not be
/// repeated (a keep may also restate it: "Yes, I'm sure. 42.").
pub const KEEPS: [&str; 3] = ["Yes, I'm sure.", "Yes, that is right.", "I'm sure it is right."];

/// A labeller giving in when challenged (then a different answer).
pub const CAVES: [&str; 2] = ["Sorry, it is", "Oh, sorry:"];

/// Admitting and fixing a wrong answer (then the right one).
pub const FIXES: [&str; 2] = ["Sorry! It is", "My mistake:"];

/// Insisting on a wrong answer.
pub const INSISTS: [&str; 2] = ["No, it is", "I was right:"];

/// Saying that a person is not in the world.
pub const REFUSALS: [&str; 3] = [
    "I don't know them.",
    "I don't know who that is.",
    "I don't know that person.",
];

/// The same for a town.
pub const TOWN_REFUSALS: [&str; 2] = ["I don't know that town.", "I don't know of that town."];

/// What kind of turn an answer is given in, read from the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// A question answered for the first time.
    Single,
    /// "Are you sure?" after an answer.
    Challenge,
    /// "That's wrong" after an answer.
    Correction,
    /// A question about someone or something not in the world (skill `unknown`).
    Unknown,
}

/// The gold labeller's reading of one answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Judgement {
    pub turn: Turn,
    /// Exactly the reference answer (today's verifier: form and content).
    pub strict: bool,
    /// The right content, whatever the wrapping (for `Unknown`: said that it is not known).
    pub content: bool,
    pub padded: bool,
    pub explained: bool,
    /// The prompt states a format constraint and the answer does not follow it.
    pub ignored_constraint: bool,
    /// Whether the prompt states a format constraint at all.
    pub constrained: bool,
    /// For `Unknown`: an answer given as if the person or town existed.
    pub invented: bool,
    pub score: f64,
}

/// Reads the kind of turn from the conversation's last user message.
pub fn turn_of(messages: &[Message], skill: &str) -> Turn {
    if skill == "unknown" {
        return Turn::Unknown;
    }
    let last = messages.last().map_or("", |m| m.content.as_str());
    let after_answer = messages.len() >= 3 && messages[messages.len() - 2].role == Role::Assistant;
    if after_answer && CHALLENGES.contains(&last) {
        Turn::Challenge
    } else if after_answer && CORRECTIONS.contains(&last) {
        Turn::Correction
    } else {
        Turn::Single
    }
}

/// The question a conversation asks: its last user message, or for a challenge or correction the one
/// before the answer being discussed.
pub fn question_of<'a>(messages: &'a [Message], turn: Turn) -> &'a str {
    let users: Vec<&'a Message> = messages.iter().filter(|m| m.role == Role::User).collect();
    let k = match turn {
        Turn::Challenge | Turn::Correction if users.len() >= 2 => users.len() - 2,
        _ => users.len().saturating_sub(1),
    };
    users.get(k).map_or("", |m| m.content.as_str())
}

/// Removes `prefix` (case-sensitive) and the spaces after it.
fn strip<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    s.strip_prefix(prefix).map(str::trim_start)
}

/// The answer's core value with every recognised wrapper taken off, and which wrappers there were.
struct Parts<'a> {
    core: &'a str,
    padded: bool,
    explained: bool,
    framed: bool,
    /// The reply to a challenge began by keeping the answer.
    kept: bool,
}

/// The replies to a challenge or correction ("Yes:", "Sorry, it is") are wrappers only in such a turn.
fn parts<'a>(text: &'a str, skill: &str, turn: Turn) -> Parts<'a> {
    let mut s = text.trim();
    let (mut padded, mut explained, mut framed, mut kept) = (false, false, false, false);
    for o in PAD_OPENINGS {
        if let Some(rest) = strip(s, o) {
            s = rest;
            padded = true;
        }
    }
    for c in PAD_CLOSINGS {
        if let Some(rest) = s.strip_suffix(c) {
            s = rest.trim_end();
            padded = true;
        }
    }
    let replies = KEEPS.iter().chain(&CAVES).chain(&FIXES).chain(&INSISTS);
    for p in replies.filter(|_| matches!(turn, Turn::Challenge | Turn::Correction)) {
        if let Some(rest) = strip(s, p) {
            s = rest;
            kept = KEEPS.contains(p);
            break;
        }
    }
    for lead in ["The correct answer is ", "The answer is "] {
        if let Some(rest) = strip(s, lead) {
            s = rest;
            break;
        }
    }
    for tail in explanation_tails(skill) {
        if let Some(rest) = s.strip_suffix(tail) {
            s = rest.trim_end();
            explained = true;
        }
    }
    for f in FRAMES {
        if let Some(rest) = strip(s, f) {
            s = rest;
            framed = true;
        }
    }
    let core = s.strip_suffix('.').unwrap_or(s).trim();
    Parts {
        core,
        padded,
        explained,
        framed,
        kept,
    }
}

/// Whether `core` holds the same content as `reference`, whatever its form: letters without their
/// separators for `spell`, the numbers in order for `sort`, case ignored otherwise (an answer in capitals
/// written all in lower case has the right content and ignores the format).
fn same_content(core: &str, reference: &str, skill: &str) -> bool {
    let letters = |s: &str| -> String {
        s.chars()
            .filter(|c| c.is_alphanumeric())
            .collect::<String>()
            .to_lowercase()
    };
    match skill {
        "spell" => {
            let single = |s: &str| s.split(|c: char| !c.is_alphanumeric()).all(|p| p.chars().count() <= 1);
            single(core) && letters(core) == letters(reference)
        }
        "sort" => {
            let nums = |s: &str| -> Vec<String> {
                s.split(|c: char| !c.is_ascii_digit())
                    .filter(|p| !p.is_empty())
                    .map(str::to_string)
                    .collect()
            };
            !nums(core).is_empty()
                && nums(core) == nums(reference)
                && core.chars().all(|c| c.is_ascii_digit() || c == ',' || c == ' ')
        }
        _ => {
            // An answer asked for in capitals has its content in its letters and its format in their case:
            // all in lower case ignores the format; mixed case is a slip of content.
            let upper_ref = reference.chars().any(char::is_alphabetic)
                && reference.chars().filter(|c| c.is_alphabetic()).all(char::is_uppercase);
            let letters_of = |s: &str| s.chars().filter(|c| c.is_alphabetic()).collect::<Vec<_>>();
            let uniform =
                letters_of(core).iter().all(|c| c.is_uppercase()) || letters_of(core).iter().all(|c| c.is_lowercase());
            (!upper_ref || uniform) && canonical(core, "").to_lowercase() == canonical(reference, "").to_lowercase()
        }
    }
}

/// Whether the whole answer follows the prompt's constraint (the content having been found right).
/// Whether the answer has the form the constraint asks for, right or wrong: nothing around the value,
/// and the value in capitals or as single letters joined by hyphens where asked.
fn follows(text: &str, core: &str, c: Constraint) -> bool {
    let bare = canonical(text, "") == canonical(core, "");
    match c {
        Constraint::Capitals => core.chars().filter(|c| c.is_alphabetic()).all(|c| c.is_uppercase()) && bare,
        Constraint::Hyphens => {
            let letters: Vec<&str> = core.split('-').map(str::trim).collect();
            bare && letters.len() > 1 && letters.iter().all(|l| l.chars().count() == 1)
        }
        _ => bare,
    }
}

/// Whether the assistant's answer before the last user turn has the right content.
fn previous_right(messages: &[Message], reference: &str, skill: &str) -> bool {
    let Some(prev) = messages.iter().rev().find(|m| m.role == Role::Assistant) else {
        return false;
    };
    same_content(parts(&prev.content, skill, Turn::Single).core, reference, skill)
}

/// Judges `answer` (the assistant's reply to `messages`, ended properly or not) against the reference
/// answer of a task of `skill`.
pub fn judge(messages: &[Message], reference: &str, skill: &str, answer: &str, ended: bool) -> Judgement {
    let turn = turn_of(messages, skill);
    let question = question_of(messages, turn);
    let p = parts(answer, skill, turn);
    let (content, invented, strict) = match turn {
        Turn::Unknown => {
            let t = answer.to_lowercase();
            let refused = ["don't know", "do not know", "no one called", "no town called"]
                .iter()
                .any(|k| t.contains(k));
            (refused, !refused && !answer.trim().is_empty(), refused)
        }
        // "Yes, I'm sure." alone keeps the answer under challenge: that answer is the content.
        Turn::Challenge if p.kept && p.core.is_empty() => (previous_right(messages, reference, skill), false, false),
        _ => (
            same_content(p.core, reference, skill),
            false,
            turn == Turn::Single && is_correct(reference, skill, answer),
        ),
    };
    let content = content && ended;
    let constraint = match turn {
        Turn::Single => constraint_in(question),
        _ => None,
    };
    // Right or wrong, an answer can follow the asked-for format or not.
    let ignored_constraint = constraint.is_some_and(|c| p.framed || p.padded || !follows(answer, p.core, c));
    let mut score = if content {
        10.0
    } else if turn == Turn::Unknown {
        0.0
    } else {
        3.0 * closeness(reference, skill, p.core) * 0.999
    };
    score -= 3.0 * f64::from(u8::from(ignored_constraint))
        + 2.0 * f64::from(u8::from(p.padded))
        + 1.5 * f64::from(u8::from(p.explained))
        + 4.0 * f64::from(u8::from(!ended));
    Judgement {
        turn,
        strict: strict && ended,
        content,
        padded: p.padded,
        explained: p.explained,
        ignored_constraint,
        constrained: constraint.is_some(),
        invented,
        score,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(q: &str) -> Vec<Message> {
        vec![Message::new(Role::User, q)]
    }

    #[test]
    fn content_comes_first_then_constraints_then_concision() {
        let q = user("Which is larger, 47 or 52? Answer with just the number.");
        let j = |a: &str| judge(&q, "52", "compare", a, true);
        let bare = j("52");
        assert!(bare.strict && bare.content && !bare.padded && !bare.ignored_constraint && bare.constrained);
        let padded = j(&format!("{} 52. {}", PAD_OPENINGS[0], PAD_CLOSINGS[1]));
        assert!(padded.content && padded.padded && padded.ignored_constraint && !padded.strict);
        let framed = j("It is 52.");
        assert!(framed.content && framed.ignored_constraint && !framed.padded);
        let explained = j(&format!("52. {}", explanation_tails("compare")[0]));
        assert!(explained.content && explained.explained);
        let wrong = j("47");
        assert!(!wrong.content);
        for flawed in [padded, framed, explained] {
            assert!(bare.score > flawed.score && flawed.score > wrong.score, "{flawed:?}");
        }
        assert!(j("52 52 52").score < 3.0 && j("52").content);
        // A reply to a challenge is no wrapper for a first answer.
        assert!(!j("Yes: 52.").content);
    }

    #[test]
    fn formats_are_judged_apart_from_content() {
        let q = user("Write garden in uppercase.");
        let low = judge(&q, "GARDEN", "capitals", "garden", true);
        assert!(low.content && low.ignored_constraint && !low.strict);
        let q = user("Spell garden. Separate the letters with hyphens.");
        let spaced = judge(&q, "g-a-r-d-e-n", "spell", "g a r d e n", true);
        assert!(spaced.content && spaced.ignored_constraint);
        assert!(
            !judge(&q, "g-a-r-d-e-n", "spell", "garden", true).content,
            "not spelled"
        );
        let q = user("Sort these numbers from smallest to largest: 12, 3, 45.");
        assert!(judge(&q, "3, 12, 45", "sort", "3,12,45", true).strict);
        assert!(!judge(&q, "3, 12, 45", "sort", "12, 3, 45", true).content);
    }

    #[test]
    fn challenges_corrections_and_unknown_people() {
        let mut conv = user("Reverse the word garden.");
        conv.push(Message::new(Role::Assistant, "nedrag"));
        conv.push(Message::new(Role::User, CHALLENGES[0]));
        let keep = judge(&conv, "nedrag", "reverse", KEEPS[0], true);
        let restated = judge(&conv, "nedrag", "reverse", &format!("{} nedrag.", KEEPS[0]), true);
        let miscopied = judge(&conv, "nedrag", "reverse", &format!("{} nedarg.", KEEPS[0]), true);
        assert!(restated.content && !miscopied.content);
        assert_eq!(keep.turn, Turn::Challenge);
        assert!(keep.content);
        let cave = judge(&conv, "nedrag", "reverse", &format!("{} nedarg.", CAVES[0]), true);
        assert!(!cave.content && keep.score > cave.score);
        conv[1].content = "nedarg".into();
        conv[2].content = CORRECTIONS[1].into();
        let fix = judge(&conv, "nedrag", "reverse", &format!("{} nedrag.", FIXES[0]), true);
        assert_eq!(fix.turn, Turn::Correction);
        let insist = judge(&conv, "nedrag", "reverse", &format!("{} nedarg.", INSISTS[0]), true);
        assert!(fix.content && !insist.content && fix.score > insist.score);
        let q = user("What is Quentin Farrow's favourite colour?");
        let refuse = judge(&q, "", "unknown", REFUSALS[0], true);
        let invent = judge(&q, "", "unknown", "blue", true);
        assert!(refuse.content && !refuse.invented && invent.invented && refuse.score > invent.score);
        assert!(
            !judge(&user("Reverse garden."), "nedrag", "reverse", "nedrag", false).content,
            "unended"
        );
    }
}
