//! Many ways of asking for each skill, so that a model learns the instruction rather than a handful of
//! wordings: 25 phrasings per skill (per attribute for facts), varying order, politeness and framing. The
//! first 20 are used in every training file; the last 5 are held out of all of them and appear only in
//! `eval_heldout_prompts.jsonl`. The first two of each list are wordings of the pretraining corpus and of
//! `eval_prompts.jsonl` (which keep the corpus's three wordings).
//!
//! Some prompts add an explicit format constraint ("Answer with just the number.", "Write it in capital
//! letters."); the ideal answer then follows it, and [`super::gold`] finds it in the prompt's text.

use super::Rng;
use super::skills::{Ctx, Item, Skill, join, rev_digits};
use super::world::Attr;

/// Phrasings per list, and how many of them are seen in training.
pub const PHRASINGS: usize = 25;
pub const SEEN: usize = 20;

/// Which phrasings a prompt may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phrasings {
    /// The 20 used in training files (and in `eval_prompts.jsonl`'s first three).
    Seen,
    /// The 5 kept out of every training file.
    HeldOut,
}

impl Phrasings {
    pub fn pick(self, rng: &mut Rng) -> usize {
        match self {
            Phrasings::Seen => rng.below(SEEN),
            Phrasings::HeldOut => SEEN + rng.below(PHRASINGS - SEEN),
        }
    }
}

/// An explicit format constraint a prompt may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Constraint {
    /// The answer in capital letters.
    Capitals,
    /// Letters separated by hyphens.
    Hyphens,
    /// The bare number, nothing else.
    JustNumber,
    /// The bare list of numbers, separated by commas.
    JustNumbers,
    /// One word.
    OneWord,
    /// The bare name.
    JustName,
}

impl Constraint {
    /// Sentences that add the constraint to a question.
    fn clauses(self) -> [&'static str; 3] {
        match self {
            Constraint::Capitals => [
                "Write it in capital letters.",
                "Please answer in uppercase.",
                "Use capital letters only.",
            ],
            Constraint::Hyphens => [
                "Separate the letters with hyphens.",
                "Put a hyphen between the letters.",
                "Use hyphens between letters.",
            ],
            Constraint::JustNumber => [
                "Answer with just the number.",
                "Reply with the number only.",
                "Only the number, please.",
            ],
            Constraint::JustNumbers => [
                "Give only the numbers, separated by commas.",
                "Reply with just the numbers.",
                "Only the numbers, please, with commas between them.",
            ],
            Constraint::OneWord => ["Answer in one word.", "One word, please.", "Reply with a single word."],
            Constraint::JustName => [
                "Just give the name.",
                "Reply with the name only.",
                "Only the name, please.",
            ],
        }
    }
}

/// The constraint a question states, if any (the gold labeller reads prompts this way).
pub fn constraint_in(question: &str) -> Option<Constraint> {
    let q = question.to_lowercase();
    let has = |ws: &[&str]| ws.iter().any(|w| q.contains(w));
    if has(&["capital", "uppercase", "upper case", "all caps"]) {
        Some(Constraint::Capitals)
    } else if has(&["hyphen"]) {
        Some(Constraint::Hyphens)
    } else if has(&["just the numbers", "only the numbers"]) {
        Some(Constraint::JustNumbers)
    } else if has(&["just the number", "number only", "only the number"]) {
        Some(Constraint::JustNumber)
    } else if has(&["one word", "single word"]) {
        Some(Constraint::OneWord)
    } else if has(&["just give the name", "name only", "only the name"]) {
        Some(Constraint::JustName)
    } else {
        None
    }
}

/// Whether a question ends with an added constraint clause (rather than stating its format in its own
/// wording, as the `capitals` skill's questions do).
pub fn has_clause(question: &str) -> bool {
    use Constraint::*;
    [Capitals, Hyphens, JustNumber, JustNumbers, OneWord, JustName]
        .iter()
        .flat_map(|c| c.clauses())
        .any(|c| question.ends_with(c))
}

/// The constraint a task of this skill and item may have added to its question (besides the ones its
/// phrasing states), or `None`.
fn optional_constraint(skill: Skill, item: &Item, ctx: &Ctx) -> Option<Constraint> {
    match (skill, item) {
        (Skill::Reverse, _) => Some(Constraint::OneWord),
        (Skill::Spell, _) => Some(Constraint::Hyphens),
        (Skill::Compare | Skill::AddReversed, _) => Some(Constraint::JustNumber),
        (Skill::Sort, _) => Some(Constraint::JustNumbers),
        (Skill::Fact, Item::Fact(f)) => match f.attr {
            Attr::Age => Some(Constraint::JustNumber),
            Attr::Friend => Some(Constraint::JustName),
            _ if !ctx.world.value(*f).contains(' ') => Some(Constraint::OneWord),
            _ => None,
        },
        _ => None,
    }
}

