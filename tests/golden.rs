//! Golden rulesets: the rendered script of every example, compared byte for byte, checked by
//! the real `nft` inside a network namespace this test creates, and rendered identically from
//! shuffled input.
//!
//! Re-bless after a deliberate change with `BLESS=1 cargo test --test golden`, then review
//! the diff of `tests/golden/` like code.

use std::path::{Path, PathBuf};
use std::process::Command;

use kube_nftpolicy::cluster::manifest::{self, Manifests};
use kube_nftpolicy::engine::compile::{CompileOptions, compile};
use kube_nftpolicy::engine::resolve::resolve;
use kube_nftpolicy::engine::ruleset::render;

const NODES: [&str; 2] = ["node-1", "node-2"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn examples() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("examples"))
        .expect("examples/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    assert!(
        v.len() >= 10,
        "expected the seed examples, found {}",
        v.len()
    );
    v
}

fn render_manifests(m: Manifests, name: &str, node: &str) -> String {
    let idx = m.into_index();
    let rs = compile(&resolve(&idx.snapshot(), node), &CompileOptions::default());
    render(&rs, &format!("example {name}, node {node}"))
}

/// How an example is rendered: as written, or with Node objects that give each node its pod
/// ranges (`spec.podCIDRs`), so unknown addresses in them fail closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    AsWritten,
    PodCidrs,
}

const VARIANTS: [Variant; 2] = [Variant::AsWritten, Variant::PodCidrs];

/// node-N gets 10.244.N.0/24 and fd00:10:244:N::/64, the ranges the examples' pods use.
fn node_object(node: &str) -> kube_nftpolicy::model::NodeInfo {
    let n = node.trim_start_matches("node-");
    kube_nftpolicy::model::NodeInfo {
        name: node.to_string(),
        labels: Default::default(),
        addresses: Vec::new(),
        pod_cidrs: vec![
            format!("10.244.{n}.0/24").parse().expect("cidr"),
            format!("fd00:10:244:{n}::/64").parse().expect("cidr"),
        ],
    }
}

fn render_example(dir: &Path, node: &str, variant: Variant) -> String {
    let mut m = manifest::load(dir).expect("example loads");
    if variant == Variant::PodCidrs {
        m.nodes.extend(NODES.iter().map(|n| node_object(n)));
    }
    render_manifests(m, &dir.file_name().expect("name").to_string_lossy(), node)
}

fn golden_path(dir: &Path, node: &str, variant: Variant) -> PathBuf {
    let name = dir.file_name().expect("name").to_string_lossy().to_string();
    let suffix = match variant {
        Variant::AsWritten => "",
        Variant::PodCidrs => ".pod-cidrs",
    };
    root()
        .join("tests/golden")
        .join(format!("{name}.{node}{suffix}.nft"))
}

#[test]
fn rendered_rulesets_match_golden_files() {
    let bless = std::env::var_os("BLESS").is_some();
    let mut problems = Vec::new();
    let mut compared = 0;
    for dir in examples() {
        for (node, variant) in NODES.iter().flat_map(|n| VARIANTS.map(|v| (*n, v))) {
            let got = render_example(&dir, node, variant);
            let path = golden_path(&dir, node, variant);
            if bless {
                std::fs::write(&path, &got).expect("write golden");
                continue;
            }
            compared += 1;
            match std::fs::read_to_string(&path) {
                Err(e) => problems.push(format!(
                    "{}: {e} (run with BLESS=1 to create it)",
                    path.display()
                )),
                Ok(want) if want != got => {
                    let line = want
                        .lines()
                        .zip(got.lines())
                        .position(|(a, b)| a != b)
                        .map_or(
                            format!(
                                "lengths differ ({} vs {} lines)",
                                want.lines().count(),
                                got.lines().count()
                            ),
                            |i| {
                                format!(
                                    "line {}: want {:?}, got {:?}",
                                    i + 1,
                                    want.lines().nth(i),
                                    got.lines().nth(i)
                                )
                            },
                        );
                    problems.push(format!("{} differs at {line}", path.display()));
                }
                Ok(_) => {}
            }
        }
    }
    assert!(
        problems.is_empty(),
        "golden mismatches:\n{}",
        problems.join("\n")
    );
    assert!(bless || compared >= 20, "compared only {compared} goldens");
}

