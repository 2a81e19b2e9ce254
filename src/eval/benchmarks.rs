//! Real benchmarks in their published formats: MMLU-style multiple choice (`{subject, question,
//! choices: [4], answer: 0-3}`, few-shot from a dev file, scored by the log-probability of each answer's
//! whole continuation, " A" to " D", which a small vocabulary may split into several tokens) and GSM8K-style maths (`{question, answer: "... #### 42"}`, few-shot, greedy, the
//! final number compared exactly).

use std::path::Path;

use anyhow::{Context, Result, ensure};
use candle_core::{D, DType, Tensor};
use serde_json::Value;

use crate::data::conversations::for_each_json_line;
use crate::engine::{self, EngineConfig, Request};
use crate::model::Gpt;
use crate::tokenizer::{self, Tokenizer};

/// One multiple-choice question.
#[derive(Debug, Clone)]
pub struct McQuestion {
    pub subject: String,
    pub question: String,
    pub choices: Vec<String>,
    pub answer: usize,
}

pub fn read_mmlu(path: &Path, limit: Option<usize>) -> Result<Vec<McQuestion>> {
    let mut out = vec![];
    for_each_json_line(path, |_, v| {
        if limit.is_some_and(|l| out.len() >= l) {
            return Ok(());
        }
        let s = |k: &str| {
            v[k].as_str()
                .map(str::to_string)
                .with_context(|| format!("missing string field {k:?}"))
        };
        let choices: Vec<String> = v["choices"]
            .as_array()
            .context("missing \"choices\" list")?
            .iter()
            .map(|c| c.as_str().map(str::to_string).context("choices must be strings"))
            .collect::<Result<_>>()?;
        ensure!(choices.len() == 4, "expected 4 choices, got {}", choices.len());
        let answer = v["answer"].as_u64().context("\"answer\" must be an index 0-3")? as usize;
        ensure!(answer < 4, "\"answer\" must be an index 0-3, got {answer}");
        out.push(McQuestion {
            subject: s("subject")?,
            question: s("question")?,
            choices,
            answer,
        });
        Ok(())
    })?;
    Ok(out)
}

const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

fn format_mc(q: &McQuestion, with_answer: bool) -> String {
    let mut s = format!("{}\n", q.question);
    for (l, c) in LETTERS.iter().zip(&q.choices) {
        s.push_str(&format!("{l}. {c}\n"));
    }
    s.push_str("Answer:");
    if with_answer {
        s.push_str(&format!(" {}\n\n", LETTERS[q.answer]));
    }
    s
}

/// The log-probability of each continuation after `prompt` (the sum over its tokens). Continuations of
/// one token each are read from a single forward pass of the prompt.
pub fn continuation_logprobs(model: &Gpt, prompt: &[u32], continuations: &[Vec<u32>]) -> Result<Vec<f64>> {
    ensure!(!prompt.is_empty(), "an empty prompt has no next token to score");
    ensure!(continuations.iter().all(|c| !c.is_empty()), "an empty continuation");
    let logprobs = |ids: &[u32]| -> Result<Vec<Vec<f32>>> {
        let logits = model.forward(&Tensor::new(ids, model.device())?.unsqueeze(0)?)?;
        let lp = candle_nn::ops::log_softmax(&logits.squeeze(0)?.to_dtype(DType::F32)?, D::Minus1)?;
        Ok(lp.to_vec2::<f32>()?)
    };
    if continuations.iter().all(|c| c.len() == 1) {
        let rows = logprobs(prompt)?;
        let last = &rows[rows.len() - 1];
        return Ok(continuations.iter().map(|c| f64::from(last[c[0] as usize])).collect());
    }
    continuations
        .iter()
        .map(|c| {
            let mut ids = prompt.to_vec();
            ids.extend(&c[..c.len() - 1]);
            let rows = logprobs(&ids)?;
            Ok(c.iter()
                .enumerate()
                .map(|(i, &t)| f64::from(rows[prompt.len() - 1 + i][t as usize]))
                .sum())
        })
        .collect()
}

