//! The web interface (issue 18): the user's workspace page
//! (`/workspace`), the administrator console (`/console`) and the REST API
//! (`/api/v1`), on the TLS listener of the OpenConnect exchange.
//!
//! The listener (`tunnel`) reads the first request head of a connection;
//! a browser's request (or one for these paths) is handed over here with
//! the bytes read so far, and hyper serves the connection from then on
//! (HTTP/1.1, keep-alive, bounded header time). Pages are rendered on the
//! server; the only scripts are the files under `assets/` (CSP
//! `script-src 'self'`, no inline script). State-changing requests need the
//! session's CSRF token (forms: `_csrf`; API with a cookie: `X-CSRF-Token`)
//! and a same-origin `Origin` when the browser sends one.

// Handlers answer refusals with a whole response (`Err(Response)`): the
// natural shape for axum, and the size does not matter at this rate.
#![allow(clippy::result_large_err)]

mod api;
mod console;
mod html;
mod series;
mod session;
pub mod tokens;
mod user;

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tower::ServiceExt;
use tracing::debug;

use crate::shared::Shared;
use crate::wire::http::RequestHead;

pub use series::Series;
pub use session::Role;

/// How long hyper waits for a request head (also between keep-alive
/// requests: an idle browser connection is closed after this).
const HEADER_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest a web connection lives; it is closed gracefully after.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(600);
/// Largest request body a page or the API accepts.
const MAX_BODY: usize = 64 * 1024;

/// The Content-Security-Policy of every answer: scripts and styles from
/// our own `/assets` only, no inline script, no framing, forms post to us.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'";

/// The web interface of one gateway: its sessions, API tokens and the
/// charts' samples.
pub struct Web {
    pub(crate) shared: Arc<Shared>,
    pub(crate) sessions: session::Sessions,
    pub(crate) tokens: tokens::Tokens,
    pub(crate) series: Arc<Series>,
    main: Router,
    console_only: Router,
}

/// What the listener knows of a connection, for the handlers.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The client's address as the gateway sees it: its public address, or
    /// a session's intranet address when the page is opened through a
    /// tunnel.
    pub ip: IpAddr,
    /// The user a verified client certificate names, if one was sent.
    pub cert: Option<crate::client_cert::CertIdentity>,
}

impl Web {
    /// The web interface for `shared`'s configuration.
    pub fn new(shared: Arc<Shared>) -> Arc<Web> {
        let tokens = tokens::Tokens::new(tokens::path(&shared.config.state_dir));
        let series = Arc::new(Series::new());
        Arc::new_cyclic(|me: &std::sync::Weak<Web>| {
            let cfg = &shared.config.web;
            let mut main = Router::new();
            if cfg.user_page {
                main = main.merge(user::routes());
            }
            if cfg.console == crate::config::ConsoleAt::Main {
                main = main.merge(console::routes()).merge(api::routes());
            }
            main = main.merge(assets_routes());
            let console_only = console::routes()
                .merge(api::routes())
                .merge(assets_routes())
                .route("/", axum::routing::get(|| async { redirect("/console") }));
            let state = WebRef(me.clone());
            Web {
                sessions: session::Sessions::new(cfg.session_idle, cfg.session_max),
                tokens,
                series,
                main: main
                    .fallback(not_found)
                    .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
                    .with_state(state.clone()),
                console_only: console_only
                    .fallback(not_found)
                    .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
                    .with_state(state),
                shared: shared.clone(),
            }
        })
    }

    /// The live page session the request's cookie names, if its account is
    /// still as it was at sign-in (a local user deleted, locked or given a
    /// new password is signed out at the next request).
    pub(crate) fn signed_in(
        &self,
        kind: session::Kind,
        headers: &axum::http::HeaderMap,
    ) -> Option<session::WebSession> {
        let me = self
            .sessions
            .get(kind, headers, std::time::Instant::now())?;
        if me.source == "local" && me.stamp != 0 {
            let valid = matches!(
                self.shared.users.account(&me.user),
                Ok(crate::core::session::Account::Valid { stamp, .. }) if stamp == me.stamp
            );
            if !valid {
                tracing::info!(user = %me.user, "web session ended: the account changed");
                self.sessions.drop_current(kind, headers);
                return None;
            }
        }
        Some(me)
    }

    /// Sample the charts' figures until shutdown (a gateway task).
    pub async fn sample_loop(self: Arc<Self>) {
        self.series.run(&self.shared).await;
    }

