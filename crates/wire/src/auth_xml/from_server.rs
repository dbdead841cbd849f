//! Messages from the server, read by the client plug-in: the
//! `auth-request` forms (text, password, hidden and select inputs) and the
//! `complete` answer, as ocserv, intragate ([`super::auth_request_xml`],
//! [`super::auth_complete_xml`]) and other AnyConnect-compatible gateways
//! send them.
//!
//! Bounded like the client side ([`MAX_BODY`], [`MAX_DEPTH`],
//! [`MAX_VALUE_LEN`]) plus [`MAX_INPUTS`], [`MAX_OPTIONS`], [`MAX_OPAQUE`] and
//! 16 attributes per element; a `<!DOCTYPE` is refused. What the plug-in
//! does with a form (what to prompt, which fields to send) is not decided
//! here.

use std::collections::HashMap;

use quick_xml::events::BytesStart;

use super::limits::MAX_VALUE_LEN;
#[cfg(doc)]
use super::limits::{MAX_BODY, MAX_DEPTH};
use super::walk::{self, Visitor, WalkError};

/// Most inputs in one form.
pub const MAX_INPUTS: usize = 32;
/// Most options in one select.
pub const MAX_OPTIONS: usize = 64;
/// Longest `<opaque>` element echoed back, in bytes.
pub const MAX_OPAQUE: usize = 8 * 1024;
/// Most attributes on one element.
const MAX_ATTRIBUTES: usize = 16;
/// Longest field name, in bytes ([`valid_field_name`]).
const MAX_FIELD_NAME: usize = 64;
/// Longest form action, in bytes.
const MAX_ACTION: usize = 1024;

/// Why a server auth message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServerXmlError {
    /// Body larger than [`MAX_BODY`].
    #[error("auth body of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// Not UTF-8.
    #[error("auth body is not valid UTF-8")]
    NotUtf8,
    /// A `<!DOCTYPE>` (entity declarations are never processed).
    #[error("DOCTYPE is not allowed")]
    DoctypeForbidden,
    /// Nested deeper than [`MAX_DEPTH`].
    #[error("XML nested too deeply")]
    TooDeep,
    /// More than [`MAX_INPUTS`] inputs or [`MAX_OPTIONS`] options.
    #[error("too many form inputs or options")]
    TooManyInputs,
    /// A string longer than [`MAX_VALUE_LEN`] (or `<opaque>` over [`MAX_OPAQUE`]).
    #[error("value too long")]
    TooLong,
    /// The root is not `<config-auth>`.
    #[error("not a config-auth document")]
    UnexpectedRoot,
    /// `<config-auth type=...>` is neither `auth-request` nor `complete`
    /// (the type, control characters escaped, at most 40 characters).
    #[error("unexpected config-auth type '{0}'")]
    UnexpectedType(String),
    /// An `auth-request` without a `<form>`, or asking for something the
    /// plug-in cannot do (client certificate, single sign-on, an unknown
    /// input type).
    #[error("unsupported auth request: {0}")]
    Unsupported(&'static str),
    /// An input name that cannot be sent back as an XML element name
    /// (control characters escaped, at most 64 characters).
    #[error("invalid form field name '{0}'")]
    BadFieldName(String),
    /// The form's action is not a path on the same server.
    #[error("invalid form action")]
    BadAction,
    /// Structure errors (several roots, text outside the root, ...).
    #[error("malformed auth message: {0}")]
    Malformed(&'static str),
    /// The XML reader refused the body (message bounded; may quote the
    /// server's bytes, escape before display).
    #[error("invalid XML: {0}")]
    Xml(String),
}

impl From<WalkError> for ServerXmlError {
    fn from(e: WalkError) -> Self {
        match e {
            WalkError::TooLarge(n) => Self::TooLarge(n),
            WalkError::NotUtf8 => Self::NotUtf8,
            WalkError::DoctypeForbidden => Self::DoctypeForbidden,
            WalkError::TooDeep => Self::TooDeep,
            WalkError::TooLong => Self::TooLong,
            WalkError::Malformed(why) => Self::Malformed(why),
            WalkError::Xml(message) => Self::Xml(message),
        }
    }
}

fn xml_err(e: impl std::fmt::Display) -> ServerXmlError {
    ServerXmlError::Xml(walk::xml_message(e))
}

/// `s` with control characters escaped, at most `max` characters (then
/// `…`): safe to put in an error message shown on a terminal.
fn printable(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max) + 4);
    for (count, c) in s.chars().enumerate() {
        if count >= max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// One option of a select: the value sent back, the label shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectOption {
    /// Sent back when chosen.
    pub value: String,
    /// Shown to the user and matched against answers (the value when the
    /// server gave no label).
    pub label: String,
}

