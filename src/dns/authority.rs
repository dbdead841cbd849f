//! Answers from our zones: pure lookups over the zone table (static zones,
//! generated SOA/NS/gateway records) and the session records. No I/O.
//!
//! Zones: the users' domain, one reverse zone per pool (the octet- or
//! nibble-aligned zone above it, e.g. `64.18.198.in-addr.arpa.` for a /28 in
//! 198.18.64.0/24) and every zone file. A query goes to the zone with the
//! longest origin containing it. Inside a zone the order is: delegations,
//! apex, static names (they win), the gateway's NS name, session records,
//! static wildcards, NXDOMAIN.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use hickory_server::proto::op::ResponseCode;
use hickory_server::proto::rr::rdata::{A, AAAA, CNAME, NS, PTR, SOA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};
use ipnetwork::IpNetwork;

use super::zones::{Node, StaticZones, Zone, GATEWAY_LABEL};
use super::DynamicRecords;

/// Longest CNAME chain we follow inside our zones (BIND uses 16 hops; our
/// chains are short, and a loop must end).
const MAX_CNAME_HOPS: usize = 8;

/// Generated SOA timers, seconds (RFC 1912 §2.2 ranges; no secondaries
/// transfer from us, so these are informational).
const SOA_REFRESH: i32 = 3600;
const SOA_RETRY: i32 = 600;
const SOA_EXPIRE: i32 = 14 * 24 * 3600;

/// What the zone table needs from the configuration.
#[derive(Debug, Clone)]
pub(crate) struct AuthorityConfig {
    pub(crate) domain: Name,
    pub(crate) ttl: u32,
    pub(crate) ns_addrs: Vec<IpAddr>,
    pub(crate) reverse_networks: Vec<IpNetwork>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ZoneKind {
    /// The users' domain: static records, the gateway name, session A/AAAA.
    Domain,
    /// A pool's reverse zone: static records, session PTRs.
    Reverse,
    /// Another zone file, served as it is.
    Static,
}

struct ZoneEntry {
    origin: LowerName,
    kind: ZoneKind,
    stat: Option<Arc<Zone>>,
    /// The apex SOA: the zone file's, else generated.
    soa: Record,
    /// The apex NS set: the zone file's, else `gateway.<domain>`.
    ns: Vec<Record>,
}

/// Our answer to one question.
#[derive(Debug, Default)]
pub(crate) struct Answer {
    pub(crate) rcode: ResponseCode,
    pub(crate) authoritative: bool,
    pub(crate) answers: Vec<Record>,
    pub(crate) authorities: Vec<Record>,
    pub(crate) additionals: Vec<Record>,
    /// A CNAME chain left our zones here: the rest is the upstreams' to answer.
    pub(crate) external_target: Option<Name>,
}

/// One step of a lookup inside one zone.
enum Step {
    Records(Vec<Record>),
    /// A CNAME (its target is in the record).
    Cname(Box<Record>),
    NoData,
    NxDomain,
    Referral(Vec<Record>),
}

/// Every zone we are authoritative for, ready for lookups.
pub(crate) struct ZoneTable {
    /// Longest origin first, so the first zone containing a name is its zone.
    zones: Vec<ZoneEntry>,
    domain: LowerName,
    domain_name: Name,
    gateway: LowerName,
    ttl: u32,
    ns_addrs: Vec<IpAddr>,
    reverse_networks: Vec<IpNetwork>,
    serial: u32,
}

impl ZoneTable {
    /// Builds the table. `serial` is the SOA serial of generated SOAs.
    pub(crate) fn build(cfg: &AuthorityConfig, zones: &StaticZones, serial: u32) -> Self {
        let domain_name = cfg.domain.to_lowercase();
        let domain = LowerName::new(&domain_name);
        let gateway_name = domain_name
            .prepend_label(GATEWAY_LABEL)
            .unwrap_or_else(|_| domain_name.clone());
        let mut table = Self {
            zones: Vec::new(),
            gateway: LowerName::new(&gateway_name),
            domain: domain.clone(),
            domain_name,
            ttl: cfg.ttl,
            ns_addrs: cfg.ns_addrs.clone(),
            reverse_networks: cfg.reverse_networks.clone(),
            serial,
        };
        let statics: HashMap<&LowerName, &Arc<Zone>> =
            zones.zones().map(|z| (&z.origin, z)).collect();

        let mut origins: Vec<(LowerName, ZoneKind)> = vec![(domain, ZoneKind::Domain)];
        for net in &cfg.reverse_networks {
            origins.push((LowerName::new(&reverse_zone_origin(net)), ZoneKind::Reverse));
        }
        for zone in statics.keys() {
            origins.push(((*zone).clone(), ZoneKind::Static));
        }
        for (origin, kind) in origins {
            if table.zones.iter().any(|z| z.origin == origin) {
                continue; // first wins: domain, then reverse zones, then files
            }
            let stat = statics.get(&origin).map(|z| Arc::clone(z));
            let apex = stat.as_deref().and_then(Zone::apex);
            let soa = apex
                .and_then(|n| n.rrset(RecordType::SOA))
                .and_then(|s| s.first().cloned())
                .unwrap_or_else(|| table.generated_soa(&origin));
            let ns = apex
                .and_then(|n| n.rrset(RecordType::NS))
                .map(<[Record]>::to_vec)
                .unwrap_or_else(|| vec![table.generated_ns(&origin)]);
            table.zones.push(ZoneEntry {
                origin,
                kind,
                stat,
                soa,
                ns,
            });
        }
        table
            .zones
            .sort_by_key(|z| std::cmp::Reverse(z.origin.num_labels()));
        table
    }

