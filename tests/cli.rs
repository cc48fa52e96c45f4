//! The `kube-nftpolicy` binary as a user runs it: exit codes and messages for good and bad
//! input to `render`.

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
        assert!(
            stdout.contains(c.stdout_has),
            "{}: stdout: {stdout}",
            c.name
        );
        assert!(
            stderr.contains(c.stderr_has),
            "{}: stderr: {stderr}",
            c.name
        );
        assert!(!stderr.contains("panicked"), "{}: {stderr}", c.name);
    }
}

#[test]
fn explain_exit_codes() {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/04-allow-pod-to-pod-port"
    );
    let run = |from: &str, port: &str| {
        Command::new(env!("CARGO_BIN_EXE_kube-nftpolicy"))
            .args([
                "explain",
                "--manifests",
                example,
                "--from",
                from,
                "--to",
                "default/backend",
                "--port",
                port,
            ])
            .env("NO_COLOR", "1")
            .output()
            .expect("run the binary")
    };
    let ok = run("default/frontend", "8080");
    assert_eq!(ok.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("verdict: ALLOWED"));
    let denied = run("default/frontend", "9090");
    assert_eq!(denied.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&denied.stdout).contains("verdict: DENIED"));
    let bad = run("not-an-endpoint", "80");
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("neither namespace/pod nor an IP address")
    );
}
