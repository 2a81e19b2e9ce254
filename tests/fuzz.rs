//! Property-based fuzzing of everything that reads outside input: the JSONL readers
//! (conversations, preferences, prompts, default-world tasks, MMLU, GSM8K), the chat template, the
//! OpenAI request parsers, tokenizer loading and import, and checkpoint loading. Inputs are the
//! small committed seeds in `tests/fuzz_corpus/`, mutated byte by byte (replace, insert, delete,
//! truncate, repeat), and arbitrary messages for the template. Every call must return a value or
//! an error; a panic fails the case, and the JSONL readers' and GPT-2 import's errors must name
//! the file.
//!
//! `cargo test --release --test fuzz` runs 256 cases per target; `PROPTEST_CASES=N` runs more
//! (BENCHMARKS.md, "Fuzzing", has the long runs).

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device};
use proptest::prelude::*;
use talaria::chat::{ChatTemplate, Message, Role};
use talaria::checkpoint::Checkpoint;
use talaria::data::conversations::read_conversations;
use talaria::data::preferences::read_preferences;
use talaria::data::prompts::read_prompts;
use talaria::data::synth::verify::Task;
use talaria::eval::benchmarks::{read_gsm8k, read_mmlu};
use talaria::model::{GptConfig, init_weights};
use talaria::serve::openai::{parse_chat, parse_completion};
use talaria::tokenizer::{self, Tokenizer};

fn corpus(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fuzz_corpus")
            .join(name),
    )
    .unwrap()
}

