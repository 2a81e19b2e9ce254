//! The skills: tasks with one exact answer, the prompts that ask for them, the near-miss wrong answers a
//! confused model gives, and the split of every task item into train / val / RL / eval buckets so that those
//! sets never share a prompt.

use super::Rng;
use super::phrasing::Phrasings;
use super::world::{Attr, Fact, World};

/// Real English words of 5-9 letters; pseudo-words are added to them to make the word pool.
const WORDS: &str = "garden window pencil basket candle orange silver rabbit forest bridge castle pocket ladder \
kitten market button winter summer spring autumn planet rocket island valley meadow harbor mirror pillow blanket \
kitchen letter number animal flower butter cookie dragon engine finger gentle hammer jacket lemon marble needle \
pepper puzzle river saddle shadow spider stable ticket tunnel violin wagon yellow zebra anchor bottle carpet desert \
fabric guitar helmet insect jungle kettle lantern monkey napkin oyster parrot ribbon salmon teapot turtle umbrella \
velvet walnut whisper blossom cabinet chimney compass diamond feather glacier harvest journey lobster mustard \
octopus painter pumpkin rainbow sandwich thunder trumpet volcano weather balloon biscuit cottage dolphin giraffe \
hamster kingdom library mansion morning evening pyramid sunrise teacher village whistle captain chicken crystal \
curtain freedom gallery holiday lettuce machine mountain notebook penguin picture station tractor apple beach \
bread chair cloud dream earth field glass grape heart horse house juice knife light money music night ocean paper \
party plant queen radio smile snake stone storm sugar table tiger tooth train water whale world carrot cherry \
circle coffee copper danger doctor family farmer friend frozen golden ground hunter jigsaw kidney legend magnet \
meadow mitten narrow office pirate poetry quartz rescue school secret shovel sister sponge square stream string \
summit temple throne timber tomato travel tunnel valley wallet wizard wonder yogurt acorn badger beetle bucket \
cactus camera canyon circus clover cobweb dagger donkey falcon ferret fossil goblin hazard igloo jaguar jelly \
lizard maple muffin nutmeg orchid pebble pickle poodle quilt raven riddle rooster scarf slipper spinach sparrow \
squirrel sweater thimble toffee trolley tulip vanilla waffle weasel willow";

/// Pseudo-word syllables: onset + vowel + coda.
const ONSETS: [&str; 22] = [
    "b", "br", "c", "cl", "d", "dr", "f", "fl", "g", "gr", "h", "k", "l", "m", "n", "p", "pl", "r", "s", "st", "t", "v",
];
const VOWELS: [&str; 8] = ["a", "e", "i", "o", "u", "ai", "ea", "oo"];
const CODAS: [&str; 8] = ["", "", "n", "r", "l", "m", "s", "nd"];

/// Size of the word pool (real words first, then pseudo-words).
const WORD_POOL: usize = 1500;

/// Every skill of the default world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Skill {
    Reverse,
    Spell,
    Capitals,
    Fact,
    Compare,
    Sort,
    AddReversed,
}

impl Skill {
    pub const ALL: [Skill; 7] = [
        Skill::Reverse,
        Skill::Spell,
        Skill::Capitals,
        Skill::Fact,
        Skill::Compare,
        Skill::Sort,
        Skill::AddReversed,
    ];

    /// The name written in the `skill` field of prompt files.
    pub fn name(self) -> &'static str {
        match self {
            Skill::Reverse => "reverse",
            Skill::Spell => "spell",
            Skill::Capitals => "capitals",
            Skill::Fact => "fact",
            Skill::Compare => "compare",
            Skill::Sort => "sort",
            Skill::AddReversed => "add_reversed",
        }
    }

    pub fn from_name(name: &str) -> Option<Skill> {
        Skill::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// Which set a task item belongs to. Train items feed pretraining, SFT and preferences; val items their
/// held-out splits; RL and eval items only their prompt files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    Train,
    Val,
    Rl,
    Eval,
}

impl Bucket {
    const ALL: [Bucket; 4] = [Bucket::Train, Bucket::Val, Bucket::Rl, Bucket::Eval];