/// One input of a server form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormInput {
    /// A text field (`value` = default, often empty).
    Text {
        /// Field name.
        name: String,
        /// Prompt.
        label: String,
        /// Default value.
        value: String,
    },
    /// A password field.
    Password {
        /// Field name.
        name: String,
        /// Prompt.
        label: String,
    },
    /// A hidden field, sent back unchanged.
    Hidden {
        /// Field name.
        name: String,
        /// Value.
        value: String,
    },
    /// A choice.
    Select {
        /// Field name.
        name: String,
        /// Prompt.
        label: String,
        /// The options, in order.
        options: Vec<SelectOption>,
    },
}

impl FormInput {
    /// The field name.
    #[must_use]
    pub fn name(&self) -> &str {
        match self {
            Self::Text { name, .. }
            | Self::Password { name, .. }
            | Self::Hidden { name, .. }
            | Self::Select { name, .. } => name,
        }
    }
}

/// A form the gateway asks the user to fill.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServerForm {
    /// `<auth id>`: `main`, `transfer`, ...
    pub id: String,
    /// `<title>` (trimmed; repeated elements joined by a newline).
    pub title: Option<String>,
    /// `<message>` (e.g. the transfer offer listing the existing sessions).
    pub message: Option<String>,
    /// `<error>` (e.g. "Login failed") when the form is shown again.
    pub error: Option<String>,
    /// `<banner>`.
    pub banner: Option<String>,
    /// Path to POST the answer to (validated: starts with `/`, not `//`, no
    /// spaces or control characters).
    pub action: String,
    /// The inputs in display order (submit buttons left out); every name
    /// passes [`valid_field_name`].
    pub inputs: Vec<FormInput>,
}

/// A parsed `auth-request`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthRequest {
    /// The form.
    pub form: ServerForm,
    /// The raw `<opaque ...>...</opaque>` element (at most [`MAX_OPAQUE`]
    /// bytes of the well-formed document), to be echoed back verbatim in the
    /// reply (intragate keeps its auth handle there).
    pub opaque: Option<String>,
}

/// A parsed `complete` answer. `Debug` does not show the session token.
#[derive(Clone, PartialEq, Eq)]
pub struct Complete {
    /// `<session-token>`, if the server sent one (trimmed, not empty).
    pub session_token: Option<String>,
    /// `<message>` or `<title>` of `<auth id="success">`.
    pub message: Option<String>,
    /// `<banner>`.
    pub banner: Option<String>,
}

impl std::fmt::Debug for Complete {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Complete")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .field("message", &self.message)
            .field("banner", &self.banner)
            .finish()
    }
}

/// A server `<config-auth>` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMessage {
    /// `type="auth-request"`: fill and post the form.
    AuthRequest(AuthRequest),
    /// `type="complete"`: logged on.
    Complete(Complete),
}

/// True for names that can be sent back as XML elements: ASCII letter or
/// `_` first, then letters, digits, `_`, `-`, `.`; 1..=64 bytes.
#[must_use]
pub fn valid_field_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && name.len() <= MAX_FIELD_NAME
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

fn valid_action(action: &str) -> bool {
    action.starts_with('/')
        && !action.starts_with("//")
        && action.len() <= MAX_ACTION
        && !action.chars().any(|c| c.is_control() || c == ' ')
}

fn check_len(s: &str) -> Result<(), ServerXmlError> {
    if s.len() > MAX_VALUE_LEN {
        Err(ServerXmlError::TooLong)
    } else {
        Ok(())
    }
}

