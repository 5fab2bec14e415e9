//! Covey's wire format and round protocol, with no I/O.
//!
//! Everything here is plain Rust driven by values: frames are parsed from
//! byte slices, and the round state machine takes events (a client checked
//! in, an update arrived, time passed) and returns actions. The drivers in
//! `covey-server` and `covey-client` turn sockets and timers into events and
//! actions into I/O, so all the deciding is testable in memory.
#![forbid(unsafe_code)]

pub mod admin;
pub mod asset;
pub mod buffered;
pub mod dashboard;
pub mod encoding;
pub mod frame;
pub mod identity;
pub mod ids;
#[cfg(feature = "io")]
pub mod io;
pub mod message;
pub mod model;
pub mod round;
pub mod secagg;
pub mod tensor;

/// ALPN protocol id; a peer that does not offer it fails the TLS handshake.
pub const ALPN: &[u8] = b"covey/1";
/// ALPN of the operator API: operator, admin and auditor certificates only.
pub const ADMIN_ALPN: &[u8] = b"covey-admin/1";

/// Version of the message set carried over `covey/1`. `Hello` and `Welcome`
/// keep their layout across versions so any two peers can refuse each other
/// clearly.
/// 2: tasks carry the update privacy settings, updates the clip count.
/// 3: secure aggregation (tasks say whether, `SecAgg` messages).
/// 4: certificate renewal (`Renew`, `Renewed`).
/// 5: updates wait for `SendUpdate`, so waiting uploads hold no server memory.
/// 6: tasks carry the model as a family plus its configuration (language
///    models, LoRA); devices fetch assets by hash (`FetchAsset`).
/// 7: external models (named tensors trained by the device's own code) and
///    the operator's `FitConfig` in every task.
pub const PROTOCOL_VERSION: u16 = 7;

/// The DNS name the server certificate carries and clients verify; an
/// enrollment-internal name, so certificates never embed an address.
pub const SERVER_NAME: &str = "covey-server";

pub use encoding::UpdateEncoding;
pub use frame::{Frame, FrameError, FrameLimits};
pub use ids::{ModelVersion, RoundId};
pub use message::Message;
pub use model::ModelSpec;
