//! The administrator console: live sessions (search, filter), a session's
//! details and actions, pools, DNS records, bans, the address history and
//! small live charts. Everything goes through the same requests as
//! `intragate ctl` (`admin::answer_as`), with the administrator as actor.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{header, HeaderMap, Response, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::info;

use super::html::{self, esc};
use super::session::{Kind, Role, WebSession};
use super::user::{authenticate, check_post, record_logon, sign_in, LoginForm};
use super::{redirect, ConnInfo, Web, WebRef};

pub(super) fn routes() -> Router<WebRef> {
    Router::new()
        .route("/console", get(sessions))
        .route("/console/", get(|| async { redirect("/console") }))
        .route("/console/login", get(login_page).post(login))
        .route("/console/logout", post(logout))
        .route("/console/sessions/{id}", get(details))
        .route("/console/pools", get(pools))
        .route("/console/dns", get(dns))
        .route("/console/bans", get(bans))
        .route("/console/history", get(history))
        .route("/console/action", post(action))
}

fn gone() -> Response<Body> {
    (StatusCode::SERVICE_UNAVAILABLE, "the gateway is stopping\n").into_response()
}

async fn login_page(State(w): State<WebRef>, headers: HeaderMap) -> Response<Body> {
    let Some(web) = w.get() else { return gone() };
    if web
        .sessions
        .get(Kind::Console, &headers, Instant::now())
        .is_some()
    {
        return redirect("/console");
    }
    let body = html::login_form("Administrator console", "/console/login", None, "");
    html::respond(
        StatusCode::OK,
        html::page("Console log on", "", &body, None),
    )
}

