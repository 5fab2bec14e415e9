//! Federated evaluation: idle devices score versions on their own
//! held-out data; the hub releases only example-weighted means of at least k.

use super::*;

impl Hub {
    /// Sends every idle client the versions to evaluate.
    pub(super) fn start_evaluation(
        &mut self,
        id: u64,
        versions: Vec<u64>,
        timeout_secs: u64,
        now: Instant,
    ) -> Vec<Action<Pseudonym>> {
        let dir = &self.registry.dir;
        let refuse = |error: String| {
            let outcome = EvalOutcome {
                id,
                asked: 0,
                answered: 0,
                clients_with_data: 0,
                examples: 0,
                versions: Vec::new(),
                error: Some(error),
            };
            if let Err(e) = dir.write_eval_outcome(&outcome) {
                warn!("cannot write evaluation outcome: {e}");
            }
        };
        if self.evaluation.is_some() {
            refuse("another evaluation is in progress".into());
            return Vec::new();
        }
        if versions.is_empty() || versions.len() > 4 {
            refuse(format!("evaluate 1 to 4 versions, not {}", versions.len()));
            return Vec::new();
        }
        let mut models = Vec::new();
        for &v in &versions {
            match self.store.model(ModelVersion(v)) {
                Ok(m) => models.push(Arc::new(m.weights)),
                Err(e) => {
                    refuse(e.to_string());
                    return Vec::new();
                }
            }
        }
        if !self.devices.has_waiting() {
            refuse("no idle client is connected to evaluate on".into());
            return Vec::new();
        }
        let versions: Vec<ModelVersion> = versions.into_iter().map(ModelVersion).collect();
        let package = Arc::new(EvalPackage {
            task: EvalTask {
                id,
                spec: self.settings.spec.clone(),
                versions: versions.clone(),
                chunk_len: self.chunk_len,
            },
            models,
        });
        let mut asked = HashSet::new();
        let mut actions = Vec::new();
        for (client, tx) in self.devices.take_waiting() {
            if tx.send(Assignment::Evaluate(package.clone())).is_ok() {
                asked.insert(client);
            }
            // Out of the pool while it evaluates; it checks in again after.
            actions.extend(self.machine.disconnected(client, false, now));
        }
        info!(id, clients = asked.len(), "federated evaluation started");
        self.evaluation = Some(PendingEval {
            id,
            sums: vec![(0.0, 0.0); versions.len()],
            versions,
            asked,
            answered: HashSet::new(),
            clients_with_data: 0,
            examples: 0,
            deadline: now + Duration::from_secs(timeout_secs.clamp(1, 3600)),
        });
        actions
    }

    pub(super) fn eval_report(&mut self, client: Pseudonym, report: EvalReport) {
        let Some(eval) = &mut self.evaluation else {
            return;
        };
        if report.id != eval.id || !eval.asked.contains(&client) || !eval.answered.insert(client) {
            return;
        }
        let usable = report.examples > 0
            && report.results.len() == eval.versions.len()
            && report
                .results
                .iter()
                .all(|m| m.loss.is_finite() && (0.0..=1.0).contains(&m.accuracy));
        if usable {
            let n = report.examples as f64;
            for (sum, m) in eval.sums.iter_mut().zip(&report.results) {
                sum.0 += f64::from(m.loss) * n;
                sum.1 += f64::from(m.accuracy) * n;
            }
            eval.examples += report.examples;
            eval.clients_with_data += 1;
        }
        if eval.answered.len() == eval.asked.len() {
            self.finish_evaluation();
        }
    }

    pub(super) fn finish_evaluation(&mut self) {
        let Some(eval) = self.evaluation.take() else {
            return;
        };
        let n = eval.examples as f64;
        let outcome = EvalOutcome {
            id: eval.id,
            asked: eval.asked.len(),
            answered: eval.answered.len(),
            clients_with_data: eval.clients_with_data,
            examples: eval.examples,
            versions: if eval.examples > 0 {
                eval.versions
                    .iter()
                    .zip(&eval.sums)
                    .map(|(v, (loss, acc))| VersionMetrics {
                        version: v.0,
                        accuracy: acc / n,
                        loss: loss / n,
                    })
                    .collect()
            } else {
                Vec::new()
            },
            error: None,
        };
        // Metrics from fewer than k clients are not released either.
        let outcome = match self.settings.min_cohort.check(eval.clients_with_data) {
            _ if eval.examples == 0 => EvalOutcome {
                error: Some("no client reported held-out data in time".to_owned()),
                ..outcome
            },
            Err(below) => EvalOutcome {
                versions: Vec::new(),
                error: Some(format!("metrics {below}")),
                ..outcome
            },
            Ok(()) => outcome,
        };
        info!(
            id = eval.id,
            answered = outcome.answered,
            "federated evaluation finished"
        );
        self.board.evaluated(outcome.clone());
        if let Err(e) = self.registry.dir.write_eval_outcome(&outcome) {
            warn!("cannot write evaluation outcome: {e}");
        }
    }
}
