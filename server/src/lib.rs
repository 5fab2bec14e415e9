//! covey-server: enrollment CA, rounds over QUIC, aggregation, state in sled.
#![forbid(unsafe_code)]

pub mod admin;
pub mod aggregate;
pub mod assets;
pub mod audit;
pub mod central;
pub mod compliance;
pub mod config;
pub mod dashboard;
pub mod dir;
pub mod dp;
pub mod export;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod pki;
pub mod report;
pub mod robust;
pub mod schedule;
pub mod sealing;
pub mod serve;
pub mod status;
pub mod store;

pub use config::ServerConfig;
pub use dir::StateDir;
pub use serve::{CommitNotice, RunSummary, Server, Stopper};
