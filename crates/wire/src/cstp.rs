//! CSTP framing: the 8-byte header that wraps every packet and control message
//! inside the TLS tunnel (draft-mavrogiannopoulos-openconnect, "CSTP").
//!
//! ```text
//!  0      1      2      3      4      5      6      7
//! +------+------+------+------+------+------+------+------+--------
//! | 'S'  | 'T'  | 'F'  | 0x01 | payload len | type | 0x00 | payload
//! +------+------+------+------+---(u16 BE)--+------+------+--------
//! ```
//!
//! Two ways in:
//! - [`decode`] for the receive loop: looks at the front of a byte stream, says
//!   "need more bytes", "error" or "here is one frame and how much it consumed";
//! - [`Frame`], a smoltcp-style checked view over one frame's bytes.
//!
//! Two ways out: [`encode_header`] and [`emit`] (header + payload into the caller's
//! buffer). Nothing here allocates.
//!
//! openconnect needs exactly one frame per TLS record in both directions (see
//! `PEERS.md` item 7); keeping records and frames aligned is the caller's job.

use core::ops::Range;
use std::borrow::Cow;

/// Length of the CSTP header in bytes.
pub const HEADER_LEN: usize = 8;

/// The four magic bytes every CSTP header starts with: `"STF"` and version 1.
pub const MAGIC: [u8; 4] = *b"STF\x01";

/// The largest payload the 16-bit length field can describe.
pub const MAX_PAYLOAD: usize = u16::MAX as usize;

/// First payload byte of a DISCONNECT frame meaning "deliberate logoff"
/// (openconnect sends `0xb0` followed by a reason such as "Aborted by caller").
pub const LOGOFF_CODE: u8 = 0xb0;

/// Byte positions of the header fields.
mod field {
    use core::ops::Range;

    pub(super) const MAGIC: Range<usize> = 0..4;
    pub(super) const LENGTH: Range<usize> = 4..6;
    pub(super) const TYPE: usize = 6;
    pub(super) const RESERVED: usize = 7;
}

/// Errors from CSTP decoding, checking and emitting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CstpError {
    /// The buffer is shorter than the header, or than header plus the payload
    /// length it announces (only from [`Frame::check_len`] / [`Frame::new_checked`];
    /// [`decode`] answers `Ok(None)` instead).
    #[error("truncated CSTP frame")]
    Truncated,
    /// The first four bytes are not `STF\x01`.
    #[error("bad CSTP magic")]
    BadMagic,
    /// Byte 7 of the header is not zero (openconnect always sends zero).
    #[error("bad CSTP header: reserved byte is {0:#04x}")]
    BadHeader(u8),
    /// The type byte is not one of the known [`FrameType`]s.
    #[error("unknown CSTP frame type {0}")]
    UnknownType(u8),
    /// The payload is longer than the allowed maximum.
    #[error("CSTP payload of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// Payload length announced or requested.
        len: usize,
        /// The limit that was exceeded.
        max: usize,
    },
    /// The output buffer cannot hold the frame being emitted.
    #[error("output buffer of {have} bytes cannot hold a {need}-byte CSTP frame")]
    BufferTooSmall {
        /// Bytes needed (header + payload).
        need: usize,
        /// Bytes available.
        have: usize,
    },
}

/// The CSTP frame types openconnect 9.01 sends or understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// An IP packet.
    Data = 0,
    /// Dead-peer-detection request; answer with an empty [`FrameType::DpdResp`].
    DpdReq = 3,
    /// Dead-peer-detection response.
    DpdResp = 4,
    /// Disconnect; a payload starting with [`LOGOFF_CODE`] is a deliberate logoff.
    Disconnect = 5,
    /// Keepalive, no payload.
    Keepalive = 7,
    /// A compressed IP packet (only if compression was negotiated; we never do).
    Compressed = 8,
    /// Server-side termination: the client exits without reconnecting.
    Terminate = 9,
    /// A TCP super-packet ([`crate::gso`]): intragate's extension, only on a
    /// tunnel whose CONNECT negotiated it (`X-Intragate-GSO`); a stock
    /// client never sends or receives it.
    Gso = 0x40,
}

