//! Prompts for RLHF and evaluation: `{"messages": [...], "answer"?: "...", "skill"?: "..."}`
//! (the default world's format, with the reference answer for the verifier), `{"prompt":
//! "text"}`, or a bare JSON string per line (OpenAssistant's prompt lottery).

use std::path::Path;

use anyhow::{Result, bail, ensure};
use serde_json::Value;

use crate::chat::{Message, Role};
use crate::data::conversations::{for_each_json_line, parse_messages};

/// A prompt to answer, with its reference answer and skill when known.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRecord {
    /// The conversation so far, ending with a user message.
    pub messages: Vec<Message>,
    pub answer: Option<String>,
    pub skill: Option<String>,
}

/// Reads a prompts file; malformed lines are errors naming the file and line.
pub fn read_prompts(path: &Path) -> Result<Vec<PromptRecord>> {
    let mut out = vec![];
    for_each_json_line(path, |_, v| {
        let text = |v: &Value, k: &str| -> Result<Option<String>> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => bail!("field {k:?} must be a string, got {other}"),
            }
        };
        let messages = match &v {
            Value::String(s) => vec![Message::new(Role::User, s.clone())],
            Value::Object(o) if o.contains_key("messages") => parse_messages(&v["messages"])?,
            Value::Object(o) if o.contains_key("prompt") => match &v["prompt"] {
                Value::String(s) => vec![Message::new(Role::User, s.clone())],
                p => parse_messages(p)?,
            },
            _ => bail!("expected {{\"messages\": [...]}}, {{\"prompt\": ...}} or a JSON string"),
        };
        ensure!(
            messages.last().is_some_and(|m| m.role == Role::User),
            "a prompt must end with a user message"
        );
        ensure!(
            messages.last().is_some_and(|m| !m.content.trim().is_empty()),
            "the prompt's last message is empty"
        );
        out.push(PromptRecord {
            messages,
            answer: text(&v, "answer")?,
            skill: text(&v, "skill")?,
        });
        Ok(())
    })?;
    ensure!(!out.is_empty(), "{}: no prompts", path.display());
    Ok(out)
}
