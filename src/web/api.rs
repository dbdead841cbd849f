//! The REST API (`/api/v1`, described in `docs/openapi.yaml`): the
//! operations of `intragate ctl`, for automation (a token) and for the
//! console's scripts (its cookie plus the `X-CSRF-Token` header).

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, Method, Response, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::session::{self, Kind, Role};
use super::{Web, WebRef};

pub(super) fn routes() -> Router<WebRef> {
    Router::new()
        .route("/api/v1/health", get(plain(Role::Viewer, "health")))
        .route("/api/v1/stats", get(plain(Role::Viewer, "stats")))
        .route("/api/v1/pools", get(plain(Role::Viewer, "pool")))
        .route("/api/v1/dns", get(plain(Role::Viewer, "dns")))
        .route("/api/v1/bans", get(plain(Role::Viewer, "bans")).post(ban))
        .route("/api/v1/bans/{address}", delete(unban))
        .route("/api/v1/reload", post(plain(Role::Admin, "reload")))
        .route("/api/v1/drain", post(drain))
        .route("/api/v1/sessions", get(listing("sessions")))
        .route("/api/v1/sessions/{id}", get(session_show))
        .route(
            "/api/v1/sessions/{id}/disconnect",
            post(on_session("disconnect")),
        )
        .route("/api/v1/sessions/{id}/logoff", post(on_session("logoff")))
        .route(
            "/api/v1/users/{user}/disconnect",
            post(on_user("disconnect")),
        )
        .route("/api/v1/users/{user}/logoff", post(on_user("logoff")))
        .route("/api/v1/conntrack", get(listing("conntrack")))
        .route("/api/v1/history", get(history))
        .route("/api/v1/series", get(series))
        .route(
            "/api/v1/openapi.yaml",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "application/yaml; charset=utf-8")],
                    include_str!("../../docs/openapi.yaml"),
                )
            }),
        )
}

/// A handler's answer, boxed.
type Answer = std::pin::Pin<Box<dyn std::future::Future<Output = Response<Body>> + Send>>;

/// A handler sending `{"cmd": cmd}`.
fn plain(
    need: Role,
    cmd: &'static str,
) -> impl Fn(State<WebRef>, HeaderMap, Method) -> Answer + Clone + Send + Sync + 'static {
    move |s, h, m| Box::pin(simple(s, h, m, need, Ok(json!({"cmd": cmd}))))
}

/// A handler acting on the session in the path.
fn on_session(
    cmd: &'static str,
) -> impl Fn(State<WebRef>, HeaderMap, Method, Path<String>) -> Answer + Clone + Send + Sync + 'static
{
    move |s, h, m, Path(id)| {
        Box::pin(session_cmd(
            s,
            h,
            m,
            Role::Operator,
            json!({"cmd": cmd, "session": id}),
        ))
    }
}

/// A handler listing, for viewers, what `{"cmd": cmd}` lists, of one
/// user when the query string names one (`?user=alice`).
fn listing(
    cmd: &'static str,
) -> impl Fn(State<WebRef>, HeaderMap, Method, Result<Query<UserQuery>, QueryRejection>) -> Answer
       + Clone
       + Send
       + Sync
       + 'static {
    move |s, h, m, q| {
        Box::pin(simple(
            s,
            h,
            m,
            Role::Viewer,
            query(q, |q| json!({"cmd": cmd, "user": q.user})),
        ))
    }
}

/// A handler acting on every session of the user in the path.
fn on_user(
    cmd: &'static str,
) -> impl Fn(State<WebRef>, HeaderMap, Method, Path<String>) -> Answer + Clone + Send + Sync + 'static
{
    move |s, h, m, Path(user)| {
        Box::pin(simple(
            s,
            h,
            m,
            Role::Operator,
            Ok(json!({"cmd": cmd, "user": user})),
        ))
    }
}

fn error(status: StatusCode, msg: &str) -> Response<Body> {
    (status, Json(json!({"ok": false, "error": msg}))).into_response()
}

/// Who is asking, with which role: a token, or a console session (whose
/// state-changing requests need the CSRF header and the same origin).
fn caller(
    web: &Web,
    headers: &HeaderMap,
    method: &Method,
    need: Role,
) -> Result<String, Response<Body>> {
    let (actor, role) = if let Some(auth) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let token = auth
            .strip_prefix("Bearer ")
            .or_else(|| auth.strip_prefix("bearer "))
            .unwrap_or("")
            .trim();
        match web.tokens.check(token) {
            Some((name, role)) => (format!("token:{name}"), role),
            None => {
                web.shared
                    .stats
                    .refuse(crate::stats::RefuseReason::BadCookie);
                tracing::info!("REST API: unknown, revoked or expired token refused");
                return Err(error(
                    StatusCode::UNAUTHORIZED,
                    "unknown, revoked or expired token",
                ));
            }
        }
    } else if let Some(me) = web.signed_in(Kind::Console, headers) {
        if method != Method::GET && method != Method::HEAD {
            let sent = headers
                .get("x-csrf-token")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !session::same_origin(headers) || !session::same(sent, &me.csrf) {
                return Err(error(
                    StatusCode::FORBIDDEN,
                    "missing or wrong X-CSRF-Token (or a request from another site)",
                ));
            }
        }
        (super::console::actor(&me), me.role.unwrap_or(Role::Viewer))
    } else {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "authentication required: Authorization: Bearer <token> (intragate token create)",
        ));
    };
    if role < need {
        return Err(error(
            StatusCode::FORBIDDEN,
            &format!(
                "this needs the {} role; the caller has {}",
                need.as_str(),
                role.as_str()
            ),
        ));
    }
    Ok(actor)
}

