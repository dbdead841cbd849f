//! HTML by hand: every value from outside goes through [`esc`]; the
//! layout, the logon forms and small helpers the pages share.

use std::fmt::Write as _;

use axum::body::Body;
use axum::http::{header, Response, StatusCode};
use axum::response::IntoResponse;

/// Escape text for HTML element content and quoted attribute values.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// A whole page.
pub(crate) fn page(title: &str, nav: &str, body: &str, script: Option<&str>) -> String {
    let script = script
        .map(|s| format!("<script src=\"/assets/{s}\" defer></script>"))
        .unwrap_or_default();
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{t} · intragate</title><link rel=\"stylesheet\" href=\"/assets/style.css\">{script}</head>\
<body><header><span class=\"brand\">intragate</span>{nav}</header><main>{body}</main></body></html>\n",
        t = esc(title),
    )
}

/// An HTML answer.
pub(crate) fn respond(status: StatusCode, html: String) -> Response<Body> {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        html,
    )
        .into_response()
}

/// The flash message, if any.
pub(crate) fn flash(msg: Option<&str>) -> String {
    match msg {
        Some(m) if !m.is_empty() => format!("<p id=\"flash\" role=\"status\">{}</p>", esc(m)),
        _ => "<p id=\"flash\" role=\"status\" hidden></p>".into(),
    }
}

/// The logon form (`action` is where it posts).
pub(crate) fn login_form(title: &str, action: &str, error: Option<&str>, user: &str) -> String {
    let mut s = format!("<h1>{}</h1>", esc(title));
    if let Some(e) = error {
        let _ = write!(s, "<p id=\"error\" role=\"alert\">{}</p>", esc(e));
    }
    let _ = write!(
        s,
        "<form id=\"login-form\" method=\"post\" action=\"{a}\">\
<label for=\"username\">Username</label>\
<input id=\"username\" name=\"username\" autocomplete=\"username\" required maxlength=\"256\" value=\"{u}\" autofocus>\
<label for=\"password\">Password</label>\
<input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"current-password\" required maxlength=\"1024\">\
<button id=\"login-submit\" type=\"submit\">Log on</button></form>",
        a = esc(action),
        u = esc(user),
    );
    s
}

/// The second step: a code (TOTP) or a backend's question.
pub(crate) fn code_form(
    action: &str,
    handle: &str,
    prompt: &str,
    hidden: bool,
    error: Option<&str>,
) -> String {
    let mut s = String::from("<h1>Verification</h1>");
    if let Some(e) = error {
        let _ = write!(s, "<p id=\"error\" role=\"alert\">{}</p>", esc(e));
    }
    let _ = write!(
        s,
        "<form id=\"code-form\" method=\"post\" action=\"{a}\">\
<p id=\"code-prompt\">{p}</p><input type=\"hidden\" name=\"handle\" value=\"{h}\">\
<label for=\"code\">Code</label>\
<input id=\"code\" name=\"code\" type=\"{ty}\" autocomplete=\"one-time-code\" inputmode=\"{im}\" required maxlength=\"256\" autofocus>\
<button id=\"code-submit\" type=\"submit\">Verify</button></form>",
        a = esc(action),
        p = esc(prompt),
        h = esc(handle),
        ty = if hidden { "password" } else { "text" },
        im = if hidden { "text" } else { "numeric" },
    );
    s
}

/// Bytes for people: 1.2 MB.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Seconds for people: 3m 20s.
pub(crate) fn secs(s: u64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86399 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
    }
}

/// A hidden CSRF field.
pub(crate) fn csrf(token: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"_csrf\" value=\"{}\">",
        esc(token)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_values_is_text() {
        assert_eq!(
            esc("<img src=x onerror=\"alert(1)\">&'"),
            "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;&#39;"
        );
        assert_eq!(esc("a\u{1b}b"), "a\u{fffd}b");
        assert_eq!(bytes(999), "999 B");
        assert_eq!(bytes(1_500_000), "1.5 MB");
        assert_eq!(secs(200), "3m 20s");
    }
}