/// One byte-level edit at a position given as a fraction of the input's length.
#[derive(Debug, Clone)]
enum Edit {
    Replace(f64, u8),
    Insert(f64, u8),
    Delete(f64, usize),
    Truncate(f64),
    Repeat(f64, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    // Bytes that matter to JSON and to the chat template come often, any byte sometimes.
    let byte = prop_oneof![
        prop::sample::select(b"{}[]\":,\\0123456789-.eE \n\ttrufalsn<|>".to_vec()),
        any::<u8>(),
    ];
    let at = 0.0..1.0f64;
    prop_oneof![
        (at.clone(), byte.clone()).prop_map(|(a, b)| Edit::Replace(a, b)),
        (at.clone(), byte).prop_map(|(a, b)| Edit::Insert(a, b)),
        (at.clone(), 1..16usize).prop_map(|(a, n)| Edit::Delete(a, n)),
        at.clone().prop_map(Edit::Truncate),
        (at, 1..64usize).prop_map(|(a, n)| Edit::Repeat(a, n)),
    ]
}

fn mutate(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for e in edits {
        let pos = |f: f64, len: usize| ((f * len as f64) as usize).min(len);
        match *e {
            Edit::Replace(f, x) if !b.is_empty() => {
                let i = pos(f, b.len() - 1);
                b[i] = x;
            }
            Edit::Insert(f, x) => {
                let i = pos(f, b.len());
                b.insert(i, x);
            }
            Edit::Delete(f, n) => {
                let i = pos(f, b.len());
                b.drain(i..(i + n).min(b.len()));
            }
            Edit::Truncate(f) => b.truncate(pos(f, b.len())),
            Edit::Repeat(f, n) => {
                let i = pos(f, b.len());
                let chunk = b[i..(i + n).min(b.len())].to_vec();
                b.splice(i..i, chunk);
            }
            _ => {}
        }
    }
    b
}

fn mutated(seed: &'static str) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(edit(), 1..8).prop_map(move |edits| mutate(&corpus(seed), &edits))
}

/// Writes `bytes` to a fresh file named `name` and returns it with its directory.
fn file_with(name: &str, bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

/// A reader's result on `bytes`: a panic fails the case; an error must name the file.
fn read_ok<T>(name: &str, bytes: &[u8], read: impl Fn(&Path) -> anyhow::Result<T>) -> Result<(), TestCaseError> {
    let (_dir, path) = file_with(name, bytes);
    if let Err(e) = read(&path) {
        let msg = format!("{e:#}");
        prop_assert!(msg.contains(name), "error does not name the file: {msg}");
    }
    Ok(())
}

#[test]
fn the_seeds_are_valid_inputs() {
    let f = |n: &str| file_with(n, &corpus(n));
    let (_a, p) = f("conversations.jsonl");
    // Two OpenAI conversations, Alpaca, self-instruct's two instances, one OpenAssistant tree.
    assert_eq!(read_conversations(&p).unwrap().conversations.len(), 6);
    let (_b, p) = f("preferences.jsonl");
    assert_eq!(read_preferences(&p).unwrap().groups.len(), 4);
    let (_c, p) = f("prompts.jsonl");
    assert_eq!(read_prompts(&p).unwrap().len(), 4);
    let (_t, p) = f("tasks.jsonl");
    assert_eq!(Task::load_jsonl(&p).unwrap().len(), 3);
    let (_d, p) = f("mmlu.jsonl");
    assert_eq!(read_mmlu(&p, None).unwrap().len(), 2);
    let (_e, p) = f("gsm8k.jsonl");
    assert_eq!(read_gsm8k(&p, None).unwrap().len(), 2);
    parse_chat(&corpus("chat_request.json"), 64).unwrap();
    parse_completion(&corpus("completion_request.json"), 64, 300).unwrap();
    assert_eq!(
        parse_completion(&corpus("completion_ids_request.json"), 64, 300)
            .unwrap()
            .prompts
            .len(),
        2
    );
}

proptest! {
    #[test]
    fn conversation_files(bytes in mutated("conversations.jsonl")) {
        read_ok("conversations.jsonl", &bytes, read_conversations)?;
    }

    #[test]
    fn preference_files(bytes in mutated("preferences.jsonl")) {
        read_ok("preferences.jsonl", &bytes, read_preferences)?;
    }

    #[test]
    fn prompt_files(bytes in mutated("prompts.jsonl")) {
        read_ok("prompts.jsonl", &bytes, read_prompts)?;
    }

    #[test]
    fn task_files(bytes in mutated("tasks.jsonl")) {
        read_ok("tasks.jsonl", &bytes, Task::load_jsonl)?;
    }

    #[test]
    fn benchmark_files(bytes in mutated("mmlu.jsonl"), maths in mutated("gsm8k.jsonl")) {
        read_ok("mmlu.jsonl", &bytes, |p| read_mmlu(p, None))?;
        read_ok("gsm8k.jsonl", &maths, |p| read_gsm8k(p, None))?;
    }

    #[test]
    fn openai_requests(
        chat in mutated("chat_request.json"),
        completion in mutated("completion_request.json"),
        ids in mutated("completion_ids_request.json"),
        context in 1..300usize,
    ) {
        // Either a request (its token ids inside the vocabulary) or an OpenAI-style error naming what is wrong.
        if let Err(e) = parse_chat(&chat, context) {
            prop_assert!(e.body()["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
        for body in [&completion, &ids] {
            match parse_completion(body, context, 300) {
                Err(e) => prop_assert!(e.body()["error"]["message"].as_str().is_some_and(|m| !m.is_empty())),
                Ok(r) => {
                    let sound = r.prompts.iter().all(|p| match p {
                        talaria::serve::openai::PromptInput::Ids(v) => !v.is_empty() && v.iter().all(|&t| t < 300),
                        talaria::serve::openai::PromptInput::Text(t) => !t.is_empty(),
                    });
                    prop_assert!(sound);
                }
            }
        }
    }
}

fn test_tokenizer() -> &'static (Tokenizer, String) {
    static T: OnceLock<(Tokenizer, String)> = OnceLock::new();
    T.get_or_init(|| {
        let (_dir, path) = file_with("text.txt", corpus("conversations.jsonl").repeat(20).as_slice());
        let cfg = tokenizer::TrainConfig {
            vocab_size: 300,
            min_frequency: 2,
            show_progress: false,
        };
        let (tok, _) =
            talaria::data::bpe::train_from_files(&[path], &talaria::data::readers::ReadOptions::default(), &cfg)
                .unwrap();
        let json = tok.to_json().unwrap();
        (tok, json)
    })
}

fn message() -> impl Strategy<Value = Message> {
    let role = prop::sample::select(vec![Role::System, Role::User, Role::Assistant]);
    // Text that includes the template's own special-token spellings.
    let text = prop_oneof![
        ".{0,40}",
        prop::sample::select(vec![
            "<|end|>".to_string(),
            "<|user|>hi".to_string(),
            "<|assistant|>".to_string(),
            "<|endoftext|>".to_string(),
            "<|bos|>".to_string(),
            String::new(),
        ]),
    ];
    (role, prop::collection::vec(text, 1..3)).prop_map(|(r, parts)| Message::new(r, parts.concat()))
}

proptest! {
    #[test]
    fn the_chat_template_renders_any_conversation(messages in prop::collection::vec(message(), 0..6), context in 1..128usize) {
        let (tok, _) = test_tokenizer();
        let template = ChatTemplate::new(tok).unwrap();
        if let Ok(r) = template.render(tok, &messages) {
            prop_assert_eq!(r.ids.len(), r.mask.len());
        }
        let _ = template.render_prompt(tok, &messages);
        let _ = template.render_truncated(tok, &messages, context);
    }

    #[test]
    fn tokenizer_files(bytes in prop::collection::vec(edit(), 1..6)) {
        let (_, json) = test_tokenizer();
        let mutated = mutate(json.as_bytes(), &bytes);
        if let Err(e) = Tokenizer::from_json(&String::from_utf8_lossy(&mutated)) {
            let msg = format!("{e:#}");
            prop_assert!(msg.contains("invalid tokenizer.json"), "{}", msg);
        }
    }

    #[test]
    fn gpt2_vocab_and_merges(vocab in prop::collection::vec(edit(), 0..6), merges in prop::collection::vec(edit(), 0..6)) {
        let v = mutate(br#"{"!": 0, "a": 1, "b": 2, "ab": 3, "<|endoftext|>": 4}"#, &vocab);
        let m = mutate(b"#version: 0.2\na b\n", &merges);
        let dir = tempfile::tempdir().unwrap();
        let (vp, mp) = (dir.path().join("vocab.json"), dir.path().join("merges.txt"));
        std::fs::write(&vp, v).unwrap();
        std::fs::write(&mp, m).unwrap();
        if let Err(e) = tokenizer::import_gpt2(&vp, &mp) {
            let msg = format!("{e:#}");
            prop_assert!(msg.contains("vocab.json") || msg.contains("merges.txt"), "{msg}");
        }
    }
}

/// A small valid checkpoint's files, by name.
fn checkpoint_files() -> &'static Vec<(String, Vec<u8>)> {
    static C: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    C.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let (tok, json) = test_tokenizer();
        let mut cfg = GptConfig::preset("test").unwrap();
        cfg.vocab_size = tok.vocab_size();
        let w = init_weights(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
        let path = dir.path().join("ckpt");
        common::save_checkpoint(&path, &cfg, &w, Some(json), "sft");
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&path)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect();
        files.sort();
        files
    })
}

proptest! {
    #[test]
    fn corrupted_checkpoints(which in any::<prop::sample::Index>(), edits in prop::collection::vec(edit(), 1..6)) {
        let files = checkpoint_files();
        let (target, _) = &files[which.index(files.len())];
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in files {
            let bytes = if name == target { mutate(bytes, &edits) } else { bytes.clone() };
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        if let Ok(c) = Checkpoint::load(dir.path(), DType::F32, &Device::Cpu) {
            // Loaded despite the edit (in a value that stays valid): it must still build a model.
            let _ = c.model();
        }
    }
}