impl TryFrom<u8> for FrameType {
    type Error = CstpError;

    fn try_from(value: u8) -> Result<Self, Self::Error> {
        Ok(match value {
            0 => Self::Data,
            3 => Self::DpdReq,
            4 => Self::DpdResp,
            5 => Self::Disconnect,
            7 => Self::Keepalive,
            8 => Self::Compressed,
            9 => Self::Terminate,
            0x40 => Self::Gso,
            other => return Err(CstpError::UnknownType(other)),
        })
    }
}

impl From<FrameType> for u8 {
    fn from(value: FrameType) -> Self {
        value as u8
    }
}

/// A read-only (or, with `T: AsMut<[u8]>`, writable) view over one CSTP frame.
///
/// Build it with [`Frame::new_checked`]; after that succeeds every accessor
/// returns the real field values. A view from [`Frame::new_unchecked`] never
/// panics either: on a buffer too short for a field, accessors return the
/// documented fallback instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Frame<T> {
    /// Wraps a buffer without any check.
    #[must_use]
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Wraps a buffer and checks it with [`Frame::check_len`] and
    /// [`Frame::check_header`].
    ///
    /// # Errors
    /// [`CstpError::Truncated`], [`CstpError::BadMagic`], [`CstpError::BadHeader`]
    /// or [`CstpError::UnknownType`].
    pub fn new_checked(buffer: T) -> Result<Self, CstpError> {
        let frame = Self::new_unchecked(buffer);
        frame.check_len()?;
        frame.check_header()?;
        Ok(frame)
    }

    /// Checks that the buffer holds a whole header and the whole payload it
    /// announces. Trailing bytes after the payload are allowed (see
    /// [`Frame::total_len`]).
    ///
    /// # Errors
    /// [`CstpError::Truncated`].
    pub fn check_len(&self) -> Result<(), CstpError> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN || len < self.total_len() {
            return Err(CstpError::Truncated);
        }
        Ok(())
    }

    /// Checks magic, reserved byte and type.
    ///
    /// # Errors
    /// [`CstpError::Truncated`] if the header is incomplete, otherwise
    /// [`CstpError::BadMagic`], [`CstpError::BadHeader`] or
    /// [`CstpError::UnknownType`].
    pub fn check_header(&self) -> Result<(), CstpError> {
        let header = self
            .buffer
            .as_ref()
            .get(..HEADER_LEN)
            .ok_or(CstpError::Truncated)?;
        check_header_bytes(header).map(|_| ())
    }

    /// Consumes the view and returns the buffer.
    #[must_use]
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The frame type.
    ///
    /// # Errors
    /// Never on a view from [`Frame::new_checked`]. On an unchecked view:
    /// [`CstpError::Truncated`] if there is no type byte, [`CstpError::UnknownType`]
    /// for an unknown one.
    pub fn frame_type(&self) -> Result<FrameType, CstpError> {
        let raw = self
            .buffer
            .as_ref()
            .get(field::TYPE)
            .copied()
            .ok_or(CstpError::Truncated)?;
        FrameType::try_from(raw)
    }

    /// The payload length announced by the header (0 if the buffer is too short
    /// to hold the length field).
    #[must_use]
    pub fn payload_len(&self) -> u16 {
        read_len(self.buffer.as_ref()).unwrap_or(0)
    }

    /// Header plus announced payload: the number of bytes this frame occupies.
    #[must_use]
    pub fn total_len(&self) -> usize {
        HEADER_LEN + usize::from(self.payload_len())
    }

    /// The payload bytes. On an unchecked, truncated view this is whatever part
    /// of the payload the buffer holds (possibly empty).
    #[must_use]
    pub fn payload(&self) -> &[u8] {
        let buf = self.buffer.as_ref();
        let end = self.total_len().min(buf.len());
        buf.get(HEADER_LEN..end).unwrap_or(&[])
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Frame<T> {
    /// Writes a header for `ty` and `payload_len` into the first
    /// [`HEADER_LEN`] bytes of the buffer.
    ///
    /// # Errors
    /// [`CstpError::BufferTooSmall`] if the buffer is shorter than the header.
    pub fn set_header(&mut self, ty: FrameType, payload_len: u16) -> Result<(), CstpError> {
        let buf = self.buffer.as_mut();
        let have = buf.len();
        let header = buf.get_mut(..HEADER_LEN).ok_or(CstpError::BufferTooSmall {
            need: HEADER_LEN,
            have,
        })?;
        header.copy_from_slice(&encode_header(ty, payload_len));
        Ok(())
    }

    /// The payload bytes, writable. Same bounds as [`Frame::payload`].
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = self.total_len();
        let buf = self.buffer.as_mut();
        let end = end.min(buf.len());
        buf.get_mut(HEADER_LEN..end).unwrap_or(&mut [])
    }
}

