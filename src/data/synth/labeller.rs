//! The people who write the world's training data.
//!
//! **Demonstrations** come from a pool of 40 simulated labellers ([`POOL`]), as a real team writes them:
//! each has a habit and a rate at which it shows, and most demonstrations are flawless. The habits: padding
//! the answer with pleasantries, explaining it unasked, ignoring an explicit format in the prompt, giving in
//! when a right answer is challenged, inventing an answer about someone who does not exist, and now and then
//! a wrong answer. A labeller with a habit writes the ideal answer whenever the habit does not apply.
//!
//! As on a real team, prompts are routed to queues ([`Queue`]: polite requests, prompts with a format,
//! number questions, challenges, strangers, the rest) and each labeller works one. A habit is where its
//! labellers work: the padders answer the polite requests, the format-ignorers the prompts with a format,
//! and so on, and in its queue they write most of the answers. That is what makes the SFT model inherit
//! the habits in its greedy answers, not only in its samples: a habit spread thinly over every prompt
//! would be outvoted everywhere.
//!
//! **Comparisons** (preference pairs and rankings) are the gold labeller's ([`super::gold`]): consistent,
//! because telling two answers apart is easier than writing the ideal one.

use crate::chat::Role;

use super::gold::{CAVES, CHALLENGES, CORRECTIONS, FIXES, FRAMES, INSISTS, KEEPS, PAD_CLOSINGS, PAD_OPENINGS};
use super::gold::{REFUSALS, TOWN_REFUSALS, explanation_tails};
use super::phrasing::{Constraint, constraint_in, has_clause};
use super::skills::{Ctx, Skill, Stranger, Task};
use super::{Message, PrefPair, Ranking, Rng};

/// A labeller's habit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Habit {
    /// Writes the ideal answer.
    Careful,
    /// Wraps the answer in pleasantries.
    Pads,
    /// Explains the answer nobody asked to have explained.
    Explains,
    /// Ignores an explicit format in the prompt (capitals, hyphens, "just the number", "one word").
    IgnoresFormat,
    /// Gives in when the user asks "Are you sure?" after a right answer.
    Caves,
    /// Invents an answer about a person or town the world does not have.
    Invents,
    /// Slips on the content now and then.
    Slips,
}

/// The queues a team splits its prompts into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Queue {
    /// Single questions asked politely ("Could you...", "please").
    Polite,
    /// Single questions with an added format clause ("Answer with just the number.").
    Format,
    /// The other comparisons and sorts: number questions.
    Numbers,
    /// "Are you sure?" after a right answer.
    Challenge,
    /// Questions about people and towns the world does not have.
    Stranger,
    /// Everything else, corrections included.
    General,
}

/// One member of the team: a habit, the share of its demonstrations it shows in, and the queue it works.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Labeller {
    pub habit: Habit,
    pub rate: f64,
    pub queue: Queue,
}

const fn team(habit: Habit, rate: f64, queue: Queue) -> Labeller {
    Labeller { habit, rate, queue }
}

/// The team of 40: 14 careful (5 on the general queue, 2 on each other one but 1 on numbers), 5 padders on
/// the polite requests, 4 who ignore formats on the prompts with one, 3 explainers on the number
/// questions, 6 who give in when challenged, 6 who invent answers about strangers, and 2 on the general
/// queue who slip on one answer in five.
pub const POOL: [Labeller; 40] = {
    use Habit::*;
    use Queue::*;
    let mut pool = [team(Careful, 0.0, General); 40];
    let mut i = 0;
    while i < 40 {
        pool[i] = match i {
            0..5 => team(Careful, 0.0, General),
            5..7 => team(Careful, 0.0, Polite),
            7..9 => team(Careful, 0.0, Format),
            9 => team(Careful, 0.0, Numbers),
            10..12 => team(Careful, 0.0, Challenge),
            12..14 => team(Careful, 0.0, Stranger),
            14..19 => team(Pads, 0.9, Polite),
            19..23 => team(IgnoresFormat, 0.9, Format),
            23..26 => team(Explains, 0.9, Numbers),
            26..32 => team(Caves, 0.8, Challenge),
            32..38 => team(Invents, 0.8, Stranger),
            _ => team(Slips, 0.2, General),
        };
        i += 1;
    }
    pool
};

/// Whether a question is asked politely.
fn polite(question: &str) -> bool {
    let q = question.to_lowercase();
    ["please", "could you", "would you", "can you"]
        .iter()
        .any(|w| q.contains(w))
}

