//! The TLS listening socket: bound first thing at start (connection
//! attempts made while the gateway loads its state wait in the backlog
//! instead of being refused), or handed over by a service manager (systemd
//! socket activation, `LISTEN_FDS`), so that a restart refuses no connection
//! attempt: the socket outlives the process and queues what arrives
//! meanwhile.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// The first file descriptor passed by socket activation (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Pending connections the kernel queues for us (the storm of reconnects
/// after a restart arrives at once; Linux caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

/// Where the listening socket came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Bound by this process.
    Bound,
    /// Passed in by the service manager (`LISTEN_FDS`).
    Activated,
}

/// Why there is no listening socket.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListenError {
    /// Binding failed.
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    /// `LISTEN_FDS` names a descriptor that is not a listening TCP socket.
    #[error("socket activation (LISTEN_FDS): descriptor {0} is not a listening TCP socket: {1}")]
    NotASocket(RawFd, String),
}

/// The number of sockets the service manager passed to this process, per
/// the `sd_listen_fds(3)` convention: `LISTEN_PID` must be our pid (the
/// variables are not meant for our children).
fn activated_fds(listen_pid: Option<&str>, listen_fds: Option<&str>, pid: u32) -> usize {
    let Some(for_pid) = listen_pid.and_then(|p| p.trim().parse::<u32>().ok()) else {
        return 0;
    };
    if for_pid != pid {
        return 0;
    }
    listen_fds
        .and_then(|n| n.trim().parse::<usize>().ok())
        .unwrap_or(0)
}

/// The TLS listener: the socket passed by socket activation if there is
/// one (the first), else a socket bound to `addr`. Call it before any slow
/// start-up work. (The activation variables stay in the environment: a
/// child process has another pid, so `LISTEN_PID` does not match it.)
pub fn open(addr: SocketAddr) -> Result<(std::net::TcpListener, Origin), ListenError> {
    let n = activated_fds(
        std::env::var("LISTEN_PID").ok().as_deref(),
        std::env::var("LISTEN_FDS").ok().as_deref(),
        std::process::id(),
    );
    if n > 0 {
        // SAFETY: under the socket-activation protocol (checked above:
        // LISTEN_PID is this process), descriptor 3 is open and owned by
        // us; nothing else in this process uses it.
        let fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
        let sock = socket2::Socket::from(fd);
        let is_listening_tcp = sock.r#type().is_ok_and(|t| t == socket2::Type::STREAM)
            && sock.is_listener().unwrap_or(false);
        if !is_listening_tcp {
            return Err(ListenError::NotASocket(
                LISTEN_FDS_START,
                "not a listening stream socket".into(),
            ));
        }
        sock.set_nonblocking(true)
            .map_err(|e| ListenError::NotASocket(LISTEN_FDS_START, e.to_string()))?;
        let local = sock.local_addr().ok().and_then(|a| a.as_socket());
        if local.is_some_and(|l| l != addr) {
            tracing::warn!(
                configured = %addr,
                passed = ?local,
                "socket activation passed a socket on another address than [gateway] listen; using the passed one"
            );
        }
        return Ok((sock.into(), Origin::Activated));
    }
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(|e| ListenError::Bind(addr, e))?;
    let bind = |s: &socket2::Socket| -> std::io::Result<()> {
        s.set_reuse_address(true)?;
        if addr.is_ipv6() {
            // Dual-stack where the system allows it; an IPv6-only socket
            // still serves IPv6 clients.
            let _ = s.set_only_v6(false);
        }
        s.bind(&addr.into())?;
        s.listen(BACKLOG)?;
        s.set_nonblocking(true)
    };
    bind(&sock).map_err(|e| ListenError::Bind(addr, e))?;
    Ok((sock.into(), Origin::Bound))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activation_only_for_this_process() {
        assert_eq!(activated_fds(Some("42"), Some("1"), 42), 1);
        assert_eq!(activated_fds(Some("42"), Some("2"), 42), 2);
        assert_eq!(
            activated_fds(Some("41"), Some("1"), 42),
            0,
            "meant for another process"
        );
        assert_eq!(activated_fds(None, Some("1"), 42), 0);
        assert_eq!(activated_fds(Some("42"), None, 42), 0);
        assert_eq!(activated_fds(Some("x"), Some("1"), 42), 0);
        assert_eq!(activated_fds(Some("42"), Some("-1"), 42), 0);
    }

    #[test]
    fn binds_with_a_backlog_and_reports_busy_ports() {
        let (l, origin) = open("127.0.0.1:0".parse().expect("addr")).expect("bind");
        assert_eq!(origin, Origin::Bound);
        let addr = l.local_addr().expect("addr");
        // A connection made before anyone accepts waits in the backlog.
        let c = std::net::TcpStream::connect(addr).expect("connect");
        l.set_nonblocking(false).expect("blocking");
        let (s, _) = l.accept().expect("accept");
        assert_eq!(s.peer_addr().expect("peer"), c.local_addr().expect("local"));
        // The same address again: a clear error naming it.
        let other = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let busy = other.local_addr().expect("addr");
        let e = open(busy).expect_err("in use");
        assert!(e.to_string().contains(&busy.to_string()), "{e}");
    }
}
