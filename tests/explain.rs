//! `explain` against every seed example's expectations (the same truth the kernel tests check
//! with real packets, answered without a kernel); the structured answer and its text; named
//! ports; and `explain --kubeconfig` against the fake API server over real HTTP, which must
//! answer exactly as `explain --manifests` does on the same objects.

#[path = "support/examples.rs"]
mod examples;
#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use examples::{example_dirs, expectations};
use fake_apiserver::{FakeApiServer, objects_from_yaml};
use kube_nftpolicy::engine::index::Snapshot;
use kube_nftpolicy::model::{Family, ObjectKey, Protocol};
use kube_nftpolicy::tools::explain::{
    Endpoint, ExplainError, PortQuery, PortRef, SideStatus, explain,
};

const BIN: &str = env!("CARGO_BIN_EXE_kube-nftpolicy");

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

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

fn snapshot(dir: &Path) -> Snapshot {
    let m = kube_nftpolicy::cluster::manifest::load(dir).expect("manifests");
    let idx = m.into_index();
    idx.snapshot()
}

fn ep(s: &str) -> Endpoint {
    s.parse().expect("endpoint")
}

fn port(s: &str) -> PortQuery {
    s.parse().expect("port")
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
            let x = explain(
                &snap,
                &from,
                &to,
                &PortQuery::number(protocol, e.port),
                family,
            )
            .expect("explainable");
            checked += 1;
            if x.allowed != e.allowed {
                failures.push(format!(
                    "{}: want {}, got:\n{}",
                    dir.display(),
                    e.allowed,
                    x.to_text()
                ));
            }
            // The parts agree with the whole.
            assert_eq!(
                x.allowed,
                x.egress.allowed && x.ingress.allowed,
                "{}",
                x.to_text()
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(checked >= 200, "only {checked} probes explained");
}

#[test]
fn reports_name_the_deciding_policies_and_rules() {
    let snap = snapshot(&example("04-allow-pod-to-pod-port"));
    let ok = explain(
        &snap,
        &ep("default/frontend"),
        &ep("default/backend"),
        &port("8080"),
        None,
    )
    .expect("ok");
    assert!(ok.allowed);
    assert_eq!(ok.egress.status, SideStatus::NotIsolated);
    assert_eq!(ok.ingress.status, SideStatus::Allowed);
    assert_eq!(
        ok.ingress.isolated_by,
        vec!["default/allow-frontend-to-backend"]
    );
    assert_eq!(ok.ingress.allowed_by.len(), 1);
    assert_eq!(ok.ingress.allowed_by[0].rule, "ingress[0]");
    let text = ok.to_text();
    assert!(
        text.contains("ingress of default/backend (on node-1): allowed by default/allow-frontend-to-backend (ingress[0])"),
        "{text}"
    );
    assert!(
        text.contains("default/allow-frontend-to-backend ingress[0]: allows it (peer from[0] pods app=frontend in namespace default, port TCP/8080)"),
        "{text}"
    );

    // Denied: the peer does not match (wrong namespace), the port does.
    let no = explain(
        &snap,
        &ep("production/web"),
        &ep("default/backend"),
        &port("8080/TCP"),
        None,
    )
    .expect("ok");
    assert!(!no.allowed);
    assert_eq!(no.ingress.status, SideStatus::Denied);
    let rule = &no.ingress.policies[0].rules[0];
    assert!(!rule.allows && !rule.peer.matched && rule.port.matched);
    let text = no.to_text();
    assert!(
        text.contains("DENIED: isolated by default/allow-frontend-to-backend"),
        "{text}"
    );
    assert!(
        text.contains("ingress[0]: no (peer from[0] pods app=frontend in namespace default does not match; port TCP/8080 matches)"),
        "{text}"
    );

    // Denied: the peer matches, the protocol does not.
    let udp = explain(
        &snap,
        &ep("default/frontend"),
        &ep("default/backend"),
        &port("8080/udp"),
        None,
    )
    .expect("ok");
    let rule = &udp.ingress.policies[0].rules[0];
    assert!(!udp.allowed && rule.peer.matched && !rule.port.matched);
}

#[test]
fn egress_side_and_invalid_policies_are_explained() {
    // Example 09: the frontend's egress is isolated by two policies; TCP 53 is denied at the
    // source, UDP 53 allowed by the `to: []` rule.
    let snap = snapshot(&example("09-frontend-egress"));
    let tcp = explain(
        &snap,
        &ep("default/frontend"),
        &ep("203.0.113.53"),
        &port("53/TCP"),
        None,
    )
    .expect("ok");
    assert!(!tcp.allowed);
    assert_eq!(tcp.egress.status, SideStatus::Denied);
    assert_eq!(
        tcp.egress.isolated_by,
        vec!["default/allow-dns-and-api", "default/restrict-egress"]
    );
    assert_eq!(tcp.ingress.status, SideStatus::NotPoliced);
    assert_eq!(tcp.to.name, "external");
    let udp = explain(
        &snap,
        &ep("default/frontend"),
        &ep("203.0.113.53"),
        &port("53/UDP"),
        None,
    )
    .expect("ok");
    assert!(udp.allowed, "{}", udp.to_text());
    assert_eq!(udp.egress.allowed_by[0].rule, "egress[1]");
    assert!(
        udp.to_text().contains(
            "default/allow-dns-and-api egress[1]: allows it (peer any (no `to`), port UDP/53)"
        ),
        "{}",
        udp.to_text()
    );

    // An invalid policy isolates and says why it allows nothing.
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("bad.yaml");
    std::fs::write(
        &f,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: ns, labels: {app: a}}\nspec: {nodeName: n1}\nstatus: {podIPs: [{ip: 10.0.0.1}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: ns}\nspec: {nodeName: n1}\nstatus: {podIPs: [{ip: 10.0.0.2}]}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: ns}\nspec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}}]}]}\n",
    )
    .expect("write");
    let snap = snapshot(&f);
    let x = explain(&snap, &ep("ns/b"), &ep("ns/a"), &port("80"), None).expect("ok");
    assert!(!x.allowed);
    let invalid = x.ingress.policies[0].invalid.as_deref().unwrap_or_default();
    assert!(
        invalid.contains("10.1.0.0/24 is not inside cidr 10.0.0.0/16"),
        "{invalid}"
    );
    assert!(
        x.to_text()
            .contains("ns/bad: invalid (spec.ingress[0].from[0].ipBlock.except[0]"),
        "{}",
        x.to_text()
    );
}

