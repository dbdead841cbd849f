//! [`EtcdStore`]: the [`StateStore`] a cluster of gateways shares, over
//! etcd v3 (the `etcd-client` crate, rustls with ring).
//!
//! Every key is stored as `<prefix>/<relative key>`; values are stored as
//! they are. The mapping of the contract:
//! - [`load`](StateStore::load): linearizable range reads of the prefix;
//!   the first one fixes the revision, later pages (1,000 records each)
//!   read at that revision, so the snapshot is one consistent revision
//!   however large. `written_at_unix` is 0: records carry their own times.
//! - [`commit`](StateStore::commit): one transaction. Each op's
//!   [`Expect`] becomes a compare (`Absent`: create revision 0, which is
//!   what etcd compares a missing key against; `At(r)`: mod revision `r`);
//!   the puts and deletes run when every compare holds, and otherwise the
//!   transaction reads the keys instead, so the conflict names the key and
//!   the revision found, at the revision the compares saw. etcd takes at
//!   most 128 ops per transaction by default (`--max-txn-ops`):
//!   [`max_commit_ops`](StateStore::max_commit_ops).
//! - [`watch`](StateStore::watch): an etcd watch on the prefix from
//!   `from + 1`; events are grouped by revision (a transaction's events
//!   share one), a compaction or a broken stream ends it with
//!   [`WatchEvent::Lost`].
//! - Node liveness: [`EtcdStore::keep_node_alive`] holds `nodes/<name>`
//!   under an etcd lease and keeps it alive ([`NodeLease`]).
//!
//! Every request is bounded by the request timeout; a transport error, a
//! timeout or an etcd refusal (permissions, no leader) is
//! [`StoreError::Unavailable`] with a message naming the endpoints
//! (`etcd at http://10.0.0.5:2379: connection refused`); a request etcd
//! finds malformed (too large, too many ops) is [`StoreError::Invalid`].
//! With several endpoints the client balances over them; a request that
//! could not be sent because one member refused the connection is sent
//! again (it cannot have been applied), so one member down costs nothing
//! but a reconnect.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KeyValue, KvClient, LeaseClient, LeaseKeepAliveStream, LeaseKeeper, PutOptions, TlsOptions,
    Txn, TxnOp, TxnOpResponse, WatchOptions, WatchStream,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::store::{
    validate_ops, Change, Expect, Key, Op, Record, Revision, Snapshot, StateStore, StoreError,
    WatchEvent,
};

/// Connection timeout when none is configured.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Request timeout when none is configured.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// etcd's default `--max-txn-ops`: the most ops one transaction may hold.
pub const ETCD_MAX_TXN_OPS: usize = 128;
/// Records per range read of a [`load`](StateStore::load).
const LOAD_PAGE: i64 = 1000;
/// Largest answer accepted (a page of large records; etcd's own request
/// limit is 1.5 MiB per record).
const MAX_MESSAGE: usize = 256 << 20;
/// Events a watch receiver may fall behind before the watch waits for it.
const WATCH_BUFFER: usize = 256;
/// Pause before sending a request again that never reached etcd.
const RESEND_PAUSE: Duration = Duration::from_millis(20);

/// How to reach etcd. Its `Debug` leaves the password out.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdOptions {
    /// `http://host:port` or `https://host:port` (all of one scheme).
    pub endpoints: Vec<String>,
    /// Key prefix of this gateway cluster (`/intragate`); a trailing `/`
    /// is ignored.
    pub prefix: String,
    /// CA certificate (PEM) that signed the etcd servers' certificates;
    /// required for `https` endpoints.
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
    /// User for etcd authentication.
    pub username: Option<String>,
    /// Its password.
    pub password: Option<String>,
    /// Bound on establishing a connection.
    pub connect_timeout: Duration,
    /// Bound on every request.
    pub request_timeout: Duration,
}

impl fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

impl EtcdOptions {
    /// Plain options: no TLS, no authentication, default timeouts.
    pub fn new(endpoints: Vec<String>, prefix: &str) -> Self {
        Self {
            endpoints,
            prefix: prefix.to_string(),
            ca: None,
            cert: None,
            key: None,
            username: None,
            password: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// The etcd store. Clones share one connection.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    kv: KvClient,
    /// Normalised: no trailing `/`.
    prefix: String,
    /// The endpoints, for messages.
    endpoints: String,
    endpoint_list: Vec<String>,
    request_timeout: Duration,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.inner.endpoints)
            .field("prefix", &self.inner.prefix)
            .finish()
    }
}

fn config_error(msg: String) -> StoreError {
    StoreError::Unavailable(io::Error::new(io::ErrorKind::InvalidInput, msg))
}

fn read_pem(what: &str, path: &Path) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|e| {
        config_error(format!(
            "cannot read the etcd {what} {}: {e}",
            path.display()
        ))
    })
}

