//! The root coordinator's driver: while this replica holds the lease it
//! plans rounds across the live leaves, merges their partial sums, releases
//! the merged sum (central DP's noise goes on here, once), puts the next
//! version in the object store and commits it with one swap of the root
//! key. Every decision is the sans-IO pieces': quotas and the split round
//! (`rounds::split`), the release (`rounds::release`), the lease
//! (`cluster::lease`); this module moves bytes between them and JetStream.
//!
//! The root is the audit trail's only writer (`cluster::trail`): each state
//! it proposes carries the entries recording what changed, signed with the
//! state directory's audit key, and the trail is closed for an export only
//! by the leading root. Once the run is finished the root stays up to close
//! the trail for exports, until it is stopped.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use covey_privacy::noise::NoiseRng;
use covey_protocol::{ModelVersion, RoundId};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::{
    jetstream::{Cluster, ClusterError, ProposeError, Replica},
    lease::{Lease, Timing},
    leaves::{Heard, Report},
    objects::{ModelRef, ObjectError},
    route::LeafId,
    state::{Finished, RootState},
    trail::Trail,
};
use crate::{
    config::Settings,
    fold::{
        aggregate::OptimizerState,
        merge::{Aggregate, Shape},
    },
    rounds::{
        central::TestSet,
        dp::{Privacy, PrivacyLedger},
        release,
        split::{Decision, SplitRound, quotas},
    },
    state::{
        audit::{AuditEvent, AuditSigner},
        store::{ModelHeader, RoundOutcome, RoundRecord, StoredModel, unix_ms_now},
    },
};

/// How often the root renews its watch on export requests.
const EXPORTS_REWATCH: Duration = Duration::from_secs(5);

/// How the root runs, beyond `config.toml`'s rounds.
#[derive(Clone, Debug)]
pub struct RootOptions {
    /// This replica's name; a random suffix makes each start a new holder.
    pub name: String,
    pub lease: Timing,
    /// A leaf whose heartbeat has not changed for this long is lost.
    pub leaf_timeout: Duration,
    /// Fewest devices a leaf may release a partial sum of (at least k).
    pub min_per_leaf: usize,
    /// After a round's collection window, how long leaves get to unmask
    /// and forward their sums.
    pub forward_grace: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("this configuration cannot run split across leaves: {0}")]
    Unsupported(String),
    #[error("{0}; this replica gave up the lease")]
    State(#[from] super::state::CorruptState),
}

/// Refuses what cannot be split across leaves, naming the setting.
pub fn check_splittable(settings: &Settings) -> Result<(), String> {
    if settings.buffer.is_some() {
        return Err(
            "rounds.mode = \"buffered\" (FedBuff) needs one buffer; use synchronous rounds".into(),
        );
    }
    if !settings.aggregator.is_streaming() {
        return Err(format!(
            "aggregation.rule = {} needs every update at once, so it cannot be split across leaves; use a streaming rule",
            settings.aggregator
        ));
    }
    // The root sees each leaf's sum, which carries only that leaf's
    // devices' noise: each must carry what the plan counts on.
    if let Some(dp) = &settings.dp
        && let crate::rounds::dp::DpMode::Distributed(plan) = &dp.mode
        && (settings.min_cohort.get() as u64) < plan.min_clients
    {
        return Err(format!(
            "under distributed DP the root sees each leaf's sum, which carries only that leaf's devices' noise, and the noise is planned for {} devices (rounds.quorum); set compliance.min_cohort, the fewest devices a leaf releases, to at least {}",
            plan.min_clients, plan.min_clients
        ));
    }
    Ok(())
}

/// One root replica. It stands by until it holds the lease.
pub struct Root {
    pub cluster: Cluster,
    pub settings: Settings,
    /// Version 0, put in the object store by whichever replica leads first.
    pub initial: StoredModel,
    pub test_set: Option<Arc<TestSet>>,
    pub options: RootOptions,
    /// The state directory's audit key: the trail verifies under its
    /// public key (`covey-server audit public-key`).
    pub auditor: AuditSigner,
    /// SHA-256 of this replica's `config.toml`, recorded in the trail.
    pub config_sha256: String,
}

/// What the round in flight needs that the state does not hold.
struct Collecting {
    split: SplitRound,
    fed: BTreeSet<LeafId>,
    started_unix_ms: u64,
}

