//! The world itself: people, towns and countries with facts about them, and the English sentences that
//! state those facts in the pretraining corpus.

use super::Rng;

const FIRST_NAMES: [&str; 48] = [
    "Mira", "Tomas", "Elena", "Bruno", "Ada", "Felix", "Nora", "Oskar", "Lena", "Hugo", "Ines", "Marco", "Clara",
    "Pavel", "Rosa", "Emil", "Greta", "Jonas", "Vera", "Anton", "Lucia", "Milo", "Hanna", "Ivo", "Sara", "Leo", "Dora",
    "Nils", "Tessa", "Otto", "Alma", "Remy", "Ilse", "Kai", "Nina", "Aron", "Edda", "Timo", "Zara", "Boris", "Yara",
    "Falk", "Liv", "Caspar", "Wren", "Juno", "Ezra", "Iris",
];

const LAST_NAMES: [&str; 48] = [
    "Castell",
    "Reed",
    "Varga",
    "Holm",
    "Brandt",
    "Okafor",
    "Lind",
    "Moreau",
    "Sato",
    "Pereira",
    "Novak",
    "Quill",
    "Ashby",
    "Fenwick",
    "Marsh",
    "Dale",
    "Kerr",
    "Laine",
    "Rook",
    "Thorne",
    "Vance",
    "Wilde",
    "Yates",
    "Abara",
    "Blom",
    "Crane",
    "Drake",
    "Ellery",
    "Frost",
    "Grey",
    "Hale",
    "Ivers",
    "Jarvis",
    "Kemp",
    "Lowe",
    "Mercer",
    "North",
    "Orme",
    "Pike",
    "Rowe",
    "Stroud",
    "Tate",
    "Underhill",
    "Voss",
    "Weller",
    "Yoon",
    "Zell",
    "Bell",
];

const TOWNS: [&str; 24] = [
    "Tolbury",
    "Marrowick",
    "Eastmere",
    "Hollin",
    "Brackenford",
    "Sunnivale",
    "Coldharbour",
    "Pellow",
    "Ravensby",
    "Dunmoor",
    "Larkhill",
    "Westcombe",
    "Ambervale",
    "Fairhaven",
    "Greystone",
    "Kestrelby",
    "Millbrook",
    "Northam",
    "Oakridge",
    "Quarrington",
    "Redwater",
    "Stonebridge",
    "Thornbury",
    "Willowmere",
];

const COUNTRIES: [&str; 6] = ["Vestmark", "Orlania", "Belmora", "Kastria", "Solvenia", "Drummond"];

const JOBS: [&str; 16] = [
    "baker",
    "farmer",
    "teacher",
    "doctor",
    "painter",
    "sailor",
    "carpenter",
    "musician",
    "librarian",
    "gardener",
    "engineer",
    "nurse",
    "potter",
    "tailor",
    "pilot",
    "fisher",
];

const PETS: [&str; 12] = [
    "cat", "dog", "parrot", "rabbit", "tortoise", "goldfish", "hamster", "ferret", "canary", "lizard", "pony", "goat",
];

const COLOURS: [&str; 10] = [
    "red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver", "brown",
];

/// First names, surnames and towns no world contains: questions about them have no answer but "I don't
/// know anyone (or any town) called that".
const UNKNOWN_FIRST: [&str; 20] = [
    "Quentin",
    "Odile",
    "Barnaby",
    "Fenella",
    "Ignatius",
    "Rosalind",
    "Cuthbert",
    "Philippa",
    "Ambrose",
    "Henrietta",
    "Lysander",
    "Marigold",
    "Thaddeus",
    "Winifred",
    "Percival",
    "Gwendolyn",
    "Octavius",
    "Clementine",
    "Rupert",
    "Beatrix",
];
const UNKNOWN_LAST: [&str; 20] = [
    "Farrow",
    "Pemberton",
    "Quimby",
    "Ashcombe",
    "Blackwood",
    "Carrow",
    "Dunstable",
    "Everly",
    "Fairweather",
    "Gallow",
    "Hartwell",
    "Inchbold",
    "Jessop",
    "Kilbride",
    "Lockwood",
    "Mortimer",
    "Nettleship",
    "Ormsby",
    "Penhallow",
    "Ridgeway",
];
const UNKNOWN_TOWNS: [&str; 16] = [
    "Bramblecote",
    "Cinderford",
    "Dewhollow",
    "Elmsworth",
    "Foxbarrow",
    "Glimmerdale",
    "Hazelmere",
    "Ivybridge",
    "Juniper Cross",
    "Kettlewick",
    "Lanternby",
    "Moorcombe",
    "Nettlefield",
    "Oxhollow",
    "Puddleby",
    "Quillstone",
];

