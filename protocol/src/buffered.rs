//! Asynchronous buffered aggregation (FedBuff, Nguyen et al. 2022): clients
//! train whenever a slot is free, each on the newest model, and the server
//! applies an aggregate every `size` updates, weighting each by how many
//! versions old its base is. No round waits for its slowest member.
//!
//! Like [`crate::round::Coordinator`] this is plain state driven by events,
//! with time as an input, and it speaks the same [`Action`]s, so the server
//! drives either one the same way. A "round" here is one buffer: its id
//! names the tasks handed out while it fills, and its commit is one version.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use crate::{
    ModelVersion, RoundId,
    message::RejectReason,
    round::{Action, FinishReason, RoundStats},
};

/// How the buffer fills and how stale an update may be.
#[derive(Clone, Debug, PartialEq)]
pub struct BufferConfig {
    /// K: updates per aggregate.
    pub size: usize,
    /// Clients training at once.
    pub concurrency: usize,
    /// Updates whose base is more than this many versions old are refused.
    pub max_staleness: u64,
    /// How long a client has to return its update before its slot is freed.
    pub task_timeout: Duration,
    /// How long a client whose link broke may take to come back.
    pub rejoin_grace: Duration,
    /// The run ends once this version is committed.
    pub target_version: ModelVersion,
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum BufferConfigError {
    #[error("buffer size must be at least 1")]
    EmptyBuffer,
    #[error("concurrency ({concurrency}) must be at least the buffer size ({size})")]
    Concurrency { concurrency: usize, size: usize },
}

impl BufferConfig {
    pub fn validate(&self) -> Result<(), BufferConfigError> {
        if self.size == 0 {
            return Err(BufferConfigError::EmptyBuffer);
        }
        // Each client adds at most one update per buffer, so fewer slots
        // than K could never fill it.
        if self.concurrency < self.size {
            return Err(BufferConfigError::Concurrency {
                concurrency: self.concurrency,
                size: self.size,
            });
        }
        Ok(())
    }
}

/// FedBuff's polynomial staleness weight, 1/√(1+τ).
pub fn staleness_weight(staleness: u64) -> f64 {
    1.0 / (1.0 + staleness as f64).sqrt()
}

/// A client's task: which buffer handed it out, on which version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Lease {
    round: RoundId,
    base: ModelVersion,
    until: Instant,
    uploading: bool,
}

#[derive(Debug)]
struct Buffer<C> {
    id: RoundId,
    base: ModelVersion,
    /// One update per client per buffer: the user-level guarantee of
    /// central DP counts one contribution per release.
    contributed: BTreeSet<C>,
    dropped: usize,
}

#[derive(Debug)]
enum Phase {
    Filling,
    Committing(RoundId),
    Finished,
}

#[derive(Debug)]
pub struct Buffered<C> {
    config: BufferConfig,
    version: ModelVersion,
    next_round: RoundId,
    pool: BTreeSet<C>,
    leases: BTreeMap<C, Lease>,
    buffer: Option<Buffer<C>>,
    phase: Phase,
    budget_rounds: Option<u64>,
}

impl<C: Copy + Ord> Buffered<C> {
    pub fn new(
        config: BufferConfig,
        version: ModelVersion,
        next_round: RoundId,
    ) -> Result<Self, BufferConfigError> {
        config.validate()?;
        let phase = if version >= config.target_version {
            Phase::Finished
        } else {
            Phase::Filling
        };
        Ok(Self {
            config,
            version,
            next_round,
            pool: BTreeSet::new(),
            leases: BTreeMap::new(),
            buffer: None,
            phase,
            budget_rounds: None,
        })
    }

    pub fn limit_rounds(&mut self, rounds: u64) {
        self.budget_rounds = Some(rounds);
    }

    pub fn version(&self) -> ModelVersion {
        self.version
    }

