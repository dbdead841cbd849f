//! RADIUS accounting (RFC 2866): Start when a session opens, an
//! Interim-Update every `interim_interval`, Stop when it closes.
//!
//! Which sessions: those RADIUS authenticated; every session when
//! `account_all = true` (local, LDAP and certificate users too, with
//! `Acct-Authentic = Local`).
//!
//! Records go through a bounded queue to one task, which sends each on its
//! own (at most [`MAX_IN_FLIGHT`] at a time) to the accounting servers in
//! order, each with the configured tries; a record no server acknowledged
//! is sent again after a pause (5 s, doubling, at most 60 s), with
//! `Acct-Delay-Time` telling the server how late it is, for
//! [`GIVE_UP_AFTER`]; then it is given up on (counted and logged). A full
//! queue drops the record (counted and logged). Nothing here waits on the
//! data path: the packet path only increments the session's counters
//! ([`crate::stats::Traffic`]).
//!
//! Not persisted: after a restart, sessions resumed from the state file
//! are not accounted again (no Stop is sent for them).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::codec::{self, attr};
use super::{exchange, RadiusCounters};
use crate::auth::Identity;
use crate::config::RadiusSettings;
use crate::core::ids::SessionId;
use crate::core::session::CloseReason;
use crate::stats::Traffic;

/// Records waiting to be sent.
pub(super) const QUEUE: usize = 4096;
/// Records being sent at once.
pub(super) const MAX_IN_FLIGHT: usize = 32;
/// How long a record is retried.
pub(super) const GIVE_UP_AFTER: Duration = Duration::from_secs(600);

/// Acct-Terminate-Cause (RFC 2866 §5.10) of a close reason.
///
/// Logoff, a logoff from another device → User-Request (1); idle →
/// Idle-Timeout (4); session lifetime → Session-Timeout (5); an
/// administrator, a revoked account → Admin-Reset (6); a transfer to a
/// new logon or a superseded logon → User-Request (the user chose it);
/// the tunnel not back within the reconnect window, or never connected →
/// Lost-Carrier (2); shutdown → NAS-Reboot (11); moved to another node of
/// the cluster → NAS-Request (10).
pub fn terminate_cause(r: &CloseReason) -> u32 {
    match r {
        CloseReason::Logoff | CloseReason::UserRequest => 1,
        CloseReason::Transferred | CloseReason::Superseded => 1,
        CloseReason::ReconnectWindowExpired | CloseReason::NeverConnected => 2,
        CloseReason::IdleTimeout => 4,
        CloseReason::SessionTimeout => 5,
        CloseReason::Admin(_) | CloseReason::Revoked(_) => 6,
        CloseReason::Moved | CloseReason::ClaimLost => 10,
        CloseReason::Shutdown => 11,
    }
}

/// Counters of accounting.
#[derive(Debug, Default)]
pub struct AcctCounters {
    /// Records a server acknowledged.
    pub sent: AtomicU64,
    /// Records sent again after no server acknowledged them.
    pub retried: AtomicU64,
    /// Records given up on.
    pub given_up: AtomicU64,
    /// Records dropped because the queue was full.
    pub queue_full: AtomicU64,
}

/// A session being accounted.
#[derive(Debug)]
struct Live {
    acct_id: String,
    user: String,
    addr: IpAddr,
    client: IpAddr,
    class: Vec<Vec<u8>>,
    radius: bool,
    started: Instant,
    traffic: Option<Arc<Traffic>>,
    next_interim: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Start,
    Stop(u32),
    Interim,
}

#[derive(Debug)]
struct Record {
    attrs: Vec<(u8, Vec<u8>)>,
    made: Instant,
    what: &'static str,
    acct_id: String,
}

/// RADIUS accounting (Start, Interim-Update, Stop).
#[derive(Debug)]
pub struct Accounting {
    settings: RadiusSettings,
    tx: mpsc::Sender<Record>,
    rx: Mutex<Option<mpsc::Receiver<Record>>>,
    started: AtomicBool,
    sessions: Arc<Mutex<HashMap<SessionId, Live>>>,
    /// Outcomes of records.
    pub counters: Arc<AcctCounters>,
    radius: Arc<RadiusCounters>,
}