fn read_len(buf: &[u8]) -> Option<u16> {
    let bytes = buf.get(field::LENGTH)?;
    let arr: [u8; 2] = bytes.try_into().ok()?;
    Some(u16::from_be_bytes(arr))
}

/// Validates a complete 8-byte header and returns its type and payload length.
fn check_header_bytes(header: &[u8]) -> Result<(FrameType, u16), CstpError> {
    if header.get(field::MAGIC) != Some(&MAGIC[..]) {
        return Err(CstpError::BadMagic);
    }
    match header.get(field::RESERVED) {
        Some(0) => {}
        Some(&other) => return Err(CstpError::BadHeader(other)),
        None => return Err(CstpError::Truncated),
    }
    let raw_type = header
        .get(field::TYPE)
        .copied()
        .ok_or(CstpError::Truncated)?;
    let ty = FrameType::try_from(raw_type)?;
    let len = read_len(header).ok_or(CstpError::Truncated)?;
    Ok((ty, len))
}

/// Builds the 8-byte header for a frame of type `ty` carrying `payload_len` bytes.
#[must_use]
pub fn encode_header(ty: FrameType, payload_len: u16) -> [u8; HEADER_LEN] {
    let [hi, lo] = payload_len.to_be_bytes();
    let [m0, m1, m2, m3] = MAGIC;
    [m0, m1, m2, m3, hi, lo, u8::from(ty), 0]
}

/// Writes a whole frame (header + `payload`) to the front of `out` and returns
/// the number of bytes written.
///
/// # Errors
/// [`CstpError::TooLong`] if `payload` exceeds [`MAX_PAYLOAD`],
/// [`CstpError::BufferTooSmall`] if `out` cannot hold the frame.
pub fn emit(ty: FrameType, payload: &[u8], out: &mut [u8]) -> Result<usize, CstpError> {
    let len = u16::try_from(payload.len()).map_err(|_| CstpError::TooLong {
        len: payload.len(),
        max: MAX_PAYLOAD,
    })?;
    let need = HEADER_LEN + payload.len();
    let have = out.len();
    let dst = out
        .get_mut(..need)
        .ok_or(CstpError::BufferTooSmall { need, have })?;
    let (header, body) = dst.split_at_mut(HEADER_LEN);
    header.copy_from_slice(&encode_header(ty, len));
    body.copy_from_slice(payload);
    Ok(need)
}