#[test]
fn named_ports_resolve_on_the_destination_pod() {
    let snap = snapshot(&example("04-allow-pod-to-pod-port"));
    // default/frontend names TCP 80 `http`; backend → frontend TCP 80 is allowed.
    let x = explain(
        &snap,
        &ep("default/backend"),
        &ep("default/frontend"),
        &port("http"),
        None,
    )
    .expect("named port");
    assert_eq!((x.port, x.named_port.as_deref()), (80, Some("http")));
    assert!(x.allowed);
    assert!(
        x.to_text()
            .contains("TCP/80 (named port http of default/frontend)")
    );

    struct Case {
        name: &'static str,
        to: &'static str,
        port: &'static str,
        want: &'static str,
    }
    let cases = [
        Case {
            name: "the pod does not declare the name",
            to: "default/backend",
            port: "http",
            want: "named port http/TCP: pod default/backend declares no such container port (it has: http-alt/TCP = 8080",
        },
        Case {
            name: "the name exists for another protocol",
            to: "default/frontend",
            port: "http/UDP",
            want: "declares no such container port",
        },
        Case {
            name: "the destination is not a pod",
            to: "203.0.113.10",
            port: "http",
            want: "the destination external is not a pod",
        },
        Case {
            name: "unknown pod",
            to: "default/nope",
            port: "80",
            want: "pod default/nope is not in the cluster state",
        },
    ];
    for c in cases {
        let err = explain(
            &snap,
            &ep("default/backend"),
            &ep(c.to),
            &port(c.port),
            None,
        )
        .expect_err(c.name)
        .to_string();
        assert!(err.contains(c.want), "{}: {err}", c.name);
    }
}