/// Element attributes, validated and unescaped.
fn attributes(e: &BytesStart<'_>) -> Result<HashMap<String, String>, ServerXmlError> {
    let mut out = HashMap::new();
    for attr in e.attributes() {
        let attr = attr.map_err(xml_err)?;
        let key = std::str::from_utf8(attr.key.as_ref())
            .map_err(|_| ServerXmlError::NotUtf8)?
            .to_owned();
        let value = attr.unescape_value().map_err(xml_err)?.into_owned();
        check_len(&value)?;
        out.insert(key, value);
        if out.len() > MAX_ATTRIBUTES {
            return Err(ServerXmlError::Malformed("too many attributes"));
        }
    }
    Ok(out)
}

/// Which text the parser is collecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Capture {
    Title,
    Message,
    Error,
    Banner,
    SessionToken,
    /// The label of the last option of the last select.
    OptionLabel,
}

/// The message being read.
#[derive(Default)]
struct ServerWalk {
    /// The root's `type` once the root opened.
    kind: Option<String>,
    form: ServerForm,
    saw_form: bool,
    opaque: Option<String>,
    token: Option<String>,
    unsupported: Option<&'static str>,
}

impl ServerWalk {
    fn text_slot(&mut self, c: Capture) -> Option<&mut String> {
        match c {
            Capture::Title => Some(self.form.title.get_or_insert_with(String::new)),
            Capture::Message => Some(self.form.message.get_or_insert_with(String::new)),
            Capture::Error => Some(self.form.error.get_or_insert_with(String::new)),
            Capture::Banner => Some(self.form.banner.get_or_insert_with(String::new)),
            Capture::SessionToken => Some(self.token.get_or_insert_with(String::new)),
            Capture::OptionLabel => match self.form.inputs.last_mut() {
                Some(FormInput::Select { options, .. }) => options.last_mut().map(|o| &mut o.label),
                _ => None,
            },
        }
    }

    /// An `<input>` or `<select>` of the form.
    fn input(
        &mut self,
        element: &str,
        attrs: &HashMap<String, String>,
    ) -> Result<(), ServerXmlError> {
        if self.form.inputs.len() >= MAX_INPUTS {
            return Err(ServerXmlError::TooManyInputs);
        }
        let field = attrs.get("name").cloned().unwrap_or_default();
        let label = attrs.get("label").cloned().unwrap_or_default();
        let ty = attrs.get("type").map_or("text", String::as_str);
        if element == "input" && ty == "submit" {
            // A button; nothing to send.
            return Ok(());
        }
        if !valid_field_name(&field) {
            return Err(ServerXmlError::BadFieldName(printable(
                &field,
                MAX_FIELD_NAME,
            )));
        }
        let input = if element == "select" {
            FormInput::Select {
                name: field,
                label,
                options: Vec::new(),
            }
        } else {
            match ty {
                "password" => FormInput::Password { name: field, label },
                "hidden" => FormInput::Hidden {
                    name: field,
                    value: attrs.get("value").cloned().unwrap_or_default(),
                },
                "text" | "" => FormInput::Text {
                    name: field,
                    label,
                    value: attrs.get("value").cloned().unwrap_or_default(),
                },
                _ => return Err(ServerXmlError::Unsupported("an unknown input type")),
            }
        };
        self.form.inputs.push(input);
        Ok(())
    }
}

impl Visitor for ServerWalk {
    type Error = ServerXmlError;
    type Slot = Capture;

