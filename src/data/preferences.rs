//! Readers for human preferences, all turned into groups of answers to one prompt, ranked best
//! first: pairs `{prompt, chosen, rejected}`, K-way `{prompt, ranked: [...]}`, Anthropic HH-RLHF
//! transcripts (`\n\nHuman: ... \n\nAssistant: ...`), and the ranked replies of OpenAssistant
//! trees. A group of K answers yields all K(K-1)/2 ordered pairs, kept together in one batch.

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::chat::{Message, Role};
use crate::data::conversations::{for_each_json_line, parse_messages};

/// Answers to one prompt, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceGroup {
    /// The conversation so far, ending with a user message.
    pub prompt: Vec<Message>,
    pub ranked: Vec<String>,
}

impl PreferenceGroup {
    /// Every (better, worse) pair of answer indices.
    pub fn pairs(&self) -> Vec<(usize, usize)> {
        let k = self.ranked.len();
        (0..k).flat_map(|i| (i + 1..k).map(move |j| (i, j))).collect()
    }
}

/// The groups of a file and what was skipped on purpose, with reasons.
#[derive(Debug, Default)]
pub struct Preferences {
    pub groups: Vec<PreferenceGroup>,
    pub skipped: Vec<(usize, String)>,
}

fn prompt_of(v: &Value) -> Result<Vec<Message>> {
    match v {
        Value::String(s) => Ok(vec![Message::new(Role::User, s.clone())]),
        Value::Array(_) => {
            let m = parse_messages(v)?;
            ensure!(
                m.last().is_some_and(|m| m.role == Role::User),
                "\"prompt\" must end with a user message"
            );
            Ok(m)
        }
        _ => bail!("\"prompt\" must be a string or a list of messages"),
    }
}

/// Splits an HH-RLHF transcript into messages.
pub fn parse_hh_transcript(text: &str) -> Result<Vec<Message>> {
    let mut msgs: Vec<Message> = vec![];
    let mut rest = text;
    loop {
        let next_h = rest.find("\n\nHuman:");
        let next_a = rest.find("\n\nAssistant:");
        let (at, role, tag) = match (next_h, next_a) {
            (Some(h), Some(a)) if h < a => (h, Role::User, "\n\nHuman:"),
            (Some(h), None) => (h, Role::User, "\n\nHuman:"),
            (_, Some(a)) => (a, Role::Assistant, "\n\nAssistant:"),
            (None, None) => break,
        };
        if let Some(last) = msgs.last_mut() {
            last.content.push_str(&rest[..at]);
        }
        msgs.push(Message::new(role, String::new()));
        rest = &rest[at + tag.len()..];
    }
    if let Some(last) = msgs.last_mut() {
        last.content.push_str(rest);
    }
    for m in &mut msgs {
        m.content = m.content.trim().to_string();
    }
    ensure!(
        !msgs.is_empty(),
        "not an HH-RLHF transcript (no \"Human:\" / \"Assistant:\" turns)"
    );
    Ok(msgs)
}

/// OpenAssistant: every prompter message with two or more ranked, human-written replies.
fn oasst_groups(node: &Value, history: &mut Vec<Message>, out: &mut Vec<PreferenceGroup>) -> Result<()> {
    let usable = |m: &Value| !m["deleted"].as_bool().unwrap_or(false) && !m["synthetic"].as_bool().unwrap_or(false);
    if !usable(node) {
        return Ok(());
    }
    let role = match node["role"].as_str() {
        Some("prompter") => Role::User,
        Some("assistant") => Role::Assistant,
        other => bail!("OpenAssistant message with unknown role {other:?}"),
    };
    let text = node["text"].as_str().context("OpenAssistant message without text")?;
    history.push(Message::new(role, text));
    let replies: Vec<&Value> = node["replies"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| usable(r))
        .collect();
    if role == Role::User {
        let mut ranked: Vec<(u64, &str)> = replies
            .iter()
            .filter_map(|r| Some((r["rank"].as_u64()?, r["text"].as_str()?)))
            .filter(|(_, t)| !t.trim().is_empty())
            .collect();
        ranked.sort_by_key(|(rank, _)| *rank);
        if ranked.len() >= 2 && crate::chat::validate(history).is_ok() {
            out.push(PreferenceGroup {
                prompt: history.clone(),
                ranked: ranked.iter().map(|(_, t)| t.to_string()).collect(),
            });
        }
    }
    for r in replies {
        oasst_groups(r, history, out)?;
    }
    history.pop();
    Ok(())
}

