//! Fuzzes the CSTP stream decoder and the checked frame view.
//!
//! Beyond "no panic": a decoded frame must lie inside the input and its header
//! must re-encode to the same bytes, and the checked view must agree with the
//! decoder.
#![no_main]

use intragate::wire::cstp::{self, Frame, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the payload limit so TooLong paths get exercised.
    let (limit, buf) = match data.split_first() {
        Some((&b, rest)) => (usize::from(b) * 8, rest),
        None => (0, data),
    };
    let mut rest = buf;
    // Decode frames back to back, as the receive loop does.
    while let Ok(Some((ty, range, used))) = cstp::decode(rest, limit) {
        assert_eq!(range.end, used);
        assert_eq!(range.start, HEADER_LEN);
        assert!(used <= rest.len());
        assert!(range.len() <= limit);
        let len = u16::try_from(range.len()).expect("payload fits u16");
        assert_eq!(
            rest.get(..HEADER_LEN),
            Some(&cstp::encode_header(ty, len)[..])
        );
        let frame = Frame::new_checked(rest).expect("decoded frame passes new_checked");
        assert_eq!(frame.frame_type(), Ok(ty));
        assert_eq!(Some(frame.payload()), rest.get(range.clone()));
        let _ = cstp::is_logoff(frame.payload());
        let _ = cstp::disconnect_reason(frame.payload());
        rest = rest.get(used..).unwrap_or_default();
    }
    // The unchecked view must not panic on anything either.
    let frame = Frame::new_unchecked(buf);
    let _ = frame.frame_type();
    let _ = frame.payload_len();
    let _ = frame.total_len();
    let _ = frame.payload();
    let _ = frame.check_len();
    let _ = frame.check_header();
});