impl Accounting {
    pub(super) fn new(settings: RadiusSettings, radius: Arc<RadiusCounters>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        Self {
            settings,
            tx,
            rx: Mutex::new(Some(rx)),
            started: AtomicBool::new(false),
            sessions: Arc::new(Mutex::new(HashMap::new())),
            counters: Arc::new(AcctCounters::default()),
            radius,
        }
    }

    /// Sessions being accounted now.
    pub fn accounted(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Start the sending task (once; needs a Tokio runtime).
    fn ensure_task(&self) {
        if self.started.swap(true, Relaxed) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.started.store(false, Relaxed);
            return;
        };
        let Some(rx) = self.rx.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let ctx = Sender {
            settings: self.settings.clone(),
            counters: self.counters.clone(),
            radius: self.radius.clone(),
        };
        let sessions = self.sessions.clone();
        let tx = self.tx.clone();
        let interim = self.settings.interim_interval;
        let counters = self.counters.clone();
        rt.spawn(async move { run(rx, ctx, sessions, tx, interim, counters).await });
    }

    /// A session opened: accounted when a RADIUS user's, or `account_all`.
    pub fn session_opened(
        &self,
        id: SessionId,
        identity: &Identity,
        addr: IpAddr,
        client: IpAddr,
        traffic: Option<Arc<Traffic>>,
    ) {
        let radius = identity.source == "radius";
        if !radius && !self.settings.account_all {
            return;
        }
        self.ensure_task();
        let now = Instant::now();
        let live = Live {
            acct_id: format!("{:08X}-{}", unix_now(), id.0),
            user: identity.name.clone(),
            addr,
            client,
            class: identity.class.clone(),
            radius,
            started: now,
            traffic,
            next_interim: self.settings.interim_interval.map(|i| now + i),
        };
        let rec = record(&self.settings, &live, Kind::Start);
        info!(session = %id, user = %live.user, acct_session_id = %live.acct_id, "RADIUS accounting: Start queued");
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, live);
        enqueue(&self.tx, &self.counters, rec);
    }

    /// A session closed: its Stop (when it was accounted).
    pub fn session_closed(&self, id: SessionId, reason: &CloseReason) {
        let live = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let Some(live) = live else {
            return;
        };
        let rec = record(&self.settings, &live, Kind::Stop(terminate_cause(reason)));
        info!(session = %id, user = %live.user, acct_session_id = %live.acct_id, %reason, "RADIUS accounting: Stop queued");
        enqueue(&self.tx, &self.counters, rec);
    }
}

fn enqueue(tx: &mpsc::Sender<Record>, counters: &AcctCounters, rec: Record) {
    if let Err(e) = tx.try_send(rec) {
        counters.queue_full.fetch_add(1, Relaxed);
        let rec = match e {
            mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r) => r,
        };
        error!(acct_session_id = %rec.acct_id, record = rec.what, "RADIUS accounting queue full: record dropped");
    }
}

fn u32a(t: u8, v: u32) -> (u8, Vec<u8>) {
    (t, v.to_be_bytes().to_vec())
}

