//! Models leaving and entering Talaria: `talaria export hf` read by `transformers`, `talaria export
//! gguf` read back by candle and by llama.cpp's `gguf` package, and `talaria import hf` from a Hub
//! id (through the Hugging Face cache, offline) and from directories it cannot read.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use serde_json::{Value, json};

use talaria::chat::{self, Message, Role};
use talaria::checkpoint::Checkpoint;
use talaria::engine::{Chatbot, SamplingParams};
use talaria::eval::behaviour::{Behaviour, SetScores};
use talaria::eval::report::{EvalSummary, StageEval};
use talaria::interop::{self, gguf::GgufDtype, hf::ExportKind};
use talaria::model::{GptConfig, init_weights};
use talaria::tokenizer::{self, Tokenizer};
use talaria::train::reward::{RewardModel, SCORE_HEAD, render_answer};
use talaria::train::sft::{SftConfig, sft};

const BIN: &str = env!("CARGO_BIN_EXE_talaria");
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// A small demonstration set with a learnable rule, so that greedy answers are clear choices.
fn conversations() -> Vec<Vec<Message>> {
    let facts = [
        ("apple", "red"),
        ("sky", "blue"),
        ("grass", "green"),
        ("sun", "yellow"),
        ("night", "black"),
        ("snow", "white"),
    ];
    let mut out = vec![];
    for round in 0..10 {
        for (thing, colour) in facts {
            let q = if round % 2 == 0 {
                format!("What colour is the {thing}?")
            } else {
                format!("Tell me the colour of the {thing}.")
            };
            let mut c = vec![];
            if round % 3 == 0 {
                c.push(Message::new(Role::System, "Answer in one sentence."));
            }
            c.push(Message::new(Role::User, q));
            c.push(Message::new(Role::Assistant, format!("The {thing} is {colour}.")));
            if round % 4 == 1 {
                c.push(Message::new(Role::User, "Thanks!"));
                c.push(Message::new(Role::Assistant, "You are welcome."));
            }
            out.push(c);
        }
    }
    out
}

/// A tokenizer trained on the demonstrations, a fresh `test`-preset model, and 200 SFT steps on
/// them; trained once per test run (in cargo's scratch directory) and shared by the tests.
fn chat_model() -> PathBuf {
    static MODEL: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    MODEL
        .get_or_init(|| {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("interop_chat_model");
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            train_chat_model(&dir)
        })
        .clone()
}

fn train_chat_model(dir: &Path) -> PathBuf {
    let text: Vec<String> = conversations()
        .iter()
        .flat_map(|c| c.iter().map(|m| m.content.clone()))
        .collect();
    let cfg = tokenizer::TrainConfig {
        vocab_size: 300,
        min_frequency: 2,
        show_progress: false,
    };
    let tok = tokenizer::train_bpe(&cfg, text.into_iter().map(Ok)).unwrap().0;
    let mut gcfg = GptConfig::preset("test").unwrap();
    gcfg.vocab_size = tok.vocab_size();
    let w = init_weights(&gcfg, 5, DType::F32, &Device::Cpu).unwrap();
    let base = dir.join("base");
    common::save_checkpoint(&base, &gcfg, &w, Some(&tok.to_json().unwrap()), "pretrain");
    let data = dir.join("train.jsonl");
    let mut f = std::fs::File::create(&data).unwrap();
    for c in conversations() {
        writeln!(f, "{}", json!({ "messages": c })).unwrap();
    }
    let run = dir.join("sft");
    sft(&SftConfig {
        init: base,
        data: vec![data],
        val_data: vec![],
        val_fraction: 0.1,
        batch_size: 4,
        seq_len: Some(64),
        train: common::train_cfg(&run, 200, 3e-3),
    })
    .unwrap();
    run
}

