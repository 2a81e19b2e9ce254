//! The pretraining corpus: documents about the world, plain-text practice of every skill (on train-bucket
//! items only) and sentences about digits and numbers, so the base model has partial skill for SFT to build
//! on without seeing any eval or RL prompt.

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
            0..24 => world.biography(rng.below(world.people.len()), rng),
            24..30 => world.town_page(rng.below(world.num_towns()), rng),
            30..36 => world.story(rng),
            36..68 => practice(ctx, &train_words, rng),
            68..80 => questions_and_answers(ctx, rng),
            _ => numbers(rng),
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

/// Sentences that pair each digit with its name, plus counting and numbers in words. Every number skill needs
/// the model to tell digits apart, but in random numbers each digit is as likely as any other; without a
/// signal that tells one digit from another next to it, Adam pulled all ten tied embeddings together (mean
/// pairwise cosine 0.925 after pretraining, against 0.06 for letters; docs/tuning-history.md) and the model could not
/// copy a number. A digit followed by its name (and a name by its digit) is such a signal: a bigram, like a
/// letter's.
fn numbers(rng: &mut Rng) -> String {
    let lines = 6 + rng.below(7);
    let mut out = Vec::with_capacity(lines);
    for _ in 0..lines {
        let n = if rng.chance(0.3) {
            rng.range(0, 100)
        } else {
            rng.range(0, 1000)
        };
        let named = |n: u32| -> Vec<(char, &'static str)> {
            n.to_string()
                .chars()
                .map(|d| (d, DIGIT_NAMES[d.to_digit(10).expect("a digit") as usize]))
                .collect()
        };
        out.push(match rng.below(5) {
            0 => {
                let k = 4 + rng.below(4) as u32;
                let xs: Vec<u32> = (n..n + k).collect();
                format!("Counting up from {n}: {}.", join(&xs, ", "))
            }
            1 => {
                let pairs: Vec<String> = named(n).iter().map(|(d, w)| format!("{d} {w}")).collect();
                format!("The digits of {n} are {}.", pairs.join(", "))
            }
            2 => {
                let pairs: Vec<String> = named(n).iter().map(|(d, w)| format!("{w} {d}")).collect();
                format!("Read digit by digit, {} makes {n}.", pairs.join(", "))
            }
            3 => format!("{n} is written {} in words.", number_words(n)),
            _ => format!("One more than {n} is {}.", n + 1),
        });
    }
    let sep = if rng.chance(0.5) { " " } else { "\n" };
    out.join(sep)
}

const DIGIT_NAMES: [&str; 10] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
];

/// `n` (below 1000) in English words: "four hundred eighty-two".
fn number_words(n: u32) -> String {
    const TEENS: [&str; 10] = [
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
        "nineteen",
    ];
    const TENS: [&str; 10] = [
        "", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
    ];
    let below_100 = |n: u32| -> String {
        match n {
            0..10 => DIGIT_NAMES[n as usize].to_string(),
            10..20 => TEENS[(n - 10) as usize].to_string(),
            _ if n.is_multiple_of(10) => TENS[(n / 10) as usize].to_string(),
            _ => format!("{}-{}", TENS[(n / 10) as usize], DIGIT_NAMES[(n % 10) as usize]),
        }
    };
    match (n / 100, n % 100) {
        (0, r) => below_100(r),
        (h, 0) => format!("{} hundred", DIGIT_NAMES[h as usize]),
        (h, r) => format!("{} hundred {}", DIGIT_NAMES[h as usize], below_100(r)),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_written_in_words() {
        assert_eq!(number_words(0), "zero");
        assert_eq!(number_words(13), "thirteen");
        assert_eq!(number_words(40), "forty");
        assert_eq!(number_words(482), "four hundred eighty-two");
        assert_eq!(number_words(700), "seven hundred");
        assert_eq!(number_words(905), "nine hundred five");
    }

    #[test]
    fn digit_names_match_their_digits() {
        let mut rng = Rng::new(5, 1);
        let text: String = (0..50).map(|_| numbers(&mut rng) + "\n").collect();
        let mut checked = 0;
        for sentence in text.split(". ").flat_map(|s| s.split('\n')) {
            let Some(rest) = sentence.strip_prefix("The digits of ") else {
                continue;
            };
            let (n, pairs) = rest.split_once(" are ").expect("digits sentence");
            let pairs = pairs.trim_end_matches('.');
            let digits: String = pairs
                .split(", ")
                .map(|p| {
                    let (d, name) = p.split_once(' ').expect("digit and name");
                    assert_eq!(DIGIT_NAMES[d.parse::<usize>().unwrap()], name, "{sentence}");
                    d
                })
                .collect();
            assert_eq!(digits, n, "{sentence}");
            checked += 1;
        }
        assert!(checked > 10, "only {checked} digit sentences");
    }
}
