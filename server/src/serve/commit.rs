//! The root's half of a round: the current model, the server optimizer's
//! state and the privacy ledger, and the commit that turns a round's
//! aggregate into the next version. Central DP's noise is added here, once,
//! to the whole sum; nothing here sees a single device's update.

use super::*;

pub(super) struct Committer {
    /// The latest committed version's weights.
    pub(super) model: Arc<Vec<f32>>,
    optimizer_state: OptimizerState,
    /// Central or distributed DP: settings, what was spent, the noise source.
    pub(super) privacy: Option<Privacy>,
    /// Held-out data every new version is evaluated on, if configured.
    test_set: Option<Arc<TestSet>>,
    store: Arc<Store>,
    /// Every commit, for whoever follows the run (tests, covey-sim).
    pub(super) commits: tokio::sync::broadcast::Sender<CommitNotice>,
}

pub(super) struct Privacy {
    pub(super) dp: DpSettings,
    pub(super) ledger: PrivacyLedger,
    /// Behind a mutex only so a commit's blocking task can borrow it.
    pub(super) rng: Arc<std::sync::Mutex<NoiseRng>>,
}

impl Committer {
    pub(super) fn new(
        model: Vec<f32>,
        optimizer_state: OptimizerState,
        privacy: Option<Privacy>,
        test_set: Option<Arc<TestSet>>,
        store: Arc<Store>,
    ) -> Self {
        Self {
            model: Arc::new(model),
            optimizer_state,
            privacy,
            test_set,
            store,
            commits: tokio::sync::broadcast::channel(16).0,
        }
    }

    /// The quantizer of ring-word updates: distributed DP's, or secure
    /// aggregation's own when DP is off.
    pub(super) fn ring_quantizer(&self, settings: &Settings) -> Option<Quantizer> {
        match self.privacy.as_ref().map(|p| p.dp.mode) {
            Some(DpMode::Distributed(plan)) => Some(plan.quantizer),
            Some(DpMode::Central { .. }) => None,
            None => settings.secagg.and_then(|sa| sa.noiseless).map(|(_, q)| q),
        }
    }

    /// What the round's task asks of each update: plain, clipped for
    /// central DP, or quantized (and noised) for distributed DP or secure
    /// aggregation.
    pub(super) fn update_privacy(&self, settings: &Settings) -> UpdatePrivacy {
        match &self.privacy {
            None => match settings.secagg.and_then(|sa| sa.noiseless) {
                Some((clip, quantizer)) => UpdatePrivacy::Distributed {
                    clip,
                    quantizer,
                    noise_sigma: 0.0,
                },
                None => UpdatePrivacy::Plain,
            },
            Some(p) => match p.dp.mode {
                DpMode::Central { .. } => UpdatePrivacy::Clipped {
                    clip: p.ledger.clip,
                },
                DpMode::Distributed(plan) => UpdatePrivacy::Distributed {
                    clip: p.ledger.clip,
                    quantizer: plan.quantizer,
                    noise_sigma: plan.client_sigma,
                },
            },
        }
    }

