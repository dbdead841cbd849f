//! The users' workspace settings (issue 18): "reconnect at logon" and the
//! logoff action, as the policy sets them and as each user chose where the
//! policy lets them. The choices are kept in the core (a logon reads them
//! under the core lock) and on disk in `workspace.json` in the state
//! directory (written atomically, mode 0600), read back at start.
//!
//! The web pages call [`Shared::workspace_settings`] and
//! [`Shared::set_workspace_preference`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

pub use crate::core::policy::{LogoffAction, ReconnectAtLogon, UserPrefs, WorkspaceSetting};

use super::Shared;

/// The file in the state directory that holds the users' choices.
pub const PREFS_FILE: &str = "workspace.json";

/// A user's workspace settings as they apply, and what the user may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkspaceSettings {
    /// Reconnect at logon in force for the user (their choice where
    /// allowed, else the policy's).
    pub reconnect_at_logon: ReconnectAtLogon,
    /// Logoff action in force for the user.
    pub logoff_action: LogoffAction,
    /// May the user change reconnect at logon?
    pub may_change_reconnect: bool,
    /// May the user change the logoff action?
    pub may_change_logoff_action: bool,
    /// The policy's reconnect at logon (what "reset" gives back).
    pub policy_reconnect_at_logon: ReconnectAtLogon,
    /// The policy's logoff action.
    pub policy_logoff_action: LogoffAction,
}

/// One change a user makes to their settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkspacePreference {
    /// Choose reconnect at logon.
    ReconnectAtLogon(ReconnectAtLogon),
    /// Choose the logoff action.
    LogoffAction(LogoffAction),
    /// Forget the user's choice of this setting (the policy's applies).
    Reset(WorkspaceSetting),
}

impl WorkspacePreference {
    /// The setting it changes.
    pub fn setting(self) -> WorkspaceSetting {
        match self {
            WorkspacePreference::ReconnectAtLogon(_) => WorkspaceSetting::ReconnectAtLogon,
            WorkspacePreference::LogoffAction(_) => WorkspaceSetting::LogoffAction,
            WorkspacePreference::Reset(s) => s,
        }
    }

    fn apply(self, prefs: &mut UserPrefs) {
        match self {
            WorkspacePreference::ReconnectAtLogon(v) => prefs.reconnect_at_logon = Some(v),
            WorkspacePreference::LogoffAction(v) => prefs.logoff_action = Some(v),
            WorkspacePreference::Reset(WorkspaceSetting::ReconnectAtLogon) => {
                prefs.reconnect_at_logon = None
            }
            WorkspacePreference::Reset(WorkspaceSetting::LogoffAction) => {
                prefs.logoff_action = None
            }
        }
    }
}

/// `workspace.json`: `{"version":1,"users":{"alice":{"reconnect_at_logon":"disconnected"}}}`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct PrefsFile {
    version: u32,
    #[serde(default)]
    users: BTreeMap<String, StoredPrefs>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StoredPrefs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reconnect_at_logon: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    logoff_action: Option<String>,
}

impl Shared {
    /// Effective settings for a user with these groups (policy chosen as at
    /// logon, then the user's stored preferences where the policy allows
    /// them).
    pub fn workspace_settings(
        &self,
        user: &str,
        groups: &[String],
    ) -> Result<WorkspaceSettings, String> {
        let core = self.core();
        let policy = core
            .policy_for(user, groups)
            .ok_or_else(|| format!("no policy applies to user '{user}'"))?;
        let prefs = core.user_prefs(user);
        Ok(WorkspaceSettings {
            reconnect_at_logon: policy.effective_reconnect_at_logon(&prefs),
            logoff_action: policy.effective_logoff_action(&prefs),
            may_change_reconnect: policy.may_change(WorkspaceSetting::ReconnectAtLogon),
            may_change_logoff_action: policy.may_change(WorkspaceSetting::LogoffAction),
            policy_reconnect_at_logon: policy.reconnect_at_logon,
            policy_logoff_action: policy.logoff_action,
        })
    }

