//! The bounds every auth XML parser enforces before doing work
//! proportional to them.

/// Largest accepted body, in bytes.
pub const MAX_BODY: usize = 64 * 1024;
/// Deepest accepted element nesting (the root element is depth 1).
pub const MAX_DEPTH: usize = 16;
/// Most accepted fields (children of `<auth>`, or form pairs).
pub const MAX_FIELDS: usize = 32;
/// Longest accepted field value, element text or field name, in bytes (UTF-8,
/// after unescaping).
pub const MAX_VALUE_LEN: usize = 1024;
