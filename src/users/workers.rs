//! The password-hashing threads.

use std::sync::Mutex;

/// A job for the password-hashing threads.
type Job = Box<dyn FnOnce() + Send>;

/// A few dedicated threads for Argon2 (memory-hard, 19 MiB per hash).
///
/// Hashing on tokio's blocking pool would spread the 19 MiB working sets
/// over up to 512 threads, each keeping its own malloc arena: hundreds of
/// MiB of resident memory after a burst of logons. A fixed, small set of
/// threads bounds that memory, and the bounded queue bounds a logon flood.
#[derive(Debug)]
pub struct AuthWorkers {
    tx: std::sync::mpsc::SyncSender<Job>,
}

impl AuthWorkers {
    /// `threads` workers and a queue of `queue` waiting jobs.
    pub fn new(threads: usize, queue: usize) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(queue);
        let rx = std::sync::Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("intragate-auth-{i}"))
                .spawn(move || loop {
                    let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                })?;
        }
        Ok(Self { tx })
    }

    /// Run `f` on a worker; `None` when the queue is full (the caller
    /// refuses the logon as "busy") or the worker died.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (otx, orx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = otx.send(f());
        });
        self.tx.try_send(job).ok()?;
        orx.await.ok()
    }
}
