//! The simulated labeller: writes demonstrations as a careful human would (correct, concise, polite) and
//! ranks candidate answers by a fixed, documented policy.
//!
//! Policy: a correct answer always beats a wrong one; among answers of equal correctness, concise and polite
//! beats padded, which beats rude; an evasive non-answer or an answer that repeats itself without ending is
//! never correct and ranks below any attempt. As scores: see [`Kind::score`].

use crate::chat::Role;

use super::skills::{Ctx, Task};
use super::{Message, PrefPair, Ranking, Rng};

/// The kinds of candidate answer the labeller sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The bare correct answer: what the labeller writes.
    Correct,
    /// The correct answer wrapped in filler.
    Padded,
    /// The correct answer with a rude remark.
    Rude,
    /// A near-miss wrong answer, stated concisely.
    Wrong,
    /// A near-miss wrong answer wrapped in filler.
    PaddedWrong,
    /// A polite refusal that never answers.
    Evasive,
    /// The answer repeated over and over, never ending cleanly.
    Repeating,
}

impl Kind {
    /// The labeller's score: 10 for a correct answer, minus a style penalty.
    pub fn score(self) -> i32 {
        match self {
            Kind::Correct => 10,
            Kind::Padded => 8,
            Kind::Rude => 7,
            Kind::Wrong => 0,
            Kind::PaddedWrong => -2,
            Kind::Evasive => -4,
            Kind::Repeating => -5,
        }
    }

    /// Worse kinds that a ranking may list under the correct answer.
    const RIVALS: [Kind; 5] = [
        Kind::Padded,
        Kind::Rude,
        Kind::PaddedWrong,
        Kind::Evasive,
        Kind::Repeating,
    ];
}

const SYSTEM_PROMPTS: [&str; 3] = [
    "You are a helpful assistant.",
    "You are Talaria, a careful and polite assistant. Answer briefly.",
    "Answer the user's question correctly and concisely.",
];

const PAD_OPENINGS: [&str; 4] = [
    "Sure! That is a great question, and I am always happy to help with things like this.",
    "Of course! Let me think about this carefully before I answer.",
    "What an interesting question! I would be delighted to help you with it.",
    "Thank you for asking. Questions like this are a lot of fun to work through.",
];

const PAD_CLOSINGS: [&str; 3] = [
    "I hope this helps, and please let me know if there is anything else you would like to know!",
    "Feel free to ask me more questions whenever you like.",
    "Let me know if you would like me to explain how I got there.",
];

const RUDE: [&str; 4] = [
    "Obviously it is {}. Try to work it out yourself next time.",
    "{}. That was not hard; why ask me?",
    "Ugh, fine: {}. Stop wasting my time.",
    "It is {}, as anyone could see.",
];

const EVASIVE: [&str; 4] = [
    "I am not able to answer that.",
    "That is hard to say; it depends on many things.",
    "You could probably look that up yourself.",
    "I would rather not guess about that.",
];

const CORRECTIONS: [&str; 3] = [
    "That's not right. Could you check again?",
    "I think that is wrong.",
    "Are you sure? That doesn't look correct.",
];

const ADMISSIONS: [&str; 3] = [
    "You're right, I'm sorry about that. The correct answer is {}.",
    "I apologise, I made a mistake. The answer is {}.",
    "Thank you for pointing that out. The correct answer is {}.",
];

/// Writes a candidate answer of the given kind for a task.
pub fn render(kind: Kind, task: &Task, ctx: &Ctx, rng: &mut Rng) -> String {
    let padded = |content: &str, rng: &mut Rng| {
        format!(
            "{} The answer is {content}. {}",
            rng.pick(&PAD_OPENINGS),
            rng.pick(&PAD_CLOSINGS)
        )
    };
    match kind {
        Kind::Correct => task.answer.clone(),
        Kind::Padded => padded(&task.answer, rng),
        Kind::Rude => rng.pick(&RUDE).replace("{}", &task.answer),
        Kind::Wrong => ctx.near_miss(task, rng),
        Kind::PaddedWrong => {
            let wrong = ctx.near_miss(task, rng);
            padded(&wrong, rng)
        }
        Kind::Evasive => rng.pick(&EVASIVE).to_string(),
        Kind::Repeating => {
            let content = if rng.chance(0.5) {
                task.answer.clone()
            } else {
                ctx.near_miss(task, rng)
            };
            let unit = if rng.chance(0.5) {
                content
            } else {
                format!("The answer is {content}.")
            };
            vec![unit; 8 + rng.below(8)].join(" ")
        }
    }
}

/// The prompt messages for a task: an optional system message, then the user's question.
pub fn prompt(task: &Task, rng: &mut Rng) -> Vec<Message> {
    let mut out = Vec::with_capacity(2);
    if rng.chance(0.2) {
        out.push(Message::new(Role::System, rng.pick(&SYSTEM_PROMPTS)));
    }
    out.push(Message::new(Role::User, &task.question));
    out
}

