//! The AnyConnect "aggregate auth" XML exchanged over HTTPS before the tunnel:
//! parsing the client's `<config-auth>` bodies (and the older
//! `application/x-www-form-urlencoded` form posts), and building the server's
//! `auth-request` forms and `complete` answer.
//!
//! Parsing is bounded ([`MAX_BODY`], [`MAX_DEPTH`], [`MAX_FIELDS`],
//! [`MAX_VALUE_LEN`]) and refuses any `<!DOCTYPE`, so there is no entity expansion
//! (no XXE, no "billion laughs"); only the five predefined entities and character
//! references are decoded. Building escapes every interpolated string, and
//! replaces characters XML 1.0 cannot carry, so hostile strings (a username, an
//! error message) cannot change the document's structure.

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;
use std::fmt::Write as _;

/// Largest accepted request body, in bytes.
pub const MAX_BODY: usize = 64 * 1024;
/// Deepest accepted element nesting (the root element is depth 1).
pub const MAX_DEPTH: usize = 16;
/// Most accepted fields (children of `<auth>`, or form pairs).
pub const MAX_FIELDS: usize = 32;
/// Longest accepted field value, element text or field name, in bytes (UTF-8,
/// after unescaping).
pub const MAX_VALUE_LEN: usize = 1024;

/// Why a client auth body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthXmlError {
    /// The body is larger than [`MAX_BODY`].
    #[error("auth body of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// The body (or a percent-decoded form value) is not valid UTF-8.
    #[error("auth body is not valid UTF-8")]
    NotUtf8,
    /// The body contains a `<!DOCTYPE` (and so possibly entity declarations).
    #[error("DOCTYPE is not allowed")]
    DoctypeForbidden,
    /// Elements nested deeper than [`MAX_DEPTH`].
    #[error("XML nested too deeply")]
    TooDeep,
    /// More than [`MAX_FIELDS`] fields.
    #[error("too many fields")]
    TooManyFields,
    /// A field value, element text or name longer than [`MAX_VALUE_LEN`].
    #[error("field too long")]
    FieldTooLong,
    /// The root element is not `<config-auth>`.
    #[error("root element is not config-auth")]
    UnexpectedRoot,
    /// `<config-auth>` has no `type` attribute.
    #[error("config-auth has no type attribute")]
    MissingType,
    /// Well-formed enough for the XML reader but not an acceptable message
    /// (text outside the root, several roots, unclosed elements, an element that
    /// must be unique appearing twice).
    #[error("malformed auth message: {0}")]
    Malformed(&'static str),
    /// The XML reader rejected the body (message truncated to 200 characters; it
    /// may quote attacker-controlled names, so escape it before display).
    #[error("invalid XML: {0}")]
    Xml(String),
    /// A `%` in a form body not followed by two hex digits.
    #[error("bad percent-encoding in form body")]
    BadPercentEncoding,
}

fn xml_err(e: impl std::fmt::Display) -> AuthXmlError {
    AuthXmlError::Xml(e.to_string().chars().take(200).collect())
}

/// The `type` attribute of a client `<config-auth>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessageKind {
    /// `type="init"`: the first POST, asks for a login form.
    Init,
    /// `type="auth-reply"`: answers a form (also every form-urlencoded body).
    AuthReply,
    /// `type="logout"`.
    Logout,
    /// Any other type, as sent.
    Other(String),
}

/// A parsed client auth message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientMessage {
    /// What the client is doing.
    pub kind: ClientMessageKind,
    /// The children of `<auth>` in order: element name and unescaped text
    /// (e.g. `("username", "alice")`, `("action", "transfer")`); an empty element
    /// gives an empty value. For a form-urlencoded body, the decoded pairs.
    pub fields: Vec<(String, String)>,
    /// The text of `<opaque><auth-handle>`, the handle the server put in its
    /// last form and the client echoes back. Only the handle is kept: it is the
    /// one thing [`auth_request_xml`] puts in `<opaque>`, and keeping unescaped
    /// text rather than raw inner XML means callers never handle markup.
    pub opaque: Option<String>,
    /// `<device-id>` text, e.g. `linux-64`.
    pub device_id: Option<String>,
    /// `<version>` text, e.g. `v9.01`.
    pub version: Option<String>,
    /// `<group-select>` text.
    pub group_select: Option<String>,
}

impl ClientMessage {
    fn new(kind: ClientMessageKind) -> Self {
        Self {
            kind,
            fields: Vec::new(),
            opaque: None,
            device_id: None,
            version: None,
            group_select: None,
        }
    }

