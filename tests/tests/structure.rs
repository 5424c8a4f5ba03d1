//! The house rules on structure, checked on the sources: no module imports a module that
//! imports it back (directly or around a longer circle), no source file grows past 500
//! lines and no function reaches 70. A module and its own submodules count as one (a parent re-exporting what its
//! children define, the children using the parent's types, is how Rust folders work); any
//! other reference, `use crate::a::b` or a path `crate::a::b::f()`, is an arrow from the
//! file's module to the deepest module of the path.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Source roots of the workspace's crates.
const CRATES: &[&str] = &[
    "vmm/src",
    "migration/src",
    "cpuid/src",
    "benches/src",
    "tests/src",
];

/// The integration tests' folders: their files keep the same size rule.
const TEST_DIRS: &[&str] = &["tests/tests", "migration/tests", "cpuid/tests", "tests/src"];

/// The longest file the house style accepts.
const MAX_LINES: usize = 500;
/// The longest function it accepts, signature to closing brace.
const MAX_FN_LINES: usize = 69;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `a::b` for src/a/b.rs and src/a/b/mod.rs; "" for lib.rs and main.rs.
fn module_of(root: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(root).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts.join("::")
}

/// Every `crate::` path in `text` (grouped `use crate::{a, b::c}` included), without the
/// `crate::`, as its segments; `super::` paths resolved against `module`.
fn paths(text: &str, module: &str) -> Vec<Vec<String>> {
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = Vec::new();
    let parent: Vec<String> = {
        let mut p: Vec<String> = module
            .split("::")
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        p.pop();
        p
    };
    for (prefix, base) in [("crate::", Vec::new()), ("super::", parent)] {
        let mut rest = code.as_str();
        while let Some(at) = rest.find(prefix) {
            let before = rest[..at].chars().last();
            rest = &rest[at + prefix.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    let segs = segments(item.trim());
                    out.push(base.iter().cloned().chain(segs).collect());
                }
            } else {
                out.push(base.iter().cloned().chain(segments(rest)).collect());
            }
        }
    }
    out
}

fn segments(s: &str) -> Vec<String> {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(s.len());
    s[..end]
        .split("::")
        .filter(|p| !p.is_empty())
        .map(String::from)
        .collect()
}