impl Root {
    /// Runs until `stop` turns true or the run is finished.
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> Result<(), RootError> {
        check_splittable(&self.settings).map_err(RootError::Unsupported)?;
        let (key, objects, leaves) = self.cluster.open_roles().await?;
        let trail = self
            .cluster
            .patiently(|c| async move { c.trail().await })
            .await?;
        let mut export_requests = self
            .cluster
            .patiently(|_| {
                let trail = trail.clone();
                async move { trail.export_requests().await }
            })
            .await?;
        let mut exports: BTreeSet<u64> = BTreeSet::new();
        let mut exports_watched = Instant::now();
        let mut flushed_through = 0;
        let me = format!("{}-{:08x}", self.options.name, rand::random::<u32>());
        let replica = Replica::start(key, Lease::new(me, self.options.lease));
        let mut standing = replica.standing();
        let mut heard = self
            .cluster
            .patiently(|_| {
                let leaves = leaves.clone();
                async move { leaves.watch().await }
            })
            .await?;
        let mut beats: BTreeMap<LeafId, (u64, Instant)> = BTreeMap::new();
        let mut reports: BTreeMap<(RoundId, LeafId), Report> = BTreeMap::new();
        let mut collecting: Option<Collecting> = None;
        let mut model_cache: Option<StoredModel> = None;
        let noise = match self.settings.dp {
            Some(_) => Some(Arc::new(std::sync::Mutex::new(
                NoiseRng::from_os().map_err(|e| RootError::Unsupported(e.to_string()))?,
            ))),
            None => None,
        };
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut last_heard = Instant::now();
        loop {
            if last_heard.elapsed() > self.options.leaf_timeout / 2 {
                // Live leaves beat several times a second: this much
                // silence means the watch's consumer was lost with a NATS
                // node. A new one delivers every key's latest value again.
                match leaves.watch().await {
                    Ok(fresh) => {
                        debug!("restarted the watch on the leaves' bucket");
                        heard = fresh;
                    }
                    Err(e) => debug!("cannot restart the leaves' watch yet: {e}"),
                }
                last_heard = Instant::now();
            }
            if exports_watched.elapsed() > EXPORTS_REWATCH {
                // Requests are rare, so silence says nothing about the
                // watch; a consumer lost with a NATS node would stall it
                // for good. A fresh one delivers what is still waiting.
                match trail.export_requests().await {
                    Ok(fresh) => export_requests = fresh,
                    Err(e) => debug!("cannot watch export requests yet: {e}"),
                }
                exports_watched = Instant::now();
            }
            tokio::select! {
                h = heard.recv() => match h {
                    Some(Heard::Beat { leaf, beat }) => {
                        last_heard = Instant::now();
                        beats.insert(leaf, (beat.available, Instant::now()));
                    }
                    Some(Heard::Report { round, leaf, report }) => {
                        last_heard = Instant::now();
                        reports.insert((round, leaf), report);
                    }
                    // Restarted above once the silence is long enough.
                    None => tokio::time::sleep(Duration::from_millis(100)).await,
                },
                Some(id) = export_requests.recv() => {
                    exports.insert(id);
                }
                _ = standing.changed() => {}
                _ = tick.tick() => {}
                _ = stop.changed() => {}
            }
            if *stop.borrow() {
                replica.kill();
                return Ok(());
            }
            let now = Instant::now();
            let current = standing.borrow().clone();
            if current.leading.is_none() {
                collecting = None;
                continue;
            }
            let sealed = current.state.as_deref().unwrap_or(&[]);
            let state = match RootState::open(self.cluster.at_rest(), sealed) {
                Ok(Some(state)) => state,
                Ok(None) => {
                    self.initialize(&replica, &trail, &objects).await;
                    continue;
                }
                Err(e) => {
                    // Holding the lease would stall the cluster: a standby
                    // provisioned right takes over, and this one says why.
                    error!("{e}");
                    replica.kill();
                    return Err(e.into());
                }
            };
            if state.config_sha256 != self.config_sha256 {
                let change = AuditEvent::ConfigChanged {
                    from_sha256: Some(state.config_sha256.clone()),
                    to_sha256: self.config_sha256.clone(),
                };
                let next = RootState {
                    config_sha256: self.config_sha256.clone(),
                    ..state.clone()
                };
                if self
                    .propose(&replica, &trail, Some(&state), next, vec![change])
                    .await
                    .is_some()
                {
                    warn!("this replica's config.toml differs from the one the run started with");
                }
                continue;
            }
            if let Some(&id) = exports.first() {
                self.close_for_export(&replica, &trail, &state, id).await;
                exports.remove(&id);
                continue;
            }
            if let Some(why) = state.finished {
                if flushed_through < state.audit.next_seq {
                    match trail.store(state.audit, &state.pending).await {
                        Ok(()) => {
                            flushed_through = state.audit.next_seq;
                            info!(version = %state.version, ?why, "the run is finished; closing the audit trail for exports until stopped");
                        }
                        Err(e) => warn!("cannot store the last audit entries yet: {e}"),
                    }
                }
                continue;
            }
            // Reports of rounds long gone are of no use to anyone.
            reports.retain(|(round, _), _| round.0 + 1 >= state.next_round.0);
            let Some(plan) = state.plan.clone() else {
                collecting = None;
                let live: BTreeMap<LeafId, usize> = beats
                    .iter()
                    .filter(|(_, (_, seen))| now.duration_since(*seen) < self.options.leaf_timeout)
                    .map(|(l, (n, _))| (l.clone(), usize::try_from(*n).unwrap_or(usize::MAX)))
                    .collect();
                self.plan(&replica, &trail, &state, &live).await;
                continue;
            };
            let c = match &mut collecting {
                Some(c) if c.split.round() == plan.round => c,
                _ => {
                    // Planned here, or by a root this one took over from:
                    // either way the window counts from now, on this clock.
                    let shape = match release::ring_quantizer(&self.settings) {
                        Some(q) => Shape::Ring {
                            len: q.encoded_len(),
                            bits: q.bits,
                        },
                        None => Shape::Floats {
                            len: self.settings.spec.param_count(),
                        },
                    };
                    let deadline =
                        now + Duration::from_millis(plan.collect_ms) + self.options.forward_grace;
                    info!(round = %plan.round, leaves = plan.quotas.len(), "collecting partial sums");
                    collecting.insert(Collecting {
                        split: SplitRound::new(
                            plan.round,
                            shape,
                            plan.quotas.clone(),
                            self.options.min_per_leaf,
                            self.settings.round.quorum,
                            self.settings.min_cohort,
                            deadline,
                        ),
                        fed: BTreeSet::new(),
                        started_unix_ms: unix_ms_now(),
                    })
                }
            };
            for ((round, leaf), report) in &reports {
                if *round != plan.round || c.fed.contains(leaf) {
                    continue;
                }
                match report {
                    Report::Failed { reason } => {
                        warn!(round = %round, leaf = %leaf, "leaf released nothing: {reason}");
                        c.split.leaf_lost(leaf);
                    }
                    Report::Partial { bytes } => {
                        let limit = usize::try_from(*bytes).unwrap_or(usize::MAX);
                        match objects.get_partial(*round, leaf, limit).await {
                            Ok(bytes) => match c.split.report(leaf, &bytes) {
                                Ok(()) => {
                                    debug!(round = %round, leaf = %leaf, "partial sum merged")
                                }
                                Err(e) => warn!(round = %round, "partial sum refused: {e}"),
                            },
                            Err(e) => {
                                // JetStream may be moving the bucket's
                                // leader: read it again next time, until
                                // the round's deadline.
                                warn!(round = %round, leaf = %leaf, "cannot read a partial sum yet: {e}");
                                continue;
                            }
                        }
                    }
                }
                c.fed.insert(leaf.clone());
            }
            for leaf in plan.quotas.keys() {
                let alive = beats
                    .get(leaf)
                    .is_some_and(|(_, seen)| now.duration_since(*seen) < self.options.leaf_timeout);
                // A leaf that reported is done with the round, alive or not.
                if !alive && !c.fed.contains(leaf) {
                    c.split.leaf_lost(leaf);
                }
            }
            let selected: usize = plan.quotas.values().sum();
            let record = |outcome, accepted: usize| RoundRecord {
                round: plan.round,
                base: plan.base,
                outcome,
                selected,
                accepted,
                dropped: selected.saturating_sub(accepted),
                started_unix_ms: c.started_unix_ms,
                ended_unix_ms: Some(unix_ms_now()),
                mean_client_loss: None,
                test_accuracy: None,
                test_loss: None,
                bytes_up: 0,
                bytes_down: 0,
                clip: plan.clip.map(|c| c.get()),
                epsilon: None,
                rejected: Default::default(),
            };
            match c.split.poll(now) {
                Decision::Wait(_) => {}
                Decision::Abandon(reason) => {
                    warn!(round = %plan.round, "round abandoned: {reason}");
                    let r = record(RoundOutcome::Aborted { reason }, 0);
                    self.propose(&replica, &trail, Some(&state), state.abandoned(r), vec![])
                        .await;
                }
                Decision::Commit { sum, contributors } => {
                    let accepted = usize::try_from(contributors).unwrap_or(usize::MAX);
                    let mut r = record(
                        RoundOutcome::Committed {
                            version: state.version.next(),
                        },
                        accepted,
                    );
                    r.mean_client_loss = sum.tally.mean_loss();
                    match self
                        .release(
                            &state,
                            sum,
                            noise.clone(),
                            &mut r,
                            &objects,
                            &mut model_cache,
                        )
                        .await
                    {
                        Ok(Released {
                            model,
                            moments,
                            ledger,
                        }) => {
                            let finished = self.finished_after(model.version, ledger.as_ref());
                            let next = state.committed(model, moments, ledger, r, finished);
                            if let Some(next) = self
                                .propose(&replica, &trail, Some(&state), next, vec![])
                                .await
                            {
                                info!(round = %plan.round, version = %next.version, contributors, "round committed");
                            }
                        }
                        Err(e) => {
                            error!(round = %plan.round, "release failed, the round will be retried: {e}");
                            let r = record(
                                RoundOutcome::Aborted {
                                    reason: format!("release failed: {e}"),
                                },
                                0,
                            );
                            self.propose(
                                &replica,
                                &trail,
                                Some(&state),
                                state.abandoned(r),
                                vec![],
                            )
                            .await;
                        }
                    }
                }
            }
        }
    }

