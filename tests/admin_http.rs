//! The admin endpoints over real HTTP: readiness transitions, drop-counter snapshots, every
//! metric's HELP/TYPE, the scrape passing `promtool check metrics`, and `/debug/explain`
//! answering from the published cluster state (503 before there is one, 400/404 on bad
//! questions).
//!
//! Requests are written by hand on a `TcpStream` (HTTP/1.1, `Connection: close`) so the test
//! exercises exactly what the kubelet and Prometheus see on the wire.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kube_nftpolicy::agent::admin::{self, AdminError, Health, LiveSnapshot};
use kube_nftpolicy::agent::metrics::{
    Direction, DropCounter, Metrics, RulesetStats, SuppressReason, SyncFailure, SyncKind,
    WatchResource,
};
use kube_nftpolicy::engine::index::{Index, Snapshot};
use kube_nftpolicy::tools::explain::{Endpoint, PortQuery, explain};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const PROMTOOL: &str = "/usr/bin/promtool";

struct Server {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), AdminError>>,
}

impl Server {
    async fn start(metrics: Arc<Metrics>, health: Arc<Health>) -> Server {
        Server::start_with(metrics, health, Arc::new(LiveSnapshot::default())).await
    }

    async fn start_with(
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        live: Arc<LiveSnapshot>,
    ) -> Server {
        let listener = admin::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let task = tokio::spawn(admin::serve(listener, metrics, health, live, shutdown));
        Server { addr, stop, task }
    }

    /// Stops the server and checks that it shut down cleanly.
    async fn stop(self) {
        let _ = self.stop.send(());
        let result = tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server stops within 10s")
            .expect("server task did not panic");
        assert!(result.is_ok(), "serve returned {result:?}");
    }

    async fn get(&self, path: &str) -> Reply {
        get(self.addr, path).await
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    content_type: Option<String>,
    body: String,
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write request");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("response within 10s")
        .expect("read response");
    let raw = String::from_utf8(raw).expect("response is UTF-8");

    let (head, body) = raw.split_once("\r\n\r\n").expect("header/body separator");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status code");
    let mut content_type = None;
    let mut content_length = None;
    for line in lines {
        let (name, value) = line.split_once(':').expect("header line");
        let value = value.trim().to_owned();
        match name.to_ascii_lowercase().as_str() {
            "content-type" => content_type = Some(value),
            "content-length" => content_length = Some(value.parse::<usize>().expect("length")),
            "transfer-encoding" => panic!("unexpected transfer-encoding {value}"),
            _ => {}
        }
    }
    assert_eq!(
        content_length,
        Some(body.len()),
        "content-length matches body"
    );
    Reply {
        status,
        content_type,
        body: body.to_owned(),
    }
}

fn new_metrics() -> Arc<Metrics> {
    Arc::new(Metrics::new().expect("metrics"))
}

/// Pipes `scrape` into `promtool check metrics` and fails with its output unless it passes.
fn assert_promtool_accepts(scrape: &str) {
    let mut child = Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run {PROMTOOL} (it must be installed): {err}"));
    child
        .stdin
        .take()
        .expect("promtool stdin")
        .write_all(scrape.as_bytes())
        .expect("write scrape to promtool");
    let output = child.wait_with_output().expect("wait for promtool");
    assert!(
        output.status.success(),
        "promtool check metrics failed ({}):\nstdout: {}\nstderr: {}\nscrape:\n{scrape}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
}

/// The sample lines (not comments) of one metric family, in scrape order.
fn samples<'a>(scrape: &'a str, family: &str) -> Vec<&'a str> {
    scrape
        .lines()
        .filter(|line| {
            line.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .collect()
}

#[tokio::test]
async fn healthz_is_ok_while_running() {
    let server = Server::start(
        new_metrics(),
        Arc::new(Health::new(Duration::from_secs(60))),
    )
    .await;
    let reply = server.get("/healthz").await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "ok"));
    server.stop().await;
}