/// A demonstration conversation for `task`; `second` is a further task for two-question conversations.
/// Some conversations have the user point out a wrong first answer (kept with `weight: 0`, so SFT does not
/// learn it) and the assistant admit and correct it; some have the user doubt a right answer, which the
/// assistant politely keeps.
pub fn demonstration(task: &Task, second: &Task, ctx: &Ctx, rng: &mut Rng) -> Vec<Message> {
    let mut msgs = prompt(task, rng);
    let roll = rng.below(100);
    if roll < 8 {
        let mut wrong = Message::new(Role::Assistant, ctx.near_miss(task, rng));
        wrong.weight = Some(0);
        msgs.push(wrong);
        msgs.push(Message::new(Role::User, rng.pick(&CORRECTIONS)));
        msgs.push(Message::new(
            Role::Assistant,
            rng.pick(&ADMISSIONS).replace("{}", &task.answer),
        ));
    } else if roll < 11 {
        msgs.push(Message::new(Role::Assistant, &task.answer));
        msgs.push(Message::new(Role::User, "Are you sure?"));
        msgs.push(Message::new(
            Role::Assistant,
            format!("Yes, I am sure. The answer is {}.", task.answer),
        ));
    } else if roll < 17 {
        msgs.push(Message::new(Role::Assistant, &task.answer));
        msgs.push(Message::new(Role::User, &second.question));
        msgs.push(Message::new(Role::Assistant, &second.answer));
    } else {
        msgs.push(Message::new(Role::Assistant, &task.answer));
        if roll < 20 {
            msgs.push(Message::new(
                Role::User,
                rng.pick(&["Thank you!", "Thanks, that helps.", "Great, thanks."]),
            ));
            msgs.push(Message::new(
                Role::Assistant,
                rng.pick(&[
                    "You're welcome!",
                    "Glad I could help.",
                    "You're welcome. Happy to help.",
                ]),
            ));
        }
    }
    msgs
}

/// A preference pair: the labeller's correct, concise answer against one realistic worse answer: 40% concise
/// near-miss wrong answers (only correctness tells them apart), the rest stylistic failures.
pub fn pair(task: &Task, ctx: &Ctx, rng: &mut Rng) -> PrefPair {
    let rejected_kind = match rng.below(100) {
        0..40 => Kind::Wrong,
        40..54 => Kind::Padded,
        54..65 => Kind::Rude,
        65..71 => Kind::PaddedWrong,
        71..86 => Kind::Evasive,
        _ => Kind::Repeating,
    };
    PrefPair {
        prompt: prompt(task, rng),
        chosen: render(Kind::Correct, task, ctx, rng),
        rejected: render(rejected_kind, task, ctx, rng),
    }
}

/// A K-way ranking (K = 3 or 4), best first: the correct answer, a near-miss wrong one, and others.
pub fn ranking(task: &Task, ctx: &Ctx, rng: &mut Rng) -> Ranking {
    let k = 3 + rng.below(2);
    let mut rivals = Kind::RIVALS.to_vec();
    rng.shuffle(&mut rivals);
    let mut kinds = vec![Kind::Correct, Kind::Wrong];
    kinds.extend_from_slice(&rivals[..k - 2]);
    kinds.sort_by_key(|k| -k.score());
    let prompt = prompt(task, rng);
    Ranking {
        prompt,
        ranked: kinds.into_iter().map(|kind| render(kind, task, ctx, rng)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synth::skills::{Bucket, Skill};
    use crate::data::synth::verify::{is_correct, normalise};

    #[test]
    fn policy_prefers_correct_then_polite() {
        let ctx = Ctx::new(5);
        let mut rng = Rng::new(5, 1);
        for skill in Skill::ALL {
            for _ in 0..100 {
                let task = ctx.sample(skill, Bucket::Train, &mut rng);
                let p = pair(&task, &ctx, &mut rng);
                assert!(is_correct(&task.answer, skill.name(), &p.chosen));
                assert!(!is_correct(&task.answer, skill.name(), &p.rejected), "{p:?}");
                assert_ne!(normalise(&p.chosen), normalise(&p.rejected));
                let r = ranking(&task, &ctx, &mut rng);
                assert!((3..=4).contains(&r.ranked.len()));
                assert_eq!(r.ranked[0], task.answer);
                assert!(r.ranked[1..].iter().all(|a| !is_correct(&task.answer, skill.name(), a)));
            }
        }
        let mut scores: Vec<i32> = [Kind::Correct, Kind::Wrong]
            .into_iter()
            .chain(Kind::RIVALS)
            .map(Kind::score)
            .collect();
        scores.sort_unstable();
        scores.dedup();
        assert_eq!(scores.len(), 7, "every kind has its own rank");
        assert!(Kind::Rude.score() > Kind::Wrong.score(), "correctness first");
    }

    #[test]
    fn corrections_hide_the_wrong_turn_from_sft() {
        let ctx = Ctx::new(8);
        let mut rng = Rng::new(8, 2);
        let mut seen = 0;
        for _ in 0..400 {
            let task = ctx.sample(Skill::Reverse, Bucket::Train, &mut rng);
            let second = ctx.sample(Skill::Sort, Bucket::Train, &mut rng);
            let msgs = demonstration(&task, &second, &ctx, &mut rng);
            assert_eq!(msgs.last().unwrap().role, Role::Assistant);
            for m in msgs.iter().filter(|m| m.weight == Some(0)) {
                assert!(!is_correct(&task.answer, "reverse", &m.content));
                seen += 1;
            }
        }
        assert!(seen > 10);
    }
}
