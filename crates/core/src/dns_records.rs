//! The DNS records derived from the sessions: `<label>.<domain>` A/AAAA and
//! the matching PTR, for exactly the live sessions.
//!
//! [`DnsRecords`] lives inside `GatewayState` and is updated in the same call
//! that assigns or releases a session's address, so a name never points at an
//! address another session holds.
//!
//! # Naming rule (documented for administrators)
//! A username maps to one DNS label ([`label_for`]): ASCII letters are
//! lowercased; letters, digits and `-` are kept; every other character
//! (`.`, `_`, `@`, anything non-ASCII) becomes `-`; runs of `-` collapse to
//! one; leading and trailing `-` are dropped; the result is cut to 63 bytes.
//! `Alice.Smith@corp` → `alice-smith-corp`. A username that maps to nothing
//! gets no name.
//!
//! # Collisions
//! A label belongs to one user at a time. When a user's label is already
//! held by another user's session, or by a static record from `dns/`, the
//! later session gets **no DNS name** (logged and counted) — never two users
//! answering for one name. A user with several sessions answers with the
//! newest session's address; when it closes, the next newest answers.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use crate::ids::SessionId;

/// Longest DNS label (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;

/// The label for a username, by the documented rule; `None` if nothing is left.
pub fn label_for(username: &str) -> Option<String> {
    let mut out = String::with_capacity(username.len().min(MAX_LABEL_LEN));
    let mut last_dash = true; // drops leading dashes
    for c in username.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
            last_dash = false;
        } else if !last_dash {
            out.push('-');
            last_dash = true;
        }
        if out.len() >= MAX_LABEL_LEN {
            break;
        }
    }
    out.truncate(MAX_LABEL_LEN);
    while out.ends_with('-') {
        out.pop();
    }
    (!out.is_empty()).then_some(out)
}

/// Why a session got no DNS name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The username maps to no label.
    #[error("username '{0}' maps to no DNS label")]
    Unmappable(String),
    /// Another user's session holds the label.
    #[error("DNS name '{label}' is held by user '{owner}'")]
    HeldByUser {
        /// The label.
        label: String,
        /// Who holds it.
        owner: String,
    },
    /// A static record from `dns/` uses the label.
    #[error("DNS name '{0}' is a static record")]
    StaticRecord(String),
    /// The session is behind NAT: nothing could reach it by name.
    #[error("behind NAT: no intranet IP to name")]
    BehindNat,
}

/// The dynamic records of one gateway.
#[derive(Debug, Default, Clone)]
pub struct DnsRecords {
    /// label → sessions holding it, oldest first.
    by_label: HashMap<String, Vec<(SessionId, IpAddr)>>,
    /// label → owning user key.
    owner: HashMap<String, String>,
    /// address → label (the PTR).
    by_addr: HashMap<IpAddr, String>,
    /// Labels of static records in our domain.
    reserved: HashSet<String>,
}

impl DnsRecords {
    /// Replace the set of labels taken by static records (zone reload).
    /// Live sessions keep their names; new registrations respect the set.
    pub fn set_static_labels(&mut self, labels: HashSet<String>) {
        self.reserved = labels;
    }

    /// Register `addr` for `user_key`'s session `id`. Returns the label.
    pub fn register(
        &mut self,
        user_key: &str,
        id: SessionId,
        addr: IpAddr,
    ) -> Result<String, NameError> {
        let label = label_for(user_key).ok_or_else(|| NameError::Unmappable(user_key.into()))?;
        if self.reserved.contains(&label) {
            return Err(NameError::StaticRecord(label));
        }
        if let Some(o) = self.owner.get(&label) {
            if o != user_key {
                return Err(NameError::HeldByUser {
                    label,
                    owner: o.clone(),
                });
            }
        }
        self.owner.insert(label.clone(), user_key.to_string());
        self.by_label
            .entry(label.clone())
            .or_default()
            .push((id, addr));
        self.by_addr.insert(addr, label.clone());
        Ok(label)
    }

