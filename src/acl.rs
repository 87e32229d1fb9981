//! Access control lists: `IP` or `IP/bits` entries, IPv4 and IPv6.

use std::net::{IpAddr, Ipv4Addr};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AclError {
    #[error("Bad ACL entry '{0}': expected IP or IP/bits")]
    BadEntry(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad IP address '{0}': expected an IPv4 or IPv6 literal, [IPv6], or 0")]
pub struct AddressError(pub String);

/// Parses an address as flexnbd does: an IPv4 or IPv6 literal, optionally
/// wrapped in brackets, or `0` for the IPv4 wildcard.
pub fn parse_ip(text: &str) -> Result<IpAddr, AddressError> {
    let inner = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    if inner == "0" {
        return Ok(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    }
    inner
        .parse::<IpAddr>()
        .map_err(|_| AddressError(text.to_string()))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub addr: IpAddr,
    /// Prefix length; the full width when the entry had no `/bits`.
    pub bits: u8,
}

impl Entry {
    pub fn parse(text: &str) -> Result<Entry, AclError> {
        let bad = || AclError::BadEntry(text.to_string());
        let (ip, bits) = match text.split_once('/') {
            Some((ip, bits)) => (ip, Some(bits)),
            None => (text, None),
        };
        let addr = parse_ip(ip).map_err(|_| bad())?;
        let width = if addr.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => width,
            Some(b) => match b.parse::<u8>() {
                Ok(n) if (1..=width).contains(&n) => n,
                _ => return Err(bad()),
            },
        };
        Ok(Entry { addr, bits })
    }

    /// Same family and the first `bits` bits equal. An IPv4-mapped IPv6
    /// peer does not match an IPv4 entry.
    pub fn matches(&self, peer: IpAddr) -> bool {
        match (self.addr, peer) {
            (IpAddr::V4(a), IpAddr::V4(p)) => prefix_eq(&a.octets(), &p.octets(), self.bits),
            (IpAddr::V6(a), IpAddr::V6(p)) => prefix_eq(&a.octets(), &p.octets(), self.bits),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let full = usize::from(bits / 8);
    if a[..full] != b[..full] {
        return false;
    }
    let rest = bits % 8;
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    a[full] & mask == b[full] & mask
}

/// A whole ACL. Empty means "everyone", unless the server denies by default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acl {
    pub entries: Vec<Entry>,
    pub default_deny: bool,
}

impl Acl {
    pub fn parse<S: AsRef<str>>(entries: &[S], default_deny: bool) -> Result<Acl, AclError> {
        let entries = entries
            .iter()
            .map(|e| Entry::parse(e.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(Acl {
            entries,
            default_deny,
        })
    }

    pub fn allows(&self, peer: IpAddr) -> bool {
        if self.entries.is_empty() {
            return !self.default_deny;
        }
        self.entries.iter().any(|e| e.matches(peer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn masks_match_ipv4_and_ipv6() {
        let acl = Acl::parse(&["10.0.0.0/8", "192.168.1.7", "fe80::/10"], false).unwrap();
        assert!(acl.allows(ip("10.200.3.4")));
        assert!(!acl.allows(ip("11.0.0.1")));
        assert!(acl.allows(ip("192.168.1.7")));
        assert!(!acl.allows(ip("192.168.1.8")));
        assert!(acl.allows(ip("fe80::1")));
        assert!(!acl.allows(ip("fec0::1")));
    }

    #[test]
    fn odd_prefix_lengths() {
        let e = Entry::parse("127.0.0.0/30").unwrap();
        assert!(e.matches(ip("127.0.0.3")));
        assert!(!e.matches(ip("127.0.0.4")));
    }

    #[test]
    fn mapped_ipv6_does_not_match_ipv4_entry() {
        let acl = Acl::parse(&["127.0.0.1"], false).unwrap();
        assert!(!acl.allows(ip("::ffff:127.0.0.1")));
    }

    #[test]
    fn empty_acl_follows_default_deny() {
        assert!(Acl::parse::<&str>(&[], false)
            .unwrap()
            .allows(ip("1.2.3.4")));
        assert!(!Acl::parse::<&str>(&[], true).unwrap().allows(ip("1.2.3.4")));
    }

    #[test]
    fn bad_entries_are_rejected() {
        for bad in [
            "",
            "x",
            "1.2.3.4/0",
            "1.2.3.4/33",
            "::1/129",
            "1.2.3.4/",
            "1.2.3/8",
            "1.2.3.4/8/8",
        ] {
            assert!(Entry::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert_eq!(Entry::parse("[::1]").unwrap().bits, 128);
        assert_eq!(parse_ip("0").unwrap(), ip("0.0.0.0"));
    }
}
