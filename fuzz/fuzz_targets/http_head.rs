//! Fuzzes the bounded HTTP request-head parser and the accessors on its result.
#![no_main]

use intragate::wire::http::{parse_request_head, response_head, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Small limits so the size and count bounds are hit often.
    for limits in [
        Limits::default(),
        Limits {
            max_head: 256,
            max_headers: 4,
            max_body: 64,
        },
    ] {
        if let Ok(Some((head, len))) = parse_request_head(data, &limits) {
            assert!(len <= data.len());
            assert!(len <= limits.max_head);
            assert!(head.headers.len() <= limits.max_headers);
            assert!(head.content_length <= limits.max_body);
            let _ = head.header("host");
            let _ = head.headers_all("cookie").count();
            let _ = head.cookie("webvpn");
            let _ = head.keep_alive();
            // Echoing untrusted values into a response must never split it.
            let pairs: Vec<(&str, &str)> = head
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            let out = response_head(200, &head.path, &pairs, Some(head.content_length));
            let crlfs = out.windows(2).filter(|w| w == b"\r\n").count();
            assert!(crlfs <= pairs.len() + 3);
        }
    }
});