    /// The value of the first field named `name` (exact match).
    #[must_use]
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Where the text of the element being read goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Version,
    DeviceId,
    GroupSelect,
    AuthHandle,
    Field(usize),
}

fn target_slot(msg: &mut ClientMessage, target: Target) -> Option<&mut String> {
    match target {
        Target::Version => msg.version.as_mut(),
        Target::DeviceId => msg.device_id.as_mut(),
        Target::GroupSelect => msg.group_select.as_mut(),
        Target::AuthHandle => msg.opaque.as_mut(),
        Target::Field(i) => msg.fields.get_mut(i).map(|(_, v)| v),
    }
}

/// Starts the text of an element that may appear only once.
fn start_single(msg: &mut ClientMessage, target: Target) -> Result<(), AuthXmlError> {
    let (slot, duplicate) = match target {
        Target::Version => (&mut msg.version, "duplicate <version>"),
        Target::DeviceId => (&mut msg.device_id, "duplicate <device-id>"),
        Target::GroupSelect => (&mut msg.group_select, "duplicate <group-select>"),
        Target::AuthHandle => (&mut msg.opaque, "duplicate <auth-handle>"),
        Target::Field(_) => return Ok(()),
    };
    if slot.is_some() {
        return Err(AuthXmlError::Malformed(duplicate));
    }
    *slot = Some(String::new());
    Ok(())
}

fn check_len(s: &str) -> Result<(), AuthXmlError> {
    if s.len() > MAX_VALUE_LEN {
        Err(AuthXmlError::FieldTooLong)
    } else {
        Ok(())
    }
}

/// Parser state while walking the events.
struct Walk {
    /// Names of the open elements, root first.
    stack: Vec<String>,
    msg: Option<ClientMessage>,
    /// The element whose direct text is being captured, and its depth.
    capture: Option<(Target, usize)>,
}

impl Walk {
    fn open(&mut self, e: &BytesStart<'_>) -> Result<(), AuthXmlError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(AuthXmlError::TooDeep);
        }
        let name = std::str::from_utf8(e.name().as_ref())
            .map_err(|_| AuthXmlError::NotUtf8)?
            .to_owned();
        check_len(&name)?;
        // Validate every attribute (syntax, duplicates, escapes), keep `type`.
        let mut ty = None;
        for attr in e.attributes() {
            let attr = attr.map_err(xml_err)?;
            let value = attr.unescape_value().map_err(xml_err)?;
            if attr.key.as_ref() == b"type" {
                ty = Some(value.into_owned());
            }
        }

        let depth = self.stack.len() + 1;
        let parent: Vec<&str> = self.stack.iter().map(String::as_str).collect();
        match (parent.as_slice(), self.msg.as_mut()) {
            ([], Some(_)) => return Err(AuthXmlError::Malformed("several root elements")),
            ([], None) => {
                if name != "config-auth" {
                    return Err(AuthXmlError::UnexpectedRoot);
                }
                let ty = ty.ok_or(AuthXmlError::MissingType)?;
                check_len(&ty)?;
                let kind = match ty.as_str() {
                    "init" => ClientMessageKind::Init,
                    "auth-reply" => ClientMessageKind::AuthReply,
                    "logout" => ClientMessageKind::Logout,
                    _ => ClientMessageKind::Other(ty),
                };
                self.msg = Some(ClientMessage::new(kind));
            }
            (["config-auth"], Some(msg)) => {
                let target = match name.as_str() {
                    "version" => Some(Target::Version),
                    "device-id" => Some(Target::DeviceId),
                    "group-select" => Some(Target::GroupSelect),
                    _ => None,
                };
                if let Some(target) = target {
                    start_single(msg, target)?;
                    self.capture = Some((target, depth));
                }
            }
            (["config-auth", "auth"], Some(msg)) => {
                if msg.fields.len() >= MAX_FIELDS {
                    return Err(AuthXmlError::TooManyFields);
                }
                msg.fields.push((name.clone(), String::new()));
                self.capture = Some((Target::Field(msg.fields.len() - 1), depth));
            }
            (["config-auth", "opaque"], Some(msg)) if name == "auth-handle" => {
                start_single(msg, Target::AuthHandle)?;
                self.capture = Some((Target::AuthHandle, depth));
            }
            _ => {}
        }
        self.stack.push(name);
        Ok(())
    }

    fn close(&mut self) {
        if self.capture.map(|(_, d)| d) == Some(self.stack.len()) {
            self.capture = None;
        }
        self.stack.pop();
    }

    fn text(&mut self, text: &str) -> Result<(), AuthXmlError> {
        if self.stack.is_empty() {
            if text.trim().is_empty() {
                return Ok(());
            }
            return Err(AuthXmlError::Malformed("text outside the root element"));
        }
        let (Some((target, depth)), Some(msg)) = (self.capture, self.msg.as_mut()) else {
            return Ok(());
        };
        // Only the captured element's own text, not that of nested elements.
        if depth != self.stack.len() {
            return Ok(());
        }
        if let Some(slot) = target_slot(msg, target) {
            if slot.len() + text.len() > MAX_VALUE_LEN {
                return Err(AuthXmlError::FieldTooLong);
            }
            slot.push_str(text);
        }
        Ok(())
    }
}

