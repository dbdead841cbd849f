//! Static records: zone files (RFC 1035 master-file format) in `dns/`, one
//! zone per `*.zone` file, parsed by hickory's zone-file parser.
//!
//! A zone's origin is the owner of its SOA record or, when the file has no
//! SOA, the file name without `.zone` (`corp.example.zone` → `corp.example.`,
//! which is also the initial `$ORIGIN`). A zone without SOA/NS gets the
//! generated ones (`gateway.<domain>`). Parser errors are mapped back to the
//! line of the entry that failed (the parser itself reports no lines).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use hickory_server::proto::rr::{DNSClass, LowerName, Name, Record, RecordSet, RecordType, RrKey};
use hickory_server::proto::serialize::txt::Parser;

/// Largest zone file we read, bytes (a guard against pointing `dns/` at the
/// wrong thing, not a format limit).
const MAX_ZONE_FILE_LEN: u64 = 64 * 1024 * 1024;

/// The label reserved for the gateway's own name server name.
pub(crate) const GATEWAY_LABEL: &str = "gateway";

/// The static zones loaded from `dns/`.
#[derive(Clone)]
pub struct StaticZones {
    domain: LowerName,
    zones: HashMap<LowerName, Arc<Zone>>,
    serial: u32,
}

impl fmt::Debug for StaticZones {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticZones")
            .field("domain", &self.domain.to_string())
            .field("zones", &self.origins())
            .field("serial", &self.serial)
            .finish()
    }
}

impl StaticZones {
    /// No static zones, for `domain` (e.g. `corp.example`).
    pub fn empty(domain: &str) -> Result<Self, String> {
        Ok(Self {
            domain: parse_domain(domain)?,
            zones: HashMap::new(),
            serial: unix_serial(),
        })
    }

    /// Zones from in-memory texts: `(file name, contents)` pairs, the file
    /// name as it would be in `dns/` (e.g. `corp.example.zone`). Relative
    /// `$INCLUDE`s are not available. Errors as for [`load_zones`].
    pub fn from_texts<'a>(
        domain: &str,
        files: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, Vec<String>> {
        let mut zones = Self::empty(domain).map_err(|e| vec![e])?;
        let mut errors = Vec::new();
        for (file, text) in files {
            match parse_zone(file, text, None, &zones.domain) {
                Ok(zone) => zones.add(zone, &mut errors),
                Err(e) => errors.extend(e),
            }
        }
        if errors.is_empty() {
            Ok(zones)
        } else {
            Err(errors)
        }
    }

    /// The labels directly under the domain that static data uses, lowercase:
    /// owner names in the domain's zone file, origins of zone files below the
    /// domain, and `gateway` (the NS name). A user label in this set must be
    /// refused: the static name would win.
    pub fn static_labels(&self) -> HashSet<String> {
        let mut out = HashSet::from([GATEWAY_LABEL.to_owned()]);
        let depth = usize::from(self.domain.num_labels());
        let mut add = |name: &LowerName| {
            if !self.domain.zone_of(name) || usize::from(name.num_labels()) <= depth {
                return;
            }
            let labels: Vec<&[u8]> = name.iter().collect();
            let Some(label) = labels
                .len()
                .checked_sub(depth + 1)
                .and_then(|i| labels.get(i))
            else {
                return;
            };
            if *label != b"*" {
                out.insert(String::from_utf8_lossy(label).to_ascii_lowercase());
            }
        };
        for zone in self.zones.values() {
            add(&zone.origin);
            if zone.origin == self.domain {
                for name in zone.nodes.keys().filter(|n| **n != zone.origin) {
                    add(name);
                }
            }
        }
        out
    }

    /// The origins of the loaded zones, sorted (for logs).
    pub fn origins(&self) -> Vec<String> {
        let mut v: Vec<String> = self.zones.keys().map(|n| n.to_string()).collect();
        v.sort();
        v
    }

    /// Number of records over all zones.
    pub fn record_count(&self) -> usize {
        self.zones.values().map(|z| z.record_count).sum()
    }

    /// The SOA serial of generated SOAs: the load time (Unix seconds).
    pub(crate) fn serial(&self) -> u32 {
        self.serial
    }

    pub(crate) fn domain(&self) -> &LowerName {
        &self.domain
    }

