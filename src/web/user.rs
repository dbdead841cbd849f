//! The user's workspace page: log on through the authentication chain,
//! see every session of yours, disconnect or log off one, all, or all but
//! this device; the settings the administrator lets you change.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Extension, Query, State};
use axum::http::{header, HeaderMap, Response, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;
use tracing::{info, warn};

use super::html::{self, esc};
use super::session::{self, Kind, WebSession};
use super::{redirect, ConnInfo, Web, WebRef};
use crate::admin::protocol::SessionRow;
use crate::core::session::{CloseReason, SessionId};
use crate::logon::{Logon, Question, Step};

pub(super) fn routes() -> Router<WebRef> {
    Router::new()
        .route("/", get(|| async { redirect("/workspace") }))
        .route("/workspace", get(workspace))
        .route("/workspace/", get(|| async { redirect("/workspace") }))
        .route("/workspace/login", get(login_page).post(login))
        .route("/workspace/action", post(action))
        .route("/workspace/settings", post(settings))
        .route("/workspace/logout", post(logout))
}

/// The gateway is stopping: the web state is gone.
fn gone() -> Response<Body> {
    (StatusCode::SERVICE_UNAVAILABLE, "the gateway is stopping\n").into_response()
}

#[derive(Deserialize, Default)]
pub(super) struct LoginForm {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    handle: String,
    #[serde(default)]
    code: String,
}

async fn login_page(State(w): State<WebRef>, headers: HeaderMap) -> Response<Body> {
    let Some(web) = w.get() else { return gone() };
    if web
        .sessions
        .get(Kind::User, &headers, Instant::now())
        .is_some()
    {
        return redirect("/workspace");
    }
    let body = html::login_form("Log on to your workspace", "/workspace/login", None, "");
    html::respond(StatusCode::OK, html::page("Log on", "", &body, None))
}

/// Walk the authentication chain from a logon form; shared with the
/// console. `Ok` = the user and how they authenticated; `Err` = the page
/// to answer with (the code form, or the logon form with the reason).
pub(super) async fn authenticate(
    web: &Web,
    info: &ConnInfo,
    headers: &HeaderMap,
    form: &LoginForm,
    action: &str,
    title: &str,
) -> Result<(crate::auth::Identity, String), Response<Body>> {
    if !session::same_origin(headers) {
        web.shared
            .stats
            .refuse(crate::stats::RefuseReason::BadRequest);
        return Err(html::respond(
            StatusCode::FORBIDDEN,
            html::page(
                "Refused",
                "",
                "<h1>Refused</h1><p id=\"error\" role=\"alert\">This request did not come from this gateway's own page.</p>",
                None,
            ),
        ));
    }
    let logon = Logon {
        shared: &web.shared,
        ip: info.ip,
        cert: info.cert.as_ref(),
    };
    let step = if !form.handle.is_empty() {
        logon.answer(&form.handle, form.code.trim()).await
    } else if form.username.trim().is_empty() || form.password.is_empty() {
        Step::Refused("Please enter your username and password.".into())
    } else {
        logon.password(form.username.trim(), &form.password).await
    };
    match step {
        Step::Done { identity, method } => Ok((identity, method)),
        Step::Refused(reason) => {
            record_logon(
                web,
                form.username.trim(),
                None,
                info.ip,
                Some(reason.clone()),
            );
            let body = html::login_form(title, action, Some(&reason), form.username.trim());
            Err(html::respond(
                StatusCode::UNAUTHORIZED,
                html::page("Log on", "", &body, None),
            ))
        }
        Step::Ask { handle, question } => {
            let (prompt, hidden) = match &question {
                Question::Totp => (
                    "Enter the 6-digit code from your authenticator app.".to_string(),
                    false,
                ),
                Question::Challenge(c) if c.prompt.trim().is_empty() => {
                    ("Enter the response to the challenge.".to_string(), c.hidden)
                }
                Question::Challenge(c) => (c.prompt.chars().take(512).collect(), c.hidden),
            };
            let body = html::code_form(action, &handle, &prompt, hidden, None);
            Err(html::respond(
                StatusCode::OK,
                html::page("Verification", "", &body, None),
            ))
        }
    }
}

/// Record a page sign-in in the address history: accepted, or refused
/// with why (`user` as typed, at most 256 characters).
pub(super) fn record_logon(
    web: &Web,
    user: &str,
    role: Option<session::Role>,
    client: IpAddr,
    refused: Option<String>,
) {
    super::record(
        web,
        crate::history::HistoryEvent::WebLogon {
            user: user.chars().take(256).collect(),
            role: role.map(|r| r.as_str().into()),
            client,
            ok: refused.is_none(),
            reason: refused,
        },
    );
}

/// Open a page session for `identity`, record the sign-in and send the
/// browser to `home` with the session's cookie.
pub(super) fn sign_in(
    web: &Web,
    kind: Kind,
    identity: &crate::auth::Identity,
    role: Option<session::Role>,
    method: String,
    client: IpAddr,
    home: &str,
) -> Response<Body> {
    let signed = web
        .sessions
        .open(kind, identity, role, method, Instant::now());
    record_logon(web, &identity.name, role, client, None);
    let mut r = redirect(home);
    if let Ok(v) = signed.cookie.parse() {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
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
        "/workspace/login",
        "Log on to your workspace",
    )
    .await
    {
        Ok(x) => x,
        Err(page) => return page,
    };
    info!(user = %identity.name, client = %info.ip, %method, "user page: signed in");
    sign_in(
        &web,
        Kind::User,
        &identity,
        None,
        method,
        info.ip,
        "/workspace",
    )
}

/// The signed-in user of the page, or the redirect to the logon page.
fn signed_in(web: &Web, headers: &HeaderMap) -> Result<WebSession, Response<Body>> {
    web.signed_in(Kind::User, headers)
        .ok_or_else(|| redirect("/workspace/login"))
}

/// A session of the user's, as the page lists it.
pub(super) struct Row {
    pub row: SessionRow,
    /// Held by this node (acted on here) rather than another of the cluster.
    pub local: Option<SessionId>,
    pub this_device: bool,
}

/// Every session of `user` (this node's and, in a cluster, the others'),
/// which of them the request comes from (`ip`: a session's intranet
/// address when opened through its tunnel; else its client address, when
/// only one session has it).
pub(super) fn sessions_of(web: &Web, user: &str, ip: IpAddr) -> Vec<Row> {
    let shared = &web.shared;
    let now = Instant::now();
    let domain = shared.config.domain.clone();
    let core = shared.core();
    let node = shared.cluster().map(|c| c.node().to_string());
    let mut rows: Vec<Row> = core
        .sessions()
        .filter(|s| s.user.eq_ignore_ascii_case(user))
        .map(|s| {
            let mut row = crate::admin::session_row(s, &domain, now);
            row.node.clone_from(&node);
            row.traffic = shared
                .data
                .routes
                .get(&s.addr)
                .filter(|p| p.id == s.id)
                .map(|p| crate::admin::protocol::TrafficRow {
                    bytes_in: p.traffic.bytes_from_user.load(Relaxed),
                    packets_in: p.traffic.packets_from_user.load(Relaxed),
                    bytes_out: p.traffic.bytes_to_user.load(Relaxed),
                    packets_out: p.traffic.packets_to_user.load(Relaxed),
                });
            Row {
                row,
                local: Some(s.id),
                this_device: false,
            }
        })
        .collect();
    let now_unix = crate::shared::unix_now();
    rows.extend(
        core.remote_sessions()
            .filter(|r| r.user.eq_ignore_ascii_case(user))
            .map(|r| Row {
                row: crate::admin::remote_row(r, &domain, now_unix),
                local: None,
                this_device: false,
            }),
    );
    drop(core);
    if let Some(r) = rows.iter_mut().find(|r| r.row.address == ip) {
        r.this_device = true;
    } else {
        let from_ip: Vec<usize> = rows
            .iter()
            .enumerate()
            .filter(|(_, r)| r.row.client == Some(ip))
            .map(|(i, _)| i)
            .collect();
        if let [only] = from_ip[..] {
            rows[only].this_device = true;
        }
    }
    rows.sort_by(|a, b| {
        b.this_device
            .cmp(&a.this_device)
            .then(a.row.id.cmp(&b.row.id))
    });
    rows
}

#[derive(Deserialize, Default)]
struct FlashQuery {
    #[serde(default)]
    done: Option<String>,
}

async fn workspace(
    State(w): State<WebRef>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    Query(q): Query<FlashQuery>,
) -> Response<Body> {
    let Some(web) = w.get() else { return gone() };
    let me = match signed_in(&web, &headers) {
        Ok(s) => s,
        Err(r) => return r,
    };
    // The account as its backend says now (a deleted user is signed out).
    if !web.shared.config.web.user_page {
        return redirect("/workspace/login");
    }
    let rows = sessions_of(&web, &me.user, info.ip);
    let here = rows.iter().any(|r| r.this_device);
    let csrf = html::csrf(&me.csrf);
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>Your sessions</h1><p class=\"who\">Signed in as <strong>{}</strong> ({})</p>{}",
        esc(&me.user),
        esc(&me.method),
        html::flash(q.done.as_deref().map(flash_text))
    );
    if rows.is_empty() {
        b.push_str("<p id=\"no-sessions\">You have no sessions.</p>");
    }
    b.push_str("<table id=\"sessions\"><caption>Sessions on every device</caption><thead><tr><th scope=\"col\">Device</th><th scope=\"col\">Address</th><th scope=\"col\">DNS name</th><th scope=\"col\">State</th><th scope=\"col\">Since</th><th scope=\"col\">Idle</th><th scope=\"col\">Traffic (in / out)</th><th scope=\"col\">Actions</th></tr></thead><tbody>");
    for r in &rows {
        let s = &r.row;
        let badge = if r.this_device {
            " <span class=\"this-device\">This device</span>"
        } else {
            ""
        };
        let traffic = s.traffic.as_ref().map_or_else(
            || "–".to_string(),
            |t| format!("{} / {}", html::bytes(t.bytes_in), html::bytes(t.bytes_out)),
        );
        let node = s
            .node
            .as_deref()
            .map(|n| format!(" <span class=\"node\">on {}</span>", esc(n)))
            .unwrap_or_default();
        let _ = write!(
            b,
            "<tr class=\"session\" data-session-id=\"{id}\" data-this-device=\"{td}\">\
<td class=\"device\">{dev}{badge}{node}</td><td class=\"address\">{addr}</td><td class=\"dns\">{dns}</td>\
<td class=\"state\">{state}</td><td class=\"since\">{since} ago</td><td class=\"idle\">{idle}</td><td class=\"traffic\">{traffic}</td>\
<td class=\"actions\"><form method=\"post\" action=\"/workspace/action\">{csrf}<input type=\"hidden\" name=\"target\" value=\"{id}\">\
<button class=\"disconnect\" name=\"action\" value=\"disconnect\" title=\"End the tunnel; the session can be resumed\">Disconnect</button>\
<button class=\"logoff\" name=\"action\" value=\"logoff\" title=\"End the session and release its address\">Log off</button></form></td></tr>",
            id = esc(&s.id),
            td = r.this_device,
            dev = esc(s.device.as_deref().unwrap_or("unknown device")),
            addr = esc(&s.address.to_string()),
            dns = esc(s.dns_name.as_deref().unwrap_or("–")),
            state = esc(&s.state),
            since = html::secs(s.age_s),
            idle = html::secs(s.idle_s),
            node = node,
        );
    }
    b.push_str("</tbody></table>");
    let _ = write!(
        b,
        "<section class=\"all\" aria-label=\"All sessions\"><form method=\"post\" action=\"/workspace/action\">{csrf}<input type=\"hidden\" name=\"target\" value=\"all\">\
<button id=\"disconnect-all\" name=\"action\" value=\"disconnect\">Disconnect all</button>\
<button id=\"logoff-all\" name=\"action\" value=\"logoff\">Log off all</button></form>"
    );
    if here {
        let _ = write!(
            b,
            "<form method=\"post\" action=\"/workspace/action\">{csrf}<input type=\"hidden\" name=\"target\" value=\"others\">\
<button id=\"disconnect-others\" name=\"action\" value=\"disconnect\">Disconnect all except this device</button>\
<button id=\"logoff-others\" name=\"action\" value=\"logoff\">Log off all except this device</button></form>"
        );
    }
    b.push_str("</section>");
    b.push_str(&settings_form(&web, &me, &csrf));
    let nav = format!(
        "<form class=\"signout\" method=\"post\" action=\"/workspace/logout\">{csrf}<button id=\"signout\">Sign out</button></form>"
    );
    html::respond(
        StatusCode::OK,
        html::page("Your sessions", &nav, &b, Some("workspace.js")),
    )
}

