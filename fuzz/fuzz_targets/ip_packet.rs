//! Fuzzes the IP packet view.
//!
//! Beyond "no panic": the lengths it reports are consistent with the buffer.
#![no_main]

use intragate::wire::ip;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = ip::parse(data) {
        assert!(info.version == 4 || info.version == 6);
        assert!(info.header_len <= info.total_len);
        assert!(info.total_len <= data.len());
        if info.is_fragment {
            assert!(info.ports.is_none() && info.icmp.is_none());
        }
    }
});