#[tokio::test]
async fn readyz_follows_cache_sync_and_sync_age() {
    // Small enough that going stale takes a fraction of a second, large enough that the
    // "ready" request right after a success cannot miss it on a loaded machine.
    let max_age = Duration::from_millis(500);
    let health = Arc::new(Health::new(max_age));
    let server = Server::start(new_metrics(), Arc::clone(&health)).await;

    let reply = server.get("/readyz").await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (503, "caches not synced")
    );

    health.mark_caches_synced();
    let reply = server.get("/readyz").await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (503, "no successful sync yet")
    );

    // A failure before any success changes nothing: there is still no success.
    health.record_sync_failure();
    let reply = server.get("/readyz").await;
    assert_eq!(reply.status, 503);

    let synced_at = Instant::now();
    health.record_sync_success(synced_at);
    let reply = server.get("/readyz").await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "ok"));

    // Let the success age past max_age, then a failed sync must not refresh it.
    let stale_at = synced_at + max_age + Duration::from_millis(100);
    tokio::time::sleep_until(stale_at.into()).await;
    health.record_sync_failure();
    let reply = server.get("/readyz").await;
    assert_eq!(reply.status, 503, "{reply:?}");
    assert!(
        reply.body.starts_with("last successful sync ") && reply.body.contains(" ago"),
        "{reply:?}"
    );
    assert!(reply.body.ends_with("(1 failed since)"), "{reply:?}");

    // A new success makes it ready again.
    health.record_sync_success(Instant::now());
    let reply = server.get("/readyz").await;
    assert_eq!(reply.status, 200, "{reply:?}");

    server.stop().await;
}

fn drop_counter(
    namespace: &str,
    pod: &str,
    direction: Direction,
    packets: u64,
    bytes: u64,
) -> DropCounter {
    DropCounter {
        namespace: namespace.to_owned(),
        pod: pod.to_owned(),
        direction,
        packets,
        bytes,
    }
}

#[tokio::test]
async fn drop_counters_expose_the_latest_snapshot() {
    let metrics = new_metrics();
    let server = Server::start(Arc::clone(&metrics), Arc::new(Health::new(Duration::MAX))).await;

    metrics.set_drop_counters(vec![
        drop_counter("shop", "web-0", Direction::Ingress, 12, 1_500),
        drop_counter("shop", "web-0", Direction::Egress, 3, 180),
        drop_counter("db", "pg-0", Direction::Ingress, 7, 420),
    ]);
    let reply = server.get("/metrics").await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.content_type.as_deref(),
        Some("text/plain; version=0.0.4")
    );
    let scrape = reply.body;
    assert!(
        scrape.contains("# TYPE kube_nftpolicy_dropped_packets_total counter\n"),
        "{scrape}"
    );
    assert!(
        scrape.contains("# TYPE kube_nftpolicy_dropped_bytes_total counter\n"),
        "{scrape}"
    );
    assert_eq!(
        samples(&scrape, "kube_nftpolicy_dropped_packets_total"),
        [
            r#"kube_nftpolicy_dropped_packets_total{direction="egress",namespace="shop",pod="web-0"} 3"#,
            r#"kube_nftpolicy_dropped_packets_total{direction="ingress",namespace="db",pod="pg-0"} 7"#,
            r#"kube_nftpolicy_dropped_packets_total{direction="ingress",namespace="shop",pod="web-0"} 12"#,
        ]
    );
    assert_eq!(
        samples(&scrape, "kube_nftpolicy_dropped_bytes_total"),
        [
            r#"kube_nftpolicy_dropped_bytes_total{direction="egress",namespace="shop",pod="web-0"} 180"#,
            r#"kube_nftpolicy_dropped_bytes_total{direction="ingress",namespace="db",pod="pg-0"} 420"#,
            r#"kube_nftpolicy_dropped_bytes_total{direction="ingress",namespace="shop",pod="web-0"} 1500"#,
        ]
    );
    assert_promtool_accepts(&scrape);

    // pg-0 left the node: its series go, the others show the new absolute values.
    metrics.set_drop_counters(vec![
        drop_counter("shop", "web-0", Direction::Ingress, 20, 2_000),
        drop_counter("shop", "web-0", Direction::Egress, 3, 180),
    ]);
    let scrape = server.get("/metrics").await.body;
    assert!(!scrape.contains("pg-0"), "{scrape}");
    assert_eq!(
        samples(&scrape, "kube_nftpolicy_dropped_packets_total"),
        [
            r#"kube_nftpolicy_dropped_packets_total{direction="egress",namespace="shop",pod="web-0"} 3"#,
            r#"kube_nftpolicy_dropped_packets_total{direction="ingress",namespace="shop",pod="web-0"} 20"#,
        ]
    );
    assert_eq!(
        samples(&scrape, "kube_nftpolicy_dropped_bytes_total"),
        [
            r#"kube_nftpolicy_dropped_bytes_total{direction="egress",namespace="shop",pod="web-0"} 180"#,
            r#"kube_nftpolicy_dropped_bytes_total{direction="ingress",namespace="shop",pod="web-0"} 2000"#,
        ]
    );

    // An empty snapshot removes the families' samples altogether.
    metrics.set_drop_counters(Vec::new());
    let scrape = server.get("/metrics").await.body;
    assert!(!scrape.contains("kube_nftpolicy_dropped_"), "{scrape}");
    assert_promtool_accepts(&scrape);

    server.stop().await;
}

