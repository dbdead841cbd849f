//! The gateway's AnyConnect "aggregate auth" XML, seen from the client:
//! filling a server form from flags, stdin or a terminal prompt, and
//! building the `init` and `auth-reply` bodies. Reading the server's
//! messages (untrusted bytes: bounded, no `<!DOCTYPE`) is
//! [`crate::wire::auth_xml::parse_server_message`];
//! [`parse_server_message`] here only holds the session token as a
//! [`Secret`].
//!
//! A form may hold text, password, hidden and select inputs; any number of
//! forms may follow each other (ocserv asks for the username, then the
//! password; intragate asks both at once, then maybe the **transfer** form:
//! `<auth id="transfer">` with `<select name="action">` offering
//! Transfer/Cancel, see DESIGN.md §5).
//!
//! Select answers follow openconnect (PEERS.md item 9): an answer matches an
//! option by value, else by label (case-insensitive, exact or unique prefix),
//! and the option's **value** is sent.

use super::Secret;
use crate::wire::auth_xml::{self, valid_field_name, xml_escape};
pub use crate::wire::auth_xml::{AuthRequest, FormInput, SelectOption, ServerForm, ServerXmlError};

/// The `<version>` we announce: the openconnect protocol level we follow.
pub const CLIENT_VERSION: &str = "v9.01";
/// The `<device-id>` we announce.
pub const DEVICE_ID: &str = "linux-64";

/// A parsed `complete` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Complete {
    /// `<session-token>`, if the server sent one (else the `webvpn` cookie).
    pub session_token: Option<Secret>,
    /// `<message>` or `<title>` of `<auth id="success">`.
    pub message: Option<String>,
    /// `<banner>`.
    pub banner: Option<String>,
}

/// A server `<config-auth>` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMessage {
    /// `type="auth-request"`: fill and post the form.
    AuthRequest(AuthRequest),
    /// `type="complete"`: logged on.
    Complete(Complete),
}

/// Parses a server `<config-auth>` body
/// ([`auth_xml::parse_server_message`]), the session token held as a
/// [`Secret`].
///
/// # Errors
/// Any [`ServerXmlError`]; never panics.
pub fn parse_server_message(body: &[u8]) -> Result<ServerMessage, ServerXmlError> {
    Ok(match auth_xml::parse_server_message(body)? {
        auth_xml::ServerMessage::AuthRequest(r) => ServerMessage::AuthRequest(r),
        auth_xml::ServerMessage::Complete(c) => ServerMessage::Complete(Complete {
            session_token: c.session_token.map(Secret::new),
            message: c.message,
            banner: c.banner,
        }),
    })
}

const XML_DECL: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";

/// The first POST: `<config-auth type="init">` naming the URL we were given.
pub fn init_xml(group_access: &str) -> String {
    format!(
        "{XML_DECL}<config-auth client=\"vpn\" type=\"init\" aggregate-auth-version=\"2\">\
<version who=\"vpn\">{CLIENT_VERSION}</version><device-id>{DEVICE_ID}</device-id>\
<group-access>{}</group-access></config-auth>",
        xml_escape(group_access)
    )
}

/// The answers to one form, ready to post. `Debug` hides password values.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct FilledForm {
    /// `(name, value, secret)` in form order.
    fields: Vec<(String, Secret, bool)>,
}

impl FilledForm {
    /// Adds a field.
    pub fn push(&mut self, name: &str, value: Secret, secret: bool) {
        self.fields.push((name.to_owned(), value, secret));
    }

