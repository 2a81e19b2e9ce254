//! The built-in default world (`talaria data synth`): a deterministic generator of everything the recipe
//! needs, so a fresh machine needs no download: a pretraining corpus about a small world of people and towns,
//! SFT demonstrations written by a pool of simulated labellers with their habits ([`labeller`]), preference
//! pairs and rankings from the consistent gold labeller ([`gold`]), RL prompts, and held-out evaluation sets
//! with exact answers. `docs/default-world.md` describes the skills, the labellers and the evaluation sets.
//!
//! Same seed and scale, same bytes: all randomness comes from one seeded generator defined here, so the
//! output does not change with dependency versions.

mod corpus;
pub mod gold;
mod labeller;
mod phrasing;
mod skills;
pub mod verify;
mod world;

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::chat::Role;
use crate::data::synth::verify::Task as PromptRecord;
use labeller::Scene;
pub use labeller::{Habit, Labeller, POOL, Queue};
use phrasing::Phrasings;
pub use phrasing::{Constraint, PHRASINGS, SEEN, constraint_in};
pub use skills::Skill;
use skills::{Bucket, Ctx, Task};

/// Bumped whenever the same seed would produce different files (4: the labeller pool and its habits,
/// 25 phrasings per skill, challenges, corrections and strangers, the new evaluation sets; the corpus and
/// `eval_prompts.jsonl` are the same as version 3's. 5: three quarters of the RL prompts' single questions
/// state a format instead of a quarter; every other file is version 4's. 6: unasked explanations follow the
/// answer instead of leading it, which changes the demonstrations and comparisons; the corpus and every prompt
/// file are version 5's).
pub const GENERATOR_VERSION: u32 = 6;
/// The largest accepted `--scale` (about 300 MB of pretraining text).
pub const MAX_SCALE: f64 = 100.0;
/// The line that separates documents in `pretrain.txt`.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// Where to write, which seed, and how much (1.0: ~3 MB of text, ~7k demonstrations, ~5k pairs).
#[derive(Debug, Clone)]
pub struct SynthConfig {
    pub out: PathBuf,
    pub seed: u64,
    pub scale: f64,
}

/// What was generated; also written as `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynthSummary {
    pub generator: String,
    pub version: u32,
    pub seed: u64,
    pub scale: f64,
    /// Per file: records (documents for `pretrain.txt`, lines for JSONL) and bytes.
    pub files: BTreeMap<String, FileCount>,
    /// Per skill: records in each file.
    pub skills: BTreeMap<String, SkillCounts>,
    /// Per prompt file: its questions about people and towns the world does not have.
    #[serde(default)]
    pub strangers: BTreeMap<String, usize>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FileCount {
    pub records: usize,
    pub bytes: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SkillCounts {
    pub sft_train: usize,
    pub sft_val: usize,
    pub prefs_train: usize,
    pub prefs_val: usize,
    pub rankings_train: usize,
    pub label: usize,
    pub rl: usize,
    pub eval: usize,
    /// Held-out items in the seen phrasings, some with a format constraint (the behaviour evaluation).
    pub eval_seen: usize,
    pub eval_heldout: usize,
    pub eval_challenge: usize,
    pub eval_correction: usize,
}

pub use crate::chat::Message;

/// A line of `sft_*.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub messages: Vec<Message>,
}

/// A line of `prefs_*.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefPair {
    pub prompt: Vec<Message>,
    pub chosen: String,
    pub rejected: String,
}

/// A line of `rankings_train.jsonl`: answers best first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ranking {
    pub prompt: Vec<Message>,
    pub ranked: Vec<String>,
}

/// Record counts per skill for one scale; small scales keep a floor so every skill is in every file.
struct Sizes {
    pretrain_bytes: usize,
    sft_train: usize,
    sft_val: usize,
    prefs_train: usize,
    prefs_val: usize,
    rankings: usize,
    label: usize,
    rl: usize,
    eval: usize,
    eval_seen: usize,
    eval_heldout: usize,
    eval_turns: usize,
    eval_unknown: usize,
}

impl Sizes {
    fn new(scale: f64) -> Sizes {
        let n = |base: f64, floor: usize| ((base * scale).round() as usize).max(floor);
        Sizes {
            pretrain_bytes: n(3_000_000.0, 20_000),
            sft_train: n(1000.0, 8),
            sft_val: n(50.0, 2),
            prefs_train: n(720.0, 8),
            prefs_val: n(72.0, 4),
            rankings: n(215.0, 3),
            label: n(150.0, 4),
            rl: n(300.0, 8),
            eval: n(100.0, 8),
            eval_seen: n(100.0, 8),
            eval_heldout: n(50.0, 4),
            eval_turns: n(20.0, 4),
            eval_unknown: n(100.0, 8),
        }
    }
}

