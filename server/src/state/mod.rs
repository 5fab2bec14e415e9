//! What survives a crash: the sled store (`store`), sealed at rest
//! (`sealing`), the tamper-evident audit trail (`audit`), the initial model
//! (`model`) and the content-addressed files devices fetch (`assets`).

pub mod assets;
pub mod audit;
pub mod model;
pub mod sealing;
pub mod store;
