//! Data-parallel training over MPI: `mpirun -np 2` gives the single-process run with twice the
//! gradient accumulation (losses and weights to 1e-5), resumes exactly, and ends the whole job
//! when a rank dies. Needs OpenMPI's `mpirun` and a `--features mpi` build, which the first test
//! to run makes in `target/mpi` (MPI's headers and libclang must be installed: docs/scale-out.md).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use talaria::checkpoint::Checkpoint;
use talaria::metrics::read_metrics;
use talaria::model::{GptConfig, init_weights};

mod common;

/// The `--features mpi` binary, built once; `None` (with a visible skip) where MPI is missing.
fn mpi_binary() -> Option<&'static Path> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(|| {
        if Command::new("mpirun").arg("--version").output().is_err() {
            common::skip(
                "mpi",
                "mpirun is not installed (Debian: openmpi-bin libopenmpi-dev libclang-dev)",
            );
            return None;
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let target = root.join("target/mpi");
        let out = Command::new(env!("CARGO"))
            .current_dir(root)
            .args([
                "build",
                "--release",
                "--features",
                "mpi",
                "--bin",
                "talaria",
                "--target-dir",
            ])
            .arg(&target)
            .output()
            .unwrap();
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr);
            let tail: String = why
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            common::skip("mpi", &format!("cargo build --features mpi failed:\n{tail}"));
            return None;
        }
        Some(target.join("release/talaria"))
    })
    .as_deref()
}

/// `mpirun -np N BIN ARGS` with one kernel thread per rank.
fn mpirun(np: usize, bin: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe", "-np", &np.to_string()])
        .args(["-x", "RAYON_NUM_THREADS=1"])
        // Containers often forbid the cross-process memory copy OpenMPI's shared-memory transport
        // tries first.
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .arg(bin)
        .args(args);
    c
}

fn one_process(bin: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin);
    c.env("RAYON_NUM_THREADS", "1").args(args);
    c
}

fn run_ok(mut c: Command) -> Output {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn losses(run: &Path, stage: &str) -> Vec<f64> {
    read_metrics(&run.join("metrics.jsonl"), Some(stage))
        .unwrap()
        .iter()
        .filter_map(|r| r["loss"].as_f64())
        .collect()
}

/// Per-step losses equal within `tol` relative, and as many steps as `steps`.
fn assert_same_losses(a: &[f64], b: &[f64], steps: usize, tol: f64, what: &str) {
    assert_eq!(a.len(), steps, "{what}: {a:?}");
    assert_eq!(b.len(), steps, "{what}: {b:?}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * x.abs().max(1e-12),
            "{what}: step {} loss {x} vs {y}",
            i + 1
        );
    }
}

/// Runs `a` and `b` of `stage`: the same per-step losses (within `loss_tol`) and final weights
/// (within `weight_tol`).
fn assert_same_run(a: &str, b: &str, stage: &str, steps: usize, loss_tol: f64, weight_tol: f32) {
    let (a, b) = (Path::new(a), Path::new(b));
    assert_same_losses(
        &losses(a, stage),
        &losses(b, stage),
        steps,
        loss_tol,
        &b.display().to_string(),
    );
    assert_same_weights(&a.join("checkpoint"), &b.join("checkpoint"), weight_tol);
}

/// Every weight of the two checkpoints equal within `tol` relative to its tensor's largest value
/// (at least 0.01: a bias that starts at zero moves by little more than the rounding).
fn assert_same_weights(a: &Path, b: &Path, tol: f32) {
    let a = Checkpoint::load(a, DType::F32, &Device::Cpu).unwrap();
    let b = Checkpoint::load(b, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(a.weights.len(), b.weights.len());
    for (name, wa) in &a.weights {
        let wb = &b.weights[name];
        let scale = wa
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1e-2);
        let d = common::max_abs_diff(wa, wb);
        assert!(d <= tol * scale, "{name}: max |difference| {d} (largest value {scale})");
    }
}

fn pretrain_args<'a>(data: &'a str, out: &'a str, accum: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "pretrain",
        "--data",
        data,
        "--model",
        "test",
        "--out",
        out,
        "--steps",
        "6",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--eval-every",
        "3",
        "--grad-accum",
        accum,
    ];
    a.extend_from_slice(extra);
    a
}