/// The attributes of a record for `live` now.
fn record(s: &RadiusSettings, live: &Live, kind: Kind) -> Record {
    let (status, what) = match kind {
        Kind::Start => (1, "Start"),
        Kind::Stop(_) => (2, "Stop"),
        Kind::Interim => (3, "Interim-Update"),
    };
    let mut a = vec![
        u32a(attr::ACCT_STATUS_TYPE, status),
        (attr::ACCT_SESSION_ID, live.acct_id.as_bytes().to_vec()),
        (attr::USER_NAME, live.user.as_bytes().to_vec()),
        (attr::NAS_IDENTIFIER, s.nas_identifier.as_bytes().to_vec()),
        (
            attr::CALLING_STATION_ID,
            live.client.to_string().into_bytes(),
        ),
        u32a(attr::NAS_PORT_TYPE, 5),
        u32a(attr::SERVICE_TYPE, 2),
        u32a(attr::ACCT_AUTHENTIC, if live.radius { 1 } else { 2 }),
        u32a(
            attr::EVENT_TIMESTAMP,
            u32::try_from(unix_now()).unwrap_or(u32::MAX),
        ),
    ];
    super::push_nas_ip(&mut a, s.nas_ip);
    match live.addr {
        IpAddr::V4(v4) => a.push((attr::FRAMED_IP_ADDRESS, v4.octets().to_vec())),
        IpAddr::V6(v6) => a.push((attr::FRAMED_IPV6_ADDRESS, v6.octets().to_vec())),
    }
    for c in &live.class {
        a.push((attr::CLASS, c.clone()));
    }
    if !matches!(kind, Kind::Start) {
        let secs = u32::try_from(live.started.elapsed().as_secs()).unwrap_or(u32::MAX);
        a.push(u32a(attr::ACCT_SESSION_TIME, secs));
        let t = live.traffic.as_deref();
        let get = |f: fn(&Traffic) -> &AtomicU64| t.map_or(0, |t| f(t).load(Relaxed));
        // Input = from the user (the NAS's view of its port).
        let in_bytes = get(|t| &t.bytes_from_user);
        let out_bytes = get(|t| &t.bytes_to_user);
        let lo = |v: u64| (v & 0xffff_ffff) as u32;
        let hi = |v: u64| u32::try_from(v >> 32).unwrap_or(u32::MAX);
        a.push(u32a(attr::ACCT_INPUT_OCTETS, lo(in_bytes)));
        a.push(u32a(attr::ACCT_OUTPUT_OCTETS, lo(out_bytes)));
        a.push(u32a(attr::ACCT_INPUT_GIGAWORDS, hi(in_bytes)));
        a.push(u32a(attr::ACCT_OUTPUT_GIGAWORDS, hi(out_bytes)));
        a.push(u32a(
            attr::ACCT_INPUT_PACKETS,
            lo(get(|t| &t.packets_from_user)),
        ));
        a.push(u32a(
            attr::ACCT_OUTPUT_PACKETS,
            lo(get(|t| &t.packets_to_user)),
        ));
    }
    if let Kind::Stop(cause) = kind {
        a.push(u32a(attr::ACCT_TERMINATE_CAUSE, cause));
    }
    Record {
        attrs: a,
        made: Instant::now(),
        what,
        acct_id: live.acct_id.clone(),
    }
}

#[derive(Clone)]
struct Sender {
    settings: RadiusSettings,
    counters: Arc<AcctCounters>,
    radius: Arc<RadiusCounters>,
}

async fn run(
    mut rx: mpsc::Receiver<Record>,
    ctx: Sender,
    sessions: Arc<Mutex<HashMap<SessionId, Live>>>,
    tx: mpsc::Sender<Record>,
    interim: Option<Duration>,
    counters: Arc<AcctCounters>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            rec = rx.recv() => {
                let Some(rec) = rec else { return };
                let Ok(permit) = slots.clone().acquire_owned().await else { return };
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    ctx.deliver(rec).await;
                    drop(permit);
                });
            }
            _ = tick.tick(), if interim.is_some() => {
                let now = Instant::now();
                let due: Vec<Record> = {
                    let mut map = sessions.lock().unwrap_or_else(|p| p.into_inner());
                    map.values_mut()
                        .filter_map(|l| {
                            let at = l.next_interim?;
                            (at <= now).then(|| {
                                l.next_interim = interim.map(|i| now + i);
                                record(&ctx.settings, l, Kind::Interim)
                            })
                        })
                        .collect()
                };
                for r in due {
                    debug!(acct_session_id = %r.acct_id, "RADIUS accounting: Interim-Update queued");
                    enqueue(&tx, &counters, r);
                }
            }
        }
    }
}

