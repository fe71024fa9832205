//! The store's modules import downwards only. Each module of `src/` has a place in [`LAYERS`]
//! and may use (`crate::…`, directly or through an item the crate root re-exports) only the
//! modules listed beside it, all of them above it in the table, so no import circle can form.
//! The crate root (`lib.rs`: `Store`, `StoreError`, `Backend`, the re-exports) is the facade
//! every module may use. ARCHITECTURE.md states the same layering.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every module, after the modules it may use.
const LAYERS: &[(&str, &[&str])] = &[
    // How stored numbers read (times, amounts, spans): a leaf.
    ("format", &[]),
    // The agent row and the public agent object.
    ("view", &["format"]),
    // What the ledger answers; the audit trail; the alert outbox.
    ("answer", &["format", "view"]),
    ("audit", &["format"]),
    ("alerts", &["format"]),
    // Every write.
    ("ledger", &["format", "view", "answer", "audit", "alerts"]),
    // Reads straight from the pool, never through the ledger (the blast radius names its
    // constant: the expected revocation time includes `EPOCH_SETTLE`).
    ("read", &["format", "view"]),
    ("blast", &["format", "view", "ledger"]),
    ("history", &["format", "view", "audit", "alerts"]),
    ("advice", &["format", "view", "audit"]),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without its comments (line comments are enough for this crate).
fn code(text: &str) -> String {
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

fn ident(s: &str) -> &str {
    let end = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(s.len());
    &s[..end]
}

/// The first segment of every path that follows `crate::` (`crate::a::b` → `a`;
/// `crate::{a::b, C}` → `a`, `C`).
fn crate_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().next_back();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue; // `bulkhead_store::…` or the like, not this crate's root
        }
        if let Some(group) = rest.strip_prefix('{') {
            let (mut depth, mut start) = (0, 0);
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.push(ident(group[start..j].trim()).to_owned());
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push(ident(group[start..j].trim()).to_owned());
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.push(ident(rest).to_owned());
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

/// The modules the crate root re-exports items of: item → module.
fn reexports(lib: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for stmt in lib.split(';') {
        let Some(rest) = stmt.trim().strip_prefix("pub use ") else { continue };
        let module = ident(rest);
        let items = rest[module.len()..].trim_start_matches("::");
        for item in items.trim_matches(|c| c == '{' || c == '}').split(',') {
            let item = item.trim();
            let name = item.rsplit(" as ").next().unwrap_or(item).rsplit("::").next().unwrap_or(item);
            if !name.is_empty() {
                out.insert(name.trim().to_owned(), module.to_owned());
            }
        }
    }
    out
}

#[test]
fn modules_import_downwards_only() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files
        .iter()
        .map(|f| f.strip_prefix(&src).unwrap().components().next().unwrap().as_os_str().to_string_lossy().into_owned())
        .map(|m| m.trim_end_matches(".rs").to_owned())
        .filter(|m| m != "lib")
        .collect();

    let layered: Vec<&str> = LAYERS.iter().map(|(m, _)| *m).collect();
    assert_eq!(modules, layered.iter().map(|m| m.to_string()).collect(), "every module has a place in LAYERS");
    for (i, (module, uses)) in LAYERS.iter().enumerate() {
        for u in *uses {
            assert!(layered[..i].contains(u), "LAYERS: `{module}` may use only modules above it, not `{u}`");
        }
    }

    let lib = code(&std::fs::read_to_string(src.join("lib.rs")).expect("lib.rs"));
    let via_root = reexports(&lib);
    let mut wrong = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let module = rel.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_owned();
        if module == "lib" {
            continue;
        }
        let allowed = LAYERS.iter().find(|(m, _)| *m == module).map(|(_, u)| *u).unwrap_or(&[]);
        let text = code(&std::fs::read_to_string(file).expect("read a source file"));
        for head in crate_paths(&text) {
            let target = if modules.contains(&head) { Some(head.clone()) } else { via_root.get(&head).cloned() };
            if let Some(t) = target
                && t != module
                && !allowed.contains(&t.as_str())
            {
                wrong.push(format!("{}: `{module}` uses `{t}` (crate::{head})", rel.display()));
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the layering:\n{}", wrong.join("\n"));
}

#[test]
fn the_checker_sees_every_form_of_path() {
    let found = crate_paths("use crate::view::X;\nuse crate::{audit::{A, B}, Store};\nlet x = crate::ledger::f();");
    assert_eq!(found, ["view", "audit", "Store", "ledger"]);
    assert!(crate_paths("let x = my_crate::x;").is_empty());
    let map = reexports("pub use ledger::{Ledger, LedgerConfig};\npub use view::AgentView;");
    assert_eq!(map.get("LedgerConfig").map(String::as_str), Some("ledger"));
    assert_eq!(map.get("AgentView").map(String::as_str), Some("view"));
}
