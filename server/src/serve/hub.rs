//! The hub's event loop: check-ins, updates, the scheduler's actions,
//! commits, and what it publishes (status snapshot, dashboard).

use super::*;

impl Hub {
    pub(super) async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        shared: Arc<Shared>,
    ) -> Result<RunSummary, ServeError> {
        if self.machine.is_finished() {
            self.finished = Some(Instant::now());
        }
        let mut control = tokio::time::interval(CONTROL_POLL);
        loop {
            if let Some(at) = self.finished
                && (self.devices.connected_count() == 0 || at.elapsed() >= FINISH_GRACE)
            {
                break;
            }
            let wake = self
                .machine
                .next_deadline()
                .or(self.finished.map(|at| at + FINISH_GRACE))
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let wake = match &self.secagg {
                Some(s) => s.wake().map_or(wake, |at| wake.min(at)),
                None => wake,
            };
            self.publish();
            tokio::select! {
                event = events.recv() => {
                    let Some(event) = event else { break };
                    self.handle(event, &shared).await?;
                }
                _ = control.tick() => {
                    let actions = self.apply_control(Instant::now());
                    self.execute(actions, &shared).await?;
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    if self.finished.is_some() {
                        continue;
                    }
                    self.advance_secagg(&shared).await?;
                    let actions = self.machine.tick(Instant::now());
                    self.execute(actions, &shared).await?;
                }
            }
        }
        self.summary.final_version = self.machine.version().0;
        self.publish();
        info!(version = %self.machine.version(), "run finished");
        Ok(self.summary)
    }

    pub(super) async fn handle(&mut self, event: Event, shared: &Shared) -> Result<(), ServeError> {
        let now = Instant::now();
        match event {
            Event::Renew {
                client,
                request,
                certificate,
                reply,
            } => {
                let _ =
                    reply.send(
                        self.registry
                            .renew(&self.store, client, &request, &certificate),
                    );
            }
            Event::Admin {
                actor,
                role,
                request,
                reply,
            } => {
                let _ = reply.send(self.admin(actor, role, request)?);
            }
            Event::Connected {
                client,
                conn,
                handle,
            } => {
                if self.devices.connected(client, conn, handle) {
                    self.metrics.uploads_interrupted.inc();
                    if let Some(round) = self.machine.current_round() {
                        let actions = self.machine.upload_interrupted(client, round, now);
                        self.execute(actions, shared).await?;
                    }
                }
            }
            Event::EvalReport { client, report } => self.eval_report(client, report),
            Event::Root(news) => self.root_news(*news, shared).await?,
            Event::SecAgg {
                client,
                message,
                certificate,
                reply,
            } => {
                self.secagg_message(client, message, &certificate, reply, now, shared)
                    .await?;
            }
            Event::Stop => {
                if let Some(mut s) = self.secagg.take() {
                    s.abort_all("run stopped");
                }
                if let Some(progress) = self.round.take() {
                    let mut record = progress.record;
                    record.outcome = RoundOutcome::Aborted {
                        reason: "run stopped".into(),
                    };
                    record.ended_unix_ms = Some(unix_ms_now());
                    self.store.put_round(&record)?;
                }
                info!("stopping the run on request");
                let version = self.machine.version();
                self.execute(
                    vec![Action::Finished {
                        version,
                        reason: FinishReason::Stopped,
                    }],
                    shared,
                )
                .await?;
                self.write_status();
            }
            Event::CheckIn {
                client,
                conn,
                reply,
            } => {
                if self.finished.is_some() {
                    let _ = reply.send(Assignment::Finished(self.machine.version()));
                    return Ok(());
                }
                self.devices.wait(client, conn, reply);
                let actions = self.machine.check_in(client, now);
                self.execute(actions, shared).await?;
            }
            Event::Disconnected { client, conn, lost } => {
                if self.devices.disconnected(client, conn) {
                    if let Some(s) = &mut self.secagg {
                        s.session.drop_member(client);
                        s.waiters.remove(&client);
                    }
                    // Under secure aggregation its keys died with the
                    // connection: it cannot come back this round.
                    let may_return = lost && self.secagg.is_none();
                    let actions = self.machine.disconnected(client, may_return, now);
                    self.execute(actions, shared).await?;
                    self.advance_secagg(shared).await?;
                }
            }
            Event::BeginUpdate {
                client,
                conn,
                header,
                reply,
            } => {
                if self.finished.is_some() {
                    let _ = reply.send(Err(RejectReason::RoundClosed));
                    return Ok(());
                }
                let (decision, actions) = self.begin_update(client, &header, now);
                if decision.is_ok() {
                    self.devices.begin_upload(client, conn);
                }
                let _ = reply.send(decision);
                self.execute(actions, shared).await?;
            }
            Event::FinishUpdate {
                client,
                conn,
                round,
                result,
                reply,
            } => {
                if !self.devices.end_upload(client, conn) {
                    // A superseded connection's upload: already written off.
                    let _ = reply.send(UpdateReceipt::Rejected(RejectReason::RoundClosed));
                    return Ok(());
                }
                let receipt = self
                    .finish_update(client, round, result, shared, now)
                    .await?;
                let _ = reply.send(receipt);
            }
        }
        Ok(())
    }

    /// Decides whether to read an announced update; a refusal may end the
    /// round, so the machine's actions come back too.
    pub(super) fn begin_update(
        &mut self,
        client: Pseudonym,
        header: &UpdateHeader,
        now: Instant,
    ) -> (Result<ChunkPlan, RejectReason>, Vec<Action<Pseudonym>>) {
        if let Err(reason) = self.machine.begin_update(client, header.round) {
            self.count_rejection(reason);
            return (Err(reason), Vec::new());
        }
        let Some(round) = &self.round else {
            return (Err(RejectReason::RoundClosed), Vec::new());
        };
        let (payload, values) = self.expected_payload();
        let distributed = matches!(payload, Payload::Ring { .. });
        let reason = if header.payload != payload
            && (distributed || matches!(header.payload, Payload::Ring { .. }))
        {
            // Plain where noise was required, or the reverse.
            RejectReason::PrivacyMismatch
        } else if header.param_count != values as u64
            || header.payload != payload
            || self.machine.expected_base(&client, round.record.base) != Some(header.base_version)
        {
            RejectReason::ShapeMismatch
        } else if header.num_examples == 0 {
            RejectReason::NoExamples
        } else if self.committer.privacy.is_some() && !distributed && header.within_clip.is_none() {
            RejectReason::PrivacyMismatch
        } else if self
            .secagg
            .as_ref()
            .is_some_and(|s| !s.session.accepts_input(&client))
        {
            // Not through the key phases: its masks could never be removed.
            RejectReason::NotSelected
        } else {
            return (Ok(ChunkPlan::new(values, self.chunk_len)), Vec::new());
        };
        warn!(client = %client, "rejected update: {reason}");
        self.count_rejection(reason);
        let actions = self.machine.reject_update(client, header.round, now);
        (Err(reason), actions)
    }

    /// Counts an ended round in the run summary and the metrics.
    pub(super) fn count_round(&mut self, committed: bool) {
        let outcome = if committed {
            self.summary.rounds_committed += 1;
            "committed"
        } else {
            self.summary.rounds_aborted += 1;
            "aborted"
        };
        self.metrics
            .rounds
            .get_or_create(&Outcome { outcome })
            .inc();
    }

    /// Counts a refused update by reason, for the run and its round.
    pub(super) fn count_rejection(&mut self, reason: RejectReason) {
        self.metrics
            .rejected
            .get_or_create(&Reason {
                reason: reason.as_str(),
            })
            .inc();
        *self
            .summary
            .rejected
            .entry(reason.as_str().to_owned())
            .or_default() += 1;
        if let Some(round) = &mut self.round {
            *round
                .record
                .rejected
                .entry(reason.as_str().to_owned())
                .or_default() += 1;
        }
    }

    /// What updates of this run carry, and how many values.
    pub(super) fn expected_payload(&self) -> (Payload, usize) {
        match self.ring_quantizer() {
            Some(q) => (Payload::Ring { bits: q.bits }, q.encoded_len()),
            None => (
                Payload::Floats(self.settings.encoding),
                self.settings.spec.param_count(),
            ),
        }
    }

    /// The quantizer of ring-word updates: distributed DP's, or secure
    /// aggregation's own when DP is off.
    pub(super) fn ring_quantizer(&self) -> Option<Quantizer> {
        self.committer.ring_quantizer(&self.settings)
    }

    pub(super) async fn finish_update(
        &mut self,
        client: Pseudonym,
        round_id: RoundId,
        result: Result<Received, Undelivered>,
        shared: &Shared,
        now: Instant,
    ) -> Result<UpdateReceipt, ServeError> {
        match result {
            Ok(mut update) => {
                let (_, expected) = self.expected_payload();
                let refusal = match (&mut update.values, &self.committer.privacy) {
                    (Values::Floats(v), _) if v.len() != expected => {
                        Some(RejectReason::ShapeMismatch)
                    }
                    (Values::Words(w), _) if w.len() != expected => {
                        Some(RejectReason::ShapeMismatch)
                    }
                    (Values::Floats(v), Some(p)) => clip_received(v, p.ledger.clip).err(),
                    (Values::Words(w), _) => match &mut self.secagg {
                        Some(s) => s
                            .session
                            .masked_input(client, w)
                            .err()
                            .map(|_| RejectReason::ShapeMismatch),
                        None => None,
                    },
                    _ => None,
                };
                if let Some(reason) = refusal {
                    warn!(client = %client, "rejected update: {reason}");
                    self.count_rejection(reason);
                    let actions = self.machine.reject_update(client, round_id, now);
                    self.execute(actions, shared).await?;
                    return Ok(UpdateReceipt::Rejected(reason));
                }
                // Read before the machine forgets the client's task.
                let staleness_weight = self.machine.update_weight(&client);
                match self.machine.accept_update(client, round_id, now) {
                    Ok(actions) => {
                        self.metrics.updates_accepted.inc();
                        // Ring words are summed here unless secure
                        // aggregation's session already holds them.
                        let ring = self.ring_quantizer().filter(|_| self.secagg.is_none());
                        if let Some(round) = &mut self.round {
                            // FedBuff weighs by staleness alone. Under DP every
                            // update weighs the same: weighting by example
                            // count would let one client's count leak.
                            let weight = if self.machine.is_buffered() {
                                staleness_weight
                            } else if self.committer.privacy.is_some() {
                                1.0
                            } else {
                                update.num_examples as f64
                            };
                            // Length, range and weight were checked above.
                            round.fold(update, weight, self.settings.aggregator, ring);
                        }
                        debug!(client = %client, "update accepted");
                        self.execute(actions, shared).await?;
                        Ok(UpdateReceipt::Accepted)
                    }
                    Err(reason) => {
                        self.count_rejection(reason);
                        Ok(UpdateReceipt::Rejected(reason))
                    }
                }
            }
            Err(Undelivered::Rejected(reason)) => {
                warn!(client = %client, "rejected update: {reason}");
                self.count_rejection(reason);
                let actions = self.machine.reject_update(client, round_id, now);
                self.execute(actions, shared).await?;
                Ok(UpdateReceipt::Rejected(reason))
            }
            Err(Undelivered::Abandoned) => {
                debug!(client = %client, "upload abandoned by the client");
                let actions = self.machine.reject_update(client, round_id, now);
                self.execute(actions, shared).await?;
                Ok(UpdateReceipt::Rejected(RejectReason::RoundClosed))
            }
            Err(Undelivered::Interrupted) => {
                // Not the client's fault: it may send the update again.
                debug!(client = %client, "upload cut off by a lost connection");
                self.metrics.uploads_interrupted.inc();
                let actions = self.machine.upload_interrupted(client, round_id, now);
                self.execute(actions, shared).await?;
                // Nobody reads this receipt: the stream is gone.
                Ok(UpdateReceipt::Rejected(RejectReason::RoundClosed))
            }
        }
    }

    pub(super) async fn execute(
        &mut self,
        actions: Vec<Action<Pseudonym>>,
        shared: &Shared,
    ) -> Result<(), ServeError> {
        let mut queue: VecDeque<_> = actions.into();
        while let Some(action) = queue.pop_front() {
            let now = Instant::now();
            match action {
                Action::StartRound {
                    round,
                    base,
                    cohort,
                    deadline,
                } => {
                    let task = Task {
                        round,
                        base_version: base,
                        spec: self.settings.spec.clone(),
                        hyper: self.settings.hyper_at(base),
                        update_encoding: self.settings.encoding,
                        chunk_len: self.chunk_len,
                        deadline_ms: deadline.saturating_duration_since(now).as_millis() as u64,
                        seed: self.rng.random(),
                        privacy: self.committer.update_privacy(&self.settings),
                        secure_aggregation: self.settings.secagg.map(|s| s.params),
                        config: self.settings.fit_config.clone(),
                    };
                    self.secagg = match (&self.settings.secagg, self.ring_quantizer()) {
                        (Some(sa), Some(quantizer)) => Some(SecAggRound {
                            round,
                            session: Session::new(
                                round,
                                sa.params,
                                quantizer.bits,
                                quantizer.encoded_len(),
                                cohort.iter().copied(),
                                self.settings.round.quorum,
                            ),
                            waiters: HashMap::new(),
                            deadline: now + sa.phase_timeout,
                            phase_started: now,
                            phase_timeout: sa.phase_timeout,
                            requests: HashMap::new(),
                            commit: None,
                        }),
                        _ => None,
                    };
                    let record = RoundRecord {
                        round,
                        base,
                        outcome: RoundOutcome::InFlight,
                        selected: cohort.len(),
                        accepted: 0,
                        dropped: 0,
                        started_unix_ms: unix_ms_now(),
                        ended_unix_ms: None,
                        mean_client_loss: None,
                        test_accuracy: None,
                        test_loss: None,
                        bytes_up: 0,
                        bytes_down: 0,
                        clip: self.committer.privacy.as_ref().map(|p| p.ledger.clip.get()),
                        epsilon: None,
                        rejected: Default::default(),
                    };
                    self.store.begin_round(&record)?;
                    self.metrics.selected.set(cohort.len() as i64);
                    info!(round = %round, base = %base, cohort = cohort.len(), "round started");
                    let package = Arc::new(TaskPackage {
                        task,
                        model: self.committer.model.clone(),
                    });
                    self.package = Some(package.clone());
                    self.round = Some(RoundInProgress::new(
                        record,
                        Aggregate::empty(
                            self.ring_quantizer(),
                            self.settings.aggregator,
                            self.committer.model.len(),
                        ),
                        &shared.metrics,
                        now,
                    ));
                    for client in cohort {
                        let sent = self
                            .devices
                            .assign(client, Assignment::Task(package.clone()));
                        if !sent {
                            queue.extend(self.machine.disconnected(client, false, now));
                        }
                    }
                    self.write_status();
                }
                Action::Assign {
                    client,
                    round,
                    base,
                    deadline,
                } => {
                    let Some(current) = self
                        .package
                        .as_ref()
                        .filter(|p| p.task.round == round && p.task.base_version == base)
                    else {
                        queue.extend(self.machine.disconnected(client, false, now));
                        continue;
                    };
                    let mut task = current.task.clone();
                    task.deadline_ms = deadline.saturating_duration_since(now).as_millis() as u64;
                    task.seed = self.rng.random();
                    let package = Arc::new(TaskPackage {
                        task,
                        model: current.model.clone(),
                    });
                    let sent = self.devices.assign(client, Assignment::Task(package));
                    if sent {
                        // FedBuff: tasks handed out for the open buffer.
                        self.metrics.selected.inc();
                    } else {
                        queue.extend(self.machine.disconnected(client, false, now));
                    }
                }
                Action::Commit {
                    round,
                    base,
                    new_version,
                    stats,
                } => {
                    if let Some(s) = &mut self.secagg
                        && s.round == round
                        && s.session.phase() == SecAggPhase::MaskedInput
                    {
                        s.commit = Some((base, new_version, stats));
                        debug!(round = %round, accepted = stats.accepted, "secure aggregation: asking survivors to unmask");
                        queue.extend(self.begin_unmask(now)?);
                        continue;
                    }
                    let Some(progress) = self.round.take() else {
                        queue.extend(self.machine.commit_failed(round, now));
                        continue;
                    };
                    self.metrics
                        .observe_phase("collect", now.saturating_duration_since(progress.started));
                    self.metrics.participants.set(stats.accepted as i64);
                    let mut record = progress.record;
                    record.accepted = stats.accepted;
                    record.dropped = stats.dropped;
                    record.selected = stats.selected;
                    record.ended_unix_ms = Some(unix_ms_now());
                    // The coordinator's quorum is at least k; this holds
                    // the line whatever path led here.
                    if let Err(below) = self.settings.min_cohort.check(progress.sum.contributors())
                    {
                        warn!(round = %round, "round discarded: {below}");
                        record.outcome = RoundOutcome::Aborted {
                            reason: format!("discarded: {below}"),
                        };
                        self.count_round(false);
                        self.store.put_round(&record)?;
                        self.report_failed(round, AbortReason::QuorumUnreachable)
                            .await;
                        queue.extend(self.machine.commit_failed(round, now));
                        self.write_status();
                        continue;
                    }
                    record.mean_client_loss = progress.tally.mean_loss();
                    record.bytes_up = shared.metrics.bytes_in.get() - progress.bytes_up_start;
                    record.bytes_down = shared.metrics.bytes_out.get() - progress.bytes_down_start;
                    if self.upstream.is_some() {
                        self.forward(round, progress.sum, progress.tally, record)
                            .await?;
                        self.write_status();
                        continue;
                    }
                    record.outcome = RoundOutcome::Committed {
                        version: new_version,
                    };
                    let committed = self
                        .committer
                        .commit(
                            &self.settings,
                            progress.sum,
                            progress.tally.within_clip,
                            record.clone(),
                            new_version,
                            round,
                        )
                        .await;
                    self.metrics.observe_phase("commit", now.elapsed());
                    match committed {
                        Ok(record) => {
                            self.count_round(true);
                            self.metrics.model_version.set(new_version.0 as i64);
                            self.metrics.committed_now(Some(&record));
                            if let Some(epsilon) = record.epsilon {
                                self.metrics.epsilon.set(epsilon);
                            }
                            info!(
                                round = %round,
                                version = %new_version,
                                base = %base,
                                accepted = stats.accepted,
                                dropped = stats.dropped,
                                test_accuracy = record.test_accuracy,
                                epsilon = record.epsilon,
                                "round committed"
                            );
                            let _ = self.committer.commits.send(CommitNotice {
                                record: record.clone(),
                                version: new_version,
                                weights: self.committer.model.clone(),
                            });
                            queue.extend(self.machine.commit_done(round, new_version, now));
                        }
                        Err(e) => {
                            error!(round = %round, "commit failed, round will be retried: {e}");
                            record.outcome = RoundOutcome::Aborted {
                                reason: format!("commit failed: {e}"),
                            };
                            self.count_round(false);
                            self.store.put_round(&record)?;
                            queue.extend(self.machine.commit_failed(round, now));
                        }
                    }
                    self.write_status();
                }
                Action::Abort {
                    round,
                    reason,
                    stats,
                } => {
                    if let Some(mut s) = self.secagg.take() {
                        s.abort_all(reason.as_str());
                    }
                    if let Some(progress) = self.round.take() {
                        let mut record = progress.record;
                        record.outcome = RoundOutcome::Aborted {
                            reason: reason.as_str().to_owned(),
                        };
                        record.accepted = stats.accepted;
                        record.dropped = stats.dropped;
                        record.ended_unix_ms = Some(unix_ms_now());
                        self.store.put_round(&record)?;
                    }
                    self.count_round(false);
                    self.report_failed(round, reason).await;
                    warn!(
                        round = %round,
                        accepted = stats.accepted,
                        selected = stats.selected,
                        "round aborted: {}",
                        reason.as_str()
                    );
                    self.write_status();
                }
                Action::Finished { version, reason } => {
                    if self.finished.is_none() {
                        self.summary.finish_reason = Some(reason.as_str().to_owned());
                        if let Some(p) = &self.committer.privacy {
                            let spent = p.ledger.epsilon(&p.dp);
                            self.summary.epsilon = Some(spent);
                            if reason == FinishReason::BudgetExhausted {
                                warn!(
                                    epsilon_spent = spent,
                                    epsilon_next = p.ledger.epsilon_after_next(&p.dp),
                                    target = p.dp.target_epsilon.get(),
                                    "privacy budget exhausted: one more round would exceed the target epsilon; stopping the run at {version}"
                                );
                            }
                        }
                    }
                    self.finished.get_or_insert(now);
                    for (_, tx) in self.devices.take_waiting() {
                        let _ = tx.send(Assignment::Finished(version));
                    }
                }
            }
        }
        Ok(())
    }

    /// Hands the dashboard the state only the hub holds.
    pub(super) fn publish(&self) {
        if let Some(up) = &self.upstream {
            up.advertise(self.machine.waiting());
        }
        let secagg = self.secagg.as_ref();
        self.board.publish(crate::operator::dashboard::Live {
            version: self.machine.version().0,
            round: self.machine.current_round().map(|r| r.0),
            phase: self.machine.phase_name(),
            secagg_phase: secagg.map(|s| s.session.phase().as_str()),
            deadline_unix_ms: secagg
                .and_then(SecAggRound::wake)
                .or(self.machine.next_deadline())
                .map(crate::operator::dashboard::live::deadline_unix_ms),
            connected: self.devices.connected_count(),
            selected: usize::try_from(self.metrics.selected.get()).unwrap_or(0),
            reported: self.round.as_ref().map_or(0, |r| r.sum.contributors()),
            federated_evaluations: Default::default(),
        });
    }

    /// A snapshot for `covey-server status` while the database is locked.
    pub(super) fn write_status(&self) {
        match status::Report::from_store(&self.store, false) {
            Ok(report) => {
                if let Err(e) = status::write_snapshot(&self.status_path, &report) {
                    warn!("cannot write status snapshot: {e}");
                }
            }
            Err(e) => warn!("cannot build status snapshot: {e}"),
        }
    }
}
