//! CIDRs and address intervals for ipBlock peers.
//!
//! `ipBlock` is `cidr` minus every `except`. nftables interval sets can hold the result
//! directly, so the subtraction happens here in user space (never as `return` rules), and the
//! result is printed as the smallest list of prefixes, which is how people read addresses.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// IP family of an address, set or rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The family of an address.
    pub fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }

    /// Address width in bits.
    pub fn bits(self) -> u8 {
        match self {
            Self::V4 => 32,
            Self::V6 => 128,
        }
    }

    /// Suffix used in set and map names (`v4`/`v6`).
    pub fn suffix(self) -> &'static str {
        match self {
            Self::V4 => "v4",
            Self::V6 => "v6",
        }
    }

    /// Both families, in render order.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];
}

/// A network prefix, always stored in canonical form (host bits cleared).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    family: Family,
    /// Network address as an integer (IPv4 in the low 32 bits).
    start: u128,
    prefix: u8,
}

/// Why a CIDR string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// No `/` or unparsable parts.
    #[error("{0:?} is not a CIDR (want address/prefix, e.g. 10.0.0.0/16)")]
    Syntax(String),
    /// Prefix longer than the address.
    #[error("{0:?}: prefix length out of range")]
    Prefix(String),
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| CidrError::Syntax(s.to_string()))?;
        let addr: IpAddr = addr.parse().map_err(|_| CidrError::Syntax(s.to_string()))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| CidrError::Syntax(s.to_string()))?;
        Cidr::new(addr, prefix).ok_or_else(|| CidrError::Prefix(s.to_string()))
    }
}

fn to_int(ip: &IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(*a)),
        IpAddr::V6(a) => u128::from(*a),
    }
}

fn to_ip(family: Family, v: u128) -> IpAddr {
    match family {
        // Values of an IPv4 interval never exceed u32::MAX by construction.
        Family::V4 => IpAddr::V4(Ipv4Addr::from(v as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(v)),
    }
}

fn host_mask(family: Family, prefix: u8) -> u128 {
    let host_bits = u32::from(family.bits() - prefix);
    if host_bits == 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    }
}

impl Cidr {
    /// A prefix from an address; host bits are cleared. `None` if the prefix is too long.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        let family = Family::of(&addr);
        if prefix > family.bits() {
            return None;
        }
        let start = to_int(&addr) & !host_mask(family, prefix);
        Some(Self {
            family,
            start,
            prefix,
        })
    }

    /// The single-address prefix of `ip`.
    pub fn host(ip: IpAddr) -> Self {
        let prefix = Family::of(&ip).bits();
        Self {
            family: Family::of(&ip),
            start: to_int(&ip),
            prefix,
        }
    }

    /// Family of the prefix.
    pub fn family(&self) -> Family {
        self.family
    }

    /// True when `addr` written with this prefix had host bits set (e.g. 10.0.0.1/8).
    pub fn was_canonical(text: &str) -> bool {
        text.parse::<Cidr>().is_ok_and(|c| {
            text.split_once('/').map(|(a, _)| a.parse::<IpAddr>().ok()) == Some(Some(c.network()))
        })
    }

    /// The network address.
    pub fn network(&self) -> IpAddr {
        to_ip(self.family, self.start)
    }

    /// First and last address as integers.
    pub fn range(&self) -> Interval {
        Interval {
            family: self.family,
            first: self.start,
            last: self.start | host_mask(self.family, self.prefix),
        }
    }

    /// Is `other` inside this prefix?
    pub fn contains_cidr(&self, other: &Cidr) -> bool {
        let (a, b) = (self.range(), other.range());
        self.family == other.family && a.first <= b.first && b.last <= a.last
    }

    /// Is `ip` inside this prefix?
    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.contains_cidr(&Cidr::host(*ip))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), self.prefix)
    }
}

/// An inclusive interval of addresses of one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Interval {
    family: Family,
    first: u128,
    last: u128,
}

impl Interval {
    /// The smallest list of prefixes covering exactly this interval, in address order.
    pub fn to_cidrs(self) -> Vec<Cidr> {
        let bits = u32::from(self.family.bits());
        let mut out = Vec::new();
        let mut cur = self.first;
        loop {
            // Largest aligned block starting at `cur` that does not pass `last`.
            let mut size_bits = if cur == 0 {
                bits
            } else {
                cur.trailing_zeros().min(bits)
            };
            while size_bits > 0 {
                let span = if size_bits == 128 {
                    u128::MAX
                } else {
                    (1u128 << size_bits) - 1
                };
                match cur.checked_add(span) {
                    Some(end) if end <= self.last => break,
                    _ => size_bits -= 1,
                }
            }
            let prefix = (bits - size_bits) as u8;
            out.push(Cidr {
                family: self.family,
                start: cur,
                prefix,
            });
            let span = if size_bits == 128 {
                u128::MAX
            } else {
                (1u128 << size_bits) - 1
            };
            match cur.checked_add(span) {
                Some(end) if end < self.last => cur = end + 1,
                _ => break,
            }
        }
        out
    }
}