    /// The value of a field (for tests and the username in the status).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, v, _)| v.expose())
    }

    /// `name=value` pairs for logs, with secret values shown as `<hidden>`.
    pub fn summary(&self) -> String {
        self.fields
            .iter()
            .map(|(n, v, secret)| {
                if *secret {
                    format!("{n}=<hidden>")
                } else {
                    format!("{n}={}", super::printable(v.expose(), 64))
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl std::fmt::Debug for FilledForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FilledForm({})", self.summary())
    }
}

/// The `auth-reply` body answering a form: the echoed `<opaque>` and one
/// element per field. Field names were validated when the form was parsed;
/// values are escaped.
pub fn auth_reply_xml(opaque: Option<&str>, filled: &FilledForm) -> String {
    let mut out = String::with_capacity(512);
    out.push_str(XML_DECL);
    out.push_str("<config-auth client=\"vpn\" type=\"auth-reply\" aggregate-auth-version=\"2\">");
    out.push_str("<version who=\"vpn\">");
    out.push_str(CLIENT_VERSION);
    out.push_str("</version><device-id>");
    out.push_str(DEVICE_ID);
    out.push_str("</device-id>");
    if let Some(o) = opaque {
        out.push_str(o);
    }
    out.push_str("<auth>");
    for (name, value, _) in &filled.fields {
        if !valid_field_name(name) {
            continue;
        }
        out.push('<');
        out.push_str(name);
        out.push('>');
        out.push_str(&xml_escape(value.expose()));
        out.push_str("</");
        out.push_str(name);
        out.push('>');
    }
    out.push_str("</auth></config-auth>");
    out
}

/// One `--form-entry [FORM_ID:]NAME=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormEntry {
    /// The form id it applies to, or every form.
    pub form: Option<String>,
    /// Field name.
    pub name: String,
    /// The answer (for a select: a value or a label).
    pub value: String,
}

impl std::str::FromStr for FormEntry {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (key, value) = s
            .split_once('=')
            .ok_or_else(|| format!("'{s}': expected [FORM_ID:]NAME=VALUE"))?;
        let (form, name) = match key.split_once(':') {
            Some((f, n)) => (Some(f.to_owned()), n),
            None => (None, key),
        };
        if name.is_empty() {
            return Err(format!("'{s}': empty field name"));
        }
        Ok(Self {
            form,
            name: name.to_owned(),
            value: value.to_owned(),
        })
    }
}

/// Everything the user gave before logon that can answer form inputs.
#[derive(Debug, Clone, Default)]
pub struct Answers {
    /// `--user`: fills a text input whose name starts with `user`.
    pub user: Option<String>,
    /// `--password-stdin`: fills the first password input, once.
    pub password: Option<Secret>,
    /// `--form-entry` answers.
    pub entries: Vec<FormEntry>,
    /// `--transfer yes|no`: answers the `transfer` form's `action` select.
    pub transfer: Option<bool>,
    password_used: bool,
}

impl Answers {
    /// Answers from the command line.
    pub fn new(
        user: Option<String>,
        password: Option<Secret>,
        entries: Vec<FormEntry>,
        transfer: Option<bool>,
    ) -> Self {
        Self {
            user,
            password,
            entries,
            transfer,
            password_used: false,
        }
    }

    fn entry(&self, form: &str, name: &str) -> Option<&str> {
        let specific = self
            .entries
            .iter()
            .rev()
            .find(|e| e.form.as_deref() == Some(form) && e.name == name);
        let general = || {
            self.entries
                .iter()
                .rev()
                .find(|e| e.form.is_none() && e.name == name)
        };
        specific.or_else(general).map(|e| e.value.as_str())
    }
}

/// Asks the user. Implemented by the terminal prompt; tests script it.
pub trait Prompter {
    /// True if questions can be asked.
    fn interactive(&self) -> bool;
    /// Shows text (title, message, error, banner) before questions.
    fn show(&mut self, text: &str);
    /// Asks for visible text.
    ///
    /// # Errors
    /// I/O errors of the terminal, or end of input.
    fn ask_text(&mut self, label: &str) -> std::io::Result<String>;
    /// Asks for a secret without echo.
    ///
    /// # Errors
    /// I/O errors of the terminal, or end of input.
    fn ask_secret(&mut self, label: &str) -> std::io::Result<Secret>;
}

/// A prompter that can ask nothing (scripts, services).
#[derive(Debug, Clone, Copy, Default)]
pub struct NonInteractive;