/// Parses a client `<config-auth>` XML body (`init`, `auth-reply`, `logout`, ...).
///
/// # Errors
/// [`AuthXmlError::TooLarge`], [`AuthXmlError::NotUtf8`],
/// [`AuthXmlError::DoctypeForbidden`], [`AuthXmlError::TooDeep`],
/// [`AuthXmlError::TooManyFields`], [`AuthXmlError::FieldTooLong`],
/// [`AuthXmlError::UnexpectedRoot`], [`AuthXmlError::MissingType`],
/// [`AuthXmlError::Malformed`], [`AuthXmlError::Xml`].
pub fn parse_client_message(body: &[u8]) -> Result<ClientMessage, AuthXmlError> {
    if body.len() > MAX_BODY {
        return Err(AuthXmlError::TooLarge(body.len()));
    }
    let text = std::str::from_utf8(body).map_err(|_| AuthXmlError::NotUtf8)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut reader = Reader::from_str(text);
    {
        let config = reader.config_mut();
        config.trim_text(false);
        config.check_end_names = true;
        config.check_comments = true;
        config.expand_empty_elements = false;
    }
    let mut walk = Walk {
        stack: Vec::new(),
        msg: None,
        capture: None,
    };
    loop {
        match reader.read_event().map_err(xml_err)? {
            Event::DocType(_) => return Err(AuthXmlError::DoctypeForbidden),
            Event::Start(e) => walk.open(&e)?,
            Event::Empty(e) => {
                walk.open(&e)?;
                walk.close();
            }
            Event::End(_) => walk.close(),
            Event::Text(t) => walk.text(&t.unescape().map_err(xml_err)?)?,
            Event::CData(c) => walk.text(&c.decode().map_err(xml_err)?)?,
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }
    if !walk.stack.is_empty() {
        return Err(AuthXmlError::Malformed("unclosed element"));
    }
    walk.msg.ok_or(AuthXmlError::Malformed("no root element"))
}

/// Parses an `application/x-www-form-urlencoded` auth body (the older, non-XML
/// mode: `username=alice&password=s%3Dcret`). The result's kind is
/// [`ClientMessageKind::AuthReply`]; every pair becomes a field, in order
/// (`+` is a space, `%XX` a byte; a pair without `=` has an empty value; empty
/// pairs and pairs with an empty name are skipped).
///
/// # Errors
/// [`AuthXmlError::TooLarge`], [`AuthXmlError::NotUtf8`] (after decoding),
/// [`AuthXmlError::BadPercentEncoding`], [`AuthXmlError::TooManyFields`],
/// [`AuthXmlError::FieldTooLong`].
pub fn parse_form_urlencoded(body: &[u8]) -> Result<ClientMessage, AuthXmlError> {
    if body.len() > MAX_BODY {
        return Err(AuthXmlError::TooLarge(body.len()));
    }
    let mut msg = ClientMessage::new(ClientMessageKind::AuthReply);
    for pair in body.split(|&b| b == b'&') {
        let (raw_name, raw_value) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (
                pair.get(..i).unwrap_or_default(),
                pair.get(i + 1..).unwrap_or_default(),
            ),
            None => (pair, &[][..]),
        };
        let name = percent_decode(raw_name)?;
        if name.is_empty() {
            continue;
        }
        let value = percent_decode(raw_value)?;
        check_len(&name)?;
        check_len(&value)?;
        if msg.fields.len() >= MAX_FIELDS {
            return Err(AuthXmlError::TooManyFields);
        }
        msg.fields.push((name, value));
    }
    Ok(msg)
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn percent_decode(raw: &[u8]) -> Result<String, AuthXmlError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.iter().copied();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = bytes.next().and_then(hex_val);
                let lo = bytes.next().and_then(hex_val);
                match (hi, lo) {
                    (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                    _ => return Err(AuthXmlError::BadPercentEncoding),
                }
            }
            other => out.push(other),
        }
    }
    String::from_utf8(out).map_err(|_| AuthXmlError::NotUtf8)
}

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
fn is_xml_char(c: char) -> bool {
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
/// in its reply ([`ClientMessage::opaque`]).
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;

    /// openconnect 9.01's init POST body.
    const INIT: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<config-auth client="vpn" type="init" aggregate-auth-version="2"><version who="vpn">v9.01</version><device-id>linux-64</device-id><group-access>https://198.18.0.1/</group-access></config-auth>"#;

    /// openconnect 9.01's reply to a username/password form.
    const AUTH_REPLY: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<config-auth client="vpn" type="auth-reply" aggregate-auth-version="2"><version who="vpn">v9.01</version><device-id>linux-64</device-id><opaque is-for="sg"><tunnel-group>x</tunnel-group><auth-handle>123</auth-handle><config-hash>1</config-hash></opaque><auth><username>alice</username><password>secret</password></auth></config-auth>"#;

    /// Reply to a second form holding a `<select>`.
    const SELECT_REPLY: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<config-auth client="vpn" type="auth-reply" aggregate-auth-version="2"><version who="vpn">v9.01</version><device-id>linux-64</device-id><group-select>staff</group-select><opaque is-for="sg"><auth-handle>h2</auth-handle></opaque><auth><action>transfer</action></auth></config-auth>"#;

    const LOGOUT: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<config-auth client="vpn" type="logout"><session-token>abc</session-token></config-auth>"#;

    fn login_form() -> Form {
        Form {
            id: "main".into(),
            title: Some("Login".into()),
            message: Some("Please enter your username and password.".into()),
            error: None,
            action: "/auth".into(),
            inputs: vec![
                Input::Text {
                    name: "username".into(),
                    label: "Username:".into(),
                },
                Input::Password {
                    name: "password".into(),
                    label: "Password:".into(),
                },
            ],
        }
    }

    #[test]
    fn parses_init() {
        let m = parse_client_message(INIT.as_bytes()).unwrap();
        assert_eq!(m.kind, ClientMessageKind::Init);
        assert_eq!(m.version.as_deref(), Some("v9.01"));
        assert_eq!(m.device_id.as_deref(), Some("linux-64"));
        assert!(m.fields.is_empty());
        assert_eq!(m.opaque, None);
        assert_eq!(m.group_select, None);
    }

    #[test]
    fn parses_auth_reply() {
        let m = parse_client_message(AUTH_REPLY.as_bytes()).unwrap();
        assert_eq!(m.kind, ClientMessageKind::AuthReply);
        assert_eq!(m.field("username"), Some("alice"));
        assert_eq!(m.field("password"), Some("secret"));
        assert_eq!(m.field("Password"), None);
        assert_eq!(m.opaque.as_deref(), Some("123"));
        assert_eq!(m.fields.len(), 2);
    }

    #[test]
    fn parses_select_reply_and_logout() {
        let m = parse_client_message(SELECT_REPLY.as_bytes()).unwrap();
        assert_eq!(m.field("action"), Some("transfer"));
        assert_eq!(m.group_select.as_deref(), Some("staff"));
        assert_eq!(m.opaque.as_deref(), Some("h2"));
        let m = parse_client_message(LOGOUT.as_bytes()).unwrap();
        assert_eq!(m.kind, ClientMessageKind::Logout);
        let m = parse_client_message(br#"<config-auth type="hello"/>"#).unwrap();
        assert_eq!(m.kind, ClientMessageKind::Other("hello".into()));
    }

    #[test]
    fn text_is_unescaped_and_exact() {
        let body = "<config-auth type=\"auth-reply\"><auth><username> al&amp;ice </username>\
<password><![CDATA[p<ss]]>&#x41;&lt;</password><empty/><blank></blank></auth></config-auth>";
        let m = parse_client_message(body.as_bytes()).unwrap();
        assert_eq!(m.field("username"), Some(" al&ice "));
        assert_eq!(m.field("password"), Some("p<ssA<"));
        assert_eq!(m.field("empty"), Some(""));
        assert_eq!(m.field("blank"), Some(""));
    }

    #[test]
    fn nested_text_inside_field_is_ignored() {
        let body = "<config-auth type=\"auth-reply\"><auth><username>a<b>x</b>c</username></auth></config-auth>";
        let m = parse_client_message(body.as_bytes()).unwrap();
        assert_eq!(m.fields, vec![("username".into(), "ac".into())]);
    }

    #[test]
    fn doctype_rejected() {
        let lol = r#"<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>
<config-auth type="init"><version>&lol2;</version></config-auth>"#;
        assert_eq!(
            parse_client_message(lol.as_bytes()),
            Err(AuthXmlError::DoctypeForbidden)
        );
        let xxe = r#"<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><config-auth type="init">&e;</config-auth>"#;
        assert_eq!(
            parse_client_message(xxe.as_bytes()),
            Err(AuthXmlError::DoctypeForbidden)
        );
        // Any spelling is refused, inside the root too.
        for body in [
            &b"<!doctype config-auth><config-auth type=\"init\"/>"[..],
            b"<config-auth type=\"init\"><!DOCTYPE x></config-auth>",
            b"<!ENTITY e \"x\"><config-auth type=\"init\"/>",
        ] {
            assert!(parse_client_message(body).is_err(), "{body:?}");
        }
        // Undeclared entities are an XML error, never expanded.
        let body = r#"<config-auth type="init"><version>&e;</version></config-auth>"#;
        assert!(matches!(
            parse_client_message(body.as_bytes()),
            Err(AuthXmlError::Xml(_))
        ));
    }

    #[test]
    fn bounds() {
        // Body size.
        let mut big = String::from("<config-auth type=\"init\">");
        big.push_str(&" ".repeat(MAX_BODY));
        big.push_str("</config-auth>");
        assert!(matches!(
            parse_client_message(big.as_bytes()),
            Err(AuthXmlError::TooLarge(_))
        ));
        assert!(matches!(
            parse_form_urlencoded(big.as_bytes()),
            Err(AuthXmlError::TooLarge(_))
        ));

        // Depth: 16 levels are fine, 17 are not.
        let nest = |n: usize| {
            let mut s = String::from("<config-auth type=\"init\">");
            for _ in 1..n {
                s.push_str("<a>");
            }
            for _ in 1..n {
                s.push_str("</a>");
            }
            s.push_str("</config-auth>");
            s
        };
        assert!(parse_client_message(nest(MAX_DEPTH).as_bytes()).is_ok());
        assert_eq!(
            parse_client_message(nest(MAX_DEPTH + 1).as_bytes()),
            Err(AuthXmlError::TooDeep)
        );
        let mut s = String::from("<config-auth type=\"init\">");
        s.push_str(&"<a>".repeat(MAX_DEPTH - 1));
        s.push_str("<b/>");
        assert_eq!(
            parse_client_message(s.as_bytes()),
            Err(AuthXmlError::TooDeep)
        );

        // Field count.
        let fields = |n: usize| {
            let mut s = String::from("<config-auth type=\"auth-reply\"><auth>");
            for i in 0..n {
                s.push_str(&format!("<f{i}>v</f{i}>"));
            }
            s.push_str("</auth></config-auth>");
            s
        };
        assert_eq!(
            parse_client_message(fields(MAX_FIELDS).as_bytes())
                .unwrap()
                .fields
                .len(),
            MAX_FIELDS
        );
        assert_eq!(
            parse_client_message(fields(MAX_FIELDS + 1).as_bytes()),
            Err(AuthXmlError::TooManyFields)
        );

        // Value length, counted after unescaping and across text pieces.
        let value = |v: &str| {
            format!("<config-auth type=\"auth-reply\"><auth><password>{v}</password></auth></config-auth>")
        };
        assert!(parse_client_message(value(&"x".repeat(MAX_VALUE_LEN)).as_bytes()).is_ok());
        assert_eq!(
            parse_client_message(value(&"x".repeat(MAX_VALUE_LEN + 1)).as_bytes()),
            Err(AuthXmlError::FieldTooLong)
        );
        let pieces = format!("{}<!-- c -->{}", "x".repeat(600), "y".repeat(600));
        assert_eq!(
            parse_client_message(value(&pieces).as_bytes()),
            Err(AuthXmlError::FieldTooLong)
        );
        let escaped = "&amp;".repeat(MAX_VALUE_LEN);
        assert!(parse_client_message(value(&escaped).as_bytes()).is_ok());
        let long_version = format!(
            "<config-auth type=\"init\"><version>{}</version></config-auth>",
            "9".repeat(MAX_VALUE_LEN + 1)
        );
        assert_eq!(
            parse_client_message(long_version.as_bytes()),
            Err(AuthXmlError::FieldTooLong)
        );
    }

    #[test]
    fn structure_errors() {
        let cases: &[(&[u8], AuthXmlError)] = &[
            (b"", AuthXmlError::Malformed("no root element")),
            (b"  \n", AuthXmlError::Malformed("no root element")),
            (b"<html/>", AuthXmlError::UnexpectedRoot),
            (b"<config-auth/>", AuthXmlError::MissingType),
            (
                b"<config-auth type=\"init\"/><config-auth type=\"init\"/>",
                AuthXmlError::Malformed("several root elements"),
            ),
            (
                b"<config-auth type=\"init\">",
                AuthXmlError::Malformed("unclosed element"),
            ),
            (
                b"junk<config-auth type=\"init\"/>",
                AuthXmlError::Malformed("text outside the root element"),
            ),
            (
                b"<config-auth type=\"init\"><version>1</version><version>2</version></config-auth>",
                AuthXmlError::Malformed("duplicate <version>"),
            ),
            (b"<config-auth type=\"\xff\"/>", AuthXmlError::NotUtf8),
        ];
        for (body, want) in cases {
            assert_eq!(
                parse_client_message(body).as_ref(),
                Err(want),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        for bad in [
            &b"<config-auth type=\"init\"></other>"[..],
            b"<config-auth type=\"init\" type=\"x\"/>",
            b"<config-auth type=init/>",
            b"<config-auth type=\"init\"><a></config-auth>",
        ] {
            assert!(
                matches!(parse_client_message(bad), Err(AuthXmlError::Xml(_))),
                "{}: {:?}",
                String::from_utf8_lossy(bad),
                parse_client_message(bad)
            );
        }
    }

    #[test]
    fn bom_and_comments_accepted() {
        let body = format!("\u{feff}<!-- hi --><?pi x?>{INIT}\n<!-- bye -->\n");
        assert_eq!(
            parse_client_message(body.as_bytes()).unwrap().kind,
            ClientMessageKind::Init
        );
    }

    #[test]
    fn form_urlencoded() {
        let m = parse_form_urlencoded(
            b"username=alice&password=s%3Dc+r%2Bet&&flag&=x&group_list=%C3%A9",
        )
        .unwrap();
        assert_eq!(m.kind, ClientMessageKind::AuthReply);
        assert_eq!(
            m.fields,
            vec![
                ("username".into(), "alice".into()),
                ("password".into(), "s=c r+et".into()),
                ("flag".into(), String::new()),
                ("group_list".into(), "é".into()),
            ]
        );
        assert_eq!(parse_form_urlencoded(b"").unwrap().fields, vec![]);
        assert_eq!(
            parse_form_urlencoded(b"a=%4"),
            Err(AuthXmlError::BadPercentEncoding)
        );
        assert_eq!(
            parse_form_urlencoded(b"a=%zz"),
            Err(AuthXmlError::BadPercentEncoding)
        );
        assert_eq!(parse_form_urlencoded(b"a=%ff"), Err(AuthXmlError::NotUtf8));
        assert_eq!(parse_form_urlencoded(b"a=\xff"), Err(AuthXmlError::NotUtf8));
        let many: Vec<String> = (0..=MAX_FIELDS).map(|i| format!("f{i}=v")).collect();
        assert_eq!(
            parse_form_urlencoded(many.join("&").as_bytes()),
            Err(AuthXmlError::TooManyFields)
        );
        let long = format!("p={}", "%41".repeat(MAX_VALUE_LEN));
        assert_eq!(
            parse_form_urlencoded(long.as_bytes())
                .unwrap()
                .field("p")
                .map(str::len),
            Some(MAX_VALUE_LEN)
        );
        let long = format!("p={}", "a".repeat(MAX_VALUE_LEN + 1));
        assert_eq!(
            parse_form_urlencoded(long.as_bytes()),
            Err(AuthXmlError::FieldTooLong)
        );
    }

    /// Walks a document with quick-xml in strict mode and returns every
    /// (element path, unescaped text) and (element path @ attribute, value).
    fn walk(xml: &str) -> Vec<(String, String)> {
        let mut reader = Reader::from_str(xml);
        reader.config_mut().check_end_names = true;
        let mut stack: Vec<String> = Vec::new();
        let mut out = Vec::new();
        let open =
            |e: &BytesStart<'_>, stack: &mut Vec<String>, out: &mut Vec<(String, String)>| {
                stack.push(String::from_utf8(e.name().as_ref().to_vec()).unwrap());
                let path = stack.join("/");
                for a in e.attributes() {
                    let a = a.unwrap();
                    out.push((
                        format!(
                            "{path}@{}",
                            String::from_utf8(a.key.as_ref().to_vec()).unwrap()
                        ),
                        a.unescape_value().unwrap().into_owned(),
                    ));
                }
            };
        loop {
            match reader.read_event().unwrap() {
                Event::Start(e) => open(&e, &mut stack, &mut out),
                Event::Empty(e) => {
                    open(&e, &mut stack, &mut out);
                    stack.pop();
                }
                Event::End(_) => {
                    stack.pop();
                }
                Event::Text(t) => {
                    let t = t.unescape().unwrap();
                    if !t.trim().is_empty() {
                        assert!(!stack.is_empty(), "text outside root");
                        out.push((stack.join("/"), t.into_owned()));
                    }
                }
                Event::Eof => break,
                Event::Decl(_) => {}
                other => panic!("unexpected event {other:?}"),
            }
        }
        assert!(stack.is_empty(), "unclosed elements");
        out
    }

    fn get<'a>(items: &'a [(String, String)], key: &str) -> Vec<&'a str> {
        items
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    #[test]
    fn auth_request_layout() {
        let mut form = login_form();
        form.inputs.push(Input::Select {
            name: "action".into(),
            label: "Action:".into(),
            options: vec![
                ("transfer".into(), "Transfer".into()),
                ("new".into(), "New session".into()),
            ],
        });
        let xml = auth_request_xml(&form, Some("h1"));
        assert_eq!(
            xml,
            r#"<?xml version="1.0" encoding="UTF-8"?>
<config-auth client="vpn" type="auth-request" aggregate-auth-version="2">
<opaque is-for="sg"><auth-handle>h1</auth-handle></opaque>
<auth id="main">
<title>Login</title><message>Please enter your username and password.</message>
<form method="post" action="/auth">
<input type="text" name="username" label="Username:"></input>
<input type="password" name="password" label="Password:"></input>
<select name="action" label="Action:"><option value="transfer">Transfer</option><option value="new">New session</option></select>
</form></auth></config-auth>
"#
        );
        let items = walk(&xml);
        assert_eq!(get(&items, "config-auth@type"), ["auth-request"]);
        assert_eq!(get(&items, "config-auth/auth@id"), ["main"]);
        assert_eq!(
            get(&items, "config-auth/auth/form/input@name"),
            ["username", "password"]
        );
        assert_eq!(
            get(&items, "config-auth/auth/form/select/option"),
            ["Transfer", "New session"]
        );
    }

    #[test]
    fn auth_request_without_optional_parts() {
        let form = Form {
            id: "second".into(),
            title: None,
            message: None,
            error: None,
            action: "/auth".into(),
            inputs: vec![],
        };
        let xml = auth_request_xml(&form, None);
        assert!(!xml.contains("opaque"));
        assert!(
            xml.contains("<auth id=\"second\">\n<form method=\"post\" action=\"/auth\">\n</form>")
        );
        walk(&xml);
    }

    const HOSTILE: &[&str] = &[
        "</auth><x a=\"",
        "\"><script>alert(1)</script>",
        "' onload='x",
        "&amp;&lt;&#0;&",
        "]]><![CDATA[",
        "<!DOCTYPE x [<!ENTITY e SYSTEM \"file:///etc/passwd\">]>",
        "line1\r\nline2\ttab",
        "nul\0bell\u{7}esc\u{1b}",
        "\u{fffe}\u{ffff}\u{d7ff}\u{e000}",
        "é ✓ 😀",
        "",
    ];

    /// What survives the round trip: characters XML cannot carry become U+FFFD.
    fn xml_clean(s: &str) -> String {
        s.chars()
            .map(|c| {
                if matches!(c, '\t' | '\n' | '\r') || is_xml_char(c) {
                    c
                } else {
                    '\u{fffd}'
                }
            })
            .collect()
    }

    #[test]
    fn hostile_strings_round_trip() {
        for &h in HOSTILE {
            let form = Form {
                id: h.into(),
                title: Some(h.into()),
                message: Some(h.into()),
                error: Some(h.into()),
                action: h.into(),
                inputs: vec![
                    Input::Text {
                        name: h.into(),
                        label: h.into(),
                    },
                    Input::Select {
                        name: h.into(),
                        label: h.into(),
                        options: vec![(h.into(), h.into())],
                    },
                ],
            };
            let xml = auth_request_xml(&form, Some(h));
            let items = walk(&xml);
            let want = xml_clean(h);
            let want = if want.trim().is_empty() {
                vec![]
            } else {
                vec![want.as_str()]
            };
            for path in [
                "config-auth/auth/title",
                "config-auth/auth/message",
                "config-auth/auth/error",
                "config-auth/opaque/auth-handle",
                "config-auth/auth/form/select/option",
            ] {
                assert_eq!(get(&items, path), want, "{path} for {h:?}");
            }
            let clean = xml_clean(h);
            for path in [
                "config-auth/auth@id",
                "config-auth/auth/form@action",
                "config-auth/auth/form/input@name",
                "config-auth/auth/form/input@label",
                "config-auth/auth/form/select@label",
                "config-auth/auth/form/select/option@value",
            ] {
                assert_eq!(get(&items, path), [clean.as_str()], "{path} for {h:?}");
            }
            // Structure unchanged: exactly one of each element.
            assert_eq!(get(&items, "config-auth@type"), ["auth-request"]);
            assert_eq!(get(&items, "config-auth/auth/form@method"), ["post"]);

            let done = auth_complete_xml(h, Some(h));
            let items = walk(&done);
            assert_eq!(get(&items, "config-auth/session-token"), want);
            assert_eq!(get(&items, "config-auth/auth/message"), want);
            assert_eq!(get(&items, "config-auth/auth@id"), ["success"]);
        }
    }

    #[test]
    fn complete_layout() {
        let xml = auth_complete_xml("0123ABCD", Some("Welcome"));
        assert!(xml.contains("<session-token>0123ABCD</session-token>"));
        assert!(xml.contains("<auth id=\"success\"><message id=\"0\" param1=\"\" param2=\"\">Welcome</message></auth>"));
        let items = walk(&xml);
        assert_eq!(get(&items, "config-auth@type"), ["complete"]);
        assert_eq!(
            get(&items, "config-auth/capabilities/crypto-supported"),
            ["ssl-dhe"]
        );
        let xml = auth_complete_xml("t", None);
        assert!(xml.contains("<auth id=\"success\"></auth>"));
    }

    #[test]
    fn client_reply_to_our_form_round_trips() {
        // What openconnect would send back for our form: the echoed handle and
        // the two fields, with hostile values escaped by the client.
        for &h in HOSTILE {
            let body = format!(
                "<config-auth client=\"vpn\" type=\"auth-reply\"><opaque is-for=\"sg\"><auth-handle>{}</auth-handle></opaque><auth><username>{}</username><password>{}</password></auth></config-auth>",
                xml_escape(h),
                xml_escape(h),
                xml_escape(h)
            );
            let m = parse_client_message(body.as_bytes()).unwrap();
            let want = xml_clean(h);
            assert_eq!(m.opaque.as_deref(), Some(want.as_str()));
            assert_eq!(m.field("username"), Some(want.as_str()));
            assert_eq!(m.field("password"), Some(want.as_str()));
        }
    }

    proptest::proptest! {
        #[test]
        fn builder_output_is_well_formed(s in ".*") {
            let form = Form {
                id: s.clone(),
                title: Some(s.clone()),
                message: Some(s.clone()),
                error: None,
                action: s.clone(),
                inputs: vec![Input::Password { name: s.clone(), label: s.clone() }],
            };
            let items = walk(&auth_request_xml(&form, Some(&s)));
            let clean = xml_clean(&s);
            proptest::prop_assert_eq!(get(&items, "config-auth/auth/form/input@name"), vec![clean.as_str()]);
            walk(&auth_complete_xml(&s, Some(&s)));
        }

        #[test]
        fn reply_fields_round_trip(user in ".{0,100}", pass in ".{0,100}") {
            let body = format!(
                "<config-auth type=\"auth-reply\"><auth><username>{}</username><password>{}</password></auth></config-auth>",
                xml_escape(&user),
                xml_escape(&pass)
            );
            let m = parse_client_message(body.as_bytes()).unwrap();
            let (u, p) = (xml_clean(&user), xml_clean(&pass));
            proptest::prop_assert_eq!(m.field("username"), Some(u.as_str()));
            proptest::prop_assert_eq!(m.field("password"), Some(p.as_str()));
        }

        #[test]
        fn parsers_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = parse_client_message(&body);
            let _ = parse_form_urlencoded(&body);
        }

        #[test]
        fn xmlish_never_panics(body in "(<[a-z/!?-]{0,12}( [a-z]+=\"[^\"]{0,5}\")?/?>|[a-z&;#<> ]{0,6}){0,30}") {
            let _ = parse_client_message(body.as_bytes());
            let wrapped = format!("<config-auth type=\"auth-reply\"><auth>{body}</auth></config-auth>");
            let _ = parse_client_message(wrapped.as_bytes());
        }
    }
}
