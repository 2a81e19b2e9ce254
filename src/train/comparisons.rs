//! Comparison data from the policy's own answers, as InstructGPT collected it: the SFT model answers
//! each prompt several times (its greedy answer first, then samples) and a labeller ranks the answers.
//! The greedy answer is the one evaluation reads, so ranking it against samples that do better is what
//! teaches a reward model (and DPO) the policy's own near misses and habits. Here the labeller is the
//! default world's gold labeller ([`gold::judge`]; prompts need a reference `answer` and `skill`): a
//! correct answer ranks first, then the one that follows the prompt's format and is concise; wrong answers
//! follow by how close they come, answers that never end rank last.
//! Answers that read the same after normalisation or score the same are kept once, so every pair of the
//! written ranking is a strict preference; prompts whose answers all score alike carry no comparison
//! and are counted, not written.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};
use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};

use crate::chat::ChatTemplate;
use crate::checkpoint::Checkpoint;
use crate::data::synth::gold;
use crate::data::synth::verify::{self, Task};
use crate::engine::{self, EngineConfig, Request, Sampling, SamplingParams};

/// `talaria data label` settings.
#[derive(Debug, Clone)]
pub struct LabelConfig {
    /// The model whose answers are ranked (usually the SFT checkpoint).
    pub policy: PathBuf,
    /// Prompts with reference answers and skills (the default world's format).
    pub prompts: PathBuf,
    /// Where the rankings go (JSONL, `{"prompt": [...], "ranked": [...], "scores": [...]}` best first, with the
    /// gold labeller's score of each answer).
    pub out: PathBuf,
    pub samples: usize,
    pub temperature: f64,
    pub max_new_tokens: usize,
    pub seed: u64,
    pub progress: bool,
    /// The precision the policy's answers are decoded with.
    pub dtype: crate::model::WeightDtype,
    /// Where the policy runs (`--device`).
    pub device: Device,
}

/// What a labelling run wrote.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LabelSummary {
    pub prompts: usize,
    /// Rankings written (prompts whose answers differ in score).
    pub rankings: usize,
    /// Ordered pairs those rankings expand to.
    pub pairs: usize,
    /// Prompts left out because every answer scored the same.
    pub no_signal: usize,
    /// Share of greedy answers with the right content (the gold labeller's reading).
    pub greedy_accuracy: f64,
    /// The same for the sampled (non-greedy) answers.
    pub sample_accuracy: f64,
}

/// The gold labeller's score of one sampled answer to `messages` (see [`gold::judge`]).
pub fn score(messages: &[crate::chat::Message], answer: &str, skill: &str, text: &str, ended: bool) -> f64 {
    gold::judge(messages, answer, skill, text, ended).score
}

/// Ranks scored answers to a `skill` task best first, keeping one answer per score and per text as the
/// verifier reads it (case-insensitive except for `capitals`), each with its score.
pub fn rank(skill: &str, mut scored: Vec<(String, f64)>) -> Vec<(String, f64)> {
    let key = |t: &str| verify::canonical(t, skill);
    scored.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut out: Vec<(String, f64)> = vec![];
    for (text, s) in scored {
        if out.iter().any(|(t, q)| (*q - s).abs() < 1e-9 || key(t) == key(&text)) {
            continue;
        }
        out.push((text, s));
    }
    out
}

/// An engine that holds whole prompts' worth of samples: at least 32 sequences.
fn label_engine(samples: usize) -> EngineConfig {
    EngineConfig {
        max_batch: samples * (32usize.div_ceil(samples)),
        ..EngineConfig::default()
    }
}

