//! Privacy building blocks shared by the Covey server and client.
//!
//! This crate has no Covey dependencies so that everything about what
//! leaves a device, and what an auditor may learn, is reviewable in one place.
#![forbid(unsafe_code)]

pub mod accountant;
mod clip;
pub mod distributed;
pub mod noise;
pub mod pld;
mod pseudonym;
pub mod quantize;

pub use clip::{ClipNorm, InvalidClipNorm, clip_l2, l2_norm};
pub use pseudonym::{Pseudonym, PseudonymKey, PseudonymKeyError};