/// The daemon's reply as the answer: 200, or 400 with its error (404 when
/// nothing matched a session id).
fn reply(v: Value) -> Response<Body> {
    if v.get("ok") == Some(&Value::Bool(true)) {
        (StatusCode::OK, Json(v)).into_response()
    } else {
        (StatusCode::BAD_REQUEST, Json(v)).into_response()
    }
}

/// A request the handler could not read (query string or body): a JSON
/// 400, given only once the caller is known (credentials come first).
type Parsed = Result<Value, String>;

fn query<T>(q: Result<Query<T>, QueryRejection>, f: impl FnOnce(T) -> Value) -> Parsed {
    q.map(|Query(t)| f(t)).map_err(|e| e.body_text())
}

async fn simple(
    State(w): State<WebRef>,
    headers: HeaderMap,
    method: Method,
    need: Role,
    req: Parsed,
) -> Response<Body> {
    let Some(web) = w.get() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "stopping");
    };
    match caller(&web, &headers, &method, need) {
        Ok(actor) => match req {
            Ok(req) => reply(super::answer_as(&web.shared, &req, &actor)),
            Err(msg) => error(StatusCode::BAD_REQUEST, &msg),
        },
        Err(r) => r,
    }
}

#[derive(Deserialize, Default)]
struct UserQuery {
    #[serde(default)]
    user: Option<String>,
}

async fn session_show(
    s: State<WebRef>,
    headers: HeaderMap,
    method: Method,
    Path(id): Path<String>,
) -> Response<Body> {
    session_cmd(
        s,
        headers,
        method,
        Role::Viewer,
        json!({"cmd": "show", "session": id}),
    )
    .await
}

/// A request about one session: 404 when it names none.
async fn session_cmd(
    State(w): State<WebRef>,
    headers: HeaderMap,
    method: Method,
    need: Role,
    req: Value,
) -> Response<Body> {
    let Some(web) = w.get() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "stopping");
    };
    let actor = match caller(&web, &headers, &method, need) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let v = super::answer_as(&web.shared, &req, &actor);
    let none = v.get("error").and_then(Value::as_str) == Some("no such session")
        || v.get("sessions")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty);
    if none {
        return error(StatusCode::NOT_FOUND, "no such session");
    }
    reply(v)
}

#[derive(Deserialize)]
struct BanBody {
    address: String,
    #[serde(default)]
    minutes: Option<u64>,
}

async fn ban(
    s: State<WebRef>,
    headers: HeaderMap,
    method: Method,
    body: Result<Json<BanBody>, axum::extract::rejection::JsonRejection>,
) -> Response<Body> {
    let req = match body {
        Ok(Json(b)) => {
            Ok(json!({"cmd": "ban", "address": b.address, "minutes": b.minutes.unwrap_or(60)}))
        }
        Err(_) => {
            Err("body must be JSON: {\"address\": \"198.51.100.7\", \"minutes\": 60}".to_string())
        }
    };
    simple(s, headers, method, Role::Operator, req).await
}

async fn unban(
    s: State<WebRef>,
    headers: HeaderMap,
    method: Method,
    Path(address): Path<String>,
) -> Response<Body> {
    simple(
        s,
        headers,
        method,
        Role::Operator,
        Ok(json!({"cmd": "unban", "address": address})),
    )
    .await
}

#[derive(Deserialize, Default)]
struct DrainQuery {
    #[serde(default)]
    cancel: bool,
}

async fn drain(
    s: State<WebRef>,
    headers: HeaderMap,
    method: Method,
    q: Result<Query<DrainQuery>, QueryRejection>,
) -> Response<Body> {
    simple(
        s,
        headers,
        method,
        Role::Admin,
        query(q, |q| json!({"cmd": "drain", "cancel": q.cancel})),
    )
    .await
}

#[derive(Deserialize, Default)]
struct HistoryQuery {
    address: Option<String>,
    at: Option<String>,
    user: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<u64>,
}

async fn history(
    s: State<WebRef>,
    headers: HeaderMap,
    method: Method,
    q: Result<Query<HistoryQuery>, QueryRejection>,
) -> Response<Body> {
    let Ok(Query(q)) = q else {
        return simple(s, headers, method, Role::Viewer, query(q, |_| Value::Null)).await;
    };
    let mut req = json!({"cmd": "history"});
    for (k, v) in [
        ("address", q.address),
        ("at", q.at),
        ("user", q.user),
        ("since", q.since),
        ("until", q.until),
    ] {
        if let Some(v) = v.filter(|v| !v.trim().is_empty()) {
            req[k] = Value::String(v);
        }
    }
    if let Some(l) = q.limit {
        req["limit"] = json!(l);
    }
    simple(s, headers, method, Role::Viewer, Ok(req)).await
}

async fn series(s: State<WebRef>, headers: HeaderMap, method: Method) -> Response<Body> {
    let Some(web) = s.get() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "stopping");
    };
    if let Err(r) = caller(&web, &headers, &method, Role::Viewer) {
        return r;
    }
    (StatusCode::OK, Json(web.series.to_json())).into_response()
}
