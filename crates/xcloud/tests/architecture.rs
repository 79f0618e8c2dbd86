//! The layout stays as docs/architecture.md draws it: the crate graph there is the one in the
//! Cargo.toml files, and no two files of a crate import each other, directly or around a
//! circle. (Cargo already refuses circles between crates.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The workspace members' directories, from the root Cargo.toml.
fn members() -> Vec<String> {
    let manifest = read(&root().join("Cargo.toml"));
    let start = manifest.find("members = [").expect("a members list");
    let end = start + manifest[start..].find(']').expect("the list ends");
    manifest[start..end]
        .split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// A crate's name and the workspace crates it depends on (not dev-dependencies).
fn manifest_deps(dir: &str) -> (String, BTreeSet<String>) {
    let manifest = read(&root().join(dir).join("Cargo.toml"));
    let mut name = None;
    let mut deps = BTreeSet::new();
    let mut section = String::new();
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line.to_string();
        } else if section == "[package]" && line.starts_with("name") {
            name = line.split('"').nth(1).map(str::to_string);
        } else if section == "[dependencies]" && line.starts_with("xcloud") {
            deps.insert(line.split(['.', ' ', '=']).next().unwrap_or_default().to_string());
        }
    }
    (name.expect("a package name"), deps)
}

/// The crate table of docs/architecture.md: crate -> (path, what it may depend on).
fn documented_graph() -> BTreeMap<String, (String, BTreeSet<String>)> {
    let doc = read(&root().join("docs/architecture.md"));
    let start = doc
        .find("<!-- crate-graph -->")
        .expect("docs/architecture.md marks its crate table");
    let end = doc.find("<!-- /crate-graph -->").expect("the crate table ends");
    let mut graph = BTreeMap::new();
    for row in doc[start..end].lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let unquote = |s: &str| s.trim_matches('`').to_string();
        let deps = cells[5]
            .split(',')
            .map(|d| unquote(d.trim()))
            .filter(|d| d.starts_with("xcloud"))
            .collect();
        graph.insert(unquote(cells[1]), (unquote(cells[2]), deps));
    }
    graph
}

#[test]
fn the_crate_graph_in_the_architecture_doc_is_the_one_in_cargo_toml() {
    let documented = documented_graph();
    let mut actual = BTreeMap::new();
    for dir in members() {
        let (name, deps) = manifest_deps(&dir);
        actual.insert(name, (dir, deps));
    }
    for (name, (dir, deps)) in &actual {
        let Some((doc_dir, doc_deps)) = documented.get(name) else {
            panic!("{name} ({dir}) is not in the crate table of docs/architecture.md");
        };
        assert_eq!(doc_dir, dir, "{name}'s path");
        assert_eq!(
            doc_deps, deps,
            "{name}'s dependencies: docs/architecture.md vs {dir}/Cargo.toml"
        );
    }
    let extra: Vec<&String> = documented.keys().filter(|k| !actual.contains_key(*k)).collect();
    assert!(extra.is_empty(), "documented but not in the workspace: {extra:?}");
}

/// The module path of a source file under `src` ("" for lib.rs or main.rs).
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap_or_default();
    match last.as_str() {
        "lib.rs" | "main.rs" | "mod.rs" => {}
        other => parts.push(other.trim_end_matches(".rs").to_string()),
    }
    parts
}

/// The file that defines module `path`, taking as many leading segments as name modules.
fn file_of(src: &Path, path: &[String]) -> Option<PathBuf> {
    let mut found = None;
    for depth in 0..=path.len() {
        let module = &path[..depth];
        let candidates = if module.is_empty() {
            vec![src.join("lib.rs"), src.join("main.rs")]
        } else {
            let dir = module.iter().fold(src.to_path_buf(), |p, m| p.join(m));
            vec![dir.with_extension("rs"), dir.join("mod.rs")]
        };
        match candidates.into_iter().find(|c| c.is_file()) {
            Some(file) => found = Some(file),
            None => break,
        }
    }
    found
}

/// The paths a `use` tree or inline path names, from its start: `a::{b::C, d}` gives
/// `a::b::C` and `a::d`.
fn expand(text: &str) -> Vec<Vec<String>> {
    let mut segments = Vec::new();
    let mut rest = text.trim_start();
    loop {
        let ident: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        if ident.is_empty() {
            break;
        }
        rest = &rest[ident.len()..];
        segments.push(ident);
        match rest.strip_prefix("::") {
            Some(r) => rest = r,
            None => return vec![segments],
        }
    }
    let Some(group) = rest.strip_prefix('{') else {
        return vec![segments];
    };
    let (mut depth, mut start, mut items) = (0, 0, Vec::new());
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(&group[start..i]);
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items
        .into_iter()
        .flat_map(expand)
        .map(|tail| segments.iter().cloned().chain(tail).collect())
        .collect()
}

