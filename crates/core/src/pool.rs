//! Intranet IP pool: one CIDR (IPv4 or IPv6) whose addresses are leased to
//! logged-on users, with stickiness and a release quarantine.
//!
//! The pool owns which address belongs to whom. It never enumerates its range:
//! addresses are `u128` offsets from the network address, and only addresses
//! that were ever handed out (plus `exclude` entries) take memory. Time comes in
//! as `now`; nothing here reads a clock.
//!
//! Call order: [`IpPool::new`], optionally [`IpPool::restore`] from the state
//! store, then any mix of [`IpPool::allocate`] / [`IpPool::release`], and
//! [`IpPool::snapshot`] whenever the state should be persisted.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

/// Smallest IPv4 pool: a /30 has network, gateway, one user and broadcast.
const MIN_V4_PREFIX_LEN: u8 = 30;
/// Smallest IPv6 pool: a /126 has subnet-router anycast, gateway and two users.
const MIN_V6_PREFIX_LEN: u8 = 126;
/// Offset of the gateway's own address (network + 1).
const GATEWAY_OFFSET: u128 = 1;
/// Offset of the first address that can be leased (network + 2).
const FIRST_LEASE_OFFSET: u128 = 2;

/// Configuration of one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Pool name, used in errors, logs and the snapshot.
    pub name: String,
    /// The pool's range. Host bits are ignored (`10.0.0.7/24` means `10.0.0.0/24`).
    pub cidr: IpNetwork,
    /// How long a released address is kept from other owners (at least the DNS TTL).
    pub quarantine: Duration,
    /// Extra addresses never handed out. Entries outside the range, or already
    /// reserved (network, gateway, broadcast), are ignored.
    pub exclude: Vec<IpAddr>,
}

/// Errors of pool operations.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
#[non_exhaustive]
pub enum PoolError {
    /// No address is eligible for this owner: all are leased, reserved, or in
    /// quarantine for someone else.
    #[error("no intranet IP address is available in pool {pool}")]
    Exhausted {
        /// Pool name.
        pool: String,
    },
    /// The CIDR is smaller than an IPv4 /30 or an IPv6 /126.
    #[error("pool {pool}: {cidr} is too small (need at least an IPv4 /30 or an IPv6 /126)")]
    TooSmall {
        /// Pool name.
        pool: String,
        /// The configured CIDR.
        cidr: String,
    },
    /// The address is not inside the pool's CIDR.
    #[error("address {addr} is not in this pool")]
    NotInPool {
        /// The address given.
        addr: IpAddr,
    },
}

/// Counters of a pool at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PoolStats {
    /// Addresses that can be leased: the range minus network, gateway,
    /// IPv4 broadcast and `exclude` entries.
    pub size: u128,
    /// Addresses currently leased.
    pub leased: u64,
    /// Released addresses still in quarantine (only their last owner may take them).
    pub quarantined: u64,
    /// Owners that have a remembered sticky address (leased by them or not).
    pub sticky: u64,
}

/// A lease in a [`PoolSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotLease {
    /// Leased address.
    pub addr: IpAddr,
    /// Lease owner.
    pub owner: String,
}

/// A released (not leased) address in a [`PoolSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotReleased {
    /// Released address.
    pub addr: IpAddr,
    /// Owner of the last lease; may take it back during quarantine.
    pub last_owner: String,
    /// Quarantine left at snapshot time, in milliseconds (rounded up; 0 = over).
    pub quarantine_remaining_ms: u64,
}

/// An owner's sticky address in a [`PoolSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSticky {
    /// Owner.
    pub owner: String,
    /// The address this owner gets back when it is free.
    pub addr: IpAddr,
}

/// Serializable state of a pool, without `Instant`s (they do not survive a restart).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PoolSnapshot {
    /// Pool name (informational).
    #[serde(default)]
    pub pool: String,
    /// Pool CIDR at snapshot time (informational; restore checks each address instead).
    #[serde(default)]
    pub cidr: String,
    /// Current leases, by address.
    #[serde(default)]
    pub leases: Vec<SnapshotLease>,
    /// Released addresses, in the order they become available to new owners.
    #[serde(default)]
    pub released: Vec<SnapshotReleased>,
    /// Sticky addresses, by owner.
    #[serde(default)]
    pub sticky: Vec<SnapshotSticky>,
    /// When this document was written (Unix seconds; set by the shell
    /// that stores it, which rewrites the document only when the pool
    /// changed): `quarantine_remaining_ms` counts from then. Absent in
    /// older files (from the whole file's time). [`IpPool::restore`]
    /// ignores it: the shell applies it to `elapsed_since_snapshot`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_at_unix: Option<u64>,
}

/// State of an address that was handed out at least once.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Slot {
    Leased {
        owner: String,
    },
    Released {
        last_owner: String,
        /// End of quarantine; from then on any owner may take it.
        until: Instant,
        /// Release order, breaks ties between equal `until`s.
        seq: u64,
    },
}

/// An intranet IP pool over one CIDR.
///
/// Promises:
/// - never hands out the network address (IPv6: subnet-router anycast), the
///   gateway address (network + 1), the IPv4 broadcast address or an `exclude`
///   entry;
/// - never leases one address to two owners at once;
/// - sticky: an owner gets back its sticky address while no one else holds it;
/// - quarantine: a released address goes to another owner only after
///   `quarantine` has passed since the release.
///
/// **Sticky address.** An owner's sticky address is the address of the first
/// allocation it got while it had no sticky address. If the owner allocates
/// again while holding a lease, it gets a *different* address and its sticky
/// address stays the first one. The stickiness is dropped when another owner
/// takes the address (only possible after quarantine); the owner's next
/// allocation then sets a new one.
///
/// **Allocation order** for `allocate(owner)`:
/// 1. the owner's sticky address, if not leased and (out of quarantine or last
///    released by this owner);
/// 2. another address last released by this owner (lowest first): it is
///    quarantined for everyone else anyway, so reusing it keeps the pool small;
/// 3. a never-used address (a cursor walks the range upward);
/// 4. the released address whose quarantine ended first (oldest release first),
///    if that quarantine is over.
///
/// Costs: memory is proportional to the addresses ever handed out plus the
/// `exclude` list; `allocate` and `release` are O(log n) (the cursor step is
/// amortized O(log n)).
#[derive(Debug, Clone)]
pub struct IpPool {
    name: String,
    cidr: IpNetwork,
    quarantine: Duration,
    /// Offset of the last address that can be leased.
    last: u128,
    /// `exclude` entries as offsets, only those in `FIRST_LEASE_OFFSET..=last`.
    excluded: BTreeSet<u128>,
    /// Every address ever handed out (entries are never removed, only change state).
    slots: BTreeMap<u128, Slot>,
    /// Owner → sticky offset; kept in sync with `sticky_by_offset`.
    sticky: BTreeMap<String, u128>,
    /// Sticky offset → owner.
    sticky_by_offset: BTreeMap<u128, String>,
    /// Released offsets per last owner.
    owner_released: BTreeMap<String, BTreeSet<u128>>,
    /// Released offsets ordered by end of quarantine, then release order.
    expiry: BTreeSet<(Instant, u64, u128)>,
    /// Next candidate never-used offset; `None` once the range is walked.
    cursor: Option<u128>,
    /// Where the walk of never-used offsets starts (and, wrapping around,
    /// ends): the first usable offset, or a node's own point in a cluster.
    fresh_start: u128,
    next_seq: u64,
    leased: u64,
}

