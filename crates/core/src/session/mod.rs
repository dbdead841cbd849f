//! The session table: who is logged on, with which intranet IP, in which state.
//!
//! [`GatewayState`] owns the pools, the sessions and their DNS records
//! together, so an address and its name are assigned, transferred and
//! released in the same call that opens, transfers or closes a session:
//! there is no moment where two sessions hold one address or one name.
//!
//! Call order (the shell's event loop):
//! 1. `handle_logon` after the password check (it may return a transfer
//!    offer instead of a session), `handle_transfer` with the user's answer,
//!    `handle_attach` on CONNECT, `handle_detach` when a tunnel drops,
//!    `handle_logoff` / `handle_disconnect` on DISCONNECT 0xb0 or an
//!    administrator's or user's request, `note_activity` with traffic seen;
//! 2. `handle_timeout(now)` when `poll_timeout()` says so;
//! 3. drain `poll_event()` after every call and act on each event
//!    (routes, tunnels, logs).
//!
//! # Layout
//! Leaves first, each module using only those before it:
//! - `types`: sessions, settings, events, errors (the vocabulary);
//! - `state`: [`GatewayState`] itself, its queries, attach/detach, closing
//!   and the timers;
//! - `logon`, `transfer`, `workspace`, `accounts`, `records`: the
//!   operations of [`GatewayState`] that open sessions, answer transfer
//!   offers, resume sessions at logon (reconnect at logon) and keep the
//!   users' own settings, follow accounts and policies, and persist and
//!   restore.

mod accounts;
mod changes;
mod logon;
mod records;
mod remote;
mod state;
#[cfg(test)]
mod tests;
mod transfer;
mod types;
mod workspace;

pub use crate::ids::SessionId;
pub use changes::PersistChanges;
pub use records::SessionRecord;

pub use state::GatewayState;
pub use types::{token_hash, AdoptError, RemoteConflict, RemoteSession, TOKEN_HASH_PREFIX};
pub use types::{
    user_key, Account, AccountOutcome, AttachError, AuthInfo, CloseReason, Event, LogonError,
    LogonOutcome, LogonRequest, PolicyReload, Reevaluation, Session, SessionSettings, SessionState,
    SessionSummary, TransferError, TransferOffer, NAT_POOL, NO_ADDRESS_MESSAGE,
};
pub use workspace::RESUMED_ELSEWHERE;
