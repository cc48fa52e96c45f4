//! The ClusterNetworkPolicy CRD offered in `deploy/crd/` is the one generated from our API
//! types (`model::cnp_api`, kube's `CustomResource` derive), byte for byte, and it keeps the
//! upstream v0.2.0 shape: group, version, kind, scope, names, printer columns, the limits of
//! the schema and the CEL rules we reproduce. Regenerate after a deliberate change with
//! `BLESS=1 cargo test --test crd` and read the diff.

use kube::CustomResourceExt;
use kube_nftpolicy::model::cnp_api::ClusterNetworkPolicy;
use serde_json::Value;

const PATH: &str = "deploy/crd/clusternetworkpolicies.yaml";

fn generated() -> String {
    let crd = ClusterNetworkPolicy::crd();
    format!(
        "# Generated from kube_nftpolicy::model::cnp_api by `BLESS=1 cargo test --test crd`; do not edit.\n\
         # The upstream CRD (network-policy-api v0.2.0, config/crd/experimental/) is the one to\n\
         # install where possible; this one serves the same API for clusters without it.\n{}",
        serde_yaml_ng::to_string(&crd).expect("yaml")
    )
}

#[test]
fn deployed_crd_is_the_generated_one() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(PATH);
    let want = generated();
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(&path, &want).expect("write CRD");
    }
    let have = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{PATH}: {e} (run BLESS=1 cargo test --test crd)"));
    assert!(
        have == want,
        "{PATH} is not what the API types generate; run BLESS=1 cargo test --test crd and review the diff"
    );
}

fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, k| &v[k])
}

#[test]
fn generated_crd_has_the_upstream_shape() {
    let crd = serde_json::to_value(ClusterNetworkPolicy::crd()).expect("json");
    let cases: [(&str, Value); 8] = [
        (
            "metadata.name",
            "clusternetworkpolicies.policy.networking.k8s.io".into(),
        ),
        ("spec.group", "policy.networking.k8s.io".into()),
        ("spec.scope", "Cluster".into()),
        ("spec.names.kind", "ClusterNetworkPolicy".into()),
        ("spec.names.plural", "clusternetworkpolicies".into()),
        ("spec.names.shortNames", serde_json::json!(["cnp"])),
        ("spec.versions.0.name", "v1alpha2".into()),
        ("spec.versions.0.subresources.status", serde_json::json!({})),
    ];
    for (path, want) in cases {
        let got = path.split('.').fold(&crd, |v, k| match k.parse::<usize>() {
            Ok(i) => &v[i],
            Err(_) => &v[k],
        });
        assert_eq!(got, &want, "{path}");
    }
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let props = &spec["properties"];
    assert_eq!(
        at(props, "tier.enum"),
        &serde_json::json!(["Admin", "Baseline"])
    );
    assert_eq!(at(props, "priority.minimum"), &serde_json::json!(0.0));
    assert_eq!(at(props, "priority.maximum"), &serde_json::json!(1000.0));
    assert_eq!(at(props, "ingress.maxItems"), &serde_json::json!(25));
    assert_eq!(at(props, "egress.maxItems"), &serde_json::json!(25));
    let required: Vec<&str> = spec["required"]
        .as_array()
        .expect("required")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for field in ["tier", "priority", "subject"] {
        assert!(
            required.contains(&field),
            "spec.{field} is required: {required:?}"
        );
    }
    let text = serde_json::to_string(&crd).expect("json");
    for rule in [
        "self.start < self.end",
        "networks/nodes/domainNames peer cannot be set with namedPorts",
    ] {
        assert!(text.contains(rule), "CEL rule {rule:?} is in the CRD");
    }
}
