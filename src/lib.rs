//! intragate: a gateway VPN appliance speaking the OpenConnect (AnyConnect
//! CSTP) protocol. See DESIGN.md for the architecture: a deterministic
//! `core` inside thin I/O shells (`tunnel`, `dataplane`, `admin`).
#![warn(missing_docs)]
#![cfg_attr(not(test), warn(clippy::print_stdout))]

pub mod admin;
pub mod auth;
pub mod client_cert;
pub mod cluster;
pub mod config;
pub use intragate_core as core;
pub mod dataplane;
pub mod dns;
pub mod docgen;
pub mod fdlimit;
pub mod gateway;
pub mod history;
pub mod listener;
pub mod logon;
pub mod netif;
pub mod offload;
pub mod plugin;
pub mod sdnotify;
pub mod shared;
mod sockopt;
pub mod state;
pub mod stats;
pub mod tls;
pub mod tunnel;
pub mod users;
pub mod web;
pub use intragate_wire as wire;