/// A network namespace that exists for the duration of a test.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("knpgold{tag}{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip");
        assert!(
            ok.success(),
            "ip netns add {name} failed (these tests need root)"
        );
        Netns(name)
    }

    fn nft(&self, args: &[&str], stdin_file: Option<&Path>) -> (bool, String) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.0, "nft"]).args(args);
        if let Some(f) = stdin_file {
            cmd.arg("-f").arg(f);
        }
        let out = cmd.output().expect("run nft");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn golden_rulesets_load_in_the_kernel() {
    let check = Netns::new("c");
    let chained = Netns::new("l");
    let mut failures = Vec::new();
    let mut previous: Option<PathBuf> = None;
    for dir in examples() {
        for (node, variant) in NODES.iter().flat_map(|n| VARIANTS.map(|v| (*n, v))) {
            let path = golden_path(&dir, node, variant);
            assert!(
                path.exists(),
                "{} missing: run BLESS=1 cargo test --test golden",
                path.display()
            );
            let (ok, out) = check.nft(&["-c"], Some(&path));
            if !ok {
                failures.push(format!("nft -c {}: {out}", path.display()));
                continue;
            }
            // Load over whatever the previous example left: the script must replace it
            // atomically, leaving exactly what a load on an empty machine gives.
            let (ok, out) = chained.nft(&[], Some(&path));
            if !ok {
                failures.push(format!(
                    "nft -f {} over {:?}: {out}",
                    path.display(),
                    previous
                ));
                continue;
            }
            let fresh = Netns::new("f");
            let (ok, out) = fresh.nft(&[], Some(&path));
            assert!(ok, "fresh load of {}: {out}", path.display());
            let (_, want) = fresh.nft(&["list", "table", "inet", "kube-nftpolicy"], None);
            let (_, got) = chained.nft(&["list", "table", "inet", "kube-nftpolicy"], None);
            if want != got {
                failures.push(format!(
                    "{} loaded over {:?} differs from a fresh load",
                    path.display(),
                    previous
                ));
            }
            previous = Some(path);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Flatten every document (and List item) of an example into separate YAML documents.
fn documents(dir: &Path) -> Vec<String> {
    let mut docs = Vec::new();
    for file in manifest::manifest_files(dir).expect("files") {
        let text = std::fs::read_to_string(&file).expect("read");
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v: serde_json::Value = serde::Deserialize::deserialize(doc).expect("yaml");
            if v.is_null() {
                continue;
            }
            match v.get("items").and_then(|i| i.as_array()) {
                Some(items) => docs.extend(
                    items
                        .iter()
                        .map(|i| serde_yaml_ng::to_string(i).expect("yaml")),
                ),
                None => docs.push(serde_yaml_ng::to_string(&v).expect("yaml")),
            }
        }
    }
    docs
}

#[test]
fn shuffled_input_renders_identically() {
    for dir in examples() {
        let name = dir.file_name().expect("name").to_string_lossy().to_string();
        let docs = documents(&dir);
        let orders: Vec<Vec<String>> = vec![
            docs.clone(),
            docs.iter().rev().cloned().collect(),
            docs.iter()
                .skip(docs.len() / 2)
                .chain(docs.iter().take(docs.len() / 2))
                .cloned()
                .collect(),
            {
                // Interleave from both ends.
                let mut v = Vec::new();
                let (mut i, mut j) = (0usize, docs.len());
                while i < j {
                    v.push(docs[i].clone());
                    i += 1;
                    if i < j {
                        j -= 1;
                        v.push(docs[j].clone());
                    }
                }
                v
            },
        ];
        for node in NODES {
            let renders: Vec<String> = orders
                .iter()
                .map(|order| {
                    let text = order.join("---\n");
                    let m = manifest::parse_sources(&[(PathBuf::from("shuffled.yaml"), text)])
                        .expect("parse");
                    render_manifests(m, &name, node)
                })
                .collect();
            for (i, r) in renders.iter().enumerate().skip(1) {
                assert_eq!(
                    &renders[0], r,
                    "{name} on {node}: order {i} renders differently"
                );
            }
            assert_eq!(
                renders[0],
                render_example(&dir, node, Variant::AsWritten),
                "{name}: flattened documents render differently"
            );
        }
    }
}
