//! Test helpers: a gateway's shared state without sockets.

use super::Shared;

/// A gateway (`Shared`, no sockets) whose state directory is `dir/state`.
pub(crate) fn shared_in(dir: &std::path::Path, cidr: &str) -> Shared {
    let config = config_in(dir, cidr);
    Shared::new(
        config,
        "pin".into(),
        tokio_util::sync::CancellationToken::new(),
    )
    .expect("shared")
}

/// [`shared_in`] writing its state to `store` instead of the state file.
pub(crate) fn shared_with_store(
    dir: &std::path::Path,
    cidr: &str,
    store: std::sync::Arc<dyn crate::state::StateStore>,
) -> Shared {
    let config = config_in(dir, cidr);
    Shared::with_store(
        config,
        "pin".into(),
        tokio_util::sync::CancellationToken::new(),
        store,
    )
    .expect("shared")
}

/// The configuration of [`shared_in`]: one pool, `cidr`.
fn config_in(dir: &std::path::Path, cidr: &str) -> crate::config::Config {
    let cfg = dir.join("intragate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nstate_dir = \"state\"\nusers_file = \"users\"\n\
             policies_dir = \"policies\"\n[[pool]]\nname = \"default\"\ncidr = \"{cidr}\"\n"
        ),
    )
    .expect("config");
    let config = crate::config::Config::load(Some(&cfg), &crate::config::Overrides::default())
        .expect("config");
    std::fs::create_dir_all(&config.state_dir).expect("state dir");
    config
}

pub(crate) fn logon(shared: &Shared, user: &str) {
    use crate::core::session::{LogonOutcome, LogonRequest};
    let mut core = shared.core();
    let r = core.handle_logon(
        LogonRequest {
            user: user.into(),
            groups: vec![],
            token: format!("cookie-{user}-{:016x}", rand::random::<u64>()),
            offer_token: format!("offer-{user}"),
            client_addr: None,
            account: 0,
            auth: Default::default(),
            static_addr: None,
        },
        std::time::Instant::now(),
    );
    assert!(matches!(r, Ok(LogonOutcome::Opened(_))), "{r:?}");
    drop(core);
}

pub(crate) fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "intragate-saver-{tag}-{}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}
