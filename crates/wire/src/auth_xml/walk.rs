//! The bounded walk over an auth document, shared by the parser of client
//! messages ([`super::from_client`]) and of server messages
//! ([`super::from_server`]): the size and UTF-8 checks, the reader's
//! settings, `<!DOCTYPE` refusal, the element stack and its depth limit,
//! element names, text outside the root, unclosed elements, and the capture
//! of an element's own text into a bounded string. What the elements mean is
//! the [`Visitor`]'s business.

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

use super::limits::{MAX_BODY, MAX_DEPTH, MAX_VALUE_LEN};

/// Why the walk stopped; each parser maps it into its own error enum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum WalkError {
    /// The body is larger than [`MAX_BODY`].
    TooLarge(usize),
    /// The body is not valid UTF-8.
    NotUtf8,
    /// A `<!DOCTYPE`.
    DoctypeForbidden,
    /// Elements nested deeper than [`MAX_DEPTH`].
    TooDeep,
    /// An element name or captured text longer than [`MAX_VALUE_LEN`].
    TooLong,
    /// Text outside the root element, or an unclosed element.
    Malformed(&'static str),
    /// The XML reader refused the body ([`xml_message`]).
    Xml(String),
}

/// The XML reader's complaint, bounded to 200 characters (it may quote the
/// peer's bytes: escape it before display).
pub(super) fn xml_message(e: impl std::fmt::Display) -> String {
    e.to_string().chars().take(200).collect()
}

fn xml_err(e: impl std::fmt::Display) -> WalkError {
    WalkError::Xml(xml_message(e))
}

/// What a parser does with the elements of a walk.
pub(super) trait Visitor {
    /// The parser's error.
    type Error: From<WalkError>;
    /// Names a string the text of an element is captured into.
    type Slot: Copy;

    /// The element `name` opens below `path` (the names of its open
    /// ancestors, root first; empty for the root). Its depth and name were
    /// checked. Returns the slot its own text (not that of nested
    /// elements) goes to, if any.
    fn open(
        &mut self,
        path: &[&str],
        name: &str,
        element: &BytesStart<'_>,
    ) -> Result<Option<Self::Slot>, Self::Error>;

    /// The element `name` below `path` closed; `raw` is its whole text in
    /// the document, start tag to end tag.
    fn close(&mut self, path: &[&str], name: &str, raw: Option<&str>) -> Result<(), Self::Error> {
        let _ = (path, name, raw);
        Ok(())
    }

    /// The string `slot` collects into (`None`: drop the text).
    fn slot(&mut self, slot: Self::Slot) -> Option<&mut String>;
}

fn position(reader: &Reader<&[u8]>) -> usize {
    usize::try_from(reader.buffer_position()).unwrap_or(usize::MAX)
}

/// An element opens: checks depth and name, asks the visitor, returns the
/// name and where its text goes.
fn open<V: Visitor>(
    stack: &[(String, usize)],
    element: &BytesStart<'_>,
    visitor: &mut V,
) -> Result<(String, Option<V::Slot>), V::Error> {
    if stack.len() >= MAX_DEPTH {
        return Err(WalkError::TooDeep.into());
    }
    let name = std::str::from_utf8(element.name().as_ref())
        .map_err(|_| WalkError::NotUtf8)?
        .to_owned();
    if name.len() > MAX_VALUE_LEN {
        return Err(WalkError::TooLong.into());
    }
    let path: Vec<&str> = stack.iter().map(|(n, _)| n.as_str()).collect();
    let slot = visitor.open(&path, &name, element)?;
    Ok((name, slot))
}

fn text<V: Visitor>(
    stack: &[(String, usize)],
    capture: Option<(V::Slot, usize)>,
    visitor: &mut V,
    text: &str,
) -> Result<(), V::Error> {
    if stack.is_empty() {
        if text.trim().is_empty() {
            return Ok(());
        }
        return Err(WalkError::Malformed("text outside the root element").into());
    }
    // Only the captured element's own text, not that of nested elements.
    let Some((slot, _)) = capture.filter(|&(_, depth)| depth == stack.len()) else {
        return Ok(());
    };
    if let Some(out) = visitor.slot(slot) {
        if out.len() + text.len() > MAX_VALUE_LEN {
            return Err(WalkError::TooLong.into());
        }
        out.push_str(text);
    }
    Ok(())
}

/// Walks `body` (a BOM is skipped), calling `visitor` for every element and
/// capturing text into its slots. Comments, processing instructions and the
/// XML declaration are skipped; only the five predefined entities and
/// character references are decoded.
///
/// # Errors
/// The visitor's errors, and [`WalkError`]s converted into them.
pub(super) fn walk<V: Visitor>(body: &[u8], visitor: &mut V) -> Result<(), V::Error> {
    if body.len() > MAX_BODY {
        return Err(WalkError::TooLarge(body.len()).into());
    }
    let doc = std::str::from_utf8(body).map_err(|_| WalkError::NotUtf8)?;
    let doc = doc.strip_prefix('\u{feff}').unwrap_or(doc);
    let mut reader = Reader::from_str(doc);
    {
        let config = reader.config_mut();
        config.trim_text(false);
        config.check_end_names = true;
        config.check_comments = true;
        config.expand_empty_elements = false;
    }
    // Open elements: name and where their start tag begins in `doc`.
    let mut stack: Vec<(String, usize)> = Vec::new();
    // The element whose own text is captured, and its depth.
    let mut capture: Option<(V::Slot, usize)> = None;
    loop {
        let before = position(&reader);
        match reader.read_event().map_err(xml_err)? {
            Event::DocType(_) => return Err(WalkError::DoctypeForbidden.into()),
            Event::Start(e) => {
                let (name, slot) = open(&stack, &e, visitor)?;
                stack.push((name, before));
                if let Some(slot) = slot {
                    capture = Some((slot, stack.len()));
                }
            }
            Event::Empty(e) => {
                let (name, _) = open(&stack, &e, visitor)?;
                if capture.is_some_and(|(_, depth)| depth == stack.len() + 1) {
                    capture = None;
                }
                let path: Vec<&str> = stack.iter().map(|(n, _)| n.as_str()).collect();
                visitor.close(&path, &name, doc.get(before..position(&reader)))?;
            }
            Event::End(_) => {
                if capture.is_some_and(|(_, depth)| depth == stack.len()) {
                    capture = None;
                }
                if let Some((name, start)) = stack.pop() {
                    let path: Vec<&str> = stack.iter().map(|(n, _)| n.as_str()).collect();
                    visitor.close(&path, &name, doc.get(start..position(&reader)))?;
                }
            }
            Event::Text(t) => text(&stack, capture, visitor, &t.unescape().map_err(xml_err)?)?,
            Event::CData(c) => text(&stack, capture, visitor, &c.decode().map_err(xml_err)?)?,
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(WalkError::Malformed("unclosed element").into());
    }
    Ok(())
}
