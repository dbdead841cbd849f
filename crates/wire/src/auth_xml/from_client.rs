//! Messages from the client, read by the gateway: the `<config-auth>` bodies
//! (`init`, `auth-reply`, `logout`) and the older
//! `application/x-www-form-urlencoded` form posts.

use quick_xml::events::BytesStart;

#[cfg(doc)]
use super::build::auth_request_xml;
use super::limits::{MAX_BODY, MAX_FIELDS, MAX_VALUE_LEN};
use super::walk::{self, Visitor, WalkError};

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
    /// Elements nested deeper than [`MAX_DEPTH`](super::limits::MAX_DEPTH).
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

impl From<WalkError> for AuthXmlError {
    fn from(e: WalkError) -> Self {
        match e {
            WalkError::TooLarge(n) => Self::TooLarge(n),
            WalkError::NotUtf8 => Self::NotUtf8,
            WalkError::DoctypeForbidden => Self::DoctypeForbidden,
            WalkError::TooDeep => Self::TooDeep,
            WalkError::TooLong => Self::FieldTooLong,
            WalkError::Malformed(why) => Self::Malformed(why),
            WalkError::Xml(message) => Self::Xml(message),
        }
    }
}

fn xml_err(e: impl std::fmt::Display) -> AuthXmlError {
    AuthXmlError::Xml(walk::xml_message(e))
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

/// The message being read.
struct ClientWalk {
    msg: Option<ClientMessage>,
}

impl Visitor for ClientWalk {
    type Error = AuthXmlError;
    type Slot = Target;

    fn open(
        &mut self,
        path: &[&str],
        name: &str,
        e: &BytesStart<'_>,
    ) -> Result<Option<Target>, AuthXmlError> {
        // Validate every attribute (syntax, duplicates, escapes), keep `type`.
        let mut ty = None;
        for attr in e.attributes() {
            let attr = attr.map_err(xml_err)?;
            let value = attr.unescape_value().map_err(xml_err)?;
            if attr.key.as_ref() == b"type" {
                ty = Some(value.into_owned());
            }
        }

        match (path, self.msg.as_mut()) {
            ([], Some(_)) => Err(AuthXmlError::Malformed("several root elements")),
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
                Ok(None)
            }
            (["config-auth"], Some(msg)) => {
                let target = match name {
                    "version" => Target::Version,
                    "device-id" => Target::DeviceId,
                    "group-select" => Target::GroupSelect,
                    _ => return Ok(None),
                };
                start_single(msg, target)?;
                Ok(Some(target))
            }
            (["config-auth", "auth"], Some(msg)) => {
                if msg.fields.len() >= MAX_FIELDS {
                    return Err(AuthXmlError::TooManyFields);
                }
                msg.fields.push((name.to_owned(), String::new()));
                Ok(Some(Target::Field(msg.fields.len() - 1)))
            }
            (["config-auth", "opaque"], Some(msg)) if name == "auth-handle" => {
                start_single(msg, Target::AuthHandle)?;
                Ok(Some(Target::AuthHandle))
            }
            _ => Ok(None),
        }
    }

    fn slot(&mut self, target: Target) -> Option<&mut String> {
        self.msg.as_mut().and_then(|msg| target_slot(msg, target))
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
    let mut visitor = ClientWalk { msg: None };
    walk::walk(body, &mut visitor)?;
    visitor
        .msg
        .ok_or(AuthXmlError::Malformed("no root element"))
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
