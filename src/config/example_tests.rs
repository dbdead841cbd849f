//! The shipped examples document every key: `intragate.example.toml` every
//! key of the config file, `policies/default.toml` every key of a policy.
//!
//! The keys are read from the `Raw*` structs themselves (the field lists
//! serde derives), never from a list kept by hand, so adding a field without
//! documenting it fails here.
//!
//! Convention of the examples: a line `# key = value` is a documented key
//! left unset (or at an example value). [`uncomment`] turns those lines into
//! keys; every other comment stays a comment.

use std::cell::RefCell;
use std::collections::BTreeSet;

use serde::de::value::{BorrowedStrDeserializer, Error};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::*;

const EXAMPLE: &str = include_str!("../../intragate.example.toml");
const DEFAULT_POLICY: &str = include_str!("../../policies/default.toml");

/// (table path, key): `("", "gateway")`, `("gateway", "listen")`,
/// `("pool", "mode")`, `("policy.inbound", "from")`. Arrays are transparent.
type Keys = BTreeSet<(String, String)>;

/// Every key of `T` and of the structs inside it.
fn keys_of<T: Deserialize<'static>>() -> Keys {
    let keys = RefCell::new(Keys::new());
    if let Err(e) = T::deserialize(Recorder {
        path: String::new(),
        keys: &keys,
    }) {
        panic!("recording the keys of {}: {e}", std::any::type_name::<T>());
    }
    keys.into_inner()
}

/// A deserializer that produces a value of any shape and records the field
/// names every struct asks for (`deserialize_struct` receives them all).
struct Recorder<'a> {
    path: String,
    keys: &'a RefCell<Keys>,
}

impl Recorder<'_> {
    fn child(&self, field: &str) -> Self {
        let path = if self.path.is_empty() {
            field.to_string()
        } else {
            format!("{}.{field}", self.path)
        };
        Recorder {
            path,
            keys: self.keys,
        }
    }
}

macro_rules! zero_int {
    ($($m:ident),*) => {$(
        fn $m<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
            v.visit_u64(0)
        }
    )*};
}

impl<'de> Deserializer<'de> for Recorder<'_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, _v: V) -> Result<V::Value, Error> {
        Err(de::Error::custom(format!(
            "{}: a self-describing type; give the field a concrete type",
            self.path
        )))
    }
    zero_int!(
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64
    );
    fn deserialize_bool<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_bool(false)
    }
    fn deserialize_f32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_f64(0.0)
    }
    fn deserialize_f64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_f64(0.0)
    }
    fn deserialize_char<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_char('x')
    }
    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_str("")
    }
    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_str("")
    }
    fn deserialize_identifier<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_str("")
    }
    fn deserialize_bytes<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_bytes(&[])
    }
    fn deserialize_byte_buf<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_bytes(&[])
    }
    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_some(self)
    }
    fn deserialize_unit<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_unit()
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, Error> {
        v.visit_unit()
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, Error> {
        v.visit_newtype_struct(self)
    }
    /// One element, so the element type's keys are recorded too.
    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_seq(OneElement(Some(self)))
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, v: V) -> Result<V::Value, Error> {
        self.deserialize_seq(v)
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        v: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_seq(v)
    }
    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_map(Fields {
            of: self,
            fields: &[],
            next: 0,
            transparent: false,
        })
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        // `toml::Spanned<T>` is a private struct around T: not a table.
        let transparent = name.starts_with("$__");
        if !transparent {
            let mut keys = self.keys.borrow_mut();
            for f in fields {
                keys.insert((self.path.clone(), (*f).to_string()));
            }
        }
        v.visit_map(Fields {
            of: self,
            fields,
            next: 0,
            transparent,
        })
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        _v: V,
    ) -> Result<V::Value, Error> {
        Err(de::Error::custom(format!(
            "{}: enums are not recorded yet",
            self.path
        )))
    }
    fn deserialize_ignored_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_unit()
    }
}

struct OneElement<'a>(Option<Recorder<'a>>);

impl<'de> SeqAccess<'de> for OneElement<'_> {
    type Error = Error;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        self.0.take().map(|r| seed.deserialize(r)).transpose()
    }
}

/// A struct's fields, each once, in declaration order.
struct Fields<'a> {
    of: Recorder<'a>,
    fields: &'static [&'static str],
    next: usize,
    transparent: bool,
}

