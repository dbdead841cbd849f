//! The gateway's AnyConnect "aggregate auth" XML, seen from the client:
//! parsing `auth-request` forms and the `complete` answer, filling a form from
//! flags, stdin or a terminal prompt, and building the `init` and
//! `auth-reply` bodies.
//!
//! A form may hold text, password, hidden and select inputs; any number of
//! forms may follow each other (ocserv asks for the username, then the
//! password; intragate asks both at once, then maybe the **transfer** form:
//! `<auth id="transfer">` with `<select name="action">` offering
//! Transfer/Cancel, see DESIGN.md §5).
//!
//! Select answers follow openconnect (PEERS.md item 9): an answer matches an
//! option by value, else by label (case-insensitive, exact or unique prefix),
//! and the option's **value** is sent.
//!
//! Parsing is bounded like the server side ([`crate::wire::auth_xml`]):
//! size, depth, number of inputs and options, length of every string; a
//! `<!DOCTYPE` is refused, so no entity expansion can happen.

use std::collections::HashMap;

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

use super::Secret;
use crate::wire::auth_xml::{xml_escape, MAX_BODY, MAX_DEPTH, MAX_VALUE_LEN};

/// Most inputs in one form.
pub const MAX_INPUTS: usize = 32;
/// Most options in one select.
pub const MAX_OPTIONS: usize = 64;
/// Longest `<opaque>` element echoed back, in bytes.
pub const MAX_OPAQUE: usize = 8 * 1024;

/// The `<version>` we announce: the openconnect protocol level we follow.
pub const CLIENT_VERSION: &str = "v9.01";
/// The `<device-id>` we announce.
pub const DEVICE_ID: &str = "linux-64";

/// Why a server auth message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormXmlError {
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
    /// `<config-auth type=...>` is neither `auth-request` nor `complete`.
    #[error("unexpected config-auth type '{0}'")]
    UnexpectedType(String),
    /// An `auth-request` without a `<form>`, or asking for something the
    /// plug-in cannot do (client certificate, single sign-on).
    #[error("unsupported auth request: {0}")]
    Unsupported(&'static str),
    /// An input name that cannot be sent back as an XML element name.
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

fn xml_err(e: impl std::fmt::Display) -> FormXmlError {
    FormXmlError::Xml(e.to_string().chars().take(200).collect())
}

/// One option of a select: the value sent back, the label shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectOption {
    /// Sent back when chosen.
    pub value: String,
    /// Shown to the user and matched against answers.
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
    /// `<auth id>`: `main`, `transfer`, ... (`--form-entry ID:NAME=VALUE`).
    pub id: String,
    /// `<title>`.
    pub title: Option<String>,
    /// `<message>` (e.g. the transfer offer listing the existing sessions).
    pub message: Option<String>,
    /// `<error>` (e.g. "Login failed") when the form is shown again.
    pub error: Option<String>,
    /// `<banner>`.
    pub banner: Option<String>,
    /// Path to POST the answer to (validated: starts with `/`, no spaces).
    pub action: String,
    /// The inputs in display order.
    pub inputs: Vec<FormInput>,
}

/// A parsed `auth-request`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthRequest {
    /// The form.
    pub form: ServerForm,
    /// The raw `<opaque ...>...</opaque>` element, echoed back verbatim in
    /// the reply (intragate keeps its auth handle there).
    pub opaque: Option<String>,
}

/// A parsed `complete` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Complete {
    /// `<session-token>`, if the server sent one (else the `webvpn` cookie).
    pub session_token: Option<Secret>,
    /// `<message>` or `<title>` of `<auth id="success">`.
    pub message: Option<String>,
    /// `<banner>`.
    pub banner: Option<String>,
}

/// A server `<config-auth>` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMessage {
    /// `type="auth-request"`: fill and post the form.
    AuthRequest(AuthRequest),
    /// `type="complete"`: logged on.
    Complete(Complete),
}

/// True for names we can send back as XML elements: ASCII letter or `_`
/// first, then letters, digits, `_`, `-`, `.`; 1..=64 bytes.
fn valid_field_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && name.len() <= 64
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

fn valid_action(action: &str) -> bool {
    action.starts_with('/')
        && !action.starts_with("//")
        && action.len() <= 1024
        && !action.chars().any(|c| c.is_control() || c == ' ')
}

fn check_len(s: &str) -> Result<(), FormXmlError> {
    if s.len() > MAX_VALUE_LEN {
        Err(FormXmlError::TooLong)
    } else {
        Ok(())
    }
}