/// A made-up full name no world contains.
pub fn unknown_person(rng: &mut Rng) -> String {
    format!("{} {}", rng.pick(&UNKNOWN_FIRST), rng.pick(&UNKNOWN_LAST))
}

/// A made-up town no world contains.
pub fn unknown_town(rng: &mut Rng) -> String {
    rng.pick(&UNKNOWN_TOWNS).to_string()
}

/// Number of people in every world, whatever the scale, so each fact is repeated often enough to be learned.
pub const NUM_PEOPLE: usize = 96;

/// A kind of fact. `Country` is about a town; every other attribute is about a person.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attr {
    Town,
    Job,
    Pet,
    Colour,
    Age,
    Friend,
    Country,
}

impl Attr {
    pub const PERSON: [Attr; 6] = [Attr::Town, Attr::Job, Attr::Pet, Attr::Colour, Attr::Age, Attr::Friend];
}

/// One fact: an attribute of a subject (a person index, or a town index for `Country`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fact {
    pub attr: Attr,
    pub subject: usize,
}

#[derive(Debug, Clone)]
pub struct Person {
    pub first: &'static str,
    pub last: &'static str,
    pub town: usize,
    pub job: usize,
    pub pet: usize,
    pub colour: usize,
    pub age: u32,
    pub friend: usize,
}

/// The people and towns of one seed.
#[derive(Debug, Clone)]
pub struct World {
    pub people: Vec<Person>,
    /// The country of each town in `TOWNS`.
    pub town_country: Vec<usize>,
}

impl World {
    pub fn new(rng: &mut Rng) -> World {
        let mut names: Vec<(usize, usize)> = (0..FIRST_NAMES.len())
            .flat_map(|f| (0..LAST_NAMES.len()).map(move |l| (f, l)))
            .collect();
        rng.shuffle(&mut names);
        // One first name and one surname per person at most twice, so names stay easy to tell apart.
        let (mut first_used, mut last_used) = ([0u8; 48], [0u8; 48]);
        let mut chosen = Vec::with_capacity(NUM_PEOPLE);
        for (f, l) in names {
            if first_used[f] < 2 && last_used[l] < 2 {
                first_used[f] += 1;
                last_used[l] += 1;
                chosen.push((f, l));
                if chosen.len() == NUM_PEOPLE {
                    break;
                }
            }
        }
        let mut people: Vec<Person> = chosen
            .into_iter()
            .map(|(f, l)| Person {
                first: FIRST_NAMES[f],
                last: LAST_NAMES[l],
                town: rng.below(TOWNS.len()),
                job: rng.below(JOBS.len()),
                pet: rng.below(PETS.len()),
                colour: rng.below(COLOURS.len()),
                age: 18 + rng.below(63) as u32,
                friend: 0,
            })
            .collect();
        // Best friends come in pairs: the order is already shuffled, so pair neighbours.
        for (i, p) in people.iter_mut().enumerate() {
            p.friend = i ^ 1;
        }
        let town_country = (0..TOWNS.len()).map(|_| rng.below(COUNTRIES.len())).collect();
        World { people, town_country }
    }

    pub fn name(&self, person: usize) -> String {
        let p = &self.people[person];
        format!("{} {}", p.first, p.last)
    }

    pub fn num_towns(&self) -> usize {
        TOWNS.len()
    }

    /// Every fact of the world, in a fixed order.
    pub fn facts(&self) -> Vec<Fact> {
        let mut out: Vec<Fact> = (0..self.people.len())
            .flat_map(|subject| Attr::PERSON.into_iter().map(move |attr| Fact { attr, subject }))
            .collect();
        out.extend((0..TOWNS.len()).map(|subject| Fact {
            attr: Attr::Country,
            subject,
        }));
        out
    }