impl Prompter for NonInteractive {
    fn interactive(&self) -> bool {
        false
    }
    fn show(&mut self, _text: &str) {}
    fn ask_text(&mut self, _label: &str) -> std::io::Result<String> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
    fn ask_secret(&mut self, _label: &str) -> std::io::Result<Secret> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

/// Why a form could not be filled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FillError {
    /// Non-interactive and nothing answers this input. `hint` says which
    /// flag would.
    #[error("the gateway asks for '{label}' (form '{form}', field '{name}') and no answer was given; {hint}")]
    NeedAnswer {
        /// Form id.
        form: String,
        /// Field name.
        name: String,
        /// Label shown by the gateway (escaped).
        label: String,
        /// How to answer it.
        hint: String,
    },
    /// An answer matches no option, or several.
    #[error("'{answer}' is not one of the choices for '{label}': {choices}")]
    BadChoice {
        /// The answer given.
        answer: String,
        /// The select's label.
        label: String,
        /// The options, `label (value)`, comma-separated.
        choices: String,
    },
    /// The terminal failed or input ended.
    #[error("reading the answer failed: {0}")]
    Prompt(String),
}

/// Matches `answer` against `options` like openconnect: exact value, then
/// label (case-insensitive), then a unique case-insensitive label prefix,
/// then a unique case-insensitive value prefix. Returns the option's value.
pub fn match_option<'a>(options: &'a [SelectOption], answer: &str) -> Option<&'a str> {
    let answer = answer.trim();
    if answer.is_empty() {
        return None;
    }
    if let Some(o) = options.iter().find(|o| o.value == answer) {
        return Some(&o.value);
    }
    if let Some(o) = options
        .iter()
        .find(|o| o.label.eq_ignore_ascii_case(answer))
    {
        return Some(&o.value);
    }
    let lower = answer.to_lowercase();
    let unique = |f: &dyn Fn(&SelectOption) -> bool| {
        let mut hits = options.iter().filter(|o| f(o));
        match (hits.next(), hits.next()) {
            (Some(o), None) => Some(o.value.as_str()),
            _ => None,
        }
    };
    unique(&|o| o.label.to_lowercase().starts_with(&lower))
        .or_else(|| unique(&|o| o.value.to_lowercase().starts_with(&lower)))
}

