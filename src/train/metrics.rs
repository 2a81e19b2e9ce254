//! `metrics.jsonl`: one JSON object per logged step, `stage`, `step`, `tokens` and plain-named
//! values (`loss`, `val_loss`, `val_bpb`, `lr`, `tokens_per_s`, ...). Every stage writes it and
//! the report reads it.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{Map, Value, json};

pub const METRICS_FILE: &str = "metrics.jsonl";

pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens `dir/metrics.jsonl` for appending, first dropping any records of `stage` past
    /// `keep_until_step` (records a resumed run will write again), so the log never holds a
    /// step twice.
    pub fn open(dir: &Path, stage: &str, keep_until_step: u64) -> Result<Self> {
        let path = dir.join(METRICS_FILE);
        if path.exists() {
            let reader = BufReader::new(File::open(&path).with_context(|| format!("reading {}", path.display()))?);
            let mut kept = String::new();
            for line in reader.lines() {
                let line = line?;
                let drop = serde_json::from_str::<Value>(&line)
                    .ok()
                    .is_some_and(|v| v["stage"] == stage && v["step"].as_u64().is_some_and(|s| s > keep_until_step));
                if !drop && !line.trim().is_empty() {
                    kept.push_str(&line);
                    kept.push('\n');
                }
            }
            let tmp = path.with_extension("jsonl.tmp");
            fs::write(&tmp, kept)?;
            fs::rename(&tmp, &path)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { path, file })
    }

    /// Appends one record.
    pub fn log(&mut self, stage: &str, step: u64, tokens: u64, values: &[(&str, f64)]) -> Result<()> {
        let mut m = Map::new();
        m.insert("stage".into(), json!(stage));
        m.insert("step".into(), json!(step));
        m.insert("tokens".into(), json!(tokens));
        for (k, v) in values {
            m.insert((*k).into(), if v.is_finite() { json!(v) } else { Value::Null });
        }
        writeln!(self.file, "{}", Value::Object(m)).with_context(|| format!("writing {}", self.path.display()))?;
        Ok(())
    }
}

/// All records of a metrics file, optionally of one stage.
pub fn read_metrics(path: &Path, stage: Option<&str>) -> Result<Vec<Value>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("{}:{}: not a JSON object", path.display(), i + 1))?;
        if stage.is_none_or(|s| v["stage"] == s) {
            out.push(v);
        }
    }
    Ok(out)
}