async fn login(
    State(w): State<WebRef>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response<Body> {
    let Some(web) = w.get() else { return gone() };
    let (identity, method) = match authenticate(
        &web,
        &info,
        &headers,
        &form,
        "/console/login",
        "Administrator console",
    )
    .await
    {
        Ok(x) => x,
        Err(page) => return page,
    };
    let Some(role) = Role::of_groups(&identity.groups, &web.shared.config.web) else {
        info!(user = %identity.name, client = %info.ip, "console: signed in but has no console role");
        record_logon(
            &web,
            &identity.name,
            None,
            info.ip,
            Some("no console role".into()),
        );
        let body = html::login_form(
            "Administrator console",
            "/console/login",
            Some(
                "Your account has no console role ([web.console_roles] names the groups that do).",
            ),
            &identity.name,
        );
        return html::respond(
            StatusCode::FORBIDDEN,
            html::page("Console log on", "", &body, None),
        );
    };
    info!(user = %identity.name, client = %info.ip, role = role.as_str(), %method, "console: signed in");
    sign_in(
        &web,
        Kind::Console,
        &identity,
        Some(role),
        method,
        info.ip,
        "/console",
    )
}

fn signed_in(web: &Web, headers: &HeaderMap) -> Result<WebSession, Response<Body>> {
    web.signed_in(Kind::Console, headers)
        .ok_or_else(|| redirect("/console/login"))
}

/// The gateway and the console's signed-in administrator, or the answer
/// instead (stopping, or the redirect to the logon page).
fn open(w: &WebRef, headers: &HeaderMap) -> Result<(Arc<Web>, WebSession), Response<Body>> {
    let web = w.get().ok_or_else(gone)?;
    let me = signed_in(&web, headers)?;
    Ok((web, me))
}

/// The array `key` of a daemon reply (empty when absent).
fn list(reply: &Value, key: &str) -> Vec<Value> {
    reply
        .get(key)
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// The console's navigation and sign-out.
fn nav(me: &WebSession) -> String {
    format!(
        "<nav aria-label=\"Console\"><a id=\"nav-sessions\" href=\"/console\">Sessions</a>\
<a id=\"nav-pools\" href=\"/console/pools\">Pools</a><a id=\"nav-dns\" href=\"/console/dns\">DNS</a>\
<a id=\"nav-bans\" href=\"/console/bans\">Bans</a><a id=\"nav-history\" href=\"/console/history\">History</a></nav>\
<span class=\"who\">{} ({})</span><form class=\"signout\" method=\"post\" action=\"/console/logout\">{}<button id=\"signout\">Sign out</button></form>",
        esc(&me.user),
        me.role.map_or("", Role::as_str),
        html::csrf(&me.csrf)
    )
}

/// The actor the audit log names.
pub(super) fn actor(me: &WebSession) -> String {
    format!("console:{}", me.user)
}

fn ask(web: &Web, me: &WebSession, req: Value) -> Value {
    super::answer_as(&web.shared, &req, &actor(me))
}

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

fn u(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn error_of(v: &Value) -> Option<String> {
    (v.get("ok") != Some(&Value::Bool(true))).then(|| {
        v.get("error")
            .and_then(Value::as_str)
            .unwrap_or("the request failed")
            .to_string()
    })
}

/// An event's remaining fields as `key: value` pairs for people (the API
/// keeps the JSON): empty values are left out, strings are unquoted.
fn readable(detail: &Value) -> String {
    let Some(o) = detail.as_object() else {
        return detail.to_string();
    };
    o.iter()
        .filter_map(|(k, v)| {
            let v = match v {
                Value::Null => return None,
                Value::String(s) if s.is_empty() => return None,
                Value::Array(a) if a.is_empty() => return None,
                Value::String(s) => s.clone(),
                Value::Array(a) => a
                    .iter()
                    .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
                    .collect::<Vec<_>>()
                    .join(", "),
                other => other.to_string(),
            };
            Some(format!("{k}: {v}"))
        })
        .collect::<Vec<_>>()
        .join(" · ")
}

#[derive(Deserialize, Default)]
struct Filter {
    #[serde(default)]
    user: String,
    #[serde(default)]
    group: String,
    #[serde(default)]
    pool: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    node: String,
    #[serde(default)]
    done: String,
}

fn matches(field: &str, want: &str) -> bool {
    want.trim().is_empty() || field.to_lowercase().contains(&want.trim().to_lowercase())
}

async fn sessions(
    State(w): State<WebRef>,
    headers: HeaderMap,
    Query(f): Query<Filter>,
) -> Response<Body> {
    let (web, me) = match open(&w, &headers) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let reply = ask(&web, &me, json!({"cmd": "sessions"}));
    let all = list(&reply, "sessions");
    let rows: Vec<&Value> = all
        .iter()
        .filter(|v| {
            matches(&s(v, "user"), &f.user)
                && matches(&s(v, "pool"), &f.pool)
                && (f.state.trim().is_empty() || s(v, "state") == f.state.trim())
                && matches(&s(v, "node"), &f.node)
                && (f.group.trim().is_empty()
                    || v.get("groups").and_then(Value::as_array).is_some_and(|g| {
                        g.iter()
                            .filter_map(Value::as_str)
                            .any(|g| g.eq_ignore_ascii_case(f.group.trim()))
                    }))
        })
        .collect();
    let mut b = String::from("<h1>Sessions</h1>");
    b.push_str(&html::flash(
        (!f.done.is_empty()).then_some(done_text(&f.done)),
    ));
    b.push_str("<section class=\"charts\" aria-label=\"The last hour\">\
<figure><figcaption>Sessions</figcaption><svg id=\"chart-sessions\" class=\"chart\" role=\"img\" aria-label=\"Sessions over the last hour\" viewBox=\"0 0 300 80\"></svg></figure>\
<figure><figcaption>Logons per minute</figcaption><svg id=\"chart-logons\" class=\"chart\" role=\"img\" aria-label=\"Logons per minute over the last hour\" viewBox=\"0 0 300 80\"></svg></figure>\
<figure><figcaption>Throughput (bit/s)</figcaption><svg id=\"chart-throughput\" class=\"chart\" role=\"img\" aria-label=\"Throughput over the last hour\" viewBox=\"0 0 300 80\"></svg></figure></section>");
    let _ = write!(
        b,
        "<form id=\"filter\" method=\"get\" action=\"/console\" role=\"search\">\
<label>User <input name=\"user\" value=\"{}\"></label><label>Group <input name=\"group\" value=\"{}\"></label>\
<label>Pool <input name=\"pool\" value=\"{}\"></label><label>State <select name=\"state\">{}</select></label>\
<label>Node <input name=\"node\" value=\"{}\"></label><button>Filter</button></form>",
        esc(&f.user),
        esc(&f.group),
        esc(&f.pool),
        ["", "active", "disconnected"]
            .iter()
            .map(|o| format!(
                "<option value=\"{o}\"{}>{}</option>",
                if f.state == *o { " selected" } else { "" },
                if o.is_empty() { "any" } else { o }
            ))
            .collect::<String>(),
        esc(&f.node),
    );
    let _ = write!(
        b,
        "<p class=\"count\">{} of {} sessions</p><table id=\"sessions\"><thead><tr><th scope=\"col\">Session</th><th scope=\"col\">User</th><th scope=\"col\">Groups</th><th scope=\"col\">Address</th><th scope=\"col\">Device</th><th scope=\"col\">State</th><th scope=\"col\">Pool</th><th scope=\"col\">Policy</th><th scope=\"col\">Auth</th><th scope=\"col\">Node</th><th scope=\"col\">Age</th><th scope=\"col\">Idle</th></tr></thead><tbody>",
        rows.len(),
        all.len()
    );
    for v in rows {
        let id = s(v, "id");
        let groups = v
            .get("groups")
            .and_then(Value::as_array)
            .map(|g| {
                g.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let link = if id.contains(':') {
            esc(&id)
        } else {
            format!(
                "<a class=\"details\" href=\"/console/sessions/{}\">{}</a>",
                esc(&id),
                esc(&id)
            )
        };
        let _ = write!(
            b,
            "<tr class=\"session\" data-session-id=\"{idq}\" data-user=\"{user}\"><td>{link}</td><td class=\"user\">{user}</td><td>{groups}</td><td class=\"address\">{addr}</td><td class=\"device\">{dev}</td><td class=\"state\">{state}</td><td>{pool}</td><td>{policy}</td><td>{auth}</td><td>{node}</td><td>{age}</td><td>{idle}</td></tr>",
            idq = esc(&id),
            user = esc(&s(v, "user")),
            groups = esc(&groups),
            addr = esc(&s(v, "address")),
            dev = esc(&s(v, "device")),
            state = esc(&s(v, "state")),
            pool = esc(&s(v, "pool")),
            policy = esc(&s(v, "policy")),
            auth = esc(&s(v, "auth")),
            node = esc(&s(v, "node")),
            age = html::secs(u(v, "age_s")),
            idle = html::secs(u(v, "idle_s")),
        );
    }
    b.push_str("</tbody></table>");
    if me.role >= Some(Role::Admin) {
        let _ = write!(
            b,
            "<form method=\"post\" action=\"/console/action\">{}<input type=\"hidden\" name=\"action\" value=\"reload\"><button id=\"reload\">Reload policies and users</button></form>",
            html::csrf(&me.csrf)
        );
    }
    html::respond(
        StatusCode::OK,
        html::page("Sessions", &nav(&me), &b, Some("console.js")),
    )
}

fn done_text(code: &str) -> &'static str {
    match code {
        "disconnect" => "Session disconnected",
        "logoff" => "Session logged off",
        "reload" => "Policies and users reloaded",
        "unban" => "Ban lifted",
        "ban" => "Address banned",
        "error" => "The action failed; see the gateway's log",
        _ => "",
    }
}

async fn details(
    State(w): State<WebRef>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response<Body> {
    let (web, me) = match open(&w, &headers) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let reply = ask(&web, &me, json!({"cmd": "show", "session": id}));
    let Some(v) = reply
        .get("sessions")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .cloned()
    else {
        let msg = error_of(&reply).unwrap_or_else(|| "No such session (it may have ended).".into());
        return html::respond(
            StatusCode::NOT_FOUND,
            html::page(
                "Session",
                &nav(&me),
                &format!(
                    "<h1>Session</h1><p id=\"error\" role=\"alert\">{}</p>",
                    esc(&msg)
                ),
                None,
            ),
        );
    };
    let user = s(&v, "user");
    let mut b = format!(
        "<h1>Session {} of {}</h1><dl class=\"details\">",
        esc(&s(&v, "id")),
        esc(&user)
    );
    for (label, key) in [
        ("Address", "address"),
        ("DNS name", "dns_name"),
        ("State", "state"),
        ("Device", "device"),
        ("Client address", "client"),
        ("Policy", "policy"),
        ("Pool", "pool"),
        ("Authenticated", "auth"),
        ("Auth server", "auth_server"),
        ("Connects", "connects"),
    ] {
        let _ = write!(
            b,
            "<dt>{label}</dt><dd class=\"{key}\">{}</dd>",
            esc(&s(&v, key))
        );
    }
    let join = |k: &str| {
        v.get(k)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    let _ = write!(b, "<dt>Groups</dt><dd>{}</dd>", esc(&join("groups")));
    let _ = write!(
        b,
        "<dt>Groups from</dt><dd>{}</dd>",
        esc(&join("groups_from"))
    );
    // The policy in force, from the session table itself.
    let sid = s(&v, "id");
    let policy = sid
        .strip_prefix('s')
        .unwrap_or(&sid)
        .parse::<u64>()
        .ok()
        .and_then(|n| {
            let core = web.shared.core();
            core.session(crate::core::session::SessionId(n))
                .map(|x| x.policy.clone())
        });
    if let Some(p) = policy {
        let routes = if p.routes.is_empty() {
            "full tunnel (all traffic)".to_string()
        } else {
            p.routes
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = write!(
            b,
            "<dt>Routes</dt><dd class=\"routes\">{}</dd><dt>User to user</dt><dd>{}</dd><dt>Idle timeout</dt><dd>{}</dd><dt>Session timeout</dt><dd>{}</dd><dt>Inbound rules</dt><dd>{}</dd>",
            esc(&routes),
            if p.client_to_client { "allowed" } else { "denied" },
            p.idle_timeout.map_or_else(|| "none".into(), |d| html::secs(d.as_secs())),
            p.session_timeout.map_or_else(|| "none".into(), |d| html::secs(d.as_secs())),
            p.inbound.len()
        );
    }
    let _ = write!(
        b,
        "<dt>Age / idle</dt><dd>{} / {}</dd>",
        html::secs(u(&v, "age_s")),
        html::secs(u(&v, "idle_s"))
    );
    if let Some(t) = v.get("traffic") {
        let _ = write!(
            b,
            "<dt>Traffic from the user</dt><dd class=\"traffic-in\">{} ({} packets)</dd><dt>Traffic to the user</dt><dd class=\"traffic-out\">{} ({} packets)</dd>",
            html::bytes(u(t, "bytes_in")),
            u(t, "packets_in"),
            html::bytes(u(t, "bytes_out")),
            u(t, "packets_out")
        );
    }
    b.push_str("</dl>");
    if me.role >= Some(Role::Operator) {
        let _ = write!(
            b,
            "<form method=\"post\" action=\"/console/action\">{csrf}<input type=\"hidden\" name=\"session\" value=\"{id}\">\
<button id=\"disconnect\" name=\"action\" value=\"disconnect\">Disconnect</button>\
<button id=\"logoff\" name=\"action\" value=\"logoff\">Log off</button></form>",
            csrf = html::csrf(&me.csrf),
            id = esc(&s(&v, "id")),
        );
    }
    // Its tracked connections.
    let flows = ask(&web, &me, json!({"cmd": "conntrack", "user": user}));
    let addr = s(&v, "address");
    b.push_str("<h2>Tracked connections</h2><table id=\"flows\"><thead><tr><th scope=\"col\">Protocol</th><th scope=\"col\">Remote</th><th scope=\"col\">Detail</th></tr></thead><tbody>");
    for f in flows
        .get("flows")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|f| s(f, "session") == s(&v, "id") || s(f, "local").contains(&addr))
        .take(500)
    {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&s(f, "proto")),
            esc(&s(f, "remote")),
            esc(&f.to_string())
        );
    }
    b.push_str("</tbody></table>");
    html::respond(StatusCode::OK, html::page("Session", &nav(&me), &b, None))
}

/// A table of JSON objects: (header, key) columns.
fn table(
    id: &str,
    rows: &[Value],
    cols: &[(&str, &str)],
    row_extra: impl Fn(&Value) -> String,
) -> String {
    let mut b = format!("<table id=\"{id}\"><thead><tr>");
    for (h, _) in cols {
        let _ = write!(b, "<th scope=\"col\">{h}</th>");
    }
    b.push_str("<th scope=\"col\"></th></tr></thead><tbody>");
    for r in rows {
        b.push_str("<tr>");
        for (_, k) in cols {
            let _ = write!(b, "<td class=\"{k}\">{}</td>", esc(&s(r, k)));
        }
        let _ = write!(b, "<td>{}</td></tr>", row_extra(r));
    }
    b.push_str("</tbody></table>");
    b
}

async fn pools(State(w): State<WebRef>, headers: HeaderMap) -> Response<Body> {
    let (web, me) = match open(&w, &headers) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let reply = ask(&web, &me, json!({"cmd": "pool"}));
    let rows = list(&reply, "pools");
    let b = format!(
        "<h1>Address pools</h1>{}",
        table(
            "pools",
            &rows,
            &[
                ("Pool", "name"),
                ("Network", "cidr"),
                ("Gateway", "gateway"),
                ("Size", "size"),
                ("Leased", "leased"),
                ("Quarantined", "quarantined"),
                ("Sticky", "sticky")
            ],
            |_| String::new()
        )
    );
    html::respond(StatusCode::OK, html::page("Pools", &nav(&me), &b, None))
}

async fn dns(State(w): State<WebRef>, headers: HeaderMap) -> Response<Body> {
    let (web, me) = match open(&w, &headers) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let reply = ask(&web, &me, json!({"cmd": "dns"}));
    let rows = list(&reply, "records");
    let b = format!(
        "<h1>DNS records of the sessions</h1>{}",
        table(
            "dns",
            &rows,
            &[("Name", "name"), ("Address", "address")],
            |_| String::new()
        )
    );
    html::respond(StatusCode::OK, html::page("DNS", &nav(&me), &b, None))
}

async fn bans(
    State(w): State<WebRef>,
    headers: HeaderMap,
    Query(f): Query<Filter>,
) -> Response<Body> {
    let (web, me) = match open(&w, &headers) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let reply = ask(&web, &me, json!({"cmd": "bans"}));
    let rows = list(&reply, "bans");
    let operator = me.role >= Some(Role::Operator);
    let csrf = html::csrf(&me.csrf);
    let mut b = String::from("<h1>Banned client addresses</h1>");
    b.push_str(&html::flash(
        (!f.done.is_empty()).then_some(done_text(&f.done)),
    ));
    b.push_str(&table(
        "bans",
        &rows,
        &[("Address", "address"), ("Score", "score"), ("Seconds left", "remaining_s")],
        |r| {
            if operator {
                format!(
                    "<form method=\"post\" action=\"/console/action\">{csrf}<input type=\"hidden\" name=\"address\" value=\"{}\"><button class=\"unban\" name=\"action\" value=\"unban\">Unban</button></form>",
                    esc(&s(r, "address"))
                )
            } else {
                String::new()
            }
        },
    ));
    if operator {
        let _ = write!(
            b,
            "<form id=\"ban-form\" method=\"post\" action=\"/console/action\">{csrf}<input type=\"hidden\" name=\"action\" value=\"ban\">\
<label>Address <input name=\"address\" required></label><label>Minutes <input name=\"minutes\" type=\"number\" min=\"1\" max=\"10080\" value=\"60\"></label><button id=\"ban\">Ban</button></form>"
        );
    }
    html::respond(StatusCode::OK, html::page("Bans", &nav(&me), &b, None))
}

#[derive(Deserialize, Default)]
struct HistoryQuery {
    #[serde(default)]
    address: String,
    #[serde(default)]
    at: String,
    #[serde(default)]
    user: String,
    #[serde(default)]
    since: String,
}

async fn history(
    State(w): State<WebRef>,
    headers: HeaderMap,
    Query(q): Query<HistoryQuery>,
) -> Response<Body> {
    let (web, me) = match open(&w, &headers) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let mut b = String::from("<h1>Address history</h1>");
    let _ = write!(
        b,
        "<form id=\"history-form\" method=\"get\" action=\"/console/history\">\
<label>Address <input name=\"address\" value=\"{}\"></label><label>At <input name=\"at\" value=\"{}\" placeholder=\"2026-12-04T14:05:00Z\"></label>\
<label>User <input name=\"user\" value=\"{}\"></label><label>Since <input name=\"since\" value=\"{}\" placeholder=\"-1d\"></label><button>Search</button></form>",
        esc(&q.address),
        esc(&q.at),
        esc(&q.user),
        esc(&q.since)
    );
    let mut req = json!({"cmd": "history", "limit": 1000});
    for (k, v) in [
        ("address", &q.address),
        ("at", &q.at),
        ("user", &q.user),
        ("since", &q.since),
    ] {
        if !v.trim().is_empty() {
            req[k] = Value::String(v.trim().to_string());
        }
    }
    if q.since.trim().is_empty() && q.at.trim().is_empty() {
        req["since"] = Value::String("-1d".into());
    }
    let reply = super::answer_as(&web.shared, &req, &actor(&me));
    if let Some(e) = error_of(&reply) {
        let _ = write!(b, "<p id=\"error\" role=\"alert\">{}</p>", esc(&e));
    }
    if let Some(note) = missing_nodes_note(&reply) {
        let _ = write!(
            b,
            "<p id=\"history-missing\" role=\"status\">{}</p>",
            esc(&note)
        );
    }
    b.push_str("<table id=\"history\"><thead><tr><th scope=\"col\">Time (UTC)</th><th scope=\"col\">Event</th><th scope=\"col\">User</th><th scope=\"col\">Address</th><th scope=\"col\">Detail</th></tr></thead><tbody>");
    let entries = list(&reply, "entries");
    for e in &entries {
        let mut detail = e.clone();
        if let Some(o) = detail.as_object_mut() {
            for k in ["ts", "unix_ms", "event", "user", "address", "addr"] {
                o.remove(k);
            }
        }
        let user = [s(e, "user"), s(e, "actor")]
            .into_iter()
            .find(|x| !x.is_empty())
            .unwrap_or_default();
        let addr = [s(e, "address"), s(e, "addr")]
            .into_iter()
            .find(|x| !x.is_empty())
            .unwrap_or_default();
        let _ = write!(
            b,
            "<tr class=\"event\"><td class=\"ts\">{}</td><td class=\"kind\">{}</td><td class=\"user\">{}</td><td class=\"address\">{}</td><td class=\"detail\">{}</td></tr>",
            esc(&s(e, "ts")),
            esc(&s(e, "event")),
            esc(&user),
            esc(&addr),
            esc(&readable(&detail))
        );
    }
    b.push_str("</tbody></table>");
    html::respond(StatusCode::OK, html::page("History", &nav(&me), &b, None))
}

/// A cluster's history answer without some nodes' events: one line
/// saying whose are missing.
fn missing_nodes_note(reply: &Value) -> Option<String> {
    let missing: Vec<&str> = reply
        .get("nodes")?
        .get("missing")?
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "Events of node(s) {} are not shown: they did not answer in time or are not running.",
            missing.join(", ")
        )
    })
}

#[derive(Deserialize, Default)]
struct ActionForm {
    #[serde(default, rename = "_csrf")]
    csrf: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    session: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    minutes: Option<u64>,
}

async fn action(
    State(w): State<WebRef>,
    headers: HeaderMap,
    Form(f): Form<ActionForm>,
) -> Response<Body> {
    let Some(web) = w.get() else { return gone() };
    let me = match check_post(&web, Kind::Console, &headers, &f.csrf) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let (need, req, back) = match f.action.as_str() {
        "disconnect" | "logoff" => (
            Role::Operator,
            json!({"cmd": f.action, "session": f.session}),
            "/console".to_string(),
        ),
        "unban" => (
            Role::Operator,
            json!({"cmd": "unban", "address": f.address.trim()}),
            "/console/bans".to_string(),
        ),
        "ban" => (
            Role::Operator,
            json!({"cmd": "ban", "address": f.address.trim(), "minutes": f.minutes.unwrap_or(60)}),
            "/console/bans".to_string(),
        ),
        "reload" => (
            Role::Admin,
            json!({"cmd": "reload"}),
            "/console".to_string(),
        ),
        _ => return (StatusCode::BAD_REQUEST, "unknown action\n").into_response(),
    };
    if me.role < Some(need) {
        return html::respond(
            StatusCode::FORBIDDEN,
            html::page(
                "Refused",
                &nav(&me),
                &format!(
                    "<h1>Refused</h1><p id=\"error\" role=\"alert\">This needs the {} role.</p>",
                    need.as_str()
                ),
                None,
            ),
        );
    }
    let reply = ask(&web, &me, req);
    let done = if error_of(&reply).is_some() {
        "error"
    } else {
        f.action.as_str()
    };
    info!(admin = %me.user, action = %f.action, ok = done != "error", "console action");
    redirect(&format!("{back}?done={done}"))
}

#[derive(Deserialize, Default)]
struct CsrfOnly {
    #[serde(default, rename = "_csrf")]
    csrf: String,
}

async fn logout(
    State(w): State<WebRef>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    Form(f): Form<CsrfOnly>,
) -> Response<Body> {
    let Some(web) = w.get() else { return gone() };
    let me = match check_post(&web, Kind::Console, &headers, &f.csrf) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let clear = web.sessions.close(Kind::Console, &headers);
    super::record(
        &web,
        crate::history::HistoryEvent::WebLogoff {
            user: me.user.clone(),
            client: info.ip,
        },
    );
    let mut r = redirect("/console/login");
    if let Ok(v) = clear.parse() {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::{missing_nodes_note, readable};
    use serde_json::json;

    #[test]
    fn a_missing_node_gets_a_note() {
        assert_eq!(
            missing_nodes_note(&json!({"ok": true, "entries": []})),
            None
        );
        assert_eq!(
            missing_nodes_note(&json!({"nodes": {"answered": ["gw1"], "missing": []}})),
            None
        );
        let n =
            missing_nodes_note(&json!({"nodes": {"answered": ["gw1"], "missing": ["gw2", "gw3"]}}))
                .expect("note");
        assert!(n.contains("gw2, gw3"), "{n}");
    }

    #[test]
    fn history_detail_is_readable_and_drops_empty_fields() {
        let d = json!({"client": "198.18.20.2", "node": null, "ok": true, "users": ["bob", "eve"], "device": ""});
        assert_eq!(
            readable(&d),
            "client: 198.18.20.2 · ok: true · users: bob, eve"
        );
        assert_eq!(readable(&json!("x")), "\"x\"");
    }
}
