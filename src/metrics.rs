//! `metrics.jsonl`: one JSON object per logged step, `stage`, `step`, `tokens` and plain-named
//! values (`loss`, `val_loss`, `val_bpb`, `lr`, `tokens_per_s`, ...). Every stage writes it, and
//! the line plots drawn from it here appear beside each run and in the report.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use std::sync::OnceLock;

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde_json::{Map, Value, json};

pub const METRICS_FILE: &str = "metrics.jsonl";

pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens `dir/metrics.jsonl` for appending, first dropping any records of `stage` past
    /// `keep_until_step` (records a resumed run will write again), so the log never holds a
    /// step twice, and a last record cut short by a kill mid-append (no closing newline).
    pub fn open(dir: &Path, stage: &str, keep_until_step: u64) -> Result<Self> {
        let path = dir.join(METRICS_FILE);
        if path.exists() {
            let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let torn_tail = !text.is_empty() && !text.ends_with('\n');
            let lines: Vec<&str> = text.lines().collect();
            let mut kept = String::new();
            for (i, line) in lines.iter().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let record = match serde_json::from_str::<Value>(line) {
                    Ok(v) => v,
                    Err(_) if torn_tail && i + 1 == lines.len() => break,
                    Err(e) => anyhow::bail!("{}:{}: not a JSON object: {e}", path.display(), i + 1),
                };
                let drop = record["stage"] == stage && record["step"].as_u64().is_some_and(|s| s > keep_until_step);
                if !drop {
                    kept.push_str(line);
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

    /// Appends one record, in a single write so a kill leaves at most a torn last line.
    pub fn log(&mut self, stage: &str, step: u64, tokens: u64, values: &[(&str, f64)]) -> Result<()> {
        let mut m = Map::new();
        m.insert("stage".into(), json!(stage));
        m.insert("step".into(), json!(step));
        m.insert("tokens".into(), json!(tokens));
        for (k, v) in values {
            m.insert((*k).into(), if v.is_finite() { json!(v) } else { Value::Null });
        }
        let line = format!("{}\n", Value::Object(m));
        self.file
            .write_all(line.as_bytes())
            .with_context(|| format!("writing {}", self.path.display()))?;
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

// ---------------------------------------------------------------------------------------------
// Plots of metrics

pub const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/Library/Fonts/Arial.ttf",
];

/// Registers a system font for plot labels once; `false` when none is found.
fn font_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        FONT_PATHS.iter().any(|p| {
            std::fs::read(p).ok().is_some_and(|bytes| {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
            })
        })
    })
}

/// One curve: (step, value) points.
pub type Series = Vec<(f64, f64)>;

/// Draws one or more `(x, y)` series as a line chart PNG. Returns `false` (and draws nothing)
/// when no font is available for the labels.
pub fn line_plot(path: &Path, title: &str, x_label: &str, series: &[(&str, Series)]) -> Result<bool> {
    if !font_ready() {
        return Ok(false);
    }
    let points: Vec<&(f64, f64)> = series
        .iter()
        .flat_map(|(_, s)| s.iter())
        .filter(|(_, y)| y.is_finite())
        .collect();
    if points.is_empty() {
        return Ok(false);
    }
    let (x0, x1) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), (x, _)| (a.min(*x), b.max(*x)));
    let (y0, y1) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), (_, y)| (a.min(*y), b.max(*y)));
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let root = BitMapBackend::new(path, (720, 420)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    let colours = [BLUE, RED, GREEN, MAGENTA, CYAN];
    for (i, (name, s)) in series.iter().enumerate() {
        let c = colours[i % colours.len()];
        chart
            .draw_series(LineSeries::new(
                s.iter().copied().filter(|(_, y)| y.is_finite()),
                c.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(true)
}

/// `(step, value)` of one metric of a stage's metrics file.
pub fn series(metrics: &Path, stage: &str, key: &str) -> Result<Series> {
    if !metrics.exists() {
        return Ok(vec![]);
    }
    Ok(read_metrics(metrics, Some(stage))?
        .iter()
        .filter_map(|r| Some((r["step"].as_f64()?, r[key].as_f64()?)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopening_drops_a_torn_last_record_and_the_steps_to_be_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(dir.path(), "pretrain", 0).unwrap();
        for step in 1..=3 {
            log.log("pretrain", step, step * 10, &[("loss", 1.0 / step as f64)])
                .unwrap();
        }
        drop(log);
        // A kill in the middle of appending step 4.
        let path = dir.path().join(METRICS_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"stage\":\"pretrain\",\"step\":4,\"lo").unwrap();
        drop(f);
        let mut log = MetricsLog::open(dir.path(), "pretrain", 2).unwrap();
        log.log("pretrain", 3, 30, &[("loss", 0.3)]).unwrap();
        drop(log);
        let steps: Vec<u64> = read_metrics(&path, Some("pretrain"))
            .unwrap()
            .iter()
            .map(|v| v["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, [1, 2, 3]);
    }

    #[test]
    fn a_corrupt_record_before_the_last_is_an_error_naming_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        fs::write(
            &path,
            "{\"stage\":\"sft\",\"step\":1}\nnot json\n{\"stage\":\"sft\",\"step\":2}\n",
        )
        .unwrap();
        let err = MetricsLog::open(dir.path(), "sft", 5)
            .err()
            .expect("a corrupt line must not be skipped");
        assert!(err.to_string().contains("metrics.jsonl:2: not a JSON object"), "{err}");
    }
}
