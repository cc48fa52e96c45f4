//! The `kube-nftpolicy` binary as a user runs it: exit codes and messages for good and bad
//! input to `render`, `explain` and `matrix`; and every `kube-nftpolicy` command shown in
//! `docs/explain.md` still prints exactly the output shown there.

use std::process::Command;

fn render(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kube-nftpolicy"))
        .arg("render")
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("NODE_NAME")
        .output()
        .expect("run the binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn render_cases() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p.to_string_lossy().into_owned()
    };
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/13-nginx-walkthrough");
    let malformed = write("bad.yaml", "kind: Pod\n---\nkind: [unclosed\n");
    let unknown = write(
        "deploy.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\n",
    );
    let invalid = write(
        "invalid.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: shop}\nspec: {podSelector: {}, ingress: [{ports: [{port: 80, endPort: 70}]}]}\n",
    );
    struct Case {
        name: &'static str,
        args: Vec<String>,
        ok: bool,
        stdout_has: &'static str,
        stderr_has: &'static str,
    }
    let cases = [
        Case {
            name: "--pod-cidr adds the fail-closed rules",
            args: vec![
                "--manifests".into(),
                example.into(),
                "--node".into(),
                "node-1".into(),
                "--pod-cidr".into(),
                "10.244.1.0/24".into(),
            ],
            ok: true,
            stdout_has: "ip daddr @pod-cidrs-v4 ip daddr != @local-pods-v4 goto unknown-address/ingress/drop",
            stderr_has: "",
        },
        Case {
            name: "a bad --pod-cidr fails naming the flag and value",
            args: vec![
                "--manifests".into(),
                example.into(),
                "--node".into(),
                "node-1".into(),
                "--pod-cidr".into(),
                "10.244.1.0/33".into(),
            ],
            ok: false,
            stdout_has: "",
            stderr_has: "--pod-cidr 10.244.1.0/33",
        },
        Case {
            name: "an example renders",
            args: vec![
                "--manifests".into(),
                example.into(),
                "--node".into(),
                "node-1".into(),
            ],
            ok: true,
            stdout_has: "table inet kube-nftpolicy {",
            stderr_has: "",
        },
        Case {
            name: "a missing path fails naming it",
            args: vec![
                "--manifests".into(),
                "/nonexistent/x".into(),
                "--node".into(),
                "n".into(),
            ],
            ok: false,
            stdout_has: "",
            stderr_has: "cannot read /nonexistent/x",
        },
        Case {
            name: "malformed YAML fails naming file and document",
            args: vec!["--manifests".into(), malformed, "--node".into(), "n".into()],
            ok: false,
            stdout_has: "",
            stderr_has: "bad.yaml: document 2: malformed YAML",
        },
        Case {
            name: "an unknown kind is a warning",
            args: vec!["--manifests".into(), unknown, "--node".into(), "n".into()],
            ok: true,
            stdout_has: "table inet kube-nftpolicy {",
            stderr_has: "kind Deployment (Deployment shop/web) is not used",
        },
        Case {
            name: "an invalid policy is a warning naming the field",
            args: vec!["--manifests".into(), invalid, "--node".into(), "n".into()],
            ok: true,
            stdout_has: "table inet kube-nftpolicy {",
            stderr_has: "spec.ingress[0].ports[0]: endPort 70 must not be less than port 80",
        },
        Case {
            name: "the node is required",
            args: vec!["--manifests".into(), example.into()],
            ok: false,
            stdout_has: "",
            stderr_has: "--node",
        },
    ];
    for c in cases {
        let args: Vec<&str> = c.args.iter().map(String::as_str).collect();
        let (ok, stdout, stderr) = render(&args);
        assert_eq!(ok, c.ok, "{}: stderr: {stderr}", c.name);
        assert_output(c.name, &stdout, c.stdout_has, &stderr, c.stderr_has);
    }
}

/// A case's output holds what it should, and nothing panicked.
fn assert_output(name: &str, stdout: &str, stdout_has: &str, stderr: &str, stderr_has: &str) {
    assert!(stdout.contains(stdout_has), "{name}: stdout: {stdout}");
    assert!(stderr.contains(stderr_has), "{name}: stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{name}: {stderr}");
}

fn kube_nftpolicy(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kube-nftpolicy"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("NO_COLOR", "1")
        .env_remove("NODE_NAME")
        .output()
        .expect("run the binary")
}