/// Few-shot multiple-choice accuracy: the answer is the letter whose continuation (" A" to " D") the model
/// finds most likely.
pub fn mmlu_accuracy(
    model: &Gpt,
    tok: &Tokenizer,
    test: &[McQuestion],
    dev: &[McQuestion],
    shots: usize,
) -> Result<f64> {
    let letters: Vec<Vec<u32>> = LETTERS
        .iter()
        .map(|l| tok.encode(&format!(" {l}")))
        .collect::<Result<_>>()?;
    let longest = letters.iter().map(Vec::len).max().unwrap_or(1);
    let ctx = model.config().n_positions;
    let mut correct = 0;
    for q in test {
        let mut prompt = format!(
            "The following are multiple choice questions (with answers) about {}.\n\n",
            q.subject.replace('_', " ")
        );
        for d in dev.iter().filter(|d| d.subject == q.subject).take(shots) {
            prompt.push_str(&format_mc(d, true));
        }
        prompt.push_str(&format_mc(q, false));
        let mut ids = tok.encode(&prompt)?;
        // The question and the nearest examples.
        tokenizer::keep_last(&mut ids, ctx.saturating_sub(longest - 1).max(1));
        let scores = continuation_logprobs(model, &ids, &letters)?;
        // The first of equal scores: a tie is never resolved towards one letter by position.
        let best = (0..4).fold(0, |b, i| if scores[i] > scores[b] { i } else { b });
        correct += usize::from(best == q.answer);
    }
    Ok(correct as f64 / test.len().max(1) as f64)
}

/// One maths word problem and its final answer.
#[derive(Debug, Clone)]
pub struct MathProblem {
    pub question: String,
    pub solution: String,
    pub answer: String,
}

/// The number after `####`, without thousands separators.
pub fn final_answer(solution: &str) -> Option<String> {
    let after = solution.rsplit("####").next()?;
    let cleaned: String = after.trim().chars().filter(|c| *c != ',' && *c != '$').collect();
    let num: String = cleaned
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '-' || *c == '.')
        .collect();
    (!num.is_empty()).then_some(num)
}

pub fn read_gsm8k(path: &Path, limit: Option<usize>) -> Result<Vec<MathProblem>> {
    let mut out = vec![];
    for_each_json_line(path, |_, v: Value| {
        if limit.is_some_and(|l| out.len() >= l) {
            return Ok(());
        }
        let question = v["question"]
            .as_str()
            .context("missing string field \"question\"")?
            .to_string();
        let solution = v["answer"]
            .as_str()
            .context("missing string field \"answer\"")?
            .to_string();
        let answer = final_answer(&solution).context("the answer has no final \"#### number\"")?;
        out.push(MathProblem {
            question,
            solution,
            answer,
        });
        Ok(())
    })?;
    Ok(out)
}

/// Few-shot exact match of the final number, greedy decoding.
pub fn gsm8k_accuracy(
    model: &Gpt,
    tok: &Tokenizer,
    test: &[MathProblem],
    train: &[MathProblem],
    shots: usize,
    max_new: usize,
) -> Result<f64> {
    let ctx = model.config().n_positions;
    let mut prefix = String::new();
    for p in train.iter().take(shots) {
        prefix.push_str(&format!("Question: {}\nAnswer: {}\n\n", p.question, p.solution));
    }
    let eot: Vec<u32> = tok.special_id(crate::tokenizer::EOT).into_iter().collect();
    let requests = test
        .iter()
        .map(|p| {
            let mut ids = tok.encode(&format!("{prefix}Question: {}\nAnswer:", p.question))?;
            tokenizer::keep_last(&mut ids, ctx.saturating_sub(max_new).max(1));
            let mut r = Request::greedy(ids, max_new, eot.clone());
            // The solution ends where the next few-shot example would begin.
            r.stop_strings = vec!["\n\n".into()];
            Ok(r)
        })
        .collect::<Result<Vec<_>>>()?;
    let done = engine::generate_batch(model, Some(tok), requests, EngineConfig::default(), |_| {})?;
    let mut correct = 0;
    for (p, c) in test.iter().zip(done) {
        let text = &c[0].text;
        let got = final_answer(text).or_else(|| {
            text.split(|c: char| !(c.is_ascii_digit() || c == '-' || c == '.'))
                .rfind(|t| t.chars().any(|c| c.is_ascii_digit()))
                .map(str::to_string)
        });
        correct += usize::from(got.as_deref() == Some(p.answer.as_str()));
    }
    Ok(correct as f64 / test.len().max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_answers_are_parsed() {
        assert_eq!(final_answer("so 3 + 4 = 7\n#### 7").as_deref(), Some("7"));
        assert_eq!(final_answer("#### 1,250").as_deref(), Some("1250"));
        assert_eq!(final_answer("#### -3.5 dollars").as_deref(), Some("-3.5"));
        assert_eq!(final_answer("no marker, just 12"), None);
    }
}
