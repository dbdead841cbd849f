//! Building the server's messages: the `auth-request` forms and the
//! `complete` answer. Every interpolated string is escaped, and characters
//! XML 1.0 cannot carry are replaced, so hostile strings (a username, an
//! error message) cannot change the document's structure.

use std::fmt::Write as _;

/// One input of a server form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A text field. openconnect's `--user` fills the one whose name starts with
    /// `user`.
    Text {
        /// Field name, sent back as the element name in `<auth>`.
        name: String,
        /// Prompt shown to the user.
        label: String,
    },
    /// A password field. openconnect's stdin password fills the one whose name
    /// starts with `pass`.
    Password {
        /// Field name.
        name: String,
        /// Prompt shown to the user.
        label: String,
    },
    /// A choice. openconnect matches the user's answer against option **labels**
    /// (case-insensitive, unique prefix) and sends back the option's **value**.
    Select {
        /// Field name.
        name: String,
        /// Prompt shown to the user.
        label: String,
        /// `(value, label)` pairs.
        options: Vec<(String, String)>,
    },
}

/// A server `auth-request` form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Form {
    /// The `<auth id>`: openconnect's `--form-entry FORM_ID:NAME=VALUE` uses it.
    pub id: String,
    /// Optional `<title>`.
    pub title: Option<String>,
    /// Optional `<message>` shown above the inputs.
    pub message: Option<String>,
    /// Optional `<error>` (e.g. "Login failed") shown when re-asking.
    pub error: Option<String>,
    /// The form's `action` path, e.g. `/auth`.
    pub action: String,
    /// The inputs, in display order.
    pub inputs: Vec<Input>,
}

/// True for characters XML 1.0 allows in a document (the `Char` production),
/// other than the three whitespace controls which are handled separately.
pub(super) fn is_xml_char(c: char) -> bool {
    matches!(c, '\u{20}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..='\u{10ffff}')
}

/// Appends `s` escaped for use as XML text or a double- or single-quoted
/// attribute value: `& < > " '` become entities, CR, LF and TAB become character
/// references (so attribute-value normalisation and line-ending normalisation
/// cannot alter them), and characters XML 1.0 cannot represent become U+FFFD.
fn push_escaped(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\r' => out.push_str("&#13;"),
            '\n' => out.push_str("&#10;"),
            '\t' => out.push_str("&#9;"),
            c if is_xml_char(c) => out.push(c),
            _ => out.push('\u{fffd}'),
        }
    }
}

/// Escapes a string for XML text or attribute values (see the module doc):
/// the result can be interpolated anywhere between tags or inside quotes.
#[must_use]
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    push_escaped(&mut out, s);
    out
}

const XML_DECL: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";

/// Builds an `auth-request` body presenting `form`. If `opaque_handle` is given
/// it is sent as `<opaque is-for="sg"><auth-handle>`; the client echoes it back
/// in its reply ([`super::ClientMessage::opaque`]).
#[must_use]
pub fn auth_request_xml(form: &Form, opaque_handle: Option<&str>) -> String {
    let mut out = String::with_capacity(512);
    let e = xml_escape;
    out.push_str(XML_DECL);
    out.push_str(
        "<config-auth client=\"vpn\" type=\"auth-request\" aggregate-auth-version=\"2\">\n",
    );
    // Writing to a String cannot fail: the results of write! are ignored.
    if let Some(handle) = opaque_handle {
        let _ = writeln!(
            out,
            "<opaque is-for=\"sg\"><auth-handle>{}</auth-handle></opaque>",
            e(handle)
        );
    }
    let _ = writeln!(out, "<auth id=\"{}\">", e(&form.id));
    if let Some(title) = &form.title {
        let _ = write!(out, "<title>{}</title>", e(title));
    }
    if let Some(message) = &form.message {
        let _ = write!(out, "<message>{}</message>", e(message));
    }
    if let Some(error) = &form.error {
        let _ = write!(
            out,
            "<error id=\"{}\" param1=\"\" param2=\"\">{}</error>",
            e(&form.id),
            e(error)
        );
    }
    if form.title.is_some() || form.message.is_some() || form.error.is_some() {
        out.push('\n');
    }
    let _ = writeln!(out, "<form method=\"post\" action=\"{}\">", e(&form.action));
    for input in &form.inputs {
        match input {
            Input::Text { name, label } => {
                let _ = writeln!(
                    out,
                    "<input type=\"text\" name=\"{}\" label=\"{}\"></input>",
                    e(name),
                    e(label)
                );
            }
            Input::Password { name, label } => {
                let _ = writeln!(
                    out,
                    "<input type=\"password\" name=\"{}\" label=\"{}\"></input>",
                    e(name),
                    e(label)
                );
            }
            Input::Select {
                name,
                label,
                options,
            } => {
                let _ = write!(out, "<select name=\"{}\" label=\"{}\">", e(name), e(label));
                for (value, option_label) in options {
                    let _ = write!(
                        out,
                        "<option value=\"{}\">{}</option>",
                        e(value),
                        e(option_label)
                    );
                }
                out.push_str("</select>\n");
            }
        }
    }
    out.push_str("</form></auth></config-auth>\n");
    out
}

/// Builds the `complete` body that ends authentication successfully. It holds
/// `<session-token>` (openconnect then sends `Cookie: webvpn=TOKEN`) and the
/// `<auth id="success">` element openconnect requires, with `message` if given.
/// Send `Set-Cookie: webvpn=TOKEN` with it as well.
#[must_use]
pub fn auth_complete_xml(session_token: &str, message: Option<&str>) -> String {
    let mut out = String::with_capacity(384);
    out.push_str(XML_DECL);
    out.push_str("<config-auth client=\"vpn\" type=\"complete\" aggregate-auth-version=\"2\">\n");
    let _ = writeln!(
        out,
        "<session-token>{}</session-token>",
        xml_escape(session_token)
    );
    out.push_str("<auth id=\"success\">");
    if let Some(message) = message {
        let _ = write!(
            out,
            "<message id=\"0\" param1=\"\" param2=\"\">{}</message>",
            xml_escape(message)
        );
    }
    out.push_str("</auth>\n");
    out.push_str("<capabilities><crypto-supported>ssl-dhe</crypto-supported></capabilities>\n");
    out.push_str("</config-auth>\n");
    out
}