impl EtcdStore {
    /// Connect and check that the prefix can be read (a linearizable read:
    /// it needs a quorum, the credentials and the permissions).
    pub async fn connect(opts: EtcdOptions) -> Result<Self, StoreError> {
        let prefix = opts.prefix.trim_end_matches('/').to_string();
        if prefix.is_empty() {
            return Err(config_error(
                "the etcd key prefix must not be empty (for example /intragate)".into(),
            ));
        }
        if opts.endpoints.is_empty() {
            return Err(config_error("no etcd endpoints given".into()));
        }
        let endpoints = opts.endpoints.join(",");
        let https = opts
            .endpoints
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        let http = opts
            .endpoints
            .iter()
            .filter(|e| e.starts_with("http://"))
            .count();
        if https + http != opts.endpoints.len() {
            return Err(config_error(format!(
                "etcd endpoints must be http://host:port or https://host:port: {endpoints}"
            )));
        }
        if https > 0 && http > 0 {
            return Err(config_error(format!(
                "etcd endpoints mix http and https: {endpoints}"
            )));
        }
        // No per-request timeout in the client: every call is bounded
        // here, so a timeout always says that the outcome is unknown.
        let mut co = ConnectOptions::new()
            .with_connect_timeout(opts.connect_timeout)
            // Dead peers (a silent partition) break streams instead of
            // stalling them: watches then report Lost.
            .with_keep_alive(opts.request_timeout, opts.request_timeout)
            // A member cut off from the leader refuses instead of
            // serving stale watches.
            .with_require_leader(true);
        match (&opts.username, &opts.password) {
            (Some(u), Some(p)) => {
                co = co
                    .with_user(u.clone(), p.clone())
                    .with_auto_token_refresh(true);
            }
            (None, None) => {}
            _ => {
                return Err(config_error(
                    "etcd authentication needs both a username and a password".into(),
                ))
            }
        }
        if https > 0 {
            let Some(ca) = &opts.ca else {
                return Err(config_error(format!(
                    "https etcd endpoints ({endpoints}) need the CA certificate that signed \
                     the etcd servers' certificates (ca)"
                )));
            };
            let mut tls = TlsOptions::new()
                .ca_certificate(Certificate::from_pem(read_pem("CA certificate", ca)?));
            match (&opts.cert, &opts.key) {
                (Some(c), Some(k)) => {
                    tls = tls.identity(Identity::from_pem(
                        read_pem("client certificate", c)?,
                        read_pem("client key", k)?,
                    ));
                }
                (None, None) => {}
                _ => {
                    return Err(config_error(
                        "an etcd client certificate needs both cert and key".into(),
                    ))
                }
            }
            co = co.with_tls(tls);
        } else if opts.ca.is_some() || opts.cert.is_some() || opts.key.is_some() {
            return Err(config_error(format!(
                "etcd TLS files (ca, cert, key) are given but the endpoints are not https: {endpoints}"
            )));
        }
        let bound = opts.connect_timeout + opts.request_timeout;
        let deadline = tokio::time::Instant::now() + bound;
        let client = loop {
            let connecting = Client::connect(&opts.endpoints, Some(co.clone()));
            match tokio::time::timeout_at(deadline, connecting).await {
                Ok(Ok(c)) => break c,
                // Authentication went to a member that refused the
                // connection: the others may answer.
                Ok(Err(e))
                    if not_sent(&e) && tokio::time::Instant::now() + RESEND_PAUSE < deadline =>
                {
                    tokio::time::sleep(RESEND_PAUSE).await;
                }
                Ok(Err(e)) => {
                    return Err(StoreError::Unavailable(io::Error::other(format!(
                        "etcd at {endpoints}: {}",
                        cause(&e)
                    ))))
                }
                Err(_) => {
                    return Err(StoreError::Unavailable(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "etcd at {endpoints}: no connection within {} s ({})",
                            bound.as_secs_f32(),
                            diagnose(&opts.endpoints, opts.connect_timeout).await
                        ),
                    )))
                }
            }
        };
        let kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
        let store = Self {
            inner: Arc::new(Inner {
                client,
                kv,
                prefix,
                endpoints,
                endpoint_list: opts.endpoints.clone(),
                request_timeout: opts.request_timeout,
            }),
        };
        let kv = store.inner.kv.clone();
        let probe = store.range_start();
        let opts = GetOptions::new()
            .with_range(store.range_end())
            .with_keys_only()
            .with_limit(1);
        store
            .call("connect", || {
                let (mut kv, probe, opts) = (kv.clone(), probe.clone(), opts.clone());
                async move { kv.get(probe, Some(opts)).await }
            })
            .await
            .map_err(|e| match e {
                // An etcd refusal at connection time (bad password,
                // permission) is not the caller's request being invalid.
                StoreError::Invalid(msg) => StoreError::Unavailable(io::Error::other(msg)),
                StoreError::Unavailable(io)
                    if https > 0 && !io.to_string().contains("etcdserver:") =>
                {
                    StoreError::Unavailable(io::Error::new(
                        io.kind(),
                        format!(
                            "{io}; with TLS, check the CA (ca) and the client certificate and \
                             key (cert, key: etcd with --client-cert-auth requires them)"
                        ),
                    ))
                }
                e => e,
            })?;
        info!(store = %store.describe(), "connected to etcd");
        Ok(store)
    }

    /// The key prefix (normalised: no trailing `/`).
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The etcd client (tests: compaction, members, auth setup).
    pub fn client(&self) -> Client {
        self.inner.client.clone()
    }

    fn full_key(&self, key: &Key) -> String {
        format!("{}/{}", self.inner.prefix, key.0)
    }

    /// First key of the prefix range (`<prefix>/`).
    fn range_start(&self) -> String {
        format!("{}/", self.inner.prefix)
    }

    /// End of the prefix range (exclusive).
    fn range_end(&self) -> Vec<u8> {
        prefix_end(self.range_start().as_bytes())
    }

    /// The relative key of a stored key (`None`: not under the prefix, or
    /// not UTF-8).
    fn relative(&self, full: &[u8]) -> Option<Key> {
        let rest = full.strip_prefix(self.range_start().as_bytes())?;
        std::str::from_utf8(rest).ok().map(Key::new)
    }

    fn record(&self, kv: &KeyValue) -> Option<Record> {
        let Some(key) = self.relative(kv.key()) else {
            warn!(key = %String::from_utf8_lossy(kv.key()), "skipping an etcd key that is not UTF-8");
            return None;
        };
        Some(Record {
            key,
            value: kv.value().to_vec(),
            revision: rev(kv.mod_revision()),
        })
    }

    /// Run one etcd request within the request timeout, mapping errors.
    async fn call<T, F, Fut>(&self, what: &str, attempt: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.inner.call(what, attempt).await
    }

    /// Run a request on an open stream (no second attempt), within the
    /// request timeout.
    async fn once<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.inner.request_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.inner.error(what, &e)),
            Err(_) => Err(self.inner.no_answer(what).await),
        }
    }

    /// Hold `nodes/<name>` (with `value`) under an etcd lease of `ttl` and
    /// keep it alive: keep-alives every `ttl / 3`; when the lease was lost
    /// (etcd unreachable for longer than `ttl`, then back) a new lease is
    /// granted and the record written again. [`NodeLease::valid_until`]
    /// says until when the lease is known to hold; dropping the
    /// [`NodeLease`] or [`NodeLease::shutdown`] revokes it (the record
    /// goes).
    ///
    /// Fails with [`StoreError::Conflict`] when `nodes/<name>` is held by
    /// another lease: another live node has this name, or a previous run
    /// of this node that did not shut down cleanly holds it until its
    /// lease expires (at most its TTL): retry after that.
    pub async fn keep_node_alive(
        &self,
        name: &str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<NodeLease, StoreError> {
        let key = Key::node(name);
        key.check().map_err(StoreError::Invalid)?;
        let ttl_secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let node = NodeTask {
            store: self.clone(),
            key,
            value,
            ttl_secs,
            period: (ttl / 3).max(Duration::from_millis(100)),
        };
        let registered = node.register().await?;
        let (state_tx, state_rx) = watch::channel(registered.state());
        let stop = CancellationToken::new();
        let task = tokio::spawn(node.run(registered, state_tx, stop.clone()));
        Ok(NodeLease {
            state: state_rx,
            stop,
            task: Some(task),
        })
    }
}

