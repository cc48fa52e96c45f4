//! Read our table back from the kernel over netlink (rustables), without spawning nft.
//!
//! Used for drift checks (is every chain still there, with the rules we wrote?) and for the
//! drop counters behind the metrics. Only this module imports rustables. rustables cannot
//! decode rules that use concatenated lookups (the policy chains); for those chains we
//! learn that they exist but not how many rules they hold.

use rustables::expr::ExpressionVariant;
use rustables::{
    Chain, ProtocolFamily, Table, list_chains_for_table, list_rules_for_chain, list_tables,
};

use super::{ChainState, Counter, KernelState};
use crate::engine::ruleset::TABLE;

/// Why the kernel could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadbackError {
    /// A netlink dump failed.
    #[error("reading {what} over netlink: {}", describe(source))]
    Netlink {
        /// What was being read.
        what: &'static str,
        /// Cause.
        source: rustables::error::QueryError,
    },
}

/// rustables' own message for kernel errors ("Error received from the kernel") hides the
/// errno, which is what tells a missing CAP_NET_ADMIN apart from anything else.
fn describe(e: &rustables::error::QueryError) -> String {
    match e {
        rustables::error::QueryError::NetlinkError(m) => {
            format!(
                "the kernel answered: {}",
                std::io::Error::from_raw_os_error(m.error.abs())
            )
        }
        other => other.to_string(),
    }
}

fn our_table() -> Table {
    Table::new(ProtocolFamily::Inet).with_name(TABLE)
}

/// Does our table exist?
pub fn table_exists() -> Result<bool, ReadbackError> {
    let tables = list_tables().map_err(|source| ReadbackError::Netlink {
        what: "tables",
        source,
    })?;
    Ok(tables
        .iter()
        .any(|t| t.get_name().map(String::as_str) == Some(TABLE)))
}

fn chain_state(chain: &Chain) -> ChainState {
    match list_rules_for_chain(chain) {
        Ok(rules) => {
            let mut state = ChainState {
                rules: Some(rules.len()),
                ..ChainState::default()
            };
            for rule in &rules {
                for expr in rule.get_expressions().into_iter().flat_map(|l| l.iter()) {
                    match expr.get_data() {
                        Some(ExpressionVariant::Counter(c)) if state.counter.is_none() => {
                            state.counter = Some(Counter {
                                packets: c.get_nb_packets().copied().unwrap_or(0),
                                bytes: c.get_nb_bytes().copied().unwrap_or(0),
                            });
                        }
                        Some(ExpressionVariant::Log(_)) => state.logs = true,
                        _ => {}
                    }
                }
            }
            state
        }
        // Concatenated lookups are beyond rustables' decoder: the chain exists, count unknown.
        Err(_) => ChainState::default(),
    }
}

/// Read our table: its chains (with rule counts and counters) and its sets.
/// `rules_of` chooses which chains to dump rules for (each is one netlink round trip).
pub fn read(rules_of: &dyn Fn(&str) -> bool) -> Result<KernelState, ReadbackError> {
    // A dump that overlaps a ruleset change is interrupted by the kernel (NLM_F_DUMP_INTR);
    // reading again gives a consistent view.
    let mut attempt = 0;
    loop {
        match read_once(rules_of) {
            Err(ReadbackError::Netlink {
                source:
                    rustables::error::QueryError::ProcessNetlinkError(
                        rustables::error::DecodeError::ConcurrentGenerationUpdate,
                    ),
                ..
            }) if attempt < 5 => attempt += 1,
            other => return other,
        }
    }
}

fn read_once(rules_of: &dyn Fn(&str) -> bool) -> Result<KernelState, ReadbackError> {
    if !table_exists()? {
        return Ok(KernelState::default());
    }
    let table = our_table();
    let chains = list_chains_for_table(&table).map_err(|source| ReadbackError::Netlink {
        what: "chains",
        source,
    })?;
    let mut state = KernelState {
        table: true,
        ..KernelState::default()
    };
    // rustables hides the family of dumped objects (private trait); our table name is unique
    // to us in every family, so the name alone identifies it.
    for chain in &chains {
        let Some(name) = chain.get_name().cloned() else {
            continue;
        };
        let cs = if rules_of(&name) {
            chain_state(chain)
        } else {
            ChainState::default()
        };
        state.chains.insert(name, cs);
    }
    let mut sets: Vec<String> = Vec::new();
    rustables::query::list_objects_with_data(
        libc::NFT_MSG_GETSET as u16,
        &|set: rustables::set::Set, acc: &mut Vec<String>| {
            if set.family == ProtocolFamily::Inet
                && set.get_table().map(String::as_str) == Some(TABLE)
            {
                // Anonymous sets (`__set0`, from inline `{ … }` in rules) belong to their rules.
                if let Some(n) = set.get_name().filter(|n| !n.starts_with("__")) {
                    acc.push(n.clone());
                }
            }
            Ok(())
        },
        None,
        &mut sets,
    )
    .map_err(|source| ReadbackError::Netlink {
        what: "sets",
        source,
    })?;
    sets.sort();
    state.sets = sets;
    Ok(state)
}
