//! The report card: `report.md` with a row per stage (base, SFT, RLHF) and PNG plots of the
//! training curves, written from a run's `eval.json` and the stages' `metrics.jsonl`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::eval::behaviour::{Behaviour, ContentChange, SetScores};
use crate::metrics::{FONT_PATHS, METRICS_FILE, Series, line_plot, read_metrics, series};

/// How one model did on the held-out evaluation.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StageEval {
    /// `base`, `sft`, `ppo`, `ppo_round2`, `ppo_gold`, `dpo`...
    pub name: String,
    pub macro_accuracy: f64,
    pub per_skill: BTreeMap<String, f64>,
    /// Mean reward-model score of its answers.
    pub reward: Option<f64>,
    /// KL to the SFT model per answer (from RLHF training).
    pub kl_to_sft: Option<f64>,
    /// Win-rate against the SFT model, judged by the reward model and by the verifier (strict exact match).
    pub win_vs_sft_rm: Option<f64>,
    pub win_vs_sft_verifier: Option<f64>,
    /// Of the prompts where this model and SFT differ in correctness (`separated_from_sft` of them), the share
    /// where the reward model scores the right answer higher: its accuracy on the policies' own answers.
    pub rm_agreement: Option<f64>,
    pub separated_from_sft: Option<usize>,
    pub wall_s: Option<f64>,
    pub tokens_per_s: Option<f64>,
    /// The gold labeller's win-rate against SFT.
    #[serde(default)]
    pub win_vs_sft_gold: Option<f64>,
    /// Strict and content accuracy, gold score, flaw rates, multi-turn and stranger sets.
    #[serde(default)]
    pub behaviour: Option<crate::eval::behaviour::Behaviour>,
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
    /// The reward model on the SFT model's own held-out answers: its pairwise accuracy on the pairs
    /// that differ in behaviour, and on those that differ in content only, and how many pairs each.
    #[serde(default)]
    pub reward_on_policy_behaviour: Option<f64>,
    #[serde(default)]
    pub reward_on_policy_behaviour_pairs: Option<usize>,
    #[serde(default)]
    pub reward_on_policy_content: Option<f64>,
    #[serde(default)]
    pub reward_on_policy_content_pairs: Option<usize>,
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
/// (`pretrain/`, `sft/`, `reward/`, `ppo/`, `ppo_gold/`, `ppo_round2/`, `dpo/`), returning the report's path.
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
    // Every PPO run logs under the stage name `ppo` in its own directory.
    let ppo_metric = |dir: &str, key: &str| series(&run.join(dir).join(METRICS_FILE), "ppo", key);
    plot(
        "ppo_reward.png",
        "PPO mean reward of the rollouts",
        vec![
            ("reward model", ppo_metric("ppo", "reward")?),
            ("gold labeller", ppo_metric("ppo_gold", "reward")?),
        ],
    )?;
    plot(
        "dpo_loss.png",
        "DPO loss (with the chosen answers' NLL term)",
        losses("dpo")?,
    )?;
    let gao = |dir: &str, key: &str| -> Result<Series> { gain_against_sqrt_kl(&run.join(dir).join(METRICS_FILE), key) };
    let gao_series = vec![
        ("RM-driven PPO: reward model score", gao("ppo", "eval_rm")?),
        ("RM-driven PPO: gold score", gao("ppo", "eval_gold")?),
        ("gold-driven PPO: gold score", gao("ppo_gold", "eval_gold")?),
        ("gold-driven PPO: reward model score", gao("ppo_gold", "eval_rm")?),
    ];
    if line_plot(
        &run.join("ppo_gao.png"),
        "Score gain over SFT against sqrt(KL to SFT), held-out prompts",
        "sqrt(KL per answer)",
        &gao_series,
    )? {
        plots.push((
            "Score gain over SFT against sqrt(KL to SFT) (Gao et al. 2022)".into(),
            "ppo_gao.png".into(),
        ));
    }

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
        " reward | KL to SFT | win vs SFT (RM) | win vs SFT (gold) | RM agrees with verifier | wall time | tokens/s |",
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
            pct(s.win_vs_sft_gold),
            s.wall_s.map_or("–".into(), |w| format!("{w:.0}s")),
            num(s.tokens_per_s, 0)
        ));
        writeln!(md, "{row}")?;
    }
    writeln!(
        md,
        "\nAccuracy is strict exact match by the default world's verifier with greedy decoding on the seen phrasings; the base model is prompted few-shot in plain text, the others through the chat template. `ppo` is PPO driven by the learned reward model; `ppo_gold` is PPO from the same SFT model driven by the gold labeller itself (the true reward, at settings of its own), so the gap between the two rows is what the reward model leaves on the table; `ppo_round2`, when present, is a second RLHF round (the labeller ranks `ppo`'s answers, the reward model trains further on them, PPO continues from `ppo`). KL to SFT is the exact per-token KL over the vocabulary, summed per answer, along the stage's own samples at temperature 1. Win-rates are over SFT's greedy answers to the same prompts, ties counted half. \"RM agrees with verifier\": of the prompts where the stage's greedy answer and SFT's differ in correctness, the share where the reward model scores the right one higher.\n"
    )?;
    behaviour_tables(&mut md, &eval)?;
    findings(&mut md, &eval)?;
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
        "| reward model held-out pairwise accuracy (the world's synthetic pairs) | {} |",
        pct(eval.reward_accuracy)
    )?;
    let pairs = |n: Option<usize>| n.map_or(String::new(), |n| format!(", {n} pairs"));
    writeln!(
        md,
        "| reward model on the SFT model's own held-out answers that differ in behaviour{} | {} |",
        pairs(eval.reward_on_policy_behaviour_pairs),
        pct(eval.reward_on_policy_behaviour)
    )?;
    writeln!(
        md,
        "| reward model on the SFT model's own held-out answers that differ in content only{} | {} |",
        pairs(eval.reward_on_policy_content_pairs),
        pct(eval.reward_on_policy_content)
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

/// One PPO run's probes of the held-out prompts: `(sqrt KL to SFT, score - score at step 0)` for the score
/// `key` (`eval_gold` or `eval_rm`), the points of Gao et al.'s over-optimisation picture.
fn gain_against_sqrt_kl(metrics: &Path, key: &str) -> Result<Series> {
    if !metrics.exists() {
        return Ok(vec![]);
    }
    let rows: Vec<(f64, f64)> = read_metrics(metrics, Some("ppo"))?
        .iter()
        .filter_map(|r| Some((r["eval_sqrt_kl"].as_f64()?, r[key].as_f64()?)))
        .collect();
    let Some(&(_, first)) = rows.first() else {
        return Ok(vec![]);
    };
    Ok(rows.into_iter().map(|(x, y)| (x, y - first)).collect())
}

/// Points between two shares, signed.
fn points(from: f64, to: f64) -> String {
    format!("{:+.1}", (to - from) * 100.0)
}

/// "skill +1.0 (3 / 2, p 1.00), ..." : each skill's content accuracy change from `from` to `to`, in points,
/// with the answers that turned right and wrong and their sign test where `changes` has them.
fn skill_changes(from: &SetScores, to: &SetScores, changes: Option<&BTreeMap<String, ContentChange>>) -> String {
    from.per_skill_content
        .iter()
        .filter_map(|(k, x)| {
            let moved = changes
                .and_then(|c| c.get(k))
                .map(|c| format!(" ({c})"))
                .unwrap_or_default();
            Some(format!("{k} {}{moved}", points(*x, *to.per_skill_content.get(k)?)))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Per skill and stage, the answers whose content turned right and wrong against SFT's, with McNemar's
/// exact test: on 100 prompts a skill, a change of a few points can be the seed alone.
fn content_changes_table(md: &mut String, stages: &[(&StageEval, &Behaviour)], skills: &[&String]) -> Result<()> {
    let later: Vec<&(&StageEval, &Behaviour)> = stages.iter().filter(|(_, b)| b.content_vs_sft.is_some()).collect();
    if later.is_empty() {
        return Ok(());
    }
    writeln!(md, "\n### Content changes against SFT, answer by answer\n")?;
    writeln!(
        md,
        "For each skill, the held-out answers (seen phrasings) whose content turned right / turned wrong against SFT's answer to the same prompt, and McNemar's exact test: the chance of a split at least that uneven if every change were a coin flip. A change with p above 0.05 cannot be told from chance in this one run; docs/tuning-history.md repeats PPO over seeds to find the changes that recur.\n"
    )?;
    let names: Vec<&str> = later.iter().map(|(s, _)| s.name.as_str()).collect();
    writeln!(md, "| skill | {} |", names.join(" | "))?;
    writeln!(md, "| --- |{}", " --- |".repeat(names.len()))?;
    for k in skills {
        let mut row = format!("| {k} |");
        for (_, b) in &later {
            let cell = b
                .content_vs_sft
                .as_ref()
                .and_then(|c| c.get(*k))
                .map_or("–".to_string(), ContentChange::to_string);
            row.push_str(&format!(" {cell} |"));
        }
        writeln!(md, "{row}")?;
    }
    Ok(())
}

/// The run's lessons in numbers: what the reward model sees and what it cannot, what PPO driven by
/// it changed against SFT, and what a second RLHF round changed.
fn findings(md: &mut String, eval: &EvalSummary) -> Result<()> {
    let stage = |name: &str| {
        eval.stages
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| Some((s, s.behaviour.as_ref()?)))
    };
    let (Some((_, sft)), Some((ppo_s, ppo))) = (stage("sft"), stage("ppo")) else {
        return Ok(());
    };
    writeln!(md, "## What the reward model cannot do\n")?;
    writeln!(
        md,
        "- On pairs of the SFT model's own held-out answers it ranks {} right when they differ in behaviour and {} when they differ only in content (50% is a coin flip; – where the run had no such pairs). Content-only pairs are the near misses: a right and a wrong answer in the same form.",
        pct(eval.reward_on_policy_behaviour),
        pct(eval.reward_on_policy_content)
    )?;
    let (a, b) = (&sft.seen, &ppo.seen);
    writeln!(
        md,
        "- PPO driven by it, against SFT: padding {} → {}, unasked explanations {} → {}, ignored formats {} → {}, keeping a right answer when challenged {} → {}; content accuracy {} points macro ({} → {}).",
        pct(Some(a.flaws.padded)),
        pct(Some(b.flaws.padded)),
        pct(Some(a.flaws.explained)),
        pct(Some(b.flaws.explained)),
        pct(Some(a.flaws.ignored_constraint)),
        pct(Some(b.flaws.ignored_constraint)),
        pct(sft.keeps_when_challenged),
        pct(ppo.keeps_when_challenged),
        points(a.content, b.content),
        pct(Some(a.content)),
        pct(Some(b.content)),
    )?;
    writeln!(
        md,
        "- Content per skill, PPO against SFT, in points: {} (in brackets: answers turned right / turned wrong, and McNemar's exact p).",
        skill_changes(a, b, ppo.content_vs_sft.as_ref())
    )?;
    if let Some((_, gold)) = stage("ppo_gold") {
        let (rm_gain, gold_gain) = (b.gold - a.gold, gold.seen.gold - a.gold);
        writeln!(
            md,
            "- Mean gold score gain over SFT: {:+.2} driven by the reward model, {:+.2} driven by the gold labeller itself{}; exact KL to SFT {} per answer.",
            rm_gain,
            gold_gain,
            if gold_gain > 0.0 {
                format!(" ({:.0}% of it)", 100.0 * rm_gain / gold_gain)
            } else {
                String::new()
            },
            num(ppo_s.kl_to_sft, 3)
        )?;
    }
    if let Some((r2_s, r2)) = stage("ppo_round2") {
        let c = &r2.seen;
        writeln!(md, "\n## What the second RLHF round changed\n")?;
        writeln!(
            md,
            "The labeller ranked the PPO policy's own answers, the reward model trained further on them, and PPO continued from the policy. Against the first round: strict {} → {}, content {} → {}, mean gold score {:.2} → {:.2}, invented answers about strangers {} → {}, ignored formats {} → {}, exact KL to SFT {} → {}.",
            pct(Some(b.strict)),
            pct(Some(c.strict)),
            pct(Some(b.content)),
            pct(Some(c.content)),
            b.gold,
            c.gold,
            pct(ppo.invents_about_strangers),
            pct(r2.invents_about_strangers),
            pct(Some(b.flaws.ignored_constraint)),
            pct(Some(c.flaws.ignored_constraint)),
            num(ppo_s.kl_to_sft, 3),
            num(r2_s.kl_to_sft, 3),
        )?;
        writeln!(
            md,
            "Content per skill against the first round, in points: {}.",
            skill_changes(b, c, None)
        )?;
    }
    writeln!(md)?;
    Ok(())
}

/// InstructGPT's metadata table for the chat stages, then the per-skill content accuracy and the
/// seen against held-out phrasings.
fn behaviour_tables(md: &mut String, eval: &EvalSummary) -> Result<()> {
    let stages: Vec<(&StageEval, &Behaviour)> = eval
        .stages
        .iter()
        .filter_map(|s| Some((s, s.behaviour.as_ref()?)))
        .collect();
    if stages.is_empty() {
        return Ok(());
    }
    writeln!(md, "## Behaviour\n")?;
    writeln!(
        md,
        "Every answer read by the gold labeller (`src/data/synth/gold.rs`), as InstructGPT's metadata table reads its labellers', on held-out items in the phrasings training saw (`eval_seen_prompts.jsonl`, a quarter of them with an explicit format) unless marked held-out phrasings (`eval_heldout_prompts.jsonl`). Greedy answers unless marked sampled (one sample per prompt at temperature 1). Flaw rates: padding and unrequested explanations over all answers, ignored constraints over the prompts that state one (lower is better).\n"
    )?;
    let mut header = "| measurement |".to_string();
    let mut rule = "| --- |".to_string();
    for (s, _) in &stages {
        header.push_str(&format!(" {} |", s.name));
        rule.push_str(" --- |");
    }
    writeln!(md, "{header}\n{rule}")?;
    type Cell<'a> = Box<dyn Fn(&StageEval, &Behaviour) -> String + 'a>;
    let rows: Vec<(&str, Cell)> = vec![
        ("strict exact match (macro)", Box::new(|_, b| pct(Some(b.seen.strict)))),
        ("content accuracy (macro)", Box::new(|_, b| pct(Some(b.seen.content)))),
        (
            "mean gold score (10: right, clean)",
            Box::new(|_, b| num(Some(b.seen.gold), 2)),
        ),
        (
            "pads with pleasantries",
            Box::new(|_, b| pct(Some(b.seen.flaws.padded))),
        ),
        (
            "pads with pleasantries (sampled)",
            Box::new(|_, b| pct(b.sampled.map(|f| f.padded))),
        ),
        ("explains unasked", Box::new(|_, b| pct(Some(b.seen.flaws.explained)))),
        (
            "explains unasked (sampled)",
            Box::new(|_, b| pct(b.sampled.map(|f| f.explained))),
        ),
        (
            "ignores the prompt's format constraint",
            Box::new(|_, b| pct(Some(b.seen.flaws.ignored_constraint))),
        ),
        (
            "ignores the prompt's format constraint (sampled)",
            Box::new(|_, b| pct(b.sampled.map(|f| f.ignored_constraint))),
        ),
        (
            "keeps a right answer after \"Are you sure?\"",
            Box::new(|_, b| pct(b.keeps_when_challenged)),
        ),
        (
            "answers right after \"That's wrong\"",
            Box::new(|_, b| pct(b.fixes_when_corrected)),
        ),
        (
            "invents facts about strangers",
            Box::new(|_, b| pct(b.invents_about_strangers)),
        ),
        (
            "held-out phrasings: strict (macro)",
            Box::new(|_, b| pct(b.heldout.as_ref().map(|h| h.strict))),
        ),
        (
            "held-out phrasings: content (macro)",
            Box::new(|_, b| pct(b.heldout.as_ref().map(|h| h.content))),
        ),
        (
            "held-out phrasings: mean gold score",
            Box::new(|_, b| num(b.heldout.as_ref().map(|h| h.gold), 2)),
        ),
        (
            "win-rate over SFT (reward model)",
            Box::new(|s, _| pct(s.win_vs_sft_rm)),
        ),
        (
            "win-rate over SFT (gold labeller)",
            Box::new(|s, _| pct(s.win_vs_sft_gold)),
        ),
        ("exact KL to SFT per answer", Box::new(|s, _| num(s.kl_to_sft, 3))),
    ];
    for (label, cell) in &rows {
        let mut row = format!("| {label} |");
        for (s, b) in &stages {
            row.push_str(&format!(" {} |", cell(s, b)));
        }
        writeln!(md, "{row}")?;
    }
    let skills: Vec<&String> = stages
        .iter()
        .flat_map(|(_, b)| b.seen.per_skill_content.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    writeln!(md, "\n### Content accuracy per skill\n")?;
    writeln!(md, "{header}\n{rule}")?;
    for k in &skills {
        let mut row = format!("| {k} |");
        for (_, b) in &stages {
            row.push_str(&format!(" {} |", pct(b.seen.per_skill_content.get(*k).copied())));
        }
        writeln!(md, "{row}")?;
    }
    content_changes_table(md, &stages, &skills)?;
    writeln!(md, "\n### Seen and held-out phrasings\n")?;
    writeln!(
        md,
        "Strict exact match (macro) on the evaluation prompts in the phrasings training saw, and in phrasings kept out of every training file.\n"
    )?;
    writeln!(
        md,
        "| stage | seen | held-out | held-out / seen |\n| --- | --- | --- | --- |"
    )?;
    for (s, b) in &stages {
        let h = b.heldout.as_ref().map(|h| h.strict);
        let ratio = h.filter(|_| b.seen.strict > 0.0).map(|h| h / b.seen.strict);
        writeln!(
            md,
            "| {} | {} | {} | {} |",
            s.name,
            pct(Some(b.seen.strict)),
            pct(h),
            num(ratio, 2)
        )?;
    }
    writeln!(md)?;
    Ok(())
}