    /// Remove session `id`'s records (its address was `addr`).
    pub fn unregister(&mut self, id: SessionId, addr: IpAddr) {
        let Some(label) = self.by_addr.remove(&addr) else {
            return;
        };
        if let Some(v) = self.by_label.get_mut(&label) {
            v.retain(|(i, _)| *i != id);
            if v.is_empty() {
                self.by_label.remove(&label);
                self.owner.remove(&label);
            }
        }
    }

    /// The address `label` answers with for this family (newest session).
    pub fn lookup(&self, label: &str, v6: bool) -> Option<IpAddr> {
        self.by_label
            .get(label)?
            .iter()
            .rev()
            .map(|(_, a)| *a)
            .find(|a| a.is_ipv6() == v6)
    }

    /// Is `label` a live user name (of any family)?
    pub fn has_label(&self, label: &str) -> bool {
        self.by_label.contains_key(label)
    }

    /// The label whose PTR `addr` has.
    pub fn name_of(&self, addr: IpAddr) -> Option<&str> {
        self.by_addr.get(&addr).map(String::as_str)
    }

    /// Number of addresses with records.
    pub fn len(&self) -> usize {
        self.by_addr.len()
    }

    /// No records?
    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }

    /// All (label, address) pairs, for `ctl dns`.
    pub fn entries(&self) -> impl Iterator<Item = (&str, IpAddr)> {
        self.by_addr.iter().map(|(a, l)| (l.as_str(), *a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn naming_rule() {
        assert_eq!(label_for("alice").as_deref(), Some("alice"));
        assert_eq!(
            label_for("Alice.Smith@corp").as_deref(),
            Some("alice-smith-corp")
        );
        assert_eq!(label_for("__bob__").as_deref(), Some("bob"));
        assert_eq!(label_for("a..b").as_deref(), Some("a-b"));
        assert_eq!(label_for("Zoë").as_deref(), Some("zo"));
        assert_eq!(label_for("..."), None);
        assert_eq!(label_for(""), None);
        let long = "x".repeat(100);
        assert_eq!(label_for(&long).map(|l| l.len()), Some(63));
        let edge = format!("{}.y", "x".repeat(62)); // cut right after a dash
        assert_eq!(label_for(&edge), Some("x".repeat(62)));
    }

    #[test]
    fn register_lookup_unregister() {
        let mut r = DnsRecords::default();
        let a: IpAddr = "198.18.64.2".parse().expect("ip");
        let l = r.register("alice", SessionId(1), a).expect("reg");
        assert_eq!(l, "alice");
        assert_eq!(r.lookup("alice", false), Some(a));
        assert_eq!(r.lookup("alice", true), None);
        assert_eq!(r.name_of(a), Some("alice"));
        r.unregister(SessionId(1), a);
        assert!(r.is_empty());
        assert_eq!(r.lookup("alice", false), None);
        assert!(!r.has_label("alice"));
    }

    #[test]
    fn collisions_refused_never_shared() {
        let mut r = DnsRecords::default();
        let a: IpAddr = "198.18.64.2".parse().expect("ip");
        let b: IpAddr = "198.18.64.3".parse().expect("ip");
        r.register("alice.smith", SessionId(1), a).expect("first");
        let e = r.register("alice_smith", SessionId(2), b).unwrap_err();
        assert!(matches!(e, NameError::HeldByUser { .. }), "{e}");
        assert_eq!(r.name_of(b), None);
        assert_eq!(r.lookup("alice-smith", false), Some(a));
        // Static records win.
        r.set_static_labels(["gateway".to_string()].into_iter().collect());
        assert!(matches!(
            r.register("gateway", SessionId(3), b),
            Err(NameError::StaticRecord(_))
        ));
    }

    #[test]
    fn same_user_two_sessions_newest_answers() {
        let mut r = DnsRecords::default();
        let a: IpAddr = "198.18.64.2".parse().expect("ip");
        let b: IpAddr = "198.18.64.3".parse().expect("ip");
        r.register("alice", SessionId(1), a).expect("1");
        r.register("alice", SessionId(2), b).expect("2");
        assert_eq!(r.lookup("alice", false), Some(b));
        r.unregister(SessionId(2), b);
        assert_eq!(r.lookup("alice", false), Some(a));
    }
}