#[tokio::test]
async fn every_metric_has_help_and_type_and_passes_promtool() {
    let metrics = new_metrics();
    let server = Server::start(Arc::clone(&metrics), Arc::new(Health::new(Duration::MAX))).await;

    metrics.set_drop_counters(vec![drop_counter(
        "shop",
        "web-0",
        Direction::Ingress,
        1,
        60,
    )]);
    metrics.observe_sync(SyncKind::Full, Duration::from_millis(42));
    metrics.observe_sync(SyncKind::Partial, Duration::from_micros(800));
    metrics.sync_failed(SyncFailure::NftRejected);
    metrics.set_last_sync(SystemTime::now());
    metrics.observe_programming_latency(Duration::from_millis(350));
    metrics.set_ruleset_stats(RulesetStats {
        policed_ingress: 4,
        policed_egress: 2,
        policies: 3,
        set_elements: 17,
        chains: 9,
    });
    metrics.watch_event(WatchResource::NetworkPolicies);
    metrics.drift_repaired();
    metrics.denied_connection("shop", "web-0", Direction::Egress);
    metrics.denied_log_suppressed(SuppressReason::RateLimit);
    // Kernel totals: 5 then 7 on ingress is 7 in all; a count that went down (the chain
    // was rewritten) starts over from it.
    metrics.set_unknown_address_drops(&[(Direction::Ingress, 5), (Direction::Egress, 4)]);
    metrics.set_unknown_address_drops(&[(Direction::Ingress, 7), (Direction::Egress, 2)]);
    metrics.conntrack_flows_removed(kube_nftpolicy::agent::metrics::FlowRemoval::Denied, 3);

    let reply = server.get("/metrics").await;
    assert_eq!(reply.status, 200);
    let scrape = reply.body;

    let expected = [
        ("dropped_packets_total", "counter"),
        ("dropped_bytes_total", "counter"),
        ("sync_duration_seconds", "histogram"),
        ("sync_failures_total", "counter"),
        ("last_sync_timestamp_seconds", "gauge"),
        ("network_programming_duration_seconds", "histogram"),
        ("policed_pods", "gauge"),
        ("policies", "gauge"),
        ("set_elements", "gauge"),
        ("chains", "gauge"),
        ("watch_events_total", "counter"),
        ("drift_repairs_total", "counter"),
        ("denied_connections_total", "counter"),
        ("denied_log_suppressed_total", "counter"),
        ("unknown_address_drops_total", "counter"),
        ("conntrack_flows_removed_total", "counter"),
    ];
    for (suffix, kind) in expected {
        let name = format!("kube_nftpolicy_{suffix}");
        let help = format!("# HELP {name} ");
        let help_line = scrape
            .lines()
            .find(|line| line.starts_with(&help))
            .unwrap_or_else(|| panic!("no HELP for {name} in:\n{scrape}"));
        assert!(help_line.len() > help.len(), "empty HELP for {name}");
        assert!(
            scrape
                .lines()
                .any(|line| line == format!("# TYPE {name} {kind}")),
            "no `# TYPE {name} {kind}` in:\n{scrape}"
        );
    }
    // Nothing else is exported under the prefix, so the list above stays the full inventory.
    let families = scrape
        .lines()
        .filter(|line| line.starts_with("# TYPE "))
        .count();
    assert_eq!(families, expected.len(), "{scrape}");

    // Spot-check that the values land on the right labels.
    for line in [
        r#"kube_nftpolicy_sync_failures_total{reason="nft_rejected"} 1"#,
        r#"kube_nftpolicy_sync_failures_total{reason="drift"} 0"#,
        r#"kube_nftpolicy_sync_duration_seconds_count{kind="full"} 1"#,
        r#"kube_nftpolicy_sync_duration_seconds_bucket{kind="partial",le="0.001"} 1"#,
        r#"kube_nftpolicy_policed_pods{direction="ingress"} 4"#,
        r#"kube_nftpolicy_policed_pods{direction="egress"} 2"#,
        "kube_nftpolicy_policies 3",
        "kube_nftpolicy_set_elements 17",
        "kube_nftpolicy_chains 9",
        r#"kube_nftpolicy_watch_events_total{resource="networkpolicies"} 1"#,
        r#"kube_nftpolicy_watch_events_total{resource="pods"} 0"#,
        "kube_nftpolicy_drift_repairs_total 1",
        r#"kube_nftpolicy_denied_connections_total{direction="egress",namespace="shop",pod="web-0"} 1"#,
        r#"kube_nftpolicy_denied_log_suppressed_total{reason="rate_limit"} 1"#,
        r#"kube_nftpolicy_denied_log_suppressed_total{reason="dedup"} 0"#,
        r#"kube_nftpolicy_unknown_address_drops_total{direction="ingress"} 7"#,
        r#"kube_nftpolicy_unknown_address_drops_total{direction="egress"} 6"#,
        r#"kube_nftpolicy_conntrack_flows_removed_total{reason="denied"} 3"#,
        r#"kube_nftpolicy_conntrack_flows_removed_total{reason="pod_gone"} 0"#,
    ] {
        assert!(
            scrape.lines().any(|l| l == line),
            "missing `{line}` in:\n{scrape}"
        );
    }

    assert_promtool_accepts(&scrape);

    // A pod leaving the node takes its denied-connection series with it.
    metrics.forget_pod("shop", "web-0");
    let scrape = server.get("/metrics").await.body;
    assert!(
        samples(&scrape, "kube_nftpolicy_denied_connections_total").is_empty(),
        "{scrape}"
    );

    server.stop().await;
}

