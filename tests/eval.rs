//! Real benchmark formats (MMLU, GSM8K) and their clear errors.

use std::path::Path;

use candle_core::{DType, Device};
use talaria::eval::benchmarks::{gsm8k_accuracy, mmlu_accuracy, read_gsm8k, read_mmlu};
use talaria::model::{Gpt, GptConfig, init_weights};
use talaria::tokenizer::{self, Tokenizer};

fn tiny_model(tok: &Tokenizer) -> Gpt {
    let mut cfg = GptConfig::preset("tiny").unwrap();
    cfg.vocab_size = tok.vocab_size();
    Gpt::from_weights(&cfg, &init_weights(&cfg, 1, DType::F32, &Device::Cpu).unwrap()).unwrap()
}

#[test]
fn mmlu_and_gsm8k_files_are_read_and_scored() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/eval");
    if !root.exists() {
        eprintln!("skipped: {} is absent", root.display());
        return;
    }
    // SOURCES.md: 285 dev questions (5 per subject), 1319 GSM8K test problems.
    assert_eq!(read_mmlu(&root.join("mmlu_dev.jsonl"), None).unwrap().len(), 285);
    let gsm = read_gsm8k(&root.join("gsm8k_test.jsonl"), None).unwrap();
    assert_eq!(gsm.len(), 1319);
    assert!(
        gsm.iter().all(|p| p.answer.parse::<f64>().is_ok()),
        "every final answer is a number"
    );

    let cfg = tokenizer::TrainConfig {
        vocab_size: 300,
        min_frequency: 2,
        show_progress: false,
    };
    let text = std::fs::read_to_string(root.join("mmlu_dev.jsonl")).unwrap();
    let (tok, _) = tokenizer::train_bpe(&cfg, text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let model = tiny_model(&tok);
    let dev = read_mmlu(&root.join("mmlu_dev.jsonl"), None).unwrap();
    let test = read_mmlu(&root.join("mmlu_test.jsonl"), Some(8)).unwrap();
    let acc = mmlu_accuracy(&model, &tok, &test, &dev, 2).unwrap();
    assert!((0.0..=1.0).contains(&acc));
    let train = read_gsm8k(&root.join("gsm8k_train.jsonl"), Some(2)).unwrap();
    let acc = gsm8k_accuracy(&model, &tok, &gsm[..3], &train, 1, 8).unwrap();
    assert!((0.0..=1.0).contains(&acc));
}

#[test]
fn malformed_benchmark_records_name_the_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("m.jsonl");
    std::fs::write(
        &p,
        "{\"subject\": \"x\", \"question\": \"q\", \"choices\": [\"a\", \"b\"], \"answer\": 0}\n",
    )
    .unwrap();
    let e = format!("{:#}", read_mmlu(&p, None).unwrap_err());
    assert!(e.contains("m.jsonl:1") && e.contains("expected 4 choices"), "{e}");
    std::fs::write(&p, "{\"question\": \"q\", \"answer\": \"no final number\"}\n").unwrap();
    let e = format!("{:#}", read_gsm8k(&p, None).unwrap_err());
    assert!(e.contains("m.jsonl:1") && e.contains("####"), "{e}");
}
