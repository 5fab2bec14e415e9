//! What decides a round and releases its result: the schedule (synchronous
//! rounds or FedBuff), central and distributed DP with the privacy ledger
//! (`dp`), and central evaluation of each new version (`central`).

pub mod central;
pub mod dp;
pub mod schedule;
