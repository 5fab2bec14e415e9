//! What the hub knows only in memory and the dashboard shows: the phase,
//! its deadline, who is connected. The hub publishes a fresh [`Live`] after
//! every event it handles; publishing copies a few numbers into a watch
//! channel, so no dashboard can slow a round down.

use std::sync::Arc;

use serde::{Serialize, Serializer};

use crate::operator::control::EvalOutcome;

/// Federated evaluations the dashboard remembers, oldest dropped first.
const EVALUATIONS_KEPT: usize = 100;

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Live {
    pub version: u64,
    /// The round (or FedBuff buffer) in progress.
    pub round: Option<u64>,
    pub phase: &'static str,
    /// The secure-aggregation phase, while one runs.
    pub secagg_phase: Option<&'static str>,
    /// When the current phase stops waiting, in Unix milliseconds
    /// (rounded to a second so it changes once per phase).
    pub deadline_unix_ms: Option<u64>,
    /// Devices with a connection open now.
    pub connected: usize,
    /// Members selected for the round in progress.
    pub selected: usize,
    /// Updates received in the round in progress.
    pub reported: usize,
    /// Federated evaluations' outcomes since the server started, oldest
    /// first.
    pub federated_evaluations: Evaluations,
}

/// Shared, so publishing after every event copies a pointer; a new list
/// is a new allocation, so comparing pointers tells whether it changed.
#[derive(Clone, Debug, Default)]
pub struct Evaluations(Arc<Vec<EvalOutcome>>);

impl PartialEq for Evaluations {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Serialize for Evaluations {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.as_slice().serialize(s)
    }
}

/// Converts a deadline to wall-clock time, to the second.
pub fn deadline_unix_ms(deadline: std::time::Instant) -> u64 {
    let now = std::time::Instant::now();
    let ahead = deadline.saturating_duration_since(now).as_millis() as u64;
    (crate::state::store::unix_ms_now() + ahead).div_ceil(1000) * 1000
}

/// The hub's end of the channel, with what it remembers between events.
pub struct Publisher {
    tx: tokio::sync::watch::Sender<Live>,
    federated_evaluations: Evaluations,
}

impl Publisher {
    pub fn new() -> (Self, tokio::sync::watch::Receiver<Live>) {
        let (tx, rx) = tokio::sync::watch::channel(Live::default());
        (
            Self {
                tx,
                federated_evaluations: Evaluations::default(),
            },
            rx,
        )
    }

    pub fn evaluated(&mut self, outcome: EvalOutcome) {
        let mut all = (*self.federated_evaluations.0).clone();
        if all.len() == EVALUATIONS_KEPT {
            all.remove(0);
        }
        all.push(outcome);
        self.federated_evaluations = Evaluations(Arc::new(all));
    }

    /// Publishes `live` if it differs from what was published last; wakes
    /// the dashboards only then.
    pub fn publish(&self, mut live: Live) {
        live.federated_evaluations = self.federated_evaluations.clone();
        self.tx.send_if_modified(|old| {
            if *old == live {
                false
            } else {
                *old = live;
                true
            }
        });
    }
}
