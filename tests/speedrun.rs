//! The `tiny` speedrun end to end through the CLI: every stage leaves its artifact and metrics,
//! the report has a row per stage, a rerun reuses every finished stage, and a fresh run with the
//! same seed reproduces every number of the evaluation. A run killed with SIGKILL at seeded moments, or
//! stopped with Ctrl-C, and then rerun ends with the weights of an uninterrupted one.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

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
        "ppo/checkpoint/critic/model.safetensors",
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
        "### Content changes against SFT, answer by answer",
        "## What the reward model cannot do",
        "when they differ only in content",
        "Content per skill, PPO against SFT, in points: add_reversed",
        "driven by the gold labeller itself",
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
    // Answers turned right minus answers turned wrong is each skill's content change against SFT.
    let mut per_skill: std::collections::BTreeMap<String, f64> = Default::default();
    for line in std::fs::read_to_string(run.join("world/eval_seen_prompts.jsonl"))
        .unwrap()
        .lines()
    {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        *per_skill.entry(r["skill"].as_str().unwrap().to_string()).or_default() += 1.0;
    }
    let sft_content = &stages[1]["behaviour"]["seen"]["per_skill_content"];
    for s in &stages[2..] {
        let changes = s["behaviour"]["content_vs_sft"].as_object().expect("content_vs_sft");
        assert_eq!(changes.len(), per_skill.len(), "{changes:?}");
        for (skill, n) in &per_skill {
            let c = &changes[skill];
            let net = c["gained"].as_f64().unwrap() - c["lost"].as_f64().unwrap();
            let moved = (s["behaviour"]["seen"]["per_skill_content"][skill].as_f64().unwrap()
                - sft_content[skill].as_f64().unwrap())
                * n;
            assert!((net - moved).abs() < 1e-6, "{skill}: {c} against {moved}");
        }
    }
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
        "content against it, answers turned right / wrong (McNemar's exact p): add_reversed",
        "reward model agrees with the verifier on",
    ] {
        assert!(text.contains(line), "eval --against lacks {line}: {text}");
    }
    // `--answers` writes each answer with the gold labeller's reading, the readings the report counts.
    let settings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("speedrun.json")).unwrap()).unwrap();
    let max_new = settings["preset"]["max_new_tokens"].as_u64().unwrap().to_string();
    let answers_file = tmp.path().join("answers.jsonl");
    let answered = talaria([
        "eval".into(),
        run.join("ppo"),
        "--prompts".into(),
        run.join("world/eval_seen_prompts.jsonl"),
        "--max-new-tokens".into(),
        max_new.into(),
        "--answers".into(),
        answers_file.clone(),
    ]);
    assert!(
        answered.status.success(),
        "{}",
        String::from_utf8_lossy(&answered.stderr)
    );
    let summary = String::from_utf8_lossy(&answered.stdout);
    assert!(
        summary.contains("gold labeller: strict") && summary.contains("content per skill:"),
        "{summary}"
    );
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&answers_file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let prompts = std::fs::read_to_string(run.join("world/eval_seen_prompts.jsonl")).unwrap();
    assert_eq!(rows.len(), prompts.lines().count());
    let mut by_skill: std::collections::BTreeMap<&str, (f64, f64)> = Default::default();
    for r in &rows {
        assert!(
            r["messages"].is_array() && r["answer"].is_string() && r["gold_score"].is_f64(),
            "{r}"
        );
        let t = by_skill.entry(r["skill"].as_str().unwrap()).or_default();
        t.0 += 1.0;
        t.1 += f64::from(u8::from(r["strict"].as_bool().unwrap()));
    }
    let strict = by_skill.values().map(|(n, k)| k / n).sum::<f64>() / by_skill.len() as f64;
    let reported = stages[2]["behaviour"]["seen"]["strict"].as_f64().unwrap();
    assert!(
        (strict - reported).abs() < 1e-9,
        "--answers strict {strict} against eval.json {reported}"
    );
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

/// An uninterrupted `tiny` speedrun, run once for the tests that compare against it.
fn reference() -> &'static Path {
    static RUN: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &RUN.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("reference");
        let out = tiny_speedrun(&run);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (tmp, run)
    })
    .1
}