    /// The first leader puts version 0 and writes the first state.
    async fn initialize(
        &self,
        replica: &Replica,
        trail: &Trail,
        objects: &super::objects::Objects,
    ) {
        let model = match objects.put_model(&self.initial).await {
            Ok(model) => model,
            Err(e) => {
                warn!("cannot store the initial model yet: {e}");
                return;
            }
        };
        let ledger = self
            .settings
            .dp
            .map(|dp| PrivacyLedger::new(dp.initial_clip));
        let spec = &self.initial.header.spec;
        let started = vec![
            AuditEvent::Initialised {
                model: spec.to_string(),
                parameters: spec.param_count() as u64,
            },
            AuditEvent::ServerStarted {
                config_sha256: self.config_sha256.clone(),
            },
        ];
        let initial = RootState::initial(model, ledger, self.config_sha256.clone());
        if self
            .propose(replica, trail, None, initial, started)
            .await
            .is_some()
        {
            info!("initialized the cluster's state at version 0");
        }
    }

    /// Plans the next round if enough devices wait across live leaves, or
    /// ends the run when the budget allows no more.
    async fn plan(
        &self,
        replica: &Replica,
        trail: &Trail,
        state: &RootState,
        live: &BTreeMap<LeafId, usize>,
    ) {
        if let Some(why) = self.finished_after(state.version, state.ledger.as_ref()) {
            self.propose(replica, trail, Some(state), state.finish(why), vec![])
                .await;
            return;
        }
        // Under Poisson selection every waiting device is a candidate and
        // each leaf draws its own at the rate.
        let cohort = match self.settings.round.selection {
            covey_protocol::round::Selection::Fixed => self.settings.round.clients_per_round,
            covey_protocol::round::Selection::Poisson { .. } => usize::MAX,
        };
        let q = quotas(live, cohort, self.options.min_per_leaf);
        let total: usize = q.values().sum();
        if total
            < self
                .settings
                .round
                .min_clients
                .max(self.settings.round.quorum)
        {
            return;
        }
        let collect_ms =
            u64::try_from(self.settings.round.round_timeout.as_millis()).unwrap_or(u64::MAX);
        let clip = match (&self.settings.dp, &state.ledger) {
            (Some(_), Some(ledger)) => Some(ledger.clip),
            _ => None,
        };
        let next = state.planned(
            q.into_iter().filter(|(_, n)| *n > 0).collect(),
            collect_ms,
            clip,
        );
        if let Some(next) = self
            .propose(replica, trail, Some(state), next, vec![])
            .await
            && let Some(plan) = &next.plan
        {
            info!(round = %plan.round, base = %plan.base, devices = total, leaves = plan.quotas.len(), "round planned");
        }
    }

