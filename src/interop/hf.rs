//! `talaria export hf`: a directory that `transformers` loads as it is: a chat model
//! (`GPT2LMHeadModel` with the tokenizer's chat template, special tokens and generation settings)
//! or, for a reward model, `GPT2ForSequenceClassification` with the same scores; plus a model card.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use serde_json::{Value, json};

use crate::checkpoint::{self, Checkpoint, Meta};
use crate::eval::report::EvalSummary;
use crate::model::GptConfig;
use crate::tokenizer::{self, Tokenizer};
use crate::train::reward::SCORE_HEAD;

/// What an exported model is, in `transformers`' terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportKind {
    /// A language model; a chat model when its tokenizer has the chat tokens.
    LanguageModel,
    /// A reward model: one score read at the last token that is not padding.
    RewardModel,
}

impl ExportKind {
    pub fn architecture(self) -> &'static str {
        match self {
            Self::LanguageModel => "GPT2LMHeadModel",
            Self::RewardModel => "GPT2ForSequenceClassification",
        }
    }
}

/// What [`export_hf`] wrote.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    pub kind: ExportKind,
    /// Whether the tokenizer carries the chat template.
    pub chat: bool,
    /// The files written, by name.
    pub files: Vec<&'static str>,
}

/// A special token: its text and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Special {
    pub text: String,
    pub id: u32,
}

/// The roles of a tokenizer's special tokens outside Talaria, one definition for every export.
#[derive(Debug, Clone)]
pub struct SpecialRoles {
    pub bos: Special,
    /// The token that ends an answer: `<|end|>` for a chat model, `<|endoftext|>` otherwise.
    pub eos: Special,
    /// Padding for batches: `<|endoftext|>` in a chat model (it never occurs in a rendered
    /// conversation, so the last-token rule of a reward model never lands on padding).
    pub pad: Option<Special>,
    /// Every token that ends generation.
    pub stops: Vec<u32>,
    /// Whether the tokenizer has the chat tokens, and so the chat template.
    pub chat: bool,
}

impl SpecialRoles {
    /// The roles for a tokenizer: Talaria's chat tokens when it has them, else GPT-2's
    /// `<|endoftext|>` as both ends (the config's ids when it names them).
    pub fn of(tok: &Tokenizer, config: &GptConfig) -> Result<Self> {
        let special = |text: &str| tok.special_id(text).map(|id| Special { text: text.into(), id });
        let named = |id: u32| -> Result<Special> {
            let text = tok
                .id_to_token(id)
                .with_context(|| format!("the config names token {id}, which the tokenizer does not have"))?;
            Ok(Special { text, id })
        };
        if let Ok(t) = crate::chat::ChatTemplate::new(tok) {
            let pad = special(tokenizer::EOT);
            return Ok(Self {
                bos: Special {
                    text: tokenizer::BOS.into(),
                    id: t.bos,
                },
                eos: Special {
                    text: tokenizer::END.into(),
                    id: t.end,
                },
                stops: t.stop_tokens(tok),
                pad,
                chat: true,
            });
        }
        let eot = special(tokenizer::EOT);
        let pick = |configured: Option<u32>| -> Result<Special> {
            match (configured, &eot) {
                (Some(id), _) => named(id),
                (None, Some(e)) => Ok(e.clone()),
                (None, None) => anyhow::bail!(
                    "the tokenizer has no {} token and the config names no bos/eos token",
                    tokenizer::EOT
                ),
            }
        };
        let (bos, eos) = (pick(config.bos_token_id)?, pick(config.eos_token_id)?);
        Ok(Self {
            stops: vec![eos.id],
            bos,
            eos,
            pad: None,
            chat: false,
        })
    }
}

