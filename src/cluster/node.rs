//! Reaching the cluster's store at start, and keeping this node's lease.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{Cluster, NodeInfo};
use crate::config::ClusterSettings;
use crate::state::etcd_store::{EtcdOptions, EtcdStore};

/// Time allowed to connect to an endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Time allowed for one request (a claim waits this long at most).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest wait between two attempts to reach the store at start.
const START_RETRY_MAX: Duration = Duration::from_secs(10);

/// The etcd options `[cluster]` gives (the password read from its file).
pub fn etcd_options(s: &ClusterSettings) -> Result<EtcdOptions, String> {
    if let Some(e) = s.unreadable_files().into_iter().next() {
        return Err(e);
    }
    let password = match &s.password_file {
        None => None,
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| format!("cluster.password_file {}: {e}", p.display()))?;
            Some(text.lines().next().unwrap_or("").trim_end().to_string())
        }
    };
    Ok(EtcdOptions {
        endpoints: s.endpoints.clone(),
        prefix: s.prefix.clone(),
        ca: s.ca.clone(),
        cert: s.cert.clone(),
        key: s.key.clone(),
        username: s.username.clone(),
        password,
        connect_timeout: CONNECT_TIMEOUT,
        request_timeout: REQUEST_TIMEOUT,
    })
}

/// Connect to etcd, retrying (with a clear log line each time) until it
/// answers or `cancel` fires: a node without its store does not start
/// half-alive.
pub async fn connect(
    s: &ClusterSettings,
    cancel: &CancellationToken,
) -> Result<Arc<EtcdStore>, String> {
    let opts = etcd_options(s)?;
    let mut delay = Duration::from_millis(500);
    let mut attempt = 0_u32;
    loop {
        attempt += 1;
        match EtcdStore::connect(opts.clone()).await {
            Ok(store) => {
                info!(endpoints = ?s.endpoints, prefix = %s.prefix, node = %s.node, "connected to the cluster store");
                return Ok(Arc::new(store));
            }
            Err(e) => {
                error!(
                    endpoints = ?s.endpoints,
                    error = %e,
                    attempt,
                    retry_in_s = delay.as_secs_f32(),
                    "cannot reach the cluster store (etcd); not accepting logons until it answers"
                );
            }
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = cancel.cancelled() => return Err("stopped before the cluster store answered".into()),
        }
        delay = (delay * 2).min(START_RETRY_MAX);
    }
}

/// Keep `nodes/<name>` alive on the node's etcd lease, and publish until
/// when the lease is valid (`Cluster::lease_valid_until_ms`); re-register
/// when the lease was lost (etcd back after a long outage).
pub async fn keep_lease(
    cluster: Arc<Cluster>,
    store: Arc<EtcdStore>,
    info: NodeInfo,
    cancel: CancellationToken,
) {
    let ttl = cluster.settings.lease_ttl;
    let value = serde_json::to_vec(&info).unwrap_or_default();
    let mut lease = None;
    let mut failures = 0_u32;
    loop {
        if lease.is_none() {
            match store
                .keep_node_alive(cluster.node(), value.clone(), ttl)
                .await
            {
                Ok(l) => {
                    if failures > 0 {
                        info!(node = cluster.node(), "node lease granted again");
                    }
                    failures = 0;
                    lease = Some(l);
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(10) {
                        warn!(error = %e, "cannot register this node in the cluster store; retrying");
                    }
                }
            }
        }
        let until_ms = lease
            .as_ref()
            .and_then(crate::state::etcd_store::NodeLease::valid_until)
            .map_or(0, |t| {
                let left = t.saturating_duration_since(std::time::Instant::now());
                unix_ms().saturating_add(u64::try_from(left.as_millis()).unwrap_or(0))
            });
        cluster
            .lease_valid_until_ms
            .store(until_ms, Ordering::Relaxed);
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
            () = cancel.cancelled() => {
                if let Some(l) = lease.take() {
                    l.shutdown().await;
                }
                return;
            }
        }
    }
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// [`super::Announce`] over the kernel ([`crate::netif::announce::Announcer`]):
/// failures are logged (each kind at most once a minute), never fatal: a
/// user whose address could not be announced is still served, and the next
/// change retries.
#[derive(Debug)]
pub struct KernelAnnouncer {
    inner: crate::netif::announce::Announcer,
    interface: String,
    last_error: std::sync::Mutex<Option<std::time::Instant>>,
}

impl KernelAnnouncer {
    /// Proxy ARP on `interface` (see `[cluster] announce`).
    pub fn new(interface: &str) -> std::io::Result<Self> {
        Ok(Self {
            inner: crate::netif::announce::Announcer::new(interface)?,
            interface: interface.to_string(),
            last_error: std::sync::Mutex::new(None),
        })
    }

    fn report(&self, what: &str, addr: std::net::IpAddr, e: &std::io::Error) {
        let mut last = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60)) {
            *last = Some(now);
            warn!(interface = %self.interface, %addr, error = %e, "cannot {what} (more such errors are not logged for a minute)");
        }
    }

    /// Remove the routes this node added (shutdown).
    pub fn clear(&self) {
        if let Err(e) = self.inner.clear() {
            warn!(interface = %self.interface, error = %e, "cannot remove the routes to other nodes' users");
        }
    }
}

impl super::Announce for KernelAnnouncer {
    fn remote(&self, addr: std::net::IpAddr, held_elsewhere: bool) {
        let r = if held_elsewhere {
            self.inner.add_remote(addr)
        } else {
            self.inner.remove_remote(addr)
        };
        if let Err(e) = r {
            self.report("route a user of another node", addr, &e);
        }
    }

    fn local(&self, addr: std::net::IpAddr) {
        if let Err(e) = self.inner.announce_local(addr) {
            self.report("announce a user's address (gratuitous ARP)", addr, &e);
        }
    }

    fn local_again(&self, addr: std::net::IpAddr) {
        // Once more, for a host that missed the first (ARP is unreliable).
        let _ = self.inner.announce_local(addr);
    }

    fn shutdown(&self) {
        self.clear();
    }
}
