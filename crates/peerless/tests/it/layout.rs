//! The source tree's shape, checked: every file opens with a line saying what it is for, and
//! no crate's top-level modules import each other in a cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

const CRATES: [&str; 4] = ["peerless-core", "peerless-ml", "peerless-runtime", "peerless"];

#[test]
fn every_source_file_opens_with_what_it_is_for() {
    let mut files = Vec::new();
    for c in CRATES {
        for sub in ["src", "tests", "benches"] {
            let d = workspace().join("crates").join(c).join(sub);
            if d.is_dir() {
                rust_files(&d, &mut files);
            }
        }
    }
    assert!(files.len() > 50, "{files:?}");
    let bare: Vec<&PathBuf> =
        files.iter().filter(|f| !std::fs::read_to_string(f).unwrap().starts_with("//!")).collect();
    assert!(bare.is_empty(), "files without an opening `//!` line: {bare:?}");
}

/// Top-level module → the top-level modules it names (`crate::x`), test code left out.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src).unwrap();
        let top =
            rel.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_owned();
        if top == "lib" || top == "main" || f.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let deps = graph.entry(top.clone()).or_default();
        for part in code.split("crate::").skip(1) {
            let name: String = part.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !name.is_empty() && name != top {
                deps.insert(name);
            }
        }
    }
    graph
}

fn reaches(graph: &BTreeMap<String, BTreeSet<String>>, from: &str, to: &str) -> bool {
    let (mut seen, mut stack) = (BTreeSet::new(), vec![from.to_owned()]);
    while let Some(m) = stack.pop() {
        if m == to {
            return true;
        }
        if seen.insert(m.clone()) {
            stack.extend(graph.get(&m).into_iter().flatten().cloned());
        }
    }
    false
}

#[test]
fn no_crate_has_an_import_cycle_between_its_modules() {
    for c in CRATES {
        let graph = module_graph(&workspace().join("crates").join(c).join("src"));
        assert!(graph.len() >= 3, "{c}: {graph:?}");
        let cycles: Vec<(String, String)> = graph
            .iter()
            .flat_map(|(a, deps)| deps.iter().map(move |b| (a.clone(), b.clone())))
            .filter(|(a, b)| reaches(&graph, b, a))
            .collect();
        assert!(cycles.is_empty(), "{c}: modules importing each other (a → b → … → a): {cycles:?}");
    }
}
