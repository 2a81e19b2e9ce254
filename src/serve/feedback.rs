//! Human feedback: parsing the four kinds the page collects, storing them in SQLite, and
//! exporting them as training files.
//!
//! Schema: `feedback(id, kind, created_at, prompt, rating, model, digest)` holds one judgement,
//! its prompt as a JSON messages array, and the served model's name and the SHA-256 of its
//! weights (which model produced the answers judged); `answers(feedback_id, rank, content)`
//! holds its answers, best first. A judgement and its answers are written in one transaction.
//! Databases written before `model` and `digest` existed gain the columns (empty) when opened.
//!
//! Export (`talaria feedback export`):
//! - SFT file (`{"messages": [...]}` per line, what `talaria sft` reads): every demonstration,
//!   i.e. the prompt followed by the human-written answer.
//! - Preferences file (what the reward stage reads): every comparison as a pair
//!   `{"prompt", "chosen", "rejected"}`, every ranking as `{"prompt", "ranked"}` (best first),
//!   and thumbs turned into pairs: for each prompt, each answer's ratings are summed; every
//!   answer with a positive sum is paired as chosen against every answer with a negative sum.
//!   Thumbs on a prompt with no answer on the other side (or with cancelling ratings) make no
//!   pair and are counted as unpaired.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, params};
use serde_json::{Map, Value, json};

use super::openai::{ApiError, parse_messages, required_str};
use crate::chat::{Message, Role};

/// One human judgement.
#[derive(Debug, Clone, PartialEq)]
pub enum Feedback {
    /// A conversation whose last (assistant) message a person wrote as the ideal answer.
    Demonstration { messages: Vec<Message> },
    /// Of two answers to `prompt`, `chosen` was judged better than `rejected`.
    Comparison {
        prompt: Vec<Message>,
        chosen: String,
        rejected: String,
    },
    /// Answers to `prompt` ordered best first.
    Ranking { prompt: Vec<Message>, ranked: Vec<String> },
    /// A thumbs up (`up`) or down on one answer.
    Thumbs {
        prompt: Vec<Message>,
        answer: String,
        up: bool,
    },
}

/// The model that produced the answers of a judgement: its name in the API and the SHA-256 of
/// its weights file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Source {
    pub model: String,
    pub digest: String,
}

/// Which judgements an export takes: those of this model name and/or weights digest (a digest
/// may be given by a prefix of at least 8 hex digits, as `git` does).
#[derive(Debug, Clone, Default)]
pub struct SourceFilter {
    pub model: Option<String>,
    pub digest: Option<String>,
}

impl SourceFilter {
    fn accepts(&self, model: Option<&str>, digest: Option<&str>) -> bool {
        self.model.as_deref().is_none_or(|m| model == Some(m))
            && self
                .digest
                .as_deref()
                .is_none_or(|d| digest.is_some_and(|x| x.starts_with(&d.to_ascii_lowercase())))
    }
}

/// Most answers one ranking may order.
pub const MAX_RANKED: usize = 16;