impl Inner {
    /// Run one etcd request (`attempt` makes it) within the request
    /// timeout, mapping errors. An attempt that never reached etcd (the
    /// connection to one endpoint was refused: the balancer hands a dead
    /// member's connect error to one request) is made again, so a member
    /// down does not fail requests the others can serve.
    async fn call<T, F, Fut>(&self, what: &str, mut attempt: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        // Enough for the balancer to find a live member, few enough to
        // report a dead single endpoint at once.
        let mut attempts_left = 4 * self.endpoint_list.len().max(1);
        let mut last_refusal = None;
        loop {
            attempts_left -= 1;
            match tokio::time::timeout_at(deadline, attempt()).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if not_sent(&e) => {
                    if attempts_left == 0 || tokio::time::Instant::now() + RESEND_PAUSE >= deadline
                    {
                        return Err(self.error(what, &e));
                    }
                    debug!(what, error = %cause(&e), "etcd request not sent; trying again");
                    last_refusal = Some(e);
                    tokio::time::sleep(RESEND_PAUSE).await;
                }
                Ok(Err(e)) => return Err(self.error(what, &e)),
                Err(_) => {
                    return Err(match &last_refusal {
                        Some(e) => self.error(what, e),
                        None => self.no_answer(what).await,
                    })
                }
            }
        }
    }

    /// The error for a request that got no answer in time.
    async fn no_answer(&self, what: &str) -> StoreError {
        StoreError::Unavailable(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "etcd at {}: no answer to {what} within {} s ({}); the outcome is unknown",
                self.endpoints,
                self.request_timeout.as_secs_f32(),
                diagnose(&self.endpoint_list, self.request_timeout).await
            ),
        ))
    }

    fn error(&self, what: &str, e: &etcd_client::Error) -> StoreError {
        let msg = format!("etcd at {}: {} ({what})", self.endpoints, cause(e));
        match e {
            // etcd refused the request itself (too many ops, too large, a
            // key twice): retrying cannot help.
            etcd_client::Error::GRpcStatus(s) if s.code() as i32 == GRPC_INVALID_ARGUMENT => {
                StoreError::Invalid(msg)
            }
            _ => StoreError::Unavailable(io::Error::other(msg)),
        }
    }
}

/// gRPC status code INVALID_ARGUMENT (grpc/doc/statuscodes.md).
const GRPC_INVALID_ARGUMENT: i32 = 3;

/// etcd revisions are positive i64s.
fn rev(r: i64) -> Revision {
    Revision::try_from(r).unwrap_or(0)
}

/// etcd's revision for ours (saturating: revisions never get that far).
fn etcd_rev(r: Revision) -> i64 {
    i64::try_from(r).unwrap_or(i64::MAX)
}

/// The first key after every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: to the end of the key space.
    vec![0]
}

/// The error and its sources, outermost first.
fn chain(e: &etcd_client::Error) -> Vec<&(dyn std::error::Error + 'static)> {
    use std::error::Error as _;
    let mut out = Vec::new();
    let mut src: Option<&(dyn std::error::Error + 'static)> = match e {
        etcd_client::Error::GRpcStatus(s) => s.source(),
        etcd_client::Error::TransportError(t) => t.source(),
        etcd_client::Error::IoError(i) => i.source(),
        _ => None,
    };
    while let Some(s) = src {
        out.push(s);
        src = s.source();
    }
    out
}

/// Did the request certainly not reach etcd (no connection could be
/// made)? Then sending it again cannot apply it twice.
fn not_sent(e: &etcd_client::Error) -> bool {
    if let etcd_client::Error::IoError(io) = e {
        return io.kind() == io::ErrorKind::ConnectionRefused;
    }
    chain(e).iter().any(|s| {
        s.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::ConnectionRefused)
            || s.to_string().starts_with("tcp connect error")
    })
}

