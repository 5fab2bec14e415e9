//! `covey-server status`: rounds, versions and enrolled clients.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::state::store::{RoundOutcome, RoundRecord, Store, StoreError};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub current_version: u64,
    pub architecture: String,
    pub parameters: usize,
    pub stored_versions: Vec<u64>,
    pub rounds: Vec<RoundLine>,
    pub clients: Vec<ClientLine>,
    /// ε spent by the run, when it trains under central DP.
    pub epsilon_spent: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundLine {
    pub round: u64,
    pub base_version: u64,
    pub outcome: String,
    pub committed_version: Option<u64>,
    pub selected: usize,
    pub accepted: usize,
    pub dropped: usize,
    pub seconds: Option<f64>,
    pub mean_client_loss: Option<f32>,
    pub test_accuracy: Option<f32>,
    pub test_loss: Option<f32>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub clip: Option<f64>,
    /// ε spent by the run up to and including this round.
    pub epsilon: Option<f64>,
    /// Updates refused while the round ran, by reason.
    pub rejected: std::collections::BTreeMap<String, u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientLine {
    pub pseudonym: String,
    /// Only when read from the database by the operator; snapshots on disk
    /// carry pseudonyms alone.
    pub name: Option<String>,
    pub state: String,
    pub expires_unix: i64,
}

impl RoundLine {
    pub fn from_record(r: &RoundRecord) -> Self {
        let (outcome, committed_version) = match &r.outcome {
            RoundOutcome::InFlight => ("in flight".to_owned(), None),
            RoundOutcome::Committed { version } => ("committed".to_owned(), Some(version.0)),
            RoundOutcome::Aborted { reason } => (format!("aborted: {reason}"), None),
            RoundOutcome::Abandoned => ("abandoned (server stopped)".to_owned(), None),
        };
        Self {
            round: r.round.0,
            base_version: r.base.0,
            outcome,
            committed_version,
            selected: r.selected,
            accepted: r.accepted,
            dropped: r.dropped,
            seconds: r
                .ended_unix_ms
                .map(|end| end.saturating_sub(r.started_unix_ms) as f64 / 1000.0),
            mean_client_loss: r.mean_client_loss,
            test_accuracy: r.test_accuracy,
            test_loss: r.test_loss,
            bytes_up: r.bytes_up,
            bytes_down: r.bytes_down,
            clip: r.clip,
            epsilon: r.epsilon,
            rejected: r.rejected.clone(),
        }
    }
}

impl Report {
    pub fn from_store(store: &Store, with_names: bool) -> Result<Self, StoreError> {
        let spec = store.spec()?;
        let rounds = store.rounds()?;
        // The last committed round's figure is the run's: ε only grows.
        let epsilon_spent = rounds.iter().rev().find_map(|r| match r.outcome {
            RoundOutcome::Committed { .. } => r.epsilon,
            _ => None,
        });
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        Ok(Self {
            current_version: store.current_version()?.0,
            architecture: spec.to_string(),
            parameters: spec.param_count(),
            stored_versions: store.versions()?.into_iter().map(|v| v.0).collect(),
            epsilon_spent,
            rounds: rounds
                .into_iter()
                .map(|r| RoundLine::from_record(&r))
                .collect(),
            clients: store
                .enrollments()?
                .into_iter()
                .map(|e| ClientLine {
                    pseudonym: e.pseudonym.to_string(),
                    name: with_names.then(|| e.name.clone()),
                    state: if e.revoked_unix.is_some() {
                        "revoked".into()
                    } else if e.not_after_unix <= now {
                        "expired".into()
                    } else {
                        "active".into()
                    },
                    expires_unix: e.not_after_unix,
                })
                .collect(),
        })
    }

    pub fn render_text(&self) -> String {
        let mut out = format!(
            "model: {} ({} parameters)\ncurrent version: {}\nstored versions: {}\n\nrounds:\n",
            self.architecture,
            self.parameters,
            self.current_version,
            self.stored_versions.len()
        );
        if let Some(eps) = self.epsilon_spent {
            out.insert_str(0, &format!("privacy: central DP, epsilon spent {eps:.4}\n"));
        }
        if self.rounds.is_empty() {
            out.push_str("  (none yet)\n");
        }
        for r in &self.rounds {
            out.push_str(&format!(
                "  round {:>4}  base v{:<4} {:<28} selected {:>3}  accepted {:>3}  dropped {:>3}{}{}{}{}{}\n",
                r.round,
                r.base_version,
                match r.committed_version {
                    Some(v) => format!("committed v{v}"),
                    None => r.outcome.clone(),
                },
                r.selected,
                r.accepted,
                r.dropped,
                r.seconds.map(|s| format!("  {s:.1}s")).unwrap_or_default(),
                r.mean_client_loss
                    .map(|l| format!("  client loss {l:.4}"))
                    .unwrap_or_default(),
                r.test_accuracy
                    .zip(r.test_loss)
                    .map(|(a, l)| format!("  test accuracy {a:.4} loss {l:.4}"))
                    .unwrap_or_default(),
                r.epsilon
                    .map(|e| format!("  epsilon {e:.4}"))
                    .unwrap_or_default(),
                if r.rejected.is_empty() {
                    String::new()
                } else {
                    let reasons: Vec<String> =
                        r.rejected.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                    format!("  rejected ({})", reasons.join(", "))
                }
            ));
        }
        out.push_str("\nclients:\n");
        if self.clients.is_empty() {
            out.push_str("  (none enrolled)\n");
        }
        for c in &self.clients {
            out.push_str(&format!(
                "  {}  {:<8} {}\n",
                c.pseudonym,
                c.state,
                c.name.as_deref().unwrap_or("")
            ));
        }
        out
    }
}

/// Writes `report` atomically (temporary file, then rename).
pub fn write_snapshot(path: &Path, report: &Report) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(report).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

pub fn read_snapshot(path: &Path) -> std::io::Result<Report> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(std::io::Error::other)
}
