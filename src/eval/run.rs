//! Evaluation of a speedrun directory: the base model few-shot, the SFT model and every RLHF stage on the
//! held-out prompts, win-rates against SFT, the reward model on its held-out pairs and on SFT's own mistakes,
//! and each stage's time and throughput, written to `eval.json` for the report.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use serde_json::Value;

use crate::chat::ChatTemplate;
use crate::checkpoint::Checkpoint;
use crate::data::prompts::read_prompts;
use crate::eval::report::{EvalSummary, StageEval};
use crate::eval::tasks::{SkillReport, chat_accuracy, few_shot_accuracy, reward_on_mistakes, win_rate};
use crate::metrics::{METRICS_FILE, read_metrics};
use crate::tokenizer::Tokenizer;
use crate::train::reward::{RewardModel, evaluate_reward_model};

/// The summary a speedrun stage writes into its directory when it finishes (its key, wall time and outcome).
pub const DONE_FILE: &str = "stage.json";

fn last_metric(run: &Path, stage: &str, key: &str) -> Option<f64> {
    read_metrics(&run.join(METRICS_FILE), Some(stage))
        .ok()?
        .iter()
        .rev()
        .find_map(|r| r[key].as_f64())
}

fn tokens_per_s(run: &Path, stage: &str, wall: f64) -> Option<f64> {
    let tokens = read_metrics(&run.join(METRICS_FILE), Some(stage))
        .ok()?
        .iter()
        .rev()
        .find_map(|r| r["tokens"].as_f64())?;
    (wall > 0.0).then(|| tokens / wall)
}

fn stage_eval(name: &str, r: &SkillReport) -> StageEval {
    StageEval {
        name: name.into(),
        macro_accuracy: r.macro_accuracy(),
        per_skill: r.by_skill.iter().map(|(k, t)| (k.clone(), t.accuracy())).collect(),
        ..StageEval::default()
    }
}

/// Evaluates a run's base, SFT and RLHF models on held-out prompts and writes `eval.json`.
pub fn evaluate_run(run: &Path, world: &Path, seed: u64, max_new: usize) -> Result<EvalSummary> {
    let device = Device::Cpu;
    let prompts = read_prompts(&world.join("eval_prompts.jsonl"))?;
    let base = Checkpoint::load(&run.join("pretrain"), DType::F32, &device)?;
    let tok = Tokenizer::from_json(
        base.tokenizer_json
            .as_deref()
            .context("the base model has no tokenizer")?,
    )?;
    let template = ChatTemplate::new(&tok)?;
    let rm_dir = run.join("reward");
    let rm = if rm_dir.join("checkpoint").exists() {
        Some(RewardModel::load(&rm_dir)?)
    } else {
        None
    };
    let mut summary = EvalSummary {
        eval_prompts: prompts.len(),
        ..EvalSummary::default()
    };
    summary.val_loss = last_metric(&run.join("pretrain"), "pretrain", "val_loss");
    summary.val_bpb = last_metric(&run.join("pretrain"), "pretrain", "val_bpb");

    let base_report = few_shot_accuracy(&base.model()?, &tok, &prompts, 3, seed, max_new)?;
    let sft_model = Checkpoint::load(&run.join("sft"), DType::F32, &device)?.model()?;
    let sft_report = chat_accuracy(&sft_model, &tok, &template, &prompts, max_new)?;
    let mut stages = vec![("base", "pretrain", base_report), ("sft", "sft", sft_report.clone())];
    for (name, dir) in [("ppo", "ppo"), ("ppo_verifier", "ppo_verifier"), ("dpo", "dpo")] {
        if run.join(dir).join("checkpoint").exists() {
            let m = Checkpoint::load(&run.join(dir), DType::F32, &device)?.model()?;
            stages.push((name, dir, chat_accuracy(&m, &tok, &template, &prompts, max_new)?));
        }
    }
    for (name, dir, report) in &stages {
        let mut e = stage_eval(name, report);
        let w = win_rate(&prompts, &report.answers, &sft_report.answers, rm.as_ref())?;
        e.reward = w.reward_a;
        if *name != "sft" {
            e.win_vs_sft_rm = w.by_reward_model;
            e.win_vs_sft_verifier = w.by_verifier;
            e.rm_agreement = w.rm_agreement;
            e.separated_from_sft = Some(w.separated);
        }
        // The stage name its training metrics are logged under.
        let logged_as = match *name {
            "base" => "pretrain",
            "ppo_verifier" => "ppo",
            other => other,
        };
        if logged_as == "ppo" {
            e.kl_to_sft = last_metric(&run.join(dir), "ppo", "kl");
        }
        let done: Option<Value> = std::fs::read_to_string(run.join(dir).join(DONE_FILE))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        e.wall_s = done.as_ref().and_then(|d| d["wall_s"].as_f64());
        e.tokens_per_s = e.wall_s.and_then(|w| tokens_per_s(&run.join(dir), logged_as, w));
        summary.stages.push(e);
    }
    if let Some(rm) = &rm {
        let m = evaluate_reward_model(rm, &[world.join("prefs_val.jsonl")], 16)?;
        summary.reward_accuracy = Some(m.accuracy);
        summary.reward_margin = Some(m.margin);
        summary.reward_length_corr = Some(m.length_corr);
        let v = reward_on_mistakes(&prompts, &sft_report.answers, rm)?;
        summary.reward_on_sft_mistakes = v.accuracy();
        summary.sft_mistakes = Some(v.mistakes());
    }
    std::fs::write(run.join("eval.json"), serde_json::to_string_pretty(&summary)?)?;
    Ok(summary)
}
