//! The daemon's modules import one way (docs/architecture.md, "The daemon's layers"): no
//! module imports from a layer above its own, and no file imports, directly or through
//! others, a file that imports it. Read from the sources, so a change that breaks the
//! layering fails here rather than in review.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first; a module may import from its own layer and those before it.
const LAYERS: &[&[&str]] = &[
    &["config", "limits", "handle", "wake"],
    &["model"],
    &["rnic"],
    &["fabric"],
    &["sched"],
    &["vhost"],
    &["daemon", "metrics"],
    &["manage"],
    &["cli", "ctl"],
];

/// Test-only modules at the top of the crate: they may use every layer.
const TEST_SUPPORT: &[&str] = &["testing", "rules_tests", "srq_tests"];

fn layer_of(top: &str) -> usize {
    LAYERS
        .iter()
        .position(|l| l.contains(&top))
        .unwrap_or_else(|| {
            panic!("module {top} is in no layer: add it to LAYERS and to docs/architecture.md")
        })
}

/// The module path of a source file: `fabric/roce/mod.rs` is `fabric::roce`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The file's code outside its test modules: everything before the first `#[cfg(test)]`
/// that is not just a declaration of a test-only module (`#[cfg(test)] pub mod mock;`).
fn production_code(text: &str) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        if line == "#[cfg(test)]" {
            let next = lines.get(i + 1).map(|l| l.trim()).unwrap_or("");
            let declaration = next.ends_with(';') && next.contains("mod ");
            if !declaration {
                break;
            }
            i += 2;
            continue;
        }
        if !line.starts_with("//") {
            out.push(lines[i]);
        }
        i += 1;
    }
    out
}

/// The module paths a line names with `crate::` or `super::`, resolved to the longest module
/// of `modules` they start with.
fn targets(line: &str, me: &[String], modules: &BTreeSet<Vec<String>>) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    for (anchor, base) in [
        ("crate::", Vec::new()),
        ("super::", me[..me.len().saturating_sub(1)].to_vec()),
    ] {
        let mut rest = line;
        while let Some(at) = rest.find(anchor) {
            // A preceding identifier character or `:` means this is part of a longer path
            // (`vrdma_proto::...`), not one of this crate's.
            let before = rest[..at].chars().last();
            rest = &rest[at + anchor.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let path: Vec<String> = rest
                .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .next()
                .unwrap_or("")
                .split("::")
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect();
            let mut full = base.clone();
            let mut best = base.clone();
            for part in path {
                full.push(part);
                if modules.contains(&full) {
                    best = full.clone();
                }
            }
            if !best.is_empty() {
                found.push(best);
            }
        }
    }
    found
}

#[test]
fn modules_import_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(&src, f)).collect();
    let mut graph: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    let mut upward = Vec::new();
    for file in &files {
        let me = module_of(&src, file);
        let Some(top) = me.first() else { continue }; // lib.rs
        if TEST_SUPPORT.contains(&top.as_str()) || top == "main" {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        for line in production_code(&text) {
            for target in targets(line, &me, &modules) {
                if target == me {
                    continue;
                }
                if layer_of(&target[0]) > layer_of(top) {
                    upward.push(format!(
                        "{} imports {} ({line})",
                        me.join("::"),
                        target.join("::")
                    ));
                }
                graph.entry(me.clone()).or_default().insert(target);
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports from a layer above:\n{}",
        upward.join("\n")
    );

    // No cycles between files: a depth-first search that finds a file on its own path.
    fn visit(
        node: &Vec<String>,
        graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        path: &mut Vec<Vec<String>>,
        done: &mut BTreeSet<Vec<String>>,
    ) {
        if let Some(at) = path.iter().position(|n| n == node) {
            let cycle: Vec<String> = path[at..]
                .iter()
                .chain(std::iter::once(node))
                .map(|n| n.join("::"))
                .collect();
            panic!("files import each other: {}", cycle.join(" -> "));
        }
        if done.contains(node) {
            return;
        }
        path.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            visit(next, graph, path, done);
        }
        path.pop();
        done.insert(node.clone());
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        visit(node, &graph, &mut Vec::new(), &mut done);
    }
    // The check sees the imports it should: the scheduler uses the fabric, the fabric the
    // RNIC rules, and those the model.
    let uses = |a: &[&str], b: &[&str]| {
        let (a, b): (Vec<String>, Vec<String>) = (
            a.iter().map(|s| s.to_string()).collect(),
            b.iter().map(|s| s.to_string()).collect(),
        );
        graph.get(&a).is_some_and(|t| t.contains(&b))
    };
    assert!(uses(&["sched"], &["fabric"]));
    assert!(uses(&["fabric", "soft"], &["rnic", "requester"]));
    assert!(uses(&["rnic", "requester"], &["model", "objects"]));
}
