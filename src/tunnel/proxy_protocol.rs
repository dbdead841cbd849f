//! The PROXY protocol (v1 text or v2 binary, as haproxy's `send-proxy` /
//! `send-proxy-v2` write it) on connections from the load balancers named
//! in `[gateway] proxy_protocol_from`: the header, sent before the TLS
//! handshake, gives the client's real address, which then counts for ban
//! points, the per-address limits, the logs and `ctl`. Parsed with the
//! `ppp` crate; this module only reads exactly the header's bytes off the
//! socket (peeking, so that nothing after it, the TLS ClientHello, is
//! consumed) within a deadline.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;

/// Longest header: v1 is at most 107 bytes; v2 is 16 bytes plus addresses
/// and TLVs (haproxy sends well under this).
const MAX_HEADER: usize = 1024;

/// What a PROXY header said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The client's address.
    Client(IpAddr),
    /// No client (v2 LOCAL, e.g. the balancer's own health check, or v1
    /// UNKNOWN): the connection is the balancer's own.
    Local,
}

/// Read the PROXY header at the start of `tcp`, and nothing more, within
/// `deadline`.
///
/// # Errors
/// Why there is no valid header (a connection from a listed balancer
/// without one is refused: a client must not be able to skip it).
pub async fn read_header(tcp: &mut TcpStream, deadline: Duration) -> Result<Source, String> {
    let until = Instant::now() + deadline;
    let mut buf = vec![0u8; MAX_HEADER];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no complete PROXY protocol header within {} s",
                deadline.as_secs()
            ));
        }
        let n = match tokio::time::timeout(left, tcp.peek(&mut buf)).await {
            Ok(Ok(0)) => return Err("connection closed before a PROXY protocol header".into()),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(format!("reading the PROXY protocol header: {e}")),
            Err(_) => continue,
        };
        let (len, source) = match parse(&buf[..n]) {
            Parsed::Complete(len, source) => (len, source),
            Parsed::Incomplete if n < MAX_HEADER => {
                // The rest is on its way (rare: haproxy sends it in one
                // segment); peek returns at once while data is queued.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            Parsed::Incomplete => return Err("PROXY protocol header too long".into()),
            Parsed::Invalid(e) => return Err(format!("not a PROXY protocol header: {e}")),
        };
        let mut header = vec![0u8; len];
        tcp.read_exact(&mut header)
            .await
            .map_err(|e| format!("reading the PROXY protocol header: {e}"))?;
        return Ok(source);
    }
}

/// The outcome of parsing the bytes available so far.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// The header's length and what it says.
    Complete(usize, Source),
    /// More bytes are needed.
    Incomplete,
    /// Not a header.
    Invalid(String),
}

fn parse(bytes: &[u8]) -> Parsed {
    use ppp::{v1, v2, HeaderResult, PartialResult as _};
    let r = HeaderResult::parse(bytes);
    if r.is_incomplete() {
        return Parsed::Incomplete;
    }
    match r {
        HeaderResult::V1(Ok(h)) => {
            let source = match h.addresses {
                v1::Addresses::Tcp4(a) => Source::Client(IpAddr::V4(a.source_address)),
                v1::Addresses::Tcp6(a) => Source::Client(client_v6(a.source_address)),
                v1::Addresses::Unknown => Source::Local,
            };
            Parsed::Complete(h.header.len(), source)
        }
        HeaderResult::V2(Ok(h)) => {
            let source = match (h.command, h.addresses) {
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                    Source::Client(IpAddr::V4(a.source_address))
                }
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                    Source::Client(client_v6(a.source_address))
                }
                _ => Source::Local,
            };
            Parsed::Complete(h.len(), source)
        }
        HeaderResult::V1(Err(e)) => Parsed::Invalid(e.to_string()),
        HeaderResult::V2(Err(e)) => Parsed::Invalid(e.to_string()),
    }
}

/// An IPv4-mapped IPv6 address is the IPv4 client it maps.
fn client_v6(a: std::net::Ipv6Addr) -> IpAddr {
    a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2_headers_give_the_client_and_their_length() {
        let v1 = b"PROXY TCP4 198.51.100.7 198.18.40.11 40000 443\r\n\x16\x03\x01";
        assert_eq!(
            parse(v1),
            Parsed::Complete(
                v1.len() - 3,
                Source::Client("198.51.100.7".parse().unwrap())
            )
        );
        let v1u = b"PROXY UNKNOWN\r\n";
        assert_eq!(parse(v1u), Parsed::Complete(v1u.len(), Source::Local));
        let v1_6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 443\r\n";
        assert_eq!(
            parse(v1_6),
            Parsed::Complete(v1_6.len(), Source::Client("2001:db8::7".parse().unwrap()))
        );
        // v2, PROXY, TCP over IPv4, then a TLS record.
        let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        v2.extend([0x21, 0x11, 0, 12]);
        v2.extend([198, 51, 100, 9, 198, 18, 40, 11, 0x9c, 0x40, 0x01, 0xbb]);
        let len = v2.len();
        v2.extend([0x16, 0x03, 0x01]);
        assert_eq!(
            parse(&v2),
            Parsed::Complete(len, Source::Client("198.51.100.9".parse().unwrap()))
        );
        // v2 LOCAL (a health check of the balancer itself).
        let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        local.extend([0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local), Parsed::Complete(16, Source::Local));
        // Partial headers wait for more; garbage is refused.
        assert_eq!(parse(b"PROXY TCP4 198.51"), Parsed::Incomplete);
        assert_eq!(parse(&v2[..10]), Parsed::Incomplete);
        assert!(matches!(
            parse(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
            Parsed::Invalid(_)
        ));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\n\r\n"),
            Parsed::Invalid(_)
        ));
    }

    #[tokio::test]
    async fn only_the_header_is_consumed() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let client = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt as _;
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 443\r\nHELLO")
                .await
                .unwrap();
            c
        });
        let (mut s, _) = l.accept().await.unwrap();
        let _c = client.await.unwrap();
        let src = read_header(&mut s, Duration::from_secs(2)).await.unwrap();
        assert_eq!(src, Source::Client("198.51.100.7".parse().unwrap()));
        let mut rest = [0u8; 5];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"HELLO");
    }

    #[tokio::test]
    async fn a_missing_header_is_refused_in_time() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let client = tokio::spawn(async move { TcpStream::connect(addr).await.unwrap() });
        let (mut s, _) = l.accept().await.unwrap();
        let _c = client.await.unwrap();
        let t = Instant::now();
        let e = read_header(&mut s, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(e.contains("no complete PROXY protocol header"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
