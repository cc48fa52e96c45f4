//! `explain` (the pure evaluator behind it) against every seed example's expectations: the
//! same truth the kernel tests check with real packets, answered without a kernel.

use std::path::PathBuf;

use kube_nftpolicy::explain::{Endpoint, explain};
use kube_nftpolicy::index::{Index, Snapshot};
use kube_nftpolicy::model::{Family, Protocol};
use serde::Deserialize;

#[derive(Deserialize)]
struct Expectations {
    probes: Vec<Expected>,
}

#[derive(Deserialize)]
struct Expected {
    from: String,
    to: String,
    port: u16,
    protocol: String,
    allowed: bool,
    #[serde(default)]
    family: Option<u8>,
}

fn endpoint(s: &str) -> Option<Endpoint> {
    if s.starts_with("node:") {
        return None; // node addresses are not in the manifests
    }
    Some(
        s.strip_prefix("ip:")
            .unwrap_or(s)
            .parse()
            .expect("endpoint"),
    )
}

fn snapshot(dir: &std::path::Path) -> Snapshot {
    let m = kube_nftpolicy::manifest::load(dir).expect("manifests");
    let mut idx = Index::new();
    idx.reset_namespaces(m.namespaces);
    idx.reset_pods(m.pods);
    idx.reset_policies(m.policies);
    idx.snapshot()
}

#[test]
fn explain_agrees_with_every_example() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("examples")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("expect/probes.yaml").exists())
        .collect();
    dirs.sort();
    let (mut checked, mut failures) = (0, Vec::new());
    for dir in dirs {
        let snap = snapshot(&dir);
        let text = std::fs::read_to_string(dir.join("expect/probes.yaml")).expect("read");
        let exp: Expectations = serde_yaml_ng::from_str(&text).expect("yaml");
        for e in exp.probes {
            let (Some(from), Some(to)) = (endpoint(&e.from), endpoint(&e.to)) else {
                continue;
            };
            let protocol = Protocol::parse(Some(&e.protocol)).expect("protocol");
            let family = (e.family == Some(6)).then_some(Family::V6);
            let x = explain(&snap, &from, &to, protocol, e.port, family).expect("explainable");
            checked += 1;
            if x.allowed != e.allowed {
                failures.push(format!(
                    "{}: want {}, got:\n{}",
                    dir.display(),
                    e.allowed,
                    x.report
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(checked >= 200, "only {checked} probes explained");
}

#[test]
fn reports_name_the_deciding_policies() {
    let snap = snapshot(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/04-allow-pod-to-pod-port"),
    );
    let ep = |s: &str| s.parse::<Endpoint>().expect("endpoint");
    let ok = explain(
        &snap,
        &ep("default/frontend"),
        &ep("default/backend"),
        Protocol::Tcp,
        8080,
        None,
    )
    .expect("ok");
    assert!(ok.allowed);
    assert!(
        ok.report.contains("ingress of default/backend (on node-1): allowed by default/allow-frontend-to-backend (ingress[0])"),
        "{}",
        ok.report
    );
    let no = explain(
        &snap,
        &ep("production/web"),
        &ep("default/backend"),
        Protocol::Tcp,
        8080,
        None,
    )
    .expect("ok");
    assert!(!no.allowed);
    assert!(
        no.report
            .contains("DENIED: isolated by default/allow-frontend-to-backend"),
        "{}",
        no.report
    );
    assert!(
        explain(
            &snap,
            &ep("default/nope"),
            &ep("default/backend"),
            Protocol::Tcp,
            1,
            None
        )
        .is_err()
    );
    assert!("not an endpoint".parse::<Endpoint>().is_err());
}