#[tokio::test]
async fn bind_error_names_the_address() {
    let taken = admin::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("bind 127.0.0.1:0");
    let addr = taken.local_addr().expect("local addr");
    let err = admin::bind(addr)
        .await
        .expect_err("second bind to the same address fails");
    assert!(
        err.to_string().contains(&addr.to_string()),
        "error does not name {addr}: {err}"
    );
}

fn example_snapshot(name: &str) -> Snapshot {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name);
    let m = kube_nftpolicy::cluster::manifest::load(&dir).expect("example loads");
    let idx = m.into_index();
    idx.snapshot()
}

#[tokio::test]
async fn debug_explain_answers_from_the_published_state() {
    let live = Arc::new(LiveSnapshot::default());
    let server = Server::start_with(
        new_metrics(),
        Arc::new(Health::new(Duration::MAX)),
        Arc::clone(&live),
    )
    .await;
    let ask = "/debug/explain?from=default/frontend&to=default/backend&port=8080";

    // Nothing published yet: the agent has not listed the cluster.
    let reply = server.get(ask).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert!(reply.body.contains("initial lists"), "{}", reply.body);

    let snap = example_snapshot("04-allow-pod-to-pod-port");
    live.publish(Arc::new(snap.clone()));
    let answer = |from: &str, to: &str, port: &str| {
        explain(
            &snap,
            &from.parse::<Endpoint>().expect("from"),
            &to.parse::<Endpoint>().expect("to"),
            &port.parse::<PortQuery>().expect("port"),
            None,
        )
        .expect("explainable")
    };

    // Text, allowed: exactly what the CLI prints.
    let reply = server.get(ask).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        reply
            .content_type
            .as_deref()
            .is_some_and(|t| t.starts_with("text/plain")),
        "{reply:?}"
    );
    let want = answer("default/frontend", "default/backend", "8080");
    assert_eq!(reply.body, want.to_text());
    assert!(reply.body.ends_with("verdict: ALLOWED\n"), "{}", reply.body);

    // JSON, denied (still 200: the question was answered), with an encoded `/`.
    let reply = server
        .get("/debug/explain?from=production/web&to=default/backend&port=8080%2FTCP&output=json")
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.content_type.as_deref(), Some("application/json"));
    let got: serde_json::Value = serde_json::from_str(&reply.body).expect("json");
    let want = serde_json::to_value(answer("production/web", "default/backend", "8080/TCP"))
        .expect("json");
    assert_eq!(got, want);
    assert_eq!(got["verdict"], "denied");
    assert_eq!(
        got["ingress"]["isolated_by"][0],
        "default/allow-frontend-to-backend"
    );

    // A named port, an IPv6 address, a forced family.
    let reply = server
        .get("/debug/explain?from=default/backend&to=default/frontend&port=http&family=6")
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        reply
            .body
            .contains("TCP/80 (named port http of default/frontend)"),
        "{}",
        reply.body
    );
    assert!(reply.body.contains("fd00:10:244:1::"), "{}", reply.body);

    // Bad questions.
    struct Case {
        name: &'static str,
        query: &'static str,
        status: u16,
        body: &'static str,
    }
    let cases = [
        Case {
            name: "missing from",
            query: "to=default/backend&port=80",
            status: 400,
            body: "missing query parameter `from`",
        },
        Case {
            name: "missing port",
            query: "from=default/frontend&to=default/backend",
            status: 400,
            body: "missing query parameter `port`",
        },
        Case {
            name: "bad endpoint",
            query: "from=frontend&to=default/backend&port=80",
            status: 400,
            body: "from: \"frontend\" is neither namespace/pod nor an IP address",
        },
        Case {
            name: "bad port",
            query: "from=default/frontend&to=default/backend&port=80/ICMP",
            status: 400,
            body: "the protocol must be TCP, UDP or SCTP",
        },
        Case {
            name: "unknown parameter",
            query: "from=default/frontend&to=default/backend&port=80&protocol=UDP",
            status: 400,
            body: "unknown query parameter `protocol`",
        },
        Case {
            name: "parameter twice",
            query: "from=default/frontend&from=default/other&to=default/backend&port=80",
            status: 400,
            body: "query parameter `from` given twice",
        },
        Case {
            name: "bad family",
            query: "from=default/frontend&to=default/backend&port=80&family=5",
            status: 400,
            body: "family \"5\": want 4 or 6",
        },
        Case {
            name: "bad output",
            query: "from=default/frontend&to=default/backend&port=80&output=yaml",
            status: 400,
            body: "output \"yaml\": want text or json",
        },
        Case {
            name: "named port the destination lacks",
            query: "from=default/frontend&to=default/backend&port=http",
            status: 400,
            body: "pod default/backend declares no such container port",
        },
        Case {
            name: "unknown pod",
            query: "from=default/nobody&to=default/backend&port=80",
            status: 404,
            body: "pod default/nobody is not in the cluster state",
        },
    ];
    for c in cases {
        let reply = server.get(&format!("/debug/explain?{}", c.query)).await;
        assert_eq!(reply.status, c.status, "{}: {}", c.name, reply.body);
        assert!(reply.body.contains(c.body), "{}: {}", c.name, reply.body);
    }

    // A newer state replaces the old one: without its policies, backend is open.
    let mut open = Index::new();
    open.reset_namespaces(snap.namespaces.iter().map(|(_, n)| (**n).clone()).collect());
    open.reset_pods(snap.pods.iter().map(|(_, p)| (**p).clone()).collect());
    live.publish(Arc::new(open.snapshot()));
    let reply = server
        .get("/debug/explain?from=production/web&to=default/backend&port=8080")
        .await;
    assert_eq!(reply.status, 200);
    assert!(
        reply
            .body
            .contains("ingress of default/backend (on node-1): allowed (no policy isolates it"),
        "{}",
        reply.body
    );

    server.stop().await;
}

#[tokio::test]
async fn debug_explain_can_be_switched_off() {
    let live = Arc::new(LiveSnapshot::disabled());
    let server = Server::start_with(
        new_metrics(),
        Arc::new(Health::new(Duration::MAX)),
        Arc::clone(&live),
    )
    .await;
    // Even with a state published, nothing about the cluster is served.
    live.publish(Arc::new(example_snapshot("04-allow-pod-to-pod-port")));
    let reply = server
        .get("/debug/explain?from=default/frontend&to=default/backend&port=8080")
        .await;
    assert_eq!(reply.status, 404, "{}", reply.body);
    assert!(
        reply.body.contains("--debug-explain=false"),
        "{}",
        reply.body
    );
    assert!(!reply.body.contains("frontend"), "{}", reply.body);
    // The rest of the port is unaffected.
    assert_eq!(server.get("/healthz").await.status, 200);
    server.stop().await;
}