#[test]
fn two_ranks_pretrain_as_one_process_with_twice_the_accumulation_and_resume_exactly() {
    let Some(bin) = mpi_binary() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::write_token_shards(&data, 5_000);
    let d = data.to_str().unwrap();
    let path = |n: &str| tmp.path().join(n).display().to_string();
    let (solo, two, resumed) = (path("solo"), path("two"), path("resumed"));

    run_ok(one_process(bin, &pretrain_args(d, &solo, "2", &[])));
    let out = run_ok(mpirun(2, bin, &pretrain_args(d, &two, "1", &[])));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.matches("pretrain: 6 steps").count(),
        1,
        "rank 0 alone reports: {stdout}"
    );
    assert_same_run(&solo, &two, "pretrain", 6, 1e-5, 1e-5);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(Path::new(&two).join("checkpoint/talaria.json")).unwrap())
            .unwrap();
    assert_eq!(meta["state"]["world_size"], 2, "{meta}");

    // Interrupted after 3 steps and resumed on 2 ranks: the uninterrupted run's losses and weights.
    let out = run_ok(mpirun(2, bin, &pretrain_args(d, &resumed, "1", &["--stop-at", "3"])));
    assert!(String::from_utf8_lossy(&out.stdout).contains("stopped early"));
    run_ok(mpirun(2, bin, &pretrain_args(d, &resumed, "1", &["--resume"])));
    assert_same_run(&two, &resumed, "pretrain", 6, 1e-9, 1e-7);

    // Resumed as one process with twice the accumulation: the same global batch, the same stream.
    let moved = path("moved");
    run_ok(mpirun(2, bin, &pretrain_args(d, &moved, "1", &["--stop-at", "3"])));
    let out = run_ok(one_process(bin, &pretrain_args(d, &moved, "2", &["--resume"])));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("resuming a run saved on 2 rank(s) on 1"), "{stderr}");
    assert_same_run(&two, &moved, "pretrain", 6, 1e-5, 1e-5);
}