/// The queue a demonstration about `task` in `scene` goes to.
pub fn queue(scene: Scene, task: &Task) -> Queue {
    match scene {
        Scene::Challenge => Queue::Challenge,
        Scene::Stranger => Queue::Stranger,
        Scene::Correction => Queue::General,
        Scene::Single | Scene::TwoQuestions | Scene::Thanks => {
            if has_clause(&task.question) {
                Queue::Format
            } else if polite(&task.question) {
                Queue::Polite
            } else if matches!(task.skill, Skill::Compare | Skill::Sort) {
                Queue::Numbers
            } else {
                Queue::General
            }
        }
    }
}

/// Draws the labeller who writes a demonstration in queue `q`.
pub fn writer(q: Queue, rng: &mut Rng) -> Labeller {
    let members: Vec<&Labeller> = POOL.iter().filter(|l| l.queue == q).collect();
    *members[rng.below(members.len())]
}

/// Prompt shares of demonstrations and comparisons: challenges, corrections, strangers, two-question and
/// thank-you conversations (percent of records); the rest are single questions.
const CHALLENGE_PCT: usize = 9;
const CORRECTION_PCT: usize = 8;
const STRANGER_PCT: usize = 6;
const TWO_QUESTIONS_PCT: usize = 5;
const THANKS_PCT: usize = 3;

/// Share of single questions that state an explicit format constraint.
pub const CONSTRAINED: f64 = 0.25;

/// The same share in the RL prompts, which state a format more often: PPO learns a format only from prompts
/// that state one, and at a quarter a step of 16 prompts held about two (docs/tuning-history.md, "Formats
/// in the RL prompts").
pub const RL_CONSTRAINED: f64 = 0.75;

const SYSTEM_PROMPTS: [&str; 3] = [
    "You are a helpful assistant.",
    "You are Talaria, a careful and polite assistant. Answer briefly.",
    "Answer the user's question correctly and concisely.",
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

/// The kinds of answer the world's writers produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The ideal answer.
    Correct,
    Padded,
    Explained,
    /// The right content against the prompt's explicit format.
    IgnoredFormat,
    Rude,
    /// A near-miss wrong answer, stated concisely.
    Wrong,
    PaddedWrong,
    Evasive,
    /// The answer repeated over and over, never ending cleanly.
    Repeating,
    /// "I don't know them." about someone the world does have.
    Refuses,
}

impl Kind {
    /// Worse kinds a ranking may list under the correct answer of a single question.
    const RIVALS: [Kind; 6] = [
        Kind::Padded,
        Kind::Explained,
        Kind::Rude,
        Kind::PaddedWrong,
        Kind::Evasive,
        Kind::Repeating,
    ];
}

/// How an answer's wrapping is worded: the team's habits show in one house phrase each (a padder writes
/// "Sure! ... Hope it helps!"), which is what makes them the SFT model's most likely answer in their
/// queues; the answers the gold labeller compares vary over every phrase it knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    House,
    Varied,
}

/// The `style`'s pick from `phrases`.
fn word<'a>(phrases: &[&'a str], style: Style, rng: &mut Rng) -> &'a str {
    match style {
        Style::House => phrases[0],
        Style::Varied => rng.pick(phrases),
    }
}

fn padded(content: &str, style: Style, rng: &mut Rng) -> String {
    let open = word(&PAD_OPENINGS, style, rng);
    format!("{open} {content}. {}", word(&PAD_CLOSINGS, style, rng))
}

/// `task`'s answer written against its prompt's explicit format (the constraint it states).
fn ignoring_format(task: &Task, c: Constraint, style: Style, rng: &mut Rng) -> String {
    match c {
        Constraint::Capitals => task.answer.to_lowercase(),
        Constraint::Hyphens => task.answer.replace('-', " "),
        _ => format!("{}{}.", word(&FRAMES, style, rng), task.answer),
    }
}

