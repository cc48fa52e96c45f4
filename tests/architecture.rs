//! The source layout is the architecture, and this test keeps it so.
//!
//! Every file under `src/` belongs to one folder (a layer), and each layer may use only the
//! layers below it: the pure engine uses the model alone and no I/O or async crate; the edges
//! (kernel, cluster) use the engine but not each other nor the agent; the tools use the engine
//! and the manifest reader; the agent wires everything. The test reads the code of every file
//! (comments left out) and reports each path that crosses a line it must not, naming the file
//! and line. `docs/architecture.md` must name every module file, so the module map and the
//! folders say the same thing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// What one layer may reach.
struct Layer {
    /// The folder under `src/` (or a top-level file without `.rs`).
    name: &'static str,
    /// Layers whose `crate::…` paths it may use (its own is always allowed).
    may_use: &'static [&'static str],
    /// Whether it must be pure: no I/O crate, no clock, no threads, no async.
    pure: bool,
}

const LAYERS: &[Layer] = &[
    Layer {
        name: "model",
        may_use: &[],
        pure: true,
    },
    Layer {
        name: "engine",
        may_use: &["model"],
        pure: true,
    },
    Layer {
        name: "kernel",
        may_use: &["model", "engine"],
        pure: false,
    },
    Layer {
        name: "cluster",
        may_use: &["model", "engine"],
        pure: false,
    },
    Layer {
        name: "tools",
        may_use: &["model", "engine", "cluster"],
        pure: false,
    },
    Layer {
        name: "agent",
        may_use: &["model", "engine", "kernel", "cluster", "tools"],
        pure: false,
    },
    Layer {
        name: "cli",
        may_use: &["cluster"],
        pure: false,
    },
];

/// Paths a pure layer must not contain: I/O, processes, threads, the clock, async runtimes and
/// the crates of the edges.
const IMPURE: &[&str] = &[
    "std::fs",
    "std::process",
    "std::thread",
    "std::net::TcpStream",
    "std::net::TcpListener",
    "std::net::UdpSocket",
    "std::time::Instant",
    "std::time::SystemTime",
    "std::env",
    "tokio",
    "futures",
    "kube::",
    "axum",
    "hyper",
    "nix::",
    "libc::",
    "rustables",
    "prometheus",
    "tracing",
    "async fn",
    "async move",
    ".await",
];

/// Code of one source line: comments and doc comments dropped.
fn code_of(line: &str) -> &str {
    let trimmed = line.trim_start();
    if trimmed.starts_with("//") {
        return "";
    }
    match line.find(" //") {
        Some(at) => &line[..at],
        None => line,
    }
}

/// Every violation in one file's text, as `line: what`.
fn violations(layer: &Layer, text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = code_of(line);
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let root: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !root.is_empty() && root != layer.name && !layer.may_use.contains(&root.as_str()) {
                out.push(format!(
                    "{}: uses crate::{root}, which {} may not",
                    n + 1,
                    layer.name
                ));
            }
            rest = after;
        }
        if layer.pure {
            for bad in IMPURE {
                if code.contains(bad) {
                    out.push(format!(
                        "{}: `{bad}` in the pure layer {}",
                        n + 1,
                        layer.name
                    ));
                }
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The layer a source file belongs to, by its first path component under `src/`.
fn layer_of(path: &Path) -> Option<&'static Layer> {
    let rel = path.strip_prefix(src()).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    LAYERS.iter().find(|l| l.name == name)
}

#[test]
fn every_source_file_is_in_a_layer() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let top_level_allowed = ["lib.rs", "main.rs"];
    let stray: Vec<String> = files
        .iter()
        .filter(|p| layer_of(p).is_none())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            !(p.parent() == Some(src().as_path()) && top_level_allowed.contains(&name))
        })
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        stray.is_empty(),
        "files outside every layer (add a folder to LAYERS or move them): {stray:?}"
    );
}