/// Decodes the frame at the front of a receive buffer.
///
/// Returns:
/// - `Ok(None)` when `buf` holds a valid prefix of a frame but not all of it
///   (incomplete header or payload): read more and call again;
/// - `Ok(Some((type, payload_range, consumed)))` for a complete frame, where
///   `buf[payload_range]` is the payload and `consumed` (= `payload_range.end`)
///   is the number of bytes to drop from the front of `buf`.
///
/// Errors are reported as early as the bytes allow: a wrong magic byte is an
/// error even before the header is complete, and an over-long payload is an
/// error as soon as the header is in, without waiting for the payload.
///
/// # Errors
/// [`CstpError::BadMagic`], [`CstpError::BadHeader`] (nonzero byte 7),
/// [`CstpError::UnknownType`], [`CstpError::TooLong`] (announced length above
/// `max_payload`).
pub fn decode(
    buf: &[u8],
    max_payload: usize,
) -> Result<Option<(FrameType, Range<usize>, usize)>, CstpError> {
    // Reject garbage before waiting for a full header.
    let seen = buf.len().min(MAGIC.len());
    if buf.get(..seen) != MAGIC.get(..seen) {
        return Err(CstpError::BadMagic);
    }
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let (ty, len) = check_header_bytes(header)?;
    let len = usize::from(len);
    if len > max_payload {
        return Err(CstpError::TooLong {
            len,
            max: max_payload,
        });
    }
    let end = HEADER_LEN + len;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some((ty, HEADER_LEN..end, end)))
}

/// True if a DISCONNECT payload is a deliberate logoff (first byte `0xb0`).
#[must_use]
pub fn is_logoff(payload: &[u8]) -> bool {
    payload.first() == Some(&LOGOFF_CODE)
}

/// The human-readable reason in a DISCONNECT payload: the bytes after the first
/// (code) byte, decoded as lossy UTF-8, with trailing NULs and whitespace removed.
/// Borrowed unless the bytes are not valid UTF-8. Meant for logs: the text is
/// untrusted, escape it before display.
#[must_use]
pub fn disconnect_reason(payload: &[u8]) -> Cow<'_, str> {
    let text = payload.get(1..).unwrap_or(&[]);
    match String::from_utf8_lossy(text) {
        Cow::Borrowed(s) => Cow::Borrowed(trim_reason(s)),
        Cow::Owned(s) => Cow::Owned(trim_reason(&s).to_owned()),
    }
}

