//! The synchronous round, as the server sees it: a sans-IO state machine.
//!
//! ```text
//! Waiting ─pool ≥ min_clients─▶ Collecting ─target reached, or deadline with quorum─▶ Committing ─done─▶ Waiting | Finished
//!                                   └─deadline or every member gone, below quorum─▶ (Abort) Waiting
//! ```
//! Time is an input (`now`), never read. The driver reports what happened
//! (check-ins, updates, disconnects, ticks, a finished commit) and carries
//! out the returned [`Action`]s. Secure-aggregation phases and buffered
//! asynchronous rounds extend this machine: both are new phases between
//! `Collecting` and `Committing`, or a sibling machine with the same events.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use rand::{Rng, SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;

use crate::{ModelVersion, RoundId, message::RejectReason};

/// How long after a Poisson draw below the quorum the next draw is made.
pub const POISSON_REDRAW: Duration = Duration::from_millis(500);

/// When rounds start and when they end.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundConfig {
    /// Checked-in clients needed before a round starts.
    pub min_clients: usize,
    /// Updates wanted per round; the round closes early once it has them.
    pub clients_per_round: usize,
    /// Extra fraction selected to absorb stragglers (0.2 selects 20% more).
    pub over_selection: f64,
    /// Fewest accepted updates a round may commit with.
    pub quorum: usize,
    /// Time from the start of a round to its deadline.
    pub round_timeout: Duration,
    /// The run ends once this version is committed.
    pub target_version: ModelVersion,
    /// How a round's cohort is drawn from the waiting clients.
    pub selection: Selection,
    /// How long a member whose connection broke may take to reconnect and
    /// (re)send its update before it counts as dropped; zero drops at once.
    pub rejoin_grace: Duration,
}

/// How a round's cohort is drawn from the waiting clients.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Selection {
    /// `clients_per_round × (1 + over_selection)` at random; the round
    /// closes once `clients_per_round` updates are in.
    Fixed,
    /// Each waiting client independently with probability `rate`, as the
    /// privacy accountant's amplification by sampling assumes. A draw below
    /// the quorum starts no round (and releases nothing); the next tick
    /// draws again. The round waits for every member or the deadline.
    Poisson { rate: f64 },
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("clients_per_round must be at least 1")]
    NoClients,
    #[error("quorum must be between 1 and clients_per_round ({clients_per_round}), got {quorum}")]
    BadQuorum {
        quorum: usize,
        clients_per_round: usize,
    },
    #[error("min_clients ({min_clients}) must be at least the quorum ({quorum})")]
    PoolBelowQuorum { min_clients: usize, quorum: usize },
    #[error("over_selection must be a finite fraction in [0, 10], got {0}")]
    BadOverSelection(f64),
    #[error("round_timeout must be positive")]
    NoTimeout,
    #[error("Poisson selection rate must be in (0, 1], got {0}")]
    BadRate(f64),
}

impl RoundConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.clients_per_round == 0 {
            return Err(ConfigError::NoClients);
        }
        if self.quorum == 0 || self.quorum > self.clients_per_round {
            return Err(ConfigError::BadQuorum {
                quorum: self.quorum,
                clients_per_round: self.clients_per_round,
            });
        }
        if self.min_clients < self.quorum {
            return Err(ConfigError::PoolBelowQuorum {
                min_clients: self.min_clients,
                quorum: self.quorum,
            });
        }
        if !(self.over_selection.is_finite() && (0.0..=10.0).contains(&self.over_selection)) {
            return Err(ConfigError::BadOverSelection(self.over_selection));
        }
        if self.round_timeout.is_zero() {
            return Err(ConfigError::NoTimeout);
        }
        if let Selection::Poisson { rate } = self.selection
            && !(rate > 0.0 && rate <= 1.0)
        {
            return Err(ConfigError::BadRate(rate));
        }
        Ok(())
    }

    /// How many to select from a pool of `available`.
    fn cohort_size(&self, available: usize) -> usize {
        let wanted = (self.clients_per_round as f64 * (1.0 + self.over_selection)).ceil() as usize;
        wanted.min(available)
    }
}

/// Why a round ended without a new model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbortReason {
    /// The deadline passed with fewer accepted updates than the quorum.
    DeadlineBelowQuorum,
    /// Every selected client finished or dropped, short of the quorum.
    QuorumUnreachable,
    /// Storing the new version failed; the round is retried.
    CommitFailed,
    /// Secure aggregation lost too many members to go on.
    SecureAggregation,
    /// A leaf's root moved on to another round (or ended the run) before
    /// this one closed.
    Superseded,
}

impl AbortReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DeadlineBelowQuorum => "deadline passed below quorum",
            Self::QuorumUnreachable => "too many selected clients dropped out",
            Self::CommitFailed => "commit failed",
            Self::SecureAggregation => "secure aggregation lost too many members",
            Self::Superseded => "the root coordinator moved on",
        }
    }
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action<C> {
    /// Send the task of `round` (training on `base`) to each of `cohort`.
    StartRound {
        round: RoundId,
        base: ModelVersion,
        cohort: Vec<C>,
        deadline: Instant,
    },
    /// Aggregate the accepted updates of `round` and store `new_version`,
    /// then report back with [`Coordinator::commit_done`] or
    /// [`Coordinator::commit_failed`].
    Commit {
        round: RoundId,
        base: ModelVersion,
        new_version: ModelVersion,
        stats: RoundStats,
    },
    /// Buffered mode: send `client` the task of `round` (training on
    /// `base`), due by `deadline`.
    Assign {
        client: C,
        round: RoundId,
        base: ModelVersion,
        deadline: Instant,
    },
    /// Discard whatever was aggregated for `round`.
    Abort {
        round: RoundId,
        reason: AbortReason,
        stats: RoundStats,
    },
    /// The run is over: tell every waiting client.
    Finished {
        version: ModelVersion,
        reason: FinishReason,
    },
}

/// Why a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The target version is committed.
    TargetReached,
    /// One more round would spend more privacy than the budget allows.
    BudgetExhausted,
    /// The operator stopped the run.
    Stopped,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TargetReached => "target version reached",
            Self::BudgetExhausted => "privacy budget exhausted",
            Self::Stopped => "stopped by the operator",
        }
    }
}

