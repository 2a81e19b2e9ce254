//! Corpus readers: stream the documents of `.txt`, `.jsonl`, `.jsonl.gz` and `.parquet` files.
//!
//! - `.txt` / `.txt.gz`: documents are separated by a line equal to the separator (default
//!   `<|endoftext|>`; surrounding whitespace ignored; an empty separator means blank lines, i.e.
//!   paragraphs). The line break just before a separator line belongs to the separator, and blank
//!   text after the last separator is the end of the file, not a document. A file without any
//!   separator line is one document: boundaries that are not marked are not guessed.
//! - `.jsonl` / `.jsonl.gz`: one JSON object per line, the text in a string field (default `text`);
//!   a line that is a bare JSON string is taken as the text; blank lines are ignored.
//! - `.parquet`: the text in a string column (default `text`).
//!
//! Bad input (invalid UTF-8, a line that is not JSON, a missing field or column, a null value, an
//! empty file) is an error naming the file and line or row, unless `skip_bad` is set: then the
//! record is skipped and counted in [`ReadStats::skipped_bad`]. Empty documents are never passed on
//! and are counted in [`ReadStats::skipped_empty`].

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};

/// How to find documents in the input files.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Separator line of `.txt` files.
    pub separator: String,
    /// JSON field of `.jsonl` files.
    pub field: String,
    /// Column of `.parquet` files.
    pub column: String,
    /// Skip and count bad records instead of failing.
    pub skip_bad: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            separator: crate::tokenizer::EOT.to_string(),
            field: "text".to_string(),
            column: "text".to_string(),
            skip_bad: false,
        }
    }
}

/// Counts of what a reader saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Documents passed on.
    pub documents: u64,
    /// UTF-8 bytes of the documents passed on.
    pub bytes: u64,
    /// Bad records skipped (only with `skip_bad`).
    pub skipped_bad: u64,
    /// Empty or whitespace-only documents skipped.
    pub skipped_empty: u64,
}

impl ReadStats {
    pub fn add(&mut self, o: &ReadStats) {
        self.documents += o.documents;
        self.bytes += o.bytes;
        self.skipped_bad += o.skipped_bad;
        self.skipped_empty += o.skipped_empty;
    }
}

/// The input formats, chosen by file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Txt { gz: bool },
    Jsonl { gz: bool },
    Parquet,
}

impl Format {
    pub fn of(path: &Path) -> Result<Self> {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("").to_lowercase();
        let gz = name.ends_with(".gz");
        let base = name.strip_suffix(".gz").unwrap_or(&name);
        Ok(if base.ends_with(".txt") {
            Format::Txt { gz }
        } else if base.ends_with(".jsonl") {
            Format::Jsonl { gz }
        } else if base.ends_with(".parquet") && !gz {
            Format::Parquet
        } else {
            bail!(
                "{}: unknown input format (expected .txt, .txt.gz, .jsonl, .jsonl.gz or .parquet)",
                path.display()
            )
        })
    }
}

/// Calls `f` on every non-empty document of `path`, in file order.
pub fn for_each_document(
    path: &Path,
    opts: &ReadOptions,
    f: &mut dyn FnMut(String) -> Result<()>,
) -> Result<ReadStats> {
    let format = Format::of(path)?;
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    ensure!(len > 0, "{}: empty file", path.display());
    let mut stats = ReadStats::default();
    let mut emit = |text: String, stats: &mut ReadStats| -> Result<()> {
        if text.trim().is_empty() {
            stats.skipped_empty += 1;
            return Ok(());
        }
        stats.documents += 1;
        stats.bytes += text.len() as u64;
        f(text)
    };
    match format {
        Format::Txt { gz } => read_txt(path, open(file, gz), opts, &mut stats, &mut emit)?,
        Format::Jsonl { gz } => read_jsonl(path, open(file, gz), opts, &mut stats, &mut emit)?,
        Format::Parquet => read_parquet(path, file, opts, &mut stats, &mut emit)?,
    }
    ensure!(
        stats.documents > 0,
        "{}: no documents (every record was empty{})",
        path.display(),
        if stats.skipped_bad > 0 {
            " or skipped as bad"
        } else {
            ""
        }
    );
    Ok(stats)
}

fn open(file: File, gz: bool) -> Box<dyn BufRead> {
    if gz {
        Box::new(BufReader::with_capacity(
            1 << 16,
            flate2::read::MultiGzDecoder::new(BufReader::new(file)),
        ))
    } else {
        Box::new(BufReader::with_capacity(1 << 16, file))
    }
}

type Emit<'a> = dyn FnMut(String, &mut ReadStats) -> Result<()> + 'a;

/// Reads the next line (with its line break) into `buf`; false at the end of the input.
fn next_line(r: &mut dyn BufRead, buf: &mut Vec<u8>, path: &Path, line: u64) -> Result<bool> {
    buf.clear();
    let n = r
        .read_until(b'\n', buf)
        .with_context(|| format!("{}:{line}: read error", path.display()))?;
    Ok(n > 0)
}

fn utf8_error(path: &Path, line: u64, e: std::str::Utf8Error) -> anyhow::Error {
    anyhow::anyhow!(
        "{}:{line}: invalid UTF-8 at byte {} of the line",
        path.display(),
        e.valid_up_to() + 1
    )
}

