//! A small RADIUS codec: the subset of RFC 2865 (Access-Request, -Accept,
//! -Reject, -Challenge; User-Password hiding), RFC 2866 (Accounting),
//! RFC 2869 / RFC 3579 (Message-Authenticator, HMAC-MD5) and RFC 5997
//! (Status-Server) the gateway needs.
//!
//! Hand-written rather than the `radius` crate: that crate is a
//! server/client framework around its own sockets and generated
//! dictionaries, and gives no control over Message-Authenticator on every
//! request and its verification on every reply (the BlastRADIUS lesson,
//! CVE-2024-3596), nor over retransmissions (the same identifier and
//! authenticator on a retry, several servers under one deadline). The
//! wire format is small; MD5 and HMAC come from RustCrypto (`md-5`,
//! `hmac`). Decoding never panics on any input (fuzzed in the tests).

use hmac::{Hmac, Mac};
use md5::{Digest, Md5};

/// Packet codes.
pub mod code {
    /// Access-Request.
    pub const ACCESS_REQUEST: u8 = 1;
    /// Access-Accept.
    pub const ACCESS_ACCEPT: u8 = 2;
    /// Access-Reject.
    pub const ACCESS_REJECT: u8 = 3;
    /// Accounting-Request.
    pub const ACCOUNTING_REQUEST: u8 = 4;
    /// Accounting-Response.
    pub const ACCOUNTING_RESPONSE: u8 = 5;
    /// Access-Challenge.
    pub const ACCESS_CHALLENGE: u8 = 11;
    /// Status-Server (RFC 5997).
    pub const STATUS_SERVER: u8 = 12;
}

/// Attribute types used here.
pub mod attr {
    /// User-Name.
    pub const USER_NAME: u8 = 1;
    /// User-Password.
    pub const USER_PASSWORD: u8 = 2;
    /// NAS-IP-Address.
    pub const NAS_IP_ADDRESS: u8 = 4;
    /// Service-Type.
    pub const SERVICE_TYPE: u8 = 6;
    /// Framed-IP-Address.
    pub const FRAMED_IP_ADDRESS: u8 = 8;
    /// Filter-Id.
    pub const FILTER_ID: u8 = 11;
    /// Reply-Message.
    pub const REPLY_MESSAGE: u8 = 18;
    /// State.
    pub const STATE: u8 = 24;
    /// Class.
    pub const CLASS: u8 = 25;
    /// Calling-Station-Id.
    pub const CALLING_STATION_ID: u8 = 31;
    /// NAS-Identifier.
    pub const NAS_IDENTIFIER: u8 = 32;
    /// Acct-Status-Type.
    pub const ACCT_STATUS_TYPE: u8 = 40;
    /// Acct-Delay-Time.
    pub const ACCT_DELAY_TIME: u8 = 41;
    /// Acct-Input-Octets.
    pub const ACCT_INPUT_OCTETS: u8 = 42;
    /// Acct-Output-Octets.
    pub const ACCT_OUTPUT_OCTETS: u8 = 43;
    /// Acct-Session-Id.
    pub const ACCT_SESSION_ID: u8 = 44;
    /// Acct-Authentic.
    pub const ACCT_AUTHENTIC: u8 = 45;
    /// Acct-Session-Time.
    pub const ACCT_SESSION_TIME: u8 = 46;
    /// Acct-Input-Packets.
    pub const ACCT_INPUT_PACKETS: u8 = 47;
    /// Acct-Output-Packets.
    pub const ACCT_OUTPUT_PACKETS: u8 = 48;
    /// Acct-Terminate-Cause.
    pub const ACCT_TERMINATE_CAUSE: u8 = 49;
    /// Acct-Input-Gigawords.
    pub const ACCT_INPUT_GIGAWORDS: u8 = 52;
    /// Acct-Output-Gigawords.
    pub const ACCT_OUTPUT_GIGAWORDS: u8 = 53;
    /// Event-Timestamp.
    pub const EVENT_TIMESTAMP: u8 = 55;
    /// NAS-Port-Type.
    pub const NAS_PORT_TYPE: u8 = 61;
    /// Prompt (RFC 2869): 0 No-Echo, 1 Echo.
    pub const PROMPT: u8 = 76;
    /// Message-Authenticator (RFC 2869 / 3579).
    pub const MESSAGE_AUTHENTICATOR: u8 = 80;
    /// NAS-IPv6-Address (RFC 3162).
    pub const NAS_IPV6_ADDRESS: u8 = 95;
    /// Framed-IPv6-Address (RFC 6911).
    pub const FRAMED_IPV6_ADDRESS: u8 = 168;
}

