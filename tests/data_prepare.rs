//! `data prepare` tests: shards round trip to the documents, the val split is disjoint and seeded,
//! every reader format works, bad input gives clear errors, and `data download` fails fast offline.

mod common;

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use talaria::data::download::{self, DownloadConfig};
use talaria::data::prepare::{self, PrepareConfig, read_meta};
use talaria::data::readers::{self, ReadOptions};
use talaria::data::shards::{Shard, Split, TokenLoader, shard_paths};
use talaria::tokenizer::{self, EOT, Tokenizer, TrainConfig};

fn err_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

/// Document `i`: varied text with a unique marker, Chinese, emoji and odd whitespace.
fn doc(i: usize) -> String {
    let tail = [
        "",
        "  trailing",
        "\ttab\n\nsecond paragraph",
        " 你好，世界 🙂",
        "\n  indented\n",
    ][i % 5];
    format!("Document number {i}: the quick brown fox {} jumps.{tail}", i * 37 % 101)
}

/// A tokenizer trained on the documents, saved to `dir/tok.json`.
fn trained_tokenizer(dir: &Path, docs: &[String]) -> PathBuf {
    let cfg = TrainConfig {
        vocab_size: 320,
        min_frequency: 2,
        show_progress: false,
    };
    let (tok, _) = tokenizer::train_bpe(&cfg, docs.iter().cloned().map(Ok)).unwrap();
    let p = dir.join("tok.json");
    tok.save(&p).unwrap();
    p
}

fn write_txt(path: &Path, docs: &[String], sep: &str) {
    let mut f = File::create(path).unwrap();
    for d in docs {
        writeln!(f, "{d}\n{sep}").unwrap();
    }
}

fn write_jsonl(path: &Path, docs: &[String], gz: bool) {
    let mut body = String::new();
    for (i, d) in docs.iter().enumerate() {
        body.push_str(&serde_json::json!({"id": i, "text": d}).to_string());
        body.push('\n');
    }
    if gz {
        let mut e = flate2::write::GzEncoder::new(File::create(path).unwrap(), flate2::Compression::default());
        e.write_all(body.as_bytes()).unwrap();
        e.finish().unwrap();
    } else {
        std::fs::write(path, body).unwrap();
    }
}

/// A snappy-compressed parquet file with an `id` column and an optional string column `name`
/// (`None` values are nulls).
fn write_parquet(path: &Path, name: &str, values: &[Option<String>]) {
    let schema = Arc::new(
        parse_message_type(&format!(
            "message doc {{ REQUIRED INT64 id; OPTIONAL BYTE_ARRAY {name} (UTF8); }}"
        ))
        .unwrap(),
    );
    let props = Arc::new(WriterProperties::builder().set_compression(Compression::SNAPPY).build());
    let mut w = SerializedFileWriter::new(File::create(path).unwrap(), schema, props).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let ids: Vec<i64> = (0..values.len() as i64).collect();
    let mut col = rg.next_column().unwrap().unwrap();
    col.typed::<Int64Type>().write_batch(&ids, None, None).unwrap();
    col.close().unwrap();
    let present: Vec<ByteArray> = values.iter().flatten().map(|s| ByteArray::from(s.as_str())).collect();
    let defs: Vec<i16> = values.iter().map(|v| v.is_some() as i16).collect();
    let mut col = rg.next_column().unwrap().unwrap();
    col.typed::<ByteArrayType>()
        .write_batch(&present, Some(&defs), None)
        .unwrap();
    col.close().unwrap();
    rg.close().unwrap();
    w.close().unwrap();
}

/// The documents of one split, decoded from its shards (split at the end-of-text id).
fn decoded_docs(dir: &Path, split: Split, tok: &Tokenizer) -> Vec<String> {
    let eot = tok.eot_id().unwrap();
    let mut all = Vec::new();
    for p in shard_paths(dir, split).unwrap() {
        let s = Shard::open(&p).unwrap();
        all.extend(s.slice(0, s.len()));
    }
    assert_eq!(all.last(), Some(&eot), "every document ends with the end-of-text id");
    let mut parts: Vec<&[u32]> = all.split(|&t| t == eot).collect();
    parts.pop(); // the empty slice after the final end-of-text id
    parts.iter().map(|ids| tok.decode(ids).unwrap()).collect()
}