fn validate(cfg: &SynthConfig) -> Result<()> {
    if !cfg.scale.is_finite() {
        bail!("--scale must be a finite number, got {}", cfg.scale);
    }
    if cfg.scale <= 0.0 {
        bail!("--scale must be greater than 0, got {}", cfg.scale);
    }
    if cfg.scale > MAX_SCALE {
        bail!(
            "--scale must be at most {MAX_SCALE} (about 300 MB of text), got {}",
            cfg.scale
        );
    }
    Ok(())
}

/// Generates the default world into `cfg.out` (created if missing; files there are overwritten).
pub fn generate(cfg: &SynthConfig) -> Result<SynthSummary> {
    validate(cfg)?;
    if cfg.out.exists() && !cfg.out.is_dir() {
        bail!("{} exists and is not a directory", cfg.out.display());
    }
    fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;
    let sizes = Sizes::new(cfg.scale);
    let ctx = Ctx::new(cfg.seed);
    let rng = |stream: u64| Rng::new(cfg.seed, stream);
    let mut summary = SynthSummary {
        generator: "talaria data synth".to_string(),
        version: GENERATOR_VERSION,
        seed: cfg.seed,
        scale: cfg.scale,
        files: BTreeMap::new(),
        skills: Skill::ALL
            .iter()
            .map(|s| (s.name().to_string(), SkillCounts::default()))
            .collect(),
        strangers: BTreeMap::new(),
    };
    let (text, docs) = corpus::corpus(&ctx, sizes.pretrain_bytes, &mut rng(1));
    write(cfg, &mut summary, "pretrain.txt", docs, text)?;

    // `eval_prompts.jsonl`: version 3's prompts, in the corpus's three wordings, unchanged.
    {
        let mut r = rng(2);
        let mut lines = Vec::new();
        for skill in Skill::ALL {
            let mut seen = HashSet::new();
            // Finite pools (words, facts) may run out of new prompts at large scales: stop after many misses.
            let mut misses = 0;
            while seen.len() < sizes.eval && misses < 1000 {
                let task = ctx.sample(skill, Bucket::Eval, &mut r);
                if !seen.insert(task.question.clone()) {
                    misses += 1;
                    continue;
                }
                lines.push(record(
                    vec![Message::new(Role::User, &task.question)],
                    &task.answer,
                    skill.name(),
                )?);
            }
            summary
                .skills
                .get_mut(skill.name())
                .expect("every skill has counts")
                .eval = seen.len();
        }
        write_lines(cfg, &mut summary, "eval_prompts.jsonl", &lines)?;
    }

    // Prompt files in the new phrasings: RL and labelling prompts mix single questions (some with a format
    // constraint), challenges, corrections and questions about strangers; each evaluation set is one kind.
    for (name, bucket, per_skill, stream, kind, phrasings, constrained) in [
        (
            "rl_prompts.jsonl",
            Bucket::Rl,
            sizes.rl,
            3,
            None,
            Phrasings::Seen,
            labeller::RL_CONSTRAINED,
        ),
        (
            "label_prompts.jsonl",
            Bucket::Train,
            sizes.label,
            9,
            None,
            Phrasings::Seen,
            labeller::CONSTRAINED,
        ),
        (
            "eval_seen_prompts.jsonl",
            Bucket::Eval,
            sizes.eval_seen,
            14,
            Some(Scene::Single),
            Phrasings::Seen,
            labeller::CONSTRAINED,
        ),
        (
            "eval_heldout_prompts.jsonl",
            Bucket::Eval,
            sizes.eval_heldout,
            10,
            Some(Scene::Single),
            Phrasings::HeldOut,
            labeller::CONSTRAINED,
        ),
        (
            "eval_challenge.jsonl",
            Bucket::Eval,
            sizes.eval_turns,
            11,
            Some(Scene::Challenge),
            Phrasings::Seen,
            labeller::CONSTRAINED,
        ),
        (
            "eval_correction.jsonl",
            Bucket::Eval,
            sizes.eval_turns,
            12,
            Some(Scene::Correction),
            Phrasings::Seen,
            labeller::CONSTRAINED,
        ),
    ] {
        let mut r = rng(stream);
        let mut lines = Vec::new();
        let mut strangers = HashSet::new();
        for skill in Skill::ALL {
            let mut seen = HashSet::new();
            let mut misses = 0;
            while seen.len() < per_skill && misses < 1000 {
                let scene = kind.unwrap_or_else(|| labeller::prompt_scene(&mut r));
                if scene == Scene::Stranger {
                    let s = ctx.stranger(bucket, phrasings, &mut r);
                    if strangers.insert(s.question.clone()) {
                        lines.push(record(labeller::prompt(&s.question, &mut r), "", "unknown")?);
                    }
                    continue;
                }
                let task = ctx.sample_phrased(skill, bucket, phrasings, constrained, &mut r);
                if !seen.insert(task.question.clone()) {
                    misses += 1;
                    continue;
                }
                let messages = match scene {
                    Scene::Challenge => labeller::challenge_prompt(&task, &mut r),
                    Scene::Correction => labeller::correction_prompt(&task, &ctx, &mut r),
                    _ => labeller::prompt(&task.question, &mut r),
                };
                lines.push(record(messages, &task.answer, skill.name())?);
            }
            let counts = summary.skills.get_mut(skill.name()).expect("every skill has counts");
            match stream {
                3 => counts.rl = seen.len(),
                9 => counts.label = seen.len(),
                10 => counts.eval_heldout = seen.len(),
                14 => counts.eval_seen = seen.len(),
                11 => counts.eval_challenge = seen.len(),
                _ => counts.eval_correction = seen.len(),
            }
        }
        summary.strangers.insert(name.to_string(), strangers.len());
        write_lines(cfg, &mut summary, name, &lines)?;
    }
    {
        let mut r = rng(13);
        let mut seen = HashSet::new();
        let mut lines = Vec::new();
        let mut misses = 0;
        while seen.len() < sizes.eval_unknown && misses < 1000 {
            let s = ctx.stranger(Bucket::Eval, Phrasings::Seen, &mut r);
            if !seen.insert(s.question.clone()) {
                misses += 1;
                continue;
            }
            lines.push(record(vec![Message::new(Role::User, &s.question)], "", "unknown")?);
        }
        summary.strangers.insert("eval_unknown.jsonl".into(), seen.len());
        write_lines(cfg, &mut summary, "eval_unknown.jsonl", &lines)?;
    }

    let per_skill = |r: &mut Rng, bucket: Bucket, n: usize, make: &mut dyn FnMut(&Task, &mut Rng) -> String| {
        let mut lines = Vec::with_capacity(n * Skill::ALL.len());
        for _ in 0..n {
            for skill in Skill::ALL {
                let task = ctx.sample_phrased(skill, bucket, Phrasings::Seen, labeller::CONSTRAINED, r);
                lines.push(make(&task, r));
            }
        }
        lines
    };
    for (name, bucket, n, stream) in [
        ("sft_train.jsonl", Bucket::Train, sizes.sft_train, 4),
        ("sft_val.jsonl", Bucket::Val, sizes.sft_val, 5),
    ] {
        // Each demonstration is written by a labeller of the queue its prompt goes to.
        let mut make = |task: &Task, r: &mut Rng| {
            let scene = labeller::scene(r);
            let who = labeller::writer(labeller::queue(scene, task), r);
            let second = ctx.sample_phrased(r.pick(&Skill::ALL), bucket, Phrasings::Seen, labeller::CONSTRAINED, r);
            let stranger = ctx.stranger(bucket, Phrasings::Seen, r);
            let messages = labeller::demonstration(who, scene, task, &second, &stranger, &ctx, r);
            serde_json::to_string(&Conversation { messages }).expect("conversations serialise")
        };
        let lines = per_skill(&mut rng(stream), bucket, n, &mut make);
        for counts in summary.skills.values_mut() {
            if bucket == Bucket::Train {
                counts.sft_train = n;
            } else {
                counts.sft_val = n;
            }
        }
        write_lines(cfg, &mut summary, name, &lines)?;
    }
    for (name, bucket, n, stream) in [
        ("prefs_train.jsonl", Bucket::Train, sizes.prefs_train, 6),
        ("prefs_val.jsonl", Bucket::Val, sizes.prefs_val, 7),
    ] {
        let mut make = |task: &Task, r: &mut Rng| {
            let scene = match labeller::scene(r) {
                Scene::TwoQuestions | Scene::Thanks => Scene::Single,
                s => s,
            };
            let stranger = ctx.stranger(bucket, Phrasings::Seen, r);
            serde_json::to_string(&labeller::pair(scene, task, &stranger, &ctx, r)).expect("pairs serialise")
        };
        let lines = per_skill(&mut rng(stream), bucket, n, &mut make);
        for counts in summary.skills.values_mut() {
            if bucket == Bucket::Train {
                counts.prefs_train = n;
            } else {
                counts.prefs_val = n;
            }
        }
        write_lines(cfg, &mut summary, name, &lines)?;
    }
    let mut make = |task: &Task, r: &mut Rng| {
        serde_json::to_string(&labeller::ranking(task, &ctx, r)).expect("rankings serialise")
    };
    let lines = per_skill(&mut rng(8), Bucket::Train, sizes.rankings, &mut make);
    summary
        .skills
        .values_mut()
        .for_each(|c| c.rankings_train = sizes.rankings);
    write_lines(cfg, &mut summary, "rankings_train.jsonl", &lines)?;

    let manifest = serde_json::to_string_pretty(&summary)? + "\n";
    let path = cfg.out.join("manifest.json");
    fs::write(&path, manifest).with_context(|| format!("writing {}", path.display()))?;
    Ok(summary)
}

