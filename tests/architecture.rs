//! The layering that `src/lib.rs` describes, checked on the source: each layer imports only
//! the layers below it (`crate::X` paths in code, comments left out), `engine` touches no
//! file, and every module starts with a doc comment. A new import that breaks the order
//! fails here with the file, the line and the layer it reached.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Each library layer and the layers it may import (everything not listed is forbidden).
/// Bottom to top: rng, engine, io, model, data, seg, infer | train, eval.
const ALLOWED: &[(&str, &[&str])] = &[
    ("rng", &[]),
    ("engine", &["rng"]),
    ("io", &["rng"]),
    ("model", &["rng", "engine", "io"]),
    ("data", &["rng", "io"]),
    ("seg", &["rng", "engine", "io", "data"]),
    ("infer", &["rng", "engine", "io", "model", "data", "seg"]),
    ("train", &["rng", "engine", "io", "model", "data", "seg"]),
    (
        "eval",
        &[
            "rng", "engine", "io", "model", "data", "seg", "infer", "train",
        ],
    ),
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(p: &Path, out: &mut Vec<PathBuf>) {
    if p.is_file() {
        if p.extension().is_some_and(|e| e == "rs") {
            out.push(p.to_path_buf());
        }
        return;
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for e in entries {
        rust_files(&e, out);
    }
}

/// The files of one layer: `src/<layer>.rs` or everything under `src/<layer>/`.
fn layer_files(layer: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let file = src().join(format!("{layer}.rs"));
    if file.is_file() {
        out.push(file);
    }
    let dir = src().join(layer);
    if dir.is_dir() {
        rust_files(&dir, &mut out);
    }
    assert!(!out.is_empty(), "layer {layer} has no source under src/");
    out
}

/// The code of a line: nothing after `//` (doc and plain comments alike). Good enough for
/// this source, which has no `//` inside string literals on a line that names a layer.
fn code(line: &str) -> &str {
    line.find("//").map_or(line, |i| &line[..i])
}

/// The layers a line's code names as `crate::X`.
fn crate_refs(line: &str) -> Vec<String> {
    let c = code(line);
    let mut out = Vec::new();
    let mut rest = c;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        let name: String = after
            .chars()
            .take_while(|ch| ch.is_ascii_alphanumeric() || *ch == '_')
            .collect();
        // `$crate::` inside a macro and `super::crate` do not occur; `{` groups are not used.
        out.push(name);
        rest = after;
    }
    out
}

#[test]
fn each_layer_imports_only_the_layers_below_it() {
    let layers: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    // Every top-level module of the library is in the table.
    let lib = std::fs::read_to_string(src().join("lib.rs")).expect("src/lib.rs");
    for line in lib.lines() {
        if let Some(m) = line.trim().strip_prefix("pub mod ") {
            let m = m.trim_end_matches(';');
            assert!(
                layers.contains_key(m),
                "src/lib.rs declares `{m}`, which this test's layer table does not place"
            );
        }
    }
    // `#[macro_export]` macros live at the crate root: `crate::name!` belongs to the layer
    // whose source defines `macro_rules! name`.
    let mut macros: BTreeMap<String, &str> = BTreeMap::new();
    for layer in layers.keys() {
        for f in layer_files(layer) {
            let text = std::fs::read_to_string(&f).expect("source file");
            for line in text.lines() {
                if let Some(rest) = code(line).trim().strip_prefix("macro_rules!") {
                    let name: String = rest
                        .trim()
                        .chars()
                        .take_while(|ch| ch.is_ascii_alphanumeric() || *ch == '_')
                        .collect();
                    macros.insert(name, layer);
                }
            }
        }
    }
    let mut bad = Vec::new();
    let mut refs = 0usize;
    for (layer, allowed) in &layers {
        for f in layer_files(layer) {
            let text = std::fs::read_to_string(&f).expect("source file");
            for (n, line) in text.lines().enumerate() {
                for r in crate_refs(line) {
                    let r = macros.get(&r).map_or(r, |l| l.to_string());
                    refs += 1;
                    if r != *layer && !allowed.contains(&r.as_str()) {
                        bad.push(format!(
                            "{}:{}: `{layer}` imports `crate::{r}`: {}",
                            f.strip_prefix(src()).unwrap_or(&f).display(),
                            n + 1,
                            line.trim()
                        ));
                    }
                }
            }
        }
    }
    assert!(
        refs > 100,
        "only {refs} crate:: paths found: is the scan broken?"
    );
    assert!(
        bad.is_empty(),
        "imports against the layering of src/lib.rs:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_layer_check_sees_a_violation() {
    // The scanner itself: an import in code counts, one in a comment does not.
    assert_eq!(crate_refs("use crate::model::IchNet;"), vec!["model"]);
    assert_eq!(
        crate_refs("let x = crate::io::metadata(p)?; // see crate::train"),
        vec!["io"]
    );
    assert!(crate_refs("//! Summarised by `crate::data`.").is_empty());
    let engine: &[&str] = ALLOWED
        .iter()
        .find(|(l, _)| *l == "engine")
        .map(|(_, a)| *a)
        .unwrap_or(&[]);
    assert!(!engine.contains(&"io") && !engine.contains(&"model"));
}

#[test]
fn the_engine_touches_no_file() {
    let mut bad = Vec::new();
    for f in layer_files("engine") {
        let text = std::fs::read_to_string(&f).expect("source file");
        for (n, line) in text.lines().enumerate() {
            let c = code(line);
            if c.contains("std::fs") || c.contains("File::") || c.contains("OpenOptions") {
                bad.push(format!("{}:{}: {}", f.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "file access in the engine:\n{}",
        bad.join("\n")
    );
}

#[test]
fn every_module_starts_with_a_doc_comment() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    assert!(files.len() > 50, "only {} source files found", files.len());
    let missing: Vec<String> = files
        .iter()
        .filter(|f| {
            let text = std::fs::read_to_string(f).expect("source file");
            !text.trim_start().starts_with("//!")
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "modules without a leading `//!` doc comment:\n{}",
        missing.join("\n")
    );
}