impl Feedback {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Demonstration { .. } => "demonstration",
            Self::Comparison { .. } => "comparison",
            Self::Ranking { .. } => "ranking",
            Self::Thumbs { .. } => "thumbs",
        }
    }

    /// Parses and validates the body of `POST /v1/feedback`.
    pub fn from_json(obj: &Map<String, Value>) -> Result<Self, ApiError> {
        let prompt = || -> Result<Vec<Message>, ApiError> {
            let raw = obj
                .get("prompt")
                .ok_or_else(|| ApiError::invalid("prompt", "missing required field \"prompt\""))?;
            let msgs = parse_messages(raw, "prompt")?;
            if msgs.last().map(|m| m.role) != Some(Role::User) {
                return Err(ApiError::invalid("prompt", "the prompt must end with a user message"));
            }
            Ok(msgs)
        };
        let answer = |key: &str| -> Result<String, ApiError> {
            let s = required_str(obj, key)?;
            if s.trim().is_empty() {
                return Err(ApiError::invalid(key, format!("{key} must not be empty")));
            }
            Ok(s.to_string())
        };
        match required_str(obj, "kind")? {
            "demonstration" => {
                let raw = obj
                    .get("messages")
                    .ok_or_else(|| ApiError::invalid("messages", "missing required field \"messages\""))?;
                let messages = parse_messages(raw, "messages")?;
                match messages.last() {
                    Some(m) if m.role == Role::Assistant && !m.content.trim().is_empty() => {}
                    _ => {
                        return Err(ApiError::invalid(
                            "messages",
                            "a demonstration must end with a non-empty assistant message (the ideal answer)",
                        ));
                    }
                }
                Ok(Self::Demonstration { messages })
            }
            "comparison" => {
                let (prompt, chosen, rejected) = (prompt()?, answer("chosen")?, answer("rejected")?);
                if chosen == rejected {
                    return Err(ApiError::invalid("rejected", "chosen and rejected are the same text"));
                }
                Ok(Self::Comparison {
                    prompt,
                    chosen,
                    rejected,
                })
            }
            "ranking" => {
                let prompt = prompt()?;
                let ranked: Vec<String> = match obj.get("ranked") {
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|v| match v.as_str() {
                            Some(s) if !s.trim().is_empty() => Ok(s.to_string()),
                            _ => Err(ApiError::invalid("ranked", "ranked answers must be non-empty strings")),
                        })
                        .collect::<Result<_, _>>()?,
                    Some(_) => {
                        return Err(ApiError::invalid(
                            "ranked",
                            "ranked must be an array of answers, best first",
                        ));
                    }
                    None => return Err(ApiError::invalid("ranked", "missing required field \"ranked\"")),
                };
                if !(2..=MAX_RANKED).contains(&ranked.len()) {
                    return Err(ApiError::invalid(
                        "ranked",
                        format!("rank between 2 and {MAX_RANKED} answers, got {}", ranked.len()),
                    ));
                }
                let mut distinct = ranked.clone();
                distinct.sort();
                distinct.dedup();
                if distinct.len() != ranked.len() {
                    return Err(ApiError::invalid("ranked", "ranked answers must all differ"));
                }
                Ok(Self::Ranking { prompt, ranked })
            }
            "thumbs" => {
                let (prompt, answer) = (prompt()?, answer("answer")?);
                let up = match required_str(obj, "rating")? {
                    "up" => true,
                    "down" => false,
                    other => {
                        return Err(ApiError::invalid(
                            "rating",
                            format!("rating must be \"up\" or \"down\", got {other:?}"),
                        ));
                    }
                };
                Ok(Self::Thumbs { prompt, answer, up })
            }
            other => Err(ApiError::invalid(
                "kind",
                format!("unknown feedback kind {other:?} (expected demonstration, comparison, ranking or thumbs)"),
            )),
        }
    }

    /// The prompt, the answers best first, and the rating, as stored.
    fn parts(&self) -> (&[Message], Vec<&str>, Option<i64>) {
        match self {
            Self::Demonstration { messages } => {
                let (last, prompt) = messages.split_last().expect("validated: ends with an answer");
                (prompt, vec![last.content.as_str()], None)
            }
            Self::Comparison {
                prompt,
                chosen,
                rejected,
            } => (prompt.as_slice(), vec![chosen.as_str(), rejected.as_str()], None),
            Self::Ranking { prompt, ranked } => (prompt.as_slice(), ranked.iter().map(String::as_str).collect(), None),
            Self::Thumbs { prompt, answer, up } => {
                (prompt.as_slice(), vec![answer.as_str()], Some(if *up { 1 } else { -1 }))
            }
        }
    }

    fn from_parts(kind: &str, prompt: Vec<Message>, mut answers: Vec<String>, rating: Option<i64>) -> Result<Self> {
        let n = answers.len();
        Ok(match (kind, n) {
            ("demonstration", 1) => {
                let mut messages = prompt;
                messages.push(Message::new(Role::Assistant, answers.remove(0)));
                Self::Demonstration { messages }
            }
            ("comparison", 2) => Self::Comparison {
                prompt,
                rejected: answers.pop().unwrap_or_default(),
                chosen: answers.pop().unwrap_or_default(),
            },
            ("ranking", 2..) => Self::Ranking {
                prompt,
                ranked: answers,
            },
            ("thumbs", 1) => Self::Thumbs {
                prompt,
                answer: answers.remove(0),
                up: rating.context("a thumbs record without a rating")? > 0,
            },
            _ => bail!("a {kind:?} record with {n} answers"),
        })
    }
}

/// The feedback database (one SQLite file).
pub struct FeedbackStore {
    conn: Mutex<Connection>,
}