/// The question for `item` in phrasing `k` (a comparison asks for the larger number when `larger`), with a
/// constraint clause when `constrained` and the skill has one, and its ideal answer.
pub fn phrase(
    ctx: &Ctx,
    skill: Skill,
    item: &Item,
    larger: bool,
    k: usize,
    constrained: bool,
    rng: &mut Rng,
) -> (String, String) {
    let mut q = base_question(ctx, skill, item, larger, k);
    let mut answer = ideal_answer(ctx, skill, item, larger);
    if constrained
        && let Some(c) = optional_constraint(skill, item, ctx)
        && constraint_in(&q).is_none()
    {
        q = format!("{q} {}", rng.pick(&c.clauses()));
        if c == Constraint::Capitals {
            answer = answer.to_uppercase();
        }
    }
    (q, answer)
}

/// The bare correct answer (before any capitals constraint).
fn ideal_answer(ctx: &Ctx, skill: Skill, item: &Item, larger: bool) -> String {
    match item {
        Item::Word(i) => {
            let w = ctx.word(*i);
            match skill {
                Skill::Reverse => super::skills::reversed(w),
                Skill::Spell => super::skills::spelled(w),
                _ => w.to_uppercase(),
            }
        }
        Item::Fact(f) => ctx.world.value(*f),
        Item::Compare(a, b) => if larger { a.max(b) } else { a.min(b) }.to_string(),
        Item::Sort(xs) => {
            let mut sorted = xs.clone();
            sorted.sort_unstable();
            join(&sorted, ", ")
        }
        Item::Add(a, b) => rev_digits(a + b),
    }
}

fn base_question(ctx: &Ctx, skill: Skill, item: &Item, larger: bool, k: usize) -> String {
    match item {
        Item::Word(i) => {
            let w = ctx.word(*i);
            match skill {
                Skill::Reverse => reverse_question(w, k),
                Skill::Spell => spell_question(w, k),
                _ => capitals_question(w, k),
            }
        }
        Item::Fact(f) => fact_question(&ctx.world.subject(*f), f.attr, k),
        Item::Compare(a, b) => compare_question(*a, *b, larger, k),
        Item::Sort(xs) => sort_question(&join(xs, ", "), k),
        Item::Add(a, b) => add_question(&rev_digits(*a), &rev_digits(*b), k),
    }
}

fn reverse_question(w: &str, k: usize) -> String {
    [
        format!("Reverse the word {w}."),
        format!("What is {w} spelled backwards?"),
        format!("Write the word {w} backwards."),
        format!("Could you write the word {w} in reverse order?"),
        format!("Please spell {w} backwards."),
        format!("{w}: what do you get when you reverse it?"),
        format!("If you write {w} from the last letter to the first, what do you get?"),
        format!("Give me {w} reversed."),
        format!("Read {w} backwards for me."),
        format!("Flip the letters of {w} around."),
        format!("What does {w} look like written backwards?"),
        format!("I need the word {w} reversed, please."),
        format!("Reverse the letters in {w}."),
        format!("Can you reverse {w}?"),
        format!("Write {w} in reverse."),
        format!("Here is a word: {w}. Reverse it."),
        format!("Quick one: {w} backwards?"),
        format!("Would you mind writing {w} backwards?"),
        format!("What is the reverse of {w}?"),
        format!("Take the word {w} and reverse it."),
        format!("How is {w} written in reverse?"),
        format!("Kindly reverse {w}."),
        format!("Spell the word {w} from its end to its start."),
        format!("Backwards, how do you write {w}?"),
        format!("My word is {w}. What is it backwards?"),
    ][k % PHRASINGS]
        .clone()
}