/// A readable cause: the innermost messages of the error chain
/// ("connection refused", "etcdserver: permission denied").
fn cause(e: &etcd_client::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let top = match e {
        etcd_client::Error::GRpcStatus(s) => {
            let m = s.message();
            if m.is_empty() {
                format!("{:?}", s.code())
            } else {
                m.to_string()
            }
        }
        other => other.to_string(),
    };
    parts.push(top);
    for s in chain(e) {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            parts.push(io_text(io));
        } else {
            parts.push(s.to_string());
        }
    }
    parts.dedup();
    let last = parts.pop().unwrap_or_default();
    // The most specific part, with the one before it when that adds
    // context ("tcp connect error: connection refused" → the latter).
    match parts.pop() {
        Some(before) if !last.contains("refused") && !before.contains(&last) => {
            format!("{before}: {last}")
        }
        _ => last,
    }
}

fn io_text(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "connection reset".into(),
        io::ErrorKind::TimedOut => "timed out".into(),
        _ => e.to_string(),
    }
}

/// When etcd does not answer: what a plain TCP connection to each
/// endpoint says ("127.0.0.1:2379: connection refused").
async fn diagnose(endpoints: &[String], bound: Duration) -> String {
    let mut out = Vec::new();
    for e in endpoints {
        let hostport = e
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/');
        let r = tokio::time::timeout(bound, tokio::net::TcpStream::connect(hostport)).await;
        out.push(match r {
            Ok(Ok(_)) => format!("{hostport}: accepts connections but does not answer"),
            Ok(Err(e)) => format!("{hostport}: {}", io_text(&e)),
            Err(_) => format!("{hostport}: connection timed out"),
        });
    }
    out.join("; ")
}

#[async_trait]
impl StateStore for EtcdStore {
    async fn load(&self, _discard_unusable: bool) -> Result<Snapshot, StoreError> {
        let kv = self.inner.kv.clone();
        let end = self.range_end();
        let mut from = self.range_start().into_bytes();
        let mut revision = 0i64;
        let mut records = Vec::new();
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LOAD_PAGE);
            if revision > 0 {
                // Later pages at the first page's revision: one snapshot.
                opts = opts.with_revision(revision);
            }
            let resp = self
                .call("load", || {
                    let (mut kv, from, opts) = (kv.clone(), from.clone(), opts.clone());
                    async move { kv.get(from, Some(opts)).await }
                })
                .await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            records.extend(resp.kvs().iter().filter_map(|kv| self.record(kv)));
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        debug!(
            records = records.len(),
            revision, "loaded the state from etcd"
        );
        Ok(Snapshot {
            revision: rev(revision),
            records,
            written_at_unix: 0,
            source: "etcd",
        })
    }

    async fn read(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        key.check().map_err(StoreError::Invalid)?;
        let kv = self.inner.kv.clone();
        let full = self.full_key(key);
        let resp = self
            .call("read", || {
                let (mut kv, full) = (kv.clone(), full.clone());
                async move { kv.get(full, None).await }
            })
            .await?;
        Ok(resp.kvs().first().and_then(|kv| self.record(kv)))
    }

    async fn commit(&self, ops: Vec<Op>, _now_unix: u64) -> Result<Revision, StoreError> {
        validate_ops(&ops, Some(ETCD_MAX_TXN_OPS))?;
        let mut compares = Vec::with_capacity(ops.len());
        let mut writes = Vec::with_capacity(ops.len());
        // Keys read when a compare fails, each once, in op order.
        let mut read_back: Vec<&Key> = Vec::new();
        for op in &ops {
            let full = self.full_key(op.key());
            match op.expect() {
                Expect::Absent => {
                    compares.push(Compare::create_revision(full.clone(), CompareOp::Equal, 0))
                }
                Expect::At(r) => {
                    compares.push(Compare::mod_revision(
                        full.clone(),
                        CompareOp::Equal,
                        etcd_rev(r),
                    ));
                    if r == 0 {
                        // A missing key compares as revision 0: At(0)
                        // must still fail.
                        compares.push(Compare::create_revision(
                            full.clone(),
                            CompareOp::Greater,
                            0,
                        ));
                    }
                }
            }
            match op {
                Op::Put { value, .. } => writes.push(TxnOp::put(full, value.clone(), None)),
                Op::Delete { .. } => writes.push(TxnOp::delete(full, None)),
                Op::Check { .. } => {}
            }
            if !read_back.contains(&op.key()) {
                read_back.push(op.key());
            }
        }
        let reads: Vec<TxnOp> = read_back
            .iter()
            .map(|k| TxnOp::get(self.full_key(k), None))
            .collect();
        let txn = Txn::new().when(compares).and_then(writes).or_else(reads);
        let kv = self.inner.kv.clone();
        let resp = self
            .call("commit", || {
                let (mut kv, txn) = (kv.clone(), txn.clone());
                async move { kv.txn(txn).await }
            })
            .await?;
        let revision = rev(resp.header().map_or(0, |h| h.revision()));
        if resp.succeeded() {
            return Ok(revision);
        }
        // What each key held when the compares failed.
        let found: Vec<Option<Revision>> = resp
            .op_responses()
            .into_iter()
            .map(|r| match r {
                TxnOpResponse::Get(g) => g.kvs().first().map(|kv| rev(kv.mod_revision())),
                _ => None,
            })
            .collect();
        let found_of = |key: &Key| {
            read_back
                .iter()
                .position(|k| *k == key)
                .and_then(|i| found.get(i).copied().flatten())
        };
        let failed = ops
            .iter()
            .find(|op| !op.expect().holds(found_of(op.key())))
            .or(ops.first());
        match failed {
            Some(op) => Err(StoreError::Conflict {
                key: op.key().clone(),
                expected: op.expect(),
                found: found_of(op.key()),
            }),
            // No ops: the transaction had no compares; it cannot fail.
            None => Ok(revision),
        }
    }

    async fn watch(&self, from: Revision) -> Result<mpsc::Receiver<WatchEvent>, StoreError> {
        let client = self.inner.client.watch_client();
        let opts = WatchOptions::new()
            .with_range(self.range_end())
            .with_start_revision(etcd_rev(from.saturating_add(1)));
        let mut stream = self
            .call("watch", || {
                let (mut client, opts, start) = (client.clone(), opts.clone(), self.range_start());
                async move { client.watch(start, Some(opts)).await }
            })
            .await?;
        // The first answer confirms the watch (or cancels it at once).
        let first = self.once("watch", stream.message()).await?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let store = self.clone();
        tokio::spawn(async move {
            if let Some(reason) = store.follow(first, stream, from, &tx).await {
                debug!(%reason, "etcd watch lost");
                let _ = tx.send(WatchEvent::Lost { reason }).await;
            }
        });
        Ok(rx)
    }

    fn max_commit_ops(&self) -> Option<usize> {
        Some(ETCD_MAX_TXN_OPS)
    }

    fn describe(&self) -> String {
        format!("etcd {} prefix {}", self.inner.endpoints, self.inner.prefix)
    }
}