/// The flash text for a `done=` code (never the request's own text).
fn flash_text(code: &str) -> &'static str {
    match code {
        "disconnected-0" | "logged-off-0" => "No session matched",
        "disconnected-1" => "Disconnected 1 session",
        "logged-off-1" => "Logged off 1 session",
        c if c.starts_with("disconnected-") => "Disconnected your sessions",
        c if c.starts_with("logged-off-") => "Logged off your sessions",
        "settings" => "Settings saved",
        _ => "",
    }
}

/// The settings the user may change (issue 18 §2).
fn settings_form(web: &Web, me: &WebSession, csrf: &str) -> String {
    let Ok(s) = web.shared.workspace_settings(&me.user, &me.groups) else {
        return String::new();
    };
    use crate::core::policy::{LogoffAction, ReconnectAtLogon};
    let opt = |value: &str, label: &str, selected: bool| {
        format!(
            "<option value=\"{}\"{}>{}</option>",
            esc(value),
            if selected { " selected" } else { "" },
            esc(label)
        )
    };
    let reconnect: String = [
        ReconnectAtLogon::Off,
        ReconnectAtLogon::Disconnected,
        ReconnectAtLogon::ActiveAndDisconnected,
    ]
    .iter()
    .map(|r| opt(r.as_str(), r.label(), *r == s.reconnect_at_logon))
    .collect();
    let logoff: String = [
        LogoffAction::None,
        LogoffAction::Disconnect,
        LogoffAction::Logoff,
    ]
    .iter()
    .map(|r| opt(r.as_str(), r.label(), *r == s.logoff_action))
    .collect();
    let dis = |may: bool| if may { "" } else { " disabled" };
    let save = if s.may_change_reconnect || s.may_change_logoff_action {
        "<button id=\"settings-save\">Save settings</button>"
    } else {
        "<button id=\"settings-save\" disabled>Save settings</button><p class=\"hint\">Your administrator sets these.</p>"
    };
    format!(
        "<section aria-labelledby=\"settings-h\"><h2 id=\"settings-h\">Settings</h2>\
<form id=\"settings-form\" method=\"post\" action=\"/workspace/settings\">{csrf}\
<label for=\"reconnect_at_logon\">Reconnect at log on</label><select id=\"reconnect_at_logon\" name=\"reconnect_at_logon\"{d1}>{reconnect}</select>\
<label for=\"logoff_action\">When I sign out of this page</label><select id=\"logoff_action\" name=\"logoff_action\"{d2}>{logoff}</select>\
{save}</form></section>",
        d1 = dis(s.may_change_reconnect),
        d2 = dis(s.may_change_logoff_action),
    )
}