    pub(crate) fn zones(&self) -> impl Iterator<Item = &Arc<Zone>> {
        self.zones.values()
    }

    fn add(&mut self, zone: Zone, errors: &mut Vec<String>) {
        if let Some(other) = self.zones.get(&zone.origin) {
            errors.push(format!(
                "{}:1: zone {} is already defined by {}",
                zone.file, zone.origin, other.file
            ));
            return;
        }
        self.zones.insert(zone.origin.clone(), Arc::new(zone));
    }
}

/// Loads every `*.zone` file in `dir` (sorted by name; other files are
/// ignored, so `corp.example.zone.example` is not loaded). A missing `dir`
/// means no static zones. Errors are `"file:line: message"`, all files'.
pub fn load_zones(dir: &Path, domain: &str) -> Result<StaticZones, Vec<String>> {
    let mut zones = StaticZones::empty(domain).map_err(|e| vec![e])?;
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(zones),
        Err(e) => {
            return Err(vec![format!(
                "{}:1: cannot read directory: {e}",
                dir.display()
            )])
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "zone") && p.is_file())
        .collect();
    paths.sort();

    let mut errors = Vec::new();
    for path in paths {
        let file = path.display().to_string();
        let text = match read_limited(&path) {
            Ok(text) => text,
            Err(e) => {
                errors.push(format!("{file}:1: {e}"));
                continue;
            }
        };
        match parse_zone(&file, &text, Some(&path), &zones.domain) {
            Ok(zone) => zones.add(zone, &mut errors),
            Err(e) => errors.extend(e),
        }
    }
    if errors.is_empty() {
        Ok(zones)
    } else {
        Err(errors)
    }
}

fn read_limited(path: &Path) -> Result<String, String> {
    let len = std::fs::metadata(path)
        .map_err(|e| format!("cannot read: {e}"))?
        .len();
    if len > MAX_ZONE_FILE_LEN {
        return Err(format!(
            "file too large ({len} bytes, at most {MAX_ZONE_FILE_LEN})"
        ));
    }
    std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))
}

fn parse_domain(domain: &str) -> Result<LowerName, String> {
    let trimmed = domain.trim_end_matches('.');
    if trimmed.is_empty() {
        return Err("DNS domain is empty".to_owned());
    }
    Name::from_ascii(format!("{trimmed}."))
        .map(|n| LowerName::new(&n))
        .map_err(|e| format!("DNS domain '{domain}' is not a valid name: {e}"))
}

fn unix_serial() -> u32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(1);
    // RFC 1982 serial arithmetic wraps; the low 32 bits of Unix time are what
    // everybody uses until 2106.
    (secs & u64::from(u32::MAX)) as u32
}

/// One zone's records, indexed for lookups.
pub(crate) struct Zone {
    pub(crate) origin: LowerName,
    pub(crate) file: String,
    /// Owner names, and their ancestors below the origin as empty nodes (so
    /// empty non-terminals answer NODATA, not NXDOMAIN).
    nodes: NameMap<Node>,
    pub(crate) has_wildcards: bool,
    /// Any NS record below the apex (a delegation).
    pub(crate) has_cuts: bool,
    record_count: usize,
}

/// A map keyed by names, with FNV-1a hashing: lookups run per query and the
/// keys are the administrator's, so SipHash's flooding resistance buys
/// nothing here.
pub(crate) type NameMap<V> = HashMap<LowerName, V, BuildHasherDefault<Fnv1a>>;

