//! The `tiny` speedrun end to end through the CLI: every stage leaves its artifact and metrics,
//! the report has a row per stage, a rerun reuses every finished stage, and a fresh run with the
//! same seed reproduces every number of the evaluation.

use std::ffi::OsStr;
use std::process::{Command, Output};

use talaria::metrics::read_metrics;

/// Runs the `talaria` binary with `args`.
fn talaria<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(args: I) -> Output {
    Command::new(env!("CARGO_BIN_EXE_talaria")).args(args).output().unwrap()
}

/// A `tiny` speedrun into `out`.
fn tiny_speedrun(out: &std::path::Path) -> Output {
    talaria([
        OsStr::new("speedrun"),
        "--preset".as_ref(),
        "tiny".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ])
}

#[test]
fn tiny_speedrun_runs_every_stage_and_reuses_them() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out = tiny_speedrun(&run);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (i, stage) in [
        "synth",
        "tokenizer",
        "data",
        "pretrain",
        "sft",
        "label",
        "reward",
        "ppo",
        "ppo-gold",
        "dpo",
    ]
    .iter()
    .enumerate()
    {
        assert!(stdout.contains(&format!("[{}/12] {stage} ", i + 1)), "{stdout}");
    }
    for f in [
        "world/pretrain.txt",
        "world/eval_prompts.jsonl",
        "tokenizer/tokenizer.json",
        "data/meta.json",
        "data/train_0000.bin",
        "pretrain/checkpoint/model.safetensors",
        "sft/checkpoint/model.safetensors",
        "label/rankings.jsonl",
        "reward/checkpoint/model.safetensors",
        "ppo/checkpoint/model.safetensors",
        "ppo/critic/model.safetensors",
        "ppo_gold/checkpoint/model.safetensors",
        "world/eval_heldout_prompts.jsonl",
        "world/eval_challenge.jsonl",
        "world/eval_correction.jsonl",
        "world/eval_unknown.jsonl",
        "dpo/checkpoint/model.safetensors",
        "eval.json",
        "report.md",
        "speedrun.json",
    ] {
        assert!(run.join(f).exists(), "missing {f}");
    }
    for (dir, stage, key) in [
        ("pretrain", "pretrain", "val_bpb"),
        ("sft", "sft", "val_loss"),
        ("reward", "reward", "accuracy"),
        ("ppo", "ppo", "kl"),
        ("ppo", "ppo", "eval_gold"),
        ("ppo", "ppo", "eval_sqrt_kl"),
        ("ppo_gold", "ppo", "eval_rm"),
        ("dpo", "dpo", "margin"),
    ] {
        let rows = read_metrics(&run.join(dir).join("metrics.jsonl"), Some(stage)).unwrap();
        assert!(
            rows.iter().any(|r| r[key].as_f64().is_some_and(f64::is_finite)),
            "{dir} logged no {key}"
        );
    }
    let report = std::fs::read_to_string(run.join("report.md")).unwrap();
    for row in [
        "| base |",
        "| sft |",
        "| ppo |",
        "| ppo_gold |",
        "## Behaviour",
        "keeps a right answer after \"Are you sure?\"",
        "invents facts about strangers",
        "held-out phrasings: strict (macro)",
        "### Content accuracy per skill",
        "reward model on the SFT model's own held-out answers that differ in behaviour",
        "| dpo |",
        "reward model held-out pairwise accuracy",
        "RM agrees with verifier",
        "reward model on the SFT model's own mistakes",
        "## Settings",
        "| preset.ppo.steps | 3 |",
        "| preset.ppo_gold.temperature | 1.0 |",
        "| seed | 0 |",
    ] {
        assert!(report.contains(row), "report lacks {row}");
    }
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("eval.json")).unwrap()).unwrap();
    let stages = eval["stages"].as_array().unwrap();
    let names: Vec<&str> = stages.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["base", "sft", "ppo", "ppo_gold", "dpo"]);
    for s in &stages[2..4] {
        assert!(s["separated_from_sft"].is_u64(), "{s}");
        assert!(s["kl_to_sft"].as_f64().is_some_and(f64::is_finite), "{s}");
        assert!(s["win_vs_sft_gold"].as_f64().is_some_and(f64::is_finite), "{s}");
        let b = &s["behaviour"];
        for key in [
            "keeps_when_challenged",
            "fixes_when_corrected",
            "invents_about_strangers",
        ] {
            assert!(b[key].as_f64().is_some_and(|x| (0.0..=1.0).contains(&x)), "{key}: {b}");
        }
        assert!(
            b["heldout"]["strict"].is_f64() && b["sampled"]["padded"].is_f64(),
            "{b}"
        );
    }
    assert!(stdout.contains("talaria chat"), "the end of the run says how to chat");

    // One checkpoint against another on the held-out prompts, judged by the verifier and the reward model.
    let against = talaria([
        "eval".into(),
        run.join("ppo"),
        "--prompts".into(),
        run.join("world/eval_prompts.jsonl"),
        "--against".into(),
        run.join("sft"),
        "--reward".into(),
        run.join("reward"),
    ]);
    let text = String::from_utf8_lossy(&against.stdout);
    assert!(
        against.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&against.stderr)
    );
    for line in [
        "macro accuracy",
        "reward model scores the reference answer above this model's wrong answer",
        "win-rate:",
        "by the verifier",
        "reward model agrees with the verifier on",
    ] {
        assert!(text.contains(line), "eval --against lacks {line}: {text}");
    }
    let lone = talaria(["eval".into(), run.join("ppo"), "--reward".into(), run.join("reward")]);
    assert!(!lone.status.success());
    assert!(String::from_utf8_lossy(&lone.stderr).contains("--reward needs --prefs"));

    // A second run reuses every stage and reproduces the evaluation exactly.
    let again = tiny_speedrun(&run);
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success());
    assert_eq!(stdout.matches("reused").count(), 10, "{stdout}");
    let eval2: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("eval.json")).unwrap()).unwrap();
    assert_eq!(eval["stages"], eval2["stages"]);

    // A fresh run elsewhere with the same seed reproduces every measured number (timings aside).
    let fresh = tmp.path().join("fresh");
    let third = tiny_speedrun(&fresh);
    assert!(third.status.success(), "{}", String::from_utf8_lossy(&third.stderr));
    let eval3: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fresh.join("eval.json")).unwrap()).unwrap();
    let without_timings = |v: &serde_json::Value| {
        let mut v = v.clone();
        for s in v["stages"].as_array_mut().unwrap() {
            let s = s.as_object_mut().unwrap();
            s.remove("wall_s");
            s.remove("tokens_per_s");
        }
        v
    };
    assert_eq!(without_timings(&eval), without_timings(&eval3));
    for stage in ["pretrain", "sft", "reward", "ppo", "ppo_gold", "dpo"] {
        let read = |d: &std::path::Path| std::fs::read(d.join(stage).join("checkpoint/model.safetensors")).unwrap();
        assert!(
            read(&run) == read(&fresh),
            "{stage} weights differ between two runs with one seed"
        );
    }

    // A second RLHF round on top: the first nine stages and DPO are reused, the labeller ranks PPO's
    // answers, the reward model trains further and PPO continues.
    let round2 = talaria([
        OsStr::new("speedrun"),
        "--preset".as_ref(),
        "tiny".as_ref(),
        "--rl-rounds".as_ref(),
        "2".as_ref(),
        "--out".as_ref(),
        run.as_os_str(),
    ]);
    let stdout = String::from_utf8_lossy(&round2.stdout);
    assert!(
        round2.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&round2.stderr)
    );
    for line in [
        "[9/15] ppo-gold     reused",
        "[10/15] label-round2",
        "[11/15] reward-round2",
        "[12/15] ppo-round2",
        "[13/15] dpo          reused",
    ] {
        assert!(stdout.contains(line), "{line}: {stdout}");
    }
    assert!(
        stdout.contains("talaria chat") && stdout.contains("ppo_round2"),
        "{stdout}"
    );
    let eval4: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("eval.json")).unwrap()).unwrap();
    let names: Vec<&str> = eval4["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["base", "sft", "ppo", "ppo_round2", "ppo_gold", "dpo"]);
    let rounds = read_metrics(&run.join("reward_round2/metrics.jsonl"), Some("reward")).unwrap();
    assert!(
        rounds.iter().any(|r| r["accuracy"].is_f64()),
        "the second reward model logged no accuracy"
    );
    let bad = talaria(["speedrun", "--preset", "tiny", "--rl-rounds", "0"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--rl-rounds"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
