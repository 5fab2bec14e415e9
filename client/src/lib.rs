//! covey-client: trains on local data and sends updates over QUIC.
#![forbid(unsafe_code)]

pub mod assets;
mod conv;
pub mod data;
mod dense;
pub mod fetch;
pub mod lm;
pub mod memory;
pub mod model_file;
mod optim;
pub mod partition;
pub mod progress;
pub mod session;
pub mod trainer;

pub use candle_core::Device;
pub use lm::train::TextTrainer;
pub use session::{ClientOptions, ClientSummary, Dropout, SessionError, run};
pub use trainer::{CandleTrainer, TrainOutput, Trainer};
