//! The state store's write status as the administrator sees it (`ctl
//! health`, `ctl stats`, `/metrics`), through a gateway with no sockets.

use serde_json::json;

use crate::shared::test_util::{logon, shared_in, temp_dir};

/// Issue 12 §4: a failed write leaves the state dirty, and the next
/// attempt writes what the failed one could not (the old code cleared
/// its dirty flags before writing, so the logon was never saved).
#[tokio::test]
async fn failed_write_stays_dirty_until_a_write_succeeds() {
    let dir = temp_dir("dirty");
    let shared = shared_in(&dir, "198.18.64.0/24");
    let state = shared.config.state_dir.clone();
    assert!(!shared.state_dirty());
    // The state directory is gone (and a file is in its way): writes fail.
    std::fs::remove_dir_all(&state).expect("rm");
    std::fs::write(&state, b"not a directory").expect("block");
    logon(&shared, "alice");
    assert!(shared.state_dirty());
    assert!(shared.save_state(false).await.is_err());
    assert!(shared.save_state(false).await.is_err());
    assert!(shared.state_dirty(), "still dirty after failed writes");
    assert!(shared.persist.health(0).is_err());
    assert_eq!(shared.persist.to_json(true)["write_failures"], 2);
    // What `ctl health`, `ctl stats` and `/metrics` say meanwhile.
    let health = super::answer(&shared, &json!({"cmd": "health"}));
    assert_eq!(health["ok"], false, "{health}");
    assert!(
        health["error"]
            .as_str()
            .is_some_and(|e| e.contains("state store cannot be written")),
        "{health}"
    );
    let stats = super::answer(&shared, &json!({"cmd": "stats"}));
    assert_eq!(stats["state"]["write_failures"], 2, "{stats}");
    assert_eq!(stats["state"]["unsaved_changes"], true, "{stats}");
    let metrics = super::metrics::render(&shared);
    for line in [
        "intragate_state_write_failures_total 2",
        "intragate_state_write_failing 1",
        "intragate_state_unsaved 1",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    std::fs::remove_file(&state).expect("unblock");
    std::fs::create_dir(&state).expect("dir");
    assert!(shared.save_state(false).await.expect("write").is_some());
    assert!(!shared.state_dirty());
    assert!(shared.persist.health(0).is_ok());
    let health = super::answer(&shared, &json!({"cmd": "health"}));
    assert_eq!(health["ok"], true, "{health}");
    assert!(super::metrics::render(&shared).contains("intragate_state_write_failing 0"));
    assert!(
        shared.save_state(false).await.expect("no-op").is_none(),
        "clean"
    );
    // What was written is alice's logon, and it loads back.
    let again = shared_in(&dir, "198.18.64.0/24");
    assert_eq!(again.load_state(false).await.expect("load"), 1);
    let _ = std::fs::remove_dir_all(&dir);
}
