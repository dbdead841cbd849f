//! FTP control-connection lines that announce a data-connection endpoint:
//! the client's `PORT` (RFC 959 §4.1.2) and `EPRT` (RFC 2428 §2) commands and
//! the server's `227` (RFC 959 §4.2; RFC 1123 §4.1.2.6) and `229` (RFC 2428
//! §3) replies. The FTP ALG (`core::alg::ftp`) feeds complete lines here and
//! formats the rewritten `PORT`/`EPRT` with [`format_port`] / [`format_eprt`].
//!
//! A line is the bytes up to and including `\n` (an optional `\r` before it
//! is part of the terminator). Parsing is strict where a lenient parser would
//! let a forged address through unnoticed: a line that starts with a `PORT`
//! or `EPRT` keyword but does not parse is an error (the ALG refuses it)
//! rather than "not a PORT". Nothing here allocates or panics.
#![deny(clippy::indexing_slicing)]

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};

/// Longest line the ALG buffers for parsing (bytes, terminator included).
/// The longest legitimate line here, an `EPRT` with a full IPv6 address and
/// port, is 57 bytes; `227` replies carry free text (typically < 60 bytes).
pub const MAX_LINE: usize = 160;

/// Capacity of a formatted line ([`Formatted`]).
pub const FORMAT_MAX: usize = 64;

/// Why a candidate line was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FtpCmdError {
    /// The line has no `\n` terminator.
    #[error("FTP line not terminated")]
    Unterminated,
    /// `PORT`: not six comma-separated numbers 0-255, or port 0.
    #[error("malformed PORT argument")]
    BadPort,
    /// `EPRT`: bad delimiter, protocol, address or port.
    #[error("malformed EPRT argument")]
    BadEprt,
    /// `227`: no `h1,h2,h3,h4,p1,p2` after the code.
    #[error("malformed 227 reply")]
    BadPassive,
    /// `229`: no `(<d><d><d>port<d>)`.
    #[error("malformed 229 reply")]
    BadExtendedPassive,
}

/// A data-connection endpoint announced on the control connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announce {
    /// `PORT h1,h2,h3,h4,p1,p2`: the client listens here (active mode).
    Port {
        /// The command word as sent (case preserved).
        command: [u8; 4],
        /// Address and port.
        addr: SocketAddrV4,
    },
    /// `EPRT <d>1|2<d>addr<d>port<d>`: the client listens here.
    Eprt {
        /// The command word as sent.
        command: [u8; 4],
        /// The delimiter character (ASCII 33-126, usually `|`).
        delimiter: u8,
        /// Address and port.
        addr: SocketAddr,
    },
    /// `227 ... (h1,h2,h3,h4,p1,p2)`: the server listens here (passive).
    Passive(SocketAddrV4),
    /// `229 ... (<d><d><d>port<d>)`: the server listens on this port of its
    /// control-connection address (extended passive).
    ExtendedPassive(u16),
}

/// How far a partial line matches a keyword.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    /// Cannot be a candidate line.
    No,
    /// Could still become one.
    Partial,
    /// The keyword is complete: the line is a candidate.
    Complete,
}

const CLIENT_KEYWORDS: [&[u8; 5]; 2] = [b"PORT ", b"EPRT "];
const SERVER_KEYWORDS: [&[u8; 4]; 2] = [b"227 ", b"229 "];

/// Does the start of a client line match `PORT ` or `EPRT `
/// (case-insensitive, RFC 959 §5.3)?
pub fn client_prefix(start: &[u8]) -> Prefix {
    prefix(start, &CLIENT_KEYWORDS.map(|k| &k[..]))
}

/// Does the start of a server line match `227 ` or `229 ` (the last line of
/// a reply; `227-` continuation lines are not candidates)?
pub fn server_prefix(start: &[u8]) -> Prefix {
    prefix(start, &SERVER_KEYWORDS.map(|k| &k[..]))
}

fn prefix(start: &[u8], keywords: &[&[u8]]) -> Prefix {
    let mut best = Prefix::No;
    for kw in keywords {
        let n = start.len().min(kw.len());
        let (Some(a), Some(b)) = (start.get(..n), kw.get(..n)) else {
            continue;
        };
        if a.eq_ignore_ascii_case(b) {
            if start.len() >= kw.len() {
                return Prefix::Complete;
            }
            best = Prefix::Partial;
        }
    }
    best
}

