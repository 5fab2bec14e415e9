//! What operators and auditors see and do: the operator API (`admin`),
//! status, Prometheus metrics, the compliance report, model export and the
//! live dashboard. Everything here reads the state; only the operator API's
//! requests change it, through the hub.

pub mod admin;
pub mod control;
pub mod dashboard;
pub mod export;
pub mod metrics;
pub mod report;
pub mod status;
