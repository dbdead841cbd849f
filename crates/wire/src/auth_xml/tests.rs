//! Byte-fixture and property tests of the client-message parser and the
//! server-message builders (and of the two together).

use super::build::is_xml_char;
use super::*;
use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

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
        format!(
            "<config-auth type=\"auth-reply\"><auth><password>{v}</password></auth></config-auth>"
        )
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
    let m =
        parse_form_urlencoded(b"username=alice&password=s%3Dc+r%2Bet&&flag&=x&group_list=%C3%A9")
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
    let open = |e: &BytesStart<'_>, stack: &mut Vec<String>, out: &mut Vec<(String, String)>| {
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
    assert!(xml.contains("<auth id=\"second\">\n<form method=\"post\" action=\"/auth\">\n</form>"));
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
    assert!(xml.contains(
        "<auth id=\"success\"><message id=\"0\" param1=\"\" param2=\"\">Welcome</message></auth>"
    ));
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