/// Element attributes, validated and unescaped.
fn attributes(e: &BytesStart<'_>) -> Result<HashMap<String, String>, FormXmlError> {
    let mut out = HashMap::new();
    for attr in e.attributes() {
        let attr = attr.map_err(xml_err)?;
        let key = std::str::from_utf8(attr.key.as_ref())
            .map_err(|_| FormXmlError::NotUtf8)?
            .to_owned();
        let value = attr.unescape_value().map_err(xml_err)?.into_owned();
        check_len(&value)?;
        out.insert(key, value);
        if out.len() > 16 {
            return Err(FormXmlError::Malformed("too many attributes"));
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

#[derive(Default)]
struct Walk {
    stack: Vec<String>,
    kind: Option<String>,
    form: ServerForm,
    saw_form: bool,
    opaque: Option<String>,
    token: Option<String>,
    capture: Option<(Capture, usize)>,
    unsupported: Option<&'static str>,
}

impl Walk {
    fn slot(&mut self, c: Capture) -> Option<&mut String> {
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

    fn open(&mut self, e: &BytesStart<'_>, empty: bool) -> Result<(), FormXmlError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(FormXmlError::TooDeep);
        }
        let name = std::str::from_utf8(e.name().as_ref())
            .map_err(|_| FormXmlError::NotUtf8)?
            .to_owned();
        check_len(&name)?;
        let attrs = attributes(e)?;
        let depth = self.stack.len() + 1;
        let path: Vec<&str> = self.stack.iter().map(String::as_str).collect();
        match path.as_slice() {
            [] => {
                if self.kind.is_some() {
                    return Err(FormXmlError::Malformed("several root elements"));
                }
                if name != "config-auth" {
                    return Err(FormXmlError::UnexpectedRoot);
                }
                self.kind = Some(attrs.get("type").cloned().unwrap_or_default());
            }
            ["config-auth"] => match name.as_str() {
                "auth" => self.form.id = attrs.get("id").cloned().unwrap_or_default(),
                "session-token" => self.capture = Some((Capture::SessionToken, depth)),
                "client-cert-request" => {
                    self.unsupported = Some("the gateway asks for a client certificate")
                }
                _ => {}
            },
            ["config-auth", "auth"] | ["config-auth", "auth", "form"]
                if matches!(name.as_str(), "title" | "message" | "error" | "banner") =>
            {
                let c = match name.as_str() {
                    "title" => Capture::Title,
                    "message" => Capture::Message,
                    "error" => Capture::Error,
                    _ => Capture::Banner,
                };
                // A repeated element replaces nothing: texts are joined.
                if let Some(slot) = self.slot(c) {
                    if !slot.is_empty() {
                        slot.push('\n');
                    }
                }
                self.capture = Some((c, depth));
            }
            ["config-auth", "auth"] if name == "form" => {
                self.saw_form = true;
                let action = attrs.get("action").map_or("/", String::as_str);
                let action = if action.is_empty() { "/" } else { action };
                if !valid_action(action) {
                    return Err(FormXmlError::BadAction);
                }
                self.form.action = action.to_owned();
            }
            ["config-auth", "auth", "form"] | ["config-auth", "auth"]
                if name == "input" || name == "select" =>
            {
                if self.form.inputs.len() >= MAX_INPUTS {
                    return Err(FormXmlError::TooManyInputs);
                }
                let field = attrs.get("name").cloned().unwrap_or_default();
                let label = attrs.get("label").cloned().unwrap_or_default();
                let ty = attrs.get("type").map_or("text", String::as_str);
                if name == "input" && ty == "submit" {
                    // A button; nothing to send.
                } else {
                    if !valid_field_name(&field) {
                        return Err(FormXmlError::BadFieldName(super::printable(&field, 64)));
                    }
                    let input = if name == "select" {
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
                            _ => return Err(FormXmlError::Unsupported("an unknown input type")),
                        }
                    };
                    self.form.inputs.push(input);
                }
            }
            ["config-auth", "auth", "form", "select"] | ["config-auth", "auth", "select"]
                if name == "option" =>
            {
                if let Some(FormInput::Select { options, .. }) = self.form.inputs.last_mut() {
                    if options.len() >= MAX_OPTIONS {
                        return Err(FormXmlError::TooManyInputs);
                    }
                    options.push(SelectOption {
                        value: attrs.get("value").cloned().unwrap_or_default(),
                        label: String::new(),
                    });
                    self.capture = Some((Capture::OptionLabel, depth));
                }
            }
            ["config-auth", "auth", ..] if name == "sso-v2-login" => {
                self.unsupported = Some("the gateway asks for single sign-on in a browser");
            }
            _ => {}
        }
        if empty {
            if self.capture.map(|(_, d)| d) == Some(depth) {
                self.capture = None;
            }
        } else {
            self.stack.push(name);
        }
        Ok(())
    }

    fn close(&mut self) {
        if self.capture.map(|(_, d)| d) == Some(self.stack.len()) {
            self.capture = None;
        }
        self.stack.pop();
    }

    fn text(&mut self, text: &str) -> Result<(), FormXmlError> {
        if self.stack.is_empty() {
            return if text.trim().is_empty() {
                Ok(())
            } else {
                Err(FormXmlError::Malformed("text outside the root element"))
            };
        }
        let Some((c, depth)) = self.capture else {
            return Ok(());
        };
        if depth != self.stack.len() {
            return Ok(());
        }
        if let Some(slot) = self.slot(c) {
            if slot.len() + text.len() > MAX_VALUE_LEN {
                return Err(FormXmlError::TooLong);
            }
            slot.push_str(text);
        }
        Ok(())
    }
}

fn tidy(s: Option<String>) -> Option<String> {
    s.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

/// Parses a server `<config-auth>` body.
///
/// # Errors
/// Any [`FormXmlError`]; never panics.
pub fn parse_server_message(body: &[u8]) -> Result<ServerMessage, FormXmlError> {
    if body.len() > MAX_BODY {
        return Err(FormXmlError::TooLarge(body.len()));
    }
    let text = std::str::from_utf8(body).map_err(|_| FormXmlError::NotUtf8)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut reader = Reader::from_str(text);
    {
        let config = reader.config_mut();
        config.trim_text(false);
        config.check_end_names = true;
        config.check_comments = true;
        config.expand_empty_elements = false;
    }
    let mut walk = Walk::default();
    // Where the <opaque> element being copied started, and its depth.
    let mut opaque_start: Option<(usize, usize)> = None;
    loop {
        let before = usize::try_from(reader.buffer_position()).unwrap_or(usize::MAX);
        let event = reader.read_event().map_err(xml_err)?;
        match event {
            Event::DocType(_) => return Err(FormXmlError::DoctypeForbidden),
            Event::Start(e) => {
                if walk.stack.len() == 1 && e.name().as_ref() == b"opaque" && opaque_start.is_none()
                {
                    opaque_start = Some((before, 2));
                }
                walk.open(&e, false)?;
            }
            Event::Empty(e) => {
                if walk.stack.len() == 1 && e.name().as_ref() == b"opaque" {
                    let after = usize::try_from(reader.buffer_position()).unwrap_or(usize::MAX);
                    walk.opaque = text.get(before..after).map(str::to_owned);
                }
                walk.open(&e, true)?;
            }
            Event::End(_) => {
                if let Some((start, depth)) = opaque_start {
                    if walk.stack.len() == depth {
                        let after = usize::try_from(reader.buffer_position()).unwrap_or(usize::MAX);
                        let raw = text
                            .get(start..after)
                            .ok_or(FormXmlError::Malformed("opaque"))?;
                        if raw.len() > MAX_OPAQUE {
                            return Err(FormXmlError::TooLong);
                        }
                        walk.opaque = Some(raw.to_owned());
                        opaque_start = None;
                    }
                }
                walk.close();
            }
            Event::Text(t) => walk.text(&t.unescape().map_err(xml_err)?)?,
            Event::CData(c) => walk.text(&c.decode().map_err(xml_err)?)?,
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }
    if !walk.stack.is_empty() {
        return Err(FormXmlError::Malformed("unclosed element"));
    }
    let kind = walk
        .kind
        .take()
        .ok_or(FormXmlError::Malformed("no root element"))?;
    match kind.as_str() {
        "auth-request" => {
            if let Some(why) = walk.unsupported {
                return Err(FormXmlError::Unsupported(why));
            }
            if !walk.saw_form {
                return Err(FormXmlError::Unsupported("an auth-request without a form"));
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
                            o.label = o.value.clone();
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
                session_token: tidy(walk.token).map(Secret::new),
                message: tidy(form.message).or(tidy(form.title)),
                banner: tidy(form.banner),
            }))
        }
        other => Err(FormXmlError::UnexpectedType(super::printable(other, 40))),
    }
}

const XML_DECL: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";

/// The first POST: `<config-auth type="init">` naming the URL we were given.
pub fn init_xml(group_access: &str) -> String {
    format!(
        "{XML_DECL}<config-auth client=\"vpn\" type=\"init\" aggregate-auth-version=\"2\">\
<version who=\"vpn\">{CLIENT_VERSION}</version><device-id>{DEVICE_ID}</device-id>\
<group-access>{}</group-access></config-auth>",
        xml_escape(group_access)
    )
}

/// The answers to one form, ready to post. `Debug` hides password values.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct FilledForm {
    /// `(name, value, secret)` in form order.
    fields: Vec<(String, Secret, bool)>,
}

impl FilledForm {
    /// Adds a field.
    pub fn push(&mut self, name: &str, value: Secret, secret: bool) {
        self.fields.push((name.to_owned(), value, secret));
    }

    /// The value of a field (for tests and the username in the status).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, v, _)| v.expose())
    }

    /// `name=value` pairs for logs, with secret values shown as `<hidden>`.
    pub fn summary(&self) -> String {
        self.fields
            .iter()
            .map(|(n, v, secret)| {
                if *secret {
                    format!("{n}=<hidden>")
                } else {
                    format!("{n}={}", super::printable(v.expose(), 64))
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl std::fmt::Debug for FilledForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FilledForm({})", self.summary())
    }
}

/// The `auth-reply` body answering a form: the echoed `<opaque>` and one
/// element per field. Field names were validated when the form was parsed;
/// values are escaped.
pub fn auth_reply_xml(opaque: Option<&str>, filled: &FilledForm) -> String {
    let mut out = String::with_capacity(512);
    out.push_str(XML_DECL);
    out.push_str("<config-auth client=\"vpn\" type=\"auth-reply\" aggregate-auth-version=\"2\">");
    out.push_str("<version who=\"vpn\">");
    out.push_str(CLIENT_VERSION);
    out.push_str("</version><device-id>");
    out.push_str(DEVICE_ID);
    out.push_str("</device-id>");
    if let Some(o) = opaque {
        out.push_str(o);
    }
    out.push_str("<auth>");
    for (name, value, _) in &filled.fields {
        if !valid_field_name(name) {
            continue;
        }
        out.push('<');
        out.push_str(name);
        out.push('>');
        out.push_str(&xml_escape(value.expose()));
        out.push_str("</");
        out.push_str(name);
        out.push('>');
    }
    out.push_str("</auth></config-auth>");
    out
}

/// One `--form-entry [FORM_ID:]NAME=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormEntry {
    /// The form id it applies to, or every form.
    pub form: Option<String>,
    /// Field name.
    pub name: String,
    /// The answer (for a select: a value or a label).
    pub value: String,
}

impl std::str::FromStr for FormEntry {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (key, value) = s
            .split_once('=')
            .ok_or_else(|| format!("'{s}': expected [FORM_ID:]NAME=VALUE"))?;
        let (form, name) = match key.split_once(':') {
            Some((f, n)) => (Some(f.to_owned()), n),
            None => (None, key),
        };
        if name.is_empty() {
            return Err(format!("'{s}': empty field name"));
        }
        Ok(Self {
            form,
            name: name.to_owned(),
            value: value.to_owned(),
        })
    }
}

/// Everything the user gave before logon that can answer form inputs.
#[derive(Debug, Clone, Default)]
pub struct Answers {
    /// `--user`: fills a text input whose name starts with `user`.
    pub user: Option<String>,
    /// `--password-stdin`: fills the first password input, once.
    pub password: Option<Secret>,
    /// `--form-entry` answers.
    pub entries: Vec<FormEntry>,
    /// `--transfer yes|no`: answers the `transfer` form's `action` select.
    pub transfer: Option<bool>,
    password_used: bool,
}

impl Answers {
    /// Answers from the command line.
    pub fn new(
        user: Option<String>,
        password: Option<Secret>,
        entries: Vec<FormEntry>,
        transfer: Option<bool>,
    ) -> Self {
        Self {
            user,
            password,
            entries,
            transfer,
            password_used: false,
        }
    }

    fn entry(&self, form: &str, name: &str) -> Option<&str> {
        let specific = self
            .entries
            .iter()
            .rev()
            .find(|e| e.form.as_deref() == Some(form) && e.name == name);
        let general = || {
            self.entries
                .iter()
                .rev()
                .find(|e| e.form.is_none() && e.name == name)
        };
        specific.or_else(general).map(|e| e.value.as_str())
    }
}

/// Asks the user. Implemented by the terminal prompt; tests script it.
pub trait Prompter {
    /// True if questions can be asked.
    fn interactive(&self) -> bool;
    /// Shows text (title, message, error, banner) before questions.
    fn show(&mut self, text: &str);
    /// Asks for visible text.
    ///
    /// # Errors
    /// I/O errors of the terminal, or end of input.
    fn ask_text(&mut self, label: &str) -> std::io::Result<String>;
    /// Asks for a secret without echo.
    ///
    /// # Errors
    /// I/O errors of the terminal, or end of input.
    fn ask_secret(&mut self, label: &str) -> std::io::Result<Secret>;
}

/// A prompter that can ask nothing (scripts, services).
#[derive(Debug, Clone, Copy, Default)]
pub struct NonInteractive;

impl Prompter for NonInteractive {
    fn interactive(&self) -> bool {
        false
    }
    fn show(&mut self, _text: &str) {}
    fn ask_text(&mut self, _label: &str) -> std::io::Result<String> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
    fn ask_secret(&mut self, _label: &str) -> std::io::Result<Secret> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

/// Why a form could not be filled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FillError {
    /// Non-interactive and nothing answers this input. `hint` says which
    /// flag would.
    #[error("the gateway asks for '{label}' (form '{form}', field '{name}') and no answer was given; {hint}")]
    NeedAnswer {
        /// Form id.
        form: String,
        /// Field name.
        name: String,
        /// Label shown by the gateway (escaped).
        label: String,
        /// How to answer it.
        hint: String,
    },
    /// An answer matches no option, or several.
    #[error("'{answer}' is not one of the choices for '{label}': {choices}")]
    BadChoice {
        /// The answer given.
        answer: String,
        /// The select's label.
        label: String,
        /// The options, `label (value)`, comma-separated.
        choices: String,
    },
    /// The terminal failed or input ended.
    #[error("reading the answer failed: {0}")]
    Prompt(String),
}

/// Matches `answer` against `options` like openconnect: exact value, then
/// label (case-insensitive), then a unique case-insensitive label prefix,
/// then a unique case-insensitive value prefix. Returns the option's value.
pub fn match_option<'a>(options: &'a [SelectOption], answer: &str) -> Option<&'a str> {
    let answer = answer.trim();
    if answer.is_empty() {
        return None;
    }
    if let Some(o) = options.iter().find(|o| o.value == answer) {
        return Some(&o.value);
    }
    if let Some(o) = options
        .iter()
        .find(|o| o.label.eq_ignore_ascii_case(answer))
    {
        return Some(&o.value);
    }
    let lower = answer.to_lowercase();
    let unique = |f: &dyn Fn(&SelectOption) -> bool| {
        let mut hits = options.iter().filter(|o| f(o));
        match (hits.next(), hits.next()) {
            (Some(o), None) => Some(o.value.as_str()),
            _ => None,
        }
    };
    unique(&|o| o.label.to_lowercase().starts_with(&lower))
        .or_else(|| unique(&|o| o.value.to_lowercase().starts_with(&lower)))
}