/// Exports a Talaria checkpoint to a directory that `transformers` loads with no extra step: the
/// weights, `config.json`, the tokenizer with `tokenizer_config.json` (the chat template, special
/// tokens and their roles), `special_tokens_map.json`, `generation_config.json` and a `README.md`
/// model card. A reward model (a checkpoint with a `score.weight` head) becomes
/// `GPT2ForSequenceClassification`.
pub fn export_hf(ckpt: &Path, out: &Path) -> Result<ExportSummary> {
    // Export converts files: the weights are read on the CPU, whatever trained them.
    let ck = Checkpoint::load(ckpt, DType::F32, &Device::Cpu)?;
    let model = ck.model()?;
    let mut weights = model.weights();
    let tok = ck
        .tokenizer_json
        .as_deref()
        .map(Tokenizer::from_json)
        .transpose()
        .with_context(|| format!("{}: tokenizer.json", ckpt.display()))?;
    let roles = tok.as_ref().map(|t| SpecialRoles::of(t, &ck.config)).transpose()?;
    let kind = match ck.weights.get(SCORE_HEAD) {
        Some(head) => {
            weights.insert(SCORE_HEAD.into(), head.clone());
            ExportKind::RewardModel
        }
        None => ExportKind::LanguageModel,
    };

    let mut config = ck.config.to_hf_json();
    config["architectures"] = json!([kind.architecture()]);
    if let Some(r) = &roles {
        config["bos_token_id"] = json!(r.bos.id);
        config["eos_token_id"] = json!(r.eos.id);
        config["pad_token_id"] = json!(r.pad.as_ref().map(|p| p.id));
    }
    if kind == ExportKind::RewardModel {
        config["num_labels"] = json!(1);
        config["id2label"] = json!({"0": "LABEL_0"});
        config["label2id"] = json!({"LABEL_0": 0});
    }
    let card = model_card(ckpt, &ck, kind, roles.as_ref());

    let mut files = vec![checkpoint::CONFIG_FILE, checkpoint::WEIGHTS_FILE, "README.md"];
    checkpoint::write_dir_atomically(out, |tmp| {
        let write_json = |name: &str, v: &Value| -> Result<()> {
            fs::write(tmp.join(name), serde_json::to_string_pretty(v)? + "\n")
                .with_context(|| format!("writing {name}"))
        };
        write_json(checkpoint::CONFIG_FILE, &config)?;
        checkpoint::save_safetensors(&tmp.join(checkpoint::WEIGHTS_FILE), &weights)?;
        fs::write(tmp.join("README.md"), &card)?;
        if let (Some(json), Some(r)) = (&ck.tokenizer_json, &roles) {
            fs::write(tmp.join(checkpoint::TOKENIZER_FILE), json)?;
            write_json("tokenizer_config.json", &tokenizer_config(r, ck.config.n_positions))?;
            write_json("special_tokens_map.json", &special_tokens_map(r))?;
            files.extend([
                checkpoint::TOKENIZER_FILE,
                "tokenizer_config.json",
                "special_tokens_map.json",
            ]);
            if kind == ExportKind::LanguageModel {
                write_json("generation_config.json", &generation_config(r))?;
                files.push("generation_config.json");
            }
        }
        Ok(())
    })?;
    Ok(ExportSummary {
        kind,
        chat: roles.as_ref().is_some_and(|r| r.chat),
        files,
    })
}

/// `tokenizer_config.json`: the fast tokenizer class, the special tokens, and the chat template
/// when the tokenizer has the chat tokens. Decoding keeps spaces as they are, as Talaria's does.
fn tokenizer_config(r: &SpecialRoles, context: usize) -> Value {
    let mut v = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": r.bos.text,
        "eos_token": r.eos.text,
        "pad_token": r.pad.as_ref().map(|p| p.text.clone()),
        "model_max_length": context,
        "clean_up_tokenization_spaces": false,
        "add_bos_token": false,
    });
    if r.chat {
        v["chat_template"] = json!(crate::chat::jinja_template());
        v["additional_special_tokens"] = json!([tokenizer::SYSTEM, tokenizer::USER, tokenizer::ASSISTANT]);
    }
    v
}

fn special_tokens_map(r: &SpecialRoles) -> Value {
    let mut v = json!({"bos_token": r.bos.text, "eos_token": r.eos.text});
    if let Some(p) = &r.pad {
        v["pad_token"] = json!(p.text);
    }
    if r.chat {
        v["additional_special_tokens"] = json!([tokenizer::SYSTEM, tokenizer::USER, tokenizer::ASSISTANT]);
    }
    v
}

/// `generation_config.json`: every end token stops `generate`; greedy unless asked otherwise.
fn generation_config(r: &SpecialRoles) -> Value {
    json!({
        "bos_token_id": r.bos.id,
        "eos_token_id": r.stops,
        "pad_token_id": r.pad.as_ref().map_or(r.eos.id, |p| p.id),
        "do_sample": false,
        "transformers_version": "4.46.0",
    })
}

