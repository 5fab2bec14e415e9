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
        crate::rounds::release::ring_quantizer(settings)
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
        let (mean, ledger) = crate::rounds::release::mean_update(
            settings,
            self.privacy.as_ref(),
            self.ring_quantizer(settings),
            sum,
            within_clip,
            round,
        )
        .await
        .map_err(|e| crate::state::store::StoreError::Corrupt(e.to_string()))?;
        if let (Some(p), Some(ledger)) = (&self.privacy, &ledger) {
            record.epsilon = Some(ledger.epsilon(&p.dp));
        }
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