    fn finished_after(
        &self,
        version: ModelVersion,
        ledger: Option<&PrivacyLedger>,
    ) -> Option<Finished> {
        if version >= self.settings.round.target_version {
            return Some(Finished::TargetReached);
        }
        let left = match (&self.settings.dp, ledger) {
            (Some(dp), Some(ledger)) => {
                let cap = self
                    .settings
                    .round
                    .target_version
                    .0
                    .saturating_sub(version.0);
                ledger.rounds_left(dp, cap)
            }
            _ => u64::MAX,
        };
        (left == 0).then_some(Finished::BudgetExhausted)
    }

    /// Turns the merged sum into the next version and puts it in the object
    /// store; the caller's swap commits it.
    async fn release(
        &self,
        state: &RootState,
        sum: crate::fold::merge::PartialSum,
        noise: Option<Arc<std::sync::Mutex<NoiseRng>>>,
        record: &mut RoundRecord,
        objects: &super::objects::Objects,
        cache: &mut Option<StoredModel>,
    ) -> Result<Released, ReleaseFailed> {
        let privacy = match (self.settings.dp, &state.ledger, noise) {
            (Some(dp), Some(ledger), Some(rng)) => Some(Privacy {
                dp,
                ledger: ledger.clone(),
                rng,
            }),
            (None, _, _) => None,
            _ => return Err(ReleaseFailed("DP is on but the state has no ledger".into())),
        };
        let round = record.round;
        let (mean, ledger) = release::mean_update(
            &self.settings,
            privacy.as_ref(),
            release::ring_quantizer(&self.settings),
            Aggregate::Summed(sum.summed),
            sum.tally.within_clip,
            round,
        )
        .await
        .map_err(|e| ReleaseFailed(e.to_string()))?;
        if let (Some(p), Some(ledger)) = (&privacy, &ledger) {
            record.epsilon = Some(ledger.epsilon(&p.dp));
        }
        let base = match cache.take() {
            Some(m) if m.header.version == state.version => m,
            _ => objects
                .get_model(&state.model)
                .await
                .map_err(|e: ObjectError| ReleaseFailed(e.to_string()))?,
        };
        let mut weights = base.weights.clone();
        *cache = Some(base);
        let mut moments = match &state.moments {
            Some(r) => objects
                .get_moments(r)
                .await
                .map_err(|e| ReleaseFailed(e.to_string()))?,
            None => OptimizerState::default(),
        };
        self.settings
            .optimizer
            .apply(&mut moments, &mut weights, &mean);
        let version = state.version.next();
        // Stored before the commit names them, as the model is.
        let moments = if moments == OptimizerState::default() {
            None
        } else {
            Some(
                objects
                    .put_moments(version, &moments)
                    .await
                    .map_err(|e| ReleaseFailed(e.to_string()))?,
            )
        };
        if let Some(test) = &self.test_set {
            let (test, spec, w) = (test.clone(), self.settings.spec.clone(), weights.clone());
            match tokio::task::spawn_blocking(move || test.evaluate(&spec, &w)).await {
                Ok(Ok(m)) => {
                    record.test_accuracy = Some(m.accuracy);
                    record.test_loss = Some(m.loss);
                }
                Ok(Err(e)) => warn!(round = %round, "central evaluation failed: {e}"),
                Err(e) => warn!(round = %round, "central evaluation task: {e}"),
            }
        }
        let model = StoredModel {
            header: ModelHeader {
                version: state.version.next(),
                spec: self.settings.spec.clone(),
                round: Some(round),
                created_unix_ms: unix_ms_now(),
            },
            weights,
        };
        let stored = objects
            .put_model(&model)
            .await
            .map_err(|e| ReleaseFailed(e.to_string()))?;
        *cache = Some(model);
        Ok(Released {
            model: stored,
            moments,
            ledger,
        })
    }

