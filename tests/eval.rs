//! Real benchmark formats (MMLU, GSM8K) and their clear errors.

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use talaria::eval::benchmarks::{
    McQuestion, continuation_logprobs, gsm8k_accuracy, mmlu_accuracy, read_gsm8k, read_mmlu,
};
use talaria::model::{Gpt, GptConfig, init_weights};
use talaria::tokenizer::{self, Tokenizer};

/// A byte-level BPE of at most 300 tokens trained on `lines`.
fn bpe<'a, I: IntoIterator<Item = &'a str>>(lines: I) -> Tokenizer
where
    I::IntoIter: Send,
{
    let cfg = tokenizer::TrainConfig {
        vocab_size: 300,
        min_frequency: 2,
        show_progress: false,
    };
    tokenizer::train_bpe(&cfg, lines.into_iter().map(|l| Ok(l.to_string())))
        .unwrap()
        .0
}

fn tiny_model(tok: &Tokenizer) -> Gpt {
    let mut cfg = GptConfig::preset("tiny").unwrap();
    cfg.vocab_size = tok.vocab_size();
    Gpt::from_weights(&cfg, &init_weights(&cfg, 1, DType::F32, &Device::Cpu).unwrap()).unwrap()
}

#[test]
fn mmlu_and_gsm8k_files_are_read_and_scored() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/eval");
    if !root.exists() {
        common::skip("data", &format!("{} is absent", root.display()));
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

    let text = std::fs::read_to_string(root.join("mmlu_dev.jsonl")).unwrap();
    let tok = bpe(text.lines());
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

#[test]
fn multiple_choice_scores_the_whole_continuation_of_each_letter() {
    // A vocabulary in which " A" is one token and " B", " C", " D" are two (a space, then the letter):
    // reading only the first token would see three identical choices.
    let tok = bpe(["A A A A A A A A", "B C D"]);
    let lens: Vec<usize> = ["A", "B", "C", "D"]
        .iter()
        .map(|l| tok.encode(&format!(" {l}")).unwrap().len())
        .collect();
    assert_eq!(lens, [1, 2, 2, 2], "the test needs this split");
    let spaces: Vec<u32> = ["B", "C", "D"]
        .iter()
        .map(|l| tok.encode(&format!(" {l}")).unwrap()[0])
        .collect();
    assert!(spaces.iter().all(|&s| s == spaces[0]));

    // A model whose weights are all zero predicts every token with probability 1/V: a one-token
    // continuation is exactly V times likelier than a two-token one, so " A" is the answer.
    let mut mcfg = GptConfig::preset("tiny").unwrap();
    mcfg.vocab_size = tok.vocab_size();
    let zeros: std::collections::HashMap<_, _> = init_weights(&mcfg, 1, DType::F32, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.zeros_like().unwrap()))
        .collect();
    let model = Gpt::from_weights(&mcfg, &zeros).unwrap();
    let prompt = tok.encode("Question: pick one.\nAnswer:").unwrap();
    let conts: Vec<Vec<u32>> = ["A", "B", "C", "D"]
        .iter()
        .map(|l| tok.encode(&format!(" {l}")).unwrap())
        .collect();
    let lp = continuation_logprobs(&model, &prompt, &conts).unwrap();
    let v = (tok.vocab_size() as f64).ln();
    for (l, expected) in lp.iter().zip([-v, -2.0 * v, -2.0 * v, -2.0 * v]) {
        assert!((l - expected).abs() < 1e-4, "{lp:?}");
    }
    let q = McQuestion {
        subject: "test".into(),
        question: "Pick one.".into(),
        choices: ["w", "x", "y", "z"].map(String::from).to_vec(),
        answer: 0,
    };
    assert_eq!(
        mmlu_accuracy(&model, &tok, std::slice::from_ref(&q), &[], 0).unwrap(),
        1.0
    );
    let wrong = McQuestion { answer: 3, ..q };
    assert_eq!(mmlu_accuracy(&model, &tok, &[wrong], &[], 0).unwrap(), 0.0);

    // On a random model, each continuation's score is the sum of the log-softmax of its tokens.
    let random = tiny_model(&tok);
    let lp = continuation_logprobs(&random, &prompt, &conts).unwrap();
    let mut ids = prompt.clone();
    ids.extend(&conts[1][..1]);
    let logits = random
        .forward(
            &candle_core::Tensor::new(ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        )
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let log_softmax = |row: &[f32], t: u32| -> f64 {
        let m = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
        row[t as usize] as f64 - m - z.ln()
    };
    let n = prompt.len();
    let direct = log_softmax(&logits[n - 1], conts[1][0]) + log_softmax(&logits[n], conts[1][1]);
    assert!((lp[1] - direct).abs() < 1e-4, "{} vs {direct}", lp[1]);
}

/// Few-shot answers line up with their prompts: a prompt without a skill (no examples to show) gets an
/// empty answer in its place instead of shifting the later answers onto the wrong prompts.
#[test]
fn few_shot_answers_stay_in_prompt_order() {
    use talaria::chat::{Message, Role};
    use talaria::data::prompts::PromptRecord;
    use talaria::eval::tasks::few_shot_accuracy;
    let tok = bpe(["Q: What is 12 backwards?\nA: 21", "Q: Spell cat.\nA: c a t"]);
    let model = tiny_model(&tok);
    let record = |q: &str, skill: Option<&str>| PromptRecord {
        messages: vec![Message::new(Role::User, q)],
        answer: skill.map(|_| "x".to_string()),
        skill: skill.map(str::to_string),
    };
    let prompts = [
        record("Reverse the word cat.", Some("reverse")),
        record("Tell me a story.", None),
        record("Reverse the word dog.", Some("reverse")),
    ];
    let r = few_shot_accuracy(&model, &tok, &prompts, 2, 0, 4).unwrap();
    assert_eq!(r.answers.len(), prompts.len());
    assert_eq!(r.answers[1], "", "the prompt without a skill is not answered");
    // The last prompt's answer is the one it gets when asked alone.
    let alone = few_shot_accuracy(&model, &tok, &prompts[2..], 2, 0, 4).unwrap();
    assert_eq!(r.answers[2], alone.answers[0]);
    assert_eq!(r.by_skill["reverse"].total, 2);
}
