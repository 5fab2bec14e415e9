//! Which state machine schedules training: synchronous rounds
//! ([`Coordinator`]) or FedBuff's asynchronous buffer ([`Buffered`]). Both
//! speak the same actions, so the hub drives either through this one type.

use std::time::Instant;

use covey_privacy::Pseudonym;
use covey_protocol::{
    ModelVersion, RoundId,
    buffered::{Buffered, staleness_weight},
    message::RejectReason,
    round::{AbortReason, Action, Coordinator, FinishReason},
};

// One machine per server: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Machine {
    Rounds(Coordinator<Pseudonym>),
    Buffered(Buffered<Pseudonym>),
}

type Actions = Vec<Action<Pseudonym>>;

/// Calls the same method on whichever machine runs.
macro_rules! either {
    ($self:ident, $m:ident => $call:expr) => {
        match $self {
            Machine::Rounds($m) => $call,
            Machine::Buffered($m) => $call,
        }
    };
}

impl Machine {
    pub fn is_buffered(&self) -> bool {
        matches!(self, Self::Buffered(_))
    }

    pub fn version(&self) -> ModelVersion {
        either!(self, m => m.version())
    }

    pub fn current_round(&self) -> Option<RoundId> {
        either!(self, m => m.current_round())
    }

    pub fn is_finished(&self) -> bool {
        either!(self, m => m.is_finished())
    }

    pub fn phase_name(&self) -> &'static str {
        either!(self, m => m.phase_name())
    }

    /// Devices checked in and waiting for a task.
    pub fn waiting(&self) -> usize {
        match self {
            Self::Rounds(m) => m.pool_len(),
            Self::Buffered(_) => 0,
        }
    }

    /// A leaf's root planned `round`: see [`Coordinator::permit`].
    pub fn permit(
        &mut self,
        round: RoundId,
        base: ModelVersion,
        quota: usize,
        deadline: Instant,
        now: Instant,
    ) -> Actions {
        match self {
            Self::Rounds(m) => m.permit(round, base, quota, deadline, now),
            Self::Buffered(_) => Vec::new(),
        }
    }

    /// A leaf's root ended the run.
    pub fn finish(&mut self, version: ModelVersion, reason: FinishReason) -> Actions {
        match self {
            Self::Rounds(m) => m.finish(version, reason),
            Self::Buffered(_) => Vec::new(),
        }
    }

    pub fn limit_rounds(&mut self, rounds: u64) {
        either!(self, m => m.limit_rounds(rounds))
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        either!(self, m => m.next_deadline())
    }

    pub fn check_in(&mut self, client: Pseudonym, now: Instant) -> Actions {
        either!(self, m => m.check_in(client, now))
    }

    pub fn disconnected(&mut self, client: Pseudonym, may_return: bool, now: Instant) -> Actions {
        either!(self, m => m.disconnected(client, may_return, now))
    }

    pub fn begin_update(&mut self, client: Pseudonym, round: RoundId) -> Result<(), RejectReason> {
        either!(self, m => m.begin_update(client, round))
    }

    pub fn accept_update(
        &mut self,
        client: Pseudonym,
        round: RoundId,
        now: Instant,
    ) -> Result<Actions, RejectReason> {
        either!(self, m => m.accept_update(client, round, now))
    }

    pub fn reject_update(&mut self, client: Pseudonym, round: RoundId, now: Instant) -> Actions {
        either!(self, m => m.reject_update(client, round, now))
    }

    pub fn upload_interrupted(
        &mut self,
        client: Pseudonym,
        round: RoundId,
        now: Instant,
    ) -> Actions {
        either!(self, m => m.upload_interrupted(client, round, now))
    }

    /// A member left before its update: dropped from the round, or its
    /// task's slot freed.
    pub fn drop_member(&mut self, client: Pseudonym, round: RoundId, now: Instant) -> Actions {
        match self {
            Self::Rounds(m) => m.drop_member(client, round, now),
            Self::Buffered(m) => m.reject_update(client, round, now),
        }
    }

    /// Ends the round in progress without a commit (secure aggregation,
    /// which buffered mode never runs).
    pub fn abort_round(&mut self, round: RoundId, reason: AbortReason, now: Instant) -> Actions {
        match self {
            Self::Rounds(m) => m.abort_round(round, reason, now),
            Self::Buffered(_) => Vec::new(),
        }
    }

    pub fn tick(&mut self, now: Instant) -> Actions {
        either!(self, m => m.tick(now))
    }

    pub fn commit_done(&mut self, round: RoundId, version: ModelVersion, now: Instant) -> Actions {
        either!(self, m => m.commit_done(round, version, now))
    }

    pub fn commit_failed(&mut self, round: RoundId, now: Instant) -> Actions {
        either!(self, m => m.commit_failed(round, now))
    }

    /// The base an update from `client` must carry: the round's in
    /// synchronous mode, the one its task was built on in buffered mode.
    pub fn expected_base(
        &self,
        client: &Pseudonym,
        round_base: ModelVersion,
    ) -> Option<ModelVersion> {
        match self {
            Self::Rounds(_) => Some(round_base),
            Self::Buffered(m) => m.lease_base(client),
        }
    }

    /// How much `client`'s update counts: 1 in synchronous rounds,
    /// FedBuff's staleness weight in buffered mode.
    pub fn update_weight(&self, client: &Pseudonym) -> f64 {
        match self {
            Self::Rounds(_) => 1.0,
            Self::Buffered(m) => staleness_weight(m.staleness(client).unwrap_or(0)),
        }
    }
}