    /// Applies the round's mean update, evaluates the result on the test
    /// set if there is one, and stores the new version with its record.
    pub(super) async fn commit(
        &mut self,
        settings: &Settings,
        sum: Aggregate,
        within_clip: u64,
        mut record: RoundRecord,
        version: ModelVersion,
        round: RoundId,
    ) -> Result<RoundRecord, crate::state::store::StoreError> {
        let corrupt = |e: String| crate::state::store::StoreError::Corrupt(e);
        // Under DP: noise on the sum, a fixed denominator, and the ledger
        // entry that goes into the same transaction as the version.
        let (mean, ledger) = match (&self.privacy, sum) {
            (None, Aggregate::Summed(Summed::Floats(sum))) => match &settings.buffer {
                // FedBuff: the staleness-weighted sum over K, not a mean,
                // so stale updates move the model less.
                Some(buffer) => {
                    let mut total = sum.into_sum().map_err(|e| corrupt(e.to_string()))?;
                    let inv = 1.0 / buffer.size as f32;
                    total.iter_mut().for_each(|v| *v *= inv);
                    (total, None)
                }
                None => (sum.mean().map_err(|e| corrupt(e.to_string()))?, None),
            },
            (Some(p), Aggregate::Summed(Summed::Ring { words, count, .. })) => {
                if count == 0 {
                    return Err(corrupt("no update was aggregated".into()));
                }
                let DpMode::Distributed(plan) = p.dp.mode else {
                    return Err(corrupt("a ring aggregate without distributed DP".into()));
                };
                let (mean, at_risk) =
                    p.dp.decode_sum(&plan, &words)
                        .map_err(|e| corrupt(e.to_string()))?;
                if at_risk > 0 {
                    warn!(
                        round = %round,
                        coordinates = at_risk,
                        "the modular sum came near the ring's edge and may have wrapped: raise privacy.bits or lower the clip"
                    );
                }
                let mut ledger = p.ledger.clone();
                ledger.spend(&p.dp);
                record.epsilon = Some(ledger.epsilon(&p.dp));
                (mean, Some(ledger))
            }
            (Some(p), Aggregate::Summed(Summed::Floats(sum))) => {
                let mut total = sum.into_sum().map_err(|e| corrupt(e.to_string()))?;
                let (dp, clip, rng) = (p.dp, p.ledger.clip, p.rng.clone());
                let mut ledger = p.ledger.clone();
                let (total, ledger) = tokio::task::spawn_blocking(move || {
                    let mut rng = rng.lock().map_err(|_| "noise source poisoned".to_owned())?;
                    dp.privatize(&mut total, clip, &mut rng)
                        .map_err(|e| e.to_string())?;
                    ledger.clip = dp
                        .next_clip(
                            clip,
                            usize::try_from(within_clip).unwrap_or(usize::MAX),
                            &mut rng,
                        )
                        .map_err(|e| e.to_string())?;
                    ledger.spend(&dp);
                    Ok::<_, String>((total, ledger))
                })
                .await
                .map_err(|e| corrupt(format!("noise task: {e}")))?
                .map_err(corrupt)?;
                record.epsilon = Some(ledger.epsilon(&p.dp));
                (total, Some(ledger))
            }
            (None, Aggregate::Buffered { updates, weights }) => {
                let aggregator = settings.aggregator;
                let combined =
                    tokio::task::spawn_blocking(move || aggregator.aggregate(&updates, &weights))
                        .await
                        .map_err(|e| corrupt(format!("aggregation task: {e}")))?
                        .map_err(|e| corrupt(e.to_string()))?;
                (combined, None)
            }
            (None, Aggregate::Summed(Summed::Ring { words, count, .. })) => {
                // Secure aggregation without DP: the survivors' plain mean.
                let Some(quantizer) = self.ring_quantizer(settings).filter(|_| count > 0) else {
                    return Err(corrupt("a ring aggregate without its quantizer".into()));
                };
                let (mut mean, at_risk) = quantizer
                    .decode(&words)
                    .map_err(|e| corrupt(e.to_string()))?;
                if at_risk > 0 {
                    warn!(
                        round = %round,
                        coordinates = at_risk,
                        "the modular sum came near the ring's edge and may have wrapped: raise secure_aggregation.bits or lower its clip"
                    );
                }
                let inv = 1.0 / count as f32;
                mean.iter_mut().for_each(|v| *v *= inv);
                (mean, None)
            }
            (Some(_), Aggregate::Buffered { .. }) => {
                return Err(corrupt(
                    "the round's aggregate does not match its privacy mode".into(),
                ));
            }
        };
        let mut weights = self.model.as_ref().clone();
        let mut state = self.optimizer_state.clone();
        settings.optimizer.apply(&mut state, &mut weights, &mean);
        let spec = settings.spec.clone();
        let model = StoredModel {
            header: ModelHeader {
                version,
                spec: spec.clone(),
                round: Some(round),
                created_unix_ms: unix_ms_now(),
            },
            weights,
        };
        let store = self.store.clone();
        let test_set = self.test_set.clone();
        let (model, state, record, ledger) = tokio::task::spawn_blocking(move || {
            if let Some(test) = test_set {
                match test.evaluate(&spec, &model.weights) {
                    Ok(m) => {
                        record.test_accuracy = Some(m.accuracy);
                        record.test_loss = Some(m.loss);
                    }
                    Err(e) => warn!(version = %version, "central evaluation failed: {e}"),
                }
            }
            store.commit_round(&model, &record, &state, ledger.as_ref())?;
            Ok::<_, crate::state::store::StoreError>((model, state, record, ledger))
        })
        .await
        .map_err(|e| crate::state::store::StoreError::Corrupt(format!("commit task: {e}")))??;
        self.model = Arc::new(model.weights);
        self.optimizer_state = state;
        if let (Some(p), Some(ledger)) = (&mut self.privacy, ledger) {
            p.ledger = ledger;
        }
        purge(&self.store, settings.retention)?;
        Ok(record)
    }
}