fn read_txt(
    path: &Path,
    mut r: Box<dyn BufRead>,
    opts: &ReadOptions,
    stats: &mut ReadStats,
    emit: &mut Emit,
) -> Result<()> {
    let sep = opts.separator.trim();
    let mut buf = Vec::new();
    let mut doc = String::new();
    let mut bad = false;
    let mut line = 0u64;
    let mut finish = |doc: &mut String, bad: &mut bool, stats: &mut ReadStats| -> Result<()> {
        if *bad {
            stats.skipped_bad += 1;
            *bad = false;
            doc.clear();
            return Ok(());
        }
        let mut text = std::mem::take(doc);
        if text.ends_with('\n') {
            text.pop();
            if text.ends_with('\r') {
                text.pop();
            }
        }
        emit(text, stats)
    };
    let mut separators = 0u64;
    while next_line(r.as_mut(), &mut buf, path, line + 1)? {
        line += 1;
        match std::str::from_utf8(&buf) {
            Ok(s) if s.trim() == sep => {
                separators += 1;
                finish(&mut doc, &mut bad, stats)?
            }
            Ok(s) => doc.push_str(s),
            Err(_) if opts.skip_bad => bad = true,
            Err(e) => return Err(utf8_error(path, line, e)),
        }
    }
    // Blank text after the last separator is the file's end, not an empty document.
    if separators > 0 && !bad && doc.trim().is_empty() {
        return Ok(());
    }
    finish(&mut doc, &mut bad, stats)
}

fn read_jsonl(
    path: &Path,
    mut r: Box<dyn BufRead>,
    opts: &ReadOptions,
    stats: &mut ReadStats,
    emit: &mut Emit,
) -> Result<()> {
    let mut buf = Vec::new();
    let mut line = 0u64;
    while next_line(r.as_mut(), &mut buf, path, line + 1)? {
        line += 1;
        match jsonl_text(&buf, &opts.field) {
            Ok(Some(text)) => emit(text, stats)?,
            Ok(None) => {}
            Err(_) if opts.skip_bad => stats.skipped_bad += 1,
            Err(e) => return Err(e.context(format!("{}:{line}", path.display()))),
        }
    }
    Ok(())
}

/// The text of one JSONL line; `None` for a blank line.
fn jsonl_text(bytes: &[u8], field: &str) -> Result<Option<String>> {
    let s = std::str::from_utf8(bytes)
        .map_err(|e| anyhow::anyhow!("invalid UTF-8 at byte {} of the line", e.valid_up_to() + 1))?;
    if s.trim().is_empty() {
        return Ok(None);
    }
    let v: serde_json::Value = serde_json::from_str(s).map_err(|e| anyhow::anyhow!("not valid JSON: {e}"))?;
    match v {
        serde_json::Value::String(t) => Ok(Some(t)),
        serde_json::Value::Object(mut m) => match m.remove(field) {
            Some(serde_json::Value::String(t)) => Ok(Some(t)),
            Some(other) => bail!("field {field:?} is not a string but {}", json_kind(&other)),
            None => {
                let keys: Vec<&String> = m.keys().collect();
                bail!("no {field:?} field (the record has {keys:?}); choose one with --field")
            }
        },
        other => bail!(
            "expected a JSON object with a {field:?} field, got {}",
            json_kind(&other)
        ),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn read_parquet(path: &Path, file: File, opts: &ReadOptions, stats: &mut ReadStats, emit: &mut Emit) -> Result<()> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::RowAccessor;
    let reader =
        SerializedFileReader::new(file).with_context(|| format!("{}: not a readable parquet file", path.display()))?;
    let schema = reader.metadata().file_metadata().schema();
    let fields = schema.get_fields();
    let Some(field) = fields.iter().find(|f| f.name() == opts.column) else {
        let names: Vec<&str> = fields.iter().map(|f| f.name()).collect();
        bail!(
            "{}: no column {:?} (columns: {names:?}); choose one with --column",
            path.display(),
            opts.column
        );
    };
    let projection = parquet::schema::types::Type::group_type_builder(schema.name())
        .with_fields(vec![field.clone()])
        .build()
        .context("building the column projection")?;
    let rows = reader
        .get_row_iter(Some(projection))
        .with_context(|| format!("{}: reading column {:?}", path.display(), opts.column))?;
    for (i, row) in rows.enumerate() {
        let at = || format!("{}: row {}", path.display(), i + 1);
        let row = row.with_context(at)?;
        match row.get_string(0) {
            Ok(t) => emit(t.clone(), stats)?,
            Err(_) if opts.skip_bad => stats.skipped_bad += 1,
            Err(e) => bail!("{}: column {:?} is not a non-null string ({e})", at(), opts.column),
        }
    }
    Ok(())
}

/// Reads every document of every file into memory (for small corpora and tests).
pub fn read_all(paths: &[&Path], opts: &ReadOptions) -> Result<(Vec<String>, ReadStats)> {
    let mut docs = Vec::new();
    let mut total = ReadStats::default();
    for p in paths {
        let s = for_each_document(p, opts, &mut |d| {
            docs.push(d);
            Ok(())
        })?;
        total.add(&s);
    }
    Ok((docs, total))
}