/// Cohort accounting for one round, for records and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoundStats {
    pub selected: usize,
    pub accepted: usize,
    pub dropped: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Member {
    Training,
    Uploading,
    /// Its connection broke; it may come back with its update until then.
    Away {
        until: Instant,
    },
    Submitted,
    Dropped,
}

#[derive(Debug)]
struct ActiveRound<C> {
    id: RoundId,
    base: ModelVersion,
    deadline: Instant,
    /// Accepted updates after which the round closes early.
    target: usize,
    members: BTreeMap<C, Member>,
}

impl<C> ActiveRound<C> {
    /// Members still away when the round closes count as dropped.
    fn stats(&self) -> RoundStats {
        let count = |f: fn(&Member) -> bool| self.members.values().filter(|m| f(m)).count();
        RoundStats {
            selected: self.members.len(),
            accepted: count(|m| *m == Member::Submitted),
            dropped: count(|m| matches!(m, Member::Dropped | Member::Away { .. })),
        }
    }

    fn pending(&self) -> bool {
        self.members.values().any(|m| {
            matches!(
                m,
                Member::Training | Member::Uploading | Member::Away { .. }
            )
        })
    }

    /// When the first away member's grace ends.
    fn next_return_deadline(&self) -> Option<Instant> {
        self.members
            .values()
            .filter_map(|m| match m {
                Member::Away { until } => Some(*until),
                _ => None,
            })
            .min()
    }

    /// Drops away members whose grace ended by `now`.
    fn expire_away(&mut self, now: Instant) {
        for m in self.members.values_mut() {
            if let Member::Away { until } = m
                && *until <= now
            {
                *m = Member::Dropped;
            }
        }
    }
}

#[derive(Debug)]
enum Phase<C> {
    Waiting,
    Collecting(ActiveRound<C>),
    Committing { round: RoundId },
    Finished(FinishReason),
}

/// Who decides when a round starts.
#[derive(Debug)]
enum Gate {
    /// This machine, whenever enough clients wait: a single server.
    Own,
    /// A root coordinator, one round at a time: a leaf aggregator holds at
    /// most one permit, for the round id, size and deadline the root chose.
    Root(Option<Permit>),
}

#[derive(Clone, Copy, Debug)]
struct Permit {
    round: RoundId,
    quota: usize,
    deadline: Instant,
}

/// The server's round state machine, generic over the client key (a
/// pseudonym in production) so tests can use small integers.
#[derive(Debug)]
pub struct Coordinator<C> {
    config: RoundConfig,
    gate: Gate,
    version: ModelVersion,
    next_round: RoundId,
    pool: BTreeSet<C>,
    phase: Phase<C>,
    rng: ChaCha8Rng,
    /// Commits still allowed by the privacy budget; `None` is unlimited.
    budget_rounds: Option<u64>,
    /// When a Poisson draw fell below the quorum: draw again at this time.
    redraw_at: Option<Instant>,
}

impl<C: Copy + Ord> Coordinator<C> {
    /// Starts from the last committed `version`; `next_round` must be larger
    /// than any round id used before, so ids are never reused.
    pub fn new(
        config: RoundConfig,
        version: ModelVersion,
        next_round: RoundId,
        seed: u64,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        let phase = if version >= config.target_version {
            Phase::Finished(FinishReason::TargetReached)
        } else {
            Phase::Waiting
        };
        Ok(Self {
            config,
            gate: Gate::Own,
            version,
            next_round,
            pool: BTreeSet::new(),
            phase,
            rng: ChaCha8Rng::seed_from_u64(seed),
            budget_rounds: None,
            redraw_at: None,
        })
    }

    /// Makes this a leaf's machine: it starts a round only when its root
    /// coordinator permits one ([`Coordinator::permit`]), with the root's
    /// round id, quota and deadline. Its quorum is the leaf's own minimum.
    pub fn follow_root(mut self) -> Self {
        self.gate = Gate::Root(None);
        self
    }

    /// The root planned `round` on `base`, asking this leaf for `quota`
    /// devices by `deadline`. A round of this leaf still collecting is
    /// superseded (the root gave up on it); one this leaf forwarded and the
    /// root did not commit is forgotten. Stale permits (a round id already
    /// used here) and permits to a machine that is not a leaf are ignored.
    pub fn permit(
        &mut self,
        round: RoundId,
        base: ModelVersion,
        quota: usize,
        deadline: Instant,
        now: Instant,
    ) -> Vec<Action<C>> {
        if matches!(self.gate, Gate::Own)
            || matches!(self.phase, Phase::Finished(_))
            || round < self.next_round
            || quota == 0
        {
            return Vec::new();
        }
        let mut actions = Vec::new();
        match &self.phase {
            Phase::Collecting(_) => actions = self.close(false, AbortReason::Superseded),
            Phase::Committing { .. } => self.phase = Phase::Waiting,
            _ => {}
        }
        self.version = base;
        self.next_round = round;
        self.gate = Gate::Root(Some(Permit {
            round,
            quota,
            deadline,
        }));
        self.then_start(actions, now)
    }

    /// The root ended the run: whatever this leaf collects is discarded and
    /// waiting clients are told.
    pub fn finish(&mut self, version: ModelVersion, reason: FinishReason) -> Vec<Action<C>> {
        if matches!(self.phase, Phase::Finished(_)) {
            return Vec::new();
        }
        let mut actions = match &self.phase {
            Phase::Collecting(_) => self.close(false, AbortReason::Superseded),
            _ => Vec::new(),
        };
        self.version = self.version.max(version);
        self.phase = Phase::Finished(reason);
        actions.push(Action::Finished {
            version: self.version,
            reason,
        });
        actions
    }

    /// Allows at most `rounds` more commits (the privacy budget); once
    /// they are spent the run finishes with [`FinishReason::BudgetExhausted`]
    /// instead of starting another round.
    pub fn limit_rounds(&mut self, rounds: u64) {
        self.budget_rounds = Some(rounds);
    }

