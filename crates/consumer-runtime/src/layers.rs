//! The crate's modules import only downward: a check over the source text.
//!
//! Each top-level module (a file under `src/`, or a folder with its submodules) is a node; a
//! `crate::m` path in its code (comments and doc comments do not count) is an edge to `m`. A
//! path through a re-export at the crate root (`crate::Error`) counts as an edge to the module
//! that defines it. Test-only code is not part of the layers (like the integration tests, it
//! sits above the whole crate): a module's `tests.rs` and the `test_support` module are left
//! out. The test fails on any cycle and names it; `cargo test -p consumer-runtime
//! --lib layers -- --nocapture` prints the layers, lowest first.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The module's source files: `src/m.rs`, or everything under `src/m/` but its `tests.rs`.
fn files(path: &Path) -> Vec<PathBuf> {
    if path.file_name().is_some_and(|n| n == "tests.rs") {
        Vec::new()
    } else if path.is_dir() {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(path).unwrap() {
            out.extend(files(&entry.unwrap().path()));
        }
        out
    } else if path.extension().is_some_and(|e| e == "rs") {
        vec![path.to_owned()]
    } else {
        Vec::new()
    }
}

/// The source without comments (line comments, doc comments) and string literals' contents
/// are kept: `crate::` never appears inside the crate's strings.
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The identifiers that follow `crate::` in `code`.
fn crate_paths(code: &str) -> BTreeSet<String> {
    code.match_indices("crate::")
        .filter(|(i, _)| {
            // Not `pub(crate)::…` nor part of a longer identifier such as `my_crate::`.
            !code[..*i].ends_with(|c: char| c.is_alphanumeric() || c == '_')
        })
        .map(|(i, m)| {
            code[i + m.len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|s| !s.is_empty())
        .collect()
}

/// Which module each name re-exported at the crate root comes from (`pub use m::{A, B}`).
fn root_exports(lib: &str) -> BTreeMap<String, String> {
    let lib = code(lib);
    let mut out = BTreeMap::new();
    for stmt in lib.split(';') {
        let Some(rest) = stmt.trim().strip_prefix("pub use ") else {
            continue;
        };
        let Some((module, names)) = rest.split_once("::") else {
            continue;
        };
        let names = names.trim().trim_start_matches('{').trim_end_matches('}');
        for name in names.split(',') {
            let name = name.split("::").last().unwrap_or_default().trim();
            let name = name.rsplit(" as ").next().unwrap_or_default().trim();
            if !name.is_empty() {
                out.insert(name.to_owned(), module.trim().to_owned());
            }
        }
    }
    out
}

fn graph() -> Graph {
    let src = src();
    let modules: BTreeSet<String> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_stem()
                .is_some_and(|s| s != "lib" && s != "layers" && s != "test_support")
        })
        .filter(|p| p.is_dir() || p.extension().is_some_and(|e| e == "rs"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    let exports = root_exports(&std::fs::read_to_string(src.join("lib.rs")).unwrap());
    let mut graph = Graph::new();
    for module in &modules {
        let path = if src.join(module).is_dir() {
            src.join(module)
        } else {
            src.join(format!("{module}.rs"))
        };
        let mut edges = BTreeSet::new();
        for file in files(&path) {
            for name in crate_paths(&code(&std::fs::read_to_string(&file).unwrap())) {
                let target = if modules.contains(&name) {
                    name
                } else if let Some(m) = exports.get(&name) {
                    m.clone()
                } else {
                    continue;
                };
                if &target != module {
                    edges.insert(target);
                }
            }
        }
        graph.insert(module.clone(), edges);
    }
    graph
}

/// A cycle of `graph`, if it has one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &Graph,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

/// The modules by layer: each imports only from layers below it.
fn layers(graph: &Graph) -> Vec<Vec<String>> {
    let mut placed: BTreeSet<String> = BTreeSet::new();
    let mut out = Vec::new();
    while placed.len() < graph.len() {
        let layer: Vec<String> = graph
            .iter()
            .filter(|(n, edges)| !placed.contains(*n) && edges.iter().all(|e| placed.contains(e)))
            .map(|(n, _)| n.clone())
            .collect();
        assert!(!layer.is_empty(), "a cycle is left: {graph:?}");
        placed.extend(layer.iter().cloned());
        out.push(layer);
    }
    out
}

#[test]
fn modules_import_only_downward() {
    let graph = graph();
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "import cycle among the crate's modules: {}",
            cycle.join(" -> ")
        );
    }
    for (i, layer) in layers(&graph).iter().enumerate() {
        println!("L{i}  {}", layer.join(", "));
    }
}

#[test]
fn the_check_sees_paths_and_cycles() {
    let paths = crate_paths(&code(
        "use crate::store::{Backend};\n// crate::replay in a comment\npub(crate) fn f() -> crate::Error {}",
    ));
    assert_eq!(
        paths,
        BTreeSet::from(["store".to_owned(), "Error".to_owned()])
    );
    let exports = root_exports(
        "pub use error::{BoxError, Error};\npub use store::{\n    Backend, Store,\n};",
    );
    assert_eq!(exports["Error"], "error");
    assert_eq!(exports["Store"], "store");
    let mut graph = Graph::new();
    graph.insert("a".into(), BTreeSet::from(["b".to_owned()]));
    graph.insert("b".into(), BTreeSet::from(["c".to_owned()]));
    graph.insert("c".into(), BTreeSet::new());
    assert_eq!(find_cycle(&graph), None);
    assert_eq!(layers(&graph), vec![vec!["c"], vec!["b"], vec!["a"]]);
    graph.get_mut("c").unwrap().insert("a".to_owned());
    assert_eq!(find_cycle(&graph).unwrap(), vec!["a", "b", "c", "a"]);
}