    /// Closes the trail for export `id` with an `AuditExported` entry and
    /// answers with the entries to read, unless another root answered it.
    async fn close_for_export(&self, replica: &Replica, trail: &Trail, state: &RootState, id: u64) {
        match trail.exported(id).await {
            Ok(None) => {}
            Ok(Some(_)) => return,
            Err(e) => {
                warn!("cannot read the export's answer: {e}");
                return;
            }
        }
        let closing = vec![AuditEvent::AuditExported {
            entries: state.audit.next_seq + 1,
        }];
        let Some(next) = self
            .propose(replica, trail, Some(state), state.clone(), closing)
            .await
        else {
            return;
        };
        // The exporter reads the entries now, not after the next change.
        let stored = trail.store(next.audit, &next.pending).await;
        match stored {
            Ok(()) => match trail.answer_export(id, next.audit.next_seq).await {
                Ok(()) => info!(
                    entries = next.audit.next_seq,
                    "audit trail closed for an export"
                ),
                Err(e) => warn!("cannot answer the export: {e}"),
            },
            Err(e) => warn!("cannot store the export's entry: {e}"),
        }
    }

    /// Commits `next`, derived from `before` (the state the key holds), with
    /// the trail entries recording the change and `extra`: first stores
    /// `before`'s own entries in the trail, so none is lost to a later
    /// state. `None` if it was not committed (the lease moved on).
    async fn propose(
        &self,
        replica: &Replica,
        trail: &Trail,
        before: Option<&RootState>,
        next: RootState,
        extra: Vec<AuditEvent>,
    ) -> Option<RootState> {
        let mut events = Vec::new();
        if let Some(before) = before {
            if let Err(e) = trail.store(before.audit, &before.pending).await {
                warn!("cannot store audit entries, holding the next change: {e}");
                return None;
            }
            events = next.events_since(before);
        }
        events.extend(extra);
        let next = next.audited(&self.auditor, unix_ms_now(), events);
        let bytes = match next.seal(self.cluster.at_rest()) {
            Ok(bytes) => bytes,
            Err(e) => {
                error!("cannot seal the root's state: {e}");
                return None;
            }
        };
        match replica.propose(bytes.clone()).await {
            Ok(_) => {
                // The loop reads the state from the standing; acting on
                // one from before this write would propose over it.
                let mut standing = replica.standing();
                let caught_up = standing.wait_for(|s| {
                    s.leading.is_none() || s.state.as_deref() == Some(bytes.as_slice())
                });
                let _ = tokio::time::timeout(self.options.lease.duration(), caught_up).await;
                Some(next)
            }
            Err(ProposeError::NotLeader(_)) | Err(ProposeError::NotCommitted) => {
                warn!(
                    "a root write was refused: this replica no longer leads, or the store did not answer"
                );
                None
            }
            Err(ProposeError::Stopped) => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ReleaseFailed(String);

/// A released version, stored and ready to commit.
struct Released {
    model: ModelRef,
    moments: Option<super::objects::MomentsRef>,
    ledger: Option<PrivacyLedger>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServerConfig;

    fn settings(edit: impl FnOnce(&mut ServerConfig)) -> Result<(), String> {
        let mut c = ServerConfig::default();
        c.rounds.clients_per_round = 12;
        c.rounds.min_clients = 12;
        c.rounds.quorum = 8;
        c.compliance.min_cohort = 2;
        edit(&mut c);
        check_splittable(&c.settings().unwrap())
    }

    #[test]
    fn what_cannot_run_split_is_refused_naming_the_setting() {
        settings(|_| {}).unwrap();
        // Moments travel with each version (`RootState::moments`).
        settings(|c| c.aggregation.optimizer = "fedadam".into()).unwrap();
        let err = settings(|c| c.aggregation.aggregator = "median".into()).unwrap_err();
        assert!(err.contains("aggregation.rule"), "{err}");
        let distributed = |c: &mut ServerConfig| {
            c.privacy.mode = "distributed".into();
            c.privacy.population = 100;
            c.secure_aggregation.enabled = true;
        };
        let err = settings(distributed).unwrap_err();
        assert!(
            err.contains("compliance.min_cohort") && err.contains("at least 8"),
            "{err}"
        );
        settings(|c| {
            distributed(c);
            c.compliance.min_cohort = 8;
        })
        .unwrap();
        // Central DP's noise goes on once, at the root: leaves may be small.
        settings(|c| {
            c.privacy.mode = "central".into();
            c.privacy.population = 100;
        })
        .unwrap();
    }
}
