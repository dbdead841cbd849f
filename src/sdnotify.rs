//! The service manager's readiness protocol (`sd_notify(3)`): a datagram
//! to the unix socket named by `$NOTIFY_SOCKET` (a path, or an abstract
//! name when it starts with '@'). Without the variable (not started by
//! systemd with `Type=notify`) every call does nothing.

use std::os::unix::net::UnixDatagram;

/// Tell the service manager `state` (`READY=1`, `STOPPING=1`,
/// `RELOADING=1`, `STATUS=...`; several lines at once are allowed).
/// Returns whether a message was sent; a failure is logged, never fatal.
pub fn notify(state: &str) -> bool {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    match send(&target.to_string_lossy(), state) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, state, "cannot notify the service manager");
            false
        }
    }
}

/// `READY=1` plus a status line.
pub fn ready(status: &str) -> bool {
    notify(&format!("READY=1\nSTATUS={status}"))
}

/// Around a reload: `RELOADING=1` before (with the monotonic time, as
/// `Type=notify-reload` wants), `READY=1` after.
pub fn reloading() -> bool {
    notify(&format!(
        "RELOADING=1\nMONOTONIC_USEC={}",
        monotonic_usec().unwrap_or(0)
    ))
}

fn monotonic_usec() -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if r != 0 {
        return None;
    }
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u64::try_from(ts.tv_nsec).ok()?;
    Some(secs.saturating_mul(1_000_000).saturating_add(nanos / 1_000))
}

fn send(target: &str, state: &str) -> std::io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    if let Some(name) = target.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else if target.starts_with('/') {
        sock.send_to(state.as_bytes(), target)?;
    } else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("NOTIFY_SOCKET {target:?} is neither a path nor an abstract name"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_and_to_an_abstract_name() {
        let dir = std::env::temp_dir().join(format!("ig-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("notify.sock");
        let rx = UnixDatagram::bind(&path).expect("bind");
        send(&path.to_string_lossy(), "READY=1\nSTATUS=up").expect("send");
        let mut buf = [0u8; 256];
        let n = rx.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=up");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("ig-notify-test-{}", std::process::id());
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract");
        let rx2 = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        send(&format!("@{name}"), "STOPPING=1").expect("send abstract");
        let n = rx2.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STOPPING=1");

        assert!(send("relative", "READY=1").is_err());
        assert!(monotonic_usec().is_some_and(|u| u > 0));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