fn choices_text(options: &[SelectOption]) -> String {
    options
        .iter()
        .map(|o| {
            if o.label.eq_ignore_ascii_case(&o.value) {
                super::printable(&o.label, 40)
            } else {
                format!(
                    "{} ({})",
                    super::printable(&o.label, 40),
                    super::printable(&o.value, 40)
                )
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The answer `--transfer yes|no` gives to a select: the option whose value
/// or label is `transfer`/`yes` (or `cancel`/`no`).
fn transfer_answer(options: &[SelectOption], yes: bool) -> Option<&str> {
    let wanted: &[&str] = if yes {
        &["transfer", "yes"]
    } else {
        &["cancel", "no"]
    };
    wanted.iter().find_map(|w| {
        options
            .iter()
            .find(|o| o.value.eq_ignore_ascii_case(w) || o.label.eq_ignore_ascii_case(w))
            .map(|o| o.value.as_str())
    })
}

fn is_transfer(form: &ServerForm, name: &str) -> bool {
    form.id == "transfer" && name == "action"
}

/// Fills `form` from `answers`, asking `prompter` for the rest when it is
/// interactive. Shows the form's title, message, error and banner first
/// when asking.
///
/// # Errors
/// [`FillError::NeedAnswer`] when non-interactive and an input has no
/// answer; [`FillError::BadChoice`]; [`FillError::Prompt`].
pub fn fill_form(
    form: &ServerForm,
    answers: &mut Answers,
    prompter: &mut dyn Prompter,
) -> Result<FilledForm, FillError> {
    let mut filled = FilledForm::default();
    let mut shown = false;
    let label_of = |label: &str, name: &str| {
        if label.is_empty() {
            format!("{name}:")
        } else {
            label.to_owned()
        }
    };
    let need = |name: &str, label: &str, hint: String| FillError::NeedAnswer {
        form: super::printable(&form.id, 40),
        name: super::printable(name, 40),
        label: super::printable(label.trim_end_matches(':'), 60),
        hint,
    };
    let prompt_err = |e: std::io::Error| FillError::Prompt(e.to_string());
    for input in &form.inputs {
        let mut show = |p: &mut dyn Prompter| {
            if !shown && p.interactive() {
                shown = true;
                for t in [&form.banner, &form.title, &form.message, &form.error]
                    .into_iter()
                    .flatten()
                {
                    p.show(&super::printable_multiline(t, 200));
                }
            }
        };
        match input {
            FormInput::Hidden { name, value } => {
                filled.push(name, Secret::new(value.clone()), false)
            }
            FormInput::Text { name, label, value } => {
                let answer = if let Some(v) = answers.entry(&form.id, name) {
                    v.to_owned()
                } else if let (Some(u), true) = (
                    answers.user.as_ref(),
                    name.to_ascii_lowercase().starts_with("user"),
                ) {
                    u.clone()
                } else if prompter.interactive() {
                    show(prompter);
                    let v = prompter
                        .ask_text(&label_of(&super::printable(label, 60), name))
                        .map_err(prompt_err)?;
                    if name.to_ascii_lowercase().starts_with("user") && answers.user.is_none() {
                        answers.user = Some(v.clone());
                    }
                    v
                } else if !value.is_empty() {
                    value.clone()
                } else {
                    let hint = if name.to_ascii_lowercase().starts_with("user") {
                        "pass --user NAME".to_owned()
                    } else {
                        format!("pass --form-entry {}:{}=VALUE", form.id, name)
                    };
                    return Err(need(name, label, hint));
                };
                filled.push(name, Secret::new(answer), false);
            }
            FormInput::Password { name, label } => {
                let answer = if let Some(v) = answers.entry(&form.id, name) {
                    Secret::new(v)
                } else if let (Some(p), false) = (answers.password.as_ref(), answers.password_used)
                {
                    answers.password_used = true;
                    p.clone()
                } else if prompter.interactive() {
                    show(prompter);
                    prompter
                        .ask_secret(&label_of(&super::printable(label, 60), name))
                        .map_err(prompt_err)?
                } else {
                    let hint = if answers.password_used {
                        "the password from stdin was already used for an earlier field; \
                         run on a terminal to answer it"
                            .to_owned()
                    } else {
                        "pass --password-stdin and the password on stdin".to_owned()
                    };
                    return Err(need(name, label, hint));
                };
                filled.push(name, answer, true);
            }
            FormInput::Select {
                name,
                label,
                options,
            } => {
                let given = answers.entry(&form.id, name).map(str::to_owned);
                let value = if let Some(a) = given {
                    match_option(options, &a)
                        .map(str::to_owned)
                        .ok_or_else(|| FillError::BadChoice {
                            answer: super::printable(&a, 40),
                            label: super::printable(label, 60),
                            choices: choices_text(options),
                        })?
                } else if let (true, Some(yes)) = (is_transfer(form, name), answers.transfer) {
                    transfer_answer(options, yes)
                        .map(str::to_owned)
                        .ok_or_else(|| FillError::BadChoice {
                            answer: if yes { "yes" } else { "no" }.to_owned(),
                            label: super::printable(label, 60),
                            choices: choices_text(options),
                        })?
                } else if let [only] = options.as_slice() {
                    only.value.clone()
                } else if prompter.interactive() {
                    show(prompter);
                    let labels: Vec<String> = options
                        .iter()
                        .map(|o| super::printable(&o.label, 40))
                        .collect();
                    let question = format!(
                        "{} [{}]:",
                        super::printable(label.trim_end_matches(':'), 60),
                        labels.join("|")
                    );
                    loop {
                        let a = prompter.ask_text(&question).map_err(prompt_err)?;
                        if let Some(v) = match_option(options, &a) {
                            break v.to_owned();
                        }
                        prompter.show(&format!("Please answer one of: {}", labels.join(", ")));
                    }
                } else {
                    let hint = if is_transfer(form, name) {
                        let offer = form
                            .message
                            .as_deref()
                            .map(|m| format!(" The gateway says: {}.", super::printable(m, 300)))
                            .unwrap_or_default();
                        format!(
                            "answer with --transfer yes|no (choices: {}).{offer}",
                            choices_text(options)
                        )
                    } else {
                        format!(
                            "answer with --form-entry {}:{}=CHOICE (choices: {})",
                            form.id,
                            name,
                            choices_text(options)
                        )
                    };
                    return Err(need(name, label, hint));
                };
                filled.push(name, Secret::new(value), false);
            }
        }
    }
    Ok(filled)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;
    use crate::wire::auth_xml;

    /// ocserv 1.1.6, first step.
    const OCSERV_USER: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<config-auth client="vpn" type="auth-request">
<version who="sg">0.1(1)</version>
<auth id="main">
<message>Please enter your username.</message>
<form method="post" action="/auth">
<input type="text" name="username" label="Username:" />
</form></auth>
</config-auth>"#;

    /// ocserv 1.1.6, second step.
    const OCSERV_PASS: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<config-auth client="vpn" type="auth-request">
<version who="sg">0.1(1)</version>
<auth id="main">
<message>Please enter your password.</message>
<form method="post" action="/auth">
<input type="password" name="password" label="Password:" />
</form></auth>
</config-auth>"#;

    /// ocserv 1.1.6, success.
    const OCSERV_COMPLETE: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<config-auth client="vpn" type="complete">
<version who="sg">0.1(1)</version>
<auth id="success">
<title>SSL VPN Service</title></auth></config-auth>"#;

    /// The transfer offer (DESIGN.md §5), as the gateway will send it.
    const TRANSFER: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<config-auth client="vpn" type="auth-request" aggregate-auth-version="2">
<opaque is-for="sg"><auth-handle>h-42</auth-handle></opaque>
<auth id="transfer">
<title>Session transfer</title><message>You are already logged on: device alice-laptop, intranet IP 198.18.64.2, idle 5 min. Transfer that session to this device?</message>
<form method="post" action="/auth">
<select name="action" label="Action:"><option value="transfer">Transfer</option><option value="cancel">Cancel</option></select>
</form></auth></config-auth>"#;

    fn request(xml: &str) -> AuthRequest {
        match parse_server_message(xml.as_bytes()).unwrap() {
            ServerMessage::AuthRequest(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_ocserv_two_step_forms() {
        let r = request(OCSERV_USER);
        assert_eq!(r.form.id, "main");
        assert_eq!(r.form.action, "/auth");
        assert_eq!(
            r.form.message.as_deref(),
            Some("Please enter your username.")
        );
        assert_eq!(
            r.form.inputs,
            vec![FormInput::Text {
                name: "username".into(),
                label: "Username:".into(),
                value: String::new()
            }]
        );
        assert_eq!(r.opaque, None);
        let mut answers = Answers {
            user: Some("alice".into()),
            password: Some(Secret::new("pw")),
            ..Answers::default()
        };
        let f = fill_form(&r.form, &mut answers, &mut NonInteractive).unwrap();
        assert_eq!(f.summary(), "username=alice");
        let r2 = request(OCSERV_PASS);
        let f2 = fill_form(&r2.form, &mut answers, &mut NonInteractive).unwrap();
        assert_eq!(f2.summary(), "password=<hidden>");
        assert_eq!(f2.get("password"), Some("pw"));
        assert!(!format!("{f2:?}").contains("pw<"));
        let xml = auth_reply_xml(None, &f2);
        assert!(xml.contains("<auth><password>pw</password></auth>"));
        // The password is used once: a second password form cannot reuse it.
        let err = fill_form(&r2.form, &mut answers, &mut NonInteractive).unwrap_err();
        assert!(matches!(err, FillError::NeedAnswer { .. }), "{err}");
    }

    #[test]
    fn parses_complete() {
        match parse_server_message(OCSERV_COMPLETE.as_bytes()).unwrap() {
            ServerMessage::Complete(c) => {
                assert_eq!(c.session_token, None);
                assert_eq!(c.message.as_deref(), Some("SSL VPN Service"));
            }
            other => panic!("{other:?}"),
        }
        let ours = auth_xml::auth_complete_xml("TOK&1", Some("Welcome"));
        match parse_server_message(ours.as_bytes()).unwrap() {
            ServerMessage::Complete(c) => {
                assert_eq!(c.session_token.unwrap().expose(), "TOK&1");
                assert_eq!(c.message.as_deref(), Some("Welcome"));
            }
            other => panic!("{other:?}"),
        }
    }

    /// Round trip with the gateway's own form builder, opaque included.
    #[test]
    fn parses_intragate_forms_and_echoes_opaque() {
        let form = auth_xml::Form {
            id: "main".into(),
            title: Some("intragate".into()),
            message: Some("Please enter your username and password.".into()),
            error: Some("Login failed <again>".into()),
            action: "/auth".into(),
            inputs: vec![
                auth_xml::Input::Text {
                    name: "username".into(),
                    label: "Username:".into(),
                },
                auth_xml::Input::Password {
                    name: "password".into(),
                    label: "Password:".into(),
                },
            ],
        };
        let xml = auth_xml::auth_request_xml(&form, Some("handle<1>"));
        let r = request(&xml);
        assert_eq!(r.form.error.as_deref(), Some("Login failed <again>"));
        assert_eq!(r.form.inputs.len(), 2);
        let opaque = r.opaque.clone().unwrap();
        assert!(
            opaque.starts_with("<opaque") && opaque.ends_with("</opaque>"),
            "{opaque}"
        );
        let mut answers = Answers {
            user: Some("al<ice".into()),
            password: Some(Secret::new("p&w")),
            ..Answers::default()
        };
        let filled = fill_form(&r.form, &mut answers, &mut NonInteractive).unwrap();
        let reply = auth_reply_xml(r.opaque.as_deref(), &filled);
        // The gateway's own parser reads it back.
        let msg = auth_xml::parse_client_message(reply.as_bytes()).unwrap();
        assert_eq!(msg.kind, auth_xml::ClientMessageKind::AuthReply);
        assert_eq!(msg.field("username"), Some("al<ice"));
        assert_eq!(msg.field("password"), Some("p&w"));
        assert_eq!(msg.opaque.as_deref(), Some("handle<1>"));
        let init = auth_xml::parse_client_message(init_xml("https://gw/").as_bytes()).unwrap();
        assert_eq!(init.kind, auth_xml::ClientMessageKind::Init);
        assert_eq!(init.version.as_deref(), Some(CLIENT_VERSION));
    }

    #[test]
    fn transfer_form_answers() {
        let r = request(TRANSFER);
        assert_eq!(r.form.id, "transfer");
        assert!(r.form.message.as_deref().unwrap().contains("198.18.64.2"));
        let FormInput::Select { options, .. } = &r.form.inputs[0] else {
            panic!()
        };
        assert_eq!(options.len(), 2);
        assert_eq!(options[0].label, "Transfer");

        for (flag, want) in [(true, "transfer"), (false, "cancel")] {
            let mut a = Answers {
                transfer: Some(flag),
                ..Answers::default()
            };
            let f = fill_form(&r.form, &mut a, &mut NonInteractive).unwrap();
            assert_eq!(f.get("action"), Some(want));
            let reply = auth_reply_xml(r.opaque.as_deref(), &f);
            let msg = auth_xml::parse_client_message(reply.as_bytes()).unwrap();
            assert_eq!(msg.field("action"), Some(want));
            assert_eq!(msg.opaque.as_deref(), Some("h-42"));
        }
        // Non-interactive without an answer: a clear error with the offer.
        let err = fill_form(&r.form, &mut Answers::default(), &mut NonInteractive).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("--transfer yes|no"), "{text}");
        assert!(text.contains("alice-laptop"), "{text}");
        // --form-entry works for any select, by label prefix or value.
        let mut a = Answers {
            entries: vec!["transfer:action=tr".parse().unwrap()],
            ..Answers::default()
        };
        assert_eq!(
            fill_form(&r.form, &mut a, &mut NonInteractive)
                .unwrap()
                .get("action"),
            Some("transfer")
        );
        let mut a = Answers {
            entries: vec!["action=bogus".parse().unwrap()],
            ..Answers::default()
        };
        assert!(matches!(
            fill_form(&r.form, &mut a, &mut NonInteractive),
            Err(FillError::BadChoice { .. })
        ));
    }

    /// A scripted terminal.
    struct Script {
        answers: Vec<String>,
        shown: Vec<String>,
        asked: Vec<String>,
    }

    impl Prompter for Script {
        fn interactive(&self) -> bool {
            true
        }
        fn show(&mut self, text: &str) {
            self.shown.push(text.to_owned());
        }
        fn ask_text(&mut self, label: &str) -> std::io::Result<String> {
            self.asked.push(label.to_owned());
            Ok(self.answers.remove(0))
        }
        fn ask_secret(&mut self, label: &str) -> std::io::Result<Secret> {
            self.asked.push(label.to_owned());
            Ok(Secret::new(self.answers.remove(0)))
        }
    }

    #[test]
    fn interactive_prompts_show_the_offer_and_retry_bad_choices() {
        let r = request(TRANSFER);
        let mut p = Script {
            answers: vec!["maybe".into(), "CAN".into()],
            shown: vec![],
            asked: vec![],
        };
        let f = fill_form(&r.form, &mut Answers::default(), &mut p).unwrap();
        assert_eq!(f.get("action"), Some("cancel"));
        assert!(p.shown.iter().any(|s| s.contains("alice-laptop")));
        assert_eq!(p.asked[0], "Action [Transfer|Cancel]:");
        assert_eq!(p.asked.len(), 2);

        let mut p = Script {
            answers: vec!["bob".into(), "sekrit".into()],
            shown: vec![],
            asked: vec![],
        };
        let mut a = Answers::default();
        let f = fill_form(&request(OCSERV_USER).form, &mut a, &mut p).unwrap();
        assert_eq!(f.get("username"), Some("bob"));
        assert_eq!(a.user.as_deref(), Some("bob"));
        let f = fill_form(&request(OCSERV_PASS).form, &mut a, &mut p).unwrap();
        assert_eq!(f.get("password"), Some("sekrit"));
    }

    #[test]
    fn option_matching() {
        let opts = vec![
            SelectOption {
                value: "g1".into(),
                label: "Staff".into(),
            },
            SelectOption {
                value: "g2".into(),
                label: "Students".into(),
            },
        ];
        assert_eq!(match_option(&opts, "g2"), Some("g2"));
        assert_eq!(match_option(&opts, "staff"), Some("g1"));
        assert_eq!(match_option(&opts, "stu"), Some("g2"));
        assert_eq!(match_option(&opts, "st"), None);
        assert_eq!(match_option(&opts, ""), None);
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_mutated_forms(cut in 0usize..600, byte in proptest::num::u8::ANY) {
            let mut b = TRANSFER.as_bytes().to_vec();
            if cut < b.len() { b[cut] = byte; }
            if let Ok(ServerMessage::AuthRequest(r)) = parse_server_message(&b) {
                let _ = fill_form(&r.form, &mut Answers { transfer: Some(true), ..Answers::default() }, &mut NonInteractive);
            }
            let _ = parse_server_message(&b[..cut.min(b.len())]);
        }
    }
}
