//! The default world generator: determinism, file schemas, skill coverage, disjoint prompt sets, the
//! verifier against every reference answer, preference sanity, facts present in the corpus, bad parameters.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;

use serde_json::Value;
use talaria::data::synth::gold;
use talaria::data::synth::verify::{Task, is_correct, normalise};
use talaria::data::synth::{self, END_OF_TEXT, Skill, SynthConfig, SynthSummary};

const FILES: [&str; 15] = [
    "pretrain.txt",
    "sft_train.jsonl",
    "sft_val.jsonl",
    "prefs_train.jsonl",
    "prefs_val.jsonl",
    "rankings_train.jsonl",
    "rl_prompts.jsonl",
    "eval_prompts.jsonl",
    "label_prompts.jsonl",
    "eval_seen_prompts.jsonl",
    "eval_heldout_prompts.jsonl",
    "eval_challenge.jsonl",
    "eval_correction.jsonl",
    "eval_unknown.jsonl",
    "manifest.json",
];

/// Files of prompts with a reference answer and a skill (`unknown`, with an empty answer, for the
/// questions about people and towns the world does not have).
const PROMPT_FILES: [&str; 8] = [
    "rl_prompts.jsonl",
    "eval_prompts.jsonl",
    "label_prompts.jsonl",
    "eval_seen_prompts.jsonl",
    "eval_heldout_prompts.jsonl",
    "eval_challenge.jsonl",
    "eval_correction.jsonl",
    "eval_unknown.jsonl",
];

/// The question a prompt asks: its first user turn (later turns challenge or correct an answer).
fn asked(t: &Task) -> &str {
    t.messages
        .iter()
        .find(|m| m.role == talaria::chat::Role::User)
        .map_or("", |m| m.content.as_str())
}

fn make(dir: &Path, seed: u64, scale: f64) -> SynthSummary {
    synth::generate(&SynthConfig {
        out: dir.to_path_buf(),
        seed,
        scale,
    })
    .unwrap()
}

fn lines(dir: &Path, name: &str) -> Vec<Value> {
    std::fs::read_to_string(dir.join(name))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{name}: {e}: {l}")))
        .collect()
}

/// Checks a message list: known roles, non-empty content, only `role`, `content` and `weight: 0` keys.
fn check_messages(v: &Value, last_role: &str) -> Vec<(String, String)> {
    let msgs = v.as_array().expect("messages are a list");
    assert!(!msgs.is_empty());
    let out: Vec<(String, String)> = msgs
        .iter()
        .map(|m| {
            let m = m.as_object().unwrap();
            assert!(
                m.keys().all(|k| ["role", "content", "weight"].contains(&k.as_str())),
                "{m:?}"
            );
            if let Some(w) = m.get("weight") {
                assert_eq!(w, 0, "only weight 0 is written");
                assert_eq!(m["role"], "assistant");
            }
            let role = m["role"].as_str().unwrap().to_string();
            assert!(["system", "user", "assistant"].contains(&role.as_str()));
            let content = m["content"].as_str().unwrap().to_string();
            assert!(!content.trim().is_empty());
            (role, content)
        })
        .collect();
    assert_eq!(out.last().unwrap().0, last_role, "{v}");
    out
}

fn keys(v: &Value) -> BTreeSet<&str> {
    v.as_object().unwrap().keys().map(String::as_str).collect()
}

fn user_turns(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn same_seed_same_bytes_different_seed_different_bytes() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    make(a.path(), 42, 0.05);
    make(b.path(), 42, 0.05);
    make(c.path(), 43, 0.05);
    for name in FILES {
        let read = |d: &tempfile::TempDir| std::fs::read(d.path().join(name)).unwrap();
        assert_eq!(read(&a), read(&b), "{name} differs between two runs with one seed");
        if name != "manifest.json" {
            assert_ne!(read(&a), read(&c), "{name} is the same for seeds 42 and 43");
        }
    }
}

