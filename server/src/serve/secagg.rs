//! The hub's side of secure aggregation: each phase's messages, its
//! deadline, and unmasking the sum once the survivors' shares are in.

use super::*;

/// Secure aggregation of the round in progress: the session, the clients
/// waiting for the current phase to close, and the commit it holds back.
pub(super) struct SecAggRound {
    pub(super) round: RoundId,
    /// When the current phase opened, for its timing.
    pub(super) phase_started: Instant,
    pub(super) session: Session<Pseudonym>,
    pub(super) waiters: HashMap<Pseudonym, oneshot::Sender<SecAggMessage>>,
    /// When the current phase stops waiting for stragglers.
    pub(super) deadline: Instant,
    /// How long each key phase and the unmask phase wait.
    pub(super) phase_timeout: Duration,
    pub(super) requests: HashMap<Pseudonym, UnmaskRequest>,
    /// The coordinator's commit, held until the masks are removed.
    pub(super) commit: Option<(ModelVersion, ModelVersion, RoundStats)>,
}

impl SecAggRound {
    pub(super) fn abort_all(&mut self, reason: &str) {
        abort_waiters(self.round, self.waiters.drain().map(|(_, tx)| tx), reason);
    }

    /// When the hub must look at the session again. Masked input has no
    /// deadline of its own: the round's deadline (the coordinator's) ends it.
    pub(super) fn wake(&self) -> Option<Instant> {
        (self.session.phase() != SecAggPhase::MaskedInput).then_some(self.deadline)
    }
}

/// Tells clients waiting on a secure-aggregation phase that it will not close.
fn abort_waiters(
    round: RoundId,
    waiters: impl IntoIterator<Item = oneshot::Sender<SecAggMessage>>,
    reason: &str,
) {
    for tx in waiters {
        let _ = tx.send(SecAggMessage::Aborted {
            round,
            reason: reason.to_owned(),
        });
    }
}

impl Hub {
    /// A secure-aggregation request: answered now, or when its phase closes.
    pub(super) async fn secagg_message(
        &mut self,
        client: Pseudonym,
        message: SecAggMessage,
        certificate: &[u8],
        reply: oneshot::Sender<SecAggMessage>,
        now: Instant,
        shared: &Shared,
    ) -> Result<(), ServeError> {
        let Some(s) = &mut self.secagg else {
            let _ = reply.send(SecAggMessage::Aborted {
                round: RoundId(0),
                reason: "no secure aggregation is in progress".into(),
            });
            return Ok(());
        };
        let round = s.round;
        let refused = |reply: oneshot::Sender<SecAggMessage>, reason: String| {
            let _ = reply.send(SecAggMessage::Aborted { round, reason });
        };
        let result = match message {
            SecAggMessage::Advertise(ad) => s.session.advertise(client, ad, certificate),
            SecAggMessage::ShareKeys(shares) => s.session.share_keys(client, shares),
            SecAggMessage::AwaitUnmask { round: r } if r == round => {
                match s.requests.get(&client) {
                    Some(request) => {
                        let _ = reply.send(SecAggMessage::UnmaskRequest(request.clone()));
                    }
                    None if s.session.phase() == SecAggPhase::MaskedInput => {
                        s.waiters.insert(client, reply);
                    }
                    None => refused(reply, "not asked to unmask".into()),
                }
                return Ok(());
            }
            SecAggMessage::UnmaskShares(shares) => {
                debug!(client = %client, pending = s.session.pending(), "unmask shares");
                match s.session.unmask(client, shares) {
                    Ok(()) => {
                        let _ = reply.send(SecAggMessage::Done { round });
                    }
                    Err(e) => {
                        warn!(client = %client, "refused unmask shares: {e}");
                        refused(reply, e.to_string());
                    }
                }
                return self.advance_secagg(shared).await;
            }
            _ => {
                refused(
                    reply,
                    "this message does not start a secure-aggregation step".into(),
                );
                return Ok(());
            }
        };
        match result {
            Ok(()) => {
                s.waiters.insert(client, reply);
            }
            Err(e) => {
                warn!(client = %client, "secure aggregation refused a message: {e}");
                refused(reply, e.to_string());
                s.session.drop_member(client);
                let actions = self.machine.drop_member(client, round, now);
                self.execute(actions, shared).await?;
            }
        }
        self.advance_secagg(shared).await
    }