fn trim_reason(s: &str) -> &str {
    s.trim_end_matches(|c: char| c == '\0' || c.is_whitespace())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    /// A DPD-REQ as openconnect sends it: empty payload.
    const DPD_REQ: [u8; 8] = [b'S', b'T', b'F', 0x01, 0x00, 0x00, 0x03, 0x00];
    /// A keepalive.
    const KEEPALIVE: [u8; 8] = [b'S', b'T', b'F', 0x01, 0x00, 0x00, 0x07, 0x00];
    /// What openconnect sends on SIGINT: DISCONNECT, 0xb0 + "Aborted by caller".
    const LOGOFF: &[u8] = b"STF\x01\x00\x12\x05\x00\xb0Aborted by caller";

    /// A DATA frame carrying a 28-byte ICMP echo request (10.0.0.2 -> 10.0.0.1).
    fn data_frame() -> Vec<u8> {
        let ip: [u8; 28] = [
            0x45, 0x00, 0x00, 0x1c, 0x12, 0x34, 0x40, 0x00, 0x40, 0x01, 0x00, 0x00, 10, 0, 0, 2,
            10, 0, 0, 1, 0x08, 0x00, 0xf7, 0xfe, 0x00, 0x01, 0x00, 0x00,
        ];
        let mut v = vec![b'S', b'T', b'F', 0x01, 0x00, 28, 0x00, 0x00];
        v.extend_from_slice(&ip);
        v
    }

    #[test]
    fn frame_type_round_trip() {
        for raw in 0..=u8::MAX {
            match FrameType::try_from(raw) {
                Ok(ty) => assert_eq!(u8::from(ty), raw),
                Err(e) => {
                    assert_eq!(e, CstpError::UnknownType(raw));
                    assert!(matches!(raw, 1 | 2 | 6 | 10..=0x3f | 0x41..=255));
                }
            }
        }
    }

    #[test]
    fn decodes_control_frames() {
        assert_eq!(
            decode(&DPD_REQ, 1500).unwrap(),
            Some((FrameType::DpdReq, 8..8, 8))
        );
        assert_eq!(
            decode(&KEEPALIVE, 1500).unwrap(),
            Some((FrameType::Keepalive, 8..8, 8))
        );
    }

    #[test]
    fn decodes_logoff() {
        let (ty, range, used) = decode(LOGOFF, 1500).unwrap().unwrap();
        assert_eq!(ty, FrameType::Disconnect);
        assert_eq!(used, LOGOFF.len());
        let payload = &LOGOFF[range];
        assert!(is_logoff(payload));
        assert_eq!(disconnect_reason(payload), "Aborted by caller");
    }

    #[test]
    fn decodes_data_and_leaves_trailing_bytes() {
        let mut buf = data_frame();
        buf.extend_from_slice(&KEEPALIVE);
        let (ty, range, used) = decode(&buf, 1500).unwrap().unwrap();
        assert_eq!(ty, FrameType::Data);
        assert_eq!(range, 8..36);
        assert_eq!(used, 36);
        assert_eq!(buf[range][0], 0x45);
        let rest = &buf[used..];
        assert_eq!(
            decode(rest, 1500).unwrap(),
            Some((FrameType::Keepalive, 8..8, 8))
        );
    }

    #[test]
    fn every_prefix_is_incomplete_not_error() {
        let buf = data_frame();
        for n in 0..buf.len() {
            assert_eq!(decode(&buf[..n], 1500), Ok(None), "prefix {n}");
        }
    }

    #[test]
    fn bad_magic_detected_early() {
        assert_eq!(decode(b"G", 1500), Err(CstpError::BadMagic));
        assert_eq!(
            decode(b"GET / HTTP/1.1\r\n", 1500),
            Err(CstpError::BadMagic)
        );
        assert_eq!(decode(b"STF\x02", 1500), Err(CstpError::BadMagic));
        assert_eq!(decode(b"ST", 1500), Ok(None));
    }

    #[test]
    fn reserved_byte_must_be_zero() {
        let mut h = KEEPALIVE;
        h[7] = 1;
        assert_eq!(decode(&h, 1500), Err(CstpError::BadHeader(1)));
    }

    #[test]
    fn unknown_type_rejected() {
        let h = [b'S', b'T', b'F', 0x01, 0x00, 0x00, 0x06, 0x00];
        assert_eq!(decode(&h, 1500), Err(CstpError::UnknownType(6)));
        let h = [b'S', b'T', b'F', 0x01, 0x00, 0x00, 0xff, 0x00];
        assert_eq!(decode(&h, 1500), Err(CstpError::UnknownType(255)));
    }

    #[test]
    fn too_long_rejected_before_payload_arrives() {
        let h = [b'S', b'T', b'F', 0x01, 0xff, 0xff, 0x00, 0x00];
        assert_eq!(
            decode(&h, 1500),
            Err(CstpError::TooLong {
                len: 65535,
                max: 1500
            })
        );
        // Exactly at the limit is fine.
        let h = [b'S', b'T', b'F', 0x01, 0x05, 0xdc, 0x00, 0x00];
        assert_eq!(decode(&h, 1500), Ok(None));
    }

    #[test]
    fn encode_matches_fixtures() {
        assert_eq!(encode_header(FrameType::DpdReq, 0), DPD_REQ);
        assert_eq!(encode_header(FrameType::Keepalive, 0), KEEPALIVE);
        assert_eq!(
            encode_header(FrameType::Disconnect, 18),
            <[u8; 8]>::try_from(&LOGOFF[..8]).unwrap()
        );
    }

    #[test]
    fn emit_writes_whole_frame() {
        let mut out = [0u8; 64];
        let n = emit(FrameType::Disconnect, b"\xb0Aborted by caller", &mut out).unwrap();
        assert_eq!(&out[..n], LOGOFF);
        let mut small = [0u8; 10];
        assert_eq!(
            emit(FrameType::Data, &[0; 3], &mut small),
            Err(CstpError::BufferTooSmall { need: 11, have: 10 })
        );
        let big = vec![0u8; MAX_PAYLOAD + 1];
        let mut out = vec![0u8; MAX_PAYLOAD + 9];
        assert!(matches!(
            emit(FrameType::Data, &big, &mut out),
            Err(CstpError::TooLong { .. })
        ));
    }

    #[test]
    fn checked_view() {
        let buf = data_frame();
        let frame = Frame::new_checked(&buf[..]).unwrap();
        assert_eq!(frame.frame_type(), Ok(FrameType::Data));
        assert_eq!(frame.payload_len(), 28);
        assert_eq!(frame.total_len(), 36);
        assert_eq!(frame.payload(), &buf[8..]);

        assert_eq!(
            Frame::new_checked(&buf[..35]).unwrap_err(),
            CstpError::Truncated
        );
        assert_eq!(
            Frame::new_checked(&buf[..3]).unwrap_err(),
            CstpError::Truncated
        );
        let mut bad = buf.clone();
        bad[0] = b'X';
        assert_eq!(
            Frame::new_checked(&bad[..]).unwrap_err(),
            CstpError::BadMagic
        );
        let mut bad = buf.clone();
        bad[6] = 2;
        assert_eq!(
            Frame::new_checked(&bad[..]).unwrap_err(),
            CstpError::UnknownType(2)
        );
    }

    #[test]
    fn unchecked_view_never_panics() {
        let buf = data_frame();
        for n in 0..buf.len() {
            let f = Frame::new_unchecked(&buf[..n]);
            let _ = f.frame_type();
            let _ = f.payload_len();
            assert!(f.payload().len() <= n.saturating_sub(HEADER_LEN));
        }
        let f = Frame::new_unchecked(&[][..]);
        assert_eq!(f.frame_type(), Err(CstpError::Truncated));
        assert_eq!(f.payload_len(), 0);
        assert_eq!(f.payload(), &[] as &[u8]);
    }

    #[test]
    fn writable_view() {
        let mut buf = [0u8; 12];
        let mut f = Frame::new_unchecked(&mut buf[..]);
        f.set_header(FrameType::DpdResp, 4).unwrap();
        f.payload_mut().copy_from_slice(b"abcd");
        assert_eq!(&buf, b"STF\x01\x00\x04\x04\x00abcd");
        let mut tiny = [0u8; 4];
        assert!(Frame::new_unchecked(&mut tiny[..])
            .set_header(FrameType::Data, 0)
            .is_err());
    }

    #[test]
    fn disconnect_helpers() {
        assert!(!is_logoff(b""));
        assert!(!is_logoff(b"\x00x"));
        assert_eq!(disconnect_reason(b""), "");
        assert_eq!(disconnect_reason(b"\xb0"), "");
        assert_eq!(disconnect_reason(b"\xb0bye\0\0"), "bye");
        assert_eq!(disconnect_reason(b"\xb0\xff\xfe"), "\u{fffd}\u{fffd}");
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics_and_is_consistent(buf in proptest::collection::vec(proptest::num::u8::ANY, 0..80), max in 0usize..100) {
            if let Ok(Some((ty, range, used))) = decode(&buf, max) {
                proptest::prop_assert_eq!(range.end, used);
                proptest::prop_assert!(used <= buf.len());
                proptest::prop_assert!(range.len() <= max);
                proptest::prop_assert_eq!(&buf[..8], &encode_header(ty, range.len() as u16)[..]);
            }
        }

        #[test]
        fn emit_then_decode(ty_raw in proptest::sample::select(vec![0u8, 3, 4, 5, 7, 8, 9]), payload in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let ty = FrameType::try_from(ty_raw).unwrap();
            let mut out = vec![0u8; payload.len() + HEADER_LEN];
            let n = emit(ty, &payload, &mut out).unwrap();
            let (dty, range, used) = decode(&out, payload.len()).unwrap().unwrap();
            proptest::prop_assert_eq!(dty, ty);
            proptest::prop_assert_eq!(used, n);
            proptest::prop_assert_eq!(&out[range], &payload[..]);
        }
    }
}