    pub(crate) fn serial(&self) -> u32 {
        self.serial
    }

    fn generated_soa(&self, origin: &LowerName) -> Record {
        let rname = self
            .domain_name
            .prepend_label("hostmaster")
            .unwrap_or_else(|_| self.domain_name.clone());
        let soa = SOA::new(
            Name::from(&self.gateway),
            rname,
            self.serial,
            SOA_REFRESH,
            SOA_RETRY,
            SOA_EXPIRE,
            self.ttl,
        );
        Record::from_rdata(Name::from(origin), self.ttl, RData::SOA(soa))
    }

    fn generated_ns(&self, origin: &LowerName) -> Record {
        Record::from_rdata(
            Name::from(origin),
            self.ttl,
            RData::NS(NS(Name::from(&self.gateway))),
        )
    }

    /// The zone with the longest origin containing `name`.
    fn find(&self, name: &LowerName) -> Option<&ZoneEntry> {
        // A handful of zones: a scan without allocation beats walking the
        // name's suffixes through a map.
        self.zones.iter().find(|z| z.origin.zone_of(name))
    }

    /// Answers `qname`/`qtype`, or `None` if no zone of ours contains it.
    pub(crate) fn resolve<R: DynamicRecords + ?Sized>(
        &self,
        dynamic: &R,
        qname: &LowerName,
        qtype: RecordType,
    ) -> Option<Answer> {
        let mut zone = self.find(qname)?;
        let mut ans = Answer {
            authoritative: true,
            ..Answer::default()
        };
        let mut name = qname.clone();
        for hop in 0..=MAX_CNAME_HOPS {
            match self.step(zone, &name, qtype, dynamic) {
                Step::Records(records) => {
                    ans.answers.extend(records);
                    break;
                }
                Step::Cname(record) => {
                    let RData::CNAME(CNAME(target)) = &record.data else {
                        ans.answers.push(*record);
                        break;
                    };
                    let target = target.clone();
                    ans.answers.push(*record);
                    let target_l = LowerName::new(&target);
                    let looped = ans
                        .answers
                        .iter()
                        .any(|r| LowerName::new(&r.name) == target_l);
                    if looped || hop == MAX_CNAME_HOPS {
                        break;
                    }
                    match self.find(&target_l) {
                        Some(z) => {
                            zone = z;
                            name = target_l;
                        }
                        None => {
                            ans.external_target = Some(target);
                            break;
                        }
                    }
                }
                Step::NoData => {
                    ans.authorities.push(negative_soa(zone));
                    break;
                }
                Step::NxDomain => {
                    ans.rcode = ResponseCode::NXDomain;
                    ans.authorities.push(negative_soa(zone));
                    break;
                }
                Step::Referral(ns) => {
                    if ans.answers.is_empty() {
                        ans.authoritative = false;
                    }
                    ans.authorities.extend(ns);
                    break;
                }
            }
        }
        self.add_additionals(&mut ans, dynamic);
        Some(ans)
    }