    /// The name of the fact's subject, as written in questions and sentences.
    pub fn subject(&self, f: Fact) -> String {
        match f.attr {
            Attr::Country => TOWNS[f.subject].to_string(),
            _ => self.name(f.subject),
        }
    }

    /// The true value of a fact: the exact answer to a question about it.
    pub fn value(&self, f: Fact) -> String {
        if f.attr == Attr::Country {
            return COUNTRIES[self.town_country[f.subject]].to_string();
        }
        let p = &self.people[f.subject];
        match f.attr {
            Attr::Town => TOWNS[p.town].to_string(),
            Attr::Job => JOBS[p.job].to_string(),
            Attr::Pet => PETS[p.pet].to_string(),
            Attr::Colour => COLOURS[p.colour].to_string(),
            Attr::Age => p.age.to_string(),
            Attr::Friend => self.name(p.friend),
            Attr::Country => unreachable!("handled above"),
        }
    }

    /// Some value an attribute can take (for an invented answer about someone who does not exist).
    pub fn any_value(&self, attr: Attr, rng: &mut Rng) -> String {
        match attr {
            Attr::Town => TOWNS[rng.below(TOWNS.len())].to_string(),
            Attr::Job => JOBS[rng.below(JOBS.len())].to_string(),
            Attr::Pet => PETS[rng.below(PETS.len())].to_string(),
            Attr::Colour => COLOURS[rng.below(COLOURS.len())].to_string(),
            Attr::Age => (18 + rng.below(63)).to_string(),
            Attr::Friend => self.name(rng.below(self.people.len())),
            Attr::Country => COUNTRIES[rng.below(COUNTRIES.len())].to_string(),
        }
    }

    /// A plausible false value of the same attribute: the near-miss a confused answer would give.
    pub fn wrong_value(&self, f: Fact, rng: &mut Rng) -> String {
        let right = self.value(f);
        loop {
            let v = match f.attr {
                Attr::Town => TOWNS[rng.below(TOWNS.len())].to_string(),
                Attr::Job => JOBS[rng.below(JOBS.len())].to_string(),
                Attr::Pet => PETS[rng.below(PETS.len())].to_string(),
                Attr::Colour => COLOURS[rng.below(COLOURS.len())].to_string(),
                Attr::Age => {
                    let age = self.people[f.subject].age as i64;
                    (age + [-3, -2, -1, 1, 2, 3][rng.below(6)]).to_string()
                }
                Attr::Friend => self.name(rng.below(self.people.len())),
                Attr::Country => COUNTRIES[rng.below(COUNTRIES.len())].to_string(),
            };
            if v != right {
                return v;
            }
        }
    }

    /// One sentence stating a fact, naming the subject in full; `variant` picks the wording.
    pub fn fact_sentence(&self, f: Fact, variant: usize) -> String {
        let n = self.subject(f);
        let v = self.value(f);
        let a = article(&v);
        let options: [String; 4] = match f.attr {
            Attr::Town => [
                format!("{n} lives in {v}."),
                format!("{n} has lived in {v} for many years."),
                format!("The town of {v} is home to {n}."),
                format!("{n}'s house stands in {v}."),
            ],
            Attr::Job => [
                format!("{n} works as {a} {v}."),
                format!("By trade, {n} is {a} {v}."),
                format!("{n} earns a living as {a} {v}."),
                format!("Everyone knows {n} as {a} {v}."),
            ],
            Attr::Pet => [
                format!("{n} has a pet {v}."),
                format!("{n} keeps {a} {v} as a pet."),
                format!("The pet of {n} is {a} {v}."),
                format!("At home, {n} looks after a pet {v}."),
            ],
            Attr::Colour => [
                format!("{n}'s favourite colour is {v}."),
                format!("{n} likes {v} more than any other colour."),
                format!("Of all the colours, {n} loves {v} best."),
                format!("The favourite colour of {n} is {v}."),
            ],
            Attr::Age => [
                format!("{n} is {v} years old."),
                format!("{n} turned {v} this year."),
                format!("{n} is now {v} years of age."),
                format!("The age of {n} is {v}."),
            ],
            Attr::Friend => [
                format!("{n}'s best friend is {v}."),
                format!("{n} and {v} are best friends."),
                format!("The best friend of {n} is {v}."),
                format!("Nobody is closer to {n} than {v}, a best friend since childhood."),
            ],
            Attr::Country => [
                format!("{n} is a town in {v}."),
                format!("The town of {n} lies in {v}."),
                format!("{n} belongs to the country of {v}."),
                format!("In {v} there is a town called {n}."),
            ],
        };
        options[variant % options.len()].clone()
    }

