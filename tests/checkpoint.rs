//! Checkpoint saves: a reader never finds the checkpoint missing while saves replace it, an interrupted
//! swap is put back, and a full disk fails with a clear error and leaves the previous checkpoint intact.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device};
use talaria::checkpoint::{Checkpoint, recover};
use talaria::data::shards::write_shard;
use talaria::model::{GptConfig, init_weights};

fn save(dir: &Path, stage: &str) {
    let cfg = GptConfig::preset("test").unwrap();
    let w = init_weights(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
    common::save_checkpoint(dir, &cfg, &w, None, stage);
}

#[test]
fn a_reader_never_finds_the_checkpoint_missing_while_it_is_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("checkpoint");
    save(&dir, "first");
    let done = Arc::new(AtomicBool::new(false));
    let (d, stop) = (dir.clone(), done.clone());
    let reader = std::thread::spawn(move || {
        let (mut looks, mut missing) = (0u64, 0u64);
        while !stop.load(Ordering::SeqCst) {
            looks += 1;
            if !d.join("config.json").exists() {
                missing += 1;
            }
        }
        (looks, missing)
    });
    for i in 0..150 {
        save(&dir, &format!("save {i}"));
    }
    done.store(true, Ordering::SeqCst);
    let (looks, missing) = reader.join().unwrap();
    assert!(looks > 1000, "the reader hardly ran ({looks} looks)");
    assert_eq!(missing, 0, "{missing} of {looks} looks found no checkpoint");
    let ck = Checkpoint::load(&dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(ck.meta.stage, "save 149");
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["checkpoint"], "only the checkpoint is left");
}

#[test]
fn a_swap_cut_short_between_its_renames_is_put_back() {
    // What a filesystem without an atomic exchange leaves if the process dies between moving the old
    // checkpoint aside and moving the new one in.
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let aside = run.join(".checkpoint.old-123-456");
    save(&aside, "previous");
    std::fs::create_dir(run.join(".checkpoint.tmp-123-456")).unwrap();
    let ck = Checkpoint::load(&run, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(ck.meta.stage, "previous");
    assert!(run.join("checkpoint/config.json").exists() && !aside.exists());
    // The next save clears the half-written temporary directory.
    save(&run.join("checkpoint"), "next");
    let names: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect();
    assert_eq!(names, ["checkpoint"]);
    recover(&run.join("checkpoint")).unwrap();
    assert_eq!(
        Checkpoint::load(&run, DType::F32, &Device::Cpu).unwrap().meta.stage,
        "next"
    );
}

#[test]
fn a_full_disk_fails_clearly_and_keeps_the_previous_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let tokens: Vec<u32> = (0..6000u32).map(|i| (i * 7 + i / 13) % 64).collect();
    write_shard(&data.join("train_0000.bin"), &tokens, 64).unwrap();
    write_shard(&data.join("val_0000.bin"), &tokens[..1500], 64).unwrap();
    let run = tmp.path().join("run");
    let bin = env!("CARGO_BIN_EXE_talaria");
    let args = format!(
        "pretrain --data {} --out {} --model test --steps 6 --batch-size 2 --seq-len 16 --save-every 3 --eval-every 3",
        data.display(),
        run.display()
    );
    // `ulimit -f` (in KiB) caps the size of any file the command writes.
    let pretrain = |limit: Option<u64>, extra: &str| {
        let cap = limit.map_or(String::new(), |k| format!("ulimit -f {k}; "));
        Command::new("bash")
            .arg("-c")
            .arg(format!("{cap}exec {bin} {args} {extra}"))
            .output()
            .expect("bash runs")
    };
    let first = pretrain(None, "--stop-at 3");
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let weights = run.join("checkpoint/model.safetensors");
    let size_kib = std::fs::metadata(&weights).unwrap().len() / 1024;
    assert!(size_kib > 8, "a test checkpoint of {size_kib} KiB is too small to cap");
    let before = std::fs::read(&weights).unwrap();
    // Room for the logs but not for a new copy of the weights.
    let full = pretrain(Some(size_kib / 2), "--resume");
    let stderr = String::from_utf8_lossy(&full.stderr);
    assert!(!full.status.success(), "{stderr}");
    assert!(
        stderr.contains("model.safetensors") && stderr.contains("previous one there is intact"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&weights).unwrap(),
        before,
        "the previous checkpoint changed"
    );
    let ck = Checkpoint::load(&run, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(ck.meta.step, 3);
    let stray: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .filter(|n: &String| n.contains(".tmp-"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
    // With room again, the run resumes and finishes.
    let again = pretrain(None, "--resume");
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(Checkpoint::load(&run, DType::F32, &Device::Cpu).unwrap().meta.step, 6);
}
