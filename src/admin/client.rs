//! The client end of the control socket (`intragate ctl`): one request out,
//! one reply in, within a timeout.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::protocol::{Reply, Request};

/// Longest reply line read (a `conntrack` of a full gateway is large).
const MAX_REPLY: u64 = 16 * 1024 * 1024;

/// Why a control request failed (client side).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CtlError {
    /// No daemon listens on the socket (or it may not be opened).
    #[error("cannot connect to the control socket {}: {error} (is the gateway running, and are you root or in ctl_group?)", path.display())]
    Connect {
        /// The socket.
        path: std::path::PathBuf,
        /// What connect(2) said.
        error: std::io::Error,
    },
    /// The daemon took longer than the timeout.
    #[error("the gateway did not answer within {} s (is it overloaded or stuck?)", .0.as_secs_f64())]
    Timeout(Duration),
    /// The connection broke.
    #[error("the control connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// The reply was not one JSON line of the expected shape.
    #[error("the gateway's reply cannot be read: {0}")]
    BadReply(#[from] serde_json::Error),
}

/// Send one request, return the reply (a failed request is a
/// [`Reply::Error`], not an `Err`); connecting, sending and reading the
/// reply together take at most `timeout`.
pub async fn request(path: &Path, req: &Request, timeout: Duration) -> Result<Reply, CtlError> {
    let exchange = async {
        let mut s = UnixStream::connect(path)
            .await
            .map_err(|error| CtlError::Connect {
                path: path.to_path_buf(),
                error,
            })?;
        let mut line = req.encode();
        line.push('\n');
        s.write_all(line.as_bytes()).await?;
        let mut reply = String::new();
        BufReader::new(s)
            .take(MAX_REPLY)
            .read_line(&mut reply)
            .await?;
        Ok(Reply::decode(req, &reply)?)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| CtlError::Timeout(timeout))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[tokio::test]
    async fn request_times_out_on_a_daemon_that_accepts_but_never_answers() {
        let dir = std::env::temp_dir().join(format!("igctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ctl.sock");
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        let silent = tokio::spawn(async move {
            let (c, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(c);
        });
        let t0 = std::time::Instant::now();
        let r = request(&path, &Request::Health, Duration::from_millis(300)).await;
        let took = t0.elapsed();
        silent.abort();
        let _ = std::fs::remove_dir_all(&dir);
        let e = r.expect_err("a silent daemon must not give a reply");
        assert!(matches!(e, CtlError::Timeout(_)), "{e:?}");
        assert_eq!(
            e.to_string(),
            "the gateway did not answer within 0.3 s (is it overloaded or stuck?)"
        );
        assert!(took < Duration::from_secs(2), "took {took:?}");
    }

    #[tokio::test]
    async fn request_names_the_socket_when_nothing_listens() {
        let path = std::env::temp_dir().join(format!("igctl-none-{}.sock", std::process::id()));
        let e = request(&path, &Request::Health, Duration::from_secs(1))
            .await
            .expect_err("nothing listens");
        assert!(matches!(e, CtlError::Connect { .. }), "{e:?}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }
}