/// Largest packet (RFC 2865 §3).
pub const MAX_PACKET: usize = 4096;
const HEADER: usize = 20;

/// Why a datagram is not a RADIUS packet, or not the answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// Shorter than a header, longer than 4096, or the length field lies.
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// Response Authenticator or Message-Authenticator does not match.
    #[error("bad authenticator: shared secret wrong?")]
    BadAuthenticator,
    /// A reply to an Access-Request without Message-Authenticator.
    #[error("no Message-Authenticator in the reply (required, CVE-2024-3596): shared secret wrong or server not configured to send it?")]
    MissingMessageAuthenticator,
    /// The attributes do not fit in a packet.
    #[error("packet too large")]
    TooLarge,
}

/// A decoded packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// Code.
    pub code: u8,
    /// Identifier.
    pub id: u8,
    /// Authenticator field.
    pub authenticator: [u8; 16],
    /// Attributes in order (type, value).
    pub attrs: Vec<(u8, Vec<u8>)>,
}

impl Packet {
    /// The first value of attribute `t`.
    pub fn get(&self, t: u8) -> Option<&[u8]> {
        self.attrs
            .iter()
            .find(|(k, _)| *k == t)
            .map(|(_, v)| v.as_slice())
    }

    /// Every value of attribute `t`, in order.
    pub fn all(&self, t: u8) -> impl Iterator<Item = &[u8]> {
        self.attrs
            .iter()
            .filter(move |(k, _)| *k == t)
            .map(|(_, v)| v.as_slice())
    }

    /// The first value of `t` as a 32-bit integer.
    pub fn u32(&self, t: u8) -> Option<u32> {
        let v: [u8; 4] = self.get(t)?.try_into().ok()?;
        Some(u32::from_be_bytes(v))
    }
}

/// Decode a datagram (structure only: no authenticator check).
pub fn decode(buf: &[u8]) -> Result<Packet, CodecError> {
    if buf.len() < HEADER {
        return Err(CodecError::Malformed("shorter than a header"));
    }
    let (Some(&code), Some(&id), Some(len)) = (
        buf.first(),
        buf.get(1),
        buf.get(2..4)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]]))),
    ) else {
        return Err(CodecError::Malformed("shorter than a header"));
    };
    if !(HEADER..=MAX_PACKET).contains(&len) || len > buf.len() {
        return Err(CodecError::Malformed("length field out of range"));
    }
    let mut authenticator = [0u8; 16];
    authenticator.copy_from_slice(buf.get(4..HEADER).unwrap_or(&[0; 16]));
    let mut attrs = Vec::new();
    let mut rest = buf.get(HEADER..len).unwrap_or_default();
    while !rest.is_empty() {
        let (Some(&t), Some(&l)) = (rest.first(), rest.get(1)) else {
            return Err(CodecError::Malformed("truncated attribute"));
        };
        let l = usize::from(l);
        if l < 2 {
            return Err(CodecError::Malformed("attribute length below 2"));
        }
        let Some(v) = rest.get(2..l) else {
            return Err(CodecError::Malformed("attribute runs past the packet"));
        };
        attrs.push((t, v.to_vec()));
        rest = rest.get(l..).unwrap_or_default();
    }
    Ok(Packet {
        code,
        id,
        authenticator,
        attrs,
    })
}