#[test]
fn prepared_shards_decode_to_the_documents_with_a_disjoint_seeded_val_split() {
    let tmp = tempfile::tempdir().unwrap();
    let docs: Vec<String> = (0..80).map(doc).collect();
    let tok_path = trained_tokenizer(tmp.path(), &docs);
    let tok = Tokenizer::from_file(&tok_path).unwrap();
    let inputs = vec![
        tmp.path().join("a.txt"),
        tmp.path().join("b.jsonl"),
        tmp.path().join("c.jsonl.gz"),
        tmp.path().join("d.parquet"),
    ];
    write_txt(&inputs[0], &docs[0..20], EOT);
    write_jsonl(&inputs[1], &docs[20..40], false);
    write_jsonl(&inputs[2], &docs[40..60], true);
    write_parquet(
        &inputs[3],
        "text",
        &docs[60..80].iter().cloned().map(Some).collect::<Vec<_>>(),
    );

    // The readers give back exactly the documents written.
    let refs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    let (read, stats) = readers::read_all(&refs, &ReadOptions::default()).unwrap();
    assert_eq!(read, docs);
    assert_eq!(stats.bytes, docs.iter().map(|d| d.len() as u64).sum::<u64>());

    let run = |out: &str, seed: u64, shard_tokens: usize| {
        let cfg = PrepareConfig {
            val_fraction: 0.25,
            seed,
            shard_tokens,
            ..PrepareConfig::new(inputs.clone(), tok_path.clone(), tmp.path().join(out))
        };
        prepare::prepare(&cfg).unwrap()
    };
    let s = run("out", 7, 1 << 20);
    let dir = tmp.path().join("out");
    let train = decoded_docs(&dir, Split::Train, &tok);
    let val = decoded_docs(&dir, Split::Val, &tok);
    assert_eq!(val.len(), 20, "round(80 * 0.25) documents go to val");
    assert_eq!(train.len(), 60);
    let train_set: BTreeSet<&String> = train.iter().collect();
    let val_set: BTreeSet<&String> = val.iter().collect();
    assert!(train_set.is_disjoint(&val_set));
    let mut both: Vec<String> = train.iter().chain(&val).cloned().collect();
    both.sort();
    let mut want = docs.clone();
    want.sort();
    assert_eq!(both, want, "train + val hold every document exactly once");
    // Train keeps corpus order.
    let order: Vec<&String> = docs.iter().filter(|d| train_set.contains(d)).collect();
    assert_eq!(train.iter().collect::<Vec<_>>(), order);

    let meta = read_meta(&dir).unwrap();
    assert_eq!(meta, s.meta);
    assert_eq!(meta.eot_id, tok.eot_id().unwrap());
    assert_eq!(meta.vocab_size, tok.vocab_size());
    assert_eq!(meta.splits.train.documents, 60);
    assert_eq!(meta.splits.val.documents, 20);
    let bytes = |ds: &[String]| ds.iter().map(|d| d.len() as u64).sum::<u64>();
    assert_eq!(meta.splits.train.bytes, bytes(&train));
    assert_eq!(meta.splits.val.bytes, bytes(&val));
    let tokens = |split| -> u64 {
        shard_paths(&dir, split)
            .unwrap()
            .iter()
            .map(|p| Shard::open(p).unwrap().len() as u64)
            .sum()
    };
    assert_eq!(meta.splits.train.tokens, tokens(Split::Train));
    assert_eq!(meta.splits.val.tokens, tokens(Split::Val));
    let tok_bytes = std::fs::read(&tok_path).unwrap();
    assert_eq!(std::fs::read(dir.join("tokenizer.json")).unwrap(), tok_bytes);
    assert_eq!(meta.tokenizer_sha256, prepare::sha256_hex(&tok_bytes));
    assert_eq!(meta.tokenizer_sha256.len(), 64);

    // The pretraining loader reads the shards.
    let mut loader = TokenLoader::open(&dir, Split::Train, 16, 0).unwrap();
    assert_eq!(loader.vocab_size(), tok.vocab_size());
    loader.next_batch(2, &Device::Cpu).unwrap();

    // Same seed, same split, even with small shards; another seed, another split.
    run("same", 7, 200);
    assert!(shard_paths(&tmp.path().join("same"), Split::Train).unwrap().len() > 3);
    assert_eq!(decoded_docs(&tmp.path().join("same"), Split::Val, &tok), val);
    assert_eq!(decoded_docs(&tmp.path().join("same"), Split::Train, &tok), train);
    run("other", 8, 1 << 20);
    assert_ne!(decoded_docs(&tmp.path().join("other"), Split::Val, &tok), val);

    // A finished directory is not overwritten.
    let cfg = PrepareConfig::new(inputs.clone(), tok_path.clone(), dir.clone());
    assert!(err_of(prepare::prepare(&cfg)).contains("already holds prepared data"));
}