    /// Store a preference; Err(text) if the policy does not let this user
    /// change it, or if it cannot be written to disk (then nothing changed).
    pub async fn set_workspace_preference(
        &self,
        user: &str,
        groups: &[String],
        pref: WorkspacePreference,
    ) -> Result<(), String> {
        // One writer at a time, so the file ends with the last change.
        let _serial = self.workspace_write.lock().await;
        let (before, data) = {
            let mut core = self.core();
            let policy = core
                .policy_for(user, groups)
                .ok_or_else(|| format!("no policy applies to user '{user}'"))?;
            let setting = pref.setting();
            if !policy.may_change(setting) {
                return Err(format!(
                    "policy '{}' does not let users change {}",
                    policy.name,
                    setting.as_str()
                ));
            }
            let before = core.user_prefs(user);
            let mut prefs = before;
            pref.apply(&mut prefs);
            core.set_user_prefs(user, prefs);
            (before, encode(core.all_user_prefs()))
        };
        let path = self.workspace_path();
        let data = data.map_err(|e| e.to_string());
        let written = match data {
            Ok(data) => tokio::task::spawn_blocking(move || {
                crate::state::file::write_atomic(&path, &data, 0o600)
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string())),
            Err(e) => Err(e),
        };
        match written {
            Ok(()) => {
                info!(%user, setting = pref.setting().as_str(), "workspace setting changed by the user");
                Ok(())
            }
            Err(e) => {
                self.core().set_user_prefs(user, before);
                warn!(%user, file = %self.workspace_path().display(), error = %e, "cannot store a user's workspace setting");
                Err(format!("the setting could not be stored: {e}"))
            }
        }
    }

    /// Read the users' stored choices into the core (at start). A missing
    /// file is no choices; an unreadable one is reported and ignored (the
    /// policies' settings apply), as are values this version does not know.
    /// Returns the number of users with choices.
    pub fn load_workspace_prefs(&self) -> usize {
        let path = self.workspace_path();
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
            Err(e) => {
                warn!(file = %path.display(), error = %e, "cannot read the users' workspace settings; the policies' apply");
                return 0;
            }
        };
        let file: PrefsFile = match serde_json::from_slice(&text) {
            Ok(f) => f,
            Err(e) => {
                warn!(file = %path.display(), error = %e, "unreadable users' workspace settings; the policies' apply");
                return 0;
            }
        };
        let mut core = self.core();
        let mut n = 0;
        for (user, stored) in file.users {
            let prefs = UserPrefs {
                reconnect_at_logon: parse_or_warn(&path, &user, stored.reconnect_at_logon),
                logoff_action: parse_or_warn(&path, &user, stored.logoff_action),
            };
            if !prefs.is_empty() {
                core.set_user_prefs(&user, prefs);
                n += 1;
            }
        }
        n
    }

    fn workspace_path(&self) -> PathBuf {
        self.config.state_dir.join(PREFS_FILE)
    }
}

fn parse_or_warn<T: std::str::FromStr<Err = String>>(
    path: &std::path::Path,
    user: &str,
    v: Option<String>,
) -> Option<T> {
    let v = v?;
    match v.parse() {
        Ok(x) => Some(x),
        Err(e) => {
            warn!(file = %path.display(), %user, "ignoring a stored workspace setting: {e}");
            None
        }
    }
}

