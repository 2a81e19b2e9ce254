//! The report card: `report.md` with a row per stage (base, SFT, RLHF) and PNG plots of the
//! training curves, written from a run's `eval.json` and the stages' `metrics.jsonl`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::metrics::{FONT_PATHS, METRICS_FILE, Series, line_plot, series};

/// How one model did on the held-out evaluation.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StageEval {
    /// `base`, `sft`, `ppo`, `ppo_verifier`, `dpo`...
    pub name: String,
    pub macro_accuracy: f64,
    pub per_skill: BTreeMap<String, f64>,
    /// Mean reward-model score of its answers.
    pub reward: Option<f64>,
    /// KL to the SFT model per answer (from RLHF training).
    pub kl_to_sft: Option<f64>,
    /// Win-rate against the SFT model, judged by the reward model and by the verifier.
    pub win_vs_sft_rm: Option<f64>,
    pub win_vs_sft_verifier: Option<f64>,
    /// Of the prompts where this model and SFT differ in correctness (`separated_from_sft` of them), the share
    /// where the reward model scores the right answer higher: its accuracy on the policies' own answers.
    pub rm_agreement: Option<f64>,
    pub separated_from_sft: Option<usize>,
    pub wall_s: Option<f64>,
    pub tokens_per_s: Option<f64>,
}

/// Everything `talaria eval` measured on a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EvalSummary {
    pub stages: Vec<StageEval>,
    pub val_loss: Option<f64>,
    pub val_bpb: Option<f64>,
    pub reward_accuracy: Option<f64>,
    pub reward_margin: Option<f64>,
    pub reward_length_corr: Option<f64>,
    /// The reward model on the SFT model's own mistakes: the share of held-out prompts answered wrongly where it
    /// scores the reference answer higher, and how many such prompts there were.
    pub reward_on_sft_mistakes: Option<f64>,
    pub sft_mistakes: Option<usize>,
    /// Extra benchmark results (MMLU, GSM8K...) by name.
    pub benchmarks: BTreeMap<String, f64>,
    pub eval_prompts: usize,
    pub notes: Vec<String>,
}

/// The speedrun's settings in a run directory (`{"seed": .., "preset": {..}}`), listed by the report.
pub const SETTINGS_FILE: &str = "speedrun.json";