    fn open(
        &mut self,
        path: &[&str],
        name: &str,
        e: &BytesStart<'_>,
    ) -> Result<Option<Capture>, ServerXmlError> {
        let attrs = attributes(e)?;
        match path {
            [] => {
                if self.kind.is_some() {
                    return Err(ServerXmlError::Malformed("several root elements"));
                }
                if name != "config-auth" {
                    return Err(ServerXmlError::UnexpectedRoot);
                }
                self.kind = Some(attrs.get("type").cloned().unwrap_or_default());
            }
            ["config-auth"] => match name {
                "auth" => self.form.id = attrs.get("id").cloned().unwrap_or_default(),
                "session-token" => return Ok(Some(Capture::SessionToken)),
                "client-cert-request" => {
                    self.unsupported = Some("the gateway asks for a client certificate");
                }
                _ => {}
            },
            ["config-auth", "auth"] | ["config-auth", "auth", "form"]
                if matches!(name, "title" | "message" | "error" | "banner") =>
            {
                let c = match name {
                    "title" => Capture::Title,
                    "message" => Capture::Message,
                    "error" => Capture::Error,
                    _ => Capture::Banner,
                };
                // A repeated element replaces nothing: texts are joined,
                // the newline counted against the bound.
                if let Some(slot) = self.text_slot(c) {
                    if !slot.is_empty() {
                        if slot.len() >= MAX_VALUE_LEN {
                            return Err(ServerXmlError::TooLong);
                        }
                        slot.push('\n');
                    }
                }
                return Ok(Some(c));
            }
            ["config-auth", "auth"] if name == "form" => {
                self.saw_form = true;
                let action = attrs.get("action").map_or("/", String::as_str);
                let action = if action.is_empty() { "/" } else { action };
                if !valid_action(action) {
                    return Err(ServerXmlError::BadAction);
                }
                action.clone_into(&mut self.form.action);
            }
            ["config-auth", "auth", "form"] | ["config-auth", "auth"]
                if name == "input" || name == "select" =>
            {
                self.input(name, &attrs)?;
            }
            ["config-auth", "auth", "form", "select"] | ["config-auth", "auth", "select"]
                if name == "option" =>
            {
                if let Some(FormInput::Select { options, .. }) = self.form.inputs.last_mut() {
                    if options.len() >= MAX_OPTIONS {
                        return Err(ServerXmlError::TooManyInputs);
                    }
                    options.push(SelectOption {
                        value: attrs.get("value").cloned().unwrap_or_default(),
                        label: String::new(),
                    });
                    return Ok(Some(Capture::OptionLabel));
                }
            }
            ["config-auth", "auth", ..] if name == "sso-v2-login" => {
                self.unsupported = Some("the gateway asks for single sign-on in a browser");
            }
            _ => {}
        }
        Ok(None)
    }

    fn close(
        &mut self,
        path: &[&str],
        name: &str,
        raw: Option<&str>,
    ) -> Result<(), ServerXmlError> {
        // Each `<opaque>` under the root replaces the one before.
        if let (["config-auth"], "opaque") = (path, name) {
            let raw = raw.ok_or(ServerXmlError::Malformed("opaque"))?;
            if raw.len() > MAX_OPAQUE {
                return Err(ServerXmlError::TooLong);
            }
            self.opaque = Some(raw.to_owned());
        }
        Ok(())
    }

    fn slot(&mut self, c: Capture) -> Option<&mut String> {
        self.text_slot(c)
    }
}

