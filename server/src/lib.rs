//! covey-server: enrollment CA, rounds over QUIC, aggregation, state in sled.
//!
//! The folders follow an update's path: `admission` (who gets in) →
//! `serve` (connections and the hub that drives rounds) → `fold` (updates
//! into a sum) → `rounds` (the schedule, DP and evaluation that release a
//! version) → `state` (what survives a crash) → `operator` (what operators
//! and auditors see). `config` and `dir` hold the settings and the state
//! directory every part is opened from; `cluster` holds what replicas share
//! when the roles run on separate machines.
#![forbid(unsafe_code)]

pub mod admission;
pub mod cluster;
pub mod config;
pub mod dir;
pub mod fold;
pub mod operator;
pub mod rounds;
pub mod serve;
pub mod state;

pub use config::ServerConfig;
pub use dir::StateDir;
pub use serve::{CommitNotice, RunSummary, Server, Stopper};