fn spell_question(w: &str, k: usize) -> String {
    [
        format!("Spell the word {w} letter by letter."),
        format!("How do you spell {w}? Separate the letters with hyphens."),
        format!("Write out the letters of {w}, separated by hyphens."),
        format!("Please spell {w}."),
        format!("Could you spell the word {w} for me?"),
        format!("What are the letters of {w}?"),
        format!("Spell out {w}."),
        format!("How is {w} spelled?"),
        format!("Give me the spelling of {w}."),
        format!("{w}: how do you spell it?"),
        format!("I need {w} spelled out, please."),
        format!("Can you spell {w}?"),
        format!("Spell {w} one letter at a time."),
        format!("List the letters of the word {w}."),
        format!("Would you spell {w}?"),
        format!("What is the spelling of {w}?"),
        format!("Quick one: spell {w}."),
        format!("Here is a word: {w}. Spell it."),
        format!("Spell the word {w}, please."),
        format!("Write {w} letter by letter."),
        format!("Kindly spell out {w}."),
        format!("Break {w} into its letters."),
        format!("How would you spell the word {w}?"),
        format!("Letter by letter, what is {w}?"),
        format!("My word is {w}. Spell it out."),
    ][k % PHRASINGS]
        .clone()
}

fn capitals_question(w: &str, k: usize) -> String {
    [
        format!("Write the word {w} in capital letters."),
        format!("Write {w} in uppercase."),
        format!("Reply with the word {w} in all capitals."),
        format!("Could you write {w} in capital letters?"),
        format!("Please write {w} in uppercase."),
        format!("What is {w} in capital letters?"),
        format!("Give me {w} in all caps."),
        format!("{w}: write it in uppercase."),
        format!("Turn {w} into capital letters."),
        format!("Write the word {w} using only capital letters."),
        format!("Can you put {w} in uppercase?"),
        format!("I need {w} in capital letters, please."),
        format!("Convert {w} to uppercase."),
        format!("How is {w} written in capital letters?"),
        format!("Here is a word: {w}. Write it in capitals."),
        format!("Quick one: {w} in uppercase?"),
        format!("Would you write {w} in all capital letters?"),
        format!("Make {w} uppercase."),
        format!("Write {w} with capital letters."),
        format!("Show me {w} in upper case."),
        format!("Kindly write {w} in capital letters."),
        format!("Put every letter of {w} in upper case."),
        format!("What does {w} look like in capital letters?"),
        format!("In capital letters, how do you write {w}?"),
        format!("My word is {w}. Write it in all caps."),
    ][k % PHRASINGS]
        .clone()
}

fn compare_question(a: u32, b: u32, larger: bool, k: usize) -> String {
    let (adj, comp) = if larger {
        ("larger", "bigger")
    } else {
        ("smaller", "less")
    };
    [
        format!("Which is {adj}, {a} or {b}?"),
        format!("Which number is {comp}: {a} or {b}?"),
        format!("Which of {a} and {b} is {adj}?"),
        format!("Of {a} and {b}, which is {adj}?"),
        format!("Could you tell me which is {adj}, {a} or {b}?"),
        format!("{a} or {b}: which one is {adj}?"),
        format!("Please pick the {adj} number: {a} or {b}."),
        format!("Between {a} and {b}, which number is {adj}?"),
        format!("Tell me the {adj} of {a} and {b}."),
        format!("I have {a} and {b}. Which is {adj}?"),
        format!("Which one is {adj}: {a}, or {b}?"),
        format!("Can you say which of {a} and {b} is {adj}?"),
        format!("Compare {a} and {b}. Which is {adj}?"),
        format!("Here are two numbers, {a} and {b}. Which is {adj}?"),
        format!("Quick one: {a} or {b}, which is {adj}?"),
        format!("Would you tell me the {adj} number, {a} or {b}?"),
        format!("Pick the {adj}: {a} or {b}."),
        format!("What is the {adj} number, {a} or {b}?"),
        format!("Look at {a} and {b}. Which is {adj}?"),
        format!("Of the numbers {a} and {b}, name the {adj}."),
        format!("Kindly pick the {adj} of {a} and {b}."),
        format!("{a} and {b}: tell me the {adj} one."),
        format!("Which would you say is {adj}, {a} or {b}?"),
        format!("Is {a} or {b} the {adj} number?"),
        format!("My numbers are {a} and {b}. Which one is {adj}?"),
    ][k % PHRASINGS]
        .clone()
}