#[test]
fn layers_use_only_what_they_may() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut all = Vec::new();
    let mut checked = 0;
    for path in &files {
        let Some(layer) = layer_of(path) else {
            continue;
        };
        let text = std::fs::read_to_string(path).expect("source file");
        checked += 1;
        for v in violations(layer, &text) {
            all.push(format!("{}:{v}", path.display()));
        }
    }
    assert!(
        checked > 30,
        "only {checked} files checked: is src/ laid out as expected?"
    );
    assert!(all.is_empty(), "layering violations:\n{}", all.join("\n"));
}

#[test]
fn the_checker_finds_each_kind_of_violation() {
    let engine = LAYERS.iter().find(|l| l.name == "engine").expect("engine");
    let kernel = LAYERS.iter().find(|l| l.name == "kernel").expect("kernel");
    let cluster = LAYERS
        .iter()
        .find(|l| l.name == "cluster")
        .expect("cluster");
    // (name, layer, source, number of violations)
    let cases: &[(&str, &Layer, &str, usize)] = &[
        (
            "engine may use the model",
            engine,
            "use crate::model::PodInfo;",
            0,
        ),
        (
            "engine may use itself",
            engine,
            "use crate::engine::index::Index;",
            0,
        ),
        (
            "engine must not use the kernel edge",
            engine,
            "use crate::kernel::nft::exec::Nft;",
            1,
        ),
        (
            "engine must not use the agent",
            engine,
            "    crate::agent::denylog::encode_prefix(d)",
            1,
        ),
        (
            "engine must not read files",
            engine,
            "let s = std::fs::read_to_string(p);",
            1,
        ),
        ("engine must not await", engine, "let x = thing.await;", 1),
        ("engine must not log", engine, "tracing::warn!(\"x\");", 1),
        (
            "engine must not read the clock",
            engine,
            "use std::time::Instant;",
            1,
        ),
        (
            "a comment is not code",
            engine,
            "// see crate::agent for the loop",
            0,
        ),
        (
            "a trailing comment is not code",
            engine,
            "let a = 1; // crate::kernel",
            0,
        ),
        (
            "kernel may use the engine",
            kernel,
            "use crate::engine::ruleset::Ruleset;",
            0,
        ),
        (
            "kernel must not use the agent",
            kernel,
            "use crate::agent::metrics::SyncFailure;",
            1,
        ),
        (
            "cluster must not use the agent",
            cluster,
            "use crate::agent::Shared;",
            1,
        ),
        (
            "cluster must not use the kernel",
            cluster,
            "use crate::kernel::dataplane;",
            1,
        ),
        (
            "an edge may do I/O",
            cluster,
            "let s = std::fs::read_to_string(p);",
            0,
        ),
        (
            "two crossings on one line are two violations",
            engine,
            "use crate::agent::x; use crate::tools::y;",
            2,
        ),
    ];
    for (name, layer, source, want) in cases {
        let got = violations(layer, source);
        assert_eq!(got.len(), *want, "case {name:?}: {got:?}");
    }
}

#[test]
fn folder_dependencies_have_no_cycle() {
    // The may-use relation, as written in LAYERS, must be a partial order: walk it depth-first
    // and fail on a back edge.
    fn visit<'a>(
        name: &'a str,
        stack: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Result<(), String> {
        if done.contains(name) {
            return Ok(());
        }
        if stack.contains(&name) {
            return Err(format!("cycle: {} → {name}", stack.join(" → ")));
        }
        stack.push(name);
        let layer = LAYERS.iter().find(|l| l.name == name).expect("layer");
        for next in layer.may_use {
            visit(next, stack, done)?;
        }
        stack.pop();
        done.insert(name);
        Ok(())
    }
    let mut done = BTreeSet::new();
    for layer in LAYERS {
        visit(layer.name, &mut Vec::new(), &mut done).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn architecture_doc_names_every_module_file() {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/architecture.md"))
            .expect("docs/architecture.md");
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let missing: Vec<String> = files
        .iter()
        .filter_map(|p| p.strip_prefix(src()).ok())
        .map(|p| p.display().to_string())
        .filter(|rel| !doc.contains(&format!("`{rel}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/architecture.md's module map does not name these files (as `path`): {missing:?}"
    );
}
