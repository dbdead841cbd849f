//! The AnyConnect "aggregate auth" XML exchanged over HTTPS before the tunnel,
//! both ways:
//!
//! - [`from_client`]: what the gateway reads, the client's `<config-auth>`
//!   bodies (and the older `application/x-www-form-urlencoded` form posts);
//! - [`from_server`]: what the client plug-in reads, the server's
//!   `auth-request` forms and `complete` answer;
//! - [`build`]: what the gateway writes, its `auth-request` forms and
//!   `complete` answer.
//!
//! Both parsers share one bounded walk (`walk.rs`): [`MAX_BODY`],
//! [`MAX_DEPTH`], [`MAX_VALUE_LEN`], and any `<!DOCTYPE` is refused, so there
//! is no entity expansion (no XXE, no "billion laughs"); only the five
//! predefined entities and character references are decoded. Building
//! escapes every interpolated string, and replaces characters XML 1.0
//! cannot carry, so hostile strings (a username, an error message) cannot
//! change the document's structure.

pub mod build;
pub mod from_client;
pub mod from_server;
mod limits;
mod walk;

pub use limits::{MAX_BODY, MAX_DEPTH, MAX_FIELDS, MAX_VALUE_LEN};

pub use build::{auth_complete_xml, auth_request_xml, xml_escape, Form, Input};
pub use from_client::{
    parse_client_message, parse_form_urlencoded, AuthXmlError, ClientMessage, ClientMessageKind,
};
pub use from_server::{
    parse_server_message, valid_field_name, AuthRequest, Complete, FormInput, SelectOption,
    ServerForm, ServerMessage, ServerXmlError, MAX_INPUTS, MAX_OPAQUE, MAX_OPTIONS,
};

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests;