    /// Serve a connection whose first request head (in `read`, not yet
    /// consumed) is for the web interface, until it closes.
    pub async fn serve<S>(&self, stream: S, read: BytesMut, info: ConnInfo, console_only: bool)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let router = if console_only {
            self.console_only.clone()
        } else {
            self.main.clone()
        };
        let svc = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(info.clone());
            let router = router.clone();
            async move {
                let req = req.map(Body::new);
                let mut resp = router.oneshot(req).await.unwrap_or_else(|e| match e {});
                secure_headers(resp.headers_mut());
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        let io = hyper_util::rt::TokioIo::new(Prefixed {
            prefix: read,
            inner: stream,
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(64 * 1024)
            .serve_connection(io, svc);
        let mut conn = std::pin::pin!(conn);
        let shutdown = self.shared.shutdown.clone();
        let lifetime = tokio::time::sleep(CONNECTION_LIFETIME);
        tokio::pin!(lifetime);
        let mut closing = false;
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        debug!(error = %e, "web connection ended");
                    }
                    return;
                }
                _ = shutdown.cancelled(), if !closing => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                _ = &mut lifetime, if !closing => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// Is this request for the web interface (rather than the OpenConnect
/// exchange)? Its paths, and a browser's `GET /` (an OpenConnect client
/// sends `X-Transcend-Version`/`X-Aggregate-Auth` and no `text/html`).
pub fn wants(head: &RequestHead) -> bool {
    let path = head.path.split('?').next().unwrap_or("");
    let ours = ["/workspace", "/console", "/api/", "/api", "/assets/"]
        .iter()
        .any(|p| path == *p || path.starts_with(&format!("{}/", p.trim_end_matches('/'))))
        || path == "/favicon.ico";
    if ours {
        return true;
    }
    if path != "/" || !head.method.eq_ignore_ascii_case("GET") {
        return false;
    }
    let vpn_client = head.header("x-transcend-version").is_some()
        || head.header("x-aggregate-auth").is_some()
        || head.header("user-agent").is_some_and(|ua| {
            let ua = ua.to_ascii_lowercase();
            ua.contains("anyconnect") || ua.contains("openconnect") || ua.contains("intragate")
        });
    let browser = head
        .header("accept")
        .is_some_and(|a| a.contains("text/html"));
    browser && !vpn_client
}

/// The handlers' state: the [`Web`] (weak: the routers live inside it).
#[derive(Clone)]
pub(crate) struct WebRef(std::sync::Weak<Web>);

impl WebRef {
    pub(crate) fn get(&self) -> Option<Arc<Web>> {
        self.0.upgrade()
    }
}

/// Headers every answer carries.
fn secure_headers(h: &mut axum::http::HeaderMap) {
    let set = |h: &mut axum::http::HeaderMap, k: header::HeaderName, v: &'static str| {
        h.entry(k).or_insert(HeaderValue::from_static(v));
    };
    set(h, header::CONTENT_SECURITY_POLICY, CSP);
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    // Not "no-referrer": with it Chromium sends `Origin: null` on our own
    // form posts, which the CSRF check must refuse.
    set(h, header::REFERRER_POLICY, "same-origin");
    set(h, header::CACHE_CONTROL, "no-store");
    set(h, header::STRICT_TRANSPORT_SECURITY, "max-age=31536000");
    set(
        h,
        header::HeaderName::from_static("cross-origin-opener-policy"),
        "same-origin",
    );
}

/// 303 See Other to `to`.
pub(crate) fn redirect(to: &str) -> Response<Body> {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

async fn not_found() -> Response<Body> {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "not found\n",
    )
        .into_response()
}

/// The static files: a style sheet and the two small scripts.
fn assets_routes() -> Router<WebRef> {
    use axum::routing::get;
    let asset = |ct: &'static str, body: &'static str| {
        move || async move {
            (
                [
                    (header::CONTENT_TYPE, ct),
                    (header::CACHE_CONTROL, "public, max-age=3600"),
                ],
                body,
            )
        }
    };
    Router::new()
        .route(
            "/assets/style.css",
            get(asset(
                "text/css; charset=utf-8",
                include_str!("assets/style.css"),
            )),
        )
        .route(
            "/assets/console.js",
            get(asset(
                "text/javascript; charset=utf-8",
                include_str!("assets/console.js"),
            )),
        )
        .route(
            "/assets/workspace.js",
            get(asset(
                "text/javascript; charset=utf-8",
                include_str!("assets/workspace.js"),
            )),
        )
}

/// A stream that first yields bytes already read from it.
struct Prefixed<S> {
    prefix: BytesMut,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Record a web event in the address history (never blocks).
pub(crate) fn record(web: &Web, ev: crate::history::HistoryEvent) {
    web.shared.history.record(ev);
}

/// Answer an administrative request (as `intragate ctl` would) on behalf
/// of `actor`: recorded in the address history with the actor. A
/// `history` request reads files: on the multi-threaded runtime it runs
/// with `block_in_place` so the other tasks of this worker move on.
pub(crate) fn answer_as(
    shared: &Shared,
    req: &serde_json::Value,
    actor: &str,
) -> serde_json::Value {
    let reads_files = req.get("cmd").and_then(serde_json::Value::as_str) == Some("history");
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if reads_files && multi_thread {
        tokio::task::block_in_place(|| crate::admin::answer_as(shared, req, actor))
    } else {
        crate::admin::answer_as(shared, req, actor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(method: &str, path: &str, headers: &[(&str, &str)]) -> RequestHead {
        let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: gw\r\n");
        for (k, v) in headers {
            raw.push_str(&format!("{k}: {v}\r\n"));
        }
        raw.push_str("\r\n");
        crate::wire::http::parse_request_head(raw.as_bytes(), &Default::default())
            .expect("parses")
            .expect("complete")
            .0
    }

    #[test]
    fn browsers_get_the_pages_and_vpn_clients_the_xml() {
        assert!(wants(&head("GET", "/", &[("Accept", "text/html,*/*")])));
        assert!(wants(&head("GET", "/workspace", &[])));
        assert!(wants(&head("POST", "/workspace/login", &[])));
        assert!(wants(&head("GET", "/console/sessions/s1", &[])));
        assert!(wants(&head("GET", "/api/v1/sessions", &[])));
        assert!(!wants(&head("GET", "/workspacex", &[])));
        // openconnect and the plug-in
        assert!(!wants(&head(
            "GET",
            "/",
            &[("Accept", "text/html"), ("X-Transcend-Version", "1")]
        )));
        assert!(!wants(&head(
            "GET",
            "/",
            &[("User-Agent", "Open AnyConnect VPN Agent v9.12")]
        )));
        assert!(!wants(&head("POST", "/", &[("Accept", "text/html")])));
        assert!(!wants(&head("GET", "/", &[])));
        assert!(!wants(&head("CONNECT", "/CSCOSSLC/tunnel", &[])));
        assert!(!wants(&head("GET", "/healthz", &[])));
    }
}