/// Every path after a `crate::` or `super::` in `code`, with the number of `super::` before
/// it (0 for `crate::`, which starts at the crate root).
fn paths_in(code: &str) -> Vec<(Option<usize>, Vec<String>)> {
    let mut out = Vec::new();
    for (prefix, is_super) in [("crate::", false), ("super::", true)] {
        let mut rest = code;
        while let Some(at) = rest.find(prefix) {
            let before = rest[..at].chars().last();
            rest = &rest[at + prefix.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let mut supers = 1;
            let mut tail = rest;
            while let Some(r) = tail.strip_prefix("super::") {
                supers += 1;
                tail = r;
            }
            for path in expand(tail) {
                out.push((is_super.then_some(supers), path));
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("a source directory").flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Which file of the crate at `src` each file imports.
fn import_graph(src: &Path) -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph = BTreeMap::new();
    for file in files {
        let text = read(&file);
        // Tests sit at the end of a file and may reach anything; comments are not code.
        let code: String = text[..text.find("#[cfg(test)]").unwrap_or(text.len())]
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let here = module_of(src, &file);
        let mut imports = BTreeSet::new();
        for (supers, path) in paths_in(&code) {
            let absolute = match supers {
                Some(ups) => {
                    let mut base = here.clone();
                    base.truncate(base.len().saturating_sub(ups));
                    base.extend(path);
                    base
                }
                None => path,
            };
            if let Some(target) = file_of(src, &absolute) {
                if target != file {
                    imports.insert(target);
                }
            }
        }
        graph.insert(file, imports);
    }
    graph
}

/// A circle of imports, if there is one.
fn find_circle(graph: &BTreeMap<PathBuf, BTreeSet<PathBuf>>) -> Option<Vec<PathBuf>> {
    fn visit(
        node: &PathBuf,
        graph: &BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        stack: &mut Vec<PathBuf>,
        done: &mut BTreeSet<PathBuf>,
    ) -> Option<Vec<PathBuf>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut circle = stack[at..].to_vec();
            circle.push(node.clone());
            return Some(circle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(circle) = visit(next, graph, stack, done) {
                return Some(circle);
            }
        }
        stack.pop();
        done.insert(node.clone());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_two_files_of_a_crate_import_each_other() {
    for dir in members() {
        let src = root().join(&dir).join("src");
        let graph = import_graph(&src);
        if let Some(circle) = find_circle(&graph) {
            let names: Vec<String> = circle
                .iter()
                .map(|f| f.strip_prefix(&src).unwrap_or(f).display().to_string())
                .collect();
            panic!("{dir}: files import each other: {}", names.join(" -> "));
        }
    }
}

#[test]
fn the_import_scanner_sees_a_circle() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("architecture-circle");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("b")).expect("scratch crate");
    let files = [
        ("lib.rs", "mod a;\nmod b;\n"),
        ("a.rs", "use crate::b::{c::Thing, Other};\n"),
        ("b/mod.rs", "pub mod c;\npub struct Other;\n"),
        (
            "b/c.rs",
            "pub struct Thing;\nfn f() { super::super::a::g(); }\n#[cfg(test)]\nuse crate::b;\n",
        ),
    ];
    for (name, text) in files {
        std::fs::write(dir.join(name), text).expect("write");
    }
    let graph = import_graph(&dir);
    let names = |f: &PathBuf| f.strip_prefix(&dir).expect("inside").display().to_string();
    let circle: Vec<String> = find_circle(&graph).expect("a -> b/c -> a").iter().map(names).collect();
    assert!(
        circle.contains(&"a.rs".to_string()) && circle.contains(&"b/c.rs".to_string()),
        "{circle:?}"
    );
    std::fs::write(dir.join("b/c.rs"), "pub struct Thing;\n").expect("write");
    assert!(find_circle(&import_graph(&dir)).is_none());
}

#[test]
fn the_crates_that_parse_untrusted_input_deny_unwrap_and_expect() {
    for dir in [
        "crates/state",
        "crates/vm-core",
        "crates/devices",
        "crates/vmm",
        "crates/snapshot",
        "crates/migration",
        "crates/api",
    ] {
        let lib = read(&root().join(dir).join("src/lib.rs"));
        assert!(
            lib.contains("#![deny(clippy::unwrap_used, clippy::expect_used)]"),
            "{dir}/src/lib.rs must deny unwrap and expect (docs/architecture.md)"
        );
    }
}
