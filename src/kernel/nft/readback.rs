//! Read our table back from the kernel over netlink (rustables), without spawning nft.
//!
//! Used for drift checks (is every chain still there, with the rules we wrote?) and for the
//! drop counters behind the metrics. Only this module imports rustables. rustables cannot
//! decode rules that use concatenated lookups (the policy chains); for those chains we
//! learn that they exist but not how many rules they hold.
//!
//! Named counter objects (the rule hit counters) are dumped by hand (`NFT_MSG_GETOBJ` on a
//! netlink-sys socket, a few dozen lines of attribute walking): rustables 0.9 has no object
//! type, and its message traits are private to the crate, so they cannot be added from here.

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
    /// The dump of named counter objects failed.
    #[error("reading counter objects over netlink: {0}")]
    Objects(String),
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
                        Some(ExpressionVariant::Immediate(i))
                            if i.get_data()
                                .and_then(|d| d.get_verdict())
                                .and_then(|v| v.get_code())
                                == Some(&rustables::expr::VerdictType::Accept) =>
                        {
                            state.accepts = true
                        }
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
    state.counters = counter_objects()?;
    Ok(state)
}

// Netlink constants (linux/netlink.h, linux/netfilter/nf_tables.h) not all in libc.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETOBJ: u16 = 19;
const NFTA_OBJ_TABLE: u16 = 1;
const NFTA_OBJ_NAME: u16 = 2;
const NFTA_OBJ_TYPE: u16 = 3;
const NFTA_OBJ_DATA: u16 = 4;
const NFT_OBJECT_COUNTER: u32 = 1;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NFPROTO_INET: u8 = 1;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn push_attr(buf: &mut Vec<u8>, ty: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(align4(buf.len()), 0);
}

/// The attributes in `data`, as (type without flag bits, payload). Stops at the first
/// malformed one.
fn attrs(mut data: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([data[0], data[1]]));
        let ty = u16::from_ne_bytes([data[2], data[3]]) & 0x3fff;
        if len < 4 || len > data.len() {
            break;
        }
        out.push((ty, &data[4..len]));
        data = &data[align4(len).min(data.len())..];
    }
    out
}

fn be_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

/// One counter object message: (name, counter), if it belongs to our table.
fn parse_counter_object(payload: &[u8]) -> Option<(String, Counter)> {
    let mut name = None;
    let mut table_ok = false;
    let mut counter = Counter::default();
    for (ty, data) in attrs(payload) {
        let text = || {
            std::str::from_utf8(data)
                .ok()
                .map(|s| s.trim_end_matches('\0').to_string())
        };
        match ty {
            NFTA_OBJ_TABLE => table_ok = text().as_deref() == Some(TABLE),
            NFTA_OBJ_NAME => name = text(),
            NFTA_OBJ_DATA => {
                for (cty, cdata) in attrs(data) {
                    match cty {
                        NFTA_COUNTER_PACKETS => counter.packets = be_u64(cdata).unwrap_or(0),
                        NFTA_COUNTER_BYTES => counter.bytes = be_u64(cdata).unwrap_or(0),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    table_ok.then_some(())?;
    Some((name?, counter))
}

/// Every named counter object of our table with its count, in one dump.
fn counter_objects() -> Result<std::collections::BTreeMap<String, Counter>, ReadbackError> {
    for _attempt in 0..5 {
        match counter_objects_once() {
            Ok(Some(map)) => return Ok(map),
            Ok(None) => continue, // interrupted by a concurrent change: read again
            Err(e) => return Err(e),
        }
    }
    Err(ReadbackError::Objects(
        "the dump was interrupted by ruleset changes five times in a row".into(),
    ))
}

fn counter_objects_once()
-> Result<Option<std::collections::BTreeMap<String, Counter>>, ReadbackError> {
    use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
    let io = |what: &str, e: std::io::Error| ReadbackError::Objects(format!("{what}: {e}"));
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(|e| io("opening a socket", e))?;
    socket
        .bind(&SocketAddr::new(0, 0))
        .map_err(|e| io("binding", e))?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(|e| io("connecting to the kernel", e))?;

    let mut msg = vec![0u8; 16];
    msg.extend_from_slice(&[NFPROTO_INET, 0, 0, 0]); // nfgenmsg: family, version, res_id
    let mut table = TABLE.as_bytes().to_vec();
    table.push(0);
    push_attr(&mut msg, NFTA_OBJ_TABLE, &table);
    push_attr(&mut msg, NFTA_OBJ_TYPE, &NFT_OBJECT_COUNTER.to_be_bytes());
    let len = msg.len() as u32;
    msg[0..4].copy_from_slice(&len.to_ne_bytes());
    msg[4..6].copy_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETOBJ).to_ne_bytes());
    msg[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    socket
        .send(&msg, 0)
        .map_err(|e| io("sending the dump request", e))?;

    let mut out = std::collections::BTreeMap::new();
    let mut interrupted = false;
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 17);
    loop {
        buf.clear();
        let n = socket
            .recv(&mut buf, 0)
            .map_err(|e| io("receiving the dump", e))?;
        let mut data = &buf[..n.min(buf.len())];
        while data.len() >= 16 {
            let mlen = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
            let ty = u16::from_ne_bytes([data[4], data[5]]);
            let flags = u16::from_ne_bytes([data[6], data[7]]);
            if mlen < 16 || mlen > data.len() {
                return Err(ReadbackError::Objects("a truncated netlink message".into()));
            }
            let body = &data[16..mlen];
            interrupted |= flags & NLM_F_DUMP_INTR != 0;
            match ty {
                NLMSG_DONE => return Ok((!interrupted).then_some(out)),
                NLMSG_ERROR => {
                    let errno = body
                        .get(..4)
                        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                        .unwrap_or(0);
                    if errno == 0 {
                        return Ok((!interrupted).then_some(out));
                    }
                    return Err(ReadbackError::Objects(format!(
                        "the kernel answered: {}",
                        std::io::Error::from_raw_os_error(errno.abs())
                    )));
                }
                _ if body.len() >= 4 => {
                    if let Some((name, counter)) = parse_counter_object(&body[4..]) {
                        out.insert(name, counter);
                    }
                }
                _ => {}
            }
            data = &data[align4(mlen).min(data.len())..];
        }
    }
}
