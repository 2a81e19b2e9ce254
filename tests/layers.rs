//! The layering `src/lib.rs` states: a module imports only from modules listed before it here, so
//! data flows one way (text -> tokens -> model -> checkpoint -> stages -> engine -> server) and no
//! two modules import each other. Test code (`#[cfg(test)]` modules) may import anything.

use std::collections::BTreeSet;
use std::path::Path;

/// Top-level modules in the order they may depend on each other.
const ORDER: [&str; 14] = [
    "tokenizer",
    "chat",
    "model",
    "checkpoint",
    "metrics",
    "data",
    "engine",
    "train",
    "eval",
    "interop",
    "serve",
    "terminal",
    "speedrun",
    "bench",
];

fn rank(module: &str) -> usize {
    ORDER
        .iter()
        .position(|m| *m == module)
        .unwrap_or_else(|| panic!("module {module} is not in tests/layers.rs's ORDER"))
}

/// The top-level modules a source file refers to through `crate::`, outside its test module.
fn references(text: &str) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text);
    code.match_indices("crate::")
        .map(|(at, _)| {
            code[at + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|m| !m.is_empty())
        .collect()
}

fn visit(dir: &Path, out: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            visit(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push((path.display().to_string(), std::fs::read_to_string(&path).unwrap()));
        }
    }
}

#[test]
fn modules_import_only_from_the_layers_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    visit(&src, &mut files);
    let mut wrong = vec![];
    let mut checked = 0;
    for (path, text) in &files {
        let rel = path.strip_prefix(&format!("{}/", src.display())).unwrap();
        let top = rel.split(['/', '.']).next().unwrap();
        // The binary's argument parsing and the crate root sit above every layer.
        if ["main", "lib", "cli"].contains(&top) {
            continue;
        }
        checked += 1;
        for dep in references(text) {
            if dep != top && rank(&dep) >= rank(top) {
                wrong.push(format!("{rel} ({top}) imports {dep}"));
            }
        }
    }
    assert!(
        checked > 40,
        "only {checked} source files found under {}",
        src.display()
    );
    assert!(wrong.is_empty(), "imports against the layering:\n{}", wrong.join("\n"));
}

#[test]
fn the_checker_sees_an_upward_import() {
    let refs = references(
        "use crate::engine::Chatbot;\nfn f() { crate::model::x(); }\n#[cfg(test)]\nmod tests { use crate::serve; }",
    );
    assert_eq!(refs, BTreeSet::from(["engine".to_string(), "model".to_string()]));
    assert!(rank("engine") > rank("model"));
}
