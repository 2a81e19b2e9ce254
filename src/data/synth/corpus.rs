//! The pretraining corpus: documents about the world plus plain-text practice of every skill (on train-bucket
//! items only), so the base model has partial skill for SFT to build on without seeing any eval or RL prompt.

use super::skills::{Bucket, Ctx, Item, Skill, join, rev_digits, reversed, spelled};
use super::world::{Attr, Fact};
use super::{END_OF_TEXT, Rng};

/// The corpus text (documents separated by a line `<|endoftext|>`) and the number of documents. Always
/// starts with one registry document per person and town, so every fact is in the corpus at any scale.
pub fn corpus(ctx: &Ctx, target_bytes: usize, rng: &mut Rng) -> (String, usize) {
    let world = &ctx.world;
    let mut docs: Vec<String> = (0..world.people.len()).map(|p| world.registry_entry(p)).collect();
    docs.extend((0..world.num_towns()).map(|t| {
        world.fact_sentence(
            Fact {
                attr: Attr::Country,
                subject: t,
            },
            0,
        )
    }));
    let train_words: Vec<&str> = ctx.words_in(Bucket::Train).collect();
    let mut bytes: usize = docs.iter().map(|d| d.len() + END_OF_TEXT.len() + 2).sum();
    while bytes < target_bytes {
        let doc = match rng.below(100) {
            0..30 => world.biography(rng.below(world.people.len()), rng),
            30..38 => world.town_page(rng.below(world.num_towns()), rng),
            38..48 => world.story(rng),
            48..85 => practice(ctx, &train_words, rng),
            _ => questions_and_answers(ctx, rng),
        };
        bytes += doc.len() + END_OF_TEXT.len() + 2;
        docs.push(doc);
    }
    let n = docs.len();
    let mut text = docs.join(&format!("\n{END_OF_TEXT}\n"));
    text.push('\n');
    (text, n)
}

/// A paragraph of sentences practising one skill in plain English.
fn practice(ctx: &Ctx, words: &[&str], rng: &mut Rng) -> String {
    let skill = rng.pick(&Skill::ALL);
    let lines = 6 + rng.below(7);
    let mut out = Vec::with_capacity(lines);
    for _ in 0..lines {
        let w = rng.pick(words);
        let v = rng.below(4);
        out.push(match skill {
            Skill::Reverse => {
                let r = reversed(w);
                [
                    format!("The word {w} spelled backwards is {r}."),
                    format!("Backwards, {w} becomes {r}."),
                    format!("Reverse {w} and you get {r}."),
                    format!("{w} reversed is {r}."),
                ][v]
                    .clone()
            }
            Skill::Spell => {
                let s = spelled(w);
                [
                    format!("The word {w} is spelled {s}."),
                    format!("To spell {w}, write {s}."),
                    format!("Letter by letter, {w} is {s}."),
                    format!("{w} has the letters {s}."),
                ][v]
                    .clone()
            }
            Skill::Capitals => {
                let c = w.to_uppercase();
                [
                    format!("In capital letters, {w} is written {c}."),
                    format!("{w} in uppercase is {c}."),
                    format!("Shouted, {w} becomes {c}."),
                    format!("The capitals of {w} read {c}."),
                ][v]
                    .clone()
            }
            Skill::Fact => {
                let person = rng.below(ctx.world.people.len());
                let attr = rng.pick(&Attr::PERSON);
                ctx.world.fact_sentence(Fact { attr, subject: person }, v)
            }
            Skill::Compare => {
                let Item::Compare(a, b) = ctx.sample(skill, Bucket::Train, rng).item else {
                    unreachable!("compare tasks hold two numbers")
                };
                let (lo, hi) = (a.min(b), a.max(b));
                [
                    format!("{hi} is larger than {lo}."),
                    format!("{lo} is smaller than {hi}."),
                    format!("Of {a} and {b}, the larger number is {hi}."),
                    format!("Of {a} and {b}, the smaller number is {lo}."),
                ][v]
                    .clone()
            }
            Skill::Sort => {
                let Item::Sort(xs) = ctx.sample(skill, Bucket::Train, rng).item else {
                    unreachable!("sort tasks hold a list")
                };
                let mut sorted = xs.clone();
                sorted.sort_unstable();
                let (orig, sorted) = (join(&xs, ", "), join(&sorted, ", "));
                [
                    format!("Sorted from smallest to largest, {orig} becomes {sorted}."),
                    format!("In increasing order, {orig} reads {sorted}."),
                    format!("From smallest to largest: {sorted}."),
                    format!("The numbers {orig} in order are {sorted}."),
                ][v]
                    .clone()
            }
            Skill::AddReversed => {
                let Item::Add(a, b) = ctx.sample(skill, Bucket::Train, rng).item else {
                    unreachable!("addition tasks hold two numbers")
                };
                let (ra, rb, rs) = (rev_digits(a), rev_digits(b), rev_digits(a + b));
                [
                    format!("With the ones digit first, {ra} + {rb} = {rs}."),
                    format!("Written ones digit first, {ra} plus {rb} makes {rs}."),
                    format!("Ones first: {ra} + {rb} = {rs}."),
                    format!("In ones-first digits, the sum of {ra} and {rb} is {rs}."),
                ][v]
                    .clone()
            }
        });
    }
    let sep = if rng.chance(0.5) { " " } else { "\n" };
    out.join(sep)
}

/// A plain-text quiz: `Q: ...` / `A: ...` lines over train-bucket tasks, the format few-shot prompts use.
fn questions_and_answers(ctx: &Ctx, rng: &mut Rng) -> String {
    let n = 4 + rng.below(5);
    (0..n)
        .map(|_| {
            let task = ctx.sample(rng.pick(&Skill::ALL), Bucket::Train, rng);
            format!("Q: {}\nA: {}", task.question, task.answer)
        })
        .collect::<Vec<_>>()
        .join("\n")
}
