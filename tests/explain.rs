//! `explain` (the pure evaluator behind it) against every seed example's expectations: the
//! same truth the kernel tests check with real packets, answered without a kernel.

#[path = "support/examples.rs"]
mod examples;

use std::path::PathBuf;

use examples::{example_dirs, expectations};

use kube_nftpolicy::explain::{Endpoint, explain};
use kube_nftpolicy::index::{Index, Snapshot};
use kube_nftpolicy::model::{Family, Protocol};

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
    let (mut checked, mut failures) = (0, Vec::new());
    for dir in example_dirs() {
        let snap = snapshot(&dir);
        let exp = expectations(&dir);
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