impl<'de> MapAccess<'de> for Fields<'_> {
    type Error = Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        match self.fields.get(self.next).copied() {
            Some(f) => seed.deserialize(BorrowedStrDeserializer::new(f)).map(Some),
            None => Ok(None),
        }
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let field = self.fields.get(self.next).copied().unwrap_or_default();
        self.next += 1;
        let r = if self.transparent {
            Recorder {
                path: self.of.path.clone(),
                keys: self.of.keys,
            }
        } else {
            self.of.child(field)
        };
        seed.deserialize(r)
    }
}

/// The example with every `# key = value` line made a key.
fn uncomment(text: &str) -> String {
    uncomment_with(text, false)
}

/// [`uncomment`], and with `alternatives` also the `#| key = value` lines:
/// documented keys that exclude another one shown (e.g. `[auth.ldap]`
/// `user_dn_template` instead of `base_dn`): they count as documented, but
/// the example is loaded without them.
fn uncomment_with(text: &str, alternatives: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let trimmed = line.trim_start();
        let rest = match trimmed.strip_prefix("#|") {
            Some(r) if alternatives => Some(r.trim_start()),
            Some(_) => None,
            None => trimmed.strip_prefix('#').map(str::trim_start),
        };
        let is_key = rest.is_some_and(|r| {
            let name_len = r
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(r.len());
            name_len > 0 && r[name_len..].trim_start().starts_with('=')
        });
        // A commented-out table (`# [cluster]`, `# [auth.ldap]`) is
        // documented like a key.
        let is_table = rest.is_some_and(|r| {
            r.starts_with('[')
                && r.find(']').is_some_and(|end| {
                    let name = r[1..end].trim_matches(|c| c == '[' || c == ']');
                    !name.is_empty()
                        && name
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
                })
        });
        match rest {
            Some(r) if is_key || is_table => out.push_str(r),
            _ if trimmed.starts_with("#|") => {}
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Keys whose value is a table of the administrator's own names.
const FREE_FORM_MAPS: &[&str] = &["group_map"];

/// The keys a TOML document has, tables and arrays of tables included.
fn keys_in(text: &str, what: &str) -> Keys {
    fn walk(t: &toml::Table, path: &str, out: &mut Keys) {
        for (k, v) in t {
            out.insert((path.to_string(), k.clone()));
            // A map of the administrator's names (`group_map`): its keys are
            // data, not settings.
            if FREE_FORM_MAPS.contains(&k.as_str()) {
                continue;
            }
            let sub = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            match v {
                toml::Value::Table(t) => walk(t, &sub, out),
                toml::Value::Array(a) => {
                    for t in a.iter().filter_map(toml::Value::as_table) {
                        walk(t, &sub, out);
                    }
                }
                _ => {}
            }
        }
    }
    let table: toml::Table = match toml::from_str(text) {
        Ok(t) => t,
        Err(e) => panic!("{what} with its `# key = value` lines uncommented: {e}"),
    };
    let mut out = Keys::new();
    walk(&table, "", &mut out);
    out
}

fn show(keys: &BTreeSet<&(String, String)>) -> String {
    if keys.is_empty() {
        return "none".into();
    }
    keys.iter()
        .map(|(t, k)| {
            if t.is_empty() {
                format!("[{k}]")
            } else {
                format!("[{t}] {k}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `documented` has exactly the keys of `expected`.
fn assert_documents(file: &str, expected: &Keys, documented: &Keys) {
    let missing: BTreeSet<_> = expected.difference(documented).collect();
    let unknown: BTreeSet<_> = documented.difference(expected).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "{file} must document every key, as `key = value` or `# key = value` \
         with a comment saying what it means and its default.\n\
         missing: {}\nnot a key (misspelt, or removed from the code): {}",
        show(&missing),
        show(&unknown)
    );
}

#[test]
fn recorder_sees_nested_and_spanned_fields() {
    let keys = keys_of::<RawConfig>();
    for (t, k) in [
        ("", "gateway"),
        ("", "pool"),
        ("gateway", "listen"),
        ("dns", "allowed_clients"),
        ("pool", "mode"),
        ("nat", "ftp_ports"),
    ] {
        assert!(keys.contains(&(t.into(), k.into())), "{t} {k}: {keys:?}");
    }
    assert!(keys
        .iter()
        .all(|(t, k)| !t.contains('$') && !k.contains('$')));
    let policy = keys_of::<RawPolicyFile>();
    assert!(policy.contains(&("policy.derived".into(), "user_ports".into())));
}

#[test]
fn example_config_lists_every_key() {
    assert_documents(
        "intragate.example.toml",
        &keys_of::<RawConfig>(),
        &keys_in(&uncomment_with(EXAMPLE, true), "intragate.example.toml"),
    );
}

#[test]
fn default_policy_lists_every_key() {
    assert_documents(
        "policies/default.toml",
        &keys_of::<RawPolicyFile>(),
        &keys_in(&uncomment(DEFAULT_POLICY), "policies/default.toml"),
    );
}

#[test]
fn a_key_missing_from_the_example_is_caught() {
    let without_mode: String = EXAMPLE
        .lines()
        .filter(|l| !l.trim_start().starts_with("mode ="))
        .map(|l| format!("{l}\n"))
        .collect();
    let documented = keys_in(&uncomment(&without_mode), "example");
    let r = std::panic::catch_unwind(|| {
        assert_documents("example", &keys_of::<RawConfig>(), &documented);
    });
    assert!(
        r.is_err(),
        "removing `mode` from the example went unnoticed"
    );
}

/// The active lines are the defaults: the example as shipped configures
/// exactly what no config file does. A changed default must change it too.
#[test]
fn example_config_shows_the_defaults() {
    let at = Path::new("/nonexistent/intragate.toml");
    let ov = Overrides::default();
    let example = match Config::from_str_at(at, EXAMPLE, true, &ov) {
        Ok(c) => c,
        Err(e) => panic!("intragate.example.toml: {e}"),
    };
    let defaults = match Config::from_str_at(at, "", true, &ov) {
        Ok(c) => c,
        Err(e) => panic!("built-in defaults: {e}"),
    };
    let (a, b) = (format!("{example:#?}"), format!("{defaults:#?}"));
    if let Some((x, y)) = a.lines().zip(b.lines()).find(|(x, y)| x != y) {
        panic!(
            "intragate.example.toml does not show the defaults:\n  example:  {}\n  default:  {}",
            x.trim(),
            y.trim()
        );
    }
    assert_eq!(a, b);
}

/// Every example value is valid: uncommented, the example still loads.
#[test]
fn example_values_are_valid() {
    let text = uncomment(EXAMPLE);
    // The files the example names ([auth] secrets, CA, CRL), beside it.
    let dir = crate::shared::test_util::temp_dir("example-config");
    std::fs::create_dir_all(&dir).expect("dir");
    let write = |name: &str, data: &str| {
        let p = dir.join(name);
        std::fs::write(&p, data).expect("write");
        std::os::unix::fs::PermissionsExt::set_mode(
            &mut std::fs::metadata(&p).expect("meta").permissions(),
            0o600,
        );
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
    };
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "Example user CA");
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca_pem = ca.self_signed(&key).expect("ca").pem();
    let issuer = rcgen::Issuer::new(ca, key);
    let crl = rcgen::CertificateRevocationListParams {
        this_update: rcgen::date_time_ymd(2024, 1, 1),
        next_update: rcgen::date_time_ymd(2099, 1, 1),
        crl_number: rcgen::SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: Vec::new(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)
    .expect("crl")
    .pem()
    .expect("pem");
    write("user-ca.pem", &ca_pem);
    write("user-ca.crl", &crl);
    write("directory-ca.pem", &ca_pem);
    write("ldap-bind.secret", "service-account-password\n");
    write("radius.secret", "radius-shared-secret\n");
    if let Err(e) = Config::from_str_at(
        &dir.join("intragate.toml"),
        &text,
        true,
        &Overrides::default(),
    ) {
        let _ = std::fs::remove_dir_all(&dir);
        panic!("intragate.example.toml with every `# key = value` uncommented: {e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let file: RawPolicyFile = match toml::from_str(&uncomment(DEFAULT_POLICY)) {
        Ok(f) => f,
        Err(e) => panic!("policies/default.toml uncommented: {e}"),
    };
    for p in &file.policy {
        for r in p.get_ref().inbound.iter().flatten() {
            if let Err(e) = parse_inbound(r.get_ref()) {
                panic!("policies/default.toml: inbound: {e}");
            }
        }
        for r in &p.get_ref().derived {
            if let Err(e) = parse_derived(r.get_ref()) {
                panic!("policies/default.toml: derived: {e}");
            }
        }
    }
}