impl FeedbackStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let conn =
            Connection::open(path).with_context(|| format!("opening the feedback database {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA foreign_keys = ON;
             CREATE TABLE IF NOT EXISTS feedback (
                 id INTEGER PRIMARY KEY,
                 kind TEXT NOT NULL CHECK (kind IN ('demonstration', 'comparison', 'ranking', 'thumbs')),
                 created_at INTEGER NOT NULL,
                 prompt TEXT NOT NULL,
                 rating INTEGER CHECK (rating IN (-1, 1))
             );
             CREATE TABLE IF NOT EXISTS answers (
                 feedback_id INTEGER NOT NULL REFERENCES feedback(id) ON DELETE CASCADE,
                 rank INTEGER NOT NULL,
                 content TEXT NOT NULL,
                 PRIMARY KEY (feedback_id, rank)
             );",
        )
        .with_context(|| format!("setting up the feedback database {}", path.display()))?;
        let columns: Vec<String> = conn
            .prepare("SELECT name FROM pragma_table_info('feedback')")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        for column in ["model", "digest"] {
            if !columns.iter().any(|c| c == column) {
                conn.execute_batch(&format!("ALTER TABLE feedback ADD COLUMN {column} TEXT"))
                    .with_context(|| format!("adding the {column} column to {}", path.display()))?;
            }
        }
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-written judgement (transactions),
        // so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores one judgement with its answers, and the model they came from, in a single
    /// transaction; returns its id.
    pub fn insert(&self, f: &Feedback, source: Option<&Source>) -> Result<i64> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let (prompt, answers, rating) = f.parts();
        tx.execute(
            "INSERT INTO feedback (kind, created_at, prompt, rating, model, digest) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                f.kind(),
                super::openai::now() as i64,
                serde_json::to_string(prompt)?,
                rating,
                source.map(|s| s.model.as_str()),
                source.map(|s| s.digest.as_str()),
            ],
        )?;
        let id = tx.last_insert_rowid();
        for (rank, a) in answers.iter().enumerate() {
            tx.execute(
                "INSERT INTO answers (feedback_id, rank, content) VALUES (?1, ?2, ?3)",
                params![id, rank as i64, a],
            )?;
        }
        tx.commit()?;
        Ok(id)
    }

    /// Every judgement with its id, oldest first, read in one transaction (a consistent snapshot).
    pub fn all(&self) -> Result<Vec<(i64, Feedback)>> {
        Ok(self
            .matching(&SourceFilter::default())?
            .into_iter()
            .map(|(id, f, _)| (id, f))
            .collect())
    }

    /// The judgements `filter` accepts, with their source, oldest first (one transaction).
    pub fn matching(&self, filter: &SourceFilter) -> Result<Vec<(i64, Feedback, Option<Source>)>> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        type Row = (i64, String, String, Option<i64>, Option<String>, Option<String>);
        let rows: Vec<Row> = tx
            .prepare("SELECT id, kind, prompt, rating, model, digest FROM feedback ORDER BY id")?
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
            })?
            .collect::<rusqlite::Result<Vec<Row>>>()?
            .into_iter()
            .filter(|(_, _, _, _, model, digest)| filter.accepts(model.as_deref(), digest.as_deref()))
            .collect();
        let mut answers: BTreeMap<i64, Vec<String>> = BTreeMap::new();
        let mut stmt = tx.prepare("SELECT feedback_id, content FROM answers ORDER BY feedback_id, rank")?;
        for row in stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))? {
            let (id, content) = row?;
            answers.entry(id).or_default().push(content);
        }
        drop(stmt);
        tx.commit()?;
        rows.into_iter()
            .map(|(id, kind, prompt, rating, model, digest)| {
                let prompt: Vec<Message> =
                    serde_json::from_str(&prompt).with_context(|| format!("feedback {id}: invalid prompt JSON"))?;
                let f = Feedback::from_parts(&kind, prompt, answers.remove(&id).unwrap_or_default(), rating)
                    .with_context(|| format!("feedback {id}"))?;
                let source = match (model, digest) {
                    (Some(model), Some(digest)) => Some(Source { model, digest }),
                    _ => None,
                };
                Ok((id, f, source))
            })
            .collect()
    }
}

