//! Identifiers shared across the core. A leaf: it uses no other module of
//! the core, so the session table, conntrack, the NAT port table and the DNS
//! records can all name a session without depending on each other.

use std::fmt;

/// A session's identifier, unique for the lifetime of the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}