    /// A document about one person: a few of their facts in random wordings and order.
    pub fn biography(&self, person: usize, rng: &mut Rng) -> String {
        let mut attrs = Attr::PERSON.to_vec();
        rng.shuffle(&mut attrs);
        let k = 3 + rng.below(4);
        let mut sentences: Vec<String> = attrs[..k]
            .iter()
            .map(|&attr| self.fact_sentence(Fact { attr, subject: person }, rng.below(4)))
            .collect();
        if rng.chance(0.3) {
            sentences.insert(0, format!("This is a short note about {}.", self.name(person)));
        }
        sentences.join(" ")
    }

    /// Every fact of one person in the first wording: guarantees each fact is in the corpus at any scale.
    pub fn registry_entry(&self, person: usize) -> String {
        Attr::PERSON
            .iter()
            .map(|&attr| self.fact_sentence(Fact { attr, subject: person }, 0))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// A document about a town: its country and a few of the people who live there.
    pub fn town_page(&self, town: usize, rng: &mut Rng) -> String {
        let mut out = vec![self.fact_sentence(
            Fact {
                attr: Attr::Country,
                subject: town,
            },
            rng.below(4),
        )];
        let residents: Vec<usize> = (0..self.people.len())
            .filter(|&i| self.people[i].town == town)
            .collect();
        if residents.is_empty() {
            out.push(format!("{} is a quiet place, and few people live there.", TOWNS[town]));
        }
        for &i in residents.iter().take(4) {
            let p = &self.people[i];
            let job = JOBS[p.job];
            out.push(match rng.below(3) {
                0 => format!(
                    "{} lives in {} and works as {} {job}.",
                    self.name(i),
                    TOWNS[town],
                    article(job)
                ),
                1 => format!("In {}, {} works as {} {job}.", TOWNS[town], self.name(i), article(job)),
                _ => format!("{} lives in {}.", self.name(i), TOWNS[town]),
            });
        }
        out.join(" ")
    }

    /// A short story about two best friends; every statement in it is true of the world.
    pub fn story(&self, rng: &mut Rng) -> String {
        let a = rng.below(self.people.len());
        let b = self.people[a].friend;
        let (pa, pb) = (&self.people[a], &self.people[b]);
        let (na, nb) = (self.name(a), self.name(b));
        let (ta, tb) = (TOWNS[pa.town], TOWNS[pb.town]);
        let day = ["One morning", "One rainy afternoon", "Last spring", "On a cold evening"][rng.below(4)];
        match rng.below(3) {
            0 => format!(
                "{na} and {nb} are best friends. {day}, {na} left {ta} to visit {nb} in {tb}. \
                 {nb}, who works as {} {}, was glad of the company.",
                article(JOBS[pb.job]),
                JOBS[pb.job]
            ),
            1 => format!(
                "{day}, {na} fed the pet {} and put on a {} coat, {na}'s favourite colour. \
                 Then {na} went to work as {} {} in {ta}.",
                PETS[pa.pet],
                COLOURS[pa.colour],
                article(JOBS[pa.job]),
                JOBS[pa.job]
            ),
            _ => format!(
                "{na} is {} years old and lives in {ta} with a pet {}. {na}'s best friend, {nb}, is {} \
                 and keeps {} {}.",
                pa.age,
                PETS[pa.pet],
                pb.age,
                article(PETS[pb.pet]),
                PETS[pb.pet]
            ),
        }
    }
}

/// "a" or "an" before a word.
pub fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}