/// The arrows between the modules of one crate.
fn arrows(root: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(root, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(root, f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let from = module_of(root, f);
        let text = std::fs::read_to_string(f).unwrap();
        for path in paths(&text, &from) {
            // The deepest module file the path names.
            let to = (0..=path.len())
                .rev()
                .map(|n| path[..n].join("::"))
                .find(|m| modules.contains(m))
                .unwrap_or_default();
            let related = to.is_empty()
                || from == to
                || from.starts_with(&format!("{to}::"))
                || to.starts_with(&format!("{from}::"));
            if !related {
                graph.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    graph
}

/// A circle of arrows, if there is one (depth-first search).
fn circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        node: &str,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|n| n == node) {
            let mut c = stack[i..].to_vec();
            c.push(node.to_string());
            return Some(c);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_string());
        for next in g.get(node).into_iter().flatten() {
            if let Some(c) = visit(g, next, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(graph, n, &mut Vec::new(), &mut done))
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let mut total = 0;
    for c in CRATES {
        let graph = arrows(&repo().join(c));
        total += graph.values().map(BTreeSet::len).sum::<usize>();
        if let Some(circle) = circle(&graph) {
            panic!("{c}: an import circle: {}", circle.join(" -> "));
        }
    }
    assert!(total > 50, "only {total} arrows found: the scan is broken");
}

#[test]
fn the_scan_finds_a_circle_where_there_is_one() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    assert_eq!(circle(&g), None);
    g.entry("c".into()).or_default().insert("a".into());
    assert_eq!(circle(&g).unwrap().len(), 4);
    let p = paths(
        "use crate::{vm::Vm, devices::manager::{A, B}};\nsuper::x::f()",
        "m::n",
    );
    assert!(
        p.contains(&vec!["vm".to_string(), "Vm".to_string()]),
        "{p:?}"
    );
    assert!(
        p.contains(&vec!["m".to_string(), "x".to_string(), "f".to_string()]),
        "{p:?}"
    );
}

/// Every source file of the crates and the integration tests.
fn every_file() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for c in CRATES.iter().chain(TEST_DIRS) {
        rust_files(&repo().join(c), &mut files);
    }
    files.sort();
    files.dedup();
    files
}

#[test]
fn no_source_file_is_over_500_lines() {
    let files = every_file();
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let n = std::fs::read_to_string(f).unwrap().lines().count();
            (n > MAX_LINES).then(|| format!("{} ({n} lines)", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "files over {MAX_LINES} lines: {long:?}");
}

/// The functions of `text` (name, lines from `fn` to its closing brace): a `fn` line
/// (after any `pub`, `const`, `async`, `unsafe`) whose body closes at the same indentation.
fn functions(text: &str) -> Vec<(String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let body = line.trim_start();
        let indent = &line[..line.len() - body.len()];
        let mut words = body.split_whitespace().skip_while(|w| {
            w.starts_with("pub") || matches!(*w, "const" | "async" | "unsafe" | "extern")
        });
        let is_fn = words.next() == Some("fn") && !line.trim_end().ends_with(';');
        let name = words
            .next()
            .unwrap_or("")
            .split(['(', '<'])
            .next()
            .unwrap_or("");
        if !is_fn {
            i += 1;
            continue;
        }
        let close = format!("{indent}}}");
        let end = (i..lines.len())
            .find(|&j| lines[j].trim_end() == close || (j == i && line.trim_end().ends_with('}')))
            .unwrap_or(i);
        out.push((name.to_string(), end - i + 1));
        i = end + 1;
    }
    out
}

#[test]
fn the_function_scan_measures_a_function() {
    let text = "fn a() {\n    x();\n}\n\nimpl B {\n    pub(crate) fn c(\n        d: u8,\n    ) {\n    }\n    fn e();\n}\n";
    let f = functions(text);
    assert_eq!(f, vec![("a".to_string(), 3), ("c".to_string(), 4)]);
}

#[test]
fn no_function_reaches_70_lines() {
    let mut long = Vec::new();
    for f in every_file() {
        for (name, n) in functions(&std::fs::read_to_string(&f).unwrap()) {
            if n > MAX_FN_LINES {
                long.push(format!("{}: {name} ({n} lines)", f.display()));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FN_LINES} lines: {long:?}"
    );
}

/// All the workspace's Rust sources, as one text.
fn all_sources() -> String {
    let mut files = Vec::new();
    for c in CRATES {
        rust_files(&repo().join(c), &mut files);
    }
    files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

fn has_word(text: &str, word: &str) -> bool {
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().last();
        let after = text[i + word.len()..].chars().next();
        let boundary = |c: Option<char>| !c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        boundary(before) && boundary(after)
    })
}

#[test]
fn design_md_names_only_what_exists() {
    let design = std::fs::read_to_string(repo().join("docs/design.md")).unwrap();
    // The layout: a line at column 0 names a directory; indented lines under it start with
    // the files and folders in it.
    let layout = design
        .split("## 1. Layout")
        .nth(1)
        .and_then(|s| s.split("```").nth(1))
        .expect("section 1's layout block");
    let mut root = PathBuf::new();
    let mut missing = Vec::new();
    let mut checked = 0;
    for line in layout.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if !line.starts_with(' ') && first.ends_with('/') {
            root = repo().join(first);
            if !root.is_dir() {
                missing.push(first.to_string());
            }
            checked += 1;
        } else if line.starts_with("  ") && !line.starts_with("   ") {
            // The first word, and the next while one ends with a comma (`main.rs, cli/`).
            for word in line.split_whitespace() {
                let name = word.trim_end_matches(',');
                if name.ends_with(".rs") || (name.ends_with('/') && name.len() > 1) {
                    if !root.join(name).exists() {
                        missing.push(format!("{}{name}", root.display()));
                    }
                    checked += 1;
                }
                if !word.ends_with(',') {
                    break;
                }
            }
        }
    }
    // Names in backticks with a path (`Vm::save_state`, `api::wire`): both ends exist.
    let src = all_sources();
    for quoted in design.split('`').skip(1).step_by(2) {
        let q = quoted.split('(').next().unwrap_or("");
        let segs: Vec<&str> = q.split("::").collect();
        let ident = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || c == '_');
        if segs.len() < 2 || !segs.iter().all(|s| ident(s)) || segs[0] == "std" {
            continue;
        }
        for s in [segs[0], segs[segs.len() - 1]] {
            if !has_word(&src, s) {
                missing.push(format!("`{q}`: {s}"));
            }
        }
        checked += 1;
    }
    assert!(checked > 40, "only {checked} names checked");
    assert!(
        missing.is_empty(),
        "docs/design.md names what does not exist: {missing:?}"
    );
}

/// Paths of the repository that a document quotes (`vmm/src/vcpu/msrs.rs`, `tests/tests/`):
/// words under one of the workspace's top folders, ending in a file name or `/`.
fn quoted_paths(text: &str) -> Vec<String> {
    const ROOTS: [&str; 8] = [
        "vmm/",
        "migration/",
        "cpuid/",
        "tests/",
        "benches/",
        "fuzz/",
        "scripts/",
        "docs/",
    ];
    text.split(|c: char| c.is_whitespace() || "`()[],;:'\"<>*".contains(c))
        .map(|w| w.trim_end_matches('.'))
        .filter(|w| ROOTS.iter().any(|r| w.starts_with(r)) && !w.contains("..") && !w.contains('{'))
        .filter(|w| {
            w.ends_with(".rs") || w.ends_with(".md") || w.ends_with(".sh") || w.ends_with('/')
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn the_docs_quote_only_paths_that_exist() {
    let mut missing = Vec::new();
    let mut checked = 0;
    let docs = [
        "README.md",
        "docs/design.md",
        "docs/migration-format.md",
        "docs/cross-vendor.md",
        "docs/cpuid.md",
        "docs/api.md",
        "fuzz/README.md",
    ];
    for doc in docs {
        let text = std::fs::read_to_string(repo().join(doc)).unwrap();
        for path in quoted_paths(&text) {
            checked += 1;
            if !repo().join(&path).exists() {
                missing.push(format!("{doc}: {path}"));
            }
        }
    }
    assert!(checked > 20, "only {checked} paths checked");
    assert!(
        missing.is_empty(),
        "the docs quote paths that do not exist: {missing:?}"
    );
}