#[test]
fn explain_cases() {
    let example = "examples/04-allow-pod-to-pod-port";
    struct Case {
        name: &'static str,
        args: &'static [&'static str],
        code: i32,
        stdout_has: &'static str,
        stderr_has: &'static str,
    }
    let cases = [
        Case {
            name: "allowed: exit 0",
            args: &[
                "--from",
                "default/frontend",
                "--to",
                "default/backend",
                "--port",
                "8080",
            ],
            code: 0,
            stdout_has: "verdict: ALLOWED",
            stderr_has: "",
        },
        Case {
            name: "denied: exit 3",
            args: &[
                "--from",
                "default/frontend",
                "--to",
                "default/backend",
                "--port",
                "9090",
            ],
            code: 3,
            stdout_has: "verdict: DENIED",
            stderr_has: "",
        },
        Case {
            name: "protocol in the port",
            args: &[
                "--from",
                "default/frontend",
                "--to",
                "default/backend",
                "--port",
                "8080/UDP",
            ],
            code: 3,
            stdout_has: "UDP/8080",
            stderr_has: "",
        },
        Case {
            name: "the older --protocol still works",
            args: &[
                "--from",
                "default/frontend",
                "--to",
                "default/backend",
                "--port",
                "8080",
                "--protocol",
                "UDP",
            ],
            code: 3,
            stdout_has: "UDP/8080",
            stderr_has: "",
        },
        Case {
            name: "the protocol given twice",
            args: &[
                "--from",
                "default/frontend",
                "--to",
                "default/backend",
                "--port",
                "8080/TCP",
                "--protocol",
                "UDP",
            ],
            code: 1,
            stdout_has: "",
            stderr_has: "--port 8080/TCP already names a protocol; drop --protocol UDP",
        },
        Case {
            name: "a named port",
            args: &[
                "--from",
                "default/frontend",
                "--to",
                "default/backend",
                "--port",
                "http-alt",
            ],
            code: 0,
            stdout_has: "TCP/8080 (named port http-alt of default/backend)",
            stderr_has: "",
        },
        Case {
            name: "a named port the destination does not declare",
            args: &[
                "--from",
                "default/frontend",
                "--to",
                "default/backend",
                "--port",
                "http",
            ],
            code: 1,
            stdout_has: "",
            stderr_has: "pod default/backend declares no such container port",
        },
        Case {
            name: "json",
            args: &[
                "--from",
                "production/web",
                "--to",
                "default/backend",
                "--port",
                "8080",
                "--output",
                "json",
            ],
            code: 3,
            stdout_has: "\"verdict\": \"denied\"",
            stderr_has: "",
        },
        Case {
            name: "IPv6",
            args: &[
                "--from",
                "default/frontend",
                "--to",
                "default/backend",
                "--port",
                "8080",
                "--family",
                "6",
            ],
            code: 0,
            stdout_has: "(fd00:10:244:1::11) TCP/8080",
            stderr_has: "",
        },
        Case {
            name: "bad endpoint",
            args: &[
                "--from",
                "not-an-endpoint",
                "--to",
                "default/backend",
                "--port",
                "80",
            ],
            code: 1,
            stdout_has: "",
            stderr_has: "neither namespace/pod nor an IP address",
        },
        Case {
            name: "bad port",
            args: &[
                "--from",
                "default/frontend",
                "--to",
                "default/backend",
                "--port",
                "99999",
            ],
            code: 1,
            stdout_has: "",
            stderr_has: "port \"99999\": a port number must be 1-65535",
        },
        Case {
            name: "bad family",
            args: &[
                "--from",
                "default/frontend",
                "--to",
                "default/backend",
                "--port",
                "80",
                "--family",
                "5",
            ],
            code: 1,
            stdout_has: "",
            stderr_has: "--family 5: want 4 or 6",
        },
        Case {
            name: "no source of state",
            args: &[
                "--from",
                "default/frontend",
                "--to",
                "default/backend",
                "--port",
                "80",
            ],
            code: 2,
            stdout_has: "",
            stderr_has: "--manifests",
        },
    ];
    for c in cases {
        let source: &[&str] = if c.name == "no source of state" {
            &[]
        } else {
            &["--manifests", example]
        };
        let out = kube_nftpolicy(&[&["explain"][..], source, c.args].concat());
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(c.code),
            "{}: {stdout}{stderr}",
            c.name
        );
        assert_output(c.name, &stdout, c.stdout_has, &stderr, c.stderr_has);
    }
    // JSON is one document with both sides.
    let out = kube_nftpolicy(&[
        "explain",
        "--manifests",
        example,
        "--from",
        "default/frontend",
        "--to",
        "default/backend",
        "--port",
        "8080",
        "--output",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["allowed"], true);
    assert_eq!(v["egress"]["status"], "not-isolated");
    assert_eq!(v["ingress"]["allowed_by"][0]["rule"], "ingress[0]");
}