/// Reads every preference group of a file (`.jsonl` or `.jsonl.gz`). Groups with an empty
/// answer or identical answers are skipped and counted; malformed records are errors naming
/// the file and line.
pub fn read_preferences(path: &Path) -> Result<Preferences> {
    let mut out = Preferences::default();
    for_each_json_line(path, |line, v| {
        let mut groups = vec![];
        if let Some(ranked) = v.get("ranked") {
            let prompt = prompt_of(v.get("prompt").context("missing field \"prompt\"")?)?;
            let ranked: Vec<String> = ranked
                .as_array()
                .context("\"ranked\" must be a list of answers")?
                .iter()
                .map(|a| {
                    a.as_str()
                        .map(str::to_string)
                        .context("\"ranked\" answers must be strings")
                })
                .collect::<Result<_>>()?;
            ensure!(ranked.len() >= 2, "\"ranked\" needs at least two answers");
            groups.push(PreferenceGroup { prompt, ranked });
        } else if let (Some(c), Some(r)) = (v.get("chosen"), v.get("rejected")) {
            let (c, r) = (
                c.as_str().context("\"chosen\" must be a string")?,
                r.as_str().context("\"rejected\" must be a string")?,
            );
            match v.get("prompt") {
                Some(p) => groups.push(PreferenceGroup {
                    prompt: prompt_of(p)?,
                    ranked: vec![c.into(), r.into()],
                }),
                None => {
                    // HH-RLHF: two whole transcripts sharing everything but the last answer.
                    let (mut cm, mut rm) = (parse_hh_transcript(c)?, parse_hh_transcript(r)?);
                    let (Some(ca), Some(ra)) = (cm.pop(), rm.pop()) else {
                        bail!("empty transcript")
                    };
                    if ca.role != Role::Assistant || ra.role != Role::Assistant || cm != rm {
                        out.skipped.push((
                            line,
                            "HH-RLHF pair whose transcripts differ before the last answer".into(),
                        ));
                        return Ok(());
                    }
                    if let Err(e) = crate::chat::validate(&cm) {
                        out.skipped
                            .push((line, format!("HH-RLHF transcript with unusual turns: {e}")));
                        return Ok(());
                    }
                    groups.push(PreferenceGroup {
                        prompt: cm,
                        ranked: vec![ca.content, ra.content],
                    });
                }
            }
        } else if v.get("message_tree_id").is_some() || v.get("prompt").is_some_and(|p| p.get("replies").is_some()) {
            oasst_groups(&v["prompt"], &mut vec![], &mut groups)?;
        } else {
            bail!(
                "unrecognised record: expected {{prompt, chosen, rejected}}, {{prompt, ranked}}, an HH-RLHF {{chosen, rejected}} transcript pair or an OpenAssistant tree"
            );
        }
        for g in groups {
            if g.ranked.iter().any(|a| a.trim().is_empty()) {
                out.skipped.push((line, "an empty answer".into()));
            } else if (1..g.ranked.len()).any(|i| g.ranked[..i].contains(&g.ranked[i])) {
                out.skipped
                    .push((line, "identical answers ranked against each other".into()));
            } else {
                out.groups.push(g);
            }
        }
        Ok(())
    })?;
    Ok(out)
}
