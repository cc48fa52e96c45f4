//! The `kube-nftpolicy` binary: logging setup, dispatch of the parsed command (see `cli`), and
//! error → exit code.
//! Everything else lives in the library.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use kube_nftpolicy::cli::{Cli, Command};
use kube_nftpolicy::nft::exec::Nft;
use kube_nftpolicy::{agent, compile, dataplane, explain, index, manifest, resolve, ruleset};

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
    let mut idx = index::Index::new();
    idx.reset_namespaces(m.namespaces);
    idx.reset_pods(m.pods);
    idx.reset_policies(m.policies);
    Ok(idx)
}

/// Load manifests and compile `node`'s ruleset.
fn ruleset_from(
    path: &std::path::Path,
    node: &str,
    log_group: Option<u16>,
) -> anyhow::Result<ruleset::Ruleset> {
    let np = resolve::resolve(&load_index(path)?.snapshot(), node);
    Ok(compile::compile(
        &np,
        &compile::CompileOptions { log_group },
    ))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Render {
            manifests,
            node,
            log_group,
        } => {
            let rs = ruleset_from(&manifests, &node, log_group)?;
            let header = format!(
                "kube-nftpolicy ruleset for node {node:?}, from {}\nLoad with: nft -f <this file>",
                manifests.display()
            );
            print!("{}", ruleset::render(&rs, &header));
            Ok(())
        }
        Command::Apply {
            manifests,
            node,
            dry_run,
            log_group,
            nft,
        } => {
            let rs = ruleset_from(&manifests, &node, log_group)?;
            let mut dp = dataplane::Dataplane::new(Nft::new(nft));
            if dry_run {
                print!("{}", dp.plan(&rs)?.script);
                return Ok(());
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
            Ok(())
        }
        Command::Run(a) => {
            let source = match (a.manifests, a.kubeconfig) {
                (Some(path), _) => agent::Source::Manifests {
                    path,
                    poll: Duration::from_millis(a.manifests_poll_ms),
                },
                (None, kubeconfig) => agent::Source::Kubernetes { kubeconfig },
            };
            let config = agent::Config {
                node: a.node_name,
                source,
                metrics_addr: a.metrics_addr,
                log_group: a.log_denied.then_some(a.nflog_group),
                coalesce: Duration::from_millis(a.coalesce_ms),
                min_sync_interval: Duration::from_millis(a.min_sync_interval_ms),
                resync_interval: Duration::from_secs(a.resync_interval_s.max(1)),
                full_sync_interval: Duration::from_secs(a.full_sync_interval_s.max(1)),
                counters_interval: Duration::from_secs(a.counters_interval_s.max(1)),
                nft: Nft::new(a.nft),
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(agent::run(config))
        }
        Command::Explain {
            manifests,
            from,
            to,
            port,
            protocol,
            family,
        } => {
            let idx = load_index(&manifests)?;
            let protocol = kube_nftpolicy::model::Protocol::parse(Some(&protocol))
                .ok_or_else(|| anyhow::anyhow!("--protocol {protocol}: want TCP, UDP or SCTP"))?;
            let family = match family {
                None => None,
                Some(4) => Some(kube_nftpolicy::model::Family::V4),
                Some(6) => Some(kube_nftpolicy::model::Family::V6),
                Some(other) => anyhow::bail!("--family {other}: want 4 or 6"),
            };
            let e = explain::explain(
                &idx.snapshot(),
                &from.parse()?,
                &to.parse()?,
                protocol,
                port,
                family,
            )?;
            print!("{}", e.report);
            if e.allowed {
                Ok(())
            } else {
                std::process::exit(3);
            }
        }
        Command::Cleanup { nft } => {
            if dataplane::cleanup(&Nft::new(nft))? {
                tracing::info!("removed table inet {}", ruleset::TABLE);
            } else {
                tracing::info!("table inet {} was not present", ruleset::TABLE);
            }
            Ok(())
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
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe_error(&e));
            ExitCode::FAILURE
        }
    }
}