#[test]
fn port_and_endpoint_syntax() {
    struct Case {
        text: &'static str,
        want: Result<(PortRef, Protocol), &'static str>,
    }
    let cases = [
        Case {
            text: "80",
            want: Ok((PortRef::Number(80), Protocol::Tcp)),
        },
        Case {
            text: "53/UDP",
            want: Ok((PortRef::Number(53), Protocol::Udp)),
        },
        Case {
            text: "53/udp",
            want: Ok((PortRef::Number(53), Protocol::Udp)),
        },
        Case {
            text: "http",
            want: Ok((PortRef::Name("http".into()), Protocol::Tcp)),
        },
        Case {
            text: "diameter/SCTP",
            want: Ok((PortRef::Name("diameter".into()), Protocol::Sctp)),
        },
        Case {
            text: "0",
            want: Err("a port number must be 1-65535"),
        },
        Case {
            text: "70000",
            want: Err("a port number must be 1-65535"),
        },
        Case {
            text: "80/ICMP",
            want: Err("the protocol must be TCP, UDP or SCTP"),
        },
        Case {
            text: "/TCP",
            want: Err("no port before the protocol"),
        },
        Case {
            text: "HTTP",
            want: Err("a port name is 1-15 lower-case letters"),
        },
    ];
    for c in cases {
        let got = c.text.parse::<PortQuery>();
        match (&got, &c.want) {
            (Ok(q), Ok((port, protocol))) => {
                assert_eq!((&q.port, q.protocol), (port, *protocol), "{}", c.text);
            }
            (Err(e), Err(want)) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(want) && msg.contains(c.text),
                    "{}: {msg}",
                    c.text
                );
            }
            _ => panic!("{}: got {got:?}", c.text),
        }
    }
    assert!(matches!(
        "not an endpoint".parse::<Endpoint>(),
        Err(ExplainError::Endpoint(_))
    ));
    assert_eq!(
        "ns/pod".parse::<Endpoint>(),
        Ok(Endpoint::Pod(ObjectKey::new("ns", "pod")))
    );
    assert!(matches!(
        "fd00::1".parse::<Endpoint>(),
        Ok(Endpoint::Address(_))
    ));
}

// ───────────────────────────── --kubeconfig ─────────────────────────────

fn run(args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("explain")
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("KUBECONFIG");
    for v in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
    ] {
        cmd.env_remove(v);
    }
    cmd.output().expect("run the binary")
}

/// Every object of an example's manifests into the API server (List items one by one).
fn load_example(server: &FakeApiServer, dir: &Path) {
    for f in kube_nftpolicy::cluster::manifest::manifest_files(dir).expect("files") {
        let text = std::fs::read_to_string(&f).expect("read");
        for obj in objects_from_yaml(&text) {
            match obj.get("items").and_then(|i| i.as_array()) {
                Some(items) => {
                    for item in items {
                        server.apply(item.clone());
                    }
                }
                None => {
                    server.apply(obj);
                }
            }
        }
    }
}