    /// Closes the current key or unmask phase once nobody is pending or
    /// its deadline passed, and answers the clients waiting on it.
    pub(super) async fn advance_secagg(&mut self, shared: &Shared) -> Result<(), ServeError> {
        loop {
            let now = Instant::now();
            let Some(s) = &mut self.secagg else {
                return Ok(());
            };
            let phase = s.session.phase();
            let due = s.session.pending() == 0 || s.wake().is_some_and(|at| now >= at);
            if !due || phase == SecAggPhase::MaskedInput {
                return Ok(());
            }
            let round = s.round;
            let timeout = s.phase_timeout;
            let answers: Result<HashMap<Pseudonym, SecAggMessage>, SessionAbort> = match phase {
                SecAggPhase::Advertise => s.session.close_advertise().map(|r| {
                    r.into_iter()
                        .map(|(c, m)| (c, SecAggMessage::Roster(m)))
                        .collect()
                }),
                SecAggPhase::Share => s.session.close_share().map(|r| {
                    r.into_iter()
                        .map(|(c, m)| (c, SecAggMessage::IncomingShares(m)))
                        .collect()
                }),
                SecAggPhase::Unmask | SecAggPhase::Closed => {
                    return self.finish_unmask(shared).await;
                }
                SecAggPhase::MaskedInput => return Ok(()),
            };
            match answers {
                Ok(mut answers) => {
                    s.deadline = now + timeout;
                    self.metrics.observe_phase(
                        phase.as_str(),
                        now.saturating_duration_since(s.phase_started),
                    );
                    s.phase_started = now;
                    debug!(round = %round, phase = phase.as_str(), members = answers.len(), "secure aggregation phase closed");
                    let answered: HashSet<Pseudonym> = answers.keys().copied().collect();
                    for (client, tx) in s.waiters.drain() {
                        if let Some(m) = answers.remove(&client) {
                            let _ = tx.send(m);
                        }
                    }
                    // Members that missed the phase can no longer submit.
                    let missed: Vec<Pseudonym> = s
                        .session
                        .cohort()
                        .filter(|c| !answered.contains(c))
                        .copied()
                        .collect();
                    let mut actions = Vec::new();
                    for client in missed {
                        actions.extend(self.machine.drop_member(client, round, now));
                    }
                    self.execute(actions, shared).await?;
                }
                Err(abort) => {
                    warn!(round = %round, "secure aggregation aborted the round: {abort}");
                    s.abort_all(&abort.to_string());
                    let actions =
                        self.machine
                            .abort_round(round, AbortReason::SecureAggregation, now);
                    self.execute(actions, shared).await?;
                    self.secagg = None;
                    return Ok(());
                }
            }
        }
    }

    /// The coordinator closed the round: ask every member with masked
    /// input for its shares. The commit waits for them.
    pub(super) fn begin_unmask(
        &mut self,
        now: Instant,
    ) -> Result<Vec<Action<Pseudonym>>, ServeError> {
        let Some(s) = &mut self.secagg else {
            return Ok(Vec::new());
        };
        let timeout = s.phase_timeout;
        match s.session.close_masked_input() {
            Ok(requests) => {
                s.deadline = now + timeout;
                self.metrics.observe_phase(
                    SecAggPhase::MaskedInput.as_str(),
                    now.saturating_duration_since(s.phase_started),
                );
                s.phase_started = now;
                s.requests = requests.into_iter().collect();
                for (client, tx) in s.waiters.drain() {
                    let _ = tx.send(match s.requests.get(&client) {
                        Some(r) => SecAggMessage::UnmaskRequest(r.clone()),
                        None => SecAggMessage::Aborted {
                            round: s.round,
                            reason: "no masked input from this client".into(),
                        },
                    });
                }
                Ok(Vec::new())
            }
            Err(abort) => match self.secagg.take() {
                Some(s) => self.unmask_failed(s.round, s.waiters, &abort, now),
                None => Ok(Vec::new()),
            },
        }
    }

    /// Removes the masks from the sum, then commits as any round does.
    pub(super) async fn finish_unmask(&mut self, shared: &Shared) -> Result<(), ServeError> {
        if self.secagg.as_ref().is_none_or(|s| s.commit.is_none()) {
            return Ok(());
        }
        let Some(SecAggRound {
            round,
            session,
            waiters,
            commit: Some((base, new_version, stats)),
            phase_started,
            ..
        }) = self.secagg.take()
        else {
            return Ok(());
        };
        let now = Instant::now();
        let started = Instant::now();
        let finished = tokio::task::spawn_blocking(move || session.finish())
            .await
            .map_err(|e| ServeError::Internal(format!("unmasking panicked: {e}")))?;
        match finished {
            Ok((sum, count)) => {
                self.metrics.observe_phase(
                    SecAggPhase::Unmask.as_str(),
                    now.saturating_duration_since(phase_started) + started.elapsed(),
                );
                info!(
                    round = %round,
                    survivors = count,
                    unmask_ms = started.elapsed().as_millis() as u64,
                    "secure aggregation unmasked the sum"
                );
                if let Some(progress) = &mut self.round
                    && let Aggregate::Summed(Summed::Ring {
                        words, count: c, ..
                    }) = &mut progress.sum
                {
                    *words = sum;
                    *c = count as u64;
                }
                self.execute(
                    vec![Action::Commit {
                        round,
                        base,
                        new_version,
                        stats,
                    }],
                    shared,
                )
                .await
            }
            Err(abort) => {
                let actions = self.unmask_failed(round, waiters, &abort, now)?;
                self.execute(actions, shared).await
            }
        }
    }

    /// Unmasking could not complete: nothing is released, the round is
    /// recorded as aborted, and the next one starts.
    pub(super) fn unmask_failed(
        &mut self,
        round: RoundId,
        waiters: HashMap<Pseudonym, oneshot::Sender<SecAggMessage>>,
        abort: &SessionAbort,
        now: Instant,
    ) -> Result<Vec<Action<Pseudonym>>, ServeError> {
        warn!(round = %round, "secure aggregation aborted the round: {abort}");
        abort_waiters(round, waiters.into_values(), &abort.to_string());
        if let Some(progress) = self.round.take() {
            let mut record = progress.record;
            record.outcome = RoundOutcome::Aborted {
                reason: format!("secure aggregation: {abort}"),
            };
            record.ended_unix_ms = Some(unix_ms_now());
            self.store.put_round(&record)?;
        }
        self.count_round(false);
        self.write_status();
        Ok(self.machine.commit_failed(round, now))
    }
}