    fn step<R: DynamicRecords + ?Sized>(
        &self,
        z: &ZoneEntry,
        name: &LowerName,
        qtype: RecordType,
        dynamic: &R,
    ) -> Step {
        let stat = z.stat.as_deref();
        if let Some(s) = stat.filter(|s| s.has_cuts) {
            if let Some(ns) = cut_above(s, name, qtype) {
                return Step::Referral(ns);
            }
        }
        if *name == z.origin {
            return self.apex(z, qtype);
        }
        if let Some(s) = stat {
            if let Some(node) = s.node(name) {
                return node_step(node, qtype, None); // an empty non-terminal: NODATA
            }
        }
        match z.kind {
            ZoneKind::Domain => {
                if *name == self.gateway {
                    return records_or_nodata(self.gateway_addresses(name, qtype));
                }
                if let Some(label) = self.user_label(name) {
                    let found = self.user_addresses(dynamic, label, name, qtype);
                    if !found.is_empty() {
                        return Step::Records(found);
                    }
                    if dynamic.has_label(label) {
                        return Step::NoData;
                    }
                }
            }
            ZoneKind::Reverse => match parse_arpa(name) {
                Some(Arpa::Addr(ip)) if self.in_pools(ip) => {
                    if let Some(label) = dynamic.name_of(ip) {
                        if !matches!(qtype, RecordType::PTR | RecordType::ANY) {
                            return Step::NoData;
                        }
                        if let Some(record) = self.ptr_record(name, &label) {
                            return Step::Records(vec![record]);
                        }
                    }
                }
                // An empty non-terminal above pool addresses (RFC 8020: no
                // NXDOMAIN for a name with possible children).
                Some(Arpa::Partial(net)) if self.pools_overlap(net) => return Step::NoData,
                _ => {}
            },
            ZoneKind::Static => {}
        }
        if let Some(s) = stat.filter(|s| s.has_wildcards) {
            if let Some(step) = self.wildcard(z, s, name, qtype, dynamic) {
                return step;
            }
        }
        Step::NxDomain
    }

    fn apex(&self, z: &ZoneEntry, qtype: RecordType) -> Step {
        let node = z.stat.as_deref().and_then(Zone::apex);
        let mut out = Vec::new();
        match qtype {
            RecordType::SOA => out.push(z.soa.clone()),
            RecordType::NS => out.extend(z.ns.iter().cloned()),
            RecordType::ANY => {
                out.push(z.soa.clone());
                out.extend(z.ns.iter().cloned());
                if let Some(node) = node {
                    out.extend(
                        node.all()
                            .filter(|r| {
                                !matches!(r.record_type(), RecordType::SOA | RecordType::NS)
                            })
                            .cloned(),
                    );
                }
            }
            t => {
                if let Some(set) = node.and_then(|n| n.rrset(t)) {
                    out.extend(set.iter().cloned());
                }
            }
        }
        records_or_nodata(out)
    }