#[test]
fn kubeconfig_answers_as_the_manifests_do() {
    let dir = example("09-frontend-egress");
    let server = FakeApiServer::new();
    load_example(&server, &dir);
    let tmp = tempfile::tempdir().expect("tempdir");
    let kubeconfig = tmp.path().join("kubeconfig");
    server
        .write_kubeconfig(&kubeconfig)
        .expect("write kubeconfig");
    let kc = kubeconfig.to_str().expect("utf-8");
    let manifests = dir.to_str().expect("utf-8");

    let exp = expectations(&dir);
    let mut compared = 0;
    for e in exp.probes.iter().filter(|e| !e.from.starts_with("node:")) {
        let to = e.to.strip_prefix("ip:").unwrap_or(&e.to);
        let to = match to.strip_prefix("node:") {
            Some(_) => continue,
            None => to,
        };
        let from = e.from.strip_prefix("ip:").unwrap_or(&e.from);
        let port = format!("{}/{}", e.port, e.protocol);
        let mut args = vec![
            "--from", from, "--to", to, "--port", &port, "--output", "json",
        ];
        if e.family == Some(6) {
            args.extend(["--family", "6"]);
        }
        let live = run(&[&["--kubeconfig", kc][..], &args].concat());
        let offline = run(&[&["--manifests", manifests][..], &args].concat());
        let what = format!("{} → {} {port}", e.from, e.to);
        assert_eq!(
            live.status.code(),
            Some(if e.allowed { 0 } else { 3 }),
            "{what}: {}",
            String::from_utf8_lossy(&live.stderr)
        );
        let answer: serde_json::Value = serde_json::from_slice(&live.stdout)
            .unwrap_or_else(|err| panic!("{what}: not JSON ({err})"));
        assert_eq!(answer["allowed"], e.allowed, "{what}");
        assert_eq!(
            String::from_utf8_lossy(&live.stdout),
            String::from_utf8_lossy(&offline.stdout),
            "{what}: the live answer differs from the manifests' answer"
        );
        compared += 1;
    }
    assert!(compared >= 15, "only {compared} probes compared");
    // The objects really came over HTTP: one list of each kind.
    for path in [
        "/api/v1/namespaces",
        "/api/v1/pods",
        "/apis/networking.k8s.io/v1/networkpolicies",
    ] {
        assert!(
            server.request_count("list", path) >= compared,
            "{path}: {} lists",
            server.request_count("list", path)
        );
    }
}

#[test]
fn kubeconfig_errors_are_clear() {
    let server = FakeApiServer::new();
    let tmp = tempfile::tempdir().expect("tempdir");
    let kubeconfig = tmp.path().join("kubeconfig");
    server
        .write_kubeconfig(&kubeconfig)
        .expect("write kubeconfig");
    let kc = kubeconfig.to_str().expect("utf-8");
    let args = ["--from", "a/b", "--to", "a/c", "--port", "80"];

    // Reachable, but the pod does not exist.
    let out = run(&[&["--kubeconfig", kc][..], &args[..]].concat());
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pod a/b is not in the cluster state"),
        "{stderr}"
    );

    // The API server refuses the list.
    server.set_fail_next_verb("list", 1, 403);
    let out = run(&[&["--kubeconfig", kc][..], &args[..]].concat());
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("listing namespaces from the API server"),
        "{stderr}"
    );

    // The API server is gone.
    server.stop();
    let out = run(&[&["--kubeconfig", kc][..], &args[..]].concat());
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("listing namespaces from the API server"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    // Exactly one source.
    let out = run(&args);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--manifests"));
    let out = run(&[&["--kubeconfig", kc, "--manifests", "x"][..], &args[..]].concat());
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
}