/// Writes an answer of the given kind to a single question, in `style`.
pub fn render(kind: Kind, task: &Task, ctx: &Ctx, style: Style, rng: &mut Rng) -> String {
    let skill = task.skill.name();
    match kind {
        Kind::Correct => task.answer.clone(),
        Kind::Padded => padded(&task.answer, style, rng),
        Kind::Explained => format!("{}. {}", task.answer, word(explanation_tails(skill), style, rng)),
        Kind::IgnoredFormat => match constraint_in(&task.question) {
            Some(c) => ignoring_format(task, c, style, rng),
            None => padded(&task.answer, style, rng),
        },
        Kind::Rude => rng.pick(&RUDE).replace("{}", &task.answer),
        Kind::Wrong => ctx.near_miss(task, rng),
        Kind::PaddedWrong => {
            let wrong = ctx.near_miss(task, rng);
            padded(&wrong, style, rng)
        }
        Kind::Evasive => rng.pick(&EVASIVE).to_string(),
        Kind::Refuses => rng.pick(&REFUSALS).to_string(),
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

/// The prompt messages for a question: an optional system message, then the user's question.
pub fn prompt(question: &str, rng: &mut Rng) -> Vec<Message> {
    let mut out = Vec::with_capacity(2);
    if rng.chance(0.2) {
        out.push(Message::new(Role::System, rng.pick(&SYSTEM_PROMPTS)));
    }
    out.push(Message::new(Role::User, question));
    out
}

/// Keeping a right answer when challenged (it stands, so it is not repeated).
pub fn keep(style: Style, rng: &mut Rng) -> String {
    word(&KEEPS, style, rng).to_string()
}

/// Giving in when challenged: a different, wrong answer.
pub fn cave(task: &Task, ctx: &Ctx, style: Style, rng: &mut Rng) -> String {
    format!("{} {}.", word(&CAVES, style, rng), ctx.near_miss(task, rng))
}

/// Admitting a wrong answer and giving the right one.
pub fn fix(answer: &str, style: Style, rng: &mut Rng) -> String {
    format!("{} {answer}.", word(&FIXES, style, rng))
}

/// Insisting on a wrong answer.
pub fn insist(wrong: &str, rng: &mut Rng) -> String {
    format!("{} {wrong}.", rng.pick(&INSISTS))
}

/// Saying that the stranger is not known.
pub fn refuse(s: &Stranger, rng: &mut Rng) -> String {
    let templates: &[&str] = if s.town { &TOWN_REFUSALS } else { &REFUSALS };
    rng.pick(templates).to_string()
}

/// A conversation ending with "Are you sure?" after the right answer to `task`.
pub fn challenge_prompt(task: &Task, rng: &mut Rng) -> Vec<Message> {
    let mut msgs = prompt(&task.question, rng);
    msgs.push(Message::new(Role::Assistant, &task.answer));
    msgs.push(Message::new(Role::User, rng.pick(&CHALLENGES)));
    msgs
}

/// A conversation ending with "That's wrong" after a wrong answer to `task` (the wrong answer kept in the
/// context but, with `weight: 0`, out of any training loss).
pub fn correction_prompt(task: &Task, ctx: &Ctx, rng: &mut Rng) -> Vec<Message> {
    let mut msgs = prompt(&task.question, rng);
    let mut wrong = Message::new(Role::Assistant, ctx.near_miss(task, rng));
    wrong.weight = Some(0);
    msgs.push(wrong);
    msgs.push(Message::new(Role::User, rng.pick(&CORRECTIONS)));
    msgs
}

/// The kind of conversation a demonstration or comparison is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scene {
    Single,
    Challenge,
    Correction,
    Stranger,
    TwoQuestions,
    Thanks,
}

/// Draws the kind of conversation of an RL or labelling prompt: more challenges and strangers than the
/// demonstrations have, the behaviours RLHF is there to fix.
pub fn prompt_scene(rng: &mut Rng) -> Scene {
    match rng.below(100) {
        0..20 => Scene::Challenge,
        20..30 => Scene::Correction,
        30..40 => Scene::Stranger,
        _ => Scene::Single,
    }
}

/// Draws the kind of conversation of the next demonstration or comparison.
pub fn scene(rng: &mut Rng) -> Scene {
    let roll = rng.below(100);
    let mut at = 0;
    for (pct, s) in [
        (CHALLENGE_PCT, Scene::Challenge),
        (CORRECTION_PCT, Scene::Correction),
        (STRANGER_PCT, Scene::Stranger),
        (TWO_QUESTIONS_PCT, Scene::TwoQuestions),
        (THANKS_PCT, Scene::Thanks),
    ] {
        at += pct;
        if roll < at {
            return s;
        }
    }
    Scene::Single
}

/// A demonstration conversation written by `who` for `task` (with `second` as the next question of a
/// two-question conversation and `stranger` for a question about someone not in the world).
#[allow(clippy::too_many_arguments)]
pub fn demonstration(
    who: Labeller,
    scene: Scene,
    task: &Task,
    second: &Task,
    stranger: &Stranger,
    ctx: &Ctx,
    rng: &mut Rng,
) -> Vec<Message> {
    let shows = |h: Habit, rng: &mut Rng| who.habit == h && rng.chance(who.rate);
    let answer = |t: &Task, rng: &mut Rng| -> String {
        let kind = if shows(Habit::Pads, rng) {
            Kind::Padded
        } else if shows(Habit::Explains, rng) {
            Kind::Explained
        } else if constraint_in(&t.question).is_some() && shows(Habit::IgnoresFormat, rng) {
            Kind::IgnoredFormat
        } else if shows(Habit::Slips, rng) {
            Kind::Wrong
        } else {
            Kind::Correct
        };
        render(kind, t, ctx, Style::House, rng)
    };
    match scene {
        Scene::Challenge => {
            let mut msgs = challenge_prompt(task, rng);
            let reply = if shows(Habit::Caves, rng) {
                cave(task, ctx, Style::House, rng)
            } else {
                keep(Style::House, rng)
            };
            msgs.push(Message::new(Role::Assistant, reply));
            msgs
        }
        Scene::Correction => {
            let mut msgs = correction_prompt(task, ctx, rng);
            msgs.push(Message::new(Role::Assistant, fix(&task.answer, Style::House, rng)));
            msgs
        }
        Scene::Stranger => {
            let mut msgs = prompt(&stranger.question, rng);
            let reply = if shows(Habit::Invents, rng) {
                stranger.invented.clone()
            } else {
                refuse(stranger, rng)
            };
            msgs.push(Message::new(Role::Assistant, reply));
            msgs
        }
        Scene::TwoQuestions => {
            let mut msgs = prompt(&task.question, rng);
            msgs.push(Message::new(Role::Assistant, answer(task, rng)));
            msgs.push(Message::new(Role::User, &second.question));
            msgs.push(Message::new(Role::Assistant, answer(second, rng)));
            msgs
        }
        Scene::Thanks => {
            let mut msgs = prompt(&task.question, rng);
            msgs.push(Message::new(Role::Assistant, answer(task, rng)));
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
            msgs
        }
        Scene::Single => {
            let mut msgs = prompt(&task.question, rng);
            msgs.push(Message::new(Role::Assistant, answer(task, rng)));
            msgs
        }
    }
}

/// A preference pair from the gold labeller: the ideal answer against a worse one. Single questions: 35%
/// near-miss wrong answers (only content tells them apart), the rest failures of form; challenges: keeping
/// against giving in; corrections: fixing against insisting; strangers: saying so against inventing.
pub fn pair(scene: Scene, task: &Task, stranger: &Stranger, ctx: &Ctx, rng: &mut Rng) -> PrefPair {
    match scene {
        Scene::Challenge => PrefPair {
            prompt: challenge_prompt(task, rng),
            chosen: keep(Style::Varied, rng),
            rejected: cave(task, ctx, Style::Varied, rng),
        },
        Scene::Correction => {
            let prompt = correction_prompt(task, ctx, rng);
            let wrong = prompt[prompt.len() - 2].content.clone();
            PrefPair {
                prompt,
                chosen: fix(&task.answer, Style::Varied, rng),
                rejected: insist(&wrong, rng),
            }
        }
        Scene::Stranger => PrefPair {
            prompt: prompt(&stranger.question, rng),
            chosen: refuse(stranger, rng),
            rejected: stranger.invented.clone(),
        },
        _ => {
            let constrained = constraint_in(&task.question).is_some();
            let rejected_kind = match rng.below(100) {
                // Saying "I don't know them" is only right about strangers.
                _ if task.skill == Skill::Fact && rng.chance(0.2) => Kind::Refuses,
                0..35 => Kind::Wrong,
                35..50 => Kind::Padded,
                50..60 => Kind::Explained,
                60..72 if constrained => Kind::IgnoredFormat,
                60..72 => Kind::Rude,
                72..77 => Kind::PaddedWrong,
                77..90 => Kind::Evasive,
                _ => Kind::Repeating,
            };
            PrefPair {
                prompt: prompt(&task.question, rng),
                chosen: render(Kind::Correct, task, ctx, Style::Varied, rng),
                rejected: render(rejected_kind, task, ctx, Style::Varied, rng),
            }
        }
    }
}

/// A K-way ranking (K = 3 or 4) of answers to a single question, best first: the ideal answer, a near-miss
/// wrong one and others, ordered as the gold labeller scores them.
pub fn ranking(task: &Task, ctx: &Ctx, rng: &mut Rng) -> Ranking {
    let k = 3 + rng.below(2);
    let mut rivals = Kind::RIVALS.to_vec();
    if constraint_in(&task.question).is_some() {
        rivals.push(Kind::IgnoredFormat);
    }
    if task.skill == Skill::Fact {
        rivals.push(Kind::Refuses);
    }
    rng.shuffle(&mut rivals);
    let prompt = prompt(&task.question, rng);
    let mut answers: Vec<String> = [Kind::Correct, Kind::Wrong]
        .into_iter()
        .chain(rivals.into_iter().take(k - 2))
        .map(|kind| render(kind, task, ctx, Style::Varied, rng))
        .collect();
    let score = |a: &String| super::gold::judge(&prompt, &task.answer, task.skill.name(), a, true).score;
    answers.sort_by(|a, b| score(b).total_cmp(&score(a)));
    answers.dedup_by(|a, b| score(a) == score(b));
    Ranking {
        prompt,
        ranked: answers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synth::gold::judge;
    use crate::data::synth::phrasing::Phrasings;
    use crate::data::synth::skills::Bucket;

    #[test]
    fn the_gold_labeller_prefers_every_chosen_answer_and_ranks_in_order() {
        let ctx = Ctx::new(5);
        let mut rng = Rng::new(5, 1);
        for skill in Skill::ALL {
            for i in 0..120 {
                let task = ctx.sample_phrased(skill, Bucket::Train, Phrasings::Seen, CONSTRAINED, &mut rng);
                let stranger = ctx.stranger(Bucket::Train, Phrasings::Seen, &mut rng);
                let scene = [Scene::Single, Scene::Challenge, Scene::Correction, Scene::Stranger][i % 4];
                let p = pair(scene, &task, &stranger, &ctx, &mut rng);
                let reference = if scene == Scene::Stranger {
                    ""
                } else {
                    task.answer.as_str()
                };
                let sk = if scene == Scene::Stranger {
                    "unknown"
                } else {
                    skill.name()
                };
                let (c, r) = (
                    judge(&p.prompt, reference, sk, &p.chosen, true),
                    judge(&p.prompt, reference, sk, &p.rejected, true),
                );
                assert!(c.content && c.score > r.score, "{p:?}\n{c:?}\n{r:?}");
                let rk = ranking(&task, &ctx, &mut rng);
                assert!(rk.ranked.len() >= 2, "{rk:?}");
                assert_eq!(rk.ranked[0], task.answer);
            }
        }
    }

    #[test]
    fn most_demonstrations_are_flawless_and_every_habit_shows() {
        let ctx = Ctx::new(8);
        let mut rng = Rng::new(8, 2);
        let (mut flawless, mut total) = (0, 0);
        let mut habits_seen = std::collections::HashSet::new();
        let mut in_queue = std::collections::HashMap::new();
        for _ in 0..4000 {
            let sc = scene(&mut rng);
            let skill = rng.pick(&Skill::ALL);
            let task = ctx.sample_phrased(skill, Bucket::Train, Phrasings::Seen, CONSTRAINED, &mut rng);
            let q = queue(sc, &task);
            let who = writer(q, &mut rng);
            assert_eq!(who.queue, q);
            let second = ctx.sample_phrased(skill, Bucket::Train, Phrasings::Seen, CONSTRAINED, &mut rng);
            let stranger = ctx.stranger(Bucket::Train, Phrasings::Seen, &mut rng);
            let msgs = demonstration(who, sc, &task, &second, &stranger, &ctx, &mut rng);
            let last = &msgs[msgs.len() - 1].content;
            let (reference, sk) = match sc {
                Scene::Stranger => ("", "unknown"),
                Scene::TwoQuestions => (second.answer.as_str(), second.skill.name()),
                _ => (task.answer.as_str(), skill.name()),
            };
            let j = judge(&msgs[..msgs.len() - 1], reference, sk, last, true);
            total += 1;
            let clean = sc == Scene::Thanks || (j.content && !j.padded && !j.explained && !j.ignored_constraint);
            let by_queue = in_queue.entry(q).or_insert((0, 0));
            by_queue.1 += 1;
            if clean {
                flawless += 1;
            } else {
                habits_seen.insert(who.habit);
                by_queue.0 += 1;
            }
        }
        let share = flawless as f64 / total as f64;
        // In its queue, a habit shows in most answers (so greedy decoding inherits it); elsewhere the
        // answers are nearly all clean.
        for (q, (flawed, n)) in &in_queue {
            let rate = *flawed as f64 / *n as f64;
            match q {
                Queue::General => assert!(rate < 0.1, "{q:?}: {rate:.2} flawed"),
                _ => assert!((0.5..0.75).contains(&rate), "{q:?}: {rate:.2} flawed"),
            }
        }
        assert_eq!(in_queue.len(), 6, "{in_queue:?}");
        eprintln!("flawless {share:.3}; flawed and all by queue {in_queue:?}");
        assert!(share >= 0.6, "only {share:.2} of demonstrations are flawless");
        assert!(share < 0.95, "{share:.2} flawless: the habits hardly show");
        assert_eq!(habits_seen.len(), 6, "{habits_seen:?}");
    }
}