fn md5(parts: &[&[u8]]) -> [u8; 16] {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

fn hmac_md5(key: &[u8], data: &[u8]) -> [u8; 16] {
    // HMAC takes keys of any length: new_from_slice cannot fail.
    match Hmac::<Md5>::new_from_slice(key) {
        Ok(mut m) => {
            m.update(data);
            m.finalize().into_bytes().into()
        }
        Err(_) => [0; 16],
    }
}

/// User-Password hidden per RFC 2865 §5.2 (padded to 16-byte blocks,
/// at most 128 bytes: a longer password is cut).
pub fn hide_password(password: &[u8], secret: &[u8], req_auth: &[u8; 16]) -> Vec<u8> {
    let mut p = password.get(..128).unwrap_or(password).to_vec();
    let padded = p.len().div_ceil(16).max(1) * 16;
    p.resize(padded, 0);
    let mut out = Vec::with_capacity(padded);
    let mut prev: [u8; 16] = *req_auth;
    for block in p.chunks(16) {
        let b = md5(&[secret, &prev]);
        let mut c = [0u8; 16];
        for (i, (x, y)) in block.iter().zip(b.iter()).enumerate() {
            if let Some(slot) = c.get_mut(i) {
                *slot = x ^ y;
            }
        }
        out.extend_from_slice(&c);
        prev = c;
    }
    out
}

/// The inverse of [`hide_password`] (for tests and a server's view).
pub fn unhide_password(hidden: &[u8], secret: &[u8], req_auth: &[u8; 16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hidden.len());
    let mut prev: Vec<u8> = req_auth.to_vec();
    for block in hidden.chunks(16) {
        let b = md5(&[secret, &prev]);
        out.extend(block.iter().zip(b.iter()).map(|(x, y)| x ^ y));
        prev = block.to_vec();
    }
    while out.last() == Some(&0) {
        out.pop();
    }
    out
}

fn put_attrs(buf: &mut Vec<u8>, attrs: &[(u8, Vec<u8>)]) -> Result<(), CodecError> {
    for (t, v) in attrs {
        // Long values (a Class, a Reply-Message) are cut at 253 bytes.
        let v = v.get(..253).unwrap_or(v);
        buf.push(*t);
        buf.push((v.len() + 2) as u8);
        buf.extend_from_slice(v);
    }
    if buf.len() > MAX_PACKET {
        return Err(CodecError::TooLarge);
    }
    Ok(())
}

fn set_len(buf: &mut [u8]) {
    let len = (buf.len() as u16).to_be_bytes();
    if let Some(l) = buf.get_mut(2..4) {
        l.copy_from_slice(&len);
    }
}

/// Find the Message-Authenticator value's offset in a raw packet.
fn message_authenticator_at(raw: &[u8]) -> Result<Option<usize>, CodecError> {
    let mut at = HEADER;
    let mut found = None;
    while at < raw.len() {
        let (Some(&t), Some(&l)) = (raw.get(at), raw.get(at + 1)) else {
            return Err(CodecError::Malformed("truncated attribute"));
        };
        let l = usize::from(l);
        if l < 2 || at + l > raw.len() {
            return Err(CodecError::Malformed("attribute runs past the packet"));
        }
        if t == attr::MESSAGE_AUTHENTICATOR {
            if l != 18 || found.is_some() {
                return Err(CodecError::Malformed("bad Message-Authenticator"));
            }
            found = Some(at + 2);
        }
        at += l;
    }
    Ok(found)
}

/// Encode an Access-Request or Status-Server with `req_auth` as its
/// Request Authenticator, and a Message-Authenticator (RFC 3579 §3.2)
/// as the first attribute (where BlastRADIUS mitigations want it).
pub fn encode_access_request(
    code: u8,
    id: u8,
    req_auth: &[u8; 16],
    attrs: &[(u8, Vec<u8>)],
    secret: &[u8],
) -> Result<Vec<u8>, CodecError> {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(&[code, id, 0, 0]);
    buf.extend_from_slice(req_auth);
    buf.extend_from_slice(&[attr::MESSAGE_AUTHENTICATOR, 18]);
    buf.extend_from_slice(&[0; 16]);
    put_attrs(&mut buf, attrs)?;
    set_len(&mut buf);
    let mac = hmac_md5(secret, &buf);
    if let Some(slot) = buf.get_mut(HEADER + 2..HEADER + 18) {
        slot.copy_from_slice(&mac);
    }
    Ok(buf)
}

/// Encode an Accounting-Request (RFC 2866 §3: the Request Authenticator
/// is MD5 over the packet with a zero authenticator, plus the secret).
pub fn encode_accounting_request(
    id: u8,
    attrs: &[(u8, Vec<u8>)],
    secret: &[u8],
) -> Result<Vec<u8>, CodecError> {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(&[code::ACCOUNTING_REQUEST, id, 0, 0]);
    buf.extend_from_slice(&[0; 16]);
    put_attrs(&mut buf, attrs)?;
    set_len(&mut buf);
    let a = md5(&[&buf, secret]);
    if let Some(slot) = buf.get_mut(4..HEADER) {
        slot.copy_from_slice(&a);
    }
    Ok(buf)
}

/// The Request Authenticator of an encoded request.
pub fn request_authenticator(raw: &[u8]) -> [u8; 16] {
    let mut a = [0u8; 16];
    if let Some(s) = raw.get(4..HEADER) {
        a.copy_from_slice(s);
    }
    a
}

/// Check a reply to a request whose Request Authenticator was `req_auth`:
/// the Response Authenticator (RFC 2865 §3), and, when `require_ma`, a
/// Message-Authenticator (RFC 3579 §3.2) that must be present and right.
/// A Message-Authenticator present in any reply is checked.
pub fn verify_reply(
    raw: &[u8],
    req_auth: &[u8; 16],
    secret: &[u8],
    require_ma: bool,
) -> Result<Packet, CodecError> {
    let p = decode(raw)?;
    let len = usize::from(u16::from_be_bytes([
        *raw.get(2).unwrap_or(&0),
        *raw.get(3).unwrap_or(&0),
    ]));
    let raw = raw.get(..len).ok_or(CodecError::Malformed("short"))?;
    let (Some(head), Some(attrs)) = (raw.get(..4), raw.get(HEADER..)) else {
        return Err(CodecError::Malformed("short"));
    };
    let expect = md5(&[head, req_auth, attrs, secret]);
    let ok_auth: bool = expect
        .iter()
        .zip(p.authenticator.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0;
    match message_authenticator_at(raw)? {
        Some(at) => {
            let mut copy = raw.to_vec();
            if let Some(a) = copy.get_mut(4..HEADER) {
                a.copy_from_slice(req_auth);
            }
            let got: [u8; 16] = copy
                .get(at..at + 16)
                .and_then(|s| s.try_into().ok())
                .ok_or(CodecError::Malformed("short"))?;
            if let Some(m) = copy.get_mut(at..at + 16) {
                m.fill(0);
            }
            let mac = hmac_md5(secret, &copy);
            let ok_ma = mac
                .iter()
                .zip(got.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
            if !ok_ma || !ok_auth {
                return Err(CodecError::BadAuthenticator);
            }
        }
        None if !ok_auth => return Err(CodecError::BadAuthenticator),
        None if require_ma => return Err(CodecError::MissingMessageAuthenticator),
        None => {}
    }
    Ok(p)
}

/// Check a request as a server would (tests, and the codec's own
/// round trips): Message-Authenticator of an Access-Request / Status-
/// Server, or the Request Authenticator of an Accounting-Request.
pub fn verify_request(raw: &[u8], secret: &[u8]) -> Result<Packet, CodecError> {
    let p = decode(raw)?;
    let raw = raw
        .get(
            ..usize::from(u16::from_be_bytes([
                *raw.get(2).unwrap_or(&0),
                *raw.get(3).unwrap_or(&0),
            ])),
        )
        .ok_or(CodecError::Malformed("short"))?;
    if p.code == code::ACCOUNTING_REQUEST {
        let mut copy = raw.to_vec();
        if let Some(a) = copy.get_mut(4..HEADER) {
            a.fill(0);
        }
        if md5(&[&copy, secret]) != p.authenticator {
            return Err(CodecError::BadAuthenticator);
        }
        return Ok(p);
    }
    let at = message_authenticator_at(raw)?.ok_or(CodecError::MissingMessageAuthenticator)?;
    let mut copy = raw.to_vec();
    let got = copy.get(at..at + 16).map(<[u8]>::to_vec);
    if let Some(m) = copy.get_mut(at..at + 16) {
        m.fill(0);
    }
    if got.as_deref() != Some(&hmac_md5(secret, &copy)[..]) {
        return Err(CodecError::BadAuthenticator);
    }
    Ok(p)
}

/// Encode a reply as a server would (tests): Message-Authenticator
/// first when `with_ma`, then the Response Authenticator.
pub fn encode_reply(
    code: u8,
    id: u8,
    req_auth: &[u8; 16],
    attrs: &[(u8, Vec<u8>)],
    secret: &[u8],
    with_ma: bool,
) -> Result<Vec<u8>, CodecError> {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(&[code, id, 0, 0]);
    buf.extend_from_slice(req_auth);
    if with_ma {
        buf.extend_from_slice(&[attr::MESSAGE_AUTHENTICATOR, 18]);
        buf.extend_from_slice(&[0; 16]);
    }
    put_attrs(&mut buf, attrs)?;
    set_len(&mut buf);
    if with_ma {
        let mac = hmac_md5(secret, &buf);
        if let Some(slot) = buf.get_mut(HEADER + 2..HEADER + 18) {
            slot.copy_from_slice(&mac);
        }
    }
    let ra = md5(&[&buf, secret]);
    if let Some(slot) = buf.get_mut(4..HEADER) {
        slot.copy_from_slice(&ra);
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 2865 §7.1: "nemo" / "arctangent", secret "xyzzy5461".
    #[test]
    fn rfc2865_password_vector() {
        let ra: [u8; 16] = hex("0f403f9473978057bd83d5cb98f4227a").try_into().unwrap();
        let hidden = hide_password(b"arctangent", b"xyzzy5461", &ra);
        assert_eq!(hidden, hex("0dbe708d93d413ce3196e43f782a0aee"));
        assert_eq!(unhide_password(&hidden, b"xyzzy5461", &ra), b"arctangent");
    }

    /// RFC 2865 §7.1: the Access-Accept's Response Authenticator.
    #[test]
    fn rfc2865_response_authenticator_vector() {
        let ra: [u8; 16] = hex("0f403f9473978057bd83d5cb98f4227a").try_into().unwrap();
        let reply = hex(concat!(
            "02000026",
            "86fe220e7624ba2a1005f6bf9b55e0b2",
            "0606000000010f06000000000e06c0a80103"
        ));
        let p = verify_reply(&reply, &ra, b"xyzzy5461", false).unwrap();
        assert_eq!(p.code, code::ACCESS_ACCEPT);
        assert_eq!(p.u32(attr::SERVICE_TYPE), Some(1));
        // Required Message-Authenticator: this old reply has none.
        assert_eq!(
            verify_reply(&reply, &ra, b"xyzzy5461", true),
            Err(CodecError::MissingMessageAuthenticator)
        );
        // The wrong secret.
        assert_eq!(
            verify_reply(&reply, &ra, b"xyzzy5462", false),
            Err(CodecError::BadAuthenticator)
        );
    }

    #[test]
    fn multi_block_passwords_round_trip() {
        let ra = [7u8; 16];
        for n in [0usize, 1, 15, 16, 17, 31, 32, 33, 100, 128] {
            let pw: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
            let hidden = hide_password(&pw, b"s3cret", &ra);
            assert_eq!(hidden.len(), n.div_ceil(16).max(1) * 16, "{n}");
            assert_eq!(unhide_password(&hidden, b"s3cret", &ra), pw, "{n}");
        }
        // Longer than 128: cut.
        assert_eq!(hide_password(&[b'x'; 200], b"s", &ra).len(), 128);
    }

    #[test]
    fn request_round_trip_with_message_authenticator() {
        let ra = [3u8; 16];
        let attrs = vec![
            (attr::USER_NAME, b"alice".to_vec()),
            (attr::USER_PASSWORD, hide_password(b"pw", b"sec", &ra)),
            (attr::NAS_PORT_TYPE, 5u32.to_be_bytes().to_vec()),
        ];
        let raw = encode_access_request(code::ACCESS_REQUEST, 42, &ra, &attrs, b"sec").unwrap();
        let p = verify_request(&raw, b"sec").unwrap();
        assert_eq!(p.id, 42);
        assert_eq!(p.get(attr::USER_NAME), Some(&b"alice"[..]));
        assert_eq!(p.u32(attr::NAS_PORT_TYPE), Some(5));
        assert_eq!(
            p.attrs.first().map(|a| a.0),
            Some(attr::MESSAGE_AUTHENTICATOR)
        );
        assert_eq!(
            verify_request(&raw, b"other"),
            Err(CodecError::BadAuthenticator)
        );
        // Tampered: a flipped bit in the user name.
        let mut t = raw.clone();
        let last = t.len() - 1;
        t[last] ^= 1;
        assert_eq!(
            verify_request(&t, b"sec"),
            Err(CodecError::BadAuthenticator)
        );
    }

    #[test]
    fn accounting_round_trip() {
        let attrs = vec![
            (attr::ACCT_STATUS_TYPE, 1u32.to_be_bytes().to_vec()),
            (attr::ACCT_SESSION_ID, b"abc".to_vec()),
        ];
        let raw = encode_accounting_request(9, &attrs, b"sec").unwrap();
        let p = verify_request(&raw, b"sec").unwrap();
        assert_eq!(p.u32(attr::ACCT_STATUS_TYPE), Some(1));
        assert!(verify_request(&raw, b"sex").is_err());
        let ra = request_authenticator(&raw);
        let reply = encode_reply(code::ACCOUNTING_RESPONSE, 9, &ra, &[], b"sec", false).unwrap();
        assert!(verify_reply(&reply, &ra, b"sec", false).is_ok());
        assert!(verify_reply(&reply, &[0; 16], b"sec", false).is_err());
    }

    #[test]
    fn replies_need_a_right_message_authenticator() {
        let ra = [9u8; 16];
        let attrs = vec![
            (attr::REPLY_MESSAGE, b"Enter the code".to_vec()),
            (attr::STATE, b"st".to_vec()),
        ];
        let good = encode_reply(code::ACCESS_CHALLENGE, 1, &ra, &attrs, b"k", true).unwrap();
        let p = verify_reply(&good, &ra, b"k", true).unwrap();
        assert_eq!(p.get(attr::STATE), Some(&b"st"[..]));
        assert_eq!(
            verify_reply(&good, &ra, b"K", true),
            Err(CodecError::BadAuthenticator)
        );
        // Without Message-Authenticator but otherwise right: refused.
        let bare = encode_reply(code::ACCESS_ACCEPT, 1, &ra, &attrs, b"k", false).unwrap();
        assert_eq!(
            verify_reply(&bare, &ra, b"k", true),
            Err(CodecError::MissingMessageAuthenticator)
        );
        // A forged Message-Authenticator with a right Response
        // Authenticator (what BlastRADIUS forges): refused.
        let mut forged = good.clone();
        forged[HEADER + 2] ^= 0xff;
        let head = forged[..4].to_vec();
        let attrs_raw = forged[HEADER..].to_vec();
        let ra2 = md5(&[&head, &ra, &attrs_raw, b"k"]);
        forged[4..HEADER].copy_from_slice(&ra2);
        assert_eq!(
            verify_reply(&forged, &ra, b"k", true),
            Err(CodecError::BadAuthenticator)
        );
        // Every single-bit flip is caught.
        for i in 0..good.len() * 8 {
            let mut t = good.clone();
            t[i / 8] ^= 1 << (i % 8);
            assert!(verify_reply(&t, &ra, b"k", true).is_err(), "bit {i}");
        }
    }

    #[test]
    fn malformed_never_panics() {
        assert!(decode(&[]).is_err());
        assert!(decode(&[2, 0, 0, 19]).is_err());
        let mut p = vec![2, 0, 0, 22];
        p.extend_from_slice(&[0; 16]);
        p.extend_from_slice(&[1, 1]);
        assert!(decode(&p).is_err());
        p[21] = 5;
        assert!(decode(&p).is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&buf);
            let _ = verify_reply(&buf, &[0; 16], b"s", true);
            let _ = verify_request(&buf, b"s");
        }

        #[test]
        fn plausible_packets_never_panic(
            code in any::<u8>(),
            attrs in proptest::collection::vec((any::<u8>(), proptest::collection::vec(any::<u8>(), 0..40)), 0..8),
            cut in 0usize..400,
            flip in any::<(usize, u8)>(),
        ) {
            let mut raw = encode_reply(code, 1, &[1; 16], &attrs, b"s", true).unwrap();
            let n = raw.len();
            raw[flip.0 % n] ^= flip.1;
            raw.truncate(cut.max(1));
            let _ = decode(&raw);
            let _ = verify_reply(&raw, &[1; 16], b"s", true);
        }
    }
}