/// Takes `cfg.samples` answers per prompt from the policy (the greedy one, then samples at
/// `cfg.temperature`) and writes the labeller's rankings.
pub fn label(cfg: &LabelConfig) -> Result<LabelSummary> {
    ensure!(
        cfg.samples >= 2,
        "--samples must be at least 2 (the greedy answer and one sample) to compare answers"
    );
    ensure!(
        cfg.temperature > 0.0 && cfg.temperature.is_finite(),
        "--temperature must be positive"
    );
    ensure!(cfg.max_new_tokens > 0, "--max-new-tokens must be positive");
    let device = cfg.device.clone();
    let ck = Checkpoint::load(&cfg.policy, DType::F32, &device)?;
    let (_, tok) = ck.tokenizer(&cfg.policy)?;
    let template = ChatTemplate::new(&tok)?;
    let mut model = ck.model()?;
    model.set_decode_dtype(cfg.dtype);
    let prompts = Task::load_jsonl(&cfg.prompts)?;
    if let Some(dir) = cfg.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let pb = if cfg.progress {
        ProgressBar::new(prompts.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    pb.set_style(
        ProgressStyle::with_template("label [{bar:30}] {pos}/{len} prompts ETA {eta}")
            .expect("valid")
            .progress_chars("=> "),
    );
    let stops = template.stop_tokens(&tok);
    let mut requests = Vec::with_capacity(prompts.len());
    for (i, p) in prompts.iter().enumerate() {
        let ids = template.render_prompt(&tok, &p.messages)?;
        if ids.len() + 2 > ck.config.n_positions {
            bail!(
                "{} record {}: the prompt's {} tokens leave no room for an answer in the context of {}",
                cfg.prompts.display(),
                i + 1,
                ids.len(),
                ck.config.n_positions
            );
        }
        // The greedy answer first, then samples; one prefill of the prompt serves them all.
        let samples = (0..cfg.samples)
            .map(|k| Sampling {
                params: SamplingParams::plain(if k == 0 { 0.0 } else { cfg.temperature }),
                seed: cfg.seed ^ (i as u64).wrapping_mul(1_000_003) ^ (k as u64).wrapping_mul(7919),
            })
            .collect();
        requests.push(Request::greedy(ids, cfg.max_new_tokens, stops.clone()).with_samples(samples));
    }
    let answers = engine::generate_batch(&model, Some(&tok), requests, label_engine(cfg.samples), |_| pb.inc(1))?;
    let mut lines = String::new();
    let mut summary = LabelSummary {
        prompts: prompts.len(),
        rankings: 0,
        pairs: 0,
        no_signal: 0,
        greedy_accuracy: 0.0,
        sample_accuracy: 0.0,
    };
    let (mut correct, mut sampled, mut greedy_correct) = (0usize, 0usize, 0usize);
    for (p, completions) in prompts.iter().zip(answers) {
        let (answer, skill) = (p.answer.as_str(), p.skill.as_str());
        let mut scored = Vec::with_capacity(cfg.samples);
        for (k, c) in completions.into_iter().enumerate() {
            let ended = c.finish.ended();
            let ok = usize::from(gold::judge(&p.messages, answer, skill, &c.text, ended).content);
            if k == 0 {
                greedy_correct += ok;
            } else {
                correct += ok;
                sampled += 1;
            }
            if c.text.trim().is_empty() {
                continue;
            }
            let s = score(&p.messages, answer, skill, &c.text, ended);
            scored.push((c.text, s));
        }
        let ranked = rank(skill, scored);
        if ranked.len() < 2 {
            summary.no_signal += 1;
        } else {
            summary.rankings += 1;
            summary.pairs += ranked.len() * (ranked.len() - 1) / 2;
            let (texts, scores): (Vec<String>, Vec<f64>) = ranked.into_iter().unzip();
            let record = serde_json::json!({"prompt": p.messages, "ranked": texts, "scores": scores});
            lines.push_str(&serde_json::to_string(&record)?);
            lines.push('\n');
        }
    }
    pb.finish_and_clear();
    summary.greedy_accuracy = greedy_correct as f64 / prompts.len().max(1) as f64;
    summary.sample_accuracy = correct as f64 / sampled.max(1) as f64;
    ensure!(
        summary.rankings > 0,
        "every prompt's answers scored alike: no comparison to write (try more --samples or a higher --temperature)"
    );
    // Written whole and renamed into place, so an interrupted run never leaves half a file.
    let tmp = cfg.out.with_extension("jsonl.tmp");
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(lines.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &cfg.out).with_context(|| format!("writing {}", cfg.out.display()))?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rankings_put_correct_first_then_closeness_and_drop_ties() {
        use crate::chat::{Message, Role};
        let q = [Message::new(Role::User, "Reverse the word garden.")];
        let scored = |xs: &[(&str, bool)]| -> Vec<(String, f64)> {
            xs.iter()
                .map(|(t, ended)| (t.to_string(), score(&q, "nedrag", "reverse", t, *ended)))
                .collect()
        };
        let r = rank(
            "reverse",
            scored(&[
                ("gardenia", true),
                ("nedra", true),
                ("nedrag nedrag nedrag", false),
                ("Nedrag.", true),
                ("nedrag", true),
                ("nedrg", true),
            ]),
        );
        // The correct answer once (case and the period do not count); "nedra" and "nedrg" are equally
        // close, so only the first is kept; the unended answer comes last.
        let texts: Vec<&str> = r.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(texts, vec!["Nedrag.", "nedra", "gardenia", "nedrag nedrag nedrag"]);
        assert_eq!(
            rank("reverse", scored(&[("x", true), ("y", true)])).len(),
            1,
            "equal scores compare nothing"
        );
        let uq = [Message::new(Role::User, "Write garden in uppercase.")];
        let caps = |t: &str| (t.to_string(), score(&uq, "GARDEN", "capitals", t, true));
        assert_eq!(
            rank("capitals", vec![caps("GARDEN"), caps("garden")]).len(),
            2,
            "case counts for capitals"
        );
    }
}