    /// The label of a name directly under the domain.
    fn user_label<'n>(&self, name: &'n LowerName) -> Option<&'n str> {
        if name.num_labels() != self.domain.num_labels().saturating_add(1)
            || !self.domain.zone_of(name)
        {
            return None;
        }
        name.iter().next().and_then(|l| std::str::from_utf8(l).ok())
    }

    fn user_addresses<R: DynamicRecords + ?Sized>(
        &self,
        dynamic: &R,
        label: &str,
        name: &LowerName,
        qtype: RecordType,
    ) -> Vec<Record> {
        let mut out = Vec::new();
        if matches!(qtype, RecordType::A | RecordType::ANY) {
            if let Some(ip @ IpAddr::V4(_)) = dynamic.lookup(label, false) {
                out.push(self.address_record(name, ip));
            }
        }
        if matches!(qtype, RecordType::AAAA | RecordType::ANY) {
            if let Some(ip @ IpAddr::V6(_)) = dynamic.lookup(label, true) {
                out.push(self.address_record(name, ip));
            }
        }
        out
    }

    fn gateway_addresses(&self, name: &LowerName, qtype: RecordType) -> Vec<Record> {
        self.ns_addrs
            .iter()
            .filter(|ip| match qtype {
                RecordType::A => ip.is_ipv4(),
                RecordType::AAAA => ip.is_ipv6(),
                RecordType::ANY => true,
                _ => false,
            })
            .map(|ip| self.address_record(name, *ip))
            .collect()
    }

    fn address_record(&self, name: &LowerName, ip: IpAddr) -> Record {
        let rdata = match ip {
            IpAddr::V4(v4) => RData::A(A(v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
        };
        Record::from_rdata(Name::from(name), self.ttl, rdata)
    }

    fn ptr_record(&self, name: &LowerName, label: &str) -> Option<Record> {
        let target = Name::from_ascii(label)
            .ok()?
            .append_domain(&self.domain_name)
            .ok()?;
        Some(Record::from_rdata(
            Name::from(name),
            self.ttl,
            RData::PTR(PTR(target)),
        ))
    }

    fn in_pools(&self, ip: IpAddr) -> bool {
        self.reverse_networks.iter().any(|n| n.contains(ip))
    }

    fn pools_overlap(&self, net: IpNetwork) -> bool {
        self.reverse_networks
            .iter()
            .any(|p| p.contains(net.network()) || net.contains(p.network()))
    }

    /// Does `name` exist in the zone's non-static part (sessions, gateway)?
    fn dynamic_exists<R: DynamicRecords + ?Sized>(
        &self,
        z: &ZoneEntry,
        name: &LowerName,
        dynamic: &R,
    ) -> bool {
        match z.kind {
            ZoneKind::Domain => {
                *name == self.gateway || self.user_label(name).is_some_and(|l| dynamic.has_label(l))
            }
            ZoneKind::Reverse => match parse_arpa(name) {
                Some(Arpa::Addr(ip)) => self.in_pools(ip) && dynamic.name_of(ip).is_some(),
                Some(Arpa::Partial(net)) => self.pools_overlap(net),
                None => false,
            },
            ZoneKind::Static => false,
        }
    }

    /// RFC 4592: the wildcard at the closest encloser answers a name that
    /// does not exist.
    fn wildcard<R: DynamicRecords + ?Sized>(
        &self,
        z: &ZoneEntry,
        s: &Zone,
        name: &LowerName,
        qtype: RecordType,
        dynamic: &R,
    ) -> Option<Step> {
        let mut encloser = name.base_name();
        while encloser != z.origin
            && !s.exists(&encloser)
            && !self.dynamic_exists(z, &encloser, dynamic)
        {
            if encloser.is_root() {
                return None;
            }
            encloser = encloser.base_name();
        }
        let wildcard = LowerName::new(&Name::from(&encloser).prepend_label("*").ok()?);
        let node = s.node(&wildcard)?;
        Some(node_step(node, qtype, Some(name)))
    }

    /// Addresses of NS/MX/SRV targets we know, for the additional section.
    fn add_additionals<R: DynamicRecords + ?Sized>(&self, ans: &mut Answer, dynamic: &R) {
        let mut targets: Vec<LowerName> = Vec::new();
        for r in ans.answers.iter().chain(ans.authorities.iter()) {
            let target = match &r.data {
                RData::NS(NS(t)) => t,
                RData::MX(mx) => &mx.exchange,
                RData::SRV(srv) => &srv.target,
                _ => continue,
            };
            let t = LowerName::new(target);
            if !targets.contains(&t) && !ans.answers.iter().any(|a| LowerName::new(&a.name) == t) {
                targets.push(t);
            }
        }
        for target in targets {
            let Some(z) = self.find(&target) else {
                continue;
            };
            // Glue below a delegation is in the static node, not behind the cut.
            let node = z.stat.as_deref().and_then(|s| s.node(&target));
            for qtype in [RecordType::A, RecordType::AAAA] {
                if let Some(node) = node {
                    ans.additionals
                        .extend(node.rrset(qtype).into_iter().flatten().cloned());
                } else if let Step::Records(records) = self.step(z, &target, qtype, dynamic) {
                    ans.additionals
                        .extend(records.into_iter().filter(|r| r.record_type() == qtype));
                }
            }
        }
    }
}

fn records_or_nodata(records: Vec<Record>) -> Step {
    if records.is_empty() {
        Step::NoData
    } else {
        Step::Records(records)
    }
}

/// The answer from one static node; `owner` renames wildcard matches.
fn node_step(node: &Node, qtype: RecordType, owner: Option<&LowerName>) -> Step {
    let rename = |r: &Record| {
        let mut r = r.clone();
        if let Some(owner) = owner {
            r.name = Name::from(owner);
        }
        r
    };
    if qtype == RecordType::ANY {
        return records_or_nodata(node.all().map(rename).collect());
    }
    if let Some(set) = node.rrset(qtype) {
        return records_or_nodata(set.iter().map(rename).collect());
    }
    if let Some(record) = node.rrset(RecordType::CNAME).and_then(|s| s.first()) {
        return Step::Cname(Box::new(rename(record)));
    }
    Step::NoData
}

/// A delegation (NS below the apex) at or above `name`: the referral's NS set.
fn cut_above(s: &Zone, name: &LowerName, qtype: RecordType) -> Option<Vec<Record>> {
    let mut chain = Vec::new();
    let mut n = name.clone();
    while n != s.origin && !n.is_root() {
        chain.push(n.clone());
        n = n.base_name();
    }
    for (i, n) in chain.iter().rev().enumerate() {
        // The parent side answers DS at the cut itself (RFC 4035 §3.1.4.1).
        let at_name = i + 1 == chain.len();
        if at_name && qtype == RecordType::DS {
            continue;
        }
        if let Some(ns) = s.node(n).and_then(|node| node.rrset(RecordType::NS)) {
            return Some(ns.to_vec());
        }
    }
    None
}

/// The SOA for a negative answer: TTL = min(SOA TTL, MINIMUM) (RFC 2308 §3).
fn negative_soa(z: &ZoneEntry) -> Record {
    let mut soa = z.soa.clone();
    if let RData::SOA(data) = &soa.data {
        soa.ttl = soa.ttl.min(data.minimum);
    }
    soa
}

/// The reverse zone above a pool: its prefix rounded down to whole octets
/// (IPv4) or nibbles (IPv6).
pub(crate) fn reverse_zone_origin(net: &IpNetwork) -> Name {
    let labels: Vec<String> = match net.network() {
        IpAddr::V4(v4) => {
            let octets = usize::from(net.prefix() / 8);
            let mut l: Vec<String> = v4.octets()[..octets.min(4)]
                .iter()
                .rev()
                .map(u8::to_string)
                .collect();
            l.extend(["in-addr".to_owned(), "arpa".to_owned()]);
            l
        }
        IpAddr::V6(v6) => {
            let nibbles = usize::from(net.prefix() / 4).min(32);
            let bits = u128::from(v6);
            let mut l: Vec<String> = (0..nibbles)
                .rev()
                .map(|i| format!("{:x}", (bits >> (124 - 4 * i)) & 0xf))
                .collect();
            l.extend(["ip6".to_owned(), "arpa".to_owned()]);
            l
        }
    };
    Name::from_labels(labels.iter().map(String::as_bytes)).unwrap_or_else(|_| Name::root())
}

/// A name under in-addr.arpa / ip6.arpa.
#[derive(Debug, PartialEq, Eq)]
enum Arpa {
    /// A whole address.
    Addr(IpAddr),
    /// Fewer labels than an address: the network they spell.
    Partial(IpNetwork),
}

/// Parses a reverse name strictly: canonical decimal octets (no leading
/// zeros, ≤ 255) or single hex nibbles; anything else is no address.
fn parse_arpa(name: &LowerName) -> Option<Arpa> {
    let labels: Vec<&[u8]> = name.iter().collect();
    let (rest, suffix) = labels.split_at(labels.len().checked_sub(2)?);
    match suffix {
        [b"in-addr", b"arpa"] => {
            if rest.len() > 4 {
                return None;
            }
            let mut octets = [0u8; 4];
            for (i, label) in rest.iter().rev().enumerate() {
                let s = std::str::from_utf8(label).ok()?;
                let canonical = !s.is_empty()
                    && s.bytes().all(|b| b.is_ascii_digit())
                    && (s.len() == 1 || !s.starts_with('0'));
                if !canonical {
                    return None;
                }
                *octets.get_mut(i)? = s.parse().ok()?;
            }
            let ip = Ipv4Addr::from(octets);
            if rest.len() == 4 {
                Some(Arpa::Addr(IpAddr::V4(ip)))
            } else {
                let prefix = u8::try_from(rest.len() * 8).ok()?;
                IpNetwork::new(IpAddr::V4(ip), prefix)
                    .ok()
                    .map(Arpa::Partial)
            }
        }
        [b"ip6", b"arpa"] => {
            if rest.len() > 32 {
                return None;
            }
            let mut bits: u128 = 0;
            for (i, label) in rest.iter().rev().enumerate() {
                let [c] = label else { return None };
                let nibble = char::from(*c).to_digit(16)?;
                bits |= u128::from(nibble) << (124 - 4 * i);
            }
            let ip = Ipv6Addr::from(bits);
            if rest.len() == 32 {
                Some(Arpa::Addr(IpAddr::V6(ip)))
            } else {
                let prefix = u8::try_from(rest.len() * 4).ok()?;
                IpNetwork::new(IpAddr::V6(ip), prefix)
                    .ok()
                    .map(Arpa::Partial)
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lower(s: &str) -> LowerName {
        LowerName::new(&Name::from_ascii(s).unwrap())
    }

    #[test]
    fn reverse_origins_are_aligned() {
        let o = |s: &str| reverse_zone_origin(&s.parse().unwrap()).to_string();
        assert_eq!(o("198.18.64.16/28"), "64.18.198.in-addr.arpa.");
        assert_eq!(o("10.1.0.0/16"), "1.10.in-addr.arpa.");
        assert_eq!(o("10.1.0.0/20"), "1.10.in-addr.arpa.");
        assert_eq!(
            o("fd00:1:2:3::/64"),
            "3.0.0.0.2.0.0.0.1.0.0.0.0.0.d.f.ip6.arpa."
        );
        assert_eq!(o("fd00::/6"), "f.ip6.arpa.");
    }

    #[test]
    fn arpa_names_parse_strictly() {
        assert_eq!(
            parse_arpa(&lower("5.64.18.198.in-addr.arpa.")),
            Some(Arpa::Addr("198.18.64.5".parse().unwrap()))
        );
        assert_eq!(
            parse_arpa(&lower("64.18.198.in-addr.arpa.")),
            Some(Arpa::Partial("198.18.64.0/24".parse().unwrap()))
        );
        for bad in [
            "05.64.18.198.in-addr.arpa.",
            "256.64.18.198.in-addr.arpa.",
            "x.64.18.198.in-addr.arpa.",
            "1.5.64.18.198.in-addr.arpa.",
            "10.1.ip6.arpa.",
            "example.com.",
        ] {
            assert_eq!(parse_arpa(&lower(bad)), None, "{bad}");
        }
        let v6: Ipv6Addr = "fd00::1:2".parse().unwrap();
        let name = Name::from(IpAddr::V6(v6));
        assert_eq!(
            parse_arpa(&LowerName::new(&name)),
            Some(Arpa::Addr(IpAddr::V6(v6)))
        );
    }
}