impl IpPool {
    /// Creates an empty pool.
    ///
    /// # Errors
    /// [`PoolError::TooSmall`] for an IPv4 CIDR smaller than /30 or an IPv6
    /// CIDR smaller than /126.
    pub fn new(cfg: PoolConfig) -> Result<Self, PoolError> {
        let prefix = cfg.cidr.prefix();
        let (too_small, last) = match cfg.cidr {
            // IPv4: the all-ones host address is the broadcast address.
            IpNetwork::V4(_) => (
                prefix > MIN_V4_PREFIX_LEN,
                u128::from(u32::MAX.checked_shr(u32::from(prefix)).unwrap_or(0)).saturating_sub(1),
            ),
            // IPv6 has no broadcast: the last address is usable.
            IpNetwork::V6(_) => (
                prefix > MIN_V6_PREFIX_LEN,
                u128::MAX.checked_shr(u32::from(prefix)).unwrap_or(0),
            ),
        };
        if too_small {
            return Err(PoolError::TooSmall {
                pool: cfg.name,
                cidr: cfg.cidr.to_string(),
            });
        }
        let cidr = IpNetwork::new(cfg.cidr.network(), prefix).unwrap_or(cfg.cidr);
        let mut pool = Self {
            name: cfg.name,
            cidr,
            quarantine: cfg.quarantine,
            last,
            excluded: BTreeSet::new(),
            slots: BTreeMap::new(),
            sticky: BTreeMap::new(),
            sticky_by_offset: BTreeMap::new(),
            owner_released: BTreeMap::new(),
            expiry: BTreeSet::new(),
            cursor: Some(FIRST_LEASE_OFFSET),
            fresh_start: FIRST_LEASE_OFFSET,
            next_seq: 0,
            leased: 0,
        };
        for addr in cfg.exclude {
            if let Some(off) = pool.usable_offset(addr) {
                pool.excluded.insert(off);
            }
        }
        Ok(pool)
    }

    /// The pool's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pool's CIDR, normalized to its network address.
    #[must_use]
    pub fn cidr(&self) -> IpNetwork {
        self.cidr
    }

    /// The gateway's own address on its TUN device (network + 1); never handed out.
    #[must_use]
    pub fn gateway_addr(&self) -> IpAddr {
        self.addr_of(GATEWAY_OFFSET)
    }