/// The speedrun directory of a checkpoint inside it (`RUN/STAGE/checkpoint`, where `RUN` holds the
/// speedrun's settings file) and the stage's name in `RUN/eval.json` (`base` for `pretrain`).
fn run_and_stage(ckpt: &Path) -> Option<(PathBuf, String)> {
    let dir = checkpoint::resolve(ckpt).canonicalize().ok()?;
    let stage_dir = if dir.file_name()? == checkpoint::CHECKPOINT_DIR {
        dir.parent()?
    } else {
        &dir
    };
    let name = stage_dir.file_name()?.to_str()?;
    let name = if name == "pretrain" { "base" } else { name };
    let run = stage_dir.parent()?;
    run.join(crate::eval::report::SETTINGS_FILE)
        .exists()
        .then(|| (run.to_path_buf(), name.to_string()))
}

/// The chain of checkpoints this one was trained from, newest first, as far as their
/// `talaria.json` files can still be read.
fn lineage(ckpt: &Path, meta: &Meta) -> Vec<(String, Meta)> {
    let mut out = vec![(ckpt.display().to_string(), meta.clone())];
    while out.len() < 16 {
        let Some(parent) = out.last().and_then(|(_, m)| m.parent.clone()) else {
            break;
        };
        let path = checkpoint::resolve(Path::new(&parent)).join(checkpoint::META_FILE);
        let Some(m) = fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<Meta>(&t).ok())
        else {
            out.push((parent, Meta::default()));
            break;
        };
        out.push((parent, m));
    }
    out
}

fn pct(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{:.1}%", 100.0 * v))
}