fn encode<'a>(
    prefs: impl Iterator<Item = (&'a str, &'a UserPrefs)>,
) -> Result<Vec<u8>, serde_json::Error> {
    let file = PrefsFile {
        version: 1,
        users: prefs
            .map(|(user, p)| {
                (
                    user.to_string(),
                    StoredPrefs {
                        reconnect_at_logon: p.reconnect_at_logon.map(|v| v.as_str().to_string()),
                        logoff_action: p.logoff_action.map(|v| v.as_str().to_string()),
                    },
                )
            })
            .collect(),
    };
    serde_json::to_vec_pretty(&file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::test_util::{shared_in, temp_dir};

    fn write_policy(dir: &std::path::Path, body: &str) {
        let p = dir.join("policies");
        std::fs::create_dir_all(&p).expect("policies dir");
        std::fs::write(p.join("50-all.toml"), body).expect("policy");
    }

    #[tokio::test]
    async fn preferences_are_checked_stored_and_survive_a_restart() {
        let dir = temp_dir("workspace");
        write_policy(
            &dir,
            "[[policy]]\nname = \"staff\"\ngroups = [\"staff\"]\n\
             reconnect_at_logon = \"disconnected\"\nusers_may_change = [\"reconnect_at_logon\"]\n\
             [[policy]]\nname = \"rest\"\ngroups = [\"*\"]\nlogoff_action = \"disconnect\"\n",
        );
        let staff = vec!["staff".to_string()];
        let shared = shared_in(&dir, "198.18.64.0/28");
        let s = shared
            .workspace_settings("alice", &staff)
            .expect("settings");
        assert_eq!(s.reconnect_at_logon, ReconnectAtLogon::Disconnected);
        assert!(s.may_change_reconnect && !s.may_change_logoff_action);
        // Allowed: stored, in force, on disk with mode 0600.
        shared
            .set_workspace_preference(
                "Alice",
                &staff,
                WorkspacePreference::ReconnectAtLogon(ReconnectAtLogon::ActiveAndDisconnected),
            )
            .await
            .expect("allowed");
        // Denied: the policy does not let users change it.
        let e = shared
            .set_workspace_preference(
                "alice",
                &staff,
                WorkspacePreference::LogoffAction(LogoffAction::Logoff),
            )
            .await
            .expect_err("denied");
        assert!(e.contains("logoff_action"), "{e}");
        let e = shared
            .set_workspace_preference(
                "bob",
                &[],
                WorkspacePreference::ReconnectAtLogon(ReconnectAtLogon::Disconnected),
            )
            .await
            .expect_err("denied under 'rest'");
        assert!(e.contains("'rest'"), "{e}");
        let s = shared
            .workspace_settings("ALICE", &staff)
            .expect("settings");
        assert_eq!(
            s.reconnect_at_logon,
            ReconnectAtLogon::ActiveAndDisconnected
        );
        assert_eq!(s.policy_reconnect_at_logon, ReconnectAtLogon::Disconnected);
        assert_eq!(s.logoff_action, LogoffAction::None);
        // Under another policy that does not allow it, the choice counts for nothing.
        let s = shared.workspace_settings("alice", &[]).expect("settings");
        assert_eq!(s.reconnect_at_logon, ReconnectAtLogon::Off);
        assert_eq!(s.logoff_action, LogoffAction::Disconnect);
        let path = shared.config.state_dir.join(PREFS_FILE);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).expect("file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(shared);

        // A restart reads them back.
        let again = shared_in(&dir, "198.18.64.0/28");
        assert_eq!(again.load_workspace_prefs(), 1);
        let s = again.workspace_settings("alice", &staff).expect("settings");
        assert_eq!(
            s.reconnect_at_logon,
            ReconnectAtLogon::ActiveAndDisconnected
        );
        // Reset: the policy's again, and the user is forgotten.
        again
            .set_workspace_preference(
                "alice",
                &staff,
                WorkspacePreference::Reset(WorkspaceSetting::ReconnectAtLogon),
            )
            .await
            .expect("reset");
        let s = again.workspace_settings("alice", &staff).expect("settings");
        assert_eq!(s.reconnect_at_logon, ReconnectAtLogon::Disconnected);
        let text = std::fs::read_to_string(&path).expect("file");
        assert!(!text.contains("alice"), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unknown_stored_values_are_ignored() {
        let dir = temp_dir("workspace-bad");
        let shared = shared_in(&dir, "198.18.64.0/28");
        std::fs::write(
            shared.config.state_dir.join(PREFS_FILE),
            r#"{"version":1,"users":{"alice":{"reconnect_at_logon":"always","logoff_action":"logoff"},"bob":{"reconnect_at_logon":"sometimes"}}}"#,
        )
        .expect("write");
        assert_eq!(shared.load_workspace_prefs(), 1);
        let p = shared.core().user_prefs("alice");
        assert_eq!(p.reconnect_at_logon, None);
        assert_eq!(p.logoff_action, Some(LogoffAction::Logoff));
        std::fs::write(shared.config.state_dir.join(PREFS_FILE), "not json").expect("write");
        assert_eq!(shared.load_workspace_prefs(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