fn python_has(modules: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run_python(script: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) {
    let mut cmd = Command::new("python3");
    cmd.arg(Path::new(FIXTURES).join(script));
    for a in args {
        cmd.arg(a);
    }
    let out = cmd.output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    eprintln!("{stdout}");
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{stderr}");
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn user(text: &str) -> Message {
    Message::new(Role::User, text)
}

#[test]
fn export_hf_writes_a_chat_ready_directory_with_a_model_card() {
    let tmp = tempfile::tempdir().unwrap();
    let run = chat_model();
    let out = tmp.path().join("hf");
    let s = interop::export_hf(&run, &out).unwrap();
    assert_eq!(s.kind, ExportKind::LanguageModel);
    assert!(s.chat);
    let tok = Tokenizer::from_file(&out.join("tokenizer.json")).unwrap();
    let id = |t: &str| tok.special_id(t).unwrap();

    let config = read_json(&out.join("config.json"));
    assert_eq!(config["architectures"], json!(["GPT2LMHeadModel"]));
    assert_eq!(config["eos_token_id"], json!(id(tokenizer::END)));
    let tc = read_json(&out.join("tokenizer_config.json"));
    assert_eq!(tc["chat_template"], json!(chat::jinja_template()));
    assert_eq!(
        (&tc["bos_token"], &tc["eos_token"], &tc["pad_token"]),
        (&json!(tokenizer::BOS), &json!(tokenizer::END), &json!(tokenizer::EOT))
    );
    let gen_cfg = read_json(&out.join("generation_config.json"));
    assert_eq!(gen_cfg["eos_token_id"], json!([id(tokenizer::END), id(tokenizer::EOT)]));
    let map = read_json(&out.join("special_tokens_map.json"));
    assert_eq!(map["bos_token"], json!(tokenizer::BOS));

    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    for want in [
        "# A Talaria chat model",
        "| sft | 200 |",
        "| pretrain | 0 |",
        "apply_chat_template",
        "No `talaria eval` results were found",
    ] {
        assert!(card.contains(want), "the model card lacks {want:?}:\n{card}");
    }

    // Inside a run directory with `talaria eval`'s results, the card quotes them.
    let stage_dir = tmp.path().join("run/ppo/checkpoint");
    std::fs::create_dir_all(&stage_dir).unwrap();
    for f in std::fs::read_dir(talaria::checkpoint::resolve(&run)).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, stage_dir.join(f.file_name().unwrap())).unwrap();
    }
    let seen = |strict: f64, content: f64| Behaviour {
        seen: SetScores {
            strict,
            content,
            gold: 2.5,
            ..SetScores::default()
        },
        ..Behaviour::default()
    };
    let summary = EvalSummary {
        stages: vec![
            StageEval {
                name: "sft".into(),
                behaviour: Some(seen(0.134, 0.206)),
                ..StageEval::default()
            },
            StageEval {
                name: "ppo".into(),
                behaviour: Some(seen(0.176, 0.196)),
                win_vs_sft_gold: Some(0.63),
                kl_to_sft: Some(0.289),
                ..StageEval::default()
            },
        ],
        ..EvalSummary::default()
    };
    std::fs::write(
        tmp.path().join("run/eval.json"),
        serde_json::to_string(&summary).unwrap(),
    )
    .unwrap();
    // Only a speedrun directory's eval.json counts: without its settings file the card quotes nothing.
    interop::export_hf(&tmp.path().join("run/ppo"), &tmp.path().join("hf1")).unwrap();
    let card = std::fs::read_to_string(tmp.path().join("hf1/README.md")).unwrap();
    assert!(card.contains("No `talaria eval` results were found"), "{card}");
    std::fs::write(tmp.path().join("run").join(talaria::eval::report::SETTINGS_FILE), "{}").unwrap();
    interop::export_hf(&tmp.path().join("run/ppo"), &tmp.path().join("hf2")).unwrap();
    let card = std::fs::read_to_string(tmp.path().join("hf2/README.md")).unwrap();
    for want in [
        "| sft | 13.4% | 20.6% | 2.50 | - | - |",
        "| ppo (this model) | 17.6% | 19.6% | 2.50 | 63.0% | 0.289 |",
    ] {
        assert!(card.contains(want), "the model card lacks {want:?}:\n{card}");
    }
}