/// A prompt-file line: the conversation so far, the reference answer and the skill.
fn record(messages: Vec<Message>, answer: &str, skill: &str) -> Result<String> {
    Ok(serde_json::to_string(&PromptRecord {
        messages,
        answer: answer.to_string(),
        skill: skill.to_string(),
    })?)
}

fn write_lines(cfg: &SynthConfig, summary: &mut SynthSummary, name: &str, lines: &[String]) -> Result<()> {
    let mut text = lines.join("\n");
    text.push('\n');
    write(cfg, summary, name, lines.len(), text)
}

fn write(cfg: &SynthConfig, summary: &mut SynthSummary, name: &str, records: usize, text: String) -> Result<()> {
    let path: &Path = &cfg.out.join(name);
    fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    summary.files.insert(
        name.to_string(),
        FileCount {
            records,
            bytes: text.len(),
        },
    );
    Ok(())
}

/// `k` solved examples of `skill` as plain text (`Q: question\nA: answer\n\n` each), for prompting a base
/// model few-shot. Drawn from the training items of the world of `seed`, so never an eval or RL prompt.
pub fn few_shot_prefix(seed: u64, skill: &str, k: usize) -> Result<String> {
    let Some(skill) = Skill::from_name(skill) else {
        let names: Vec<&str> = Skill::ALL.iter().map(|s| s.name()).collect();
        bail!("unknown skill {skill:?}; the default world has {}", names.join(", "));
    };
    let ctx = Ctx::new(seed);
    let mut rng = Rng::new(seed, 100 + skill as u64);
    let mut out = String::new();
    for _ in 0..k {
        let task = ctx.sample(skill, Bucket::Train, &mut rng);
        out.push_str(&format!("Q: {}\nA: {}\n\n", task.question, task.answer));
    }
    Ok(out)
}

