//! The `kube-nftpolicy` binary: logging setup, dispatch of the parsed command (see `cli`), and
//! error → exit code.
//! Everything else lives in the library.

/// mimalloc rather than glibc malloc: faster on the CLI's large dumps and leaner for the
/// agent (the measurements are in `kube_nftpolicy::agent::memory`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use kube_nftpolicy::agent;
use kube_nftpolicy::cli::{Cli, Command, ExplainArgs, Output};
use kube_nftpolicy::cluster::{manifest, watch};
use kube_nftpolicy::engine::{compile, index, ruleset};
use kube_nftpolicy::kernel::dataplane;
use kube_nftpolicy::kernel::nft::exec::Nft;
use kube_nftpolicy::model::{Family, Protocol};
use kube_nftpolicy::tools::explain::PortQuery;
use kube_nftpolicy::tools::{explain, lint, matrix};

/// `explain` found the connection denied.
const EXIT_DENIED: u8 = 3;
/// `lint` found at least one error (3, like a denied `explain`: 2 is a usage error, 1 a failure).
const EXIT_LINT_ERRORS: u8 = 3;

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rustables=warn"));
    // Colour only for a terminal: under a container runtime stderr is a pipe into log files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
}

/// Load manifests into an index, printing every warning to stderr.
fn load_index(path: &std::path::Path) -> anyhow::Result<index::Index> {
    let m = manifest::load(path)
        .with_context(|| format!("loading manifests from {}", path.display()))?;
    for w in &m.warnings {
        tracing::warn!("{w}");
    }
    let idx = m.into_index();
    Ok(idx)
}

/// Load manifests and compile `node`'s ruleset.
fn ruleset_from(
    path: &std::path::Path,
    node: &str,
    log_group: Option<u16>,
    pod_cidrs: &[String],
    audit: bool,
) -> anyhow::Result<ruleset::Ruleset> {
    let opts = compile::CompileOptions {
        log_group,
        pod_cidrs: parse_pod_cidrs(pod_cidrs)?,
        audit,
        ..Default::default()
    };
    let np = compile::node_policy(&load_index(path)?.snapshot(), node, &opts);
    Ok(compile::compile(&np, &opts))
}

/// `--pod-cidr` values, each checked (the flag is named in the error).
fn parse_pod_cidrs(values: &[String]) -> anyhow::Result<Vec<kube_nftpolicy::model::Cidr>> {
    values
        .iter()
        .map(|c| {
            c.parse::<kube_nftpolicy::model::Cidr>()
                .with_context(|| format!("--pod-cidr {c}"))
        })
        .collect()
}

fn family(f: Option<u8>) -> anyhow::Result<Option<Family>> {
    match f {
        None => Ok(None),
        Some(4) => Ok(Some(Family::V4)),
        Some(6) => Ok(Some(Family::V6)),
        Some(other) => anyhow::bail!("--family {other}: want 4 or 6"),
    }
}

/// `--port` with the legacy `--protocol`: the protocol may be given once, either way.
fn port_query(port: &str, protocol: Option<&str>) -> anyhow::Result<PortQuery> {
    let default = match protocol {
        None => Protocol::Tcp,
        Some(p) => {
            if PortQuery::names_protocol(port) {
                anyhow::bail!("--port {port} already names a protocol; drop --protocol {p}");
            }
            Protocol::parse(Some(&p.to_ascii_uppercase()))
                .ok_or_else(|| anyhow::anyhow!("--protocol {p}: want TCP, UDP or SCTP"))?
        }
    };
    Ok(PortQuery::parse(port, default)?)
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// `--rule-hits` files, summed rule by rule.
fn load_rule_hits(
    paths: &[std::path::PathBuf],
) -> anyhow::Result<kube_nftpolicy::tools::rule_hits::RuleHits> {
    let mut docs = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading rule hits from {}", path.display()))?;
        let doc: kube_nftpolicy::tools::rule_hits::RuleHits = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a /debug/rule-hits document", path.display()))?;
        docs.push(doc);
    }
    Ok(kube_nftpolicy::tools::rule_hits::RuleHits::merge(docs))
}