/// The thumbs given on one prompt: each answer's summed rating and the number of records.
struct ThumbsGroup {
    prompt: Vec<Message>,
    scores: BTreeMap<String, i64>,
    records: usize,
}

/// What an export wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    pub demonstrations: usize,
    pub comparisons: usize,
    pub rankings: usize,
    /// Pairs made from thumbs up/down on the same prompt.
    pub thumbs_pairs: usize,
    /// Thumbs records that made no pair.
    pub thumbs_unpaired: usize,
}

/// Writes the training files of the judgements in the database at `db` that `filter` accepts
/// (see the module docs for the formats). Each file is written to a temporary name and renamed,
/// so a failed export leaves none half-written.
pub fn export(db: &Path, sft: Option<&Path>, prefs: Option<&Path>, filter: &SourceFilter) -> Result<ExportSummary> {
    if sft.is_none() && prefs.is_none() {
        bail!("nothing to export: give --sft FILE, --prefs FILE or both");
    }
    if !db.exists() {
        bail!("the feedback database {} does not exist", db.display());
    }
    if let Some(d) = &filter.digest
        && (d.len() < 8 || !d.chars().all(|c| c.is_ascii_hexdigit()))
    {
        bail!("--digest {d:?}: give at least 8 hex digits of the weights' SHA-256");
    }
    let records = FeedbackStore::open(db)?.matching(filter)?;
    let mut summary = ExportSummary::default();
    let mut sft_lines = vec![];
    let mut pref_lines = vec![];
    // Thumbs grouped by prompt (keyed by its JSON).
    let mut thumbs: BTreeMap<String, ThumbsGroup> = BTreeMap::new();
    for (_, f, _) in records {
        match f {
            Feedback::Demonstration { messages } => {
                summary.demonstrations += 1;
                sft_lines.push(json!({ "messages": messages }));
            }
            Feedback::Comparison {
                prompt,
                chosen,
                rejected,
            } => {
                summary.comparisons += 1;
                pref_lines.push(json!({ "prompt": prompt, "chosen": chosen, "rejected": rejected }));
            }
            Feedback::Ranking { prompt, ranked } => {
                summary.rankings += 1;
                pref_lines.push(json!({ "prompt": prompt, "ranked": ranked }));
            }
            Feedback::Thumbs { prompt, answer, up } => {
                let key = serde_json::to_string(&prompt)?;
                let group = thumbs.entry(key).or_insert_with(|| ThumbsGroup {
                    prompt,
                    scores: BTreeMap::new(),
                    records: 0,
                });
                *group.scores.entry(answer).or_default() += if up { 1 } else { -1 };
                group.records += 1;
            }
        }
    }
    for ThumbsGroup {
        prompt,
        scores,
        records,
    } in thumbs.into_values()
    {
        let good: Vec<&String> = scores.iter().filter(|(_, s)| **s > 0).map(|(a, _)| a).collect();
        let bad: Vec<&String> = scores.iter().filter(|(_, s)| **s < 0).map(|(a, _)| a).collect();
        if good.is_empty() || bad.is_empty() {
            summary.thumbs_unpaired += records;
            continue;
        }
        for chosen in &good {
            for rejected in &bad {
                summary.thumbs_pairs += 1;
                pref_lines.push(json!({ "prompt": prompt, "chosen": chosen, "rejected": rejected }));
            }
        }
    }
    if let Some(path) = sft {
        write_jsonl(path, &sft_lines)?;
    }
    if let Some(path) = prefs {
        write_jsonl(path, &pref_lines)?;
    }
    Ok(summary)
}