/// FNV-1a (64-bit), for [`NameMap`].
pub(crate) struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv1a {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// The records of one owner name (none: an empty non-terminal).
#[derive(Default)]
pub(crate) struct Node {
    rrsets: Vec<(RecordType, Vec<Record>)>,
}

impl Node {
    pub(crate) fn rrset(&self, rtype: RecordType) -> Option<&[Record]> {
        self.rrsets
            .iter()
            .find(|(t, _)| *t == rtype)
            .map(|(_, r)| r.as_slice())
    }

    pub(crate) fn all(&self) -> impl Iterator<Item = &Record> {
        self.rrsets.iter().flat_map(|(_, r)| r.iter())
    }
}

impl Zone {
    /// The node of `name`: records, or none for an empty non-terminal.
    pub(crate) fn node(&self, name: &LowerName) -> Option<&Node> {
        self.nodes.get(name)
    }

    /// True if `name` exists, with records or as an empty non-terminal.
    pub(crate) fn exists(&self, name: &LowerName) -> bool {
        self.nodes.contains_key(name)
    }

    pub(crate) fn apex(&self) -> Option<&Node> {
        self.nodes.get(&self.origin)
    }
}

/// Parses one zone file's text. `path` resolves relative `$INCLUDE`s;
/// `domain` is the gateway's (a parent zone must not hold its names).
fn parse_zone(
    file: &str,
    text: &str,
    path: Option<&Path>,
    domain: &LowerName,
) -> Result<Zone, Vec<String>> {
    let base = Path::new(file)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let default_origin = base
        .strip_suffix(".zone")
        .filter(|s| !s.is_empty())
        .and_then(|s| Name::from_ascii(format!("{}.", s.trim_end_matches('.'))).ok());
    let parse =
        |text: &str| Parser::new(text, path.map(Path::to_path_buf), default_origin.clone()).parse();
    let located = |pred: &dyn Fn(&str) -> bool| line_of_first_entry(text, pred);

    let records = match parse(text) {
        Ok((_, records)) => records,
        Err(e) => {
            let line = located(&|prefix| parse(prefix).is_err());
            return Err(vec![format!("{file}:{line}: {e}")]);
        }
    };

    let soas: Vec<&RrKey> = records
        .keys()
        .filter(|k| k.record_type == RecordType::SOA)
        .collect();
    let origin = match (soas.as_slice(), &default_origin) {
        ([soa], _) => soa.name().clone(),
        ([], Some(origin)) => LowerName::new(origin),
        ([], None) => {
            return Err(vec![format!(
                "{file}:1: no SOA record, and the file name does not name the zone \
                 (name it <zone>.zone)"
            )])
        }
        _ => {
            let count_soas = |prefix: &str| {
                parse(prefix).is_ok_and(|(_, r)| {
                    r.keys()
                        .filter(|k| k.record_type == RecordType::SOA)
                        .count()
                        > 1
                })
            };
            let line = located(&count_soas);
            return Err(vec![format!(
                "{file}:{line}: more than one SOA record in one zone file"
            )]);
        }
    };

    let mut errors = Vec::new();
    let mut check = |bad: &dyn Fn(&RrKey, &RecordSet) -> bool,
                     message: &dyn Fn(&RrKey) -> String| {
        if let Some((key, _)) = records.iter().find(|(k, s)| bad(k, s)) {
            let line = located(&|prefix| {
                parse(prefix).is_ok_and(|(_, r)| r.iter().any(|(k, s)| bad(k, s)))
            });
            errors.push(format!("{file}:{line}: {}", message(key)));
        }
    };
    check(&|k, _| !origin.zone_of(k.name()), &|k| {
        format!("{} is outside the zone {origin}", k.name())
    });
    check(&|_, s| s.dns_class() != DNSClass::IN, &|k| {
        format!("{}: only class IN is served", k.name())
    });
    let cname_owners: HashSet<&LowerName> = records
        .keys()
        .filter(|k| k.record_type == RecordType::CNAME)
        .map(RrKey::name)
        .collect();
    check(
        &|k, _| k.record_type != RecordType::CNAME && cname_owners.contains(k.name()),
        &|k| {
            format!(
                "{}: a CNAME cannot coexist with other records (RFC 1034 §3.6.2)",
                k.name()
            )
        },
    );
    // A parent zone of the domain may delegate it (NS/DS and glue), but its
    // other names there would never be answered: the domain is ours.
    let shadowed = |k: &RrKey| {
        origin != *domain
            && origin.zone_of(domain)
            && domain.zone_of(k.name())
            && !matches!(
                k.record_type,
                RecordType::NS | RecordType::DS | RecordType::A | RecordType::AAAA
            )
    };
    check(&|k, _| shadowed(k), &|k| {
        format!(
            "{} is inside the gateway's domain {domain}: put it in {}zone",
            k.name(),
            domain
        )
    });
    check(
        &|k, _| k.record_type == RecordType::CNAME && *k.name() == origin,
        &|_| format!("{origin}: a CNAME at the zone apex is not allowed"),
    );
    if !errors.is_empty() {
        return Err(errors);
    }

    let mut zone = Zone {
        origin: origin.clone(),
        file: file.to_owned(),
        nodes: NameMap::default(),
        has_wildcards: false,
        has_cuts: false,
        record_count: 0,
    };
    for (key, set) in records {
        let name = key.name().clone();
        let records: Vec<Record> = set.records_without_rrsigs().cloned().collect();
        zone.record_count += records.len();
        if name != origin {
            zone.has_wildcards |= name.is_wildcard();
            zone.has_cuts |= key.record_type == RecordType::NS;
            let mut n = name.base_name();
            while n != origin && !n.is_root() && !zone.nodes.contains_key(&n) {
                zone.nodes.insert(n.clone(), Node::default());
                n = n.base_name();
            }
        }
        zone.nodes
            .entry(name)
            .or_default()
            .rrsets
            .push((key.record_type, records));
    }
    Ok(zone)
}

/// The line of the first entry at which `pred(prefix)` becomes true, where
/// `prefix` is the text up to and including that entry. `pred` must be
/// monotone (false for shorter prefixes, true from some entry on): "this
/// prefix fails to parse", "this prefix contains a bad record".
fn line_of_first_entry(text: &str, pred: &dyn Fn(&str) -> bool) -> usize {
    let entries = entry_spans(text);
    // Smallest k in 1..=len with pred(text[..end of entry k-1]).
    let (mut lo, mut hi) = (1usize, entries.len());
    if hi == 0 {
        return 1;
    }
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let end = entries.get(mid - 1).map_or(text.len(), |e| e.1);
        if pred(text.get(..end).unwrap_or(text)) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    entries.get(lo - 1).map_or(1, |e| e.0)
}

/// Each entry's first line (1-based) and end offset (after its newline). An
/// entry ends at a newline outside parentheses, quotes and escapes, as the
/// RFC 1035 §5.1 lexer sees it.
fn entry_spans(text: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let (mut depth, mut quoted, mut comment, mut escaped) = (0u32, false, false, false);
    let (mut line, mut start_line) = (1usize, 1usize);
    for (i, c) in text.char_indices() {
        if c == '\n' {
            line += 1;
            comment = false;
            escaped = false;
            if depth == 0 && !quoted {
                out.push((start_line, i + 1));
                start_line = line;
            }
            continue;
        }
        if comment {
            continue;
        }
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ';' if !quoted => comment = true,
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    if out.last().map_or(0, |e| e.1) < text.len() {
        out.push((start_line, text.len()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZONE: &str = "\
$ORIGIN corp.example.
$TTL 300
intranet    IN A     10.0.0.10
            IN AAAA  fd00::10
wiki        IN CNAME intranet
mail        IN MX    10 intranet
a.b         IN TXT   \"deep\"
";

    #[test]
    fn parses_and_indexes() {
        let z = StaticZones::from_texts("corp.example", [("corp.example.zone", ZONE)]).unwrap();
        assert_eq!(z.origins(), vec!["corp.example.".to_owned()]);
        assert_eq!(z.record_count(), 5);
        let labels = z.static_labels();
        for l in ["intranet", "wiki", "mail", "b", "gateway"] {
            assert!(labels.contains(l), "{l} in {labels:?}");
        }
        assert!(!labels.contains("a"));
        let zone = z.zones().next().unwrap();
        let ent = LowerName::from(Name::from_ascii("b.corp.example.").unwrap());
        assert!(zone.exists(&ent) && zone.node(&ent).is_some_and(|n| n.all().next().is_none()));
    }

    #[test]
    fn parse_error_has_line() {
        let text =
            "$ORIGIN corp.example.\n$TTL 60\nok IN A 10.0.0.1\n; comment\nbad IN A 10.0.0.300\n";
        let e = StaticZones::from_texts("corp.example", [("corp.example.zone", text)]).unwrap_err();
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("corp.example.zone:5: "), "{e:?}");
    }

    #[test]
    fn multiline_entry_error_points_at_its_first_line() {
        let text =
            "$TTL 60\n@ IN SOA ns hostmaster (\n 1 2 3 4 5 )\nx IN A 1.2.3.4\ny IN BOGUS 1\n";
        let e =
            StaticZones::from_texts("corp.example", [("other.example.zone", text)]).unwrap_err();
        assert!(e[0].starts_with("other.example.zone:5: "), "{e:?}");
    }

    #[test]
    fn record_outside_zone_is_located() {
        let text = "$TTL 60\nx IN A 1.2.3.4\nwww.elsewhere.test. IN A 1.2.3.5\n";
        let e = StaticZones::from_texts("corp.example", [("corp.example.zone", text)]).unwrap_err();
        assert!(e[0].starts_with("corp.example.zone:3: "), "{e:?}");
        assert!(e[0].contains("outside"), "{e:?}");
    }

    #[test]
    fn cname_and_other_data_rejected() {
        let text = "$TTL 60\nx IN CNAME y\nx IN A 1.2.3.4\n";
        let e = StaticZones::from_texts("corp.example", [("corp.example.zone", text)]).unwrap_err();
        assert!(e[0].contains("CNAME"), "{e:?}");
    }

    #[test]
    fn origin_from_soa_and_duplicates() {
        let a = "$TTL 60\n$ORIGIN lab.test.\n@ IN SOA ns.lab.test. root.lab.test. 1 2 3 4 5\n";
        let z = StaticZones::from_texts("corp.example", [("whatever.zone", a)]).unwrap();
        assert_eq!(z.origins(), vec!["lab.test.".to_owned()]);
        let e =
            StaticZones::from_texts("corp.example", [("x.zone", a), ("y.zone", a)]).unwrap_err();
        assert!(e[0].starts_with("y.zone:1: "), "{e:?}");
    }

    #[test]
    fn parent_zone_cannot_hold_the_domains_names() {
        let text =
            "$TTL 60\n@ IN SOA ns root 1 2 3 4 5\nwww IN A 10.0.0.1\nx.corp IN TXT \"hidden\"\n";
        let e = StaticZones::from_texts("corp.example", [("example.zone", text)]).unwrap_err();
        assert!(
            e[0].starts_with("example.zone:4: ") && e[0].contains("corp.example.zone"),
            "{e:?}"
        );
        let ok = "$TTL 60\n@ IN SOA ns root 1 2 3 4 5\ncorp IN NS gw.corp\ngw.corp IN A 10.0.0.1\n";
        assert!(StaticZones::from_texts("corp.example", [("example.zone", ok)]).is_ok());
    }

    #[test]
    fn no_soa_and_unnamed_file_is_an_error() {
        let e = StaticZones::from_texts("corp.example", [("a b.zone", "$TTL 60\n")]).unwrap_err();
        assert!(
            e[0].starts_with("a b.zone:1: ") && e[0].contains("$ORIGIN"),
            "{e:?}"
        );
        let e =
            StaticZones::from_texts("corp.example", [("a b.zone", "$ORIGIN x.test.\n$TTL 60\n")]);
        assert!(e.unwrap_err()[0].contains("no SOA"));
    }

    #[test]
    fn sub_zone_origin_is_a_static_label() {
        let text = "$TTL 60\nhost IN A 10.1.0.1\n";
        let z = StaticZones::from_texts("corp.example", [("lab.corp.example.zone", text)]).unwrap();
        assert!(z.static_labels().contains("lab"));
        assert!(!z.static_labels().contains("host"));
    }

    #[test]
    fn missing_dir_is_empty() {
        let z = load_zones(Path::new("/nonexistent/intragate-dns"), "corp.example").unwrap();
        assert!(z.origins().is_empty());
    }

    #[test]
    fn loads_only_dot_zone_files() {
        let dir = std::env::temp_dir().join(format!("intragate-dns-zones-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("corp.example.zone"), ZONE).unwrap();
        std::fs::write(dir.join("corp.example.zone.example"), "garbage (").unwrap();
        let z = load_zones(&dir, "corp.example").unwrap();
        assert_eq!(z.origins(), vec!["corp.example.".to_owned()]);
        std::fs::write(dir.join("broken.test.zone"), "$TTL 60\nx IN A nope\n").unwrap();
        let e = load_zones(&dir, "corp.example").unwrap_err();
        assert!(e[0].contains("broken.test.zone:2: "), "{e:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn entry_spans_respect_parens_quotes_comments() {
        let t = "a (\n b ; (\n )\n\"x\ny\"\n;\"\nz";
        assert_eq!(entry_spans(t), vec![(1, 14), (4, 20), (6, 23), (7, 24)]);
    }
}
