//! The auditor's compliance report, as JSON and as a self-contained HTML
//! page with SVG plots: privacy mode and budget, ε per round, cohorts
//! against k, retention, enrollments, and a fresh verification of the
//! audit trail against its public key.

use std::{fmt::Write as _, fs, path::Path};

use plotters::prelude::*;
use serde::Serialize;

use crate::{
    config::ConfigError,
    config::{ServerConfig, Settings},
    dir::{DirError, StateDir},
    rounds::dp::DpMode,
    state::audit::{self, AuditEvent},
    state::sealing::KekSource,
    state::store::{RoundOutcome, Store, StoreError},
};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Dir(#[from] DirError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("drawing the {0} plot: {1}")]
    Plot(&'static str, String),
}

/// Writes `report.json` and `report.html` into `out` (created if
/// needed); returns the report.
pub fn write(dir: &StateDir, store: &Store, out: &Path) -> Result<ComplianceReport, ReportError> {
    let config = dir.config()?;
    let settings = config.settings()?;
    let report = ComplianceReport::build(store, &config, &settings)?;
    let html = report.to_html()?;
    fs::create_dir_all(out).map_err(crate::dir::io_err(out))?;
    crate::dir::write_file(&out.join("report.json"), report.to_json().as_bytes(), false)?;
    crate::dir::write_file(&out.join("report.html"), html.as_bytes(), false)?;
    Ok(report)
}

#[derive(Clone, Debug, Serialize)]
pub struct ComplianceReport {
    pub generated_unix: i64,
    pub server_version: String,
    pub model: ModelSection,
    pub privacy: PrivacySection,
    pub rounds: Vec<RoundEntry>,
    pub cohorts: CohortSection,
    pub retention: RetentionSection,
    pub storage: StorageSection,
    pub enrollments: EnrollmentSection,
    pub audit: AuditSection,
}

#[derive(Clone, Debug, Serialize)]
pub struct ModelSection {
    pub architecture: String,
    pub parameters: usize,
    pub current_version: u64,
    pub stored_versions: Vec<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PrivacySection {
    /// off, central or distributed.
    pub mode: String,
    pub secure_aggregation: bool,
    pub target_epsilon: Option<f64>,
    pub delta: Option<f64>,
    pub noise_multiplier: Option<f64>,
    pub sampling_rate: Option<f64>,
    pub clip: Option<f64>,
    pub accountant: Option<String>,
    /// ε spent by the run, at δ, after its last committed round.
    pub epsilon_spent: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RoundEntry {
    pub round: u64,
    /// committed, aborted or abandoned.
    pub outcome: String,
    pub reason: Option<String>,
    pub version: Option<u64>,
    pub selected: usize,
    pub cohort: usize,
    /// ε this round added, and the run's total after it.
    pub epsilon_round: Option<f64>,
    pub epsilon_cumulative: Option<f64>,
    pub test_accuracy: Option<f32>,
    pub ended_unix_ms: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CohortSection {
    pub k: usize,
    pub committed_rounds: usize,
    pub smallest_committed_cohort: Option<usize>,
    /// Must be zero: models released from fewer than k participants.
    pub committed_below_k: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct RetentionSection {
    /// None: kept forever.
    pub round_records_days: Option<f64>,
    pub model_versions: Option<usize>,
    pub audit_trail: String,
    pub purges: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct StorageSection {
    pub encrypted_at_rest: String,
    /// file or env; the path or variable itself is not reported.
    pub key_encryption_key: String,
    pub key_rotations: usize,
    pub individual_updates_stored: bool,
    pub ip_addresses_stored: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct EnrollmentSection {
    /// From the registry now.
    pub active: usize,
    pub revoked: usize,
    pub expired: usize,
    /// From the audit trail, over the run's whole life.
    pub enrolled_total: usize,
    pub revoked_total: usize,
    pub forgotten_total: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct AuditSection {
    pub valid: bool,
    pub entries: u64,
    /// Keep it: a later trail must contain it (`audit verify --checkpoint`).
    pub head: Option<String>,
    pub problem: Option<String>,
    pub public_key: String,
}

impl ComplianceReport {
    /// Builds the report. Verifying the trail exports it, which the trail
    /// records, so the report itself is on the record.
    pub fn build(
        store: &Store,
        config: &ServerConfig,
        settings: &Settings,
    ) -> Result<Self, ReportError> {
        let spec = store.spec()?;
        let records = store.rounds()?;
        let mut trail = Vec::new();
        store.export_audit(&mut trail)?;
        let key_text = store.audit_public_key()?;
        let key = audit::parse_public_key(&key_text).map_err(StoreError::from)?;
        let audit = match audit::verify_export(trail.as_slice(), &key, &[]) {
            Ok(v) => (
                AuditSection {
                    valid: true,
                    entries: v.entries,
                    head: Some(v.head.to_string()),
                    problem: None,
                    public_key: key_text.trim().to_owned(),
                },
                v.events.into_iter().map(|e| e.event).collect(),
            ),
            Err(e) => (
                AuditSection {
                    valid: false,
                    entries: 0,
                    head: None,
                    problem: Some(e.to_string()),
                    public_key: key_text.trim().to_owned(),
                },
                Vec::new(),
            ),
        };
        let (audit, events): (AuditSection, Vec<AuditEvent>) = audit;
        let count = |f: fn(&AuditEvent) -> bool| events.iter().filter(|e| f(e)).count();

        let k = settings.min_cohort.get();
        let mut previous_epsilon = 0.0;
        let rounds: Vec<RoundEntry> = records
            .iter()
            .map(|r| {
                let (outcome, reason, version) = match &r.outcome {
                    RoundOutcome::InFlight => ("in flight", None, None),
                    RoundOutcome::Committed { version } => ("committed", None, Some(version.0)),
                    RoundOutcome::Aborted { reason } => ("aborted", Some(reason.clone()), None),
                    RoundOutcome::Abandoned => ("abandoned", None, None),
                };
                let epsilon_round = r.epsilon.map(|e| {
                    let step = e - previous_epsilon;
                    previous_epsilon = e;
                    step
                });
                RoundEntry {
                    round: r.round.0,
                    outcome: outcome.into(),
                    reason,
                    version,
                    selected: r.selected,
                    cohort: r.accepted,
                    epsilon_round,
                    epsilon_cumulative: r.epsilon,
                    test_accuracy: r.test_accuracy,
                    ended_unix_ms: r.ended_unix_ms,
                }
            })
            .collect();
        let committed: Vec<&RoundEntry> =
            rounds.iter().filter(|r| r.outcome == "committed").collect();

        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let registry = store.enrollments()?;
        let privacy = match &settings.dp {
            None => PrivacySection {
                mode: "off".into(),
                secure_aggregation: settings.secagg.is_some(),
                target_epsilon: None,
                delta: None,
                noise_multiplier: None,
                sampling_rate: None,
                clip: None,
                accountant: None,
                epsilon_spent: None,
            },
            Some(dp) => PrivacySection {
                mode: match dp.mode {
                    DpMode::Central { .. } => "central".into(),
                    DpMode::Distributed(_) => "distributed".into(),
                },
                secure_aggregation: settings.secagg.is_some(),
                target_epsilon: Some(dp.target_epsilon.get()),
                delta: Some(dp.delta.get()),
                noise_multiplier: Some(dp.noise_multiplier.get()),
                sampling_rate: Some(dp.sampling_rate.get()),
                clip: Some(dp.initial_clip.get()),
                accountant: Some(match dp.mode {
                    DpMode::Central { .. } => {
                        "RDP, Poisson-subsampled Gaussian (Mironov et al. 2019), improved conversion"
                            .into()
                    }
                    DpMode::Distributed(_) => {
                        "zCDP, sum of discrete Gaussians (Kairouz et al. 2021)".into()
                    }
                }),
                epsilon_spent: committed.iter().rev().find_map(|r| r.epsilon_cumulative),
            },
        };
        let retention = settings.retention;
        Ok(Self {
            generated_unix: now,
            server_version: env!("CARGO_PKG_VERSION").into(),
            model: ModelSection {
                architecture: spec.to_string(),
                parameters: spec.param_count(),
                current_version: store.current_version()?.0,
                stored_versions: store.versions()?.into_iter().map(|v| v.0).collect(),
            },
            privacy,
            cohorts: CohortSection {
                k,
                committed_rounds: committed.len(),
                smallest_committed_cohort: committed.iter().map(|r| r.cohort).min(),
                committed_below_k: committed.iter().filter(|r| r.cohort < k).count(),
            },
            rounds,
            retention: RetentionSection {
                round_records_days: retention.rounds.map(|d| d.as_secs_f64() / 86_400.0),
                model_versions: retention.versions.map(|v| v.get()),
                audit_trail: "kept whole (pseudonyms only)".into(),
                purges: count(|e| matches!(e, AuditEvent::Purged { .. })),
            },
            storage: StorageSection {
                encrypted_at_rest: "AES-256-GCM, every stored value".into(),
                key_encryption_key: match config.storage.kek_source() {
                    Ok(KekSource::File(_)) => "file".into(),
                    Ok(KekSource::Env(_)) => "environment variable".into(),
                    Err(_) => "invalid".into(),
                },
                key_rotations: count(|e| matches!(e, AuditEvent::KeyRotated)),
                individual_updates_stored: false,
                ip_addresses_stored: false,
            },
            enrollments: EnrollmentSection {
                active: registry
                    .iter()
                    .filter(|e| e.revoked_unix.is_none() && e.not_after_unix > now)
                    .count(),
                revoked: registry.iter().filter(|e| e.revoked_unix.is_some()).count(),
                expired: registry
                    .iter()
                    .filter(|e| e.revoked_unix.is_none() && e.not_after_unix <= now)
                    .count(),
                enrolled_total: count(|e| matches!(e, AuditEvent::Enrolled { .. })),
                revoked_total: count(|e| matches!(e, AuditEvent::Revoked { .. })),
                forgotten_total: count(|e| matches!(e, AuditEvent::Forgotten { .. })),
            },
            audit,
        })
    }

    pub fn to_json(&self) -> String {
        // Plain data with string keys always serializes.
        serde_json::to_string_pretty(self).expect("the report serializes")
    }

    /// The HTML page, with its three plots inline as SVG.
    pub fn to_html(&self) -> Result<String, ReportError> {
        let committed: Vec<&RoundEntry> = self
            .rounds
            .iter()
            .filter(|r| r.outcome == "committed")
            .collect();
        let accuracy: Vec<(f64, f64)> = committed
            .iter()
            .filter_map(|r| r.test_accuracy.map(|a| (r.round as f64, f64::from(a))))
            .collect();
        let epsilon: Vec<(f64, f64)> = committed
            .iter()
            .filter_map(|r| r.epsilon_cumulative.map(|e| (r.round as f64, e)))
            .collect();
        let cohorts: Vec<(f64, f64)> = self
            .rounds
            .iter()
            .map(|r| (r.round as f64, r.cohort as f64))
            .collect();
        let accuracy_plot = line_chart(
            "accuracy",
            "Test accuracy of each committed version",
            "accuracy",
            &accuracy,
            None,
            &BLUE,
            Some(1.0),
        )?;
        let epsilon_plot = line_chart(
            "epsilon",
            "Cumulative privacy loss ε",
            "ε",
            &epsilon,
            self.privacy.target_epsilon.map(|t| (t, "target ε")),
            &RED,
            None,
        )?;
        let cohort_plot = line_chart(
            "cohort",
            "Cohort size per round",
            "participants",
            &cohorts,
            Some((self.cohorts.k as f64, "k")),
            &GREEN,
            None,
        )?;

        let mut h = String::new();
        let p = &self.privacy;
        let opt = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.4}"));
        let _ = write!(
            h,
            r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Covey compliance report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
.ok {{ color: #17692e; font-weight: bold; }} .bad {{ color: #b00020; font-weight: bold; }}
figure {{ margin: 1em 0; }}
</style></head><body>
<h1>Covey compliance report</h1>
<p>Generated {generated}, covey-server {version}. Every participant appears under a
keyed pseudonym only; no IP address and no individual update is stored.</p>
<h2>Audit trail</h2>
<p class="{audit_class}">{audit_verdict}</p>
<table><tr><th>entries</th><td>{entries}</td></tr><tr><th>head (keep as a checkpoint)</th><td><code>{head}</code></td></tr>
<tr><th>public key</th><td><code>{key}</code></td></tr></table>
<h2>Privacy</h2>
<table><tr><th>mode</th><td>{mode}</td></tr><tr><th>secure aggregation</th><td>{secagg}</td></tr>
<tr><th>target ε / δ</th><td>{target} / {delta}</td></tr><tr><th>noise multiplier z</th><td>{z}</td></tr>
<tr><th>sampling rate q</th><td>{q}</td></tr><tr><th>clip</th><td>{clip}</td></tr>
<tr><th>accountant</th><td>{accountant}</td></tr><tr><th>ε spent</th><td>{spent}</td></tr></table>
<figure>{epsilon_plot}</figure>
<h2>Cohorts against k = {k}</h2>
<p class="{cohort_class}">{committed_below_k} of {committed_rounds} committed rounds released a model from fewer than k participants (smallest committed cohort: {smallest}).</p>
<figure>{cohort_plot}</figure>
<h2>Model quality</h2>
<p>{architecture}, {parameters} parameters, current version {current}; stored versions: {stored}.</p>
<figure>{accuracy_plot}</figure>
<h2>Retention and storage</h2>
<table><tr><th>round records</th><td>{keep_rounds}</td></tr><tr><th>model versions</th><td>{keep_versions}</td></tr>
<tr><th>audit trail</th><td>{audit_retention}</td></tr><tr><th>purges recorded</th><td>{purges}</td></tr>
<tr><th>encryption at rest</th><td>{at_rest}; key-encryption key from a {kek}; {rotations} rotation(s)</td></tr></table>
<h2>Enrollments</h2>
<table><tr><th>active</th><td>{active}</td></tr><tr><th>revoked</th><td>{revoked}</td></tr><tr><th>expired</th><td>{expired}</td></tr>
<tr><th>enrolled / revoked / forgotten over the run's life</th><td>{enrolled_total} / {revoked_total} / {forgotten_total}</td></tr></table>
<h2>Rounds</h2>
<table><tr><th>round</th><th>outcome</th><th>version</th><th>selected</th><th>cohort</th><th>ε this round</th><th>ε total</th><th>accuracy</th></tr>
"#,
            generated = utc(self.generated_unix),
            version = escape(&self.server_version),
            audit_class = if self.audit.valid { "ok" } else { "bad" },
            audit_verdict = if self.audit.valid {
                "Verified: the hash chain and every signature are intact.".to_owned()
            } else {
                format!(
                    "NOT VERIFIED: {}",
                    escape(self.audit.problem.as_deref().unwrap_or("unknown problem"))
                )
            },
            entries = self.audit.entries,
            head = escape(self.audit.head.as_deref().unwrap_or("–")),
            key = escape(&self.audit.public_key),
            mode = escape(&p.mode),
            secagg = if p.secure_aggregation { "on" } else { "off" },
            target = opt(p.target_epsilon),
            delta = p.delta.map_or("–".to_owned(), |d| format!("{d:e}")),
            z = opt(p.noise_multiplier),
            q = opt(p.sampling_rate),
            clip = opt(p.clip),
            accountant = escape(p.accountant.as_deref().unwrap_or("–")),
            spent = opt(p.epsilon_spent),
            k = self.cohorts.k,
            cohort_class = if self.cohorts.committed_below_k == 0 {
                "ok"
            } else {
                "bad"
            },
            committed_below_k = self.cohorts.committed_below_k,
            committed_rounds = self.cohorts.committed_rounds,
            smallest = self
                .cohorts
                .smallest_committed_cohort
                .map_or("–".to_owned(), |c| c.to_string()),
            architecture = escape(&self.model.architecture),
            parameters = self.model.parameters,
            current = self.model.current_version,
            stored = self
                .model
                .stored_versions
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            keep_rounds = self
                .retention
                .round_records_days
                .map_or("kept forever".to_owned(), |d| format!("{d} days")),
            keep_versions = self
                .retention
                .model_versions
                .map_or("all kept".to_owned(), |v| format!("newest {v}")),
            audit_retention = escape(&self.retention.audit_trail),
            purges = self.retention.purges,
            at_rest = escape(&self.storage.encrypted_at_rest),
            kek = escape(&self.storage.key_encryption_key),
            rotations = self.storage.key_rotations,
            active = self.enrollments.active,
            revoked = self.enrollments.revoked,
            expired = self.enrollments.expired,
            enrolled_total = self.enrollments.enrolled_total,
            revoked_total = self.enrollments.revoked_total,
            forgotten_total = self.enrollments.forgotten_total,
        );
        for r in &self.rounds {
            let outcome = match &r.reason {
                Some(reason) => format!("{}: {}", r.outcome, reason),
                None => r.outcome.clone(),
            };
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                r.round,
                escape(&outcome),
                r.version.map_or("–".to_owned(), |v| v.to_string()),
                r.selected,
                r.cohort,
                opt(r.epsilon_round),
                opt(r.epsilon_cumulative),
                r.test_accuracy
                    .map_or("–".to_owned(), |a| format!("{a:.4}")),
            );
        }
        h.push_str("</table>\n</body></html>\n");
        Ok(h)
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One series over rounds, with an optional horizontal reference line.
fn line_chart(
    name: &'static str,
    title: &str,
    y_label: &str,
    points: &[(f64, f64)],
    reference: Option<(f64, &str)>,
    color: &RGBColor,
    fixed_top: Option<f64>,
) -> Result<String, ReportError> {
    let fail = |e: &dyn std::fmt::Display| ReportError::Plot(name, e.to_string());
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (720, 300)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(&e))?;
        let x_max = points.iter().map(|p| p.0).fold(1.0, f64::max);
        let y_max = points
            .iter()
            .map(|p| p.1)
            .chain(reference.map(|r| r.0))
            .fold(0.0, f64::max);
        let y_top = match fixed_top {
            Some(top) => top,
            None if y_max > 0.0 => y_max * 1.1,
            None => 1.0,
        };
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..x_max + 0.5, 0.0..y_top)
            .map_err(|e| fail(&e))?;
        // Rounds are whole numbers: label those ticks alone.
        let round_label = |x: &f64| {
            if x.fract() == 0.0 {
                format!("{x:.0}")
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .x_labels(((x_max as usize) + 1).min(12))
            .x_label_formatter(&round_label)
            .x_desc("round")
            .y_desc(y_label)
            .draw()
            .map_err(|e| fail(&e))?;
        if points.is_empty() {
            chart
                .draw_series(std::iter::once(Text::new(
                    "no data for this run",
                    (x_max / 3.0, y_top / 2.0),
                    ("sans-serif", 16),
                )))
                .map_err(|e| fail(&e))?;
        } else {
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| fail(&e))?;
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| fail(&e))?;
        }
        if let Some((y, label)) = reference {
            chart
                .draw_series(LineSeries::new(
                    [(0.0, y), (x_max + 0.5, y)],
                    BLACK.mix(0.6).stroke_width(1),
                ))
                .map_err(|e| fail(&e))?
                .label(label);
            chart
                .draw_series(std::iter::once(Text::new(
                    label.to_owned(),
                    (0.1, y),
                    ("sans-serif", 14),
                )))
                .map_err(|e| fail(&e))?;
        }
        root.present().map_err(|e| fail(&e))?;
    }
    Ok(svg)
}

/// `unix` seconds as UTC ISO 8601 (`2026-12-07T07:38:25Z`); the raw number
/// when it is out of the calendar's range.
pub fn utc(unix: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("unix time {unix}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_times_are_utc_iso_8601() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_796_226_969), "2026-12-02T15:56:09Z");
        assert_eq!(utc(i64::MAX), format!("unix time {}", i64::MAX));
    }

    /// Tick labels on the round axis are whole rounds, never 0.5 or 1.5.
    #[test]
    fn the_round_axis_is_labelled_in_whole_rounds() {
        let points = [(1.0, 0.5), (2.0, 0.7), (3.0, 0.8)];
        let svg = line_chart("t", "accuracy", "accuracy", &points, None, &BLUE, Some(1.0)).unwrap();
        let labels: Vec<&str> = svg
            .split("</text>")
            .filter_map(|t| t.rsplit('>').next())
            .map(str::trim)
            .collect();
        for whole in ["0", "1", "2", "3"] {
            assert!(labels.contains(&whole), "no tick {whole} in {labels:?}");
        }
        // The y axis stops at 1.0, so 1.5 and 2.5 could only be rounds.
        assert!(
            !labels.contains(&"1.5") && !labels.contains(&"2.5"),
            "{labels:?}"
        );
    }
}