fn choices_text(options: &[SelectOption]) -> String {
    options
        .iter()
        .map(|o| {
            if o.label.eq_ignore_ascii_case(&o.value) {
                super::printable(&o.label, 40)
            } else {
                format!(
                    "{} ({})",
                    super::printable(&o.label, 40),
                    super::printable(&o.value, 40)
                )
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The answer `--transfer yes|no` gives to a select: the option whose value
/// or label is `transfer`/`yes` (or `cancel`/`no`).
fn transfer_answer(options: &[SelectOption], yes: bool) -> Option<&str> {
    let wanted: &[&str] = if yes {
        &["transfer", "yes"]
    } else {
        &["cancel", "no"]
    };
    wanted.iter().find_map(|w| {
        options
            .iter()
            .find(|o| o.value.eq_ignore_ascii_case(w) || o.label.eq_ignore_ascii_case(w))
            .map(|o| o.value.as_str())
    })
}

fn is_transfer(form: &ServerForm, name: &str) -> bool {
    form.id == "transfer" && name == "action"
}

/// Fills `form` from `answers`, asking `prompter` for the rest when it is
/// interactive. Shows the form's title, message, error and banner first
/// when asking.
///
/// # Errors
/// [`FillError::NeedAnswer`] when non-interactive and an input has no
/// answer; [`FillError::BadChoice`]; [`FillError::Prompt`].
pub fn fill_form(
    form: &ServerForm,
    answers: &mut Answers,
    prompter: &mut dyn Prompter,
) -> Result<FilledForm, FillError> {
    let mut filled = FilledForm::default();
    let mut shown = false;
    let label_of = |label: &str, name: &str| {
        if label.is_empty() {
            format!("{name}:")
        } else {
            label.to_owned()
        }
    };
    let need = |name: &str, label: &str, hint: String| FillError::NeedAnswer {
        form: super::printable(&form.id, 40),
        name: super::printable(name, 40),
        label: super::printable(label.trim_end_matches(':'), 60),
        hint,
    };
    let prompt_err = |e: std::io::Error| FillError::Prompt(e.to_string());
    for input in &form.inputs {
        let mut show = |p: &mut dyn Prompter| {
            if !shown && p.interactive() {
                shown = true;
                for t in [&form.banner, &form.title, &form.message, &form.error]
                    .into_iter()
                    .flatten()
                {
                    p.show(&super::printable_multiline(t, 200));
                }
            }
        };
        match input {
            FormInput::Hidden { name, value } => {
                filled.push(name, Secret::new(value.clone()), false)
            }
            FormInput::Text { name, label, value } => {
                let answer = if let Some(v) = answers.entry(&form.id, name) {
                    v.to_owned()
                } else if let (Some(u), true) = (
                    answers.user.as_ref(),
                    name.to_ascii_lowercase().starts_with("user"),
                ) {
                    u.clone()
                } else if prompter.interactive() {
                    show(prompter);
                    let v = prompter
                        .ask_text(&label_of(&super::printable(label, 60), name))
                        .map_err(prompt_err)?;
                    if name.to_ascii_lowercase().starts_with("user") && answers.user.is_none() {
                        answers.user = Some(v.clone());
                    }
                    v
                } else if !value.is_empty() {
                    value.clone()
                } else {
                    let hint = if name.to_ascii_lowercase().starts_with("user") {
                        "pass --user NAME".to_owned()
                    } else {
                        format!("pass --form-entry {}:{}=VALUE", form.id, name)
                    };
                    return Err(need(name, label, hint));
                };
                filled.push(name, Secret::new(answer), false);
            }
            FormInput::Password { name, label } => {
                let answer = if let Some(v) = answers.entry(&form.id, name) {
                    Secret::new(v)
                } else if let (Some(p), false) = (answers.password.as_ref(), answers.password_used)
                {
                    answers.password_used = true;
                    p.clone()
                } else if prompter.interactive() {
                    show(prompter);
                    prompter
                        .ask_secret(&label_of(&super::printable(label, 60), name))
                        .map_err(prompt_err)?
                } else {
                    let hint = if answers.password_used {
                        "the password from stdin was already used for an earlier field; \
                         run on a terminal to answer it"
                            .to_owned()
                    } else {
                        "pass --password-stdin and the password on stdin".to_owned()
                    };
                    return Err(need(name, label, hint));
                };
                filled.push(name, answer, true);
            }
            FormInput::Select {
                name,
                label,
                options,
            } => {
                let given = answers.entry(&form.id, name).map(str::to_owned);
                let value = if let Some(a) = given {
                    match_option(options, &a)
                        .map(str::to_owned)
                        .ok_or_else(|| FillError::BadChoice {
                            answer: super::printable(&a, 40),
                            label: super::printable(label, 60),
                            choices: choices_text(options),
                        })?
                } else if let (true, Some(yes)) = (is_transfer(form, name), answers.transfer) {
                    transfer_answer(options, yes)
                        .map(str::to_owned)
                        .ok_or_else(|| FillError::BadChoice {
                            answer: if yes { "yes" } else { "no" }.to_owned(),
                            label: super::printable(label, 60),
                            choices: choices_text(options),
                        })?
                } else if let [only] = options.as_slice() {
                    only.value.clone()
                } else if prompter.interactive() {
                    show(prompter);
                    let labels: Vec<String> = options
                        .iter()
                        .map(|o| super::printable(&o.label, 40))
                        .collect();
                    let question = format!(
                        "{} [{}]:",
                        super::printable(label.trim_end_matches(':'), 60),
                        labels.join("|")
                    );
                    loop {
                        let a = prompter.ask_text(&question).map_err(prompt_err)?;
                        if let Some(v) = match_option(options, &a) {
                            break v.to_owned();
                        }
                        prompter.show(&format!("Please answer one of: {}", labels.join(", ")));
                    }
                } else {
                    let hint = if is_transfer(form, name) {
                        let offer = form
                            .message
                            .as_deref()
                            .map(|m| format!(" The gateway says: {}.", super::printable(m, 300)))
                            .unwrap_or_default();
                        format!(
                            "answer with --transfer yes|no (choices: {}).{offer}",
                            choices_text(options)
                        )
                    } else {
                        format!(
                            "answer with --form-entry {}:{}=CHOICE (choices: {})",
                            form.id,
                            name,
                            choices_text(options)
                        )
                    };
                    return Err(need(name, label, hint));
                };
                filled.push(name, Secret::new(value), false);
            }
        }
    }
    Ok(filled)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;
    use crate::wire::auth_xml;

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

    /// ocserv 1.1.6, second step.
    const OCSERV_PASS: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<config-auth client="vpn" type="auth-request">
<version who="sg">0.1(1)</version>
<auth id="main">
<message>Please enter your password.</message>
<form method="post" action="/auth">
<input type="password" name="password" label="Password:" />
</form></auth>
</config-auth>"#;

    /// ocserv 1.1.6, success.
    const OCSERV_COMPLETE: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<config-auth client="vpn" type="complete">
<version who="sg">0.1(1)</version>
<auth id="success">
<title>SSL VPN Service</title></auth></config-auth>"#;

    /// The transfer offer (DESIGN.md §5), as the gateway will send it.
    const TRANSFER: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<config-auth client="vpn" type="auth-request" aggregate-auth-version="2">
<opaque is-for="sg"><auth-handle>h-42</auth-handle></opaque>
<auth id="transfer">
<title>Session transfer</title><message>You are already logged on: device alice-laptop, intranet IP 198.18.64.2, idle 5 min. Transfer that session to this device?</message>
<form method="post" action="/auth">
<select name="action" label="Action:"><option value="transfer">Transfer</option><option value="cancel">Cancel</option></select>
</form></auth></config-auth>"#;

    fn request(xml: &str) -> AuthRequest {
        match parse_server_message(xml.as_bytes()).unwrap() {
            ServerMessage::AuthRequest(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_ocserv_two_step_forms() {
        let r = request(OCSERV_USER);
        assert_eq!(r.form.id, "main");
        assert_eq!(r.form.action, "/auth");
        assert_eq!(
            r.form.message.as_deref(),
            Some("Please enter your username.")
        );
        assert_eq!(
            r.form.inputs,
            vec![FormInput::Text {
                name: "username".into(),
                label: "Username:".into(),
                value: String::new()
            }]
        );
        assert_eq!(r.opaque, None);
        let mut answers = Answers {
            user: Some("alice".into()),
            password: Some(Secret::new("pw")),
            ..Answers::default()
        };
        let f = fill_form(&r.form, &mut answers, &mut NonInteractive).unwrap();
        assert_eq!(f.summary(), "username=alice");
        let r2 = request(OCSERV_PASS);
        let f2 = fill_form(&r2.form, &mut answers, &mut NonInteractive).unwrap();
        assert_eq!(f2.summary(), "password=<hidden>");
        assert_eq!(f2.get("password"), Some("pw"));
        assert!(!format!("{f2:?}").contains("pw<"));
        let xml = auth_reply_xml(None, &f2);
        assert!(xml.contains("<auth><password>pw</password></auth>"));
        // The password is used once: a second password form cannot reuse it.
        let err = fill_form(&r2.form, &mut answers, &mut NonInteractive).unwrap_err();
        assert!(matches!(err, FillError::NeedAnswer { .. }), "{err}");
    }

    #[test]
    fn parses_complete() {
        match parse_server_message(OCSERV_COMPLETE.as_bytes()).unwrap() {
            ServerMessage::Complete(c) => {
                assert_eq!(c.session_token, None);
                assert_eq!(c.message.as_deref(), Some("SSL VPN Service"));
            }
            other => panic!("{other:?}"),
        }
        let ours = auth_xml::auth_complete_xml("TOK&1", Some("Welcome"));
        match parse_server_message(ours.as_bytes()).unwrap() {
            ServerMessage::Complete(c) => {
                assert_eq!(c.session_token.unwrap().expose(), "TOK&1");
                assert_eq!(c.message.as_deref(), Some("Welcome"));
            }
            other => panic!("{other:?}"),
        }
    }

    /// Round trip with the gateway's own form builder, opaque included.
    #[test]
    fn parses_intragate_forms_and_echoes_opaque() {
        let form = auth_xml::Form {
            id: "main".into(),
            title: Some("intragate".into()),
            message: Some("Please enter your username and password.".into()),
            error: Some("Login failed <again>".into()),
            action: "/auth".into(),
            inputs: vec![
                auth_xml::Input::Text {
                    name: "username".into(),
                    label: "Username:".into(),
                },
                auth_xml::Input::Password {
                    name: "password".into(),
                    label: "Password:".into(),
                },
            ],
        };
        let xml = auth_xml::auth_request_xml(&form, Some("handle<1>"));
        let r = request(&xml);
        assert_eq!(r.form.error.as_deref(), Some("Login failed <again>"));
        assert_eq!(r.form.inputs.len(), 2);
        let opaque = r.opaque.clone().unwrap();
        assert!(
            opaque.starts_with("<opaque") && opaque.ends_with("</opaque>"),
            "{opaque}"
        );
        let mut answers = Answers {
            user: Some("al<ice".into()),
            password: Some(Secret::new("p&w")),
            ..Answers::default()
        };
        let filled = fill_form(&r.form, &mut answers, &mut NonInteractive).unwrap();
        let reply = auth_reply_xml(r.opaque.as_deref(), &filled);
        // The gateway's own parser reads it back.
        let msg = auth_xml::parse_client_message(reply.as_bytes()).unwrap();
        assert_eq!(msg.kind, auth_xml::ClientMessageKind::AuthReply);
        assert_eq!(msg.field("username"), Some("al<ice"));
        assert_eq!(msg.field("password"), Some("p&w"));
        assert_eq!(msg.opaque.as_deref(), Some("handle<1>"));
        let init = auth_xml::parse_client_message(init_xml("https://gw/").as_bytes()).unwrap();
        assert_eq!(init.kind, auth_xml::ClientMessageKind::Init);
        assert_eq!(init.version.as_deref(), Some(CLIENT_VERSION));
    }

    #[test]
    fn transfer_form_answers() {
        let r = request(TRANSFER);
        assert_eq!(r.form.id, "transfer");
        assert!(r.form.message.as_deref().unwrap().contains("198.18.64.2"));
        let FormInput::Select { options, .. } = &r.form.inputs[0] else {
            panic!()
        };
        assert_eq!(options.len(), 2);
        assert_eq!(options[0].label, "Transfer");

        for (flag, want) in [(true, "transfer"), (false, "cancel")] {
            let mut a = Answers {
                transfer: Some(flag),
                ..Answers::default()
            };
            let f = fill_form(&r.form, &mut a, &mut NonInteractive).unwrap();
            assert_eq!(f.get("action"), Some(want));
            let reply = auth_reply_xml(r.opaque.as_deref(), &f);
            let msg = auth_xml::parse_client_message(reply.as_bytes()).unwrap();
            assert_eq!(msg.field("action"), Some(want));
            assert_eq!(msg.opaque.as_deref(), Some("h-42"));
        }
        // Non-interactive without an answer: a clear error with the offer.
        let err = fill_form(&r.form, &mut Answers::default(), &mut NonInteractive).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("--transfer yes|no"), "{text}");
        assert!(text.contains("alice-laptop"), "{text}");
        // --form-entry works for any select, by label prefix or value.
        let mut a = Answers {
            entries: vec!["transfer:action=tr".parse().unwrap()],
            ..Answers::default()
        };
        assert_eq!(
            fill_form(&r.form, &mut a, &mut NonInteractive)
                .unwrap()
                .get("action"),
            Some("transfer")
        );
        let mut a = Answers {
            entries: vec!["action=bogus".parse().unwrap()],
            ..Answers::default()
        };
        assert!(matches!(
            fill_form(&r.form, &mut a, &mut NonInteractive),
            Err(FillError::BadChoice { .. })
        ));
    }

    /// A scripted terminal.
    struct Script {
        answers: Vec<String>,
        shown: Vec<String>,
        asked: Vec<String>,
    }

    impl Prompter for Script {
        fn interactive(&self) -> bool {
            true
        }
        fn show(&mut self, text: &str) {
            self.shown.push(text.to_owned());
        }
        fn ask_text(&mut self, label: &str) -> std::io::Result<String> {
            self.asked.push(label.to_owned());
            Ok(self.answers.remove(0))
        }
        fn ask_secret(&mut self, label: &str) -> std::io::Result<Secret> {
            self.asked.push(label.to_owned());
            Ok(Secret::new(self.answers.remove(0)))
        }
    }

    #[test]
    fn interactive_prompts_show_the_offer_and_retry_bad_choices() {
        let r = request(TRANSFER);
        let mut p = Script {
            answers: vec!["maybe".into(), "CAN".into()],
            shown: vec![],
            asked: vec![],
        };
        let f = fill_form(&r.form, &mut Answers::default(), &mut p).unwrap();
        assert_eq!(f.get("action"), Some("cancel"));
        assert!(p.shown.iter().any(|s| s.contains("alice-laptop")));
        assert_eq!(p.asked[0], "Action [Transfer|Cancel]:");
        assert_eq!(p.asked.len(), 2);

        let mut p = Script {
            answers: vec!["bob".into(), "sekrit".into()],
            shown: vec![],
            asked: vec![],
        };
        let mut a = Answers::default();
        let f = fill_form(&request(OCSERV_USER).form, &mut a, &mut p).unwrap();
        assert_eq!(f.get("username"), Some("bob"));
        assert_eq!(a.user.as_deref(), Some("bob"));
        let f = fill_form(&request(OCSERV_PASS).form, &mut a, &mut p).unwrap();
        assert_eq!(f.get("password"), Some("sekrit"));
    }

    #[test]
    fn option_matching() {
        let opts = vec![
            SelectOption {
                value: "g1".into(),
                label: "Staff".into(),
            },
            SelectOption {
                value: "g2".into(),
                label: "Students".into(),
            },
        ];
        assert_eq!(match_option(&opts, "g2"), Some("g2"));
        assert_eq!(match_option(&opts, "staff"), Some("g1"));
        assert_eq!(match_option(&opts, "stu"), Some("g2"));
        assert_eq!(match_option(&opts, "st"), None);
        assert_eq!(match_option(&opts, ""), None);
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
            Err(FormXmlError::TooManyInputs)
        );
        assert!(matches!(
            parse_server_message(&vec![b' '; MAX_BODY + 1]),
            Err(FormXmlError::TooLarge(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(doc in ".{0,400}") {
            let _ = parse_server_message(doc.as_bytes());
        }

        #[test]
        fn never_panics_on_mutated_forms(cut in 0usize..600, byte in proptest::num::u8::ANY) {
            let mut b = TRANSFER.as_bytes().to_vec();
            if cut < b.len() { b[cut] = byte; }
            if let Ok(ServerMessage::AuthRequest(r)) = parse_server_message(&b) {
                let _ = fill_form(&r.form, &mut Answers { transfer: Some(true), ..Answers::default() }, &mut NonInteractive);
            }
            let _ = parse_server_message(&b[..cut.min(b.len())]);
        }
    }
}