fn sort_question(list: &str, k: usize) -> String {
    [
        format!("Sort these numbers from smallest to largest: {list}."),
        format!("Put these numbers in increasing order: {list}."),
        format!("Arrange {list} from smallest to largest."),
        format!("Could you sort {list} from smallest to largest?"),
        format!("Please put {list} in increasing order."),
        format!("Order these from smallest to largest: {list}."),
        format!("Sort {list} in ascending order."),
        format!("{list}: sort them from smallest to largest."),
        format!("What is {list} in increasing order?"),
        format!("Can you arrange these numbers in increasing order: {list}?"),
        format!("I have {list}. Sort them from smallest to largest."),
        format!("Here are some numbers: {list}. Put them in order, smallest first."),
        format!("Quick one: sort {list}."),
        format!("Would you sort these numbers for me: {list}?"),
        format!("Put {list} in order from smallest to largest."),
        format!("Sort the list {list}, smallest first."),
        format!("Arrange these numbers in ascending order: {list}."),
        format!("List {list} from the smallest to the largest."),
        format!("In increasing order, what are {list}?"),
        format!("Sort these: {list}."),
        format!("Kindly sort {list} from smallest to largest."),
        format!("Rearrange {list} so that they increase."),
        format!("Starting with the smallest, order {list}."),
        format!("How do {list} go in increasing order?"),
        format!("My numbers are {list}. Sort them, smallest first."),
    ][k % PHRASINGS]
        .clone()
}

fn add_question(a: &str, b: &str, k: usize) -> String {
    [
        format!("Numbers here are written with the ones digit first. What is {a} + {b}?"),
        format!("With digits written ones first, add {a} and {b}."),
        format!("In ones-digit-first notation, compute {a} + {b}."),
        format!("Writing numbers with the ones digit first, what is {a} + {b}?"),
        format!("Could you add {a} and {b}? Both are written ones digit first."),
        format!("Please compute {a} + {b}, with the ones digit written first."),
        format!("Ones digit first: what is {a} plus {b}?"),
        format!("In ones-digit-first notation, what do {a} and {b} add up to?"),
        format!("Add {a} and {b}. The numbers are written with the ones digit first."),
        format!("With numbers written ones digit first, what is the sum of {a} and {b}?"),
        format!("Can you add {a} + {b} in ones-digit-first notation?"),
        format!("Here the ones digit comes first. Add {a} and {b}."),
        format!("Quick sum, ones digit first: {a} + {b}?"),
        format!("Would you add {a} and {b}? Digits are written ones first."),
        format!("Using ones-digit-first notation, compute the sum {a} + {b}."),
        format!("Ones-digit-first numbers: {a} and {b}. What is their sum?"),
        format!("In this notation the ones digit is first. What is {a} + {b}?"),
        format!("Sum {a} and {b}, written with the ones digit first."),
        format!("What do you get from {a} + {b}, writing the ones digit first?"),
        format!("Add these ones-digit-first numbers: {a} and {b}."),
        format!("Kindly add {a} and {b}; both have the ones digit first."),
        format!("Reading digits ones first, what is {a} plus {b}?"),
        format!("Work out {a} + {b} with digits in ones-first order."),
        format!("With the ones digit leading, what is {a} + {b}?"),
        format!("My numbers, ones digit first, are {a} and {b}. Add them."),
    ][k % PHRASINGS]
        .clone()
}

/// A question about `attr` of someone (or a town) called `n`, in phrasing `k`: also used to ask about names
/// the world does not have.
pub fn fact_question_about(n: &str, attr: Attr, k: usize) -> String {
    fact_question(n, attr, k)
}