#[test]
fn every_file_parses_with_its_schema() {
    let dir = tempfile::tempdir().unwrap();
    let summary = make(dir.path(), 1, 0.05);
    let d = dir.path();
    let text = std::fs::read_to_string(d.join("pretrain.txt")).unwrap();
    let docs: Vec<&str> = text.split(&format!("\n{END_OF_TEXT}\n")).collect();
    assert_eq!(docs.len(), summary.files["pretrain.txt"].records);
    assert!(
        docs.iter()
            .all(|doc| !doc.trim().is_empty() && !doc.contains(END_OF_TEXT))
    );
    for name in ["sft_train.jsonl", "sft_val.jsonl"] {
        for v in lines(d, name) {
            assert_eq!(keys(&v), BTreeSet::from(["messages"]));
            let msgs = check_messages(&v["messages"], "assistant");
            let roles: Vec<&str> = msgs
                .iter()
                .map(|(r, _)| r.as_str())
                .filter(|r| *r != "system")
                .collect();
            assert!(
                roles.chunks(2).all(|p| p == ["user", "assistant"]),
                "turns alternate: {roles:?}"
            );
        }
    }
    for name in ["prefs_train.jsonl", "prefs_val.jsonl"] {
        for v in lines(d, name) {
            assert_eq!(keys(&v), BTreeSet::from(["prompt", "chosen", "rejected"]));
            check_messages(&v["prompt"], "user");
            let (c, r) = (v["chosen"].as_str().unwrap(), v["rejected"].as_str().unwrap());
            assert!(!c.is_empty() && !r.is_empty());
            assert_ne!(normalise(c), normalise(r), "chosen equals rejected: {v}");
        }
    }
    for v in lines(d, "rankings_train.jsonl") {
        assert_eq!(keys(&v), BTreeSet::from(["prompt", "ranked"]));
        check_messages(&v["prompt"], "user");
        let ranked: Vec<&str> = v["ranked"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!((2..=4).contains(&ranked.len()), "3 or 4 answers, ties kept once: {v}");
        assert_eq!(
            ranked.iter().map(|a| normalise(a)).collect::<HashSet<_>>().len(),
            ranked.len(),
            "{v}"
        );
    }
    for name in PROMPT_FILES {
        for v in lines(d, name) {
            assert_eq!(keys(&v), BTreeSet::from(["messages", "answer", "skill"]));
            check_messages(&v["messages"], "user");
        }
        let tasks = Task::load_jsonl(&d.join(name)).unwrap();
        for t in &tasks {
            match Skill::from_name(&t.skill) {
                Some(_) => assert!(!t.answer.is_empty() && name != "eval_unknown.jsonl", "{name}: {t:?}"),
                None => assert!(t.skill == "unknown" && t.answer.is_empty(), "{name}: {t:?}"),
            }
        }
        let users = |t: &Task| {
            t.messages
                .iter()
                .filter(|m| m.role == talaria::chat::Role::User)
                .count()
        };
        match name {
            "eval_prompts.jsonl" | "eval_seen_prompts.jsonl" | "eval_heldout_prompts.jsonl" | "eval_unknown.jsonl" => {
                assert!(tasks.iter().all(|t| users(t) == 1), "{name}: one question each")
            }
            "eval_challenge.jsonl" | "eval_correction.jsonl" => {
                assert!(
                    tasks.iter().all(|t| users(t) == 2),
                    "{name}: a question and a follow-up"
                )
            }
            _ => {}
        }
    }
    let manifest: SynthSummary =
        serde_json::from_str(&std::fs::read_to_string(d.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest, summary);
    for name in FILES.iter().filter(|f| **f != "manifest.json") {
        let bytes = std::fs::metadata(d.join(name)).unwrap().len() as usize;
        assert_eq!(manifest.files[*name].bytes, bytes, "{name}");
    }
}

#[test]
fn every_skill_everywhere_at_small_and_default_scale() {
    for scale in [0.001, 0.05, 1.0] {
        let dir = tempfile::tempdir().unwrap();
        let s = make(dir.path(), 7, scale);
        assert_eq!(s.skills.len(), Skill::ALL.len());
        for (skill, c) in &s.skills {
            for (what, n) in [
                ("sft_train", c.sft_train),
                ("sft_val", c.sft_val),
                ("prefs_train", c.prefs_train),
                ("prefs_val", c.prefs_val),
                ("rankings_train", c.rankings_train),
                ("rl", c.rl),
                ("eval", c.eval),
                ("label", c.label),
            ] {
                assert!(n > 0, "scale {scale}: no {what} for {skill}");
            }
        }
        for name in &PROMPT_FILES[..7] {
            let tasks = Task::load_jsonl(&dir.path().join(name)).unwrap();
            let skills: BTreeSet<&str> = tasks
                .iter()
                .map(|t| t.skill.as_str())
                .filter(|k| *k != "unknown")
                .collect();
            assert_eq!(skills.len(), Skill::ALL.len(), "{name} at scale {scale}");
        }
        // RL and labelling prompts mix in questions about strangers.
        for name in ["rl_prompts.jsonl", "label_prompts.jsonl"]
            .iter()
            .filter(|_| scale >= 0.05)
        {
            assert!(s.strangers[*name] > 0, "{name} at scale {scale}: {:?}", s.strangers);
        }
        if scale == 1.0 {
            let bytes = s.files["pretrain.txt"].bytes;
            assert!(
                (2_000_000..=4_000_000).contains(&bytes),
                "{bytes} bytes of pretraining text"
            );
            assert!((5_000..=10_000).contains(&s.files["sft_train.jsonl"].records));
            assert!(s.files["prefs_train.jsonl"].records >= 5_000);
            assert!(s.files["rl_prompts.jsonl"].records >= 2_000);
            assert!(s.skills.values().all(|c| c.eval == 100), "100 eval prompts per skill");
        }
    }
}

/// The RL prompts state a format three times as often as the evaluation and labelling prompts
/// (`RL_CONSTRAINED` against `CONSTRAINED`), counted on the skills whose phrasings never state one themselves.
#[test]
fn rl_prompts_state_formats_more_often() {
    let dir = tempfile::tempdir().unwrap();
    make(dir.path(), 0, 1.0);
    let share = |name: &str| {
        let singles: Vec<Task> = Task::load_jsonl(&dir.path().join(name))
            .unwrap()
            .into_iter()
            .filter(|t| ["reverse", "compare", "add_reversed", "sort", "fact"].contains(&t.skill.as_str()))
            .filter(|t| {
                t.messages
                    .iter()
                    .filter(|m| m.role == talaria::chat::Role::User)
                    .count()
                    == 1
            })
            .collect();
        let stated = singles
            .iter()
            .filter(|t| synth::constraint_in(asked(t)).is_some())
            .count();
        stated as f64 / singles.len() as f64
    };
    let (rl, label, eval) = (
        share("rl_prompts.jsonl"),
        share("label_prompts.jsonl"),
        share("eval_seen_prompts.jsonl"),
    );
    assert!((0.65..0.85).contains(&rl), "rl_prompts.jsonl: {rl:.3} state a format");
    for (name, s) in [("label_prompts.jsonl", label), ("eval_seen_prompts.jsonl", eval)] {
        assert!((0.18..0.32).contains(&s), "{name}: {s:.3} state a format");
    }
}

#[test]
fn eval_rl_and_training_prompts_are_disjoint() {
    let dir = tempfile::tempdir().unwrap();
    make(dir.path(), 3, 1.0);
    let d = dir.path();
    let questions = |name: &str| -> Vec<String> {
        Task::load_jsonl(&d.join(name))
            .unwrap()
            .iter()
            .map(|t| asked(t).to_string())
            .collect()
    };
    let eval: Vec<String> = PROMPT_FILES[3..]
        .iter()
        .fold(questions("eval_prompts.jsonl"), |mut all, f| {
            all.extend(questions(f));
            all
        });
    let rl = questions("rl_prompts.jsonl");
    let eval_set: HashSet<&String> = eval.iter().collect();
    let rl_set: HashSet<&String> = rl.iter().collect();
    // Each file asks each question once (the evaluation sets may share an item between them).
    for name in PROMPT_FILES {
        let q = questions(name);
        assert_eq!(
            q.iter().collect::<HashSet<_>>().len(),
            q.len(),
            "{name} repeats a question"
        );
    }
    assert!(eval_set.is_disjoint(&rl_set));
    let mut training = HashSet::new();
    for name in ["sft_train.jsonl", "sft_val.jsonl"] {
        lines(d, name)
            .iter()
            .for_each(|v| training.extend(user_turns(&v["messages"])));
    }
    for name in ["prefs_train.jsonl", "prefs_val.jsonl", "rankings_train.jsonl"] {
        lines(d, name)
            .iter()
            .for_each(|v| training.extend(user_turns(&v["prompt"])));
    }
    // The labeller's prompts are training items too (their answers are ranked for the reward model).
    let label = questions("label_prompts.jsonl");
    assert_eq!(
        label.iter().collect::<HashSet<_>>().len(),
        label.len(),
        "label prompts are unique"
    );
    training.extend(label);
    assert!(training.len() > 1000);
    for q in eval.iter().chain(&rl) {
        assert!(!training.contains(q), "{q:?} is also a training prompt");
    }
    // Nor is any eval or RL prompt in the pretraining text (its quizzes use training items only).
    let text = std::fs::read_to_string(d.join("pretrain.txt")).unwrap();
    for q in eval.iter().chain(&rl) {
        assert!(!text.contains(q.as_str()), "{q:?} is in pretrain.txt");
    }
    for skill in Skill::ALL {
        let prefix = synth::few_shot_prefix(3, skill.name(), 5).unwrap();
        for q in prefix.lines().filter_map(|l| l.strip_prefix("Q: ")) {
            assert!(
                !eval_set.contains(&q.to_string()) && !rl_set.contains(&q.to_string()),
                "few-shot: {q}"
            );
        }
    }
}

#[test]
fn verifier_accepts_every_reference_and_preferences_follow_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    make(dir.path(), 5, 0.2);
    for name in PROMPT_FILES {
        for t in Task::load_jsonl(&dir.path().join(name)).unwrap() {
            if t.skill == "unknown" {
                // No answer to check: the gold labeller wants "I don't know" and marks a made-up one.
                let judge = |a: &str| gold::judge(&t.messages, "", "unknown", a, true);
                let (refusal, made_up) = (judge("I don't know anyone by that name."), judge("blue"));
                assert!(
                    refusal.content && !refusal.invented && made_up.invented && !made_up.content,
                    "{t:?}"
                );
                continue;
            }
            assert!(
                t.is_correct(&t.answer) && t.is_correct(&format!(" {}.\n", t.answer)),
                "{t:?}"
            );
            assert_eq!(t.reward(&t.answer), 1.0);
            assert!(!t.is_correct(&format!("The answer is {}.", t.answer)));
            assert!(!t.is_correct(&format!("{} {}", t.answer, t.answer)));
            assert_eq!(t.reward(""), 0.0);
        }
    }
    // For a single question, the chosen answer is the bare reference answer, so judged against itself it is
    // correct, and the rejected answer never is strictly (wrong, or right but wrapped). The skill is not in
    // the pair: judge case-sensitively (as for `capitals`) when the chosen answer has no lower-case letter,
    // which is exact for capitals and harmless for digits. Challenges, corrections and strangers are
    // judged by the gold labeller in its own tests (src/data/synth/labeller.rs).
    let mut singles = 0;
    for name in ["prefs_train.jsonl", "prefs_val.jsonl"] {
        for v in lines(dir.path(), name) {
            let (c, r) = (v["chosen"].as_str().unwrap(), v["rejected"].as_str().unwrap());
            if user_turns(&v["prompt"]).len() > 1 || c.contains("know") {
                continue;
            }
            singles += 1;
            let skill = if c.chars().any(|ch| ch.is_ascii_lowercase()) {
                "reverse"
            } else {
                "capitals"
            };
            assert!(is_correct(c, skill, c));
            assert!(!is_correct(c, skill, r), "{v}");
            assert!(c.len() <= 40 && !c.contains("answer is"), "chosen is concise: {c}");
        }
    }
    assert!(singles > 500, "{singles} single-question pairs");
}

#[test]
fn facts_asked_in_eval_are_stated_in_the_corpus() {
    let dir = tempfile::tempdir().unwrap();
    make(dir.path(), 9, 0.05);
    let text = std::fs::read_to_string(dir.path().join("pretrain.txt")).unwrap();
    let sentences: Vec<&str> = text.split(['.', '\n']).collect();
    let mut checked = 0;
    for t in Task::load_jsonl(&dir.path().join("eval_prompts.jsonl")).unwrap() {
        if t.skill != "fact" {
            continue;
        }
        // The subject is the capitalised words of the question after its first word.
        let names: Vec<String> = t
            .question()
            .split_whitespace()
            .skip(1)
            .filter(|w| w.starts_with(|c: char| c.is_ascii_uppercase()))
            .map(|w| w.trim_end_matches(['?', '.']).trim_end_matches("'s").to_string())
            .collect();
        assert!(!names.is_empty(), "{t:?}");
        let stated = sentences
            .iter()
            .any(|s| s.contains(&t.answer) && names.iter().all(|n| s.contains(n.as_str())));
        assert!(stated, "no sentence states {names:?} -> {}", t.answer);
        checked += 1;
    }
    assert!(checked >= 8);
}

#[test]
fn few_shot_prefix_is_plain_text_of_solved_examples() {
    for skill in Skill::ALL {
        let prefix = synth::few_shot_prefix(0, skill.name(), 4).unwrap();
        assert_eq!(prefix.matches("Q: ").count(), 4);
        assert_eq!(prefix.matches("\nA: ").count(), 4);
        assert!(!prefix.contains("<|"), "no chat tokens");
        let prompt = synth::few_shot_prompt(&prefix, "Reverse the word garden.");
        assert!(prompt.ends_with("Q: Reverse the word garden.\nA:"));
        assert_eq!(prefix, synth::few_shot_prefix(0, skill.name(), 4).unwrap());
    }
    let err = synth::few_shot_prefix(0, "juggling", 3).unwrap_err().to_string();
    assert!(err.contains("unknown skill") && err.contains("reverse"), "{err}");
}

#[test]
fn absurd_parameters_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    for scale in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e9] {
        let err = synth::generate(&SynthConfig {
            out: dir.path().join("x"),
            seed: 0,
            scale,
        })
        .unwrap_err();
        assert!(err.to_string().contains("--scale"), "{scale}: {err}");
    }
    assert!(!dir.path().join("x").exists(), "nothing is written on a bad scale");
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let err = synth::generate(&SynthConfig {
        out: file,
        seed: 0,
        scale: 0.01,
    })
    .unwrap_err();
    assert!(err.to_string().contains("not a directory"), "{err}");
    // The largest seed is fine.
    make(&dir.path().join("max"), u64::MAX, 0.001);
}

#[test]
fn cli_writes_the_world_and_rejects_a_bad_scale() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_talaria");
    let out = dir.path().join("world");
    let ok = std::process::Command::new(bin)
        .args([
            "data",
            "synth",
            "--out",
            out.to_str().unwrap(),
            "--seed",
            "4",
            "--scale",
            "0.02",
        ])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(FILES.iter().all(|f| out.join(f).is_file()));
    let bad = std::process::Command::new(bin)
        .args(["data", "synth", "--out", out.to_str().unwrap(), "--scale", "-1"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--scale must be greater than 0"));
}