/// Splits a line into its body and terminator (`\r\n` or `\n`).
///
/// # Errors
/// [`FtpCmdError::Unterminated`] when the line does not end with `\n`.
pub fn split_eol(line: &[u8]) -> Result<(&[u8], &[u8]), FtpCmdError> {
    let body = line.strip_suffix(b"\n").ok_or(FtpCmdError::Unterminated)?;
    let cut = if body.ends_with(b"\r") {
        body.len() - 1
    } else {
        body.len()
    };
    let (body, _) = line
        .split_at_checked(cut)
        .ok_or(FtpCmdError::Unterminated)?;
    let eol = line.get(cut..).unwrap_or_default();
    Ok((body, eol))
}

/// Parses a complete client line. `Ok(None)`: not a `PORT`/`EPRT` command.
///
/// # Errors
/// [`FtpCmdError::BadPort`] / [`FtpCmdError::BadEprt`] for a `PORT`/`EPRT`
/// whose argument does not parse; [`FtpCmdError::Unterminated`].
pub fn parse_client(line: &[u8]) -> Result<Option<Announce>, FtpCmdError> {
    let (body, _) = split_eol(line)?;
    if client_prefix(body) != Prefix::Complete {
        return Ok(None);
    }
    let Some((cmd, arg)) = body.split_first_chunk::<4>() else {
        return Ok(None);
    };
    let command = *cmd;
    let arg = trim_spaces(arg);
    if command.eq_ignore_ascii_case(b"PORT") {
        let (addr, rest) = six_numbers(arg).ok_or(FtpCmdError::BadPort)?;
        if !trim_spaces(rest).is_empty() || addr.port() == 0 {
            return Err(FtpCmdError::BadPort);
        }
        Ok(Some(Announce::Port { command, addr }))
    } else {
        let (delimiter, addr) = eprt(arg).ok_or(FtpCmdError::BadEprt)?;
        Ok(Some(Announce::Eprt {
            command,
            delimiter,
            addr,
        }))
    }
}

/// Parses a complete server line. `Ok(None)`: not a final `227`/`229` line.
///
/// # Errors
/// [`FtpCmdError::BadPassive`] / [`FtpCmdError::BadExtendedPassive`];
/// [`FtpCmdError::Unterminated`].
pub fn parse_server(line: &[u8]) -> Result<Option<Announce>, FtpCmdError> {
    let (body, _) = split_eol(line)?;
    if server_prefix(body) != Prefix::Complete {
        return Ok(None);
    }
    let (code, text) = body.split_at_checked(4).ok_or(FtpCmdError::BadPassive)?;
    if code == b"227 " {
        // RFC 1123 §4.1.2.6: the format of the text varies; scan for the
        // first digit.
        let start = text
            .iter()
            .position(u8::is_ascii_digit)
            .ok_or(FtpCmdError::BadPassive)?;
        let (addr, _) = text
            .get(start..)
            .and_then(six_numbers)
            .ok_or(FtpCmdError::BadPassive)?;
        if addr.port() == 0 {
            return Err(FtpCmdError::BadPassive);
        }
        Ok(Some(Announce::Passive(addr)))
    } else {
        let open = text
            .iter()
            .position(|&b| b == b'(')
            .ok_or(FtpCmdError::BadExtendedPassive)?;
        let inner = text.get(open + 1..).unwrap_or_default();
        let port = epsv(inner).ok_or(FtpCmdError::BadExtendedPassive)?;
        Ok(Some(Announce::ExtendedPassive(port)))
    }
}

/// `h1,h2,h3,h4,p1,p2` (each 1-3 decimal digits, at most 255); returns the
/// endpoint and the bytes after the sixth number.
fn six_numbers(s: &[u8]) -> Option<(SocketAddrV4, &[u8])> {
    let mut n = [0u8; 6];
    let mut rest = s;
    for (i, slot) in n.iter_mut().enumerate() {
        if i > 0 {
            rest = rest.strip_prefix(b",")?;
        }
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if !(1..=3).contains(&digits) {
            return None;
        }
        let (num, tail) = rest.split_at_checked(digits)?;
        *slot = u8::try_from(decimal(num)?).ok()?;
        rest = tail;
    }
    let [a, b, c, d, p1, p2] = n;
    let port = u16::from_be_bytes([p1, p2]);
    Some((SocketAddrV4::new(Ipv4Addr::new(a, b, c, d), port), rest))
}