impl EtcdStore {
    /// Hand the watch's events on until it ends; returns why it was lost
    /// (`None`: the receiver went away).
    async fn follow(
        &self,
        first: Option<etcd_client::WatchResponse>,
        mut stream: WatchStream,
        from: Revision,
        tx: &mpsc::Sender<WatchEvent>,
    ) -> Option<String> {
        let mut next = first;
        let mut delivered = from;
        loop {
            let Some(resp) = next.take() else {
                return Some(format!(
                    "etcd at {} closed the watch stream",
                    self.inner.endpoints
                ));
            };
            if resp.compact_revision() > 0 {
                return Some(format!(
                    "etcd compacted its history up to revision {}; the watch wanted the \
                     changes after {from}",
                    resp.compact_revision()
                ));
            }
            if resp.canceled() {
                let why = resp.cancel_reason();
                return Some(format!(
                    "etcd at {} canceled the watch: {}",
                    self.inner.endpoints,
                    if why.is_empty() {
                        "no reason given"
                    } else {
                        why
                    }
                ));
            }
            for event in self.batches(&resp, delivered) {
                if let WatchEvent::Changes { revision, .. } = &event {
                    delivered = *revision;
                }
                if tx.send(event).await.is_err() {
                    return None;
                }
            }
            tokio::select! {
                _ = tx.closed() => return None,
                msg = stream.message() => match msg {
                    Ok(m) => next = m,
                    Err(e) => {
                        return Some(format!(
                            "etcd at {}: the watch stream broke: {}",
                            self.inner.endpoints,
                            cause(&e)
                        ))
                    }
                },
            }
        }
    }

    /// A response's events as one batch per revision (after `after`).
    fn batches(&self, resp: &etcd_client::WatchResponse, after: Revision) -> Vec<WatchEvent> {
        let mut out: Vec<WatchEvent> = Vec::new();
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let revision = rev(kv.mod_revision());
            if revision <= after {
                continue;
            }
            let Some(key) = self.relative(kv.key()) else {
                continue;
            };
            let change = match ev.event_type() {
                EventType::Put => Change::Put(Record {
                    key,
                    value: kv.value().to_vec(),
                    revision,
                }),
                EventType::Delete => Change::Delete { key, revision },
            };
            match out.last_mut() {
                Some(WatchEvent::Changes {
                    revision: r,
                    changes,
                }) if *r == revision => changes.push(change),
                _ => out.push(WatchEvent::Changes {
                    revision,
                    changes: vec![change],
                }),
            }
        }
        out
    }
}

/// What a [`NodeLease`] knows about its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaseState {
    /// Until when the lease certainly holds (its TTL counted from the
    /// moment the last successful grant or keep-alive was sent); `None`:
    /// no lease (lost, not granted again yet, or shut down).
    pub valid_until: Option<Instant>,
    /// The revision of the `nodes/<name>` record written under the
    /// current lease: an [`Op::Check`] on it makes a commit hold only
    /// while this node's record is the one it wrote.
    pub revision: Option<Revision>,
    /// The etcd lease id.
    pub lease_id: Option<i64>,
}

impl LeaseState {
    /// Does the lease certainly hold at `now`?
    pub fn is_valid(&self, now: Instant) -> bool {
        self.valid_until.is_some_and(|t| now < t)
    }
}