/// The trained stages whose weights an interrupted run must reproduce.
const TRAINED: [&str; 6] = ["pretrain", "sft", "reward", "ppo", "ppo_gold", "dpo"];

fn same_weights(a: &Path, b: &Path) {
    for stage in TRAINED {
        let read = |d: &Path| std::fs::read(d.join(stage).join("checkpoint/model.safetensors")).unwrap();
        assert!(
            read(a) == read(b),
            "{stage} weights differ from the uninterrupted run's"
        );
    }
    let critic = |d: &Path| std::fs::read(d.join("ppo/checkpoint/critic/model.safetensors")).unwrap();
    assert!(critic(a) == critic(b), "the PPO critic differs");
}

fn spawn_tiny(out: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_talaria"))
        .args(["speedrun", "--preset", "tiny", "--out"])
        .arg(out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// SplitMix64: the moments to kill at, from a fixed seed.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[test]
fn a_run_killed_at_any_moment_resumes_to_the_same_weights() {
    let reference = reference();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("killed");
    // Kill moments spread over the whole run (about six seconds here): every stage is hit in some
    // seeds, and the many small checkpoint writes of the tiny stages are hit mid-write.
    let mut state = 20_261_201u64;
    let mut kills = 0;
    for _ in 0..8 {
        let mut child = spawn_tiny(&run);
        let after = Duration::from_millis(200 + splitmix(&mut state) % 1500);
        std::thread::sleep(after);
        if child.try_wait().unwrap().is_some() {
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
    }
    assert!(kills >= 3, "the run finished before it could be killed three times");
    let last = tiny_speedrun(&run);
    assert!(last.status.success(), "{}", String::from_utf8_lossy(&last.stderr));
    same_weights(reference, &run);
    // No temporary or aside copy of a checkpoint is left behind.
    for stage in TRAINED {
        let leftovers: Vec<_> = std::fs::read_dir(run.join(stage))
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.contains(".tmp-") || n.contains(".old-"))
            .collect();
        assert!(leftovers.is_empty(), "{stage}: {leftovers:?}");
    }
}

/// Sends SIGINT (Ctrl-C) to a child.
fn interrupt(child: &std::process::Child) {
    // SAFETY: kill(2) with the pid of our own child; no memory is shared.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
}

/// Waits until `path` exists (a stage has started training), at most a minute.
fn wait_for(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ctrl_c_stops_the_run_resumably_and_twice_exits_at_once() {
    let reference = reference();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("interrupted");
    let child = spawn_tiny(&run);
    wait_for(&run.join("sft/metrics.jsonl"));
    interrupt(&child);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(130),
        "an interrupted run exits as SIGINT asks: {stderr}"
    );
    assert!(stderr.contains("run the same command again to resume"), "{stderr}");
    // The stage in progress (SFT, or a later one if SFT finished before the signal) is not marked
    // finished, and none after it starts.
    let order = ["sft", "label", "reward", "ppo", "ppo_gold", "dpo"];
    let stopped = order
        .iter()
        .position(|d| !run.join(d).join("stage.json").exists())
        .expect("some stage was interrupted");
    assert!(
        run.join(order[stopped]).exists() && stderr.contains("interrupted during the"),
        "{stderr}"
    );
    for later in &order[stopped + 1..] {
        assert!(!run.join(later).exists(), "{later} started after Ctrl-C");
    }
    let again = tiny_speedrun(&run);
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(stdout.contains("[4/12] pretrain     reused"), "{stdout}");
    same_weights(reference, &run);

    // Two Ctrl-C: once the first is acknowledged, a second (repeated every millisecond, since a
    // signal sent while another is pending merges with it) ends the process at once, with 130,
    // without waiting for the checkpoint.
    let twice = tmp.path().join("twice");
    let mut child = spawn_tiny(&twice);
    wait_for(&twice.join("pretrain/metrics.jsonl"));
    let mut err_pipe = BufReader::new(child.stderr.take().unwrap());
    interrupt(&child);
    let mut stderr = String::new();
    while !stderr.contains("interrupted: stopping") {
        assert!(err_pipe.read_line(&mut stderr).unwrap() > 0, "{stderr}");
    }
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        interrupt(&child);
        std::thread::sleep(Duration::from_millis(1));
    };
    err_pipe.read_to_string(&mut stderr).unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted again: exiting now"), "{stderr}");
}