fn explain_command(a: ExplainArgs) -> anyhow::Result<ExitCode> {
    let hits = if a.rule_hits.is_empty() {
        None
    } else {
        Some(load_rule_hits(&a.rule_hits)?)
    };
    let port = port_query(&a.port, a.protocol.as_deref())?;
    let family = family(a.family)?;
    let from: explain::Endpoint = a.from.parse()?;
    let to: explain::Endpoint = a.to.parse()?;
    let snapshot = match (a.manifests, a.kubeconfig) {
        (Some(path), _) => load_index(&path)?.snapshot(),
        (None, kubeconfig) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(async {
                let client = agent::kube_client(kubeconfig.as_ref()).await?;
                anyhow::Ok(watch::list_once(&client).await?)
            })?
            .snapshot()
        }
    };
    let e = explain::explain(&snapshot, &from, &to, &port, family)?;
    match a.output {
        Output::Text => {
            print!("{}", e.to_text());
            if let Some(h) = &hits {
                print!("{}", h.explain_text(&e, a.rule_hits.len()));
            }
        }
        Output::Json => print_json(&e)?,
    }
    Ok(if e.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DENIED)
    })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Render {
            manifests,
            node,
            log_group,
            pod_cidrs,
            audit,
        } => {
            let rs = ruleset_from(&manifests, &node, log_group, &pod_cidrs, audit)?;
            let header = format!(
                "kube-nftpolicy ruleset for node {node:?}, from {}\nLoad with: nft -f <this file>",
                manifests.display()
            );
            print!("{}", ruleset::render(&rs, &header));
            Ok(ExitCode::SUCCESS)
        }
        Command::Apply {
            manifests,
            node,
            dry_run,
            log_group,
            pod_cidrs,
            nft,
        } => {
            let rs = ruleset_from(&manifests, &node, log_group, &pod_cidrs, false)?;
            let mut dp = dataplane::Dataplane::new(Nft::new(nft));
            if dry_run {
                print!("{}", dp.plan(&rs)?.script);
                return Ok(ExitCode::SUCCESS);
            }
            let report = dp.sync(&rs)?;
            tracing::info!(
                kind = ?report.kind,
                bytes = report.script_bytes,
                chains = report.chains_written,
                elements = report.element_changes,
                duration_ms = report.duration.as_secs_f64() * 1e3,
                "applied"
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(a) => {
            let source = match (a.manifests, a.kubeconfig) {
                (Some(path), _) => agent::Source::Manifests {
                    path,
                    poll: Duration::from_millis(a.manifests_poll_ms),
                },
                (None, kubeconfig) => agent::Source::Kubernetes {
                    kubeconfig,
                    initial_list: a.initial_list,
                },
            };
            let config = agent::Config {
                node: a.node_name,
                source,
                metrics_addr: a.metrics_addr,
                debug_explain: a.debug_explain,
                log_group: a.log_denied.then_some(a.nflog_group),
                coalesce: Duration::from_millis(a.coalesce_ms),
                min_sync_interval: Duration::from_millis(a.min_sync_interval_ms),
                resync_interval: Duration::from_secs(a.resync_interval_s.max(1)),
                full_sync_interval: Duration::from_secs(a.full_sync_interval_s.max(1)),
                counters_interval: Duration::from_secs(a.counters_interval_s.max(1)),
                crd_poll: Duration::from_millis(a.crd_poll_ms.max(100)),
                nft: Nft::new(a.nft),
                pod_cidrs: parse_pod_cidrs(&a.pod_cidrs)?,
                unknown_addresses: match a.unknown_addresses {
                    kube_nftpolicy::cli::UnknownAddresses::Drop => compile::UnknownAddresses::Drop,
                    kube_nftpolicy::cli::UnknownAddresses::Allow => {
                        compile::UnknownAddresses::Allow
                    }
                },
                // Audit mode removes nothing: an established flow is never cut.
                enforce_established: a.enforce_established && !a.audit,
                audit: a.audit,
                staged_mark: compile::StagedMarkMask::new(a.staged_mark_mask)
                    .context("--staged-mark-mask")?,
            };
            agent::memory::configure_for_agent();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(agent::run(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Explain(a) => explain_command(a),
        Command::Matrix {
            manifests,
            namespaces,
            ports,
            family: f,
            output,
        } => {
            let ports = ports
                .iter()
                .map(|p| port_query(p, None))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let spec = matrix::MatrixSpec {
                namespaces,
                ports,
                family: family(f)?,
            };
            let m = matrix::matrix(&load_index(&manifests)?.snapshot(), &spec)?;
            match output {
                Output::Text => print!("{}", m.to_text()),
                Output::Json => print_json(&m)?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Lint {
            manifests,
            rule_hits,
            output,
        } => {
            // The loader's warnings are findings here, so they are not logged twice.
            let m = manifest::load(&manifests)
                .with_context(|| format!("loading manifests from {}", manifests.display()))?;
            let mut report = lint::lint(&m);
            if !rule_hits.is_empty() {
                let merged = load_rule_hits(&rule_hits)?;
                report = lint::with_rule_hits(report, &merged, rule_hits.len());
            }
            match output {
                Output::Text => print!("{}", report.to_text()),
                Output::Json => print_json(&report)?,
            }
            Ok(if report.has_errors() {
                ExitCode::from(EXIT_LINT_ERRORS)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Cleanup { nft } => {
            if dataplane::cleanup(&Nft::new(nft))? {
                tracing::info!("removed table inet {}", ruleset::TABLE);
            } else {
                tracing::info!("table inet {} was not present", ruleset::TABLE);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The error chain on one line. Our error types already include their cause in their
/// message, so a cause whose text the previous message contains is not repeated.
fn describe_error(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn main() -> ExitCode {
    init_tracing();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", describe_error(&e));
            ExitCode::FAILURE
        }
    }
}
