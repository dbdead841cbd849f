//! Fuzzes both auth-body parsers: aggregate-auth XML and form-urlencoded.
//!
//! Beyond "no panic": every bound the parsers promise holds on their output.
#![no_main]

use intragate::wire::auth_xml::{
    parse_client_message, parse_form_urlencoded, ClientMessage, MAX_FIELDS, MAX_VALUE_LEN,
};
use libfuzzer_sys::fuzz_target;

fn check(msg: &ClientMessage) {
    assert!(msg.fields.len() <= MAX_FIELDS);
    for (name, value) in &msg.fields {
        assert!(name.len() <= MAX_VALUE_LEN);
        assert!(value.len() <= MAX_VALUE_LEN);
    }
    for text in [&msg.opaque, &msg.device_id, &msg.version, &msg.group_select]
        .into_iter()
        .flatten()
    {
        assert!(text.len() <= MAX_VALUE_LEN);
    }
    let _ = msg.field("username");
}

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = parse_client_message(data) {
        check(&msg);
    }
    if let Ok(msg) = parse_form_urlencoded(data) {
        check(&msg);
    }
});