    /// Eval 10%, RL 20%, val 5%, train 65% of a finite pool, or of a number-item hash.
    fn from_percent(p: u64) -> Bucket {
        match p {
            0..10 => Bucket::Eval,
            10..30 => Bucket::Rl,
            30..35 => Bucket::Val,
            _ => Bucket::Train,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What a task is about; the bucket is decided by this, not by the wording of the prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Item {
    Word(usize),
    Fact(Fact),
    Compare(u32, u32),
    Sort(Vec<u32>),
    Add(u32, u32),
}

/// A question about someone or something the world does not have: the right answer says so.
#[derive(Debug, Clone)]
pub struct Stranger {
    pub question: String,
    /// Whether it is a town (otherwise a person).
    pub town: bool,
    /// A plausible value an inventing labeller gives instead.
    pub invented: String,
}

/// One task: the prompt text and its exact answer.
#[derive(Debug, Clone)]
pub struct Task {
    pub skill: Skill,
    pub(super) item: Item,
    pub question: String,
    pub answer: String,
}

/// The world plus the word pool and the bucket of every finite item: all that is needed to make tasks.
pub struct Ctx {
    pub world: World,
    words: Vec<String>,
    word_buckets: [Vec<usize>; 4],
    fact_buckets: [Vec<Fact>; 4],
    seed: u64,
}

impl Ctx {
    pub fn new(seed: u64) -> Ctx {
        let mut rng = Rng::new(seed, 0);
        let world = World::new(&mut rng);
        let words = word_pool(&mut rng);
        let mut word_ids: Vec<usize> = (0..words.len()).collect();
        rng.shuffle(&mut word_ids);
        let word_buckets = split(&word_ids);
        let mut facts = world.facts();
        rng.shuffle(&mut facts);
        let fact_buckets = split(&facts);
        Ctx {
            world,
            words,
            word_buckets,
            fact_buckets,
            seed,
        }
    }

    /// The bucket of a number item, from a seeded hash of its canonical key.
    fn number_bucket(&self, key: &str) -> Bucket {
        Bucket::from_percent(super::mix(self.seed ^ super::fnv1a(key.as_bytes())) % 100)
    }

    /// Word `i` of the pool.
    pub(super) fn word(&self, i: usize) -> &str {
        &self.words[i]
    }

    /// The words of a bucket (used for the pretraining text's spelling material).
    pub fn words_in(&self, bucket: Bucket) -> impl Iterator<Item = &str> {
        self.word_buckets[bucket.index()]
            .iter()
            .map(|&i| self.words[i].as_str())
    }

    /// A random task of `skill` whose item lies in `bucket`, asked in one of the corpus's three wordings.
    pub fn sample(&self, skill: Skill, bucket: Bucket, rng: &mut Rng) -> Task {
        let item = self.sample_item(skill, bucket, rng);
        self.task(skill, item, rng)
    }

    /// A random task of `skill` in `bucket`, asked in one of `phrasings` (see [`super::phrasing`]), with an
    /// explicit format constraint added with probability `constrained`.
    pub fn sample_phrased(
        &self,
        skill: Skill,
        bucket: Bucket,
        phrasings: Phrasings,
        constrained: f64,
        rng: &mut Rng,
    ) -> Task {
        let item = self.sample_item(skill, bucket, rng);
        let larger = rng.chance(0.5);
        let k = phrasings.pick(rng);
        let with = rng.chance(constrained);
        let (question, answer) = super::phrasing::phrase(self, skill, &item, larger, k, with, rng);
        Task {
            skill,
            item,
            question,
            answer,
        }
    }

    /// A question about a person or town that is not in the world, from `bucket`'s share of made-up names.
    pub fn stranger(&self, bucket: Bucket, phrasings: Phrasings, rng: &mut Rng) -> Stranger {
        loop {
            let town = rng.chance(0.2);
            let name = if town {
                super::world::unknown_town(rng)
            } else {
                super::world::unknown_person(rng)
            };
            if self.number_bucket(&format!("u{name}")) != bucket {
                continue;
            }
            let attr = if town { Attr::Country } else { rng.pick(&Attr::PERSON) };
            let question = super::phrasing::fact_question_about(&name, attr, phrasings.pick(rng));
            let invented = self.world.any_value(attr, rng);
            return Stranger {
                question,
                town,
                invented,
            };
        }
    }

    /// The item of a random task of `skill` in `bucket`.
    fn sample_item(&self, skill: Skill, bucket: Bucket, rng: &mut Rng) -> Item {
        match skill {
            Skill::Reverse | Skill::Spell | Skill::Capitals => Item::Word(rng.pick(&self.word_buckets[bucket.index()])),
            Skill::Fact => Item::Fact(rng.pick(&self.fact_buckets[bucket.index()])),
            Skill::Compare => loop {
                // Both numbers have the same number of digits (so length gives nothing away), and half the
                // time the same leading digit.
                let (lo, hi) = if rng.chance(0.25) { (10, 100) } else { (100, 1000) };
                let a = rng.range(lo, hi);
                let b = if rng.chance(0.5) {
                    a / lo * lo + rng.range(0, lo)
                } else {
                    rng.range(lo, hi)
                };
                if a != b && self.number_bucket(&format!("c{}-{}", a.min(b), a.max(b))) == bucket {
                    break Item::Compare(a, b);
                }
            },
            Skill::Sort => loop {
                let k = 3 + rng.below(2);
                let mut xs: Vec<u32> = Vec::with_capacity(k);
                while xs.len() < k {
                    let x = rng.range(0, 100);
                    if !xs.contains(&x) {
                        xs.push(x);
                    }
                }
                let mut sorted = xs.clone();
                sorted.sort_unstable();
                if self.number_bucket(&format!("s{}", join(&sorted, "-"))) == bucket {
                    break Item::Sort(xs);
                }
            },
            Skill::AddReversed => loop {
                let digits = |rng: &mut Rng| {
                    if rng.chance(0.5) {
                        rng.range(10, 100)
                    } else {
                        rng.range(100, 1000)
                    }
                };
                let (a, b) = (digits(rng), digits(rng));
                if self.number_bucket(&format!("a{}-{}", a.min(b), a.max(b))) == bucket {
                    break Item::Add(a, b);
                }
            },
        }
    }

    fn task(&self, skill: Skill, item: Item, rng: &mut Rng) -> Task {
        let t = rng.below(3);
        let (question, answer) = match (&item, skill) {
            (Item::Word(i), _) => {
                let w = &self.words[*i];
                match skill {
                    Skill::Reverse => (
                        [
                            format!("Reverse the word {w}."),
                            format!("What is {w} spelled backwards?"),
                            format!("Write the word {w} backwards."),
                        ][t]
                            .clone(),
                        reversed(w),
                    ),
                    Skill::Spell => (
                        [
                            format!("Spell the word {w} letter by letter."),
                            format!("How do you spell {w}? Separate the letters with hyphens."),
                            format!("Write out the letters of {w}, separated by hyphens."),
                        ][t]
                            .clone(),
                        spelled(w),
                    ),
                    _ => (
                        [
                            format!("Write the word {w} in capital letters."),
                            format!("Write {w} in uppercase."),
                            format!("Reply with the word {w} in all capitals."),
                        ][t]
                            .clone(),
                        w.to_uppercase(),
                    ),
                }
            }
            (Item::Fact(f), _) => (fact_question(&self.world, *f, t), self.world.value(*f)),
            (Item::Compare(a, b), _) => {
                let larger = rng.chance(0.5);
                let q = match (larger, t) {
                    (true, 0) => format!("Which is larger, {a} or {b}?"),
                    (true, _) => format!("Which number is bigger: {a} or {b}?"),
                    (false, 0) => format!("Which is smaller, {a} or {b}?"),
                    (false, _) => format!("Which number is less: {a} or {b}?"),
                };
                (q, if larger { a.max(b) } else { a.min(b) }.to_string())
            }
            (Item::Sort(xs), _) => {
                let list = join(xs, ", ");
                let q = [
                    format!("Sort these numbers from smallest to largest: {list}."),
                    format!("Put these numbers in increasing order: {list}."),
                    format!("Arrange {list} from smallest to largest."),
                ][t]
                    .clone();
                let mut sorted = xs.clone();
                sorted.sort_unstable();
                (q, join(&sorted, ", "))
            }
            (Item::Add(a, b), _) => {
                let (ra, rb) = (rev_digits(*a), rev_digits(*b));
                let q = [
                    format!("Numbers here are written with the ones digit first. What is {ra} + {rb}?"),
                    format!("With digits written ones first, add {ra} and {rb}."),
                    format!("In ones-digit-first notation, compute {ra} + {rb}."),
                ][t]
                    .clone();
                (q, rev_digits(a + b))
            }
        };
        Task {
            skill,
            item,
            question,
            answer,
        }
    }

    /// A realistic wrong answer: a wrong digit, two letters swapped, an off-by-one, a wrong fact. Always
    /// differs from the correct answer after the verifier's normalisation.
    pub fn near_miss(&self, task: &Task, rng: &mut Rng) -> String {
        for _ in 0..32 {
            let candidate = match &task.item {
                Item::Word(i) => {
                    let w = &self.words[*i];
                    match task.skill {
                        Skill::Reverse => match rng.below(4) {
                            0 | 1 => swap_adjacent(&task.answer, rng),
                            2 => drop_letter(&task.answer, rng),
                            _ => w.clone(),
                        },
                        Skill::Spell => {
                            let mut letters: Vec<char> = w.chars().collect();
                            match rng.below(3) {
                                0 => {
                                    let i = rng.below(letters.len() - 1);
                                    letters.swap(i, i + 1);
                                }
                                1 => {
                                    letters.remove(rng.below(letters.len()));
                                }
                                _ => {
                                    let i = rng.below(letters.len());
                                    letters.insert(i, letters[i]);
                                }
                            }
                            spelled(&letters.into_iter().collect::<String>())
                        }
                        _ => match rng.below(3) {
                            0 => {
                                let i = rng.below(w.len());
                                format!("{}{}{}", w[..i].to_uppercase(), &w[i..=i], w[i + 1..].to_uppercase())
                            }
                            1 => drop_letter(&task.answer, rng),
                            _ => swap_adjacent(&task.answer, rng),
                        },
                    }
                }
                Item::Fact(f) => self.world.wrong_value(*f, rng),
                Item::Compare(a, b) => {
                    if task.answer == a.to_string() {
                        b.to_string()
                    } else {
                        a.to_string()
                    }
                }
                Item::Sort(xs) => {
                    let mut sorted = xs.clone();
                    sorted.sort_unstable();
                    match rng.below(3) {
                        0 => {
                            let i = rng.below(sorted.len() - 1);
                            sorted.swap(i, i + 1);
                            join(&sorted, ", ")
                        }
                        1 => join(xs, ", "),
                        _ => {
                            sorted.reverse();
                            join(&sorted, ", ")
                        }
                    }
                }
                Item::Add(a, b) => match rng.below(3) {
                    0 => rev_digits(sum_without_carry(*a, *b)),
                    1 => (a + b).to_string(),
                    _ => {
                        let mut digits: Vec<u8> = task.answer.bytes().collect();
                        let i = rng.below(digits.len());
                        digits[i] = b'0' + (digits[i] - b'0' + 1 + rng.below(9) as u8) % 10;
                        String::from_utf8(digits).expect("ASCII digits")
                    }
                },
            };
            if !crate::data::synth::verify::is_correct(&task.answer, task.skill.name(), &candidate) {
                return candidate;
            }
        }
        // Every generator above produces a wrong answer almost always; this keeps the guarantee absolute.
        format!("{}{}", task.answer, task.answer.chars().last().unwrap_or('x'))
    }
}

/// Shuffled items split into the four buckets by the fixed percentages.
fn split<T: Clone>(items: &[T]) -> [Vec<T>; 4] {
    let mut out: [Vec<T>; 4] = Default::default();
    for (i, x) in items.iter().enumerate() {
        let b = Bucket::from_percent((i * 100 / items.len()) as u64);
        out[b.index()].push(x.clone());
    }
    debug_assert!(Bucket::ALL.iter().all(|b| !out[b.index()].is_empty()));
    out
}

fn fact_question(world: &World, f: Fact, t: usize) -> String {
    let n = world.subject(f);
    let options = match f.attr {
        Attr::Town => [
            format!("Where does {n} live?"),
            format!("In which town does {n} live?"),
            format!("Which town is {n}'s home?"),
        ],
        Attr::Job => [
            format!("What is {n}'s job?"),
            format!("What does {n} do for a living?"),
            format!("What is the occupation of {n}?"),
        ],
        Attr::Pet => [
            format!("What pet does {n} have?"),
            format!("Which animal does {n} keep as a pet?"),
            format!("What kind of pet does {n} own?"),
        ],
        Attr::Colour => [
            format!("What is {n}'s favourite colour?"),
            format!("Which colour does {n} like best?"),
            format!("What colour does {n} like most?"),
        ],
        Attr::Age => [
            format!("How old is {n}?"),
            format!("What is {n}'s age?"),
            format!("How many years old is {n}?"),
        ],
        Attr::Friend => [
            format!("Who is {n}'s best friend?"),
            format!("Who is the best friend of {n}?"),
            format!("Name {n}'s best friend."),
        ],
        Attr::Country => [
            format!("In which country is {n}?"),
            format!("Which country is the town of {n} in?"),
            format!("In what country does the town of {n} lie?"),
        ],
    };
    options[t].clone()
}

/// Real words first, then pronounceable pseudo-words, all 5-9 lowercase letters and distinct.
fn word_pool(rng: &mut Rng) -> Vec<String> {
    let mut words: Vec<String> = Vec::with_capacity(WORD_POOL);
    let mut seen = std::collections::HashSet::new();
    for w in WORDS.split_whitespace() {
        if (5..=9).contains(&w.len()) && seen.insert(w.to_string()) {
            words.push(w.to_string());
        }
    }
    while words.len() < WORD_POOL {
        let syllables = 2 + rng.below(2);
        let w: String = (0..syllables)
            .map(|_| format!("{}{}{}", rng.pick(&ONSETS), rng.pick(&VOWELS), rng.pick(&CODAS)))
            .collect();
        if (5..=9).contains(&w.len()) && seen.insert(w.clone()) {
            words.push(w);
        }
    }
    words
}

pub fn reversed(w: &str) -> String {
    w.chars().rev().collect()
}

pub fn spelled(w: &str) -> String {
    w.chars().map(String::from).collect::<Vec<_>>().join("-")
}

/// A number's decimal digits, ones digit first.
pub fn rev_digits(n: u32) -> String {
    reversed(&n.to_string())
}

pub fn join(xs: &[u32], sep: &str) -> String {
    xs.iter().map(u32::to_string).collect::<Vec<_>>().join(sep)
}

fn sum_without_carry(a: u32, b: u32) -> u32 {
    let (mut a, mut b, mut place, mut out) = (a, b, 1, 0);
    while a > 0 || b > 0 {
        out += (a % 10 + b % 10) % 10 * place;
        a /= 10;
        b /= 10;
        place *= 10;
    }
    out
}

fn swap_adjacent(s: &str, rng: &mut Rng) -> String {
    let mut cs: Vec<char> = s.chars().collect();
    let i = rng.below(cs.len() - 1);
    cs.swap(i, i + 1);
    cs.into_iter().collect()
}

fn drop_letter(s: &str, rng: &mut Rng) -> String {
    let mut cs: Vec<char> = s.chars().collect();
    cs.remove(rng.below(cs.len()));
    cs.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synth::verify::is_correct;

    #[test]
    fn near_misses_are_wrong_and_references_right() {
        let ctx = Ctx::new(3);
        let mut rng = Rng::new(3, 99);
        for skill in Skill::ALL {
            for bucket in Bucket::ALL {
                for _ in 0..200 {
                    let task = ctx.sample(skill, bucket, &mut rng);
                    assert!(is_correct(&task.answer, skill.name(), &task.answer), "{task:?}");
                    let wrong = ctx.near_miss(&task, &mut rng);
                    assert!(
                        !is_correct(&task.answer, skill.name(), &wrong),
                        "{task:?} accepted {wrong}"
                    );
                    // A near miss stays close: similar length, never empty.
                    assert!(!wrong.is_empty() && wrong.len() <= task.answer.len() * 3 + 4, "{wrong}");
                }
            }
        }
    }

    #[test]
    fn answers_are_computed_correctly() {
        assert_eq!(reversed("garden"), "nedrag");
        assert_eq!(spelled("cat"), "c-a-t");
        assert_eq!(rev_digits(120), "021");
        // 43 + 81 = 124, written ones first: 34 + 18 = 421.
        assert_eq!(rev_digits(43 + 81), "421");
        assert_eq!(sum_without_carry(58, 67), 15);
        assert_eq!(Skill::from_name("add_reversed"), Some(Skill::AddReversed));
        assert_eq!(Skill::from_name("nope"), None);
    }

    #[test]
    fn finite_pools_split_into_nonempty_disjoint_buckets() {
        let ctx = Ctx::new(11);
        assert_eq!(ctx.words.len(), WORD_POOL);
        assert!(ctx.words.iter().all(|w| (5..=9).contains(&w.len())));
        let total: usize = ctx.word_buckets.iter().map(Vec::len).sum();
        assert_eq!(total, WORD_POOL);
        assert!(ctx.fact_buckets.iter().all(|b| !b.is_empty()));
        assert!(ctx.word_buckets[Bucket::Eval.index()].len() >= 100);
    }
}
