//! The data plane's threads: one per core, each with its own TUN queue
//! (`IFF_MULTI_QUEUE`), its own single-threaded runtime, and the tunnels
//! it was given.
//!
//! A tunnel runs where it reads and writes its TUN queue: a packet from
//! the user is written to the TUN by the thread that decrypted it, and the
//! kernel's automatic flow steering (a multi-queue TUN remembers, per flow
//! hash, the queue that last wrote the flow) hands the reply to the same
//! queue, so to the same thread: the reply is read, queued to the tunnel
//! and encrypted without waking another core. Packets whose flow another
//! thread owns (a connection the internal network opened, a user talking
//! to a user on another thread) still go through the session's queue,
//! which works across threads.
//!
//! The listener, the logon and everything else stay on the main runtime;
//! once a CONNECT is accepted the connection (TCP socket and TLS state) is
//! handed to the thread with the fewest tunnels ([`DataPlane::spawn`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, error, info};
use tun_rs::{AsyncDevice, SyncDevice};

use crate::shared::Shared;

/// A tunnel to run on a data-plane thread, given that thread's TUN queue.
pub type Job = Box<dyn FnOnce(Arc<AsyncDevice>) -> BoxFuture + Send>;

/// The future a [`Job`] makes.
pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Most data-plane threads (and TUN queues) whatever the core count.
pub const MAX_THREADS: usize = 64;

/// How long a stopping thread waits for its tunnels to close.
const STOP_WAIT: Duration = Duration::from_secs(3);

/// The data-plane threads.
pub struct DataPlane {
    workers: Vec<Worker>,
    /// Tie-breaker between equally loaded threads.
    next: AtomicUsize,
}

struct Worker {
    jobs: mpsc::UnboundedSender<Job>,
    /// Tunnels running on the thread (or on their way to it).
    tunnels: Arc<AtomicUsize>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// How many data-plane threads: one per core the process may use.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .clamp(1, MAX_THREADS)
}

impl DataPlane {
    /// One thread per TUN queue, each reading its queue from the start.
    pub fn start(shared: &Arc<Shared>, queues: Vec<SyncDevice>) -> std::io::Result<Arc<Self>> {
        let mut workers = Vec::with_capacity(queues.len());
        for (i, queue) in queues.into_iter().enumerate() {
            let (tx, rx) = mpsc::unbounded_channel();
            let tunnels = Arc::new(AtomicUsize::new(0));
            let shared = shared.clone();
            let thread = std::thread::Builder::new()
                .name(format!("intragate-dp{i}"))
                .spawn(move || run_worker(i, &shared, queue, rx))?;
            workers.push(Worker {
                jobs: tx,
                tunnels,
                thread: Mutex::new(Some(thread)),
            });
        }
        info!(
            threads = workers.len(),
            "data plane started (one TUN queue per thread)"
        );
        Ok(Arc::new(Self {
            workers,
            next: AtomicUsize::new(0),
        }))
    }

    /// Number of data-plane threads.
    pub fn threads(&self) -> usize {
        self.workers.len()
    }

    /// Run `job` on the thread with the fewest tunnels. False when the data
    /// plane has stopped (the job is dropped, closing its connection).
    pub fn spawn(&self, job: Job) -> bool {
        let n = self.workers.len();
        if n == 0 {
            return false;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let loads: Vec<usize> = self
            .workers
            .iter()
            .map(|w| w.tunnels.load(Ordering::Relaxed))
            .collect();
        let Some(w) = self.workers.get(least_loaded(&loads, start)) else {
            return false;
        };
        let count = w.tunnels.clone();
        count.fetch_add(1, Ordering::Relaxed);
        let wrapped: Job = Box::new(move |tun| {
            let fut = job(tun);
            Box::pin(async move {
                let _done = Decrement(count);
                fut.await;
            })
        });
        w.jobs.send(wrapped).is_ok()
    }

    /// Wait (blocking, bounded) for the threads to end after shutdown.
    pub fn join(&self, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        for w in &self.workers {
            let handle = w
                .thread
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            let Some(h) = handle else { continue };
            while !h.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }
}

/// The thread with the fewest tunnels; among equals, the first from
/// `start` (round-robin between equally loaded threads).
fn least_loaded(loads: &[usize], start: usize) -> usize {
    let n = loads.len().max(1);
    (0..n)
        .map(|k| (start + k) % n)
        .min_by_key(|&i| loads.get(i).copied().unwrap_or(usize::MAX))
        .unwrap_or(0)
}

/// Counts a tunnel off its thread when it ends (or is dropped unrun).
struct Decrement(Arc<AtomicUsize>);

impl Drop for Decrement {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One data-plane thread: its runtime, its TUN queue's reader, its
/// tunnels; until shutdown, then up to [`STOP_WAIT`] for the tunnels to
/// close (the gateway tells them to).
fn run_worker(
    i: usize,
    shared: &Arc<Shared>,
    queue: SyncDevice,
    mut jobs: mpsc::UnboundedReceiver<Job>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(thread = i, error = %e, "cannot start a data-plane thread; stopping");
            shared.shutdown.cancel();
            return;
        }
    };
    rt.block_on(async {
        let tun = match AsyncDevice::new(queue) {
            Ok(t) => Arc::new(t),
            Err(e) => {
                error!(thread = i, error = %e, "cannot use a TUN queue; stopping");
                shared.shutdown.cancel();
                return;
            }
        };
        let reader = tokio::spawn(super::tun_reader(shared.clone(), tun.clone()));
        let mut tunnels = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = shared.shutdown.cancelled() => break,
                job = jobs.recv() => match job {
                    Some(job) => { tunnels.spawn(job(tun.clone())); }
                    None => break,
                },
                Some(_) = tunnels.join_next(), if !tunnels.is_empty() => {}
            }
        }
        jobs.close();
        let _ = tokio::time::timeout(STOP_WAIT, async {
            while tunnels.join_next().await.is_some() {}
        })
        .await;
        debug!(
            thread = i,
            left = tunnels.len(),
            "data-plane thread stopping"
        );
        tunnels.abort_all();
        reader.abort();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnels_go_to_the_least_loaded_thread_and_ties_rotate() {
        assert_eq!(least_loaded(&[3, 1, 2], 0), 1);
        assert_eq!(least_loaded(&[3, 1, 2], 2), 1);
        // Equal loads: the start decides, so successive tunnels alternate.
        assert_eq!(least_loaded(&[2, 2], 0), 0);
        assert_eq!(least_loaded(&[2, 2], 1), 1);
        assert_eq!(least_loaded(&[0, 0, 0], 5), 2);
        // One thread, or none yet.
        assert_eq!(least_loaded(&[7], 9), 0);
        assert_eq!(least_loaded(&[], 3), 0);
    }

    #[test]
    fn a_finished_or_dropped_tunnel_is_counted_off() {
        let count = Arc::new(AtomicUsize::new(2));
        drop(Decrement(count.clone()));
        assert_eq!(count.load(Ordering::Relaxed), 1);
    }
}