    /// The buffer being filled.
    pub fn current_round(&self) -> Option<RoundId> {
        match self.phase {
            Phase::Filling => self.buffer.as_ref().map(|b| b.id),
            _ => None,
        }
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Finished)
    }

    /// The phase, in words, for dashboards.
    pub fn phase_name(&self) -> &'static str {
        match self.phase {
            Phase::Filling => "filling the buffer",
            Phase::Committing(_) => "committing",
            Phase::Finished => "finished",
        }
    }

    /// The version `client`'s task was built on, while it holds one.
    pub fn lease_base(&self, client: &C) -> Option<ModelVersion> {
        self.leases.get(client).map(|l| l.base)
    }

    pub fn check_in(&mut self, client: C, now: Instant) -> Vec<Action<C>> {
        if self.leases.contains_key(&client) {
            // Back without its update: it gave up on the task.
            self.release(client);
        }
        self.pool.insert(client);
        self.fill(now)
    }

    pub fn disconnected(&mut self, client: C, may_return: bool, now: Instant) -> Vec<Action<C>> {
        self.pool.remove(&client);
        match self.leases.get_mut(&client) {
            Some(lease) if may_return && !self.config.rejoin_grace.is_zero() => {
                lease.uploading = false;
                lease.until = lease.until.min(now + self.config.rejoin_grace);
                Vec::new()
            }
            Some(_) => {
                self.release(client);
                self.fill(now)
            }
            None => Vec::new(),
        }
    }

    /// A client announced an update for the task it got from `round`.
    pub fn begin_update(&mut self, client: C, round: RoundId) -> Result<(), RejectReason> {
        let Some(lease) = self.leases.get(&client).copied() else {
            return Err(RejectReason::NotSelected);
        };
        if lease.round != round {
            return Err(RejectReason::WrongRound);
        }
        if lease.uploading {
            return Err(RejectReason::Duplicate);
        }
        if !matches!(self.phase, Phase::Filling) {
            return Err(RejectReason::RoundClosed);
        }
        if self.version.0.saturating_sub(lease.base.0) > self.config.max_staleness {
            self.release(client);
            return Err(RejectReason::Stale);
        }
        if self
            .buffer
            .as_ref()
            .is_some_and(|b| b.contributed.contains(&client))
        {
            return Err(RejectReason::Duplicate);
        }
        if let Some(l) = self.leases.get_mut(&client) {
            l.uploading = true;
        }
        Ok(())
    }

    /// How many versions old `client`'s base is, while it uploads.
    pub fn staleness(&self, client: &C) -> Option<u64> {
        self.leases
            .get(client)
            .map(|l| self.version.0.saturating_sub(l.base.0))
    }

    /// The update read after [`Self::begin_update`] is valid; fold it in
    /// (weighted by [`staleness_weight`]) before carrying out the actions.
    pub fn accept_update(
        &mut self,
        client: C,
        round: RoundId,
        now: Instant,
    ) -> Result<Vec<Action<C>>, RejectReason> {
        match self.leases.get(&client) {
            Some(l) if l.round == round && l.uploading => {}
            _ => return Err(RejectReason::NotSelected),
        }
        let Some(buffer) = self.buffer.as_mut() else {
            return Err(RejectReason::RoundClosed);
        };
        self.leases.remove(&client);
        buffer.contributed.insert(client);
        if buffer.contributed.len() < self.config.size {
            return Ok(self.fill(now));
        }
        let stats = RoundStats {
            selected: buffer.contributed.len() + buffer.dropped,
            accepted: buffer.contributed.len(),
            dropped: buffer.dropped,
        };
        self.phase = Phase::Committing(buffer.id);
        Ok(vec![Action::Commit {
            round: buffer.id,
            base: buffer.base,
            new_version: self.version.next(),
            stats,
        }])
    }

    /// The update was invalid; its slot goes to someone else.
    pub fn reject_update(&mut self, client: C, round: RoundId, now: Instant) -> Vec<Action<C>> {
        if self.leases.get(&client).is_some_and(|l| l.round == round) {
            self.release(client);
        }
        self.fill(now)
    }

    /// The upload broke off with its link: the client may send it again.
    pub fn upload_interrupted(
        &mut self,
        client: C,
        round: RoundId,
        now: Instant,
    ) -> Vec<Action<C>> {
        match self.leases.get_mut(&client) {
            Some(l) if l.round == round && !self.config.rejoin_grace.is_zero() => {
                l.uploading = false;
                l.until = l.until.min(now + self.config.rejoin_grace);
                Vec::new()
            }
            Some(l) if l.round == round => {
                self.release(client);
                self.fill(now)
            }
            _ => Vec::new(),
        }
    }

    pub fn tick(&mut self, now: Instant) -> Vec<Action<C>> {
        let expired: Vec<C> = self
            .leases
            .iter()
            .filter(|(_, l)| l.until <= now && !l.uploading)
            .map(|(c, _)| *c)
            .collect();
        for client in expired {
            self.release(client);
        }
        self.fill(now)
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.leases
            .values()
            .filter(|l| !l.uploading)
            .map(|l| l.until)
            .min()
    }

    pub fn commit_done(
        &mut self,
        round: RoundId,
        version: ModelVersion,
        now: Instant,
    ) -> Vec<Action<C>> {
        if !matches!(self.phase, Phase::Committing(r) if r == round) {
            return Vec::new();
        }
        self.version = version;
        self.buffer = None;
        if let Some(left) = &mut self.budget_rounds {
            *left = left.saturating_sub(1);
        }
        if version >= self.config.target_version {
            return self.finish(FinishReason::TargetReached);
        }
        self.phase = Phase::Filling;
        self.fill(now)
    }

    /// Storing failed: the buffer's updates are lost, and it fills anew.
    pub fn commit_failed(&mut self, round: RoundId, now: Instant) -> Vec<Action<C>> {
        if !matches!(self.phase, Phase::Committing(r) if r == round) {
            return Vec::new();
        }
        self.buffer = None;
        self.phase = Phase::Filling;
        self.fill(now)
    }

    fn finish(&mut self, reason: FinishReason) -> Vec<Action<C>> {
        self.phase = Phase::Finished;
        self.leases.clear();
        vec![Action::Finished {
            version: self.version,
            reason,
        }]
    }

    fn release(&mut self, client: C) {
        if self.leases.remove(&client).is_some()
            && let Some(b) = &mut self.buffer
        {
            b.dropped += 1;
        }
    }

    /// Opens a buffer when none is open, and hands tasks to waiting clients
    /// while slots are free.
    fn fill(&mut self, now: Instant) -> Vec<Action<C>> {
        if !matches!(self.phase, Phase::Filling) {
            return Vec::new();
        }
        let mut actions = Vec::new();
        if self.buffer.is_none() {
            if self.budget_rounds == Some(0) {
                return self.finish(FinishReason::BudgetExhausted);
            }
            let id = self.next_round;
            self.next_round = id.next();
            self.buffer = Some(Buffer {
                id,
                base: self.version,
                contributed: BTreeSet::new(),
                dropped: 0,
            });
            actions.push(Action::StartRound {
                round: id,
                base: self.version,
                cohort: Vec::new(),
                deadline: now + self.config.task_timeout,
            });
        }
        let Some(buffer) = &self.buffer else {
            return actions;
        };
        let eligible: Vec<C> = self
            .pool
            .iter()
            .filter(|c| !buffer.contributed.contains(c))
            .take(self.config.concurrency.saturating_sub(self.leases.len()))
            .copied()
            .collect();
        for client in eligible {
            self.pool.remove(&client);
            let until = now + self.config.task_timeout;
            self.leases.insert(
                client,
                Lease {
                    round: buffer.id,
                    base: self.version,
                    until,
                    uploading: false,
                },
            );
            actions.push(Action::Assign {
                client,
                round: buffer.id,
                base: self.version,
                deadline: until,
            });
        }
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(size: usize, concurrency: usize, target: u64) -> BufferConfig {
        BufferConfig {
            size,
            concurrency,
            max_staleness: 2,
            task_timeout: Duration::from_secs(60),
            rejoin_grace: Duration::ZERO,
            target_version: ModelVersion(target),
        }
    }

    fn assigned(actions: &[Action<u32>]) -> Vec<(u32, RoundId, ModelVersion)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Assign {
                    client,
                    round,
                    base,
                    ..
                } => Some((*client, *round, *base)),
                _ => None,
            })
            .collect()
    }

    fn submit(b: &mut Buffered<u32>, c: u32, round: RoundId, now: Instant) -> Vec<Action<u32>> {
        b.begin_update(c, round).unwrap();
        b.accept_update(c, round, now).unwrap()
    }

    #[test]
    fn the_buffer_commits_every_k_updates_while_slow_clients_keep_training() {
        let now = Instant::now();
        let mut b = Buffered::new(config(2, 3, 3), ModelVersion(0), RoundId(1)).unwrap();
        let mut tasks = Vec::new();
        for c in [1, 2, 3] {
            tasks.extend(assigned(&b.check_in(c, now)));
        }
        let r1 = RoundId(1);
        assert_eq!(
            tasks,
            vec![
                (1, r1, ModelVersion(0)),
                (2, r1, ModelVersion(0)),
                (3, r1, ModelVersion(0))
            ]
        );
        assert!(submit(&mut b, 1, r1, now).is_empty());
        let actions = submit(&mut b, 2, r1, now);
        assert!(matches!(
            actions.as_slice(),
            [Action::Commit {
                new_version: ModelVersion(1),
                stats: RoundStats { accepted: 2, .. },
                ..
            }]
        ));
        // Client 3 is still training on version 0 across the commit.
        let actions = b.commit_done(r1, ModelVersion(1), now);
        assert!(matches!(
            actions.as_slice(),
            [Action::StartRound {
                round: RoundId(2),
                base: ModelVersion(1),
                ..
            }]
        ));
        assert!(b.begin_update(3, r1).is_ok());
        assert_eq!(b.staleness(&3), Some(1));
        assert!(b.accept_update(3, r1, now).unwrap().is_empty());
        // Fresh tasks are on version 1, in buffer 2.
        let fresh = assigned(&b.check_in(1, now));
        assert_eq!(fresh, vec![(1, RoundId(2), ModelVersion(1))]);
    }

    #[test]
    fn too_stale_duplicate_and_unassigned_updates_are_refused() {
        let now = Instant::now();
        let mut cfg = config(1, 3, 10);
        cfg.max_staleness = 1;
        let mut b = Buffered::new(cfg, ModelVersion(0), RoundId(1)).unwrap();
        b.check_in(1, now);
        b.check_in(2, now);
        assert_eq!(
            b.begin_update(9, RoundId(1)),
            Err(RejectReason::NotSelected)
        );
        assert_eq!(b.begin_update(1, RoundId(7)), Err(RejectReason::WrongRound));
        // Two commits while client 2 trains on version 0.
        let mut round = RoundId(1);
        for v in 1..=2 {
            submit(&mut b, 1, round, now);
            b.commit_done(round, ModelVersion(v), now);
            round = b.current_round().unwrap();
            assert_eq!(assigned(&b.check_in(1, now)).len(), 1);
        }
        assert_eq!(b.begin_update(2, RoundId(1)), Err(RejectReason::Stale));
        // Its slot is free again; checking in gives it a fresh task.
        assert_eq!(assigned(&b.check_in(2, now)).len(), 1);
        b.begin_update(2, round).unwrap();
        assert_eq!(b.begin_update(2, round), Err(RejectReason::Duplicate));
    }

    #[test]
    fn a_client_adds_at_most_one_update_per_buffer() {
        let now = Instant::now();
        let mut b = Buffered::new(config(2, 2, 5), ModelVersion(0), RoundId(1)).unwrap();
        b.check_in(1, now);
        b.check_in(2, now);
        submit(&mut b, 1, RoundId(1), now);
        // Client 1 is back first, but it already contributed to buffer 1.
        assert!(assigned(&b.check_in(1, now)).is_empty());
        let actions = submit(&mut b, 2, RoundId(1), now);
        assert!(matches!(actions.as_slice(), [Action::Commit { .. }]));
        let actions = b.commit_done(RoundId(1), ModelVersion(1), now);
        assert_eq!(assigned(&actions), vec![(1, RoundId(2), ModelVersion(1))]);
    }

    #[test]
    fn expired_tasks_free_their_slots_and_the_run_ends_at_its_target() {
        let now = Instant::now();
        let mut b = Buffered::new(config(1, 1, 1), ModelVersion(0), RoundId(1)).unwrap();
        assert_eq!(assigned(&b.check_in(1, now)).len(), 1);
        assert!(assigned(&b.check_in(2, now)).is_empty());
        assert_eq!(b.next_deadline(), Some(now + Duration::from_secs(60)));
        let later = now + Duration::from_secs(60);
        assert_eq!(
            assigned(&b.tick(later)),
            vec![(2, RoundId(1), ModelVersion(0))]
        );
        submit(&mut b, 2, RoundId(1), later);
        let actions = b.commit_done(RoundId(1), ModelVersion(1), later);
        assert!(matches!(
            actions.as_slice(),
            [Action::Finished {
                reason: FinishReason::TargetReached,
                ..
            }]
        ));
        assert!(b.is_finished());
    }

    #[test]
    fn the_budget_ends_the_run_instead_of_opening_a_buffer() {
        let now = Instant::now();
        let mut b = Buffered::new(config(1, 1, 10), ModelVersion(0), RoundId(1)).unwrap();
        b.limit_rounds(1);
        b.check_in(1, now);
        submit(&mut b, 1, RoundId(1), now);
        let actions = b.commit_done(RoundId(1), ModelVersion(1), now);
        assert!(matches!(
            actions.as_slice(),
            [Action::Finished {
                reason: FinishReason::BudgetExhausted,
                ..
            }]
        ));
    }

    #[test]
    fn staleness_weights_follow_fedbuff() {
        assert_eq!(staleness_weight(0), 1.0);
        assert!((staleness_weight(3) - 0.5).abs() < 1e-12);
        assert!(staleness_weight(8) < staleness_weight(3));
    }

    #[test]
    fn fewer_slots_than_the_buffer_are_refused() {
        assert_eq!(
            config(4, 3, 1).validate(),
            Err(BufferConfigError::Concurrency {
                concurrency: 3,
                size: 4
            })
        );
    }
}