/// The `README.md` of an exported model: what it is, how it was trained (the checkpoints' lineage),
/// what `talaria eval` measured on its run when the run's `eval.json` is next to it, and how to use it.
fn model_card(ckpt: &Path, ck: &Checkpoint, kind: ExportKind, roles: Option<&SpecialRoles>) -> String {
    let c = &ck.config;
    let chat = roles.is_some_and(|r| r.chat);
    let what = match (kind, chat) {
        (ExportKind::RewardModel, _) => "reward model",
        (_, true) => "chat model",
        _ => "language model",
    };
    let tags = match kind {
        ExportKind::RewardModel => "[talaria, gpt2, reward-model, text-classification]",
        ExportKind::LanguageModel if chat => "[talaria, gpt2, text-generation, conversational]",
        ExportKind::LanguageModel => "[talaria, gpt2, text-generation]",
    };
    let mut s = format!(
        "---\nlibrary_name: transformers\ntags: {tags}\n---\n\n# A Talaria {what}\n\n\
         A GPT-2-architecture {what} ({arch}) trained from scratch by Talaria; exported from `{path}` (stage \
         `{stage}`).\n\n## Model\n\n| | |\n|---|---|\n| parameters | {params:.2}M |\n| layers, heads, width | \
         {l}, {h}, {e} |\n| context | {ctx} tokens |\n| vocabulary | {v} byte-level BPE tokens |\n| activation | {act} |\n",
        arch = kind.architecture(),
        path = ckpt.display(),
        stage = ck.meta.stage,
        params = c.num_params() as f64 / 1e6,
        l = c.n_layer,
        h = c.n_head,
        e = c.n_embd,
        ctx = c.n_positions,
        v = c.vocab_size,
        act = c.activation.hf_name(),
    );

    s += "\n## How it was trained\n\nEach checkpoint was trained from the next one down (from its `talaria.json`):\n\n\
          | checkpoint | stage | optimizer steps | tokens | seed |\n|---|---|---|---|---|\n";
    for (path, m) in lineage(ckpt, &ck.meta) {
        let stage = if m.stage.is_empty() { "(not readable)" } else { &m.stage };
        let seed = m.seed.map_or("-".into(), |x| x.to_string());
        s += &format!("| `{path}` | {stage} | {} | {} | {seed} |\n", m.step, m.tokens);
    }

    s += "\n## Measured\n\n";
    let report = run_and_stage(ckpt).and_then(|(run, stage)| {
        let text = fs::read_to_string(run.join("eval.json")).ok()?;
        Some((run, stage, serde_json::from_str::<EvalSummary>(&text).ok()?))
    });
    match report {
        Some((run, stage, summary)) => {
            s += &format!(
                "From `{}` (written by `talaria eval`; the run's report.md says how each number is measured).\n\n",
                run.join("eval.json").display()
            );
            if kind == ExportKind::RewardModel || stage == "reward" {
                s += &format!(
                    "| held-out pair accuracy | on pairs of the SFT model's answers that differ in behaviour | in content only |\n\
                     |---|---|---|\n| {} | {} | {} |\n",
                    pct(summary.reward_accuracy),
                    pct(summary.reward_on_policy_behaviour),
                    pct(summary.reward_on_policy_content)
                );
            } else {
                s += "On the evaluation prompts in the phrasings seen in training (`eval_seen_prompts.jsonl`):\n\n\
                      | stage | strict accuracy | content accuracy | gold score | gold win-rate vs SFT | KL to SFT |\n\
                      |---|---|---|---|---|---|\n";
                for e in &summary.stages {
                    let seen = e.behaviour.as_ref().map(|b| &b.seen);
                    let mark = if e.name == stage { " (this model)" } else { "" };
                    s += &format!(
                        "| {}{mark} | {} | {} | {} | {} | {} |\n",
                        e.name,
                        pct(seen.map(|x| x.strict)),
                        pct(seen.map(|x| x.content)),
                        seen.map_or("-".into(), |x| format!("{:.2}", x.gold)),
                        pct(e.win_vs_sft_gold),
                        e.kl_to_sft.map_or("-".into(), |k| format!("{k:.3}")),
                    );
                }
            }
            if let Some(bpb) = summary.val_bpb {
                s += &format!("\nThe pretrained model's validation loss: {bpb:.3} bits per byte.\n");
            }
        }
        None => {
            s += "No `talaria eval` results were found: the checkpoint is not inside a speedrun directory with an `eval.json`.\n"
        }
    }

    s += "\n## Use\n\n```python\n";
    s += &match (kind, chat) {
        (ExportKind::RewardModel, _) => format!(
            "import torch\nfrom transformers import AutoTokenizer, GPT2ForSequenceClassification\n\n\
             tok = AutoTokenizer.from_pretrained(DIR)\nrm = GPT2ForSequenceClassification.from_pretrained(DIR)\n\
             conv = [{{\"role\": \"user\", \"content\": \"What is 2 + 3?\"}}, {{\"role\": \"assistant\", \"content\": \"5\"}}]\n\
             ids = tok.apply_chat_template(conv, return_tensors=\"pt\")\nprint(rm(ids).logits[0, 0].item())  # the score of the answer\n```\n\n\
             The score is read at the last token that is not padding ({}): the answer's closing `{}`.\n",
            roles.and_then(|r| r.pad.as_ref()).map_or("-".into(), |p| format!("`{}`", p.text)),
            tokenizer::END
        ),
        (_, true) => "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n\
             tok = AutoTokenizer.from_pretrained(DIR)\nmodel = AutoModelForCausalLM.from_pretrained(DIR)\n\
             ids = tok.apply_chat_template([{\"role\": \"user\", \"content\": \"Hello!\"}], add_generation_prompt=True, return_tensors=\"pt\")\n\
             out = model.generate(ids, max_new_tokens=64)\nprint(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))\n```\n\n\
             `generate` stops at either end token (`generation_config.json`). For llama.cpp and Ollama, \
             `talaria export gguf` writes the same model as one GGUF file.\n"
            .to_string(),
        _ => "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n\
             tok = AutoTokenizer.from_pretrained(DIR)\nmodel = AutoModelForCausalLM.from_pretrained(DIR)\n\
             ids = tok(\"Once upon a time\", return_tensors=\"pt\").input_ids\n\
             print(tok.decode(model.generate(ids, max_new_tokens=64)[0]))\n```\n"
            .to_string(),
    };
    if chat {
        s += &format!(
            "\n## Chat format\n\n```text\n{} {} system {} {} user {} {} assistant {} ...\n```\n\n\
             The template in `tokenizer_config.json` renders exactly what Talaria's `src/chat.rs` renders. One \
             difference remains: Talaria encodes a message's text with special-token strings as plain text, while \
             `transformers` turns a `{}` typed inside a message into the special token.\n",
            tokenizer::BOS,
            tokenizer::SYSTEM,
            tokenizer::END,
            tokenizer::USER,
            tokenizer::END,
            tokenizer::ASSISTANT,
            tokenizer::END,
            tokenizer::END,
        );
    }
    s
}