/// Value of 1-5 ASCII digits (callers bound the count).
fn decimal(digits: &[u8]) -> Option<u32> {
    if digits.is_empty() || digits.len() > 5 {
        return None;
    }
    digits.iter().try_fold(0u32, |acc, &b| {
        b.is_ascii_digit().then(|| acc * 10 + u32::from(b - b'0'))
    })
}

fn port_number(digits: &[u8]) -> Option<u16> {
    u16::try_from(decimal(digits)?).ok().filter(|&p| p != 0)
}

/// `<d>proto<d>addr<d>port<d>` followed by nothing but spaces.
fn eprt(arg: &[u8]) -> Option<(u8, SocketAddr)> {
    let (&d, rest) = arg.split_first()?;
    if !(33..=126).contains(&d) || d.is_ascii_digit() || d == b'.' || d == b':' {
        return None;
    }
    let mut fields = rest.splitn(4, |&b| b == d);
    let proto = fields.next()?;
    let addr = std::str::from_utf8(fields.next()?).ok()?;
    let port = port_number(fields.next()?)?;
    if !trim_spaces(fields.next()?).is_empty() {
        return None;
    }
    let ip = match proto {
        b"1" => IpAddr::V4(addr.parse::<Ipv4Addr>().ok()?),
        b"2" => IpAddr::V6(addr.parse::<Ipv6Addr>().ok()?),
        _ => return None,
    };
    Some((d, SocketAddr::new(ip, port)))
}

/// `<d><d><d>port<d>)` (the part after `(` of a 229 reply).
fn epsv(inner: &[u8]) -> Option<u16> {
    let (&d, _) = inner.split_first()?;
    if !(33..=126).contains(&d) || d.is_ascii_digit() {
        return None;
    }
    let rest = inner.strip_prefix(&[d, d, d])?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let (num, tail) = rest.split_at_checked(digits)?;
    let port = port_number(num)?;
    tail.strip_prefix(&[d, b')'])?;
    Some(port)
}

fn trim_spaces(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| b != b' ' && b != b'\t');
    let end = s.iter().rposition(|&b| b != b' ' && b != b'\t');
    match (start, end) {
        (Some(a), Some(b)) => s.get(a..=b).unwrap_or_default(),
        _ => &[],
    }
}

/// A line formatted into a fixed buffer (no allocation).
#[derive(Clone, Copy)]
pub struct Formatted {
    buf: [u8; FORMAT_MAX],
    len: usize,
}

impl Formatted {
    /// The formatted bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }
}

impl std::fmt::Debug for Formatted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_bytes()))
    }
}

