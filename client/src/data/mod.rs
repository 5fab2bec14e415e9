//! A device's local data: MNIST images for the classifiers, text for the
//! language models.

mod mnist;
pub mod shakespeare;
pub mod text;

pub use mnist::*;