#[derive(Deserialize, Default)]
struct SettingsForm {
    #[serde(default, rename = "_csrf")]
    csrf: String,
    #[serde(default)]
    reconnect_at_logon: Option<String>,
    #[serde(default)]
    logoff_action: Option<String>,
}

async fn settings(
    State(w): State<WebRef>,
    headers: HeaderMap,
    Form(f): Form<SettingsForm>,
) -> Response<Body> {
    let Some(web) = w.get() else { return gone() };
    let me = match check_post(&web, Kind::User, &headers, &f.csrf) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let Ok(current) = web.shared.workspace_settings(&me.user, &me.groups) else {
        return (StatusCode::CONFLICT, "no policy applies to you\n").into_response();
    };
    use crate::shared::WorkspacePreference as P;
    let mut prefs = Vec::new();
    if let Some(v) = f.reconnect_at_logon.as_deref() {
        match v.parse() {
            Ok(r) if r != current.reconnect_at_logon => prefs.push(P::ReconnectAtLogon(r)),
            Ok(_) => {}
            Err(_) => return (StatusCode::BAD_REQUEST, "unknown setting value\n").into_response(),
        }
    }
    if let Some(v) = f.logoff_action.as_deref() {
        match v.parse() {
            Ok(r) if r != current.logoff_action => prefs.push(P::LogoffAction(r)),
            Ok(_) => {}
            Err(_) => return (StatusCode::BAD_REQUEST, "unknown setting value\n").into_response(),
        }
    }
    for p in prefs {
        if let Err(e) = web
            .shared
            .set_workspace_preference(&me.user, &me.groups, p)
            .await
        {
            return html::respond(
                StatusCode::FORBIDDEN,
                html::page(
                    "Refused",
                    "",
                    &format!("<h1>Refused</h1><p id=\"error\" role=\"alert\">{}</p><p><a href=\"/workspace\">Back</a></p>", esc(&e)),
                    None,
                ),
            );
        }
    }
    redirect("/workspace?done=settings")
}