impl Sender {
    /// Send `rec` until a server acknowledges it or [`GIVE_UP_AFTER`].
    async fn deliver(&self, rec: Record) {
        let s = &self.settings;
        let mut pause = Duration::from_secs(5);
        let mut round = 0u32;
        loop {
            let mut attrs = rec.attrs.clone();
            let delay = u32::try_from(rec.made.elapsed().as_secs()).unwrap_or(u32::MAX);
            if delay > 0 {
                attrs.push(u32a(attr::ACCT_DELAY_TIME, delay));
            }
            let mut why = Vec::new();
            for &server in &s.accounting_servers {
                let (id, _) = super::fresh_request();
                let raw = match codec::encode_accounting_request(id, &attrs, &s.secret.0) {
                    Ok(r) => r,
                    Err(e) => {
                        self.counters.given_up.fetch_add(1, Relaxed);
                        error!(acct_session_id = %rec.acct_id, record = rec.what, "RADIUS accounting record cannot be encoded: {e}; given up");
                        return;
                    }
                };
                let until = Instant::now() + s.timeout * (s.retries + 1);
                match exchange(
                    server,
                    &raw,
                    &s.secret.0,
                    false,
                    s.timeout,
                    s.retries + 1,
                    until,
                    &self.radius,
                )
                .await
                {
                    Ok(p) if p.code == codec::code::ACCOUNTING_RESPONSE => {
                        self.counters.sent.fetch_add(1, Relaxed);
                        debug!(acct_session_id = %rec.acct_id, record = rec.what, %server, "RADIUS accounting record acknowledged");
                        return;
                    }
                    Ok(p) => why.push(format!("{server}: answered with code {}", p.code)),
                    Err(e) => why.push(format!("{server}: {e}")),
                }
            }
            round += 1;
            if rec.made.elapsed() + pause > GIVE_UP_AFTER {
                self.counters.given_up.fetch_add(1, Relaxed);
                error!(acct_session_id = %rec.acct_id, record = rec.what, rounds = round, "RADIUS accounting record given up on after {}s: {}", GIVE_UP_AFTER.as_secs(), why.join("; "));
                return;
            }
            self.counters.retried.fetch_add(1, Relaxed);
            warn!(acct_session_id = %rec.acct_id, record = rec.what, retry_in = pause.as_secs(), "RADIUS accounting record not acknowledged: {}", why.join("; "));
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(60));
        }
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn stop_carries_counters_and_cause() {
        let t = Arc::new(Traffic::default());
        t.bytes_from_user.store((5u64 << 32) + 7, Relaxed);
        t.bytes_to_user.store(1000, Relaxed);
        t.packets_from_user.store(3, Relaxed);
        let live = Live {
            acct_id: "X-1".into(),
            user: "alice".into(),
            addr: "198.18.5.5".parse().unwrap(),
            client: "198.18.0.2".parse().unwrap(),
            class: vec![b"OU=staff".to_vec()],
            radius: true,
            started: Instant::now(),
            traffic: Some(t),
            next_interim: None,
        };
        let s = RadiusSettings::default();
        let r = record(
            &s,
            &live,
            Kind::Stop(terminate_cause(&CloseReason::IdleTimeout)),
        );
        let raw = codec::encode_accounting_request(1, &r.attrs, b"k").unwrap();
        let p = codec::verify_request(&raw, b"k").unwrap();
        assert_eq!(p.u32(attr::ACCT_STATUS_TYPE), Some(2));
        assert_eq!(p.u32(attr::ACCT_INPUT_OCTETS), Some(7));
        assert_eq!(p.u32(attr::ACCT_INPUT_GIGAWORDS), Some(5));
        assert_eq!(p.u32(attr::ACCT_OUTPUT_OCTETS), Some(1000));
        assert_eq!(p.u32(attr::ACCT_INPUT_PACKETS), Some(3));
        assert_eq!(p.u32(attr::ACCT_TERMINATE_CAUSE), Some(4));
        assert_eq!(p.get(attr::FRAMED_IP_ADDRESS), Some(&[198, 18, 5, 5][..]));
        assert_eq!(p.get(attr::CLASS), Some(&b"OU=staff"[..]));
        assert_eq!(p.get(attr::ACCT_SESSION_ID), Some(&b"X-1"[..]));
    }

    #[test]
    fn terminate_causes() {
        assert_eq!(terminate_cause(&CloseReason::Logoff), 1);
        assert_eq!(terminate_cause(&CloseReason::ReconnectWindowExpired), 2);
        assert_eq!(terminate_cause(&CloseReason::SessionTimeout), 5);
        assert_eq!(terminate_cause(&CloseReason::Admin("x".into())), 6);
        assert_eq!(terminate_cause(&CloseReason::Shutdown), 11);
    }
}