#[test]
fn sft_reward_dpo_and_ppo_on_two_ranks_match_one_process() {
    let Some(bin) = mpi_binary() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let world = tmp.path().join("world");
    let tok = common::small_world(&world, 300);
    let mut cfg = GptConfig::preset("test").unwrap();
    cfg.vocab_size = tok.vocab_size();
    // Room for the default world's longest prompts and an answer.
    cfg.n_positions = 160;
    let base = tmp.path().join("base");
    let w = init_weights(&cfg, 2, DType::F32, &Device::Cpu).unwrap();
    common::save_checkpoint(&base, &cfg, &w, Some(&tok.to_json().unwrap()), "pretrain");
    let b = base.display().to_string();
    let f = |n: &str| world.join(n).display().to_string();
    let stages: [(&str, Vec<String>); 3] = [
        (
            "sft",
            vec![
                "--init".into(),
                b.clone(),
                "--data".into(),
                f("sft_train.jsonl"),
                "--val-data".into(),
                f("sft_val.jsonl"),
                "--batch-size".into(),
                "2".into(),
                "--seq-len".into(),
                "32".into(),
            ],
        ),
        (
            "reward",
            vec![
                "--init".into(),
                b.clone(),
                "--data".into(),
                f("prefs_train.jsonl"),
                "--val-data".into(),
                f("prefs_val.jsonl"),
                "--batch-size".into(),
                "4".into(),
            ],
        ),
        (
            "dpo",
            vec![
                "--policy".into(),
                b.clone(),
                "--data".into(),
                f("prefs_train.jsonl"),
                "--val-data".into(),
                f("prefs_val.jsonl"),
                "--batch-size".into(),
                "2".into(),
            ],
        ),
    ];
    let ppo_args = [
        "--policy",
        &b,
        "--reward",
        "gold",
        "--prompts",
        &f("rl_prompts.jsonl"),
        "--prompts-per-step",
        "4",
        "--samples-per-prompt",
        "2",
        "--minibatch",
        "4",
        "--max-new-tokens",
        "8",
        "--eval-every",
        "100",
    ]
    .map(String::from);
    let ppo_run = |out: &Path| -> Vec<String> {
        let mut a = vec!["ppo".to_string()];
        a.extend(ppo_args.iter().cloned());
        a.extend(["--steps", "3", "--out"].map(String::from));
        a.push(out.display().to_string());
        a
    };
    let (solo, two) = (tmp.path().join("ppo-solo"), tmp.path().join("ppo-two"));
    run_ok(one_process(
        bin,
        &ppo_run(&solo).iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    run_ok(mpirun(
        2,
        bin,
        &ppo_run(&two).iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    for key in ["reward", "kl", "policy_loss", "value_loss", "entropy", "answer_len"] {
        let m = |run: &Path| -> Vec<f64> {
            read_metrics(&run.join("metrics.jsonl"), Some("ppo"))
                .unwrap()
                .iter()
                .filter_map(|r| r[key].as_f64())
                .collect()
        };
        let (a, b) = (m(&solo), m(&two));
        assert_eq!(a.len(), 3, "ppo {key}: {a:?}");
        for (x, y) in a.iter().zip(&b) {
            // Relative to the terms' scale: the policy loss averages whitened advantages (of scale
            // 1) that nearly cancel.
            assert!((x - y).abs() <= 1e-5 * x.abs().max(0.1), "ppo {key}: {a:?} vs {b:?}");
        }
        assert_eq!(a.len(), b.len(), "ppo {key}");
    }
    assert_same_weights(&solo.join("checkpoint"), &two.join("checkpoint"), 1e-5);
    assert_same_weights(&solo.join("checkpoint/critic"), &two.join("checkpoint/critic"), 1e-5);

    for (stage, args) in &stages {
        let run = |out: &Path, accum: &str| -> Vec<String> {
            let mut a = vec![stage.to_string()];
            a.extend(args.iter().cloned());
            a.extend(["--steps", "4", "--eval-every", "4", "--grad-accum", accum].map(String::from));
            a.extend(["--out".to_string(), out.display().to_string()]);
            a
        };
        let (solo, two) = (
            tmp.path().join(format!("{stage}-solo")),
            tmp.path().join(format!("{stage}-two")),
        );
        let solo_args = run(&solo, "2");
        run_ok(one_process(
            bin,
            &solo_args.iter().map(String::as_str).collect::<Vec<_>>(),
        ));
        let two_args = run(&two, "1");
        run_ok(mpirun(2, bin, &two_args.iter().map(String::as_str).collect::<Vec<_>>()));
        assert_same_run(solo.to_str().unwrap(), two.to_str().unwrap(), stage, 4, 1e-5, 1e-5);
    }
}

#[test]
fn a_killed_rank_ends_the_whole_job_with_an_error() {
    let Some(bin) = mpi_binary() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::write_token_shards(&data, 5_000);
    let run = tmp.path().join("run");
    let mut c = mpirun(
        2,
        bin,
        &[
            "pretrain",
            "--data",
            data.to_str().unwrap(),
            "--model",
            "test",
            "--out",
            run.to_str().unwrap(),
            "--steps",
            "1000000",
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--eval-every",
            "1000000",
        ],
    );
    let mut job = c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let started = Instant::now();
    while !run.join("metrics.jsonl").exists() || losses(&run, "pretrain").len() < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the job never started training"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let rank1 = rank_pid(job.id(), 1).expect("rank 1's process");
    // SAFETY: sends a signal to a process this test started; touches no memory.
    assert_eq!(unsafe { libc::kill(rank1, libc::SIGKILL) }, 0, "kill -9 {rank1}");
    let killed = Instant::now();
    let status = loop {
        if let Some(s) = job.try_wait().unwrap() {
            break s;
        }
        if killed.elapsed() > Duration::from_secs(60) {
            let _ = job.kill();
            panic!("rank 0 was still running 60 s after rank 1 died");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(job.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("signal 9") || stderr.contains("Killed"), "{stderr}");
}

#[test]
fn a_binary_without_mpi_and_single_process_commands_refuse_to_run_under_mpirun() {
    let Some(mpi_bin) = mpi_binary() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::write_token_shards(&data, 2_000);
    let d = data.to_str().unwrap();
    let out = tmp.path().join("run").display().to_string();
    let plain = Path::new(env!("CARGO_BIN_EXE_talaria"));
    let o = mpirun(2, plain, &pretrain_args(d, &out, "1", &[])).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("built without MPI") && stderr.contains("--features mpi"),
        "{stderr}"
    );
    assert!(!tmp.path().join("run/checkpoint").exists());
    let o = mpirun(2, mpi_bin, &["generate", &out, "--prompt", "x"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("only pretrain, sft, reward, dpo, ppo and bench allreduce"),
        "{stderr}"
    );
    let o = mpirun(
        2,
        mpi_bin,
        &[
            "ppo",
            "--policy",
            &out,
            "--reward",
            "gold",
            "--prompts",
            d,
            "--out",
            &out,
            "--prompts-per-step",
            "1",
        ],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("--prompts-per-step 1 is fewer than the 2 ranks"),
        "{stderr}"
    );
}

/// The pid of rank `rank` among the children of the `mpirun` process `parent`.
fn rank_pid(parent: u32, rank: usize) -> Option<i32> {
    for entry in std::fs::read_dir("/proc").ok()? {
        let path = entry.ok()?.path();
        let Some(pid) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`: the parent is the second field after the command name.
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().nth(1))
            .and_then(|s| s.parse::<u32>().ok());
        if ppid != Some(parent) {
            continue;
        }
        let env = std::fs::read(path.join("environ")).unwrap_or_default();
        let want = format!("OMPI_COMM_WORLD_RANK={rank}");
        if env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

/// `talaria bench allreduce` over two ranks: MPI's sum of 1 MiB equals the sum worked out on the
/// host, and rank 0 alone prints the figures.
#[test]
fn the_allreduce_bench_sums_exactly_over_mpi() {
    let Some(bin) = mpi_binary() else { return };
    let o = mpirun(2, bin, &["bench", "allreduce", "--mb", "1", "--steps", "3", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    let reports: Vec<serde_json::Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(reports.len(), 1, "{stdout}");
    let r = &reports[0];
    assert_eq!(r["engine"], "mpi", "{r}");
    assert_eq!(r["ranks"], 2, "{r}");
    assert_eq!(r["bytes"], 1 << 20, "{r}");
    assert_eq!(r["max_abs_error"], 0.0, "{r}");
    assert!(r["bus_gb_per_s"].as_f64().unwrap() > 0.0, "{r}");
}
