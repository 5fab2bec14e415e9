//! Updates into one aggregate: the streaming weighted sum and the server
//! optimizers that apply it (`aggregate`), partial sums that merge across
//! leaves into the round's sum (`merge`), and the Byzantine-robust rules
//! that need every update of a round at once (`robust`). Pure arithmetic,
//! with no I/O, so any process that holds updates can run it.

pub mod aggregate;
pub mod merge;
pub mod robust;