/// `cidr` minus every prefix in `except`, as sorted disjoint prefixes.
pub fn subtract(cidr: &Cidr, except: &[Cidr]) -> Vec<Cidr> {
    let mut pieces = vec![cidr.range()];
    for ex in except.iter().filter(|e| e.family == cidr.family) {
        let e = ex.range();
        let mut next = Vec::with_capacity(pieces.len() + 1);
        for p in pieces {
            if e.last < p.first || e.first > p.last {
                next.push(p);
                continue;
            }
            if e.first > p.first {
                next.push(Interval {
                    last: e.first - 1,
                    ..p
                });
            }
            if e.last < p.last {
                next.push(Interval {
                    first: e.last + 1,
                    ..p
                });
            }
        }
        pieces = next;
    }
    pieces.sort();
    pieces.into_iter().flat_map(Interval::to_cidrs).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().expect(s)
    }

    fn show(v: &[Cidr]) -> String {
        v.iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    #[test]
    fn subtraction() {
        let cases: &[(&str, &str, &[&str], &str)] = &[
            ("no except", "10.0.0.0/8", &[], "10.0.0.0/8"),
            (
                "seed: 192.168/16 except 192.168.1/24",
                "192.168.0.0/16",
                &["192.168.1.0/24"],
                "192.168.0.0/24, 192.168.2.0/23, 192.168.4.0/22, 192.168.8.0/21, 192.168.16.0/20, 192.168.32.0/19, 192.168.64.0/18, 192.168.128.0/17",
            ),
            ("except everything", "10.0.0.0/24", &["10.0.0.0/24"], ""),
            (
                "two excepts",
                "10.0.0.0/30",
                &["10.0.0.1/32", "10.0.0.2/32"],
                "10.0.0.0/32, 10.0.0.3/32",
            ),
            ("whole v4 space", "0.0.0.0/0", &[], "0.0.0.0/0"),
            (
                "whole v4 minus one host",
                "0.0.0.0/0",
                &["255.255.255.255/32"],
                "0.0.0.0/1, 128.0.0.0/2, 192.0.0.0/3, 224.0.0.0/4, 240.0.0.0/5, 248.0.0.0/6, 252.0.0.0/7, 254.0.0.0/8, 255.0.0.0/9, 255.128.0.0/10, 255.192.0.0/11, 255.224.0.0/12, 255.240.0.0/13, 255.248.0.0/14, 255.252.0.0/15, 255.254.0.0/16, 255.255.0.0/17, 255.255.128.0/18, 255.255.192.0/19, 255.255.224.0/20, 255.255.240.0/21, 255.255.248.0/22, 255.255.252.0/23, 255.255.254.0/24, 255.255.255.0/25, 255.255.255.128/26, 255.255.255.192/27, 255.255.255.224/28, 255.255.255.240/29, 255.255.255.248/30, 255.255.255.252/31, 255.255.255.254/32",
            ),
            ("whole v6 space", "::/0", &[], "::/0"),
            (
                "v6 except",
                "2001:db8::/32",
                &["2001:db8::/33"],
                "2001:db8:8000::/33",
            ),
            (
                "other family except ignored",
                "10.0.0.0/8",
                &["2001:db8::/32"],
                "10.0.0.0/8",
            ),
        ];
        for (name, cidr, except, want) in cases {
            let ex: Vec<Cidr> = except.iter().map(|s| c(s)).collect();
            assert_eq!(show(&subtract(&c(cidr), &ex)), *want, "case {name}");
        }
    }

    #[test]
    fn parsing() {
        assert_eq!(c("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert!(!Cidr::was_canonical("10.1.2.3/8"));
        assert!(Cidr::was_canonical("10.0.0.0/8"));
        assert!("10.0.0.0".parse::<Cidr>().is_err());
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("::/129".parse::<Cidr>().is_err());
        assert!("banana/8".parse::<Cidr>().is_err());
        assert!(c("10.0.0.0/8").contains(&"10.255.0.1".parse().expect("ip")));
        assert!(!c("10.0.0.0/8").contains(&"11.0.0.1".parse().expect("ip")));
    }
}