#[test]
fn matrix_cases() {
    let example = "examples/04-allow-pod-to-pod-port";
    let out = kube_nftpolicy(&[
        "matrix",
        "--manifests",
        example,
        "--namespace",
        "default",
        "--port",
        "8080",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("8080/TCP (rows: from, columns: to; . allowed, X denied)")
    );
    let header: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
    assert_eq!(
        header,
        [
            "default/backend",
            "default/frontend",
            "default/frontend-2",
            "default/other"
        ]
    );
    // Into backend on 8080: the frontends (and backend itself), not `other`.
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    let column: Vec<&str> = rows.iter().map(|r| r[1]).collect();
    assert_eq!(column, [".", ".", ".", "X"], "{text}");

    let out = kube_nftpolicy(&["matrix", "--manifests", example, "--output", "json"]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["tables"][0]["port"], "80/TCP", "the default port");
    assert_eq!(v["pods"].as_array().map(Vec::len), Some(7));

    let out = kube_nftpolicy(&["matrix", "--manifests", example, "--namespace", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("namespace nope has no pods"), "{stderr}");
    let out = kube_nftpolicy(&["matrix", "--manifests", example, "--port", "80/GRE"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the protocol must be TCP, UDP or SCTP"),
        "{stderr}"
    );
}

/// Every console block of docs/explain.md that runs `kube-nftpolicy` is run again from the
/// repository root; its stdout must be exactly what the page shows.
#[test]
fn docs_explain_shows_real_output() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/explain.md");
    let doc = std::fs::read_to_string(path).expect("docs/explain.md");
    let fence = "```console\n";
    let mut checked = Vec::new();
    let mut rest = doc.as_str();
    while let Some(start) = rest.find(fence) {
        let block = &rest[start + fence.len()..];
        let end = block.find("\n```").expect("closed block");
        let (command, shown) = block[..end].split_once('\n').unwrap_or((&block[..end], ""));
        rest = &block[end..];
        let Some(args) = command.strip_prefix("$ kube-nftpolicy ") else {
            continue; // curl against a running agent: see tests/admin_http.rs
        };
        let args: Vec<&str> = args.split_whitespace().collect();
        let out = kube_nftpolicy(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            stdout.trim_end_matches('\n'),
            shown,
            "docs/explain.md: `{command}` prints something else now"
        );
        checked.push(args[0].to_string());
    }
    for cmd in ["explain", "matrix", "lint"] {
        assert!(
            checked.iter().filter(|c| *c == cmd).count() >= 2,
            "docs/explain.md shows fewer than two `{cmd}` runs: {checked:?}"
        );
    }
}

#[test]
fn lint_rule_hits_sums_nodes_and_names_a_bad_file() {
    let both = kube_nftpolicy(&[
        "lint",
        "--manifests",
        "examples/13-nginx-walkthrough",
        "--rule-hits",
        "tests/rule-hits/node-1.json",
        "--rule-hits",
        "tests/rule-hits/node-2.json",
    ]);
    let stdout = String::from_utf8_lossy(&both.stdout);
    assert!(both.status.success(), "warnings only: {stdout}");
    let never: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("warning[never-matched]"))
        .collect();
    assert_eq!(never.len(), 1, "{stdout}");
    assert!(
        never[0].contains("allow-from-trusted-namespace spec.ingress[0]")
            && never[0].contains("any of the 2 nodes"),
        "{stdout}"
    );
    // Without the node that carried allow-nginx's and allow-except-untrusted's traffic, those
    // rules are not reported: node-2 never had them.
    let one = kube_nftpolicy(&[
        "lint",
        "--manifests",
        "examples/13-nginx-walkthrough",
        "--rule-hits",
        "tests/rule-hits/node-2.json",
    ]);
    let stdout = String::from_utf8_lossy(&one.stdout);
    assert_eq!(stdout.matches("never-matched").count(), 1, "{stdout}");
    assert!(stdout.contains("on the node read"), "{stdout}");

    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("hits.json");
    std::fs::write(&bad, "{\"rules\": 3}").expect("write");
    let out = kube_nftpolicy(&[
        "lint",
        "--manifests",
        "examples/13-nginx-walkthrough",
        "--rule-hits",
        bad.to_str().expect("utf-8"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("hits.json: not a /debug/rule-hits document"),
        "{stderr}"
    );
}