    /// Whether `addr` is inside the pool's CIDR (reserved addresses included).
    #[must_use]
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.cidr.contains(addr)
    }

    /// Leases an address to `owner` (see the type's doc for the order tried).
    ///
    /// # Errors
    /// [`PoolError::Exhausted`] when every address is leased, reserved, or in
    /// quarantine for another owner.
    pub fn allocate(&mut self, owner: &str, now: Instant) -> Result<IpAddr, PoolError> {
        if let Some(&off) = self.sticky.get(owner) {
            if self.is_eligible(off, owner, now) {
                return Ok(self.take(off, owner));
            }
        }
        let own = self
            .owner_released
            .get(owner)
            .and_then(|set| set.first())
            .copied();
        if let Some(off) = own {
            return Ok(self.take(off, owner));
        }
        if let Some(off) = self.next_fresh() {
            return Ok(self.take(off, owner));
        }
        if let Some(&(until, _, off)) = self.expiry.first() {
            if until <= now {
                return Ok(self.take(off, owner));
            }
        }
        Err(PoolError::Exhausted {
            pool: self.name.clone(),
        })
    }

    /// Leases `addr` itself to `owner` (a static address from the
    /// directory, e.g. RADIUS `Framed-IP-Address`): when it is usable in
    /// this pool and free (or in quarantine for `owner`).
    ///
    /// # Errors
    /// [`PoolError::NotInPool`] when `addr` is outside the pool or not
    /// leasable (network, gateway, broadcast, excluded);
    /// [`PoolError::Exhausted`] when another owner holds it or its
    /// quarantine.
    pub fn allocate_addr(
        &mut self,
        addr: IpAddr,
        owner: &str,
        now: Instant,
    ) -> Result<IpAddr, PoolError> {
        let off = self
            .usable_offset(addr)
            .ok_or(PoolError::NotInPool { addr })?;
        if !self.is_eligible(off, owner, now) {
            return Err(PoolError::Exhausted {
                pool: self.name.clone(),
            });
        }
        Ok(self.take(off, owner))
    }

    /// Ends the lease on `addr`; the address enters quarantine for other owners.
    ///
    /// Releasing an address that is not leased (already released, never used,
    /// reserved) is a no-op, so a repeated release is safe.
    ///
    /// # Errors
    /// [`PoolError::NotInPool`] when `addr` is outside the CIDR.
    pub fn release(&mut self, addr: IpAddr, now: Instant) -> Result<(), PoolError> {
        let off = self.offset_of(addr).ok_or(PoolError::NotInPool { addr })?;
        let owner = match self.slots.get(&off) {
            Some(Slot::Leased { owner }) => owner.clone(),
            _ => return Ok(()),
        };
        let until = saturating_add(now, self.quarantine);
        self.insert_released(off, owner, until);
        self.leased = self.leased.saturating_sub(1);
        Ok(())
    }

    /// The current lease owner of `addr`, if it is leased.
    #[must_use]
    pub fn holder(&self, addr: IpAddr) -> Option<&str> {
        match self.slots.get(&self.offset_of(addr)?) {
            Some(Slot::Leased { owner }) => Some(owner),
            _ => None,
        }
    }

    /// The address `owner` gets back when it is free, if any.
    #[must_use]
    pub fn sticky_addr(&self, owner: &str) -> Option<IpAddr> {
        self.sticky.get(owner).map(|&off| self.addr_of(off))
    }

    /// Another node leased `addr` to `owner` (a cluster's shared pool,
    /// replicated here): the address is held, and stickiness follows as if
    /// it had been taken here (another owner's stickiness on it ends).
    /// Returns false, changing nothing, when `addr` cannot be leased from
    /// this pool or is leased here already to someone else (a claim race
    /// the shell resolves); true when it is now leased to `owner`.
    pub fn lease_remote(&mut self, addr: IpAddr, owner: &str) -> bool {
        let Some(off) = self.usable_offset(addr) else {
            return false;
        };
        if let Some(Slot::Leased { owner: held }) = self.slots.get(&off) {
            return held == owner;
        }
        self.take(off, owner);
        true
    }

    /// Another node released `addr`, last held by `owner`: it is in
    /// quarantine for everyone else for `remaining` (capped at this pool's
    /// quarantine) from `now`, and stays `owner`'s sticky address. Replaces
    /// whatever this pool knew of `addr`. Returns false when `addr` cannot
    /// be leased from this pool.
    pub fn release_remote(
        &mut self,
        addr: IpAddr,
        owner: &str,
        remaining: Duration,
        now: Instant,
    ) -> bool {
        let Some(off) = self.usable_offset(addr) else {
            return false;
        };
        match self.slots.remove(&off) {
            Some(Slot::Leased { .. }) => self.leased = self.leased.saturating_sub(1),
            Some(slot) => self.forget_released(off, slot),
            None => {}
        }
        self.make_sticky(off, owner);
        let until = saturating_add(now, remaining.min(self.quarantine));
        self.insert_released(off, owner.to_owned(), until);
        true
    }

    /// Start the walk of never-used addresses at a point derived from
    /// `seed` (wrapping around the range) instead of the pool's first
    /// address: nodes of a cluster allocating from one pool then mostly
    /// propose different addresses, and their claims rarely collide.
    /// Stickiness and reuse are unchanged. Call before any allocation.
    pub fn spread_fresh(&mut self, seed: u64) {
        let usable = self
            .last
            .saturating_sub(FIRST_LEASE_OFFSET)
            .saturating_add(1);
        if usable == 0 {
            return;
        }
        self.fresh_start = FIRST_LEASE_OFFSET + u128::from(seed) % usable;
        if self.slots.is_empty() {
            self.cursor = Some(self.fresh_start);
        }
    }

    /// The quarantine a release starts.
    #[must_use]
    pub fn quarantine(&self) -> Duration {
        self.quarantine
    }

    /// For a released address: its last owner and the quarantine left at
    /// `now` (zero once over); None when leased or never used.
    #[must_use]
    pub fn released_info(&self, addr: IpAddr, now: Instant) -> Option<(&str, Duration)> {
        match self.slots.get(&self.offset_of(addr)?) {
            Some(Slot::Released {
                last_owner, until, ..
            }) => Some((last_owner.as_str(), until.saturating_duration_since(now))),
            _ => None,
        }
    }

    /// Counters at `now` (O(number of quarantined addresses)).
    #[must_use]
    pub fn stats(&self, now: Instant) -> PoolStats {
        let quarantined = self
            .expiry
            .iter()
            .rev()
            .take_while(|(until, _, _)| *until > now)
            .count();
        PoolStats {
            size: self.usable_count(),
            leased: self.leased,
            quarantined: to_u64(quarantined),
            sticky: to_u64(self.sticky.len()),
        }
    }

    /// Current leases as `(address, owner)`, by ascending address.
    pub fn leases(&self) -> impl Iterator<Item = (IpAddr, &str)> + '_ {
        self.slots.iter().filter_map(|(&off, slot)| match slot {
            Slot::Leased { owner } => Some((self.addr_of(off), owner.as_str())),
            Slot::Released { .. } => None,
        })
    }

    /// Serializable state at `now`; quarantine is stored as time remaining.
    #[must_use]
    pub fn snapshot(&self, now: Instant) -> PoolSnapshot {
        let leases = self
            .leases()
            .map(|(addr, owner)| SnapshotLease {
                addr,
                owner: owner.to_owned(),
            })
            .collect();
        let released = self
            .expiry
            .iter()
            .filter_map(|&(until, _, off)| match self.slots.get(&off) {
                Some(Slot::Released { last_owner, .. }) => Some(SnapshotReleased {
                    addr: self.addr_of(off),
                    last_owner: last_owner.clone(),
                    quarantine_remaining_ms: ceil_millis(until.saturating_duration_since(now)),
                }),
                _ => None,
            })
            .collect();
        let sticky = self
            .sticky
            .iter()
            .map(|(owner, &off)| SnapshotSticky {
                owner: owner.clone(),
                addr: self.addr_of(off),
            })
            .collect();
        PoolSnapshot {
            pool: self.name.clone(),
            cidr: self.cidr.to_string(),
            leases,
            released,
            sticky,
            saved_at_unix: None,
        }
    }

    /// Replaces the pool's state with `snap`, taken `elapsed_since_snapshot` ago.
    ///
    /// Leases are restored as leases. Remaining quarantine is reduced by
    /// `elapsed_since_snapshot` and capped at the configured quarantine. Entries
    /// outside the CIDR, on reserved or excluded addresses, duplicated, or
    /// contradicting an earlier entry (a sticky address held by someone else)
    /// are skipped, so a hand-edited file cannot break the pool's promises.
    ///
    /// Returns the number of skipped entries (for a log line).
    pub fn restore(
        &mut self,
        snap: &PoolSnapshot,
        now: Instant,
        elapsed_since_snapshot: Duration,
    ) -> usize {
        self.slots.clear();
        self.sticky.clear();
        self.sticky_by_offset.clear();
        self.owner_released.clear();
        self.expiry.clear();
        self.cursor = Some(self.fresh_start);
        self.next_seq = 0;
        self.leased = 0;

        let mut skipped = 0_usize;
        for lease in &snap.leases {
            match self.usable_offset(lease.addr) {
                Some(off) if !self.slots.contains_key(&off) => {
                    self.slots.insert(
                        off,
                        Slot::Leased {
                            owner: lease.owner.clone(),
                        },
                    );
                    self.leased = self.leased.saturating_add(1);
                }
                _ => skipped = skipped.saturating_add(1),
            }
        }
        for rel in &snap.released {
            match self.usable_offset(rel.addr) {
                Some(off) if !self.slots.contains_key(&off) => {
                    let remaining = Duration::from_millis(rel.quarantine_remaining_ms)
                        .min(self.quarantine)
                        .saturating_sub(elapsed_since_snapshot);
                    let until = saturating_add(now, remaining);
                    self.insert_released(off, rel.last_owner.clone(), until);
                }
                _ => skipped = skipped.saturating_add(1),
            }
        }
        for st in &snap.sticky {
            let ok = self.usable_offset(st.addr).filter(|off| {
                !self.sticky.contains_key(&st.owner)
                    && !self.sticky_by_offset.contains_key(off)
                    && match self.slots.get(off) {
                        None => true,
                        Some(Slot::Leased { owner }) => *owner == st.owner,
                        Some(Slot::Released { last_owner, .. }) => *last_owner == st.owner,
                    }
            });
            match ok {
                Some(off) => {
                    self.sticky.insert(st.owner.clone(), off);
                    self.sticky_by_offset.insert(off, st.owner.clone());
                }
                None => skipped = skipped.saturating_add(1),
            }
        }
        skipped
    }

    /// Number of addresses that can be leased.
    fn usable_count(&self) -> u128 {
        // `last >= FIRST_LEASE_OFFSET` holds by the minimum prefix lengths; saturate anyway.
        self.last
            .saturating_sub(FIRST_LEASE_OFFSET)
            .saturating_add(1)
            .saturating_sub(self.excluded.len() as u128)
    }

    /// Host bits of the CIDR.
    fn host_mask(&self) -> u128 {
        match self.cidr {
            IpNetwork::V4(n) => {
                u128::from(u32::MAX.checked_shr(u32::from(n.prefix())).unwrap_or(0))
            }
            IpNetwork::V6(n) => u128::MAX.checked_shr(u32::from(n.prefix())).unwrap_or(0),
        }
    }

    /// Offset of `addr` from the network address, if inside the CIDR.
    fn offset_of(&self, addr: IpAddr) -> Option<u128> {
        if !self.cidr.contains(addr) {
            return None;
        }
        let bits = match addr {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        };
        Some(bits & self.host_mask())
    }

    /// Offset of `addr` if it may ever be leased (inside, not reserved, not excluded).
    fn usable_offset(&self, addr: IpAddr) -> Option<u128> {
        self.offset_of(addr)
            .filter(|off| (FIRST_LEASE_OFFSET..=self.last).contains(off))
            .filter(|off| !self.excluded.contains(off))
    }

    /// Address at `off` (host bits and network bits are disjoint, so `|` is exact).
    fn addr_of(&self, off: u128) -> IpAddr {
        let off = off & self.host_mask();
        match self.cidr {
            IpNetwork::V4(n) => {
                let host = u32::try_from(off).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) | host))
            }
            IpNetwork::V6(n) => IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) | off)),
        }
    }

    /// Whether `owner` may take `off` now.
    fn is_eligible(&self, off: u128, owner: &str, now: Instant) -> bool {
        if !(FIRST_LEASE_OFFSET..=self.last).contains(&off) || self.excluded.contains(&off) {
            return false;
        }
        match self.slots.get(&off) {
            None => true,
            Some(Slot::Leased { .. }) => false,
            Some(Slot::Released {
                last_owner, until, ..
            }) => last_owner == owner || *until <= now,
        }
    }

    /// Lowest never-used offset, advancing the cursor past used ones.
    fn next_fresh(&mut self) -> Option<u128> {
        while let Some(off) = self.cursor {
            if !self.excluded.contains(&off) && !self.slots.contains_key(&off) {
                return Some(off);
            }
            let next = if off < self.last {
                off + 1
            } else {
                FIRST_LEASE_OFFSET
            };
            self.cursor = (next != self.fresh_start).then_some(next);
        }
        None
    }

    /// Marks `off` released by `owner` with quarantine until `until`.
    fn insert_released(&mut self, off: u128, owner: String, until: Instant) {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.expiry.insert((until, seq, off));
        self.owner_released
            .entry(owner.clone())
            .or_default()
            .insert(off);
        self.slots.insert(
            off,
            Slot::Released {
                last_owner: owner,
                until,
                seq,
            },
        );
    }

    /// Drop the bookkeeping of a released slot just removed from `slots`.
    fn forget_released(&mut self, off: u128, slot: Slot) {
        if let Slot::Released {
            last_owner,
            until,
            seq,
        } = slot
        {
            self.expiry.remove(&(until, seq, off));
            if let Some(set) = self.owner_released.get_mut(&last_owner) {
                set.remove(&off);
                if set.is_empty() {
                    self.owner_released.remove(&last_owner);
                }
            }
        }
    }

    /// `off` goes to `owner`: another owner's stickiness on it ends, and it
    /// becomes `owner`'s sticky address if `owner` has none.
    fn make_sticky(&mut self, off: u128, owner: &str) {
        if self
            .sticky_by_offset
            .get(&off)
            .is_some_and(|other| other != owner)
        {
            if let Some(other) = self.sticky_by_offset.remove(&off) {
                self.sticky.remove(&other);
            }
        }
        if !self.sticky.contains_key(owner) && !self.sticky_by_offset.contains_key(&off) {
            self.sticky.insert(owner.to_owned(), off);
            self.sticky_by_offset.insert(off, owner.to_owned());
        }
    }

    /// Leases `off` (not currently leased) to `owner`, updating stickiness.
    fn take(&mut self, off: u128, owner: &str) -> IpAddr {
        if let Some(slot @ Slot::Released { .. }) = self.slots.remove(&off) {
            self.forget_released(off, slot);
        }
        // Taking someone else's sticky address drops that stickiness.
        self.make_sticky(off, owner);
        self.slots.insert(
            off,
            Slot::Leased {
                owner: owner.to_owned(),
            },
        );
        self.leased = self.leased.saturating_add(1);
        self.addr_of(off)
    }
}