    /// Why the run ended, once it has.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        match self.phase {
            Phase::Finished(reason) => Some(reason),
            _ => None,
        }
    }

    pub fn version(&self) -> ModelVersion {
        self.version
    }

    /// The round being collected, if any.
    pub fn current_round(&self) -> Option<RoundId> {
        match &self.phase {
            Phase::Collecting(r) => Some(r.id),
            _ => None,
        }
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Finished(_))
    }

    /// The phase, in words, for dashboards.
    pub fn phase_name(&self) -> &'static str {
        match self.phase {
            Phase::Waiting => "waiting for devices",
            Phase::Collecting(_) => "collecting updates",
            Phase::Committing { .. } => "committing",
            Phase::Finished(_) => "finished",
        }
    }

    /// Clients waiting for a task.
    pub fn pool_len(&self) -> usize {
        self.pool.len()
    }

    /// The client is connected and ready for a task.
    pub fn check_in(&mut self, client: C, now: Instant) -> Vec<Action<C>> {
        if let Phase::Finished(reason) = self.phase {
            return vec![Action::Finished {
                version: self.version,
                reason,
            }];
        }
        if let Phase::Collecting(round) = &mut self.phase
            && let Some(m) = round.members.get_mut(&client)
        {
            // Checking in again means it lost or gave up its task.
            if matches!(m, Member::Training | Member::Uploading) {
                *m = Member::Dropped;
            }
        }
        self.pool.insert(client);
        let actions = self.check_round_end();
        self.then_start(actions, now)
    }

    /// The client is gone (connection closed or timed out).
    ///
    /// With `may_return`, a member of the round in progress gets the
    /// configured grace to reconnect and send its update; without it (its
    /// state died with the connection, as under secure aggregation) it
    /// counts as dropped at once.
    pub fn disconnected(&mut self, client: C, may_return: bool, now: Instant) -> Vec<Action<C>> {
        self.pool.remove(&client);
        let grace = self.config.rejoin_grace;
        if let Phase::Collecting(round) = &mut self.phase
            && let Some(m) = round.members.get_mut(&client)
            && matches!(m, Member::Training | Member::Uploading)
        {
            *m = if may_return && !grace.is_zero() {
                Member::Away { until: now + grace }
            } else {
                Member::Dropped
            };
        }
        let actions = self.check_round_end();
        self.then_start(actions, now)
    }

    /// The upload `client` started for `round` broke off with its
    /// connection: it may send the update again within the grace.
    pub fn upload_interrupted(
        &mut self,
        client: C,
        round: RoundId,
        now: Instant,
    ) -> Vec<Action<C>> {
        let grace = self.config.rejoin_grace;
        if let Phase::Collecting(active) = &mut self.phase
            && active.id == round
            && let Some(m @ Member::Uploading) = active.members.get_mut(&client)
        {
            *m = if grace.is_zero() {
                Member::Dropped
            } else {
                Member::Away { until: now + grace }
            };
        }
        let actions = self.check_round_end();
        self.then_start(actions, now)
    }

    /// A client announced an update for `round`: may the driver read it?
    pub fn begin_update(&mut self, client: C, round: RoundId) -> Result<(), RejectReason> {
        let Phase::Collecting(active) = &mut self.phase else {
            return Err(if round < self.next_round {
                RejectReason::RoundClosed
            } else {
                RejectReason::WrongRound
            });
        };
        if round != active.id {
            return Err(if round < active.id {
                RejectReason::RoundClosed
            } else {
                RejectReason::WrongRound
            });
        }
        match active.members.get_mut(&client) {
            None | Some(Member::Dropped) => Err(RejectReason::NotSelected),
            Some(Member::Submitted | Member::Uploading) => Err(RejectReason::Duplicate),
            Some(m @ (Member::Training | Member::Away { .. })) => {
                *m = Member::Uploading;
                Ok(())
            }
        }
    }

    /// The update the driver read after [`Self::begin_update`] is valid.
    ///
    /// On `Ok` the driver must fold the update into the round's aggregate
    /// *before* carrying out the returned actions (which may commit).
    pub fn accept_update(
        &mut self,
        client: C,
        round: RoundId,
        now: Instant,
    ) -> Result<Vec<Action<C>>, RejectReason> {
        let Phase::Collecting(active) = &mut self.phase else {
            return Err(RejectReason::RoundClosed);
        };
        if active.id != round {
            return Err(RejectReason::RoundClosed);
        }
        match active.members.get_mut(&client) {
            Some(m @ Member::Uploading) => *m = Member::Submitted,
            _ => return Err(RejectReason::NotSelected),
        }
        let actions = if active.stats().accepted >= active.target {
            self.close(true, AbortReason::QuorumUnreachable)
        } else {
            self.check_round_end()
        };
        Ok(self.then_start(actions, now))
    }

    /// The update the driver read was invalid or broke off: the client
    /// counts as dropped for this round.
    pub fn reject_update(&mut self, client: C, round: RoundId, now: Instant) -> Vec<Action<C>> {
        if let Phase::Collecting(active) = &mut self.phase
            && active.id == round
            && let Some(m @ Member::Uploading) = active.members.get_mut(&client)
        {
            *m = Member::Dropped;
        }
        let actions = self.check_round_end();
        self.then_start(actions, now)
    }

    /// A member left the round before its update (it missed a secure
    /// aggregation phase, say): it counts as dropped.
    pub fn drop_member(&mut self, client: C, round: RoundId, now: Instant) -> Vec<Action<C>> {
        if let Phase::Collecting(active) = &mut self.phase
            && active.id == round
            && let Some(m @ Member::Training) = active.members.get_mut(&client)
        {
            *m = Member::Dropped;
        }
        let actions = self.check_round_end();
        self.then_start(actions, now)
    }

    /// Ends the round being collected without a commit (secure aggregation
    /// cannot complete it); the next one starts when it can.
    pub fn abort_round(
        &mut self,
        round: RoundId,
        reason: AbortReason,
        now: Instant,
    ) -> Vec<Action<C>> {
        if self.current_round() != Some(round) {
            return Vec::new();
        }
        let actions = self.close(false, reason);
        self.then_start(actions, now)
    }

    /// Time passed; closes a round whose deadline is over.
    pub fn tick(&mut self, now: Instant) -> Vec<Action<C>> {
        if let Phase::Collecting(active) = &mut self.phase
            && active.next_return_deadline().is_some_and(|at| at <= now)
        {
            active.expire_away(now);
            if now < active.deadline {
                let actions = self.check_round_end();
                return self.then_start(actions, now);
            }
        }
        match &self.phase {
            Phase::Collecting(active) if now >= active.deadline => {
                let quorum = active.stats().accepted >= self.config.quorum;
                let actions = self.close(quorum, AbortReason::DeadlineBelowQuorum);
                self.then_start(actions, now)
            }
            Phase::Waiting => {
                if let Gate::Root(slot) = &mut self.gate
                    && let Some(permit) = slot.filter(|p| p.deadline <= now)
                {
                    // Too few devices came for the root's quota in time:
                    // say so now, so the root need not wait out its grace.
                    *slot = None;
                    self.next_round = permit.round.next();
                    let mut actions = vec![Action::Abort {
                        round: permit.round,
                        reason: AbortReason::DeadlineBelowQuorum,
                        stats: RoundStats {
                            selected: 0,
                            accepted: 0,
                            dropped: 0,
                        },
                    }];
                    actions.extend(self.start_if_ready(now));
                    return actions;
                }
                self.start_if_ready(now)
            }
            _ => Vec::new(),
        }
    }

    /// The next deadline the driver should tick at, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Collecting(active) => Some(
                active
                    .next_return_deadline()
                    .map_or(active.deadline, |at| at.min(active.deadline)),
            ),
            Phase::Waiting => match &self.gate {
                Gate::Root(Some(permit)) => Some(permit.deadline),
                _ => self.redraw_at,
            },
            _ => None,
        }
    }

    /// The driver stored `version` for `round`.
    pub fn commit_done(
        &mut self,
        round: RoundId,
        version: ModelVersion,
        now: Instant,
    ) -> Vec<Action<C>> {
        if !matches!(self.phase, Phase::Committing { round: r } if r == round) {
            return Vec::new();
        }
        self.version = version;
        if let Some(left) = &mut self.budget_rounds {
            *left = left.saturating_sub(1);
        }
        if version >= self.config.target_version {
            let reason = FinishReason::TargetReached;
            self.phase = Phase::Finished(reason);
            return vec![Action::Finished { version, reason }];
        }
        self.phase = Phase::Waiting;
        self.start_if_ready(now)
    }

    /// Storing failed; nothing changed, and the round will be retried.
    pub fn commit_failed(&mut self, round: RoundId, now: Instant) -> Vec<Action<C>> {
        if !matches!(self.phase, Phase::Committing { round: r } if r == round) {
            return Vec::new();
        }
        self.phase = Phase::Waiting;
        self.start_if_ready(now)
    }

    /// Starts a round when enough clients wait; `now` sets its deadline.
    pub fn start_if_ready(&mut self, now: Instant) -> Vec<Action<C>> {
        if !matches!(self.phase, Phase::Waiting) {
            return Vec::new();
        }
        if self.budget_rounds == Some(0) {
            let reason = FinishReason::BudgetExhausted;
            self.phase = Phase::Finished(reason);
            return vec![Action::Finished {
                version: self.version,
                reason,
            }];
        }
        let permit = match &self.gate {
            Gate::Own => None,
            Gate::Root(None) => return Vec::new(),
            Gate::Root(Some(permit)) => Some(*permit),
        };
        if let Some(permit) = permit {
            return self.start_permitted(permit);
        }
        if self.pool.len() < self.config.min_clients {
            return Vec::new();
        }
        let (candidates, target) = match self.config.selection {
            Selection::Fixed => {
                let mut candidates: Vec<C> = self.pool.iter().copied().collect();
                candidates.shuffle(&mut self.rng);
                candidates.truncate(self.config.cohort_size(candidates.len()));
                (candidates, self.config.clients_per_round)
            }
            Selection::Poisson { rate } => {
                let candidates: Vec<C> = self
                    .pool
                    .iter()
                    .copied()
                    .filter(|_| self.rng.random::<f64>() < rate)
                    .collect();
                if candidates.len() < self.config.quorum {
                    self.redraw_at = Some(now + POISSON_REDRAW);
                    return Vec::new();
                }
                let target = candidates.len();
                (candidates, target)
            }
        };
        self.redraw_at = None;
        let mut candidates = candidates;
        candidates.sort();
        for c in &candidates {
            self.pool.remove(c);
        }
        let id = self.next_round;
        self.next_round = id.next();
        let deadline = now + self.config.round_timeout;
        self.phase = Phase::Collecting(ActiveRound {
            id,
            base: self.version,
            deadline,
            target,
            members: candidates.iter().map(|&c| (c, Member::Training)).collect(),
        });
        vec![Action::StartRound {
            round: id,
            base: self.version,
            cohort: candidates,
            deadline,
        }]
    }

    /// A leaf's round, with the root's id and deadline, once the root's
    /// quota of devices wait: exactly that many, drawn at random, or under
    /// Poisson selection each of them independently at the rate, so the
    /// union over leaves is the Poisson sample the accountant assumes.
    fn start_permitted(&mut self, permit: Permit) -> Vec<Action<C>> {
        if self.pool.len() < permit.quota {
            return Vec::new();
        }
        let mut candidates: Vec<C> = self.pool.iter().copied().collect();
        candidates.shuffle(&mut self.rng);
        candidates.truncate(permit.quota);
        if let Selection::Poisson { rate } = self.config.selection {
            candidates.retain(|_| self.rng.random::<f64>() < rate);
            if candidates.is_empty() {
                // Nobody drawn: nothing to release, and the root need not wait.
                self.gate = Gate::Root(None);
                self.next_round = permit.round.next();
                return vec![Action::Abort {
                    round: permit.round,
                    reason: AbortReason::QuorumUnreachable,
                    stats: RoundStats {
                        selected: 0,
                        accepted: 0,
                        dropped: 0,
                    },
                }];
            }
        }
        let target = candidates.len();
        candidates.sort();
        for c in &candidates {
            self.pool.remove(c);
        }
        self.gate = Gate::Root(None);
        self.next_round = permit.round.next();
        self.phase = Phase::Collecting(ActiveRound {
            id: permit.round,
            base: self.version,
            deadline: permit.deadline,
            target,
            members: candidates.iter().map(|&c| (c, Member::Training)).collect(),
        });
        vec![Action::StartRound {
            round: permit.round,
            base: self.version,
            cohort: candidates,
            deadline: permit.deadline,
        }]
    }

    /// After an event: a machine left waiting starts the next round if it can.
    fn then_start(&mut self, mut actions: Vec<Action<C>>, now: Instant) -> Vec<Action<C>> {
        actions.extend(self.start_if_ready(now));
        actions
    }

    /// Ends a round whose members are all done.
    fn check_round_end(&mut self) -> Vec<Action<C>> {
        match &self.phase {
            Phase::Collecting(active) if !active.pending() => {
                let quorum = active.stats().accepted >= self.config.quorum;
                self.close(quorum, AbortReason::QuorumUnreachable)
            }
            _ => Vec::new(),
        }
    }

    fn close(&mut self, commit: bool, reason: AbortReason) -> Vec<Action<C>> {
        let Phase::Collecting(active) = std::mem::replace(&mut self.phase, Phase::Waiting) else {
            return Vec::new();
        };
        let stats = active.stats();
        if commit {
            self.phase = Phase::Committing { round: active.id };
            vec![Action::Commit {
                round: active.id,
                base: active.base,
                new_version: active.base.next(),
                stats,
            }]
        } else {
            vec![Action::Abort {
                round: active.id,
                reason,
                stats,
            }]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(n: usize, quorum: usize, rounds: u64) -> RoundConfig {
        RoundConfig {
            min_clients: n,
            clients_per_round: n,
            over_selection: 0.0,
            quorum,
            round_timeout: Duration::from_secs(60),
            target_version: ModelVersion(rounds),
            selection: Selection::Fixed,
            rejoin_grace: Duration::ZERO,
        }
    }

    fn start(c: &mut Coordinator<u32>, clients: &[u32], now: Instant) -> (RoundId, Vec<u32>) {
        let mut actions = Vec::new();
        for &k in clients {
            actions.extend(c.check_in(k, now));
        }
        match actions.as_slice() {
            [Action::StartRound { round, cohort, .. }] => (*round, cohort.clone()),
            other => panic!("expected one StartRound, got {other:?}"),
        }
    }

    fn submit(c: &mut Coordinator<u32>, k: u32, round: RoundId, now: Instant) -> Vec<Action<u32>> {
        c.begin_update(k, round).unwrap();
        c.accept_update(k, round, now).unwrap()
    }

    #[test]
    fn a_full_round_commits_and_the_run_finishes() {
        let now = Instant::now();
        let mut c = Coordinator::new(config(3, 2, 2), ModelVersion(0), RoundId(1), 7).unwrap();
        let (round, cohort) = start(&mut c, &[1, 2, 3], now);
        assert_eq!((round, cohort.len()), (RoundId(1), 3));
        assert!(submit(&mut c, 1, round, now).is_empty());
        assert!(submit(&mut c, 2, round, now).is_empty());
        let actions = submit(&mut c, 3, round, now);
        assert_eq!(
            actions,
            vec![Action::Commit {
                round,
                base: ModelVersion(0),
                new_version: ModelVersion(1),
                stats: RoundStats {
                    selected: 3,
                    accepted: 3,
                    dropped: 0
                },
            }]
        );
        // Check-ins during the commit wait for it.
        for k in [1, 2, 3] {
            assert!(c.check_in(k, now).is_empty());
        }
        let actions = c.commit_done(round, ModelVersion(1), now);
        assert!(matches!(
            actions.as_slice(),
            [Action::StartRound {
                round: RoundId(2),
                base: ModelVersion(1),
                ..
            }]
        ));
        for k in [1, 2, 3] {
            submit(&mut c, k, RoundId(2), now);
        }
        assert_eq!(
            c.commit_done(RoundId(2), ModelVersion(2), now),
            vec![Action::Finished {
                version: ModelVersion(2),
                reason: FinishReason::TargetReached,
            }]
        );
        assert!(c.is_finished());
        assert_eq!(
            c.check_in(9, now),
            vec![Action::Finished {
                version: ModelVersion(2),
                reason: FinishReason::TargetReached,
            }]
        );
    }

    #[test]
    fn the_privacy_budget_ends_the_run_before_the_target() {
        let now = Instant::now();
        let mut c = Coordinator::new(config(2, 2, 10), ModelVersion(0), RoundId(1), 1).unwrap();
        c.limit_rounds(1);
        let (round, _) = start(&mut c, &[1, 2], now);
        submit(&mut c, 1, round, now);
        submit(&mut c, 2, round, now);
        assert_eq!(
            c.commit_done(round, ModelVersion(1), now),
            vec![Action::Finished {
                version: ModelVersion(1),
                reason: FinishReason::BudgetExhausted,
            }]
        );
        assert_eq!(c.finish_reason(), Some(FinishReason::BudgetExhausted));

        let mut spent = Coordinator::new(config(2, 2, 10), ModelVersion(3), RoundId(9), 1).unwrap();
        spent.limit_rounds(0);
        assert!(matches!(
            spent.check_in(1, now).as_slice(),
            [Action::Finished {
                reason: FinishReason::BudgetExhausted,
                ..
            }]
        ));
    }

    #[test]
    fn poisson_selection_samples_each_client_at_the_rate() {
        let now = Instant::now();
        let mut cfg = config(100, 1, 1000);
        cfg.clients_per_round = 100;
        cfg.selection = Selection::Poisson { rate: 0.2 };
        let mut c = Coordinator::new(cfg, ModelVersion(0), RoundId(1), 5).unwrap();
        let clients: Vec<u32> = (0..100).collect();
        let mut sizes = Vec::new();
        let mut actions = Vec::new();
        for &k in &clients {
            actions.extend(c.check_in(k, now));
        }
        for r in 0..200u64 {
            let [Action::StartRound { round, cohort, .. }] = actions.as_slice() else {
                panic!("expected a round, got {actions:?}");
            };
            let (round, cohort) = (*round, cohort.clone());
            sizes.push(cohort.len());
            for &k in &cohort {
                c.begin_update(k, round).unwrap();
                c.accept_update(k, round, now).unwrap();
            }
            // Closes only when every member is in.
            actions = c.commit_done(round, ModelVersion(r + 1), now);
            for &k in &cohort {
                actions.extend(c.check_in(k, now));
            }
        }
        let mean = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64;
        // Binomial(100, 0.2): mean 20, std of the mean over 200 draws 0.28.
        assert!((mean - 20.0).abs() < 1.5, "mean cohort {mean}");
        assert!(sizes.iter().any(|&s| s != 20), "sizes vary: {sizes:?}");
        // A draw below the quorum starts nothing and asks for a tick later.
        let mut cfg = config(3, 3, 10);
        cfg.selection = Selection::Poisson { rate: 0.01 };
        let mut sparse = Coordinator::new(cfg, ModelVersion(0), RoundId(1), 5).unwrap();
        for k in 0..3 {
            assert!(sparse.check_in(k, now).is_empty());
        }
        assert_eq!(sparse.next_deadline(), Some(now + POISSON_REDRAW));
        let bad = RoundConfig {
            selection: Selection::Poisson { rate: 0.0 },
            ..config(2, 1, 1)
        };
        assert_eq!(bad.validate(), Err(ConfigError::BadRate(0.0)));
    }

    #[test]
    fn deadline_commits_with_quorum_and_aborts_without() {
        let now = Instant::now();
        let late = now + Duration::from_secs(61);
        let mut c = Coordinator::new(config(3, 2, 5), ModelVersion(0), RoundId(1), 1).unwrap();
        let (round, _) = start(&mut c, &[1, 2, 3], now);
        submit(&mut c, 1, round, now);
        assert!(c.tick(now + Duration::from_secs(59)).is_empty());
        let actions = c.tick(late);
        assert!(matches!(
            actions.as_slice(),
            [Action::Abort {
                reason: AbortReason::DeadlineBelowQuorum,
                stats: RoundStats { accepted: 1, .. },
                ..
            }]
        ));

        // The retry is a new round id on the same base version.
        let (retry, _) = start(&mut c, &[1, 2, 3], late);
        assert_eq!(retry, RoundId(2));
        submit(&mut c, 1, retry, late);
        submit(&mut c, 2, retry, late);
        let actions = c.tick(late + Duration::from_secs(61));
        assert!(matches!(
            actions.as_slice(),
            [Action::Commit {
                new_version: ModelVersion(1),
                stats: RoundStats { accepted: 2, .. },
                ..
            }]
        ));
    }

    #[test]
    fn dropouts_end_the_round_early_either_way() {
        let now = Instant::now();
        let mut c = Coordinator::new(config(3, 2, 5), ModelVersion(0), RoundId(1), 1).unwrap();
        let (round, _) = start(&mut c, &[1, 2, 3], now);
        submit(&mut c, 1, round, now);
        assert!(c.disconnected(2, true, now).is_empty());
        c.begin_update(3, round).unwrap();
        let actions = c.reject_update(3, round, now);
        assert!(matches!(
            actions.as_slice(),
            [Action::Abort {
                reason: AbortReason::QuorumUnreachable,
                stats: RoundStats {
                    selected: 3,
                    accepted: 1,
                    dropped: 2
                },
                ..
            }]
        ));

        let (round, _) = start(&mut c, &[1, 2, 3], now);
        submit(&mut c, 1, round, now);
        submit(&mut c, 2, round, now);
        let actions = c.disconnected(3, true, now);
        assert!(matches!(
            actions.as_slice(),
            [Action::Commit {
                stats: RoundStats {
                    accepted: 2,
                    dropped: 1,
                    ..
                },
                ..
            }]
        ));
    }

    #[test]
    fn a_member_cut_off_mid_upload_may_send_again_within_the_grace() {
        let now = Instant::now();
        let mut cfg = config(3, 3, 5);
        cfg.rejoin_grace = Duration::from_secs(10);
        let mut c = Coordinator::new(cfg, ModelVersion(0), RoundId(1), 1).unwrap();
        let (round, _) = start(&mut c, &[1, 2, 3], now);
        submit(&mut c, 1, round, now);
        submit(&mut c, 2, round, now);
        c.begin_update(3, round).unwrap();
        assert!(c.upload_interrupted(3, round, now).is_empty());
        // The old connection's end changes nothing more.
        assert!(c.disconnected(3, true, now).is_empty());
        assert_eq!(c.next_deadline(), Some(now + Duration::from_secs(10)));
        let back = now + Duration::from_secs(4);
        c.begin_update(3, round).unwrap();
        let actions = c.accept_update(3, round, back).unwrap();
        assert!(matches!(
            actions.as_slice(),
            [Action::Commit {
                stats: RoundStats {
                    accepted: 3,
                    dropped: 0,
                    ..
                },
                ..
            }]
        ));
    }

    #[test]
    fn an_away_member_counts_as_dropped_once_its_grace_ends() {
        let now = Instant::now();
        let mut cfg = config(3, 2, 5);
        cfg.rejoin_grace = Duration::from_secs(10);
        let mut c = Coordinator::new(cfg, ModelVersion(0), RoundId(1), 1).unwrap();
        let (round, _) = start(&mut c, &[1, 2, 3], now);
        submit(&mut c, 1, round, now);
        submit(&mut c, 2, round, now);
        assert!(c.disconnected(3, true, now).is_empty());
        assert!(c.tick(now + Duration::from_secs(9)).is_empty());
        let actions = c.tick(now + Duration::from_secs(10));
        assert!(matches!(
            actions.as_slice(),
            [Action::Commit {
                stats: RoundStats {
                    accepted: 2,
                    dropped: 1,
                    ..
                },
                ..
            }]
        ));
        // Too late now: the round it belonged to is closed.
        assert_eq!(c.begin_update(3, round), Err(RejectReason::RoundClosed));

        // A member whose state died with its connection drops at once.
        let later = now + Duration::from_secs(20);
        c.commit_done(round, ModelVersion(1), later);
        let (round, _) = start(&mut c, &[1, 2, 3], later);
        submit(&mut c, 1, round, later);
        submit(&mut c, 2, round, later);
        assert!(matches!(
            c.disconnected(3, false, later).as_slice(),
            [Action::Commit { .. }]
        ));
    }

    #[test]
    fn updates_are_refused_for_wrong_rounds_strangers_and_repeats() {
        let now = Instant::now();
        let mut cfg = config(2, 1, 5);
        cfg.clients_per_round = 2;
        let mut c = Coordinator::new(cfg, ModelVersion(0), RoundId(10), 1).unwrap();
        assert_eq!(
            c.begin_update(1, RoundId(10)),
            Err(RejectReason::WrongRound)
        );
        assert_eq!(
            c.begin_update(1, RoundId(3)),
            Err(RejectReason::RoundClosed)
        );
        let (round, _) = start(&mut c, &[1, 2], now);
        assert!(c.check_in(3, now).is_empty());
        assert_eq!(c.begin_update(3, round), Err(RejectReason::NotSelected));
        assert_eq!(
            c.begin_update(1, RoundId(11)),
            Err(RejectReason::WrongRound)
        );
        assert_eq!(
            c.begin_update(1, RoundId(9)),
            Err(RejectReason::RoundClosed)
        );
        c.begin_update(1, round).unwrap();
        assert_eq!(c.begin_update(1, round), Err(RejectReason::Duplicate));
        c.accept_update(1, round, now).unwrap();
        assert_eq!(c.begin_update(1, round), Err(RejectReason::Duplicate));
        assert_eq!(
            c.accept_update(2, round, now),
            Err(RejectReason::NotSelected)
        );
    }

    #[test]
    fn over_selection_picks_extra_and_closes_at_the_target() {
        let now = Instant::now();
        let mut cfg = config(2, 2, 5);
        cfg.min_clients = 3;
        cfg.over_selection = 0.5;
        let mut c = Coordinator::new(cfg, ModelVersion(0), RoundId(1), 1).unwrap();
        let (round, cohort) = start(&mut c, &[1, 2, 3, 4], now);
        assert_eq!(cohort.len(), 3);
        assert_eq!(c.pool_len(), 1);
        submit(&mut c, cohort[0], round, now);
        let actions = submit(&mut c, cohort[1], round, now);
        assert!(matches!(
            actions.as_slice(),
            [Action::Commit {
                stats: RoundStats {
                    selected: 3,
                    accepted: 2,
                    dropped: 0
                },
                ..
            }]
        ));
        // The straggler is told the round closed.
        assert_eq!(
            c.begin_update(cohort[2], round),
            Err(RejectReason::RoundClosed)
        );
    }

    #[test]
    fn a_failed_commit_retries_the_round_on_the_same_version() {
        let now = Instant::now();
        let mut c = Coordinator::new(config(1, 1, 5), ModelVersion(3), RoundId(8), 1).unwrap();
        let (round, _) = start(&mut c, &[1], now);
        submit(&mut c, 1, round, now);
        assert!(c.commit_failed(round, now).is_empty());
        assert_eq!(c.version(), ModelVersion(3));
        let (retry, _) = start(&mut c, &[1], now);
        assert_eq!(retry, RoundId(9));
    }

    #[test]
    fn re_checking_in_mid_round_counts_as_a_drop() {
        let now = Instant::now();
        let mut c = Coordinator::new(config(2, 1, 5), ModelVersion(0), RoundId(1), 1).unwrap();
        let (round, _) = start(&mut c, &[1, 2], now);
        submit(&mut c, 1, round, now);
        let actions = c.check_in(2, now);
        assert!(matches!(
            actions.as_slice(),
            [Action::Commit {
                stats: RoundStats {
                    accepted: 1,
                    dropped: 1,
                    ..
                },
                ..
            }]
        ));
    }

    #[test]
    fn bad_configs_are_named() {
        let mut cfg = config(3, 4, 1);
        assert_eq!(
            cfg.validate(),
            Err(ConfigError::BadQuorum {
                quorum: 4,
                clients_per_round: 3
            })
        );
        cfg.quorum = 2;
        cfg.min_clients = 1;
        assert_eq!(
            cfg.validate(),
            Err(ConfigError::PoolBelowQuorum {
                min_clients: 1,
                quorum: 2
            })
        );
        cfg.min_clients = 3;
        cfg.over_selection = f64::NAN;
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::BadOverSelection(_))
        ));
    }

    #[test]
    fn a_run_already_at_its_target_is_finished() {
        let c = Coordinator::<u32>::new(config(1, 1, 3), ModelVersion(3), RoundId(4), 0).unwrap();
        assert!(c.is_finished());
    }

    #[test]
    fn members_dropped_by_secure_aggregation_end_the_round() {
        let now = Instant::now();
        let mut c = Coordinator::new(config(3, 2, 5), ModelVersion(0), RoundId(1), 0).unwrap();
        let (round, cohort) = start(&mut c, &[1, 2, 3], now);
        assert!(c.drop_member(cohort[0], round, now).is_empty());
        c.begin_update(cohort[1], round).unwrap();
        assert!(c.accept_update(cohort[1], round, now).unwrap().is_empty());
        // The last member drops too: one accepted update is below quorum.
        let actions = c.drop_member(cohort[2], round, now);
        assert!(matches!(
            actions.as_slice(),
            [Action::Abort {
                reason: AbortReason::QuorumUnreachable,
                ..
            }]
        ));
        // A session that cannot go on aborts the round outright.
        let (round, _) = start(&mut c, &[1, 2, 3], now);
        let actions = c.abort_round(round, AbortReason::SecureAggregation, now);
        assert!(matches!(
            actions.as_slice(),
            [Action::Abort { reason: AbortReason::SecureAggregation, stats, .. }] if stats.selected == 3
        ));
        assert_eq!(c.current_round(), None);
    }

    fn leaf(quorum: usize) -> Coordinator<u32> {
        Coordinator::new(config(10, quorum, 100), ModelVersion(0), RoundId(1), 7)
            .unwrap()
            .follow_root()
    }

    #[test]
    fn a_leaf_starts_only_the_rounds_its_root_permits() {
        let now = Instant::now();
        let mut c = leaf(2);
        for k in 0..6 {
            assert!(c.check_in(k, now).is_empty(), "no permit, no round");
        }
        assert!(c.tick(now + Duration::from_secs(600)).is_empty());
        let deadline = now + Duration::from_secs(30);
        let actions = c.permit(RoundId(40), ModelVersion(3), 4, deadline, now);
        let [
            Action::StartRound {
                round,
                base,
                cohort,
                deadline: d,
            },
        ] = actions.as_slice()
        else {
            panic!("expected the permitted round, got {actions:?}");
        };
        assert_eq!(
            (*round, *base, *d),
            (RoundId(40), ModelVersion(3), deadline)
        );
        assert_eq!(cohort.len(), 4, "exactly the quota");
        // Four accepted updates close the round early, as the target.
        let mut last = Vec::new();
        for &k in cohort {
            last = submit(&mut c, k, RoundId(40), now);
        }
        assert!(matches!(
            last.as_slice(),
            [Action::Commit {
                round: RoundId(40),
                new_version: ModelVersion(4),
                ..
            }]
        ));
        // The root committed: the leaf waits for its next permit.
        assert!(c.commit_done(RoundId(40), ModelVersion(4), now).is_empty());
        assert_eq!(c.version(), ModelVersion(4));
        for k in 0..6 {
            assert!(c.check_in(k, now).is_empty());
        }
    }

    #[test]
    fn a_leaf_waits_for_its_quota_and_drops_an_expired_permit() {
        let now = Instant::now();
        let mut c = leaf(1);
        let deadline = now + Duration::from_secs(5);
        assert!(
            c.permit(RoundId(2), ModelVersion(1), 3, deadline, now)
                .is_empty()
        );
        assert!(c.check_in(1, now).is_empty());
        assert!(c.check_in(2, now).is_empty());
        assert_eq!(c.next_deadline(), Some(deadline));
        // The deadline passes with two of three: no round, the root is told
        // at once, and the permit is spent, so a third device starts
        // nothing either.
        assert!(matches!(
            c.tick(deadline)[..],
            [Action::Abort {
                round: RoundId(2),
                reason: AbortReason::DeadlineBelowQuorum,
                ..
            }]
        ));
        assert!(c.tick(deadline).is_empty(), "told once");
        assert!(c.check_in(3, deadline).is_empty());
        assert_eq!(c.current_round(), None);
    }

    #[test]
    fn a_newer_permit_supersedes_a_collecting_round_and_stale_ones_are_ignored() {
        let now = Instant::now();
        let mut c = leaf(2);
        for k in 0..4 {
            c.check_in(k, now);
        }
        let later = now + Duration::from_secs(30);
        let started = c.permit(RoundId(5), ModelVersion(2), 2, later, now);
        assert_eq!(started.len(), 1);
        // A permit for a round this leaf already ran is stale.
        assert!(
            c.permit(RoundId(5), ModelVersion(2), 2, later, now)
                .is_empty()
        );
        assert!(
            c.permit(RoundId(4), ModelVersion(2), 2, later, now)
                .is_empty()
        );
        let actions = c.permit(RoundId(6), ModelVersion(2), 2, later, now);
        assert!(
            matches!(
                actions.as_slice(),
                [
                    Action::Abort {
                        round: RoundId(5),
                        reason: AbortReason::Superseded,
                        ..
                    },
                    Action::StartRound {
                        round: RoundId(6),
                        ..
                    }
                ]
            ),
            "got {actions:?}"
        );
    }

    #[test]
    fn a_forwarded_round_the_root_did_not_commit_is_forgotten() {
        let now = Instant::now();
        let mut c = leaf(1);
        for k in 0..2 {
            c.check_in(k, now);
        }
        let later = now + Duration::from_secs(30);
        let actions = c.permit(RoundId(1), ModelVersion(0), 2, later, now);
        let [Action::StartRound { cohort, .. }] = actions.as_slice() else {
            panic!("expected a round, got {actions:?}");
        };
        let cohort = cohort.clone();
        for k in cohort {
            submit(&mut c, k, RoundId(1), now);
        }
        assert_eq!(c.phase_name(), "committing");
        // The root abandoned round 1 and plans round 2 on the same base.
        for k in 0..2 {
            c.check_in(k, now);
        }
        let actions = c.permit(RoundId(2), ModelVersion(0), 2, later, now);
        assert!(matches!(
            actions.as_slice(),
            [Action::StartRound {
                round: RoundId(2),
                base: ModelVersion(0),
                ..
            }]
        ));
        // A late answer for round 1 changes nothing.
        assert!(c.commit_done(RoundId(1), ModelVersion(1), now).is_empty());
        assert_eq!(c.version(), ModelVersion(0));
    }

    #[test]
    fn a_root_that_ends_the_run_ends_the_leafs() {
        let now = Instant::now();
        let mut c = leaf(1);
        for k in 0..2 {
            c.check_in(k, now);
        }
        c.permit(
            RoundId(1),
            ModelVersion(0),
            2,
            now + Duration::from_secs(9),
            now,
        );
        let actions = c.finish(ModelVersion(7), FinishReason::BudgetExhausted);
        assert!(matches!(
            actions.as_slice(),
            [
                Action::Abort {
                    reason: AbortReason::Superseded,
                    ..
                },
                Action::Finished {
                    version: ModelVersion(7),
                    reason: FinishReason::BudgetExhausted
                }
            ]
        ));
        assert!(c.is_finished());
        assert!(
            c.finish(ModelVersion(7), FinishReason::BudgetExhausted)
                .is_empty()
        );
    }

    #[test]
    fn a_single_server_ignores_permits() {
        let now = Instant::now();
        let mut c =
            Coordinator::<u32>::new(config(2, 2, 5), ModelVersion(0), RoundId(1), 1).unwrap();
        assert!(
            c.permit(RoundId(9), ModelVersion(0), 2, now, now)
                .is_empty()
        );
        c.check_in(1, now);
        let actions = c.check_in(2, now);
        assert!(matches!(
            actions.as_slice(),
            [Action::StartRound {
                round: RoundId(1),
                ..
            }]
        ));
    }

    #[test]
    fn a_poisson_leaf_draws_each_of_its_quota_at_the_rate() {
        let now = Instant::now();
        let mut cfg = config(10, 1, 100);
        cfg.selection = Selection::Poisson { rate: 0.5 };
        let mut c = Coordinator::new(cfg, ModelVersion(0), RoundId(1), 3)
            .unwrap()
            .follow_root();
        for k in 0..400 {
            c.check_in(k, now);
        }
        let later = now + Duration::from_secs(30);
        let actions = c.permit(RoundId(1), ModelVersion(0), 400, later, now);
        let [Action::StartRound { cohort, .. }] = actions.as_slice() else {
            panic!("expected a round, got {actions:?}");
        };
        assert!((160..240).contains(&cohort.len()), "drew {}", cohort.len());
        // At rate 0 nobody is drawn: the round ends at once, so the root
        // hears of it without waiting for the deadline.
        let mut cfg = config(10, 1, 100);
        cfg.selection = Selection::Poisson { rate: 1e-9 };
        let mut c = Coordinator::new(cfg, ModelVersion(0), RoundId(1), 3)
            .unwrap()
            .follow_root();
        c.check_in(1, now);
        let actions = c.permit(RoundId(4), ModelVersion(0), 1, later, now);
        assert!(matches!(
            actions.as_slice(),
            [Action::Abort {
                round: RoundId(4),
                reason: AbortReason::QuorumUnreachable,
                ..
            }]
        ));
        assert_eq!(c.current_round(), None);
    }
}