fn fact_question(n: &str, attr: Attr, k: usize) -> String {
    let list: [String; PHRASINGS] = match attr {
        Attr::Town => [
            format!("Where does {n} live?"),
            format!("In which town does {n} live?"),
            format!("Which town is {n}'s home?"),
            format!("Could you tell me where {n} lives?"),
            format!("What town does {n} live in?"),
            format!("{n}: which town is home?"),
            format!("Please tell me {n}'s home town."),
            format!("Where is {n}'s home?"),
            format!("Do you know where {n} lives?"),
            format!("Which town does {n} call home?"),
            format!("Name the town where {n} lives."),
            format!("Can you say where {n} lives?"),
            format!("What is {n}'s home town?"),
            format!("I am looking for {n}. Which town do they live in?"),
            format!("Quick one: where does {n} live?"),
            format!("Would you know which town {n} lives in?"),
            format!("Tell me where {n} lives."),
            format!("In what town is {n}'s home?"),
            format!("Which town is home to {n}?"),
            format!("Where can {n} be found at home?"),
            format!("Kindly tell me which town {n} lives in."),
            format!("What is the name of the town where {n} lives?"),
            format!("Which town does {n} live in, do you know?"),
            format!("Where is {n} living?"),
            format!("My question is about {n}. Where do they live?"),
        ],
        Attr::Job => [
            format!("What is {n}'s job?"),
            format!("What does {n} do for a living?"),
            format!("What is the occupation of {n}?"),
            format!("Could you tell me {n}'s job?"),
            format!("What work does {n} do?"),
            format!("{n}: what is their job?"),
            format!("Please tell me what {n} does for work."),
            format!("What is {n}'s occupation?"),
            format!("Do you know {n}'s job?"),
            format!("Which job does {n} have?"),
            format!("Name {n}'s job."),
            format!("Can you say what {n} does for a living?"),
            format!("How does {n} earn a living?"),
            format!("I am curious about {n}. What is their job?"),
            format!("Quick one: what is {n}'s job?"),
            format!("Would you know what {n} does for work?"),
            format!("Tell me {n}'s occupation."),
            format!("What is {n} by trade?"),
            format!("What kind of work does {n} do?"),
            format!("What does {n} work as?"),
            format!("Kindly tell me {n}'s job."),
            format!("What is the job that {n} has?"),
            format!("Which line of work is {n} in?"),
            format!("What is {n}'s profession?"),
            format!("My question is about {n}. What is their job?"),
        ],
        Attr::Pet => [
            format!("What pet does {n} have?"),
            format!("Which animal does {n} keep as a pet?"),
            format!("What kind of pet does {n} own?"),
            format!("Could you tell me what pet {n} has?"),
            format!("What animal is {n}'s pet?"),
            format!("{n}: what is their pet?"),
            format!("Please tell me {n}'s pet."),
            format!("What is {n}'s pet?"),
            format!("Do you know what pet {n} keeps?"),
            format!("Which pet does {n} have?"),
            format!("Name {n}'s pet."),
            format!("Can you say what pet {n} owns?"),
            format!("What animal lives with {n} as a pet?"),
            format!("I am curious about {n}. What pet do they have?"),
            format!("Quick one: what pet does {n} have?"),
            format!("Would you know which animal {n} keeps?"),
            format!("Tell me what pet {n} has."),
            format!("What sort of pet does {n} keep?"),
            format!("Which animal is {n}'s pet?"),
            format!("What pet is {n}'s?"),
            format!("Kindly tell me which pet {n} has."),
            format!("What is the animal that {n} keeps as a pet?"),
            format!("Which creature is {n}'s pet?"),
            format!("What pet lives with {n}?"),
            format!("My question is about {n}. What pet do they own?"),
        ],
        Attr::Colour => [
            format!("What is {n}'s favourite colour?"),
            format!("Which colour does {n} like best?"),
            format!("What colour does {n} like most?"),
            format!("Could you tell me {n}'s favourite colour?"),
            format!("What colour is {n}'s favourite?"),
            format!("{n}: what is their favourite colour?"),
            format!("Please tell me which colour {n} likes best."),
            format!("What is the favourite colour of {n}?"),
            format!("Do you know {n}'s favourite colour?"),
            format!("Which colour is {n}'s favourite?"),
            format!("Name {n}'s favourite colour."),
            format!("Can you say which colour {n} likes most?"),
            format!("What colour does {n} prefer?"),
            format!("I am curious about {n}. What is their favourite colour?"),
            format!("Quick one: {n}'s favourite colour?"),
            format!("Would you know which colour {n} likes best?"),
            format!("Tell me {n}'s favourite colour."),
            format!("Which colour does {n} love most?"),
            format!("What colour would {n} pick as a favourite?"),
            format!("What is {n}'s best-loved colour?"),
            format!("Kindly tell me {n}'s favourite colour."),
            format!("Which colour is the one {n} likes best?"),
            format!("What colour does {n} like more than any other?"),
            format!("Of all colours, which does {n} like most?"),
            format!("My question is about {n}. What colour do they like best?"),
        ],
        Attr::Age => [
            format!("How old is {n}?"),
            format!("What is {n}'s age?"),
            format!("How many years old is {n}?"),
            format!("Could you tell me how old {n} is?"),
            format!("What age is {n}?"),
            format!("{n}: how old are they?"),
            format!("Please tell me {n}'s age."),
            format!("How old is {n} now?"),
            format!("Do you know {n}'s age?"),
            format!("What is the age of {n}?"),
            format!("Give me {n}'s age."),
            format!("Can you say how old {n} is?"),
            format!("How many years has {n} lived?"),
            format!("I am curious about {n}. How old are they?"),
            format!("Quick one: how old is {n}?"),
            format!("Would you know how old {n} is?"),
            format!("Tell me how old {n} is."),
            format!("What age has {n} reached?"),
            format!("How old would {n} be?"),
            format!("What is {n}'s age in years?"),
            format!("Kindly tell me how old {n} is."),
            format!("What number of years old is {n}?"),
            format!("How many birthdays has {n} had?"),
            format!("In years, how old is {n}?"),
            format!("My question is about {n}. What is their age?"),
        ],
        Attr::Friend => [
            format!("Who is {n}'s best friend?"),
            format!("Who is the best friend of {n}?"),
            format!("Name {n}'s best friend."),
            format!("Could you tell me who {n}'s best friend is?"),
            format!("Who does {n} call their best friend?"),
            format!("{n}: who is their best friend?"),
            format!("Please tell me {n}'s best friend."),
            format!("Who is {n} best friends with?"),
            format!("Do you know {n}'s best friend?"),
            format!("Which person is {n}'s best friend?"),
            format!("Name the best friend of {n}."),
            format!("Can you say who {n}'s best friend is?"),
            format!("Who is closest to {n} as a friend?"),
            format!("I am curious about {n}. Who is their best friend?"),
            format!("Quick one: who is {n}'s best friend?"),
            format!("Would you know who {n}'s best friend is?"),
            format!("Tell me who {n}'s best friend is."),
            format!("Who is the person {n} is best friends with?"),
            format!("Whom does {n} count as a best friend?"),
            format!("Who is {n}'s closest friend?"),
            format!("Kindly tell me who {n}'s best friend is."),
            format!("Which friend of {n} is the best one?"),
            format!("Who would {n} name as their best friend?"),
            format!("Of all their friends, who is {n}'s best?"),
            format!("My question is about {n}. Who is their best friend?"),
        ],
        Attr::Country => [
            format!("In which country is {n}?"),
            format!("Which country is the town of {n} in?"),
            format!("In what country does the town of {n} lie?"),
            format!("Could you tell me which country {n} is in?"),
            format!("What country is {n} in?"),
            format!("{n}: which country is it in?"),
            format!("Please tell me the country of {n}."),
            format!("Where is the town of {n}, country-wise?"),
            format!("Do you know which country {n} lies in?"),
            format!("Which country does {n} belong to?"),
            format!("Name the country where {n} is."),
            format!("Can you say which country {n} is part of?"),
            format!("What country contains the town of {n}?"),
            format!("I am curious about {n}. Which country is it in?"),
            format!("Quick one: what country is {n} in?"),
            format!("Would you know which country the town of {n} is in?"),
            format!("Tell me the country that {n} is in."),
            format!("In which country would I find {n}?"),
            format!("Which country is {n} a town of?"),
            format!("What is the country of the town {n}?"),
            format!("Kindly tell me which country {n} lies in."),
            format!("What country is the town of {n} located in?"),
            format!("To which country does {n} belong?"),
            format!("Which nation is {n} in?"),
            format!("My question is about the town of {n}. Which country is it in?"),
        ],
    };
    list[k % PHRASINGS].clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synth::skills::Bucket;

    #[test]
    fn every_phrasing_is_distinct_and_held_out_ones_are_new() {
        let ctx = Ctx::new(2);
        let mut rng = Rng::new(2, 1);
        for skill in Skill::ALL {
            let task = ctx.sample(skill, Bucket::Train, &mut rng);
            let qs: Vec<String> = (0..PHRASINGS)
                .map(|k| phrase(&ctx, skill, &task.item, true, k, false, &mut rng).0)
                .collect();
            let distinct: std::collections::HashSet<&String> = qs.iter().collect();
            assert_eq!(distinct.len(), PHRASINGS, "{skill:?}: {qs:?}");
            for q in &qs[SEEN..] {
                assert!(!qs[..SEEN].contains(q), "{skill:?}: held-out {q} is also seen");
            }
        }
    }

    #[test]
    fn constraints_are_found_in_their_clauses() {
        for c in [
            Constraint::Capitals,
            Constraint::Hyphens,
            Constraint::JustNumber,
            Constraint::JustNumbers,
            Constraint::OneWord,
            Constraint::JustName,
        ] {
            for clause in c.clauses() {
                assert_eq!(constraint_in(&format!("Do it. {clause}")), Some(c), "{clause}");
            }
        }
        assert_eq!(constraint_in("Reverse the word garden."), None);
        assert_eq!(constraint_in("Write garden in uppercase."), Some(Constraint::Capitals));
    }
}