/// Trimmed, and `None` when empty.
fn tidy(s: Option<String>) -> Option<String> {
    s.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

/// Parses a server `<config-auth>` body: an `auth-request` or `complete`.
///
/// # Errors
/// Any [`ServerXmlError`]; never panics.
pub fn parse_server_message(body: &[u8]) -> Result<ServerMessage, ServerXmlError> {
    let mut walk = ServerWalk::default();
    walk::walk(body, &mut walk)?;
    let kind = walk
        .kind
        .take()
        .ok_or(ServerXmlError::Malformed("no root element"))?;
    match kind.as_str() {
        "auth-request" => {
            if let Some(why) = walk.unsupported {
                return Err(ServerXmlError::Unsupported(why));
            }
            if !walk.saw_form {
                return Err(ServerXmlError::Unsupported(
                    "an auth-request without a form",
                ));
            }
            let mut form = walk.form;
            form.title = tidy(form.title);
            form.message = tidy(form.message);
            form.error = tidy(form.error);
            form.banner = tidy(form.banner);
            for input in &mut form.inputs {
                if let FormInput::Select { options, .. } = input {
                    for o in options.iter_mut() {
                        o.label = o.label.trim().to_owned();
                        if o.label.is_empty() {
                            o.label.clone_from(&o.value);
                        }
                    }
                }
            }
            Ok(ServerMessage::AuthRequest(AuthRequest {
                form,
                opaque: walk.opaque,
            }))
        }
        "complete" => {
            let form = walk.form;
            Ok(ServerMessage::Complete(Complete {
                session_token: tidy(walk.token),
                message: tidy(form.message).or(tidy(form.title)),
                banner: tidy(form.banner),
            }))
        }
        other => Err(ServerXmlError::UnexpectedType(printable(other, 40))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;
    use crate::auth_xml::{auth_complete_xml, auth_request_xml, Form, Input, MAX_BODY, MAX_DEPTH};

    /// ocserv 1.1.6, first step.
    const OCSERV_USER: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<config-auth client="vpn" type="auth-request">
<version who="sg">0.1(1)</version>
<auth id="main">
<message>Please enter your username.</message>
<form method="post" action="/auth">
<input type="text" name="username" label="Username:" />
</form></auth>
</config-auth>"#;

    /// ocserv 1.1.6, success.
    const OCSERV_COMPLETE: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<config-auth client="vpn" type="complete">
<version who="sg">0.1(1)</version>
<auth id="success">
<title>SSL VPN Service</title></auth></config-auth>"#;

    /// The transfer offer (DESIGN.md §5), as the gateway sends it.
    const TRANSFER: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<config-auth client="vpn" type="auth-request" aggregate-auth-version="2">
<opaque is-for="sg"><auth-handle>h-42</auth-handle></opaque>
<auth id="transfer">
<title>Session transfer</title><message>You are already logged on: device alice-laptop, intranet IP 198.18.64.2, idle 5 min. Transfer that session to this device?</message>
<form method="post" action="/auth">
<select name="action" label="Action:"><option value="transfer">Transfer</option><option value="cancel">Cancel</option></select>
</form></auth></config-auth>"#;

    /// An AnyConnect-style form: banner, error, hidden input, a group
    /// select without labels, a submit button.
    const ANYCONNECT: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<config-auth client="vpn" type="auth-request" aggregate-auth-version="2">
<opaque is-for="sg"><tunnel-group>staff</tunnel-group><config-hash>17</config-hash></opaque>
<auth id="main">
<title> Login </title>
<banner>Authorised use only.</banner>
<error id="98" param1="" param2="">Login failed.</error>
<form method="post" action="/+webvpn+/index.html">
<input type="hidden" name="tgcookieset" value="true"/>
<select name="group_list" label="GROUP:"><option value="staff"/><option value="guests"> Guests </option></select>
<input type="text" name="username" label="Username:" value="alice"></input>
<input type="password" name="password" label="Password:"></input>
<input type="submit" name="Login" value="Login"/>
</form></auth></config-auth>"#;

    fn request(xml: &str) -> AuthRequest {
        match parse_server_message(xml.as_bytes()).unwrap() {
            ServerMessage::AuthRequest(r) => r,
            other => panic!("{other:?}"),
        }
    }

    fn complete(xml: &str) -> Complete {
        match parse_server_message(xml.as_bytes()).unwrap() {
            ServerMessage::Complete(c) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_ocserv_form_and_complete() {
        let r = request(OCSERV_USER);
        assert_eq!(r.form.id, "main");
        assert_eq!(r.form.action, "/auth");
        assert_eq!(
            r.form.message.as_deref(),
            Some("Please enter your username.")
        );
        assert_eq!(r.form.title, None);
        assert_eq!(
            r.form.inputs,
            vec![FormInput::Text {
                name: "username".into(),
                label: "Username:".into(),
                value: String::new()
            }]
        );
        assert_eq!(r.opaque, None);
        let c = complete(OCSERV_COMPLETE);
        assert_eq!(c.session_token, None);
        assert_eq!(c.message.as_deref(), Some("SSL VPN Service"));
    }

    #[test]
    fn parses_anyconnect_form() {
        let r = request(ANYCONNECT);
        let f = &r.form;
        assert_eq!(f.title.as_deref(), Some("Login"));
        assert_eq!(f.banner.as_deref(), Some("Authorised use only."));
        assert_eq!(f.error.as_deref(), Some("Login failed."));
        assert_eq!(f.action, "/+webvpn+/index.html");
        let names: Vec<&str> = f.inputs.iter().map(FormInput::name).collect();
        assert_eq!(names, ["tgcookieset", "group_list", "username", "password"]);
        assert_eq!(
            f.inputs[0],
            FormInput::Hidden {
                name: "tgcookieset".into(),
                value: "true".into()
            }
        );
        let FormInput::Select { options, label, .. } = &f.inputs[1] else {
            panic!("{:?}", f.inputs[1])
        };
        assert_eq!(label, "GROUP:");
        // No label: the value; labels are trimmed.
        assert_eq!(
            options,
            &vec![
                SelectOption {
                    value: "staff".into(),
                    label: "staff".into()
                },
                SelectOption {
                    value: "guests".into(),
                    label: "Guests".into()
                },
            ]
        );
        assert!(matches!(&f.inputs[2], FormInput::Text { value, .. } if value == "alice"));
        // The opaque element is kept verbatim, markup included.
        assert_eq!(
            r.opaque.as_deref(),
            Some("<opaque is-for=\"sg\"><tunnel-group>staff</tunnel-group><config-hash>17</config-hash></opaque>")
        );
    }

    #[test]
    fn parses_transfer_offer() {
        let r = request(TRANSFER);
        assert_eq!(r.form.id, "transfer");
        assert_eq!(r.form.title.as_deref(), Some("Session transfer"));
        assert!(r.form.message.as_deref().unwrap().contains("198.18.64.2"));
        let FormInput::Select { name, options, .. } = &r.form.inputs[0] else {
            panic!()
        };
        assert_eq!(name, "action");
        assert_eq!(options.len(), 2);
        assert_eq!(options[1].value, "cancel");
        assert_eq!(
            r.opaque.as_deref(),
            Some("<opaque is-for=\"sg\"><auth-handle>h-42</auth-handle></opaque>")
        );
    }

    /// What the gateway's own builders produce reads back the same.
    #[test]
    fn reads_the_gateway_builders() {
        let form = Form {
            id: "main".into(),
            title: Some("intragate".into()),
            message: Some("Please enter your username and password.".into()),
            error: Some("Login failed <again>".into()),
            action: "/auth".into(),
            inputs: vec![
                Input::Text {
                    name: "username".into(),
                    label: "Username:".into(),
                },
                Input::Select {
                    name: "action".into(),
                    label: "Action:".into(),
                    options: vec![("transfer".into(), "Transfer & go".into())],
                },
            ],
        };
        let r = request(&auth_request_xml(&form, Some("handle<1>")));
        assert_eq!(r.form.error.as_deref(), Some("Login failed <again>"));
        assert_eq!(r.form.title.as_deref(), Some("intragate"));
        let FormInput::Select { options, .. } = &r.form.inputs[1] else {
            panic!()
        };
        assert_eq!(options[0].label, "Transfer & go");
        assert_eq!(
            r.opaque.as_deref(),
            Some("<opaque is-for=\"sg\"><auth-handle>handle&lt;1&gt;</auth-handle></opaque>")
        );
        let c = complete(&auth_complete_xml(" TOK&1 ", Some("Welcome")));
        assert_eq!(c.session_token.as_deref(), Some("TOK&1"));
        assert_eq!(c.message.as_deref(), Some("Welcome"));
        assert!(!format!("{c:?}").contains("TOK"));
    }

    #[test]
    fn repeated_texts_are_joined() {
        let doc = "<config-auth type=\"auth-request\"><auth id=\"m\"><message>a</message>\
<form><message>b</message></form><message/></auth></config-auth>";
        assert_eq!(request(doc).form.message.as_deref(), Some("a\nb"));
        // The joining newlines count against the bound.
        let long = format!(
            "<config-auth type=\"complete\"><auth><title>{}</title>{}</auth></config-auth>",
            "t".repeat(MAX_VALUE_LEN),
            "<title/>".repeat(3)
        );
        assert_eq!(
            parse_server_message(long.as_bytes()),
            Err(ServerXmlError::TooLong)
        );
    }

    #[test]
    fn hostile_documents_are_refused() {
        let cases: &[(&str, &str)] = &[
            ("<!DOCTYPE x [<!ENTITY a 'b'>]><config-auth type=\"complete\"/>", "DOCTYPE"),
            ("<html><body>hi</body></html>", "not a config-auth"),
            ("<config-auth type=\"complete\">", "unclosed"),
            ("<config-auth type=\"weird\"></config-auth>", "unexpected config-auth type"),
            ("<config-auth type=\"auth-request\"><auth id=\"m\"></auth></config-auth>", "without a form"),
            (
                "<config-auth type=\"auth-request\"><auth id=\"m\"><form action=\"https://evil/\"></form></auth></config-auth>",
                "action",
            ),
            (
                "<config-auth type=\"auth-request\"><auth id=\"m\"><form><input type=\"text\" name=\"a&gt;b\"/></form></auth></config-auth>",
                "field name",
            ),
            (
                "<config-auth type=\"auth-request\"><client-cert-request/><auth id=\"m\"><form/></auth></config-auth>",
                "client certificate",
            ),
            ("<config-auth type=\"complete\"/>trailing", "outside the root"),
            ("\u{1}\u{2}garbage", "outside the root"),
            ("<config-auth type=\"complete\"><a></b></config-auth>", "invalid XML"),
        ];
        for (doc, want) in cases {
            let err = parse_server_message(doc.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{doc}: {err}");
        }
        let deep = "<a>".repeat(100);
        assert!(
            parse_server_message(format!("<config-auth type=\"complete\">{deep}").as_bytes())
                .is_err()
        );
        let many = "<input type=\"text\" name=\"x\"/>".repeat(40);
        let doc = format!("<config-auth type=\"auth-request\"><auth id=\"m\"><form>{many}</form></auth></config-auth>");
        assert_eq!(
            parse_server_message(doc.as_bytes()),
            Err(ServerXmlError::TooManyInputs)
        );
        assert!(matches!(
            parse_server_message(&vec![b' '; MAX_BODY + 1]),
            Err(ServerXmlError::TooLarge(_))
        ));
    }

    #[test]
    fn errors_by_kind() {
        let form = |inner: &str| {
            format!("<config-auth type=\"auth-request\"><auth id=\"m\"><form action=\"/a\">{inner}</form></auth></config-auth>")
        };
        let cases: Vec<(Vec<u8>, ServerXmlError)> = vec![
            (b"".to_vec(), ServerXmlError::Malformed("no root element")),
            (b"<config-auth type=\"complete\"/><config-auth type=\"complete\"/>".to_vec(),
                ServerXmlError::Malformed("several root elements")),
            (b"<config-auth type=\"\xff\"/>".to_vec(), ServerXmlError::NotUtf8),
            (b"<config-auth type=\"a\x1bb\"/>".to_vec(), ServerXmlError::UnexpectedType("a\\u{1b}b".into())),
            (form("<input type=\"file\" name=\"f\"/>").into_bytes(), ServerXmlError::Unsupported("an unknown input type")),
            (form("<input name=\"1x\"/>").into_bytes(), ServerXmlError::BadFieldName("1x".into())),
            (form("<input/>").into_bytes(), ServerXmlError::BadFieldName(String::new())),
            (
                form(&format!("<input name=\"{}\"/>", "n".repeat(65))).into_bytes(),
                ServerXmlError::BadFieldName(format!("{}…", "n".repeat(64))),
            ),
            (b"<config-auth type=\"auth-request\"><auth><sso-v2-login>u</sso-v2-login><form/></auth></config-auth>".to_vec(),
                ServerXmlError::Unsupported("the gateway asks for single sign-on in a browser")),
            (b"<config-auth type=\"auth-request\"><auth><form action=\"//evil/\"/></auth></config-auth>".to_vec(), ServerXmlError::BadAction),
            (b"<config-auth type=\"auth-request\"><auth><form action=\"/a b\"/></auth></config-auth>".to_vec(), ServerXmlError::BadAction),
        ];
        for (doc, want) in cases {
            assert_eq!(
                parse_server_message(&doc),
                Err(want),
                "{}",
                String::from_utf8_lossy(&doc)
            );
        }
        // A form without action posts to "/"; a submit button is no input.
        let r = request(
            "<config-auth type=\"auth-request\"><auth><form><input type=\"submit\" name=\"1\"/></form></auth></config-auth>",
        );
        assert_eq!(r.form.action, "/");
        assert!(r.form.inputs.is_empty());
    }

    #[test]
    fn bounds() {
        // Depth: 16 levels are fine, 17 are not.
        let nest = |n: usize| {
            format!(
                "<config-auth type=\"complete\">{}{}</config-auth>",
                "<a>".repeat(n - 1),
                "</a>".repeat(n - 1)
            )
        };
        assert!(parse_server_message(nest(MAX_DEPTH).as_bytes()).is_ok());
        assert_eq!(
            parse_server_message(nest(MAX_DEPTH + 1).as_bytes()),
            Err(ServerXmlError::TooDeep)
        );
        // Inputs and options.
        let inputs = |n: usize| {
            format!(
                "<config-auth type=\"auth-request\"><auth><form>{}</form></auth></config-auth>",
                "<input name=\"x\"/>".repeat(n)
            )
        };
        assert_eq!(request(&inputs(MAX_INPUTS)).form.inputs.len(), MAX_INPUTS);
        assert_eq!(
            parse_server_message(inputs(MAX_INPUTS + 1).as_bytes()),
            Err(ServerXmlError::TooManyInputs)
        );
        let options = |n: usize| {
            format!(
                "<config-auth type=\"auth-request\"><auth><form><select name=\"s\">{}</select></form></auth></config-auth>",
                "<option value=\"v\">l</option>".repeat(n)
            )
        };
        assert!(parse_server_message(options(MAX_OPTIONS).as_bytes()).is_ok());
        assert_eq!(
            parse_server_message(options(MAX_OPTIONS + 1).as_bytes()),
            Err(ServerXmlError::TooManyInputs)
        );
        // Attributes: their number and their values.
        let attrs: String = (0..17).map(|i| format!(" a{i}=\"v\"")).collect();
        assert_eq!(
            parse_server_message(
                format!("<config-auth type=\"complete\"><x{attrs}/></config-auth>").as_bytes()
            ),
            Err(ServerXmlError::Malformed("too many attributes"))
        );
        let long = "v".repeat(MAX_VALUE_LEN + 1);
        assert_eq!(
            parse_server_message(
                format!("<config-auth type=\"complete\" x=\"{long}\"/>").as_bytes()
            ),
            Err(ServerXmlError::TooLong)
        );
        // Text, counted after unescaping and across pieces.
        let token = |t: &str| {
            format!(
                "<config-auth type=\"complete\"><session-token>{t}</session-token></config-auth>"
            )
        };
        assert!(parse_server_message(token(&"&amp;".repeat(MAX_VALUE_LEN)).as_bytes()).is_ok());
        assert_eq!(
            parse_server_message(
                token(&format!("{}<!-- c -->{}", "x".repeat(600), "y".repeat(600))).as_bytes()
            ),
            Err(ServerXmlError::TooLong)
        );
        // The opaque element, with or without content.
        let opaque = |inner: &str| {
            format!("<config-auth type=\"auth-request\"><opaque>{inner}</opaque><auth><form/></auth></config-auth>")
        };
        let fits = "<h>x</h>".repeat((MAX_OPAQUE - 17) / 8);
        assert!(request(&opaque(&fits)).opaque.unwrap().len() <= MAX_OPAQUE);
        assert_eq!(
            parse_server_message(opaque(&"<h>x</h>".repeat(MAX_OPAQUE / 8)).as_bytes()),
            Err(ServerXmlError::TooLong)
        );
        let attrs: String = (0..16)
            .map(|i| format!(" a{i}=\"{}\"", "v".repeat(600)))
            .collect();
        assert_eq!(
            parse_server_message(format!("<config-auth type=\"auth-request\"><opaque{attrs}/><auth><form/></auth></config-auth>").as_bytes()),
            Err(ServerXmlError::TooLong)
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics(doc in ".{0,400}") {
            let _ = parse_server_message(doc.as_bytes());
        }

        #[test]
        fn mutated_forms_never_panic(cut in 0usize..600, byte in proptest::num::u8::ANY) {
            let mut b = ANYCONNECT.as_bytes().to_vec();
            if cut < b.len() { b[cut] = byte; }
            let _ = parse_server_message(&b);
            let _ = parse_server_message(&b[..cut.min(b.len())]);
        }
    }
}