/// `now + d`, or the latest representable instant near it (never panics).
fn saturating_add(now: Instant, mut d: Duration) -> Instant {
    loop {
        if let Some(t) = now.checked_add(d) {
            return t;
        }
        d /= 2;
        if d.is_zero() {
            return now;
        }
    }
}

/// Milliseconds in `d`, rounded up so a restored quarantine is never shorter.
fn ceil_millis(d: Duration) -> u64 {
    let ms = d.as_millis();
    let ms = if d.subsec_nanos().is_multiple_of(1_000_000) {
        ms
    } else {
        ms.saturating_add(1)
    };
    u64::try_from(ms).unwrap_or(u64::MAX)
}

fn to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const Q: Duration = Duration::from_secs(60);

    fn cfg(cidr: &str) -> PoolConfig {
        PoolConfig {
            name: "staff".to_owned(),
            cidr: cidr.parse().unwrap(),
            quarantine: Q,
            exclude: Vec::new(),
        }
    }

    fn pool(cidr: &str) -> IpPool {
        IpPool::new(cfg(cidr)).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn remote_leases_and_releases_replicate_the_pool() {
        let t = Instant::now();
        let mut here = pool("10.0.0.0/29");
        let mut there = pool("10.0.0.0/29");
        // Another node gave bob .2: here, alice gets .3 and bob's
        // stickiness follows him.
        let b = there.allocate("bob", t).unwrap();
        assert!(here.lease_remote(b, "bob"));
        assert!(here.lease_remote(b, "bob"), "repeated: no-op");
        assert!(!here.lease_remote(b, "carol"), "held by bob");
        assert_eq!(here.holder(b), Some("bob"));
        assert_eq!(here.sticky_addr("bob"), Some(b));
        let a = here.allocate("alice", t).unwrap();
        assert_ne!(a, b);
        assert!(!here.lease_remote(a, "bob"), "leased here to alice");
        // Bob logs off there: quarantined for others here too, his sticky.
        assert!(here.release_remote(b, "bob", Q, t));
        assert_eq!(here.holder(b), None);
        assert_eq!(here.stats(t).leased, 1);
        assert_eq!(here.stats(t).quarantined, 1);
        assert_eq!(here.released_info(b, t), Some(("bob", Q)));
        let c = here.allocate("carol", t).unwrap();
        assert_ne!(c, b, "in quarantine for carol");
        assert_eq!(here.allocate("bob", t).unwrap(), b, "bob gets it back");
        // A remaining quarantine longer than ours is capped.
        assert!(here.release_remote(b, "bob", Q * 10, t));
        assert_eq!(here.released_info(b, t), Some(("bob", Q)));
        // Out of the pool / reserved: refused.
        assert!(!here.lease_remote(ip("10.0.1.2"), "x"));
        assert!(!here.lease_remote(ip("10.0.0.1"), "x"), "gateway address");
        assert!(!here.release_remote(ip("10.0.0.0"), "x", Q, t));
    }

    #[test]
    fn spread_fresh_walks_the_whole_range_from_its_own_start() {
        let t = Instant::now();
        let mut p = pool("10.0.0.0/29"); // .2 ..= .6
        p.spread_fresh(3); // start at .5
        let got = drain(&mut p, t);
        assert_eq!(
            got,
            ["10.0.0.5", "10.0.0.6", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
                .map(ip)
                .to_vec()
        );
        // Restored pools walk from the same start.
        let snap = p.snapshot(t);
        let mut q = pool("10.0.0.0/29");
        q.spread_fresh(3);
        q.restore(&snap, t, Duration::ZERO);
        assert!(q.allocate("x", t).is_err(), "full");
    }

    #[test]
    fn remote_release_moves_stickiness_to_the_last_owner() {
        let t = Instant::now();
        let mut p = pool("10.0.0.0/29");
        let a = p.allocate("alice", t).unwrap();
        p.release(a, t).unwrap();
        // Elsewhere, after quarantine, dave took it and released it.
        assert!(p.release_remote(a, "dave", Duration::ZERO, t + Q));
        assert_eq!(p.sticky_addr("dave"), Some(a));
        assert_eq!(p.sticky_addr("alice"), None);
        assert_eq!(p.allocate("dave", t + Q).unwrap(), a);
        // Leased → released remotely: the lease count follows.
        assert_eq!(p.stats(t + Q).leased, 1);
        assert!(p.release_remote(a, "dave", Q, t + Q));
        assert_eq!(p.stats(t + Q).leased, 0);
    }

    fn drain(p: &mut IpPool, now: Instant) -> Vec<IpAddr> {
        let mut out = Vec::new();
        let mut i = 0;
        while let Ok(a) = p.allocate(&format!("u{i}"), now) {
            out.push(a);
            i += 1;
        }
        out
    }

    #[test]
    fn slash30_gives_exactly_one_address() {
        let now = Instant::now();
        let mut p = pool("10.0.0.0/30");
        assert_eq!(p.stats(now).size, 1);
        assert_eq!(p.gateway_addr(), ip("10.0.0.1"));
        assert_eq!(p.allocate("a", now), Ok(ip("10.0.0.2")));
        assert_eq!(
            p.allocate("b", now),
            Err(PoolError::Exhausted {
                pool: "staff".to_owned()
            })
        );
    }

    #[test]
    fn slash24_gives_253_and_never_reserved() {
        let now = Instant::now();
        let mut p = pool("10.1.2.0/24");
        assert_eq!(p.stats(now).size, 253);
        let got = drain(&mut p, now);
        assert_eq!(got.len(), 253);
        for a in [ip("10.1.2.0"), ip("10.1.2.1"), ip("10.1.2.255")] {
            assert!(!got.contains(&a));
        }
        let set: BTreeSet<_> = got.iter().collect();
        assert_eq!(set.len(), 253);
        assert_eq!(p.stats(now).leased, 253);
    }

    #[test]
    fn too_small() {
        for c in ["10.0.0.0/31", "10.0.0.0/32", "fd00::/127", "fd00::/128"] {
            assert!(
                matches!(IpPool::new(cfg(c)), Err(PoolError::TooSmall { .. })),
                "{c}"
            );
        }
        assert!(IpPool::new(cfg("fd00::/126")).is_ok());
    }

    #[test]
    fn ipv6_126_skips_anycast_and_gateway() {
        let now = Instant::now();
        let mut p = pool("fd00::/126");
        assert_eq!(p.stats(now).size, 2);
        assert_eq!(p.gateway_addr(), ip("fd00::1"));
        let got = drain(&mut p, now);
        assert_eq!(got, vec![ip("fd00::2"), ip("fd00::3")]);
    }

    #[test]
    fn host_bits_in_cidr_are_ignored() {
        let p = pool("10.0.0.77/24");
        assert_eq!(p.cidr().to_string(), "10.0.0.0/24");
        assert_eq!(p.gateway_addr(), ip("10.0.0.1"));
    }

    #[test]
    fn exclude_entries_never_handed_out() {
        let now = Instant::now();
        let mut c = cfg("10.0.0.0/28");
        c.exclude = vec![
            ip("10.0.0.2"),
            ip("10.0.0.9"),
            ip("10.0.0.9"),
            ip("10.0.0.1"),  // reserved anyway
            ip("192.0.2.1"), // outside, ignored
        ];
        let mut p = IpPool::new(c).unwrap();
        assert_eq!(p.stats(now).size, 11);
        let got = drain(&mut p, now);
        assert_eq!(got.len(), 11);
        assert!(!got.contains(&ip("10.0.0.2")));
        assert!(!got.contains(&ip("10.0.0.9")));
        assert_eq!(got[0], ip("10.0.0.3"));
    }

    #[test]
    fn sticky_after_logoff() {
        let t = Instant::now();
        let mut p = pool("10.0.0.0/24");
        let a = p.allocate("alice", t).unwrap();
        let b = p.allocate("bob", t).unwrap();
        p.release(a, t).unwrap();
        p.release(b, t).unwrap();
        // Own address back immediately, even in quarantine.
        assert_eq!(p.allocate("alice", t), Ok(a));
        // Long after quarantine, still sticky when nobody took it.
        let later = t + Q * 10;
        assert_eq!(p.allocate("bob", later), Ok(b));
        assert_eq!(p.sticky_addr("alice"), Some(a));
    }

    #[test]
    fn second_allocation_same_owner_is_different_and_sticky_stays_first() {
        let t = Instant::now();
        let mut p = pool("10.0.0.0/24");
        let a1 = p.allocate("alice", t).unwrap();
        let a2 = p.allocate("alice", t).unwrap();
        assert_ne!(a1, a2);
        assert_eq!(p.sticky_addr("alice"), Some(a1));
        p.release(a1, t).unwrap();
        p.release(a2, t).unwrap();
        assert_eq!(p.allocate("alice", t), Ok(a1));
        // Second device gets its old (quarantined-for-others) address back.
        assert_eq!(p.allocate("alice", t), Ok(a2));
    }

    #[test]
    fn quarantine_keeps_address_from_others() {
        let t = Instant::now();
        let mut p = pool("10.0.0.0/30");
        let a = p.allocate("alice", t).unwrap();
        p.release(a, t).unwrap();
        assert_eq!(p.stats(t).quarantined, 1);
        assert!(matches!(
            p.allocate("bob", t + Q - Duration::from_millis(1)),
            Err(PoolError::Exhausted { .. })
        ));
        assert_eq!(p.allocate("bob", t + Q), Ok(a));
        assert_eq!(p.holder(a), Some("bob"));
        // Bob took Alice's sticky address: her stickiness is gone.
        assert_eq!(p.sticky_addr("alice"), None);
        assert_eq!(p.sticky_addr("bob"), Some(a));
    }

    #[test]
    fn zero_quarantine_frees_immediately() {
        let t = Instant::now();
        let mut c = cfg("10.0.0.0/30");
        c.quarantine = Duration::ZERO;
        let mut p = IpPool::new(c).unwrap();
        let a = p.allocate("alice", t).unwrap();
        p.release(a, t).unwrap();
        assert_eq!(p.allocate("bob", t), Ok(a));
    }

    #[test]
    fn fresh_first_then_oldest_release() {
        let t = Instant::now();
        let mut p = pool("10.0.0.0/29"); // usable .2 .. .6
        let a = p.allocate("a", t).unwrap();
        let b = p.allocate("b", t).unwrap();
        let c = p.allocate("c", t).unwrap();
        p.release(b, t).unwrap();
        p.release(a, t + Duration::from_secs(1)).unwrap();
        p.release(c, t + Duration::from_secs(2)).unwrap();
        let later = t + Q * 2;
        // Never-used first.
        assert_eq!(p.allocate("x", later), Ok(ip("10.0.0.5")));
        assert_eq!(p.allocate("y", later), Ok(ip("10.0.0.6")));
        // Then released, oldest release first.
        assert_eq!(p.allocate("z", later), Ok(b));
        assert_eq!(p.allocate("w", later), Ok(a));
        assert_eq!(p.allocate("v", later), Ok(c));
        assert!(p.allocate("u", later).is_err());
    }

    #[test]
    fn no_double_lease_and_exhaustion_with_quarantine() {
        let t = Instant::now();
        let mut p = pool("10.0.0.0/29");
        let got = drain(&mut p, t);
        assert_eq!(got.len(), 5);
        p.release(got[0], t).unwrap();
        // Quarantined for others: not free.
        assert!(p.allocate("someone", t).is_err());
        // The previous holder (u0) can still get it.
        assert_eq!(p.allocate("u0", t), Ok(got[0]));
    }

    #[test]
    fn release_semantics() {
        let t = Instant::now();
        let mut p = pool("10.0.0.0/24");
        assert_eq!(
            p.release(ip("10.9.0.1"), t),
            Err(PoolError::NotInPool {
                addr: ip("10.9.0.1")
            })
        );
        assert_eq!(
            p.release(ip("fd00::1"), t),
            Err(PoolError::NotInPool {
                addr: ip("fd00::1")
            })
        );
        assert_eq!(p.release(ip("10.0.0.1"), t), Ok(()));
        assert_eq!(p.release(ip("10.0.0.200"), t), Ok(()));
        let a = p.allocate("a", t).unwrap();
        assert_eq!(p.release(a, t), Ok(()));
        assert_eq!(p.release(a, t + Q), Ok(())); // no-op: quarantine not restarted
        assert_eq!(p.stats(t + Q).quarantined, 0);
        assert_eq!(p.holder(a), None);
    }

    #[test]
    fn huge_ranges_do_not_enumerate() {
        let t = Instant::now();
        let mut p6 = pool("fd00:1:2:3::/64");
        assert_eq!(p6.stats(t).size, (1_u128 << 64) - 2);
        for i in 0..1000 {
            p6.allocate(&format!("u{i}"), t).unwrap();
        }
        assert_eq!(p6.stats(t).leased, 1000);
        let mut p4 = pool("10.0.0.0/8");
        assert_eq!(p4.stats(t).size, (1 << 24) - 3);
        assert_eq!(p4.allocate("a", t), Ok(ip("10.0.0.2")));
        let mut all = pool("::/0");
        assert_eq!(all.stats(t).size, u128::MAX - 1);
        assert_eq!(all.allocate("a", t), Ok(ip("::2")));
        assert!(all.contains(ip("ffff::1")));
        assert_eq!(
            all.release(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), t),
            Ok(())
        );
    }

    #[test]
    fn ipv6_last_address_is_usable() {
        let t = Instant::now();
        let mut p = pool("fd00::/126");
        let _ = p.allocate("a", t).unwrap();
        assert_eq!(p.allocate("b", t), Ok(ip("fd00::3")));
    }

    #[test]
    fn huge_quarantine_does_not_panic() {
        let t = Instant::now();
        let mut c = cfg("10.0.0.0/30");
        c.quarantine = Duration::MAX;
        let mut p = IpPool::new(c).unwrap();
        let a = p.allocate("a", t).unwrap();
        p.release(a, t).unwrap();
        assert!(p.allocate("b", t + Duration::from_secs(1 << 40)).is_err());
        let snap = p.snapshot(t);
        let mut q = IpPool::new(cfg("10.0.0.0/30")).unwrap();
        q.restore(&snap, t, Duration::ZERO);
        assert_eq!(q.snapshot(t).released[0].quarantine_remaining_ms, 60_000);
    }

    #[test]
    fn snapshot_round_trip() {
        let t = Instant::now();
        let mut p = pool("10.0.0.0/24");
        let a = p.allocate("alice", t).unwrap();
        let _b = p.allocate("bob", t).unwrap();
        let c = p.allocate("carol", t).unwrap();
        let _a2 = p.allocate("alice", t).unwrap();
        p.release(a, t + Duration::from_secs(5)).unwrap();
        p.release(c, t + Duration::from_secs(10)).unwrap();
        let t1 = t + Duration::from_secs(20);
        let snap = p.snapshot(t1);
        assert_eq!(snap.leases.len(), 2);
        assert_eq!(snap.released.len(), 2);
        assert_eq!(snap.released[0].quarantine_remaining_ms, 45_000);

        // Same instant.
        let mut q = pool("10.0.0.0/24");
        assert_eq!(q.restore(&snap, t1, Duration::ZERO), 0);
        assert_eq!(q.snapshot(t1), snap);
        assert_eq!(q.stats(t1), p.stats(t1));

        // After a restart 30 s later (new clock).
        let t2 = Instant::now() + Duration::from_secs(1000);
        let mut r = pool("10.0.0.0/24");
        r.restore(&snap, t2, Duration::from_secs(30));
        assert_eq!(r.snapshot(t2), p.snapshot(t1 + Duration::from_secs(30)));
        assert_eq!(r.stats(t2), p.stats(t1 + Duration::from_secs(30)));
        // Behaviour matches too.
        let t3 = t1 + Duration::from_secs(30);
        assert_eq!(r.allocate("dave", t2), p.allocate("dave", t3));
        assert_eq!(r.allocate("erin", t2), p.allocate("erin", t3));
        assert_eq!(r.allocate("carol", t2), p.allocate("carol", t3));
        assert_eq!(r.snapshot(t2), p.snapshot(t3));
    }

    #[test]
    fn restore_skips_bad_entries() {
        let t = Instant::now();
        let mut p = pool("10.0.0.0/28");
        let snap = PoolSnapshot {
            pool: "other".to_owned(),
            cidr: "garbage".to_owned(),
            leases: vec![
                SnapshotLease {
                    addr: ip("10.0.0.5"),
                    owner: "a".to_owned(),
                },
                SnapshotLease {
                    addr: ip("10.0.0.5"),
                    owner: "b".to_owned(),
                },
                SnapshotLease {
                    addr: ip("10.0.0.1"),
                    owner: "c".to_owned(),
                },
                SnapshotLease {
                    addr: ip("10.0.0.15"),
                    owner: "c".to_owned(),
                },
                SnapshotLease {
                    addr: ip("172.16.0.5"),
                    owner: "c".to_owned(),
                },
            ],
            released: vec![
                SnapshotReleased {
                    addr: ip("10.0.0.5"),
                    last_owner: "x".to_owned(),
                    quarantine_remaining_ms: 5,
                },
                SnapshotReleased {
                    addr: ip("10.0.0.6"),
                    last_owner: "x".to_owned(),
                    quarantine_remaining_ms: u64::MAX,
                },
            ],
            sticky: vec![
                SnapshotSticky {
                    owner: "b".to_owned(),
                    addr: ip("10.0.0.5"),
                },
                SnapshotSticky {
                    owner: "a".to_owned(),
                    addr: ip("10.0.0.5"),
                },
                SnapshotSticky {
                    owner: "a".to_owned(),
                    addr: ip("10.0.0.7"),
                },
                SnapshotSticky {
                    owner: "z".to_owned(),
                    addr: ip("10.0.0.7"),
                },
                SnapshotSticky {
                    owner: "y".to_owned(),
                    addr: ip("10.0.0.8"),
                },
            ],
            saved_at_unix: None,
        };
        assert_eq!(p.restore(&snap, t, Duration::ZERO), 7);
        assert_eq!(p.holder(ip("10.0.0.5")), Some("a"));
        assert_eq!(p.sticky_addr("a"), Some(ip("10.0.0.5")));
        assert_eq!(p.sticky_addr("b"), None);
        assert_eq!(p.sticky_addr("z"), Some(ip("10.0.0.7")));
        assert_eq!(p.sticky_addr("y"), Some(ip("10.0.0.8")));
        // Hand-edited huge quarantine is capped at the configured one.
        assert_eq!(p.snapshot(t).released[0].quarantine_remaining_ms, 60_000);
        // Fresh addresses skip restored ones; y's sticky (never used) goes to
        // someone else only when it comes up, which drops y's stickiness.
        let got = drain(&mut p, t);
        assert!(!got.contains(&ip("10.0.0.5")));
        assert!(!got.contains(&ip("10.0.0.6")));
        assert_eq!(got.len(), 11);
        assert_eq!(p.sticky_addr("y"), None);
        assert_eq!(p.sticky_addr("z"), None);
    }

    #[test]
    fn restored_sticky_is_honoured() {
        let t = Instant::now();
        let mut p = pool("10.0.0.0/28");
        let snap = PoolSnapshot {
            sticky: vec![SnapshotSticky {
                owner: "y".to_owned(),
                addr: ip("10.0.0.9"),
            }],
            ..PoolSnapshot::default()
        };
        p.restore(&snap, t, Duration::ZERO);
        assert_eq!(p.allocate("y", t), Ok(ip("10.0.0.9")));
        assert_eq!(p.allocate("x", t), Ok(ip("10.0.0.2")));
    }

    #[test]
    fn leases_iterator() {
        let t = Instant::now();
        let mut p = pool("10.0.0.0/28");
        let a = p.allocate("a", t).unwrap();
        let b = p.allocate("b", t).unwrap();
        p.release(a, t).unwrap();
        let l: Vec<_> = p.leases().collect();
        assert_eq!(l, vec![(b, "b")]);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        const OWNERS: [&str; 4] = ["alice", "bob", "carol", "dave"];
        const QMS: u64 = 1000;

        #[derive(Debug, Clone)]
        enum Op {
            Alloc(usize),
            ReleaseOwn(usize, usize),
            ReleaseAny(u8),
            Advance(u64),
            RoundTrip(u64),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                6 => (0..OWNERS.len()).prop_map(Op::Alloc),
                3 => (0..OWNERS.len(), 0..4_usize).prop_map(|(o, i)| Op::ReleaseOwn(o, i)),
                1 => (0..16_u8).prop_map(Op::ReleaseAny),
                // Include the quarantine boundary (1000 ms) and just before it.
                2 => prop_oneof![0..1500_u64, Just(1), Just(499), Just(500), Just(999), Just(1000)]
                    .prop_map(Op::Advance),
                1 => (0..1500_u64).prop_map(Op::RoundTrip),
            ]
        }

        /// Reference model: the rules written the slow, obvious way.
        #[derive(Default)]
        struct Model {
            leases: BTreeMap<IpAddr, String>,
            /// addr → (last owner, release time in ms)
            released: BTreeMap<IpAddr, (String, u64)>,
            sticky: BTreeMap<String, IpAddr>,
        }

        impl Model {
            fn eligible(&self, a: IpAddr, owner: &str, now: u64) -> bool {
                !self.leases.contains_key(&a)
                    && self
                        .released
                        .get(&a)
                        .is_none_or(|(o, at)| o == owner || now >= at + QMS)
            }
        }

        fn usable(excluded: IpAddr) -> Vec<IpAddr> {
            (2..15_u8)
                .map(|i| IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)))
                .filter(|a| *a != excluded)
                .collect()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            #[test]
            fn pool_rules_hold(ops in proptest::collection::vec(op(), 1..200)) {
                let t0 = Instant::now();
                let excluded = ip("10.0.0.7");
                let mut c = cfg("10.0.0.0/28");
                c.quarantine = Duration::from_millis(QMS);
                c.exclude = vec![excluded];
                let mut p = IpPool::new(c.clone()).unwrap();
                let mut m = Model::default();
                let mut now_ms = 0_u64;
                let mut base = t0; // shifts on a simulated restart
                let mut base_ms = 0_u64;
                let all = usable(excluded);

                for op in ops {
                    let now = base + Duration::from_millis(now_ms - base_ms);
                    match op {
                        Op::Alloc(o) => {
                            let owner = OWNERS[o];
                            let eligible: Vec<IpAddr> =
                                all.iter().copied().filter(|a| m.eligible(*a, owner, now_ms)).collect();
                            let never_used: Vec<IpAddr> = all.iter().copied()
                                .filter(|a| !m.leases.contains_key(a) && !m.released.contains_key(a))
                                .collect();
                            match p.allocate(owner, now) {
                                Ok(a) => {
                                    prop_assert!(eligible.contains(&a), "{a} not eligible for {owner}");
                                    // Sticky honoured when free.
                                    if let Some(s) = m.sticky.get(owner) {
                                        if m.eligible(*s, owner, now_ms) {
                                            prop_assert_eq!(a, *s);
                                        }
                                    }
                                    // Someone else's old address only when nothing fresh and
                                    // nothing of the owner's own was available.
                                    if let Some((prev, _)) = m.released.get(&a) {
                                        let sticky_ok = m.sticky.get(owner)
                                            .is_some_and(|s| m.eligible(*s, owner, now_ms));
                                        if prev == owner && !sticky_ok {
                                            // Own released addresses: lowest first.
                                            let lowest = m.released.iter()
                                                .filter(|(_, (o, _))| o == owner)
                                                .map(|(x, _)| *x)
                                                .min();
                                            prop_assert_eq!(Some(a), lowest);
                                        }
                                        if prev != owner {
                                            prop_assert!(never_used.is_empty());
                                            prop_assert!(!m.released.values().any(|(o, _)| o == owner));
                                            // Oldest release first.
                                            let oldest = m.released.values()
                                                .filter(|(o, _)| o != owner)
                                                .map(|(_, at)| *at)
                                                .min();
                                            prop_assert_eq!(Some(m.released[&a].1), oldest);
                                        }
                                    }
                                    m.released.remove(&a);
                                    m.leases.insert(a, owner.to_owned());
                                    if let Some(other) = m.sticky.iter()
                                        .find(|(o, s)| **s == a && o.as_str() != owner)
                                        .map(|(o, _)| o.clone())
                                    {
                                        m.sticky.remove(&other);
                                    }
                                    if !m.sticky.contains_key(owner) {
                                        m.sticky.insert(owner.to_owned(), a);
                                    }
                                }
                                Err(e) => {
                                    let exhausted = matches!(e, PoolError::Exhausted { .. });
                                    prop_assert!(exhausted);
                                    prop_assert!(eligible.is_empty(), "exhausted but {eligible:?} free");
                                }
                            }
                        }
                        Op::ReleaseOwn(o, i) => {
                            let mine: Vec<IpAddr> = m.leases.iter()
                                .filter(|(_, w)| w.as_str() == OWNERS[o]).map(|(a, _)| *a).collect();
                            if let Some(a) = mine.get(i % mine.len().max(1)) {
                                prop_assert_eq!(p.release(*a, now), Ok(()));
                                let w = m.leases.remove(a).unwrap();
                                m.released.insert(*a, (w, now_ms));
                            }
                        }
                        Op::ReleaseAny(i) => {
                            let a = IpAddr::V4(Ipv4Addr::new(10, 0, 0, i));
                            prop_assert_eq!(p.release(a, now), Ok(()));
                            if let Some(w) = m.leases.remove(&a) {
                                m.released.insert(a, (w, now_ms));
                            }
                        }
                        Op::Advance(d) => now_ms += d,
                        Op::RoundTrip(gap) => {
                            // Persist, "restart" with a new clock, restore.
                            let snap = p.snapshot(now);
                            now_ms += gap;
                            base = t0 + Duration::from_secs(3600) + Duration::from_millis(now_ms);
                            base_ms = now_ms;
                            let mut q = IpPool::new(c.clone()).unwrap();
                            prop_assert_eq!(q.restore(&snap, base, Duration::from_millis(gap)), 0);
                            // Round trip: same state as if the old pool had kept running.
                            prop_assert_eq!(q.snapshot(base), p.snapshot(now + Duration::from_millis(gap)));
                            p = q;
                        }
                    }
                    let now = base + Duration::from_millis(now_ms - base_ms);

                    // No address held twice; every lease inside and not reserved.
                    let leases: Vec<(IpAddr, String)> =
                        p.leases().map(|(a, o)| (a, o.to_owned())).collect();
                    let addrs: BTreeSet<IpAddr> = leases.iter().map(|(a, _)| *a).collect();
                    prop_assert_eq!(addrs.len(), leases.len());
                    for (a, o) in &leases {
                        prop_assert!(all.contains(a), "{a} reserved or outside");
                        prop_assert_eq!(p.holder(*a), Some(o.as_str()));
                    }
                    let model_leases: Vec<(IpAddr, String)> =
                        m.leases.iter().map(|(a, o)| (*a, o.clone())).collect();
                    prop_assert_eq!(leases, model_leases);
                    for o in OWNERS {
                        prop_assert_eq!(p.sticky_addr(o), m.sticky.get(o).copied());
                    }
                    let st = p.stats(now);
                    prop_assert_eq!(st.size, 12);
                    prop_assert_eq!(st.leased, m.leases.len() as u64);
                    prop_assert_eq!(
                        st.quarantined,
                        m.released.values().filter(|(_, at)| now_ms < at + QMS).count() as u64
                    );
                    prop_assert_eq!(st.sticky, m.sticky.len() as u64);
                }
            }
        }
    }
}