impl std::fmt::Write for Formatted {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        let dst = self.buf.get_mut(self.len..end).ok_or(std::fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Why a line could not be formatted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The result would exceed [`FORMAT_MAX`] bytes (an over-long
    /// terminator or command word).
    #[error("formatted FTP line too long")]
    TooLong,
    /// The command word or delimiter is not printable ASCII.
    #[error("bad FTP command word or delimiter")]
    BadToken,
}

fn start(command: [u8; 4], eol_ok: &[u8]) -> Result<Formatted, FormatError> {
    if !command.iter().all(u8::is_ascii_alphabetic) || !(eol_ok == b"\r\n" || eol_ok == b"\n") {
        return Err(FormatError::BadToken);
    }
    let mut f = Formatted {
        buf: [0; FORMAT_MAX],
        len: 0,
    };
    for b in command {
        f.write_char(char::from(b))
            .map_err(|_| FormatError::TooLong)?;
    }
    Ok(f)
}

/// `PORT h1,h2,h3,h4,p1,p2` with `eol` (`\r\n` or `\n`), keeping the
/// command word's case.
///
/// # Errors
/// [`FormatError::BadToken`] for a non-alphabetic command word or another
/// terminator.
pub fn format_port(
    command: [u8; 4],
    addr: SocketAddrV4,
    eol: &[u8],
) -> Result<Formatted, FormatError> {
    let mut f = start(command, eol)?;
    let [a, b, c, d] = addr.ip().octets();
    let [p1, p2] = addr.port().to_be_bytes();
    write!(f, " {a},{b},{c},{d},{p1},{p2}").map_err(|_| FormatError::TooLong)?;
    write_eol(&mut f, eol)?;
    Ok(f)
}

/// `EPRT <d>1|2<d>addr<d>port<d>` with `eol`.
///
/// # Errors
/// [`FormatError::BadToken`] for a bad command word, delimiter or terminator.
pub fn format_eprt(
    command: [u8; 4],
    delimiter: u8,
    addr: SocketAddr,
    eol: &[u8],
) -> Result<Formatted, FormatError> {
    if !(33..=126).contains(&delimiter)
        || delimiter.is_ascii_digit()
        || delimiter == b'.'
        || delimiter == b':'
    {
        return Err(FormatError::BadToken);
    }
    let mut f = start(command, eol)?;
    let d = char::from(delimiter);
    let af = if addr.is_ipv4() { 1 } else { 2 };
    write!(f, " {d}{af}{d}{}{d}{}{d}", addr.ip(), addr.port()).map_err(|_| FormatError::TooLong)?;
    write_eol(&mut f, eol)?;
    Ok(f)
}

fn write_eol(f: &mut Formatted, eol: &[u8]) -> Result<(), FormatError> {
    let s = if eol == b"\r\n" { "\r\n" } else { "\n" };
    f.write_str(s).map_err(|_| FormatError::TooLong)
}

/// The properties the fuzz target (`fuzz/fuzz_targets/ftp_cmd.rs`) and the
/// corpus replay check on arbitrary input: parsing never panics, a parsed
/// `PORT`/`EPRT` formats and parses back to itself, and the prefix
/// functions agree with the parsers. Every `\n`-terminated piece of `data`
/// is tried as a line, and so is the whole input.
///
/// # Errors
/// A description of the first property that does not hold (callers
/// panic with it).
pub fn fuzz_check(data: &[u8]) -> Result<(), String> {
    let lines = data
        .split_inclusive(|&b| b == b'\n')
        .chain(std::iter::once(data));
    for line in lines {
        let shown = String::from_utf8_lossy(line);
        let parsed = parse_client(line);
        if let Ok(Some(a)) = parsed {
            if client_prefix(line) != Prefix::Complete {
                return Err(format!("{shown:?} parsed without a complete keyword"));
            }
            let (_, eol) = split_eol(line).map_err(|e| format!("{shown:?}: {e}"))?;
            let formatted = match a {
                Announce::Port { command, addr } => format_port(command, addr, eol),
                Announce::Eprt {
                    command,
                    delimiter,
                    addr,
                } => format_eprt(command, delimiter, addr, eol),
                other => return Err(format!("client parser returned {other:?}")),
            };
            let f = formatted.map_err(|e| format!("{shown:?} does not format: {e}"))?;
            if parse_client(f.as_bytes()) != Ok(Some(a)) {
                return Err(format!("{shown:?} -> {f:?} does not parse back"));
            }
        }
        match parse_server(line) {
            Ok(Some(Announce::Passive(a))) if a.port() == 0 => {
                return Err(format!("{shown:?}: 227 with port 0"));
            }
            Ok(Some(Announce::ExtendedPassive(0))) => {
                return Err(format!("{shown:?}: 229 with port 0"));
            }
            Ok(Some(Announce::Port { .. } | Announce::Eprt { .. })) => {
                return Err(format!("{shown:?}: server parser returned a command"));
            }
            _ => {}
        }
        let _ = server_prefix(line);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v4(s: &str) -> SocketAddrV4 {
        s.parse().expect("addr")
    }

    #[test]
    fn port_command() {
        assert_eq!(
            parse_client(b"PORT 10,0,0,2,4,1\r\n"),
            Ok(Some(Announce::Port {
                command: *b"PORT",
                addr: v4("10.0.0.2:1025")
            }))
        );
        // Lower case, bare LF, extra spaces.
        assert_eq!(
            parse_client(b"port  192,168,1,200,195,80 \n"),
            Ok(Some(Announce::Port {
                command: *b"port",
                addr: v4("192.168.1.200:50000")
            }))
        );
        for bad in [
            &b"PORT 10,0,0,2,4\r\n"[..],
            b"PORT 10,0,0,256,4,1\r\n",
            b"PORT 10,0,0,2,4,1,7\r\n",
            b"PORT 10,0,0,2,0,0\r\n",
            b"PORT 10,0,0,0002,4,1\r\n",
            b"PORT 10,0,0,2,4,1x\r\n",
            b"PORT\t10,0,0,2,4,1\r\n",
            b"PORT \r\n",
        ] {
            assert_eq!(
                parse_client(bad),
                if bad.starts_with(b"PORT ") {
                    Err(FtpCmdError::BadPort)
                } else {
                    Ok(None)
                },
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(parse_client(b"PASV\r\n"), Ok(None));
        assert_eq!(parse_client(b"PORTX 1,2,3,4,5,6\r\n"), Ok(None));
        assert_eq!(
            parse_client(b"PORT 1,2,3,4,5,6"),
            Err(FtpCmdError::Unterminated)
        );
    }

    #[test]
    fn eprt_command() {
        // RFC 2428 §2 examples.
        assert_eq!(
            parse_client(b"EPRT |1|132.235.1.2|6275|\r\n"),
            Ok(Some(Announce::Eprt {
                command: *b"EPRT",
                delimiter: b'|',
                addr: "132.235.1.2:6275".parse().expect("a")
            }))
        );
        assert_eq!(
            parse_client(b"EPRT |2|1080::8:800:200C:417A|5282|\r\n"),
            Ok(Some(Announce::Eprt {
                command: *b"EPRT",
                delimiter: b'|',
                addr: "[1080::8:800:200c:417a]:5282".parse().expect("a")
            }))
        );
        assert_eq!(
            parse_client(b"eprt !1!10.0.0.2!40000!\n"),
            Ok(Some(Announce::Eprt {
                command: *b"eprt",
                delimiter: b'!',
                addr: "10.0.0.2:40000".parse().expect("a")
            }))
        );
        for bad in [
            &b"EPRT |3|10.0.0.2|1|\r\n"[..],
            b"EPRT |1|10.0.0.2|0|\r\n",
            b"EPRT |1|10.0.0.2|65536|\r\n",
            b"EPRT |1|::1|5|\r\n",
            b"EPRT |2|10.0.0.2|5|\r\n",
            b"EPRT |1|10.0.0.2|5\r\n",
            b"EPRT |1|10.0.0.2|5|x\r\n",
            b"EPRT 1|1|10.0.0.2|5|\r\n",
            b"EPRT \r\n",
        ] {
            assert_eq!(
                parse_client(bad),
                Err(FtpCmdError::BadEprt),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn passive_replies() {
        assert_eq!(
            parse_server(b"227 Entering Passive Mode (192,168,150,90,195,149).\r\n"),
            Ok(Some(Announce::Passive(v4("192.168.150.90:50069"))))
        );
        // RFC 1123: no parentheses, other text.
        assert_eq!(
            parse_server(b"227 =10,1,2,3,0,21\r\n"),
            Ok(Some(Announce::Passive(v4("10.1.2.3:21"))))
        );
        assert_eq!(
            parse_server(b"229 Entering Extended Passive Mode (|||6446|)\r\n"),
            Ok(Some(Announce::ExtendedPassive(6446)))
        );
        assert_eq!(
            parse_server(b"229 EPSV ok (!!!40000!)\n"),
            Ok(Some(Announce::ExtendedPassive(40000)))
        );
        assert_eq!(parse_server(b"227-multi line\r\n"), Ok(None));
        assert_eq!(parse_server(b"200 PORT command successful\r\n"), Ok(None));
        assert_eq!(
            parse_server(b"227 no numbers\r\n"),
            Err(FtpCmdError::BadPassive)
        );
        assert_eq!(
            parse_server(b"229 (|||0|)\r\n"),
            Err(FtpCmdError::BadExtendedPassive)
        );
        assert_eq!(
            parse_server(b"229 (||6446|)\r\n"),
            Err(FtpCmdError::BadExtendedPassive)
        );
    }

    #[test]
    fn prefixes() {
        assert_eq!(client_prefix(b""), Prefix::Partial);
        assert_eq!(client_prefix(b"p"), Prefix::Partial);
        assert_eq!(client_prefix(b"Po"), Prefix::Partial);
        assert_eq!(client_prefix(b"EPR"), Prefix::Partial);
        assert_eq!(client_prefix(b"PORT"), Prefix::Partial);
        assert_eq!(client_prefix(b"PORT "), Prefix::Complete);
        assert_eq!(client_prefix(b"PORT 1"), Prefix::Complete);
        assert_eq!(client_prefix(b"PASV"), Prefix::No);
        assert_eq!(client_prefix(b"PORT\r"), Prefix::No);
        assert_eq!(server_prefix(b"22"), Prefix::Partial);
        assert_eq!(server_prefix(b"227 "), Prefix::Complete);
        assert_eq!(server_prefix(b"227-"), Prefix::No);
        assert_eq!(server_prefix(b"230 "), Prefix::No);
    }

    #[test]
    fn formatting() {
        let f = format_port(*b"PORT", v4("192.0.2.1:61000"), b"\r\n").expect("fmt");
        assert_eq!(f.as_bytes(), b"PORT 192,0,2,1,238,72\r\n");
        let f = format_eprt(
            *b"EPRT",
            b'|',
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"
                .parse()
                .expect("a"),
            b"\r\n",
        )
        .expect("fmt");
        assert_eq!(
            f.as_bytes(),
            &b"EPRT |2|ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff|65535|\r\n"[..]
        );
        assert!(f.as_bytes().len() <= FORMAT_MAX);
        assert_eq!(
            format_port(*b"PO T", v4("1.2.3.4:5"), b"\r\n").err(),
            Some(FormatError::BadToken)
        );
        assert_eq!(
            format_eprt(*b"EPRT", b'1', "1.2.3.4:5".parse().expect("a"), b"\n").err(),
            Some(FormatError::BadToken)
        );
    }

    #[test]
    fn corpus_seeds_pass_the_fuzz_checks() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/ftp_cmd");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in entries.flatten() {
            let data = std::fs::read(e.path()).expect("read seed");
            assert_eq!(fuzz_check(&data), Ok(()), "{}", e.path().display());
        }
    }

    proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            prop_assert_eq!(fuzz_check(&data), Ok(()));
        }

        #[test]
        fn never_panics_on_near_misses(
            kw in prop_oneof![Just("PORT "), Just("EPRT "), Just("227 "), Just("229 "), Just("port ")],
            tail in "[0-9,|.:()! a-fA-F]{0,60}",
            crlf in any::<bool>(),
        ) {
            let line = format!("{kw}{tail}{}", if crlf { "\r\n" } else { "\n" });
            prop_assert_eq!(fuzz_check(line.as_bytes()), Ok(()));
        }

        #[test]
        fn port_round_trip(a in any::<[u8; 4]>(), port in 1u16.., crlf in any::<bool>(), lower in any::<bool>()) {
            let cmd = if lower { *b"port" } else { *b"PORT" };
            let eol: &[u8] = if crlf { b"\r\n" } else { b"\n" };
            let addr = SocketAddrV4::new(Ipv4Addr::from(a), port);
            let f = format_port(cmd, addr, eol).expect("fmt");
            prop_assert_eq!(parse_client(f.as_bytes()), Ok(Some(Announce::Port { command: cmd, addr })));
            prop_assert!(f.as_bytes().ends_with(eol));
        }

        #[test]
        fn eprt_round_trip(v6 in any::<[u8; 16]>(), v4a in any::<[u8; 4]>(), use6 in any::<bool>(), port in 1u16..) {
            let ip = if use6 { IpAddr::from(v6) } else { IpAddr::from(v4a) };
            let addr = SocketAddr::new(ip, port);
            let f = format_eprt(*b"EPRT", b'|', addr, b"\r\n").expect("fmt");
            prop_assert_eq!(parse_client(f.as_bytes()), Ok(Some(Announce::Eprt { command: *b"EPRT", delimiter: b'|', addr })));
        }
    }
}
