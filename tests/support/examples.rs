#![allow(dead_code)]
//! The seed examples in `examples/` and the connectivity each must produce
//! (`examples/<name>/expect/probes.yaml`), shared by the kernel and the explain tests.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// `expect/probes.yaml`.
#[derive(Deserialize)]
pub struct Expectations {
    pub probes: Vec<ExpectedProbe>,
}

/// One expected connection attempt. Endpoints: `ns/pod`, `node:<name>`, `ip:<address>`.
#[derive(Deserialize)]
pub struct ExpectedProbe {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: String,
    pub allowed: bool,
    #[serde(default)]
    pub why: String,
    /// `6` to probe over IPv6.
    #[serde(default)]
    pub family: Option<u8>,
}

/// Every example directory that has expectations, sorted.
pub fn example_dirs() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut v: Vec<PathBuf> = std::fs::read_dir(root)
        .expect("examples/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("expect/probes.yaml").exists())
        .collect();
    v.sort();
    v
}

/// Read an example's expectations.
pub fn expectations(dir: &Path) -> Expectations {
    let path = dir.join("expect/probes.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