/// `(dotted key, value)` of every leaf of a JSON object, keys sorted (serde_json's map order).
fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, x, out);
            }
        }
        serde_json::Value::String(t) => out.push((prefix.to_string(), t.clone())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

/// A share as a percentage with one decimal, or "–" when there is none.
pub fn pct(x: Option<f64>) -> String {
    x.map_or("–".into(), |v| format!("{:.1}%", v * 100.0))
}

fn num(x: Option<f64>, digits: usize) -> String {
    x.map_or("–".into(), |v| format!("{v:.digits$}"))
}

/// Writes `report.md` and its plots into `run` from `run/eval.json` and the stage directories
/// (`pretrain/`, `sft/`, `reward/`, `ppo/`, `ppo_verifier/`, `dpo/`), returning the report's path.
pub fn write_report(run: &Path) -> Result<PathBuf> {
    let eval_path = run.join("eval.json");
    let eval: EvalSummary = serde_json::from_str(
        &std::fs::read_to_string(&eval_path)
            .with_context(|| format!("reading {} (run `talaria eval` first)", eval_path.display()))?,
    )
    .with_context(|| format!("{}: not an evaluation summary", eval_path.display()))?;
    // One metric of one stage over steps, and a stage's training and held-out losses.
    let metric = |stage: &str, key: &str| series(&run.join(stage).join(METRICS_FILE), stage, key);
    let losses = |stage: &str| -> Result<Vec<(&'static str, Series)>> {
        Ok(vec![
            ("train", metric(stage, "loss")?),
            ("validation", metric(stage, "val_loss")?),
        ])
    };
    let mut plots = vec![];
    let mut plot = |file: &str, title: &str, s: Vec<(&str, Series)>| -> Result<()> {
        if line_plot(&run.join(file), title, "step", &s)? {
            plots.push((title.to_string(), file.to_string()));
        }
        Ok(())
    };
    plot("pretrain_loss.png", "Pretraining loss", losses("pretrain")?)?;
    plot("sft_loss.png", "SFT loss (assistant tokens)", losses("sft")?)?;
    plot(
        "reward_accuracy.png",
        "Reward model held-out pairwise accuracy",
        vec![("accuracy", metric("reward", "accuracy")?)],
    )?;
    // The verifier-driven run logs under the stage name `ppo` in its own directory.
    let verifier_kl = series(&run.join("ppo_verifier").join(METRICS_FILE), "ppo", "kl")?;
    plot(
        "ppo_reward.png",
        "PPO mean reward (reward model)",
        vec![("reward", metric("ppo", "reward")?)],
    )?;
    plot(
        "ppo_kl.png",
        "PPO KL to the SFT model (per answer)",
        vec![
            ("driven by the reward model", metric("ppo", "kl")?),
            ("driven by the verifier", verifier_kl),
        ],
    )?;
    plot(
        "dpo_loss.png",
        "DPO loss (with the chosen answers' NLL term)",
        losses("dpo")?,
    )?;

    let mut md = String::new();
    writeln!(md, "# Talaria run report\n")?;
    writeln!(
        md,
        "Run directory: `{}`. Held-out evaluation prompts: {}.\n",
        run.display(),
        eval.eval_prompts
    )?;
    writeln!(md, "## Stages\n")?;
    let skills: Vec<&String> = eval
        .stages
        .iter()
        .flat_map(|s| s.per_skill.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut header = "| stage | accuracy (macro) |".to_string();
    let mut rule = "| --- | --- |".to_string();
    for s in &skills {
        header.push_str(&format!(" {s} |"));
        rule.push_str(" --- |");
    }
    header.push_str(
        " reward | KL to SFT | win vs SFT (RM) | win vs SFT (verifier) | RM agrees with verifier | wall time | tokens/s |",
    );
    rule.push_str(" --- | --- | --- | --- | --- | --- | --- |");
    writeln!(md, "{header}\n{rule}")?;
    for s in &eval.stages {
        let mut row = format!("| {} | {} |", s.name, pct(Some(s.macro_accuracy)));
        for k in &skills {
            row.push_str(&format!(" {} |", pct(s.per_skill.get(*k).copied())));
        }
        let agreement = match (s.rm_agreement, s.separated_from_sft) {
            (Some(a), Some(n)) => format!("{} of {n}", pct(Some(a))),
            _ => "–".into(),
        };
        row.push_str(&format!(
            " {} | {} | {} | {} | {agreement} | {} | {} |",
            num(s.reward, 3),
            num(s.kl_to_sft, 3),
            pct(s.win_vs_sft_rm),
            pct(s.win_vs_sft_verifier),
            s.wall_s.map_or("–".into(), |w| format!("{w:.0}s")),
            num(s.tokens_per_s, 0)
        ));
        writeln!(md, "{row}")?;
    }
    writeln!(
        md,
        "\nAccuracy is exact match by the default world's verifier with greedy decoding; the base model is prompted few-shot in plain text, the others through the chat template. `ppo` is PPO driven by the reward model; `ppo_verifier` is PPO from the same SFT model driven by the default world's verifier (the true reward, at settings of its own), so the gap between the two rows is what the reward model leaves on the table. \"RM agrees with verifier\": of the prompts where the stage's greedy answer and SFT's differ in correctness, the share where the reward model scores the right one higher (its accuracy on the policies' own answers, which is what PPO optimises; the held-out pairwise accuracy below is on the labeller's synthetic pairs).\n"
    )?;
    writeln!(md, "## Other measurements\n")?;
    writeln!(md, "| measurement | value |\n| --- | --- |")?;
    writeln!(md, "| pretraining validation loss | {} |", num(eval.val_loss, 4))?;
    writeln!(
        md,
        "| pretraining validation bits per byte | {} |",
        num(eval.val_bpb, 4)
    )?;
    writeln!(
        md,
        "| reward model held-out pairwise accuracy | {} |",
        pct(eval.reward_accuracy)
    )?;
    if let (Some(a), Some(n)) = (eval.reward_on_sft_mistakes, eval.sft_mistakes) {
        writeln!(
            md,
            "| reward model on the SFT model's own mistakes (reference answer above SFT's wrong greedy answer, {n} held-out prompts) | {} |",
            pct(Some(a))
        )?;
    }
    writeln!(md, "| reward model mean margin | {} |", num(eval.reward_margin, 3))?;
    writeln!(
        md,
        "| reward/answer-length correlation (length-bias alarm) | {} |",
        num(eval.reward_length_corr, 3)
    )?;
    for (k, v) in &eval.benchmarks {
        writeln!(md, "| {k} | {} |", pct(Some(*v)))?;
    }
    if !plots.is_empty() {
        writeln!(md, "\n## Curves\n")?;
        for (title, file) in &plots {
            writeln!(md, "![{title}]({file})\n")?;
        }
    } else {
        writeln!(
            md,
            "\n(no plots: no TTF font was found for the labels; looked in {})",
            FONT_PATHS.join(", ")
        )?;
    }
    for n in &eval.notes {
        writeln!(md, "- {n}")?;
    }
    let settings_path = run.join(SETTINGS_FILE);
    if let Ok(text) = std::fs::read_to_string(&settings_path) {
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not JSON", settings_path.display()))?;
        let mut rows = vec![];
        flatten("", &v, &mut rows);
        writeln!(
            md,
            "\n## Settings\n\nFrom `{SETTINGS_FILE}`.\n\n| setting | value |\n| --- | --- |"
        )?;
        for (k, val) in rows {
            writeln!(md, "| {k} | {val} |")?;
        }
    }
    let out = run.join("report.md");
    std::fs::write(&out, md).with_context(|| format!("writing {}", out.display()))?;
    Ok(out)
}