/// The exported chat model in `transformers`: the chat template's ids are Talaria's, and greedy
/// `generate` answers what `talaria chat --temperature 0` answers.
#[test]
fn transformers_renders_and_answers_the_exported_chat_model_as_talaria_does() {
    if !python_has("torch, transformers") {
        common::skip("torch", "python3 with torch and transformers is not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let run = chat_model();
    let out = tmp.path().join("hf");
    interop::export_hf(&run, &out).unwrap();
    let bot = Chatbot::load(&run, &Device::Cpu).unwrap();
    let template = bot.template.unwrap();
    let max_new = 20;

    // One-turn questions through the `talaria chat` command, with and without a system message.
    let mut cases = vec![];
    for (system, q) in [
        (None, "What colour is the sky?"),
        (Some("Answer in one sentence."), "Tell me the colour of the snow."),
        (None, "What colour is the grass?"),
    ] {
        let mut cmd = Command::new(BIN);
        cmd.arg("chat").arg(&run).args([
            "--temperature",
            "0",
            "--max-new-tokens",
            &max_new.to_string(),
            "--prompt",
            q,
        ]);
        let mut messages = vec![];
        if let Some(s) = system {
            cmd.args(["--system", s]);
            messages.push(Message::new(Role::System, s));
        }
        messages.push(user(q));
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let answer = String::from_utf8(o.stdout).unwrap().trim_end_matches('\n').to_string();
        cases.push(json!({
            "messages": messages,
            "prompt_ids": template.render_prompt(&bot.tokenizer, &messages).unwrap(),
            "answer": answer,
            "max_new_tokens": max_new,
        }));
    }
    // A multi-turn conversation, whose whole rendering (the training ids) is compared too.
    let history = vec![
        Message::new(Role::System, "Answer in one sentence."),
        user("What colour is the apple?"),
        Message::new(Role::Assistant, "The apple is red."),
        user("Thanks!"),
    ];
    let answer = bot
        .answer(&history, &SamplingParams::greedy(), 0, max_new, |_| true)
        .unwrap();
    let mut full = history.clone();
    full.push(Message::new(Role::Assistant, answer.text.clone()));
    cases.push(json!({
        "messages": history,
        "prompt_ids": template.render_prompt(&bot.tokenizer, &history).unwrap(),
        "answer": answer.text,
        "max_new_tokens": max_new,
        "full_messages": full,
        "full_ids": template.render(&bot.tokenizer, &full).unwrap().ids,
    }));
    let answers: Vec<&str> = cases.iter().map(|c| c["answer"].as_str().unwrap()).collect();
    let learned = [
        "The sky is blue.",
        "The snow is white.",
        "The grass is green.",
        "You are welcome.",
    ];
    assert!(
        answers.iter().filter(|a| learned.contains(a)).count() >= 2,
        "the tiny model should have learned most answers (so that greedy choices are clear): {answers:?}"
    );
    let cases_path = tmp.path().join("cases.json");
    std::fs::write(&cases_path, Value::Array(cases).to_string()).unwrap();
    run_python("check_chat_export.py", &[&"chat", &out, &cases_path]);
}

/// A reward model exports as `GPT2ForSequenceClassification` with the same scores.
#[test]
fn the_exported_reward_model_scores_as_talaria_in_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let run = chat_model();
    let ck = Checkpoint::load(&run, DType::F32, &Device::Cpu).unwrap();
    let mut weights: HashMap<String, Tensor> = ck.weights.clone();
    let head = Tensor::randn(0f32, 0.5, (1, ck.config.n_embd), &Device::Cpu).unwrap();
    weights.insert(SCORE_HEAD.into(), head);
    let rm_path = tmp.path().join("rm");
    common::save_checkpoint(&rm_path, &ck.config, &weights, ck.tokenizer_json.as_deref(), "reward");
    let out = tmp.path().join("rm_hf");
    let s = interop::export_hf(&rm_path, &out).unwrap();
    assert_eq!(s.kind, ExportKind::RewardModel);
    assert!(!out.join("generation_config.json").exists());
    let config = read_json(&out.join("config.json"));
    assert_eq!(config["architectures"], json!(["GPT2ForSequenceClassification"]));
    assert_eq!(config["num_labels"], json!(1));
    let rm = RewardModel::load(&rm_path, &Device::Cpu).unwrap();
    assert_eq!(
        config["pad_token_id"],
        json!(rm.tokenizer.special_id(tokenizer::EOT).unwrap())
    );
    assert!(
        std::fs::read_to_string(out.join("README.md"))
            .unwrap()
            .contains("GPT2ForSequenceClassification.from_pretrained")
    );

    if !python_has("torch, transformers") {
        common::skip("torch", "python3 with torch and transformers is not installed");
        return;
    }
    let items: Vec<(Vec<Message>, &str)> = vec![
        (vec![user("What colour is the sky?")], "The sky is blue."),
        (vec![user("What colour is the sky?")], "The sky is green, I think."),
        (
            vec![
                Message::new(Role::System, "Answer in one sentence."),
                user("Tell me the colour of the sun."),
            ],
            "Yellow.",
        ),
        (
            vec![
                user("What colour is the snow?"),
                Message::new(Role::Assistant, "The snow is white."),
                user("Thanks!"),
            ],
            "You are welcome.",
        ),
    ];
    let refs: Vec<(&[Message], &str)> = items.iter().map(|(p, a)| (p.as_slice(), *a)).collect();
    let scores = rm.score(&refs, 8).unwrap();
    let spread = scores.iter().cloned().fold(f32::MIN, f32::max) - scores.iter().cloned().fold(f32::MAX, f32::min);
    assert!(spread > 1e-3, "scores should differ: {scores:?}");
    let cases: Vec<Value> = items
        .iter()
        .zip(&scores)
        .map(|((p, a), s)| {
            let mut m = p.clone();
            m.push(Message::new(Role::Assistant, *a));
            json!({
                "messages": m,
                "ids": render_answer(&rm.tokenizer, &rm.template, p, a).unwrap(),
                "score": s,
            })
        })
        .collect();
    let cases_path = tmp.path().join("rm_cases.json");
    std::fs::write(&cases_path, Value::Array(cases).to_string()).unwrap();
    run_python("check_chat_export.py", &[&"reward", &out, &cases_path]);
}

/// The GGUF file read back by candle's reader: llama.cpp's keys and tensor names, f32 exact.
#[test]
fn gguf_export_has_llama_cpp_keys_names_and_exact_f32_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let run = chat_model();
    let path = tmp.path().join("m.gguf");
    let s = interop::gguf::export_gguf(&run, &path, GgufDtype::F32).unwrap();
    assert!(s.chat_template && s.f16_fallbacks.is_empty());
    let ck = Checkpoint::load(&run, DType::F32, &Device::Cpu).unwrap();
    let mut f = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let md = |k: &str| content.metadata.get(k).unwrap_or_else(|| panic!("no {k}")).clone();
    assert_eq!(md("general.architecture").to_string().unwrap(), "gpt2");
    assert_eq!(md("gpt2.block_count").to_u32().unwrap() as usize, ck.config.n_layer);
    assert_eq!(
        md("gpt2.context_length").to_u32().unwrap() as usize,
        ck.config.n_positions
    );
    assert_eq!(md("tokenizer.ggml.pre").to_string().unwrap(), "starcoder");
    assert_eq!(
        md("tokenizer.chat_template").to_string().unwrap(),
        &chat::jinja_template()
    );
    let tok = Tokenizer::from_json(ck.tokenizer_json.as_deref().unwrap()).unwrap();
    let tokens = md("tokenizer.ggml.tokens");
    let tokens = tokens.to_vec().unwrap();
    assert_eq!(tokens.len(), ck.config.vocab_size);
    let end = tok.special_id(tokenizer::END).unwrap();
    assert_eq!(tokens[end as usize].to_string().unwrap(), tokenizer::END);
    assert_eq!(md("tokenizer.ggml.eos_token_id").to_u32().unwrap(), end);
    let types = md("tokenizer.ggml.token_type");
    assert_eq!(
        types.to_vec().unwrap()[end as usize].to_i32().unwrap(),
        3,
        "control token"
    );

    let wanted = 4 + 12 * ck.config.n_layer;
    assert_eq!(content.tensor_infos.len(), wanted);
    let qkv = content.tensor(&mut f, "blk.1.attn_qkv.weight", &Device::Cpu).unwrap();
    let c = ck.config.n_embd;
    assert_eq!(qkv.shape().dims(), &[3 * c, c]);
    let got = qkv.dequantize(&Device::Cpu).unwrap();
    let want = ck.weights["transformer.h.1.attn.c_attn.weight"].t().unwrap();
    assert_eq!(common::max_abs_diff(&got, &want.contiguous().unwrap()), 0.0);
    let emb = content.tensor(&mut f, "token_embd.weight", &Device::Cpu).unwrap();
    assert_eq!(
        common::max_abs_diff(
            &emb.dequantize(&Device::Cpu).unwrap(),
            &ck.weights["transformer.wte.weight"]
        ),
        0.0
    );
}