fn write_jsonl(path: &Path, lines: &[Value]) -> Result<()> {
    let tmp = path.with_extension("jsonl.tmp");
    let mut f =
        std::io::BufWriter::new(std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?);
    for l in lines {
        writeln!(f, "{l}")?;
    }
    f.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thumbs(prompt: &str, answer: &str, up: bool) -> Feedback {
        Feedback::Thumbs {
            prompt: vec![Message::new(Role::User, prompt)],
            answer: answer.into(),
            up,
        }
    }

    #[test]
    fn thumbs_pair_by_prompt_with_ratings_summed_per_answer() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("f.sqlite");
        let store = FeedbackStore::open(&db).unwrap();
        for f in [
            thumbs("p", "good", true),
            thumbs("p", "good", true),
            thumbs("p", "good", false), // net +1: still chosen
            thumbs("p", "bad", false),
            thumbs("p", "torn", true),
            thumbs("p", "torn", false), // net 0: left out
            thumbs("q", "only up", true),
            thumbs("r", "x", true),
            thumbs("r", "x", false), // cancels: no pair
        ] {
            store.insert(&f, None).unwrap();
        }
        let prefs = dir.path().join("prefs.jsonl");
        let s = export(&db, None, Some(&prefs), &SourceFilter::default()).unwrap();
        assert_eq!((s.thumbs_pairs, s.thumbs_unpaired), (1, 3));
        let text = std::fs::read_to_string(&prefs).unwrap();
        let line: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["chosen"], "good");
        assert_eq!(line["rejected"], "bad");
        assert_eq!(line["prompt"][0]["content"], "p");
    }

    #[test]
    fn every_kind_reads_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = FeedbackStore::open(&dir.path().join("f.sqlite")).unwrap();
        let prompt = vec![Message::new(Role::System, "s"), Message::new(Role::User, "u")];
        let all = vec![
            Feedback::Demonstration {
                messages: vec![Message::new(Role::User, "u"), Message::new(Role::Assistant, "a")],
            },
            Feedback::Comparison {
                prompt: prompt.clone(),
                chosen: "c".into(),
                rejected: "r".into(),
            },
            Feedback::Ranking {
                prompt: prompt.clone(),
                ranked: vec!["1".into(), "2".into(), "3".into()],
            },
            thumbs("u", "a", false),
        ];
        for f in &all {
            store.insert(f, None).unwrap();
        }
        let back: Vec<Feedback> = store.all().unwrap().into_iter().map(|(_, f)| f).collect();
        assert_eq!(back, all);
    }

    #[test]
    fn exports_filter_by_model_and_digest_and_old_databases_gain_the_columns() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("f.sqlite");
        // A database from before the source columns, with one judgement in it.
        let old = Connection::open(&db).unwrap();
        old.execute_batch(
            "CREATE TABLE feedback (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, created_at INTEGER NOT NULL,
                                    prompt TEXT NOT NULL, rating INTEGER);
             CREATE TABLE answers (feedback_id INTEGER NOT NULL, rank INTEGER NOT NULL, content TEXT NOT NULL,
                                   PRIMARY KEY (feedback_id, rank));
             INSERT INTO feedback VALUES (1, 'comparison', 0, '[{\"role\":\"user\",\"content\":\"old\"}]', NULL);
             INSERT INTO answers VALUES (1, 0, 'a'), (1, 1, 'b');",
        )
        .unwrap();
        drop(old);
        let store = FeedbackStore::open(&db).unwrap();
        let pair = |p: &str| Feedback::Comparison {
            prompt: vec![Message::new(Role::User, p)],
            chosen: "c".into(),
            rejected: "r".into(),
        };
        let a = Source {
            model: "sft".into(),
            digest: "0123456789abcdef".into(),
        };
        let b = Source {
            model: "ppo".into(),
            digest: "fedcba9876543210".into(),
        };
        store.insert(&pair("from sft"), Some(&a)).unwrap();
        store.insert(&pair("from ppo"), Some(&b)).unwrap();
        let prefs = dir.path().join("prefs.jsonl");
        let count = |filter: SourceFilter| export(&db, None, Some(&prefs), &filter).unwrap().comparisons;
        assert_eq!(count(SourceFilter::default()), 3);
        let by_model = SourceFilter {
            model: Some("ppo".into()),
            digest: None,
        };
        assert_eq!(count(by_model), 1);
        assert!(std::fs::read_to_string(&prefs).unwrap().contains("from ppo"));
        let by_digest = SourceFilter {
            model: None,
            digest: Some("01234567".into()),
        };
        assert_eq!(count(by_digest), 1);
        assert!(std::fs::read_to_string(&prefs).unwrap().contains("from sft"));
        let stored = store.matching(&SourceFilter::default()).unwrap();
        assert_eq!(stored[0].2, None, "the old judgement has no source");
        assert_eq!(stored[2].2.as_ref(), Some(&b));
        let short = SourceFilter {
            model: None,
            digest: Some("0123".into()),
        };
        let e = export(&db, None, Some(&prefs), &short).unwrap_err().to_string();
        assert!(e.contains("at least 8 hex digits"), "{e}");
    }
}