#[test]
fn an_unknown_address_in_a_nodes_pod_ranges_is_explained_as_dropped() {
    // Example 13 with a Node object giving node-1 its pod range.
    let dir = tempfile::tempdir().expect("tempdir");
    let src = example("13-nginx-walkthrough");
    for f in ["cluster.yaml", "policies.yaml"] {
        std::fs::copy(src.join(f), dir.path().join(f)).expect("copy");
    }
    std::fs::write(
        dir.path().join("node.yaml"),
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-1}\nspec: {podCIDRs: [10.244.1.0/24]}\n",
    )
    .expect("write node");
    let m = dir.path().to_str().expect("utf-8");
    // (name, to, exit status, text the answer must contain)
    let cases = [
        (
            "unknown address in node-1's range",
            "10.244.1.99",
            3,
            "DROPPED: the address is in the pod ranges of node-1 but is not a known pod there",
        ),
        (
            "a known pod in the range is judged by its policies",
            "10.244.1.13",
            0,
            "allowed",
        ),
        (
            "an address outside every range is not policed",
            "10.99.0.1",
            0,
            "not policed",
        ),
    ];
    for (name, to, status, text) in cases {
        let out = run(&[
            "--manifests",
            m,
            "--from",
            "192.0.2.1",
            "--to",
            to,
            "--port",
            "80",
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(status), "{name}: {stdout}");
        assert!(stdout.contains(text), "{name}: want {text:?} in\n{stdout}");
    }
    let out = run(&[
        "--manifests",
        m,
        "--from",
        "192.0.2.1",
        "--to",
        "10.244.1.99",
        "--port",
        "80",
        "--output",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["ingress"]["status"], "unknown-address", "{v}");
    assert_eq!(v["ingress"]["node"], "node-1", "{v}");
    assert_eq!(v["allowed"], false);

    // /debug/explain's path: ranges from the agent's --pod-cidr, without a Node object.
    let snap = snapshot(&example("13-nginx-walkthrough"));
    let e = kube_nftpolicy::tools::explain::Explainer::new(&snap)
        .with_pod_cidrs("node-1", vec!["10.244.1.0/24".parse().expect("cidr")])
        .explain(&ep("192.0.2.1"), &ep("10.244.1.99"), &port("80"), None)
        .expect("explain");
    assert_eq!(e.ingress.status, SideStatus::UnknownAddress);
    assert!(!e.allowed);
    let plain = explain(
        &snap,
        &ep("192.0.2.1"),
        &ep("10.244.1.99"),
        &port("80"),
        None,
    )
    .expect("explain");
    assert!(
        plain.allowed,
        "without known ranges the address is not policed"
    );
}

/// A pod asked about its own address is allowed whatever isolates it: the packet never leaves
/// the pod (the kernel tests probe it: `selfProbes` in `tests/e2e/cnp/`). Another pod of the
/// same namespace is still denied, so the policy is in force.
#[test]
fn a_pod_reaching_itself_is_allowed() {
    let snap = snapshot(&example("03-default-deny-all"));
    let own = explain(
        &snap,
        &ep("default/web"),
        &ep("default/web"),
        &port("80"),
        None,
    )
    .expect("ok");
    assert!(own.allowed);
    for side in [&own.egress, &own.ingress] {
        assert_eq!(side.status, SideStatus::SelfTraffic);
        assert_eq!(side.decided_by, "self");
        assert!(side.policies.is_empty() && side.isolated_by.is_empty());
    }
    let text = own.to_text();
    assert!(
        text.contains("a pod reaching its own address never leaves it"),
        "{text}"
    );
    let other = explain(
        &snap,
        &ep("default/web"),
        &ep("default/db"),
        &port("80"),
        None,
    )
    .expect("ok");
    assert!(!other.allowed, "{}", other.to_text());
}

/// Staged policies: each is judged alone against today's verdict, in the direction it
/// selects; today's verdict ignores them (example 18).
#[test]
fn staged_policies_are_judged_against_today() {
    let snap = snapshot(&example("18-staged-policy"));
    // (from, to, port, verdict today, [(staged policy, direction, with it, change)])
    type Want = &'static [(&'static str, &'static str, &'static str, &'static str)];
    let cases: [(&str, &str, &str, bool, Want); 5] = [
        (
            "default/client",
            "default/web",
            "80",
            false,
            &[(
                "default/allow-client-to-web",
                "ingress",
                "allowed",
                "would-allow",
            )],
        ),
        (
            "default/remote-client",
            "default/web",
            "80",
            false,
            &[(
                "default/allow-client-to-web",
                "ingress",
                "allowed",
                "would-allow",
            )],
        ),
        (
            "other/client",
            "default/web",
            "80",
            false,
            &[("default/allow-client-to-web", "ingress", "denied", "none")],
        ),
        (
            "default/web",
            "other/server",
            "8080",
            true,
            &[("other/lock-down-server", "ingress", "denied", "would-deny")],
        ),
        (
            "other/client",
            "other/server",
            "8080",
            true,
            &[("other/lock-down-server", "ingress", "allowed", "none")],
        ),
    ];
    for (from, to, p, today, want) in cases {
        let e = explain(&snap, &ep(from), &ep(to), &port(p), None).expect("explains");
        let name = format!("{from} -> {to}:{p}");
        assert_eq!(
            e.allowed, today,
            "{name}: today's verdict ignores staged policies"
        );
        let got: Vec<(String, &str, &str, &str)> = e
            .staged
            .iter()
            .map(|s| (s.policy.clone(), s.direction, s.with_staged, s.change))
            .collect();
        let want: Vec<(String, &str, &str, &str)> = want
            .iter()
            .map(|(p, d, w, c)| (p.to_string(), *d, *w, *c))
            .collect();
        assert_eq!(got, want, "{name}");
        let text = e.to_text();
        for s in &e.staged {
            let line = format!(
                "staged {} ({}): today: {}; with staged {}: {}",
                s.policy,
                s.direction,
                if today { "allowed" } else { "denied" },
                s.policy,
                s.with_staged
            );
            assert!(text.contains(&line), "{name}: {line:?} in\n{text}");
        }
    }
    // Not selected by any staged policy: nothing to say.
    let e = explain(
        &snap,
        &ep("default/web"),
        &ep("other/client"),
        &port("80"),
        None,
    )
    .expect("explains");
    assert!(e.staged.is_empty());
    assert!(!e.to_text().contains("staged"));
}

/// Staged ClusterNetworkPolicies: the first one reached with a matching rule, judged against
/// today, named with its rule (example 19).
#[test]
fn staged_cluster_network_policies_are_judged_against_today() {
    let snap = snapshot(&example("19-staged-cluster-network-policy"));
    // (from, to, port, today, Some((policy, direction, with it, change, rule)) or None)
    type Want = Option<(
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
    )>;
    let cases: [(&str, &str, &str, bool, Want, &str); 4] = [
        (
            "team-b/app",
            "team-a/db",
            "8080",
            false,
            Some((
                "team-b-to-db",
                "ingress",
                "allowed",
                "would-allow",
                "spec.ingress[0] (team-b-app): Accept",
            )),
            "staged Admin ClusterNetworkPolicy team-b-to-db (ingress): today: denied; with staged Admin ClusterNetworkPolicy team-b-to-db: allowed by its rule spec.ingress[0] (team-b-app): Accept (counted as would-allow)",
        ),
        (
            "team-a/db",
            "team-b/app",
            "8080",
            true,
            Some((
                "quarantine-db",
                "egress",
                "denied",
                "would-deny",
                "spec.egress[0] (no-team-b): Deny",
            )),
            "staged Admin ClusterNetworkPolicy quarantine-db (egress): today: allowed; with staged Admin ClusterNetworkPolicy quarantine-db: denied by its rule spec.egress[0] (no-team-b): Deny (counted as would-deny)",
        ),
        // Port 9090 from team-b: team-b-to-db's rule is 8080 only.
        ("team-b/app", "team-a/db", "9090", false, None, ""),
        // monitoring → db:9090: allow-monitoring (priority 10) accepts before team-b-to-db.
        ("monitoring/prometheus", "team-a/db", "9090", true, None, ""),
    ];
    for (from, to, p, today, want, line) in cases {
        let e = explain(&snap, &ep(from), &ep(to), &port(p), None).expect("explains");
        let name = format!("{from} -> {to}:{p}");
        assert_eq!(
            e.allowed, today,
            "{name}: today's verdict ignores staged policies"
        );
        let got = e.staged.first().map(|s| {
            (
                s.policy.as_str(),
                s.direction,
                s.with_staged,
                s.change,
                s.rule.as_deref().unwrap_or(""),
            )
        });
        assert_eq!(got, want, "{name}");
        assert_eq!(e.staged.len(), usize::from(want.is_some()), "{name}");
        let text = e.to_text();
        if want.is_some() {
            assert!(text.contains(line), "{name}: {line:?} in\n{text}");
            let json = serde_json::to_value(&e).expect("json");
            assert_eq!(json["staged"][0]["tier"], "admin", "{name}");
        } else {
            assert!(!text.contains("staged"), "{name}:\n{text}");
        }
    }
}
