//! The `kube-nftpolicy` binary: argument parsing, logging setup, and error → exit code.
//! Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kube_nftpolicy::nft::exec::Nft;
use kube_nftpolicy::{compile, dataplane, index, manifest, resolve, ruleset};

#[derive(Parser, Debug)]
#[command(
    name = "kube-nftpolicy",
    version,
    about = "Kubernetes NetworkPolicy enforcement with one nftables table per node"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the nft script that makes a node enforce the policies in the manifests.
    Render {
        /// A manifest file, or a directory of .yaml/.yml/.json files.
        #[arg(long)]
        manifests: PathBuf,
        /// Node whose pods the ruleset protects.
        #[arg(long, env = "NODE_NAME")]
        node: String,
        /// Also send drops to this NFLOG group (as `run --log-denied` would).
        #[arg(long)]
        log_group: Option<u16>,
    },
    /// Make the kernel of the current network namespace enforce the manifests (one sync).
    Apply {
        /// A manifest file, or a directory of .yaml/.yml/.json files.
        #[arg(long)]
        manifests: PathBuf,
        /// Node whose pods the ruleset protects.
        #[arg(long, env = "NODE_NAME")]
        node: String,
        /// Print the transaction instead of sending it.
        #[arg(long)]
        dry_run: bool,
        /// Also send drops to this NFLOG group.
        #[arg(long)]
        log_group: Option<u16>,
        /// The nft binary.
        #[arg(long, default_value = "nft")]
        nft: PathBuf,
    },
    /// Remove our table from the current network namespace (and nothing else).
    Cleanup {
        /// The nft binary.
        #[arg(long, default_value = "nft")]
        nft: PathBuf,
    },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rustables=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Load manifests into an index, printing every warning to stderr.
fn load_index(path: &std::path::Path) -> anyhow::Result<index::Index> {
    let m = manifest::load(path)?;
    for w in &m.warnings {
        tracing::warn!("{w}");
    }
    let mut idx = index::Index::new();
    idx.reset_namespaces(m.namespaces);
    idx.reset_pods(m.pods);
    idx.reset_policies(m.policies);
    Ok(idx)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Render {
            manifests,
            node,
            log_group,
        } => {
            let idx = load_index(&manifests)
                .with_context(|| format!("loading manifests from {}", manifests.display()))?;
            let np = resolve::resolve(&idx.snapshot(), &node);
            let rs = compile::compile(&np, &compile::CompileOptions { log_group });
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
            let idx = load_index(&manifests)
                .with_context(|| format!("loading manifests from {}", manifests.display()))?;
            let np = resolve::resolve(&idx.snapshot(), &node);
            let rs = compile::compile(&np, &compile::CompileOptions { log_group });
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

fn main() -> ExitCode {
    init_tracing();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