/// The same files read by llama.cpp's own Python `gguf` package, in f32, f16 and q8_0.
#[test]
fn llama_cpp_gguf_package_reads_back_every_dtype() {
    if !python_has("gguf, numpy, safetensors") {
        common::skip(
            "gguf",
            "python3 with gguf, numpy and safetensors is not installed (pip install gguf safetensors)",
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let run = chat_model();
    let hf = tmp.path().join("hf");
    interop::export_hf(&run, &hf).unwrap();
    for (dtype, name) in [
        (GgufDtype::F32, "f32"),
        (GgufDtype::F16, "f16"),
        (GgufDtype::Q8_0, "q8_0"),
    ] {
        let path = tmp.path().join(format!("{name}.gguf"));
        interop::gguf::export_gguf(&run, &path, dtype).unwrap();
        run_python("check_gguf.py", &[&path, &hf, &name]);
    }
}

#[test]
fn gguf_export_falls_back_to_f16_for_odd_rows_and_refuses_what_llama_cpp_cannot_run() {
    let tmp = tempfile::tempdir().unwrap();
    let run = chat_model();
    let ck = Checkpoint::load(&run, DType::F32, &Device::Cpu).unwrap();

    // Rows of 48 are not whole q8_0 blocks: those matrices are written in f16 and named.
    let cfg = GptConfig {
        n_embd: 48,
        ..ck.config.clone()
    };
    let w = init_weights(&cfg, 2, DType::F32, &Device::Cpu).unwrap();
    let odd = tmp.path().join("odd");
    common::save_checkpoint(&odd, &cfg, &w, ck.tokenizer_json.as_deref(), "pretrain");
    let s = interop::gguf::export_gguf(&odd, &tmp.path().join("odd.gguf"), GgufDtype::Q8_0).unwrap();
    assert!(
        s.f16_fallbacks.contains(&"blk.0.attn_qkv.weight".to_string()),
        "{:?}",
        s.f16_fallbacks
    );
    // ffn_down's rows are 4 x 48 = 192 long: whole blocks.
    assert!(!s.f16_fallbacks.contains(&"blk.0.ffn_down.weight".to_string()));

    let mut weights = ck.weights.clone();
    weights.insert(
        SCORE_HEAD.into(),
        Tensor::zeros((1, ck.config.n_embd), DType::F32, &Device::Cpu).unwrap(),
    );
    let rm = tmp.path().join("rm");
    common::save_checkpoint(&rm, &ck.config, &weights, ck.tokenizer_json.as_deref(), "reward");
    let e = interop::gguf::export_gguf(&rm, &tmp.path().join("rm.gguf"), GgufDtype::F32).unwrap_err();
    assert!(e.to_string().contains("reward model"), "{e}");

    let bare = tmp.path().join("bare");
    common::save_checkpoint(&bare, &ck.config, &ck.weights, None, "pretrain");
    let e = interop::gguf::export_gguf(&bare, &tmp.path().join("bare.gguf"), GgufDtype::F32).unwrap_err();
    assert!(e.to_string().contains("no tokenizer.json"), "{e}");
    assert!(!tmp.path().join("bare.gguf").exists() && !tmp.path().join("bare.gguf.partial").exists());

    let o = Command::new(BIN)
        .args(["export", "gguf"])
        .arg(&run)
        .args(["--out", "x.gguf", "--dtype", "q4"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("expected f32, f16 or q8_0"));
}

/// Lays out a Hub model in a Hugging Face cache as `hf-hub` and `huggingface_hub` do:
/// `hub/models--OWNER--NAME/refs/main` naming a snapshot directory holding the files.
fn cache_hub_model(hf_home: &Path, id: &str, files: &[(&str, &Path)]) {
    let repo = hf_home.join("hub").join(format!("models--{}", id.replace('/', "--")));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    for (name, src) in files {
        std::fs::copy(src, snap.join(name)).unwrap();
    }
}

fn talaria_offline(hf_home: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env("HF_HOME", hf_home)
        // A closed port: any attempt to reach the Hub fails at once.
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap()
}

#[test]
fn import_hf_takes_a_hub_id_from_the_cache_offline_and_says_when_it_cannot() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = common::plain_completion_checkpoint(tmp.path(), "plain");
    let hf = tmp.path().join("plain_hf");
    interop::export_hf(&plain, &hf).unwrap();
    let home = tmp.path().join("hf_home");
    // The Hub's gpt2 repository has vocab.json and merges.txt; the import builds the tokenizer from them.
    cache_hub_model(
        &home,
        "someone/tiny-gpt2",
        &[
            ("config.json", &hf.join("config.json")),
            ("model.safetensors", &hf.join("model.safetensors")),
            ("vocab.json", &tmp.path().join("vocab.json")),
            ("merges.txt", &tmp.path().join("merges.txt")),
        ],
    );
    let out = tmp.path().join("imported");
    let o = talaria_offline(
        &home,
        &["import", "hf", "someone/tiny-gpt2", "--out", out.to_str().unwrap()],
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("plain completion model"), "{stdout}");
    let (a, b) = (
        Checkpoint::load(&plain, DType::F32, &Device::Cpu).unwrap(),
        Checkpoint::load(&out, DType::F32, &Device::Cpu).unwrap(),
    );
    for (name, t) in &a.weights {
        assert_eq!(common::max_abs_diff(t, &b.weights[name]), 0.0, "{name}");
    }
    let (ta, tb) = (
        Tokenizer::from_json(a.tokenizer_json.as_deref().unwrap()).unwrap(),
        Tokenizer::from_json(b.tokenizer_json.as_deref().unwrap()).unwrap(),
    );
    let text = "the thin cat, 123 <|endoftext|>";
    assert_eq!(ta.encode(text).unwrap(), tb.encode(text).unwrap());

    // A sharded copy (an index and two files) in the cache imports the same weights.
    let shards = tmp.path().join("shards");
    std::fs::create_dir_all(&shards).unwrap();
    let mut names: Vec<&String> = a.weights.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let tensors: HashMap<String, Tensor> = part.iter().map(|n| ((*n).clone(), a.weights[*n].clone())).collect();
        talaria::checkpoint::save_safetensors(&shards.join(file), &tensors).unwrap();
        for n in part {
            map.insert((*n).clone(), json!(file));
        }
    }
    std::fs::write(
        shards.join("model.safetensors.index.json"),
        json!({"weight_map": map}).to_string(),
    )
    .unwrap();
    cache_hub_model(
        &home,
        "someone/sharded",
        &[
            ("config.json", &hf.join("config.json")),
            (
                "model.safetensors.index.json",
                &shards.join("model.safetensors.index.json"),
            ),
            (
                "model-00001-of-00002.safetensors",
                &shards.join("model-00001-of-00002.safetensors"),
            ),
            (
                "model-00002-of-00002.safetensors",
                &shards.join("model-00002-of-00002.safetensors"),
            ),
            ("vocab.json", &tmp.path().join("vocab.json")),
            ("merges.txt", &tmp.path().join("merges.txt")),
        ],
    );
    let out2 = tmp.path().join("imported_sharded");
    let o = talaria_offline(
        &home,
        &["import", "hf", "someone/sharded", "--out", out2.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c = Checkpoint::load(&out2, DType::F32, &Device::Cpu).unwrap();
    for (name, t) in &a.weights {
        assert_eq!(common::max_abs_diff(t, &c.weights[name]), 0.0, "{name}");
    }

    // Not in the cache and no network: a clear message, quickly.
    let t0 = std::time::Instant::now();
    let o = talaria_offline(
        &home,
        &["import", "hf", "gpt2", "--out", tmp.path().join("x").to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("offline: cannot reach the Hugging Face Hub at http://127.0.0.1:9"),
        "{err}"
    );
    assert!(err.contains("pass their directory instead"), "{err}");
    assert!(t0.elapsed().as_secs() < 30);

    // Neither a directory nor a Hub id.
    let o = talaria_offline(&home, &["import", "hf", "./no/such/dir", "--out", "x"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("neither a directory nor a Hugging Face Hub model id"));

    // A directory with pickled weights only.
    let pickled = tmp.path().join("pickled");
    std::fs::create_dir_all(&pickled).unwrap();
    std::fs::copy(hf.join("config.json"), pickled.join("config.json")).unwrap();
    std::fs::write(pickled.join("pytorch_model.bin"), b"not read").unwrap();
    let o = talaria_offline(&home, &["import", "hf", pickled.to_str().unwrap(), "--out", "x"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("has only pytorch_model.bin; Talaria reads safetensors"),
        "{err}"
    );
}

#[test]
fn chat_continues_text_with_a_plain_completion_model_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = common::plain_completion_checkpoint(tmp.path(), "plain");
    let o = Command::new(BIN)
        .arg("chat")
        .arg(&plain)
        .args(["--temperature", "0", "--max-new-tokens", "12", "--prompt", "the cat"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("plain completion model"), "{err}");
    let continuation = String::from_utf8(o.stdout).unwrap();
    let g = Command::new(BIN)
        .arg("generate")
        .arg(&plain)
        .args(["--temperature", "0", "--max-new-tokens", "12", "--prompt", "the cat"])
        .output()
        .unwrap();
    assert!(g.status.success());
    assert_eq!(String::from_utf8(g.stdout).unwrap(), format!("the cat{continuation}"));
    assert!(!continuation.trim().is_empty());
}

#[test]
fn generation_reads_half_and_quarter_size_weights_on_request() {
    let run = chat_model();
    let answer = |dtype: &str, kv: &str| {
        let o = Command::new(BIN)
            .arg("chat")
            .arg(&run)
            .args([
                "--temperature",
                "0",
                "--max-new-tokens",
                "16",
                "--prompt",
                "What colour is the sky?",
            ])
            .args(["--dtype", dtype, "--kv-dtype", kv])
            .output()
            .unwrap();
        assert!(o.status.success(), "{dtype}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let f32 = answer("f32", "f32");
    assert_eq!(f32, "The sky is blue.\n", "the trained answer");
    // Half-size weights keep the learned answer; q8 (a step of 1/127 of each group's largest weight,
    // coarse for a model 32 wide) keeps to the learned sentences, if not always this one.
    for (dtype, kv) in [("f16", "f32"), ("bf16", "f32"), ("f16", "f16")] {
        assert_eq!(answer(dtype, kv), f32, "{dtype}, kv {kv}");
    }
    let q8 = answer("q8", "f16");
    let learned: Vec<String> = conversations()
        .iter()
        .flat_map(|c| {
            c.iter()
                .filter(|m| m.role == Role::Assistant)
                .map(|m| format!("{}\n", m.content))
        })
        .collect();
    assert!(learned.contains(&q8), "q8 answered {q8:?}");
    let o = Command::new(BIN)
        .arg("generate")
        .arg(&run)
        .args(["--prompt", "x", "--dtype", "q4"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("expected f32, f16, bf16 or q8"));
}