/// The few-shot prompt for one question: the base model's answer is its continuation up to the first newline.
pub fn few_shot_prompt(prefix: &str, question: &str) -> String {
    format!("{prefix}Q: {question}\nA:")
}

/// SplitMix64 finaliser: a stateless 64-bit mix.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a: a stable hash of bytes (std's hasher may change between Rust versions).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The generator's only source of randomness: SplitMix64, one independent stream per file.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Rng {
        Rng(mix(seed ^ mix(stream)))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Uniform in `lo..hi`.
    fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + self.below((hi - lo) as usize) as u32
    }

    fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }

    fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            xs.swap(i, self.below(i + 1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_stable_and_in_range() {
        let mut a = Rng::new(7, 1);
        let mut b = Rng::new(7, 1);
        let xs: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        assert_eq!(xs, (0..5).map(|_| b.next_u64()).collect::<Vec<_>>());
        assert_ne!(Rng::new(7, 2).next_u64(), Rng::new(7, 1).next_u64());
        assert!((0..1000).all(|_| a.below(7) < 7 && (10..20).contains(&a.range(10, 20))));
        // Pinned value: a change here changes every generated file, so bump GENERATOR_VERSION with it.
        assert_eq!(fnv1a(b"talaria"), 0xdc81_a810_d4e2_6337);
    }
}