#[test]
fn a_single_document_is_cut_into_a_train_head_and_a_val_tail() {
    let tmp = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (0..100).map(|i| format!("line {i} of the only document")).collect();
    let text = lines.join("\n");
    let p = tmp.path().join("one.txt");
    std::fs::write(&p, format!("{text}\n")).unwrap();
    let tok_path = trained_tokenizer(tmp.path(), &lines);
    let tok = Tokenizer::from_file(&tok_path).unwrap();
    let out = tmp.path().join("out");
    let s = prepare::prepare(&PrepareConfig::new(vec![p.clone()], tok_path.clone(), out.clone())).unwrap();
    assert!(s.meta.split_single_document);
    let train = decoded_docs(&out, Split::Train, &tok);
    let val = decoded_docs(&out, Split::Val, &tok);
    assert_eq!(format!("{}{}", train[0], val[0]), text);
    assert!(
        val[0].starts_with("line 90 "),
        "the cut is at a line break near 90%: {:?}",
        &val[0][..20]
    );

    // One line cannot be cut at a line break, but is cut at a character boundary.
    let short = tmp.path().join("short.txt");
    std::fs::write(&short, "x").unwrap();
    let e = err_of(prepare::prepare(&PrepareConfig::new(
        vec![short],
        tok_path,
        tmp.path().join("o2"),
    )));
    assert!(e.contains("too short to split"), "{e}");
}