/// A node's liveness record kept alive by a background task (see
/// [`EtcdStore::keep_node_alive`]). Dropping it revokes the lease in the
/// background; [`shutdown`](NodeLease::shutdown) revokes and waits.
#[derive(Debug)]
pub struct NodeLease {
    state: watch::Receiver<LeaseState>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl NodeLease {
    /// Until when the lease certainly holds (`None`: it does not).
    pub fn valid_until(&self) -> Option<Instant> {
        self.state.borrow().valid_until
    }

    /// Does the lease certainly hold at `now`? A node stops acting for
    /// its sessions before this turns false.
    pub fn is_valid(&self, now: Instant) -> bool {
        self.state.borrow().is_valid(now)
    }

    /// The current state.
    pub fn state(&self) -> LeaseState {
        *self.state.borrow()
    }

    /// Follow the state (it changes at every renewal, loss and re-grant).
    pub fn subscribe(&self) -> watch::Receiver<LeaseState> {
        self.state.clone()
    }

    /// Stop the keep-alives and revoke the lease (the node record goes at
    /// once instead of after the TTL).
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl NodeLease {
    /// Stop the keep-alives without revoking, as a crash does: the lease
    /// and the node's record expire after the TTL (benchmarks and tests
    /// of failover).
    pub fn abandon(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for NodeLease {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The keep-alive task's fixed parts.
struct NodeTask {
    store: EtcdStore,
    key: Key,
    value: Vec<u8>,
    ttl_secs: i64,
    period: Duration,
}

/// A lease held, with its node record.
struct Held {
    id: i64,
    revision: Revision,
    valid_until: Instant,
    keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
}

impl Held {
    fn state(&self) -> LeaseState {
        LeaseState {
            valid_until: Some(self.valid_until),
            revision: Some(self.revision),
            lease_id: Some(self.id),
        }
    }
}

/// What a keep-alive found.
enum Renewal {
    /// Renewed for this TTL (seconds), counted from the send.
    Renewed(i64),
    /// The lease is gone (it expired while etcd could not be reached).
    Expired,
}

impl NodeTask {
    fn lease_client(&self) -> LeaseClient {
        self.store.inner.client.lease_client()
    }

    /// Grant a lease and create the node record under it.
    async fn register(&self) -> Result<Held, StoreError> {
        let sent = Instant::now();
        let leases = self.lease_client();
        let grant = self
            .store
            .call("lease grant", || {
                let mut leases = leases.clone();
                async move { leases.grant(self.ttl_secs, None).await }
            })
            .await?;
        let id = grant.id();
        let ttl = grant.ttl().clamp(1, self.ttl_secs.max(1));
        let full = self.store.full_key(&self.key);
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                full.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(
                full.clone(),
                self.value.clone(),
                Some(PutOptions::new().with_lease(id)),
            )])
            .or_else(vec![TxnOp::get(full, None)]);
        let kv = self.store.inner.kv.clone();
        let attempt = || {
            let (mut kv, txn) = (kv.clone(), txn.clone());
            async move { kv.txn(txn).await }
        };
        let resp = match self.store.call("node record", attempt).await {
            Ok(r) => r,
            Err(e) => {
                self.revoke(id).await;
                return Err(e);
            }
        };
        let revision = rev(resp.header().map_or(0, |h| h.revision()));
        if !resp.succeeded() {
            self.revoke(id).await;
            let found = resp.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(g) => g.kvs().first().map(|kv| rev(kv.mod_revision())),
                _ => None,
            });
            return Err(StoreError::Conflict {
                key: self.key.clone(),
                expected: Expect::Absent,
                found,
            });
        }
        Ok(Held {
            id,
            revision,
            valid_until: sent + Duration::from_secs(ttl.unsigned_abs()),
            keeper: None,
        })
    }

    async fn revoke(&self, id: i64) {
        let leases = self.lease_client();
        let attempt = || {
            let mut leases = leases.clone();
            async move { leases.revoke(id).await }
        };
        if let Err(e) = self.store.call("lease revoke", attempt).await {
            warn!(key = %self.key, error = %e, "cannot revoke the node lease; it expires by itself");
        }
    }

    /// One keep-alive round trip.
    async fn renew(&self, held: &mut Held) -> Result<Renewal, StoreError> {
        let Some((keeper, stream)) = held.keeper.as_mut() else {
            // Opening the keep-alive stream renews once (and says when
            // the lease is gone).
            let leases = self.lease_client();
            return match self
                .store
                .call("lease keep-alive", || {
                    let (mut leases, id) = (leases.clone(), held.id);
                    async move { leases.keep_alive(id).await }
                })
                .await
            {
                Ok(k) => {
                    held.keeper = Some(k);
                    Ok(Renewal::Renewed(self.ttl_secs))
                }
                Err(e) if e.to_string().contains("lease not found") => Ok(Renewal::Expired),
                Err(e) => Err(e),
            };
        };
        let round = async {
            keeper.keep_alive().await?;
            stream.message().await
        };
        let res = self.store.once("lease keep-alive", round).await;
        match res {
            Ok(Some(r)) if r.ttl() > 0 => Ok(Renewal::Renewed(r.ttl())),
            Ok(Some(_)) => Ok(Renewal::Expired),
            Ok(None) => {
                held.keeper = None;
                Err(StoreError::Unavailable(io::Error::other(format!(
                    "etcd at {}: the lease keep-alive stream closed",
                    self.store.inner.endpoints
                ))))
            }
            Err(e) => {
                held.keeper = None;
                Err(e)
            }
        }
    }

    /// Register again after the lease was lost; `Some` when it worked.
    async fn reregister(&self, failing: &mut bool) -> Option<Held> {
        match self.register().await {
            Ok(h) => {
                info!(key = %self.key, "node record written again under a new lease");
                *failing = false;
                Some(h)
            }
            Err(e) => {
                if !*failing {
                    error!(key = %self.key, error = %e, "cannot write the node record again; retrying");
                }
                *failing = true;
                None
            }
        }
    }

    async fn run(self, first: Held, state: watch::Sender<LeaseState>, stop: CancellationToken) {
        let mut held = Some(first);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(self.period) => {}
            }
            let sent = Instant::now();
            let Some(h) = held.as_mut() else {
                held = self.reregister(&mut failing).await;
                if let Some(h) = &held {
                    state.send_replace(h.state());
                }
                continue;
            };
            match self.renew(h).await {
                Ok(Renewal::Renewed(ttl)) => {
                    h.valid_until = sent + Duration::from_secs(ttl.unsigned_abs());
                    if failing {
                        info!(key = %self.key, "node lease renewed again");
                        failing = false;
                    }
                    state.send_replace(h.state());
                }
                Ok(Renewal::Expired) => {
                    error!(
                        key = %self.key,
                        "the node lease expired (etcd could not be reached in time); \
                         granting a new one"
                    );
                    state.send_replace(LeaseState::default());
                    held = self.reregister(&mut failing).await;
                    if let Some(h) = &held {
                        state.send_replace(h.state());
                    }
                }
                Err(e) => {
                    if !failing {
                        let left = h.valid_until.saturating_duration_since(Instant::now());
                        warn!(
                            key = %self.key,
                            error = %e,
                            valid_for_ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
                            "cannot renew the node lease"
                        );
                    }
                    failing = true;
                    if Instant::now() >= h.valid_until {
                        state.send_replace(LeaseState {
                            valid_until: None,
                            ..h.state()
                        });
                    }
                }
            }
        }
        if let Some(h) = held {
            drop(h.keeper);
            self.revoke(h.id).await;
        }
        state.send_replace(LeaseState::default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/intragate/"), b"/intragate0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[tokio::test]
    async fn configuration_errors_are_clear() {
        let http = || vec!["http://127.0.0.1:1".to_string()];
        let https = || vec!["https://127.0.0.1:1".to_string()];
        let cases: Vec<(EtcdOptions, &str)> = vec![
            (EtcdOptions::new(vec![], "/x"), "no etcd endpoints"),
            (EtcdOptions::new(http(), "/"), "prefix must not be empty"),
            (
                EtcdOptions::new(vec!["127.0.0.1:2379".into()], "/x"),
                "must be http://host:port",
            ),
            (
                EtcdOptions::new(
                    vec!["http://127.0.0.1:1".into(), "https://127.0.0.1:2".into()],
                    "/x",
                ),
                "mix http and https",
            ),
            (EtcdOptions::new(https(), "/x"), "need the CA certificate"),
            (
                EtcdOptions {
                    ca: Some("/nonexistent/ca.pem".into()),
                    ..EtcdOptions::new(http(), "/x")
                },
                "not https",
            ),
            (
                EtcdOptions {
                    ca: Some("/nonexistent/ca.pem".into()),
                    ..EtcdOptions::new(https(), "/x")
                },
                "cannot read the etcd CA certificate /nonexistent/ca.pem",
            ),
            (
                EtcdOptions {
                    username: Some("u".into()),
                    ..EtcdOptions::new(http(), "/x")
                },
                "both a username and a password",
            ),
        ];
        for (opts, want) in cases {
            let e = EtcdStore::connect(opts).await.expect_err("refused");
            assert!(e.to_string().contains(want), "{e} should say {want}");
        }
    }

    #[tokio::test]
    async fn unreachable_etcd_is_unavailable_and_says_why() {
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let url = format!("http://127.0.0.1:{port}");
        let opts = EtcdOptions {
            connect_timeout: Duration::from_millis(500),
            request_timeout: Duration::from_millis(500),
            ..EtcdOptions::new(vec![url.clone()], "/intragate")
        };
        let t0 = Instant::now();
        let e = EtcdStore::connect(opts).await.expect_err("nothing there");
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("etcd at {url}")) && msg.contains("connection refused"),
            "{msg}"
        );
        assert!(t0.elapsed() < Duration::from_secs(5), "bounded");
    }

    use crate::state::etcd_test_util::{require_etcd, EtcdCluster};

    fn put(key: &Key, v: &str) -> Op {
        Op::Put {
            key: key.clone(),
            value: v.as_bytes().to_vec(),
            expect: Expect::Absent,
        }
    }

    /// Wait (bounded) until `cond` holds.
    async fn eventually(what: &str, bound: Duration, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + bound;
        while !cond() {
            assert!(Instant::now() < deadline, "{what}: not within {bound:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watch_is_lost_when_etcd_goes_and_resumes_after_a_reload() {
        if !require_etcd() {
            return;
        }
        let mut etcd = EtcdCluster::start().await.expect("etcd");
        let store = EtcdStore::connect(etcd.options("/w"))
            .await
            .expect("connect");
        let r1 = store
            .commit(vec![put(&Key::node("a"), "1")], 1)
            .await
            .expect("commit");
        let mut w = store.watch(r1).await.expect("watch");
        etcd.stop_member(0);
        let ev = tokio::time::timeout(Duration::from_secs(15), w.recv())
            .await
            .expect("Lost in time");
        match ev {
            Some(WatchEvent::Lost { reason }) => {
                eprintln!("lost: {reason}");
                assert!(reason.contains("etcd at http://127.0.0.1:"), "{reason}");
            }
            other => panic!("expected Lost, got {other:?}"),
        }
        assert!(w.recv().await.is_none(), "closed after Lost");
        // While etcd is down: Unavailable, with the reason.
        let e = store.load(false).await.expect_err("down");
        eprintln!("load while down: {e}");
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        assert!(e.to_string().contains("connection refused"), "{e}");
        let e = store
            .commit(vec![put(&Key::node("b"), "1")], 1)
            .await
            .expect_err("down");
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        // Back: load, watch from the snapshot, nothing missed.
        etcd.restart_member(0).await.expect("restart");
        let snap = store.load(false).await.expect("load again");
        assert_eq!(snap.records.len(), 1);
        let mut w = store.watch(snap.revision).await.expect("watch again");
        let r2 = store
            .commit(vec![put(&Key::node("b"), "1")], 1)
            .await
            .expect("commit again");
        match tokio::time::timeout(Duration::from_secs(10), w.recv()).await {
            Ok(Some(WatchEvent::Changes { revision, changes })) => {
                assert_eq!(revision, r2);
                assert_eq!(changes.len(), 1);
            }
            other => panic!("expected the new commit, got {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn authentication_by_user_and_password() {
        if !require_etcd() {
            return;
        }
        let etcd = EtcdCluster::start().await.expect("etcd");
        let mut c = etcd.client().await;
        c.user_add("root", "root-secret", None).await.expect("root");
        c.user_grant_role("root", "root").await.expect("root role");
        c.user_add("gw", "gw-secret", None).await.expect("gw");
        c.role_add("intragate").await.expect("role");
        c.role_grant_permission(
            "intragate",
            etcd_client::Permission::read_write("/gw/").with_prefix(),
        )
        .await
        .expect("permission");
        c.user_grant_role("gw", "intragate").await.expect("gw role");
        c.auth_enable().await.expect("auth on");

        let with = |user: Option<&str>, pass: Option<&str>, prefix: &str| EtcdOptions {
            username: user.map(str::to_string),
            password: pass.map(str::to_string),
            ..etcd.options(prefix)
        };
        let store = EtcdStore::connect(with(Some("gw"), Some("gw-secret"), "/gw"))
            .await
            .expect("connect as gw");
        store
            .commit(vec![put(&Key::node("a"), "1")], 1)
            .await
            .expect("commit as gw");
        let e = EtcdStore::connect(with(Some("gw"), Some("wrong"), "/gw"))
            .await
            .expect_err("wrong password");
        eprintln!("wrong password: {e}");
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        assert!(e.to_string().contains("authentication failed"), "{e}");
        // A prefix the user may not read.
        let e = EtcdStore::connect(with(Some("gw"), Some("gw-secret"), "/other"))
            .await
            .expect_err("no permission");
        eprintln!("no permission: {e}");
        assert!(e.to_string().contains("permission denied"), "{e}");
        let e = EtcdStore::connect(with(None, None, "/gw"))
            .await
            .expect_err("anonymous");
        eprintln!("anonymous: {e}");
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn node_lease_lives_is_regranted_and_revoked() {
        if !require_etcd() {
            return;
        }
        let mut etcd = EtcdCluster::start().await.expect("etcd");
        let store = EtcdStore::connect(etcd.options("/nodes"))
            .await
            .expect("connect");
        let ttl = Duration::from_secs(2);
        let t0 = Instant::now();
        let lease = store
            .keep_node_alive("gw1", b"{\"addr\":\"198.18.0.1\"}".to_vec(), ttl)
            .await
            .expect("lease");
        let first = lease.state();
        assert!(lease.is_valid(Instant::now()));
        let until = lease.valid_until().expect("valid");
        assert!(
            until > t0 && until <= Instant::now() + ttl,
            "bounded by the TTL"
        );
        let rec = store
            .read(&Key::node("gw1"))
            .await
            .expect("read")
            .expect("node record");
        assert_eq!(rec.value, b"{\"addr\":\"198.18.0.1\"}");
        assert_eq!(Some(rec.revision), first.revision);
        // The name is taken while the lease lives.
        let e = store
            .keep_node_alive("gw1", b"{}".to_vec(), ttl)
            .await
            .expect_err("taken");
        assert!(
            matches!(&e, StoreError::Conflict { key, .. } if key.0 == "nodes/gw1"),
            "{e}"
        );
        // Keep-alives carry it well past its TTL.
        tokio::time::sleep(ttl * 2).await;
        assert!(lease.is_valid(Instant::now()));
        assert!(lease.valid_until().expect("valid") > until);
        assert_eq!(lease.state().lease_id, first.lease_id);

        // The lease disappears (as when it expired while etcd was out of
        // reach): a new one is granted and the record written again.
        let mut c = etcd.client().await;
        c.lease_revoke(first.lease_id.expect("id"))
            .await
            .expect("revoke");
        let mut states = lease.subscribe();
        tokio::time::timeout(
            Duration::from_secs(10),
            states.wait_for(|s| s.lease_id.is_some() && s.lease_id != first.lease_id),
        )
        .await
        .expect("re-granted in time")
        .expect("state");
        let again = lease.state();
        let rec = store
            .read(&Key::node("gw1"))
            .await
            .expect("read")
            .expect("node record again");
        assert_eq!(Some(rec.revision), again.revision);
        assert!(again.revision > first.revision);

        // etcd down: the validity lapses and is not extended; back: valid.
        etcd.stop_member(0);
        let lapse = lease.valid_until().expect("valid");
        eventually("lease invalid while etcd is down", ttl * 3, || {
            !lease.is_valid(Instant::now())
        })
        .await;
        assert!(lease.valid_until().is_none_or(|t| t <= lapse));
        etcd.restart_member(0).await.expect("restart");
        eventually("lease valid again", Duration::from_secs(15), || {
            lease.is_valid(Instant::now())
        })
        .await;
        assert!(store.read(&Key::node("gw1")).await.expect("read").is_some());

        // Shutdown revokes: the record goes at once.
        lease.shutdown().await;
        assert_eq!(store.read(&Key::node("gw1")).await.expect("read"), None);
        // Dropping a lease revokes it too (in the background).
        let lease = store
            .keep_node_alive("gw1", b"{}".to_vec(), ttl)
            .await
            .expect("free again");
        drop(lease);
        let deadline = Instant::now() + Duration::from_secs(5);
        while store.read(&Key::node("gw1")).await.expect("read").is_some() {
            assert!(Instant::now() < deadline, "revoked after drop");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
