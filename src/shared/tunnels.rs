//! Live tunnels as seen from outside their tasks, and the slots that bound
//! unauthenticated connections.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Shared;

/// Commands to a live tunnel's writer.
#[derive(Debug, Clone)]
pub enum TunnelCtl {
    /// Send DISCONNECT with this reason and close (the client will not
    /// reconnect).
    Terminate(String),
    /// Close without DISCONNECT (a newer tunnel of the same session took
    /// over, or the gateway is stopping: clients may reconnect).
    Close,
}

/// A live tunnel, as seen from outside its task.
#[derive(Debug, Clone)]
pub struct TunnelHandle {
    /// Distinguishes successive tunnels of one session.
    pub generation: u64,
    /// Control channel to its writer.
    pub ctl: mpsc::Sender<TunnelCtl>,
    /// Ends the tunnel task at once (used after a grace period, or when a
    /// newer tunnel of the same session takes over).
    pub cancel: CancellationToken,
}

impl TunnelHandle {
    /// Ask the tunnel to end with `ctl`; cancel it if it has not ended
    /// within two seconds (e.g. a writer blocked on a dead peer).
    pub fn end(&self, ctl: TunnelCtl) {
        let _ = self.ctl.try_send(ctl);
        let cancel = self.cancel.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                cancel.cancel();
            });
        } else {
            cancel.cancel();
        }
    }
}

/// Guard for one unauthenticated connection slot; released on drop.
#[derive(Debug)]
pub struct UnauthSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
    released: bool,
}

impl UnauthSlot {
    /// Take a slot for `ip`, or None when the per-address or global limit
    /// is reached.
    pub fn acquire(shared: &Arc<Shared>, ip: IpAddr) -> Option<Self> {
        let total = shared.unauth_total.fetch_add(1, Ordering::AcqRel);
        if total >= shared.config.max_unauthenticated {
            shared.unauth_total.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let mut entry = shared.unauth.entry(ip).or_insert(0);
        if *entry >= shared.config.max_unauthenticated_per_ip {
            drop(entry);
            shared.unauth_total.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        *entry += 1;
        Some(Self {
            shared: shared.clone(),
            ip,
            released: false,
        })
    }

    /// Give the slot back early (the connection became a tunnel).
    pub fn release(mut self) {
        self.do_release();
    }

    fn do_release(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        self.shared.unauth_total.fetch_sub(1, Ordering::AcqRel);
        self.shared.unauth.remove_if_mut(&self.ip, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

impl Drop for UnauthSlot {
    fn drop(&mut self) {
        self.do_release();
    }
}
