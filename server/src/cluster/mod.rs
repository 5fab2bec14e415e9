//! Shared state for a federation that runs on more than one machine, kept
//! in NATS JetStream rather than in a consensus of Covey's own: the root
//! coordinator's lease, which fences every write the root makes
//! (`lease`, sans-IO), its driver over JetStream KV (`jetstream`), model
//! versions and leaves' partial sums in an object store (`objects`),
//! enrollments and revocations every node applies (`registry`), which leaf serves
//! each device (`route`), what the root commits under its lease (`state`)
//! and what leaves tell it (`leaves`), its audit trail (`trail`); the root's
//! driver (`root`) and a leaf's link to it (`leaf`). What holds data
//! (the root state, its trail, models and partial sums) is sealed at rest
//! (`at_rest`).

pub mod at_rest;
pub mod jetstream;
pub mod leaf;
pub mod lease;
pub mod leaves;
pub mod objects;
pub mod process;
pub mod registry;
pub mod root;
pub mod route;
pub mod state;
pub mod trail;