#[derive(Deserialize, Default)]
struct ActionForm {
    #[serde(default, rename = "_csrf")]
    csrf: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    target: String,
}

/// A state-changing request's checks: signed in, same origin, the CSRF
/// token. The refusal page otherwise.
pub(super) fn check_post(
    web: &Web,
    kind: Kind,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<WebSession, Response<Body>> {
    let refuse = |why: &str| {
        html::respond(
            StatusCode::FORBIDDEN,
            html::page(
                "Refused",
                "",
                &format!(
                    "<h1>Refused</h1><p id=\"error\" role=\"alert\">{}</p>",
                    esc(why)
                ),
                None,
            ),
        )
    };
    let Some(me) = web.signed_in(kind, headers) else {
        return Err(refuse(
            "You are not signed in (or your session expired). Sign in again.",
        ));
    };
    if !session::same_origin(headers) {
        warn!(user = %me.user, "web request refused: from another site");
        return Err(refuse(
            "This request did not come from this gateway's own page.",
        ));
    }
    if !session::same(csrf, &me.csrf) {
        warn!(user = %me.user, "web request refused: missing or wrong CSRF token");
        return Err(refuse(
            "This form is out of date; reload the page and try again.",
        ));
    }
    Ok(me)
}

async fn action(
    State(w): State<WebRef>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    Form(f): Form<ActionForm>,
) -> Response<Body> {
    let Some(web) = w.get() else { return gone() };
    let me = match check_post(&web, Kind::User, &headers, &f.csrf) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let logoff = match f.action.as_str() {
        "logoff" => true,
        "disconnect" => false,
        _ => return (StatusCode::BAD_REQUEST, "unknown action\n").into_response(),
    };
    let rows = sessions_of(&web, &me.user, info.ip);
    let chosen: Vec<&Row> = match f.target.as_str() {
        "all" => rows.iter().collect(),
        "others" => {
            if !rows.iter().any(|r| r.this_device) {
                return (
                    StatusCode::CONFLICT,
                    "this device has no session: nothing to spare\n",
                )
                    .into_response();
            }
            rows.iter().filter(|r| !r.this_device).collect()
        }
        id => rows.iter().filter(|r| r.row.id == id).collect(),
    };
    let n = act(&web, &me.user, &chosen, logoff);
    info!(user = %me.user, client = %info.ip, action = %f.action, target = %f.target, sessions = n, "user page: workspace control");
    super::record(
        &web,
        crate::history::HistoryEvent::UserAction {
            user: me.user.clone(),
            action: f.action.clone(),
            target: f.target.chars().take(64).collect(),
            client: info.ip,
        },
    );
    let done = if logoff { "logged-off" } else { "disconnected" };
    redirect(&format!("/workspace?done={done}-{n}"))
}

/// Disconnect or log off these sessions of `user`; how many.
pub(super) fn act(web: &Web, user: &str, rows: &[&Row], logoff: bool) -> usize {
    let shared = &web.shared;
    let now = Instant::now();
    let mut n = 0;
    let mut core = shared.core();
    for r in rows {
        match r.local {
            Some(id) => {
                n += 1;
                if logoff {
                    core.handle_logoff(id, CloseReason::UserRequest, now);
                } else {
                    core.handle_disconnect(id, "disconnected by the user (workspace page)", now);
                }
            }
            None => {
                if let Some(node) = &r.row.node {
                    n += 1;
                    let action = if logoff {
                        crate::cluster::Action::UserLogoff
                    } else {
                        crate::cluster::Action::UserDisconnect
                    };
                    shared.request_remote(
                        node,
                        action,
                        r.row.address,
                        user,
                        &format!("{user} from the workspace page"),
                    );
                }
            }
        }
    }
    drop(core);
    n
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
    let me = match check_post(&web, Kind::User, &headers, &f.csrf) {
        Ok(m) => m,
        Err(r) => return r,
    };
    // What signing out does to the user's sessions (the policy's
    // "logoff action", or the user's choice where allowed).
    if let Ok(s) = web.shared.workspace_settings(&me.user, &me.groups) {
        use crate::core::policy::LogoffAction;
        if s.logoff_action != LogoffAction::None {
            let rows = sessions_of(&web, &me.user, info.ip);
            let all: Vec<&Row> = rows.iter().collect();
            let n = act(
                &web,
                &me.user,
                &all,
                s.logoff_action == LogoffAction::Logoff,
            );
            info!(user = %me.user, sessions = n, action = s.logoff_action.as_str(), "user page: sign-out ends sessions");
        }
    }
    let clear = web.sessions.close(Kind::User, &headers);
    super::record(
        &web,
        crate::history::HistoryEvent::WebLogoff {
            user: me.user.clone(),
            client: info.ip,
        },
    );
    let mut r = redirect("/workspace/login");
    if let Ok(v) = clear.parse() {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}
