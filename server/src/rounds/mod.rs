//! What decides a round and releases its result: the schedule (synchronous
//! rounds or FedBuff), the devices' learning rate over versions (`decay`),
//! the rules an auditor holds every release to (the minimum cohort and
//! retention, `compliance`), central and distributed DP with the privacy
//! ledger (`dp`), central evaluation of each new version (`central`),
//! releasing a round's sum as the mean update (`release`), and a round the
//! root splits across leaf aggregators (`split`).

pub mod central;
pub mod compliance;
pub mod decay;
pub mod dp;
pub mod release;
pub mod schedule;
pub mod split;
