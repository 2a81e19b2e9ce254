//! Readers for human demonstrations, all turned into conversations (lists of messages):
//! OpenAI-style `{"messages": [...]}`, Alpaca `{instruction, input, output}`, self-instruct tasks
//! `{instruction, instances: [{input, output}]}`, and OpenAssistant message trees (the best-ranked
//! reply at each turn; deleted or synthetic messages are skipped). The format is detected per
//! line; anything malformed is an error naming the file and line.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::chat::{self, Message, Role};

/// The conversations of a file and what was left out, with reasons.
#[derive(Debug, Default)]
pub struct Conversations {
    pub conversations: Vec<Vec<Message>>,
    /// `(line, reason)` of every record (or part of one) that was skipped on purpose.
    pub skipped: Vec<(usize, String)>,
}

/// Opens a text file, transparently decompressing `.gz`.
pub fn open_text(path: &Path) -> Result<Box<dyn BufRead>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(f))
    } else {
        Box::new(f)
    };
    Ok(Box::new(BufReader::new(reader)))
}

/// Calls `f(line_number, json)` for every non-empty line of a JSONL file.
pub fn for_each_json_line(path: &Path, mut f: impl FnMut(usize, Value) -> Result<()>) -> Result<()> {
    for (i, line) in open_text(path)?.lines().enumerate() {
        let n = i + 1;
        let line = line.with_context(|| format!("{}:{n}: not valid UTF-8 text", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(&line).with_context(|| format!("{}:{n}: not valid JSON", path.display()))?;
        f(n, v).with_context(|| format!("{}:{n}", path.display()))?;
    }
    Ok(())
}

fn str_field<'a>(v: &'a Value, key: &str) -> Result<&'a str> {
    match v.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => bail!("field {key:?} must be a string, got {other}"),
        None => bail!("missing field {key:?}"),
    }
}

/// Parses an OpenAI-style `messages` array.
pub fn parse_messages(v: &Value) -> Result<Vec<Message>> {
    let arr = v.as_array().context("\"messages\" must be an array")?;
    let msgs = arr
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = Role::parse(str_field(m, "role").with_context(|| format!("message {}", i + 1))?)
                .with_context(|| format!("message {}", i + 1))?;
            Ok(Message::new(
                role,
                str_field(m, "content").with_context(|| format!("message {}", i + 1))?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    chat::validate(&msgs)?;
    Ok(msgs)
}

fn exchange(user: String, answer: &str) -> Vec<Message> {
    vec![Message::new(Role::User, user), Message::new(Role::Assistant, answer)]
}

fn instruction_with_input(instruction: &str, input: &str) -> String {
    if input.trim().is_empty() {
        instruction.to_string()
    } else {
        format!("{instruction}\n\n{input}")
    }
}

/// The OpenAssistant path of best-ranked, human-written, non-deleted replies from the root.
fn oasst_path(root: &Value, line: usize, skipped: &mut Vec<(usize, String)>) -> Result<Vec<Message>> {
    let usable = |m: &Value| !m["deleted"].as_bool().unwrap_or(false) && !m["synthetic"].as_bool().unwrap_or(false);
    let mut msgs = vec![];
    let mut node = root;
    if !usable(node) {
        skipped.push((line, "OpenAssistant tree whose prompt is deleted or synthetic".into()));
        return Ok(msgs);
    }
    loop {
        let role = match str_field(node, "role")? {
            "prompter" => Role::User,
            "assistant" => Role::Assistant,
            other => bail!("OpenAssistant message with unknown role {other:?}"),
        };
        msgs.push(Message::new(role, str_field(node, "text")?));
        let replies = node["replies"].as_array().map(Vec::as_slice).unwrap_or_default();
        let dropped = replies.iter().filter(|r| !usable(r)).count();
        if dropped > 0 {
            skipped.push((line, format!("{dropped} deleted or synthetic OpenAssistant replies")));
        }
        let best = replies
            .iter()
            .filter(|r| usable(r))
            .min_by_key(|r| r["rank"].as_u64().unwrap_or(u64::MAX));
        match best {
            Some(b) => node = b,
            None => break,
        }
    }
    if msgs.last().is_some_and(|m| m.role == Role::User) {
        msgs.pop();
    }
    Ok(msgs)
}

/// Reads every conversation of a demonstrations file.
pub fn read_conversations(path: &Path) -> Result<Conversations> {
    let mut out = Conversations::default();
    for_each_json_line(path, |line, v| {
        let mut found = vec![];
        if let Some(m) = v.get("messages") {
            found.push(parse_messages(m)?);
        } else if v.get("message_tree_id").is_some() || v.get("prompt").is_some_and(|p| p.get("replies").is_some()) {
            let msgs = oasst_path(&v["prompt"], line, &mut out.skipped)?;
            if msgs.len() >= 2 {
                found.push(msgs);
            } else {
                out.skipped
                    .push((line, "OpenAssistant tree without a usable assistant reply".into()));
            }
        } else if let Some(instances) = v.get("instances") {
            let instruction = str_field(&v, "instruction")?;
            let instances = instances.as_array().context("\"instances\" must be an array")?;
            ensure!(!instances.is_empty(), "\"instances\" is empty");
            for inst in instances {
                let output = str_field(inst, "output")?;
                found.push(exchange(
                    instruction_with_input(instruction, str_field(inst, "input")?),
                    output,
                ));
            }
        } else if v.get("instruction").is_some() {
            let input = v.get("input").and_then(Value::as_str).unwrap_or("");
            found.push(exchange(
                instruction_with_input(str_field(&v, "instruction")?, input),
                str_field(&v, "output")?,
            ));
        } else {
            bail!(
                "unrecognised record: expected \"messages\", Alpaca {{instruction, input, output}}, self-instruct {{instruction, instances}} or an OpenAssistant tree"
            );
        }
        for c in &found {
            ensure!(
                !c.iter()
                    .any(|m| m.role == Role::Assistant && m.content.trim().is_empty()),
                "an assistant answer is empty"
            );
        }
        out.conversations.extend(found);
        Ok(())
    })?;
    Ok(out)
}