#[test]
fn bad_inputs_are_clear_errors_naming_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let docs: Vec<String> = (0..10).map(doc).collect();
    let tok_path = trained_tokenizer(tmp.path(), &docs);
    let opts = ReadOptions::default();
    let skip = ReadOptions {
        skip_bad: true,
        ..ReadOptions::default()
    };
    let read = |name: &str, bytes: &[u8], o: &ReadOptions| {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        readers::read_all(&[p.as_path()], o)
    };

    let bad_utf8 = b"good one\n<|endoftext|>\nbad \xc3\x28 here\n<|endoftext|>\ngood two\n";
    let e = err_of(read("bad.txt", bad_utf8, &opts));
    assert!(e.contains("bad.txt:3") && e.contains("invalid UTF-8"), "{e}");
    let (ds, st) = read("bad.txt", bad_utf8, &skip).unwrap();
    assert_eq!(ds, vec!["good one", "good two"]);
    assert_eq!(st.skipped_bad, 1);

    assert!(err_of(read("empty.txt", b"", &opts)).contains("empty.txt: empty file"));
    let e = err_of(read("seps.txt", b"<|endoftext|>\n\n<|endoftext|>\n", &opts));
    assert!(e.contains("seps.txt: no documents"), "{e}");

    let jsonl = b"{\"text\": \"ok\"}\n{\"text\": broken\n\n{\"body\": \"x\", \"id\": 3}\n\"a bare string\"\n";
    let e = err_of(read("x.jsonl", jsonl, &opts));
    assert!(e.contains("x.jsonl:2") && e.contains("not valid JSON"), "{e}");
    let e = err_of(read(
        "y.jsonl",
        b"{\"text\": \"ok\"}\n\n{\"body\": \"x\", \"id\": 3}\n",
        &opts,
    ));
    assert!(
        e.contains("y.jsonl:3") && e.contains("no \"text\" field") && e.contains("body"),
        "{e}"
    );
    let (ds, st) = read("x.jsonl", jsonl, &skip).unwrap();
    assert_eq!(ds, vec!["ok", "a bare string"]);
    assert_eq!(st.skipped_bad, 2);
    let e = err_of(read("n.jsonl", b"{\"text\": 5}\n", &opts));
    assert!(
        e.contains("n.jsonl:1") && e.contains("not a string but a number"),
        "{e}"
    );
    let e = err_of(read("u.jsonl", b"{\"text\": \"a\"}\n{\"text\": \"\xff\"}\n", &opts));
    assert!(e.contains("u.jsonl:2") && e.contains("invalid UTF-8"), "{e}");

    let pq = tmp.path().join("p.parquet");
    write_parquet(&pq, "content", &[Some("a".into())]);
    let e = err_of(readers::read_all(&[pq.as_path()], &opts));
    assert!(
        e.contains("p.parquet") && e.contains("no column \"text\"") && e.contains("content"),
        "{e}"
    );
    let (ds, _) = readers::read_all(
        &[pq.as_path()],
        &ReadOptions {
            column: "content".into(),
            ..ReadOptions::default()
        },
    )
    .unwrap();
    assert_eq!(ds, vec!["a"]);
    let nulls = tmp.path().join("nulls.parquet");
    write_parquet(&nulls, "text", &[Some("a".into()), None, Some("c".into())]);
    let e = err_of(readers::read_all(&[nulls.as_path()], &opts));
    assert!(e.contains("nulls.parquet: row 2"), "{e}");
    let (ds, st) = readers::read_all(&[nulls.as_path()], &skip).unwrap();
    assert_eq!((ds, st.skipped_bad), (vec!["a".to_string(), "c".to_string()], 1));
    let e = err_of(read("fake.parquet", b"PAR1 not really", &opts));
    assert!(e.contains("fake.parquet: not a readable parquet file"), "{e}");
    let e = err_of(read("notes.md", b"# hi", &opts));
    assert!(e.contains("notes.md: unknown input format"), "{e}");
    let e = err_of(read("broken.jsonl.gz", b"\x1f\x8b\x08\x00garbage", &opts));
    assert!(e.contains("broken.jsonl.gz:1"), "{e}");

    // Through `prepare` and the CLI: the same message, exit code 1, no panic.
    let bad = tmp.path().join("bad.txt");
    std::fs::write(&bad, bad_utf8).unwrap();
    let e = err_of(prepare::prepare(&PrepareConfig::new(
        vec![bad.clone()],
        tok_path.clone(),
        tmp.path().join("o"),
    )));
    assert!(e.contains("bad.txt:3"), "{e}");
    assert!(
        !tmp.path().join("o").exists(),
        "nothing is written when an input is bad"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_talaria"))
        .args(["data", "prepare", "--input"])
        .arg(&bad)
        .arg("--tokenizer")
        .arg(&tok_path)
        .arg("--out")
        .arg(tmp.path().join("o"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.txt:3"));
    let e = err_of(prepare::prepare(&PrepareConfig {
        val_fraction: 1.0,
        ..PrepareConfig::new(vec![bad], tok_path, tmp.path().join("o"))
    }));
    assert!(e.contains("--val-fraction"), "{e}");
}

#[test]
fn real_corpora_prepare_and_round_trip() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if !data.join("pretrain/tinystories_train_head.txt").exists() {
        common::skip("data", "../shared/data is absent");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let tok = tokenizer::import_gpt2(
        &data.join("tokenizer/gpt2_vocab.json"),
        &data.join("tokenizer/gpt2_merges.txt"),
    )
    .unwrap();
    let tok_path = tmp.path().join("gpt2.json");
    tok.save(&tok_path).unwrap();
    let stories = data.join("pretrain/tinystories_train_head.txt");
    let out = tmp.path().join("stories");
    let s = prepare::prepare(&PrepareConfig::new(
        vec![stories.clone()],
        tok_path.clone(),
        out.clone(),
    ))
    .unwrap();
    // SOURCES.md: 2316 complete stories, each ending with an <|endoftext|> line.
    assert_eq!(s.meta.splits.train.documents + s.meta.splits.val.documents, 2316);
    assert_eq!(s.meta.splits.val.documents, 232);
    let (docs, _) = readers::read_all(&[stories.as_path()], &ReadOptions::default()).unwrap();
    let val = decoded_docs(&out, Split::Val, &tok);
    let all: BTreeSet<&String> = docs.iter().collect();
    assert!(val.iter().all(|d| all.contains(d)));
    let train = decoded_docs(&out, Split::Train, &tok);
    assert_eq!(train.len() + val.len(), docs.len());
    assert!(train.iter().all(|d| all.contains(d)));

    let brown = data.join("pretrain/brown_corpus_tagged.jsonl.gz");
    let e = err_of(prepare::prepare(&PrepareConfig::new(
        vec![brown.clone()],
        tok_path.clone(),
        tmp.path().join("b0"),
    )));
    assert!(
        e.contains("brown_corpus_tagged.jsonl.gz:1") && e.contains("tagged_text"),
        "{e}"
    );
    let cfg = PrepareConfig {
        read: ReadOptions {
            field: "tagged_text".into(),
            ..ReadOptions::default()
        },
        ..PrepareConfig::new(vec![brown], tok_path, tmp.path().join("brown"))
    };
    let s = prepare::prepare(&cfg).unwrap();
    assert_eq!(s.meta.splits.train.documents + s.meta.splits.val.documents, 500);
    let (docs, _) = readers::read_all(&[cfg.inputs[0].as_path()], &cfg.read).unwrap();
    let text_bytes: u64 = docs.iter().map(|d| d.len() as u64).sum();
    assert_eq!(s.meta.splits.train.bytes + s.meta.splits.val.bytes, text_bytes);
}

#[test]
fn download_fails_fast_and_clearly_when_the_hub_is_unreachable() {
    let tmp = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_talaria"))
        .args([
            "data",
            "download",
            "roneneldan/TinyStories",
            "--split",
            "train",
            "--out",
        ])
        .arg(tmp.path())
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env("HF_HOME", tmp.path().join("hf"))
        .output()
        .unwrap();
    let took = start.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("offline") && err.contains("cannot reach the Hugging Face Hub at http://127.0.0.1:9"),
        "{err}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

/// A minimal stand-in for the Hub on 127.0.0.1: the repository listing and `resolve` downloads
/// with the headers `hf-hub` checks (etag, commit, content range). Serves at most 50 requests.
fn fake_hub(files: Vec<(&'static str, Vec<u8>)>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().take(50) {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            reader.read_line(&mut request).unwrap();
            let mut range_start = None;
            loop {
                let mut h = String::new();
                reader.read_line(&mut h).unwrap();
                if h.trim().is_empty() {
                    break;
                }
                if let Some(r) = h.to_lowercase().strip_prefix("range: bytes=") {
                    range_start = r.trim().split('-').next().and_then(|n| n.parse::<usize>().ok());
                }
            }
            let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
            let (status, headers, body) = if path.starts_with("/api/datasets/") {
                let siblings: Vec<_> = files.iter().map(|(n, _)| serde_json::json!({"rfilename": n})).collect();
                let body = serde_json::json!({"siblings": siblings, "sha": "0123abcd"}).to_string();
                (
                    "200 OK",
                    "Content-Type: application/json\r\n".to_string(),
                    body.into_bytes(),
                )
            } else if let Some((_, data)) = files
                .iter()
                .find(|(n, _)| path.ends_with(&format!("/resolve/main/{n}")))
            {
                let start = range_start.unwrap_or(0).min(data.len());
                let body = data[start..].to_vec();
                let headers = format!(
                    "ETag: \"etag-{}\"\r\nX-Repo-Commit: 0123abcd\r\nContent-Range: bytes {start}-{}/{}\r\n",
                    data.len(),
                    data.len().saturating_sub(1),
                    data.len()
                );
                ("206 Partial Content", headers, body)
            } else {
                ("404 Not Found", String::new(), b"not found".to_vec())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    url
}

#[test]
fn download_fetches_the_files_of_a_split_and_prepare_reads_them() {
    let tmp = tempfile::tempdir().unwrap();
    let docs: Vec<String> = (0..30).map(doc).collect();
    let body = |ds: &[String]| -> Vec<u8> {
        ds.iter()
            .map(|d| serde_json::json!({"text": d}).to_string() + "\n")
            .collect::<String>()
            .into_bytes()
    };
    let train = body(&docs[..20]);
    let url = fake_hub(vec![
        ("README.md", b"# card".to_vec()),
        ("data/train-00000-of-00001.jsonl", train.clone()),
        ("data/validation-00000-of-00001.jsonl", body(&docs[20..])),
    ]);
    let out = tmp.path().join("hub");
    let s = download::download(&DownloadConfig {
        dataset: "someone/stories".into(),
        split: Some("train".into()),
        out: out.clone(),
        revision: "main".into(),
        endpoint: Some(url.clone()),
        cache_dir: Some(tmp.path().join("cache")),
    })
    .unwrap();
    let got = out.join("data/train-00000-of-00001.jsonl");
    assert_eq!(s.files, vec![got.clone()]);
    assert_eq!(std::fs::read(&got).unwrap(), train);
    assert_eq!(s.bytes, train.len() as u64);

    let e = err_of(download::download(&DownloadConfig {
        dataset: "someone/stories".into(),
        split: Some("test".into()),
        out,
        revision: "main".into(),
        endpoint: Some(url),
        cache_dir: Some(tmp.path().join("cache")),
    }));
    assert!(
        e.contains("no data files for split \"test\"") && e.contains("validation-00000"),
        "{e}"
    );

    let tok_path = trained_tokenizer(tmp.path(), &docs);
    let p = prepare::prepare(&PrepareConfig::new(vec![got], tok_path, tmp.path().join("prepared"))).unwrap();
    assert_eq!(p.meta.splits.train.documents + p.meta.splits.val.documents, 20);
}

#[test]
fn txt_documents_follow_the_separator_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let read = |bytes: &str, sep: &str| {
        let p = tmp.path().join("t.txt");
        std::fs::write(&p, bytes).unwrap();
        let opts = ReadOptions {
            separator: sep.into(),
            ..ReadOptions::default()
        };
        readers::read_all(&[p.as_path()], &opts).unwrap()
    };
    // The line break before a separator line belongs to it; CRLF files and padded separators work;
    // blank text after the last separator is the end of the file, not a document.
    let (d, s) = read("one\r\ntwo\r\n <|endoftext|> \r\nthree\n\n<|endoftext|>\n\n", EOT);
    assert_eq!(d, vec!["one\r\ntwo", "three\n"]);
    assert_eq!((s.documents, s.skipped_empty), (2, 0));
    // An empty document between two separators is counted, not passed on.
    let (d, s) = read("a\n###\n###\nb", "###");
    assert_eq!(d, vec!["a", "b"]);
    assert_eq!(s.skipped_empty, 1);
    // An empty separator means paragraphs.
    let (d, _) = read("para one\nstill one\n\npara two\n   \npara three\n", "");
    assert_eq!(d, vec!["para one\nstill one", "para two", "para three"]);
    // Without any separator line the whole file is one document.
    let (d, _) = read("no\nseparators\nhere\n", EOT);
    assert_eq!(d, vec!["no\nseparators\nhere"]);
    // Gzipped text reads the same.
    let gz = tmp.path().join("t.txt.gz");
    let mut e = flate2::write::GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::default());
    e.write_all(b"x\n<|endoftext|>\ny\n").unwrap();
    e.finish().unwrap();
    let (d, _) = readers::read_all(&[gz.as_path()], &ReadOptions::default()).unwrap();
    assert_eq!(d, vec!["x", "y"]);
}
