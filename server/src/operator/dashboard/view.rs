//! What the page shows, built per viewer from the store, the counters and
//! the hub's live snapshot. An auditor's view names devices by pseudonym
//! only; operators and admins also see the names they enrolled.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
};

use serde::Serialize;
use tokio::sync::watch;

use super::{Live, LoginBook};
use crate::{
    operator::admin::Role,
    operator::metrics::Metrics,
    operator::status::RoundLine,
    state::audit::{ChainCheck, parse_public_key},
    state::store::{RoundOutcome, Store, StoreError, unix_ms_now},
};

/// How many audit entries the page lists.
const AUDIT_TAIL: usize = 25;
/// How many devices the page lists; counts cover all of them.
const DEVICES_LISTED: usize = 200;
/// Enrollments change rarely and a federation may hold many: the list is
/// read again at most this often, not for every snapshot of every feed.
const DEVICES_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// What does not change while the server runs.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Facts {
    pub model: String,
    pub parameters: usize,
    /// Loss is shown as perplexity for language models.
    pub language_model: bool,
    pub target_version: u64,
    /// `rounds` or `fedbuff`.
    pub mode: &'static str,
    pub secure_aggregation: bool,
    /// The ε the run may spend, and its δ, under differential privacy.
    pub epsilon_target: Option<f64>,
    pub delta: Option<f64>,
    /// The smallest cohort a release may come from (k).
    pub min_cohort: usize,
}

/// Everything the dashboard reads, shared by its connections.
pub struct Board {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    pub(super) logins: Arc<LoginBook>,
    live: watch::Receiver<Live>,
    facts: Facts,
    audit: Mutex<AuditTail>,
    rounds: Mutex<RoundsCache>,
    devices: Mutex<Option<(std::time::Instant, Arc<Devices>)>>,
}

/// The trail, verified link by link as it grows.
struct AuditTail {
    check: Option<ChainCheck>,
    latest: VecDeque<serde_json::Value>,
    problem: Option<String>,
}

#[derive(Default)]
struct RoundsCache {
    /// The live state the lines were read at.
    key: Option<(u64, Option<u64>, &'static str)>,
    lines: Arc<Vec<RoundLine>>,
    rounds_per_hour: f64,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Viewer {
    pub role: Role,
    pub signed_in: bool,
}

#[derive(Serialize)]
pub struct Snapshot<'a> {
    viewer: Viewer,
    facts: &'a Facts,
    live: Live,
    rounds_per_hour: f64,
    /// Whether `rounds` replaces what the page holds, or updates it.
    rounds_reset: bool,
    rounds: Vec<RoundLine>,
    phase_seconds: BTreeMap<&'static str, f64>,
    totals: Totals,
    audit: AuditSummary,
    devices: Devices,
    server_time_unix_ms: u64,
}

#[derive(Serialize)]
struct Totals {
    bytes_up: u64,
    bytes_down: u64,
    updates_accepted: u64,
    uploads_interrupted: u64,
    connections_open: i64,
}

#[derive(Serialize)]
struct AuditSummary {
    verified: bool,
    entries: u64,
    problem: Option<String>,
    latest: Vec<serde_json::Value>,
}

#[derive(Clone, Serialize)]
struct Devices {
    active: usize,
    revoked: usize,
    expired: usize,
    listed: Vec<DeviceLine>,
}

#[derive(Clone, Serialize)]
struct DeviceLine {
    pseudonym: String,
    /// Only for operators and admins.
    name: Option<String>,
    role: Role,
    state: &'static str,
}

/// What a connection sent last, so the next message carries only changes.
#[derive(Default)]
pub struct Sent {
    rounds: Arc<Vec<RoundLine>>,
}

impl Board {
    pub fn new(
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        logins: Arc<LoginBook>,
        live: watch::Receiver<Live>,
        facts: Facts,
    ) -> Self {
        let check = store
            .audit_public_key()
            .ok()
            .and_then(|text| parse_public_key(&text).ok())
            .map(ChainCheck::new);
        let problem = check
            .is_none()
            .then(|| "the audit public key cannot be read".to_owned());
        Self {
            store,
            metrics,
            logins,
            live,
            facts,
            audit: Mutex::new(AuditTail {
                check,
                latest: VecDeque::new(),
                problem,
            }),
            rounds: Mutex::new(RoundsCache::default()),
            devices: Mutex::new(None),
        }
    }

    /// Appends one event to the audit trail (sign-ins and refusals).
    pub fn audit(&self, event: crate::state::audit::AuditEvent) -> Result<(), StoreError> {
        self.store.audit([event])
    }

    /// Counts a refused sign-in where Prometheus sees it.
    pub fn refused_sign_in(&self) {
        self.metrics
            .refuse_connection(crate::operator::metrics::DASHBOARD_SIGN_IN_REFUSED);
    }

    pub fn live(&self) -> watch::Receiver<Live> {
        self.live.clone()
    }

    /// The page's data for `viewer`, with the rounds that changed since
    /// `sent` (all of them for a fresh `Sent`).
    pub fn snapshot(&self, viewer: Viewer, sent: &mut Sent) -> Result<Snapshot<'_>, StoreError> {
        let live = self.live.borrow().clone();
        let (lines, rounds_per_hour) = self.rounds(&live)?;
        let old = &sent.rounds;
        let rounds_reset = lines.len() < old.len()
            || lines.first().map(|l| l.round) != old.first().map(|l| l.round);
        let rounds = if rounds_reset {
            lines.to_vec()
        } else {
            lines
                .iter()
                .enumerate()
                .filter(|(i, line)| old.get(*i) != Some(line))
                .map(|(_, line)| line.clone())
                .collect()
        };
        sent.rounds = lines;
        let metrics = &self.metrics;
        Ok(Snapshot {
            viewer,
            facts: &self.facts,
            live,
            rounds_per_hour,
            rounds_reset,
            rounds,
            phase_seconds: metrics.latest_phases(),
            totals: Totals {
                bytes_up: metrics.bytes_in.get(),
                bytes_down: metrics.bytes_out.get(),
                updates_accepted: metrics.updates_accepted.get(),
                uploads_interrupted: metrics.uploads_interrupted.get(),
                connections_open: metrics.connections_open.get(),
            },
            audit: self.audit_summary()?,
            devices: self.devices(matches!(viewer.role, Role::Operator | Role::Admin))?,
            server_time_unix_ms: unix_ms_now(),
        })
    }

    /// Round lines, read again only when the live state moved.
    fn rounds(&self, live: &Live) -> Result<(Arc<Vec<RoundLine>>, f64), StoreError> {
        let mut cache = self.rounds.lock().unwrap_or_else(|e| e.into_inner());
        let key = Some((live.version, live.round, live.phase));
        if cache.key != key {
            let records = self.store.rounds()?;
            let now = unix_ms_now();
            let hour_ago = now.saturating_sub(3_600_000);
            let first = records.first().map_or(now, |r| r.started_unix_ms);
            let committed = records
                .iter()
                .filter(|r| matches!(r.outcome, RoundOutcome::Committed { .. }))
                .filter(|r| r.ended_unix_ms.is_some_and(|t| t >= hour_ago))
                .count();
            // A run younger than an hour is scaled up from what it did so far.
            let window_ms = now.saturating_sub(first.max(hour_ago)).max(1000);
            cache.rounds_per_hour = committed as f64 * 3_600_000.0 / window_ms as f64;
            cache.lines = Arc::new(records.iter().map(RoundLine::from_record).collect());
            cache.key = key;
        }
        Ok((cache.lines.clone(), cache.rounds_per_hour))
    }

    fn audit_summary(&self) -> Result<AuditSummary, StoreError> {
        let mut tail = self.audit.lock().unwrap_or_else(|e| e.into_inner());
        let tail = &mut *tail;
        if let (Some(check), None) = (tail.check.as_mut(), &tail.problem) {
            for entry in self.store.audit_entries_from(check.entries())? {
                match check.push(&entry.json, &entry.hash, &entry.signature) {
                    Ok(parsed) => {
                        let value = serde_json::to_value(&parsed).unwrap_or_default();
                        if tail.latest.len() == AUDIT_TAIL {
                            tail.latest.pop_front();
                        }
                        tail.latest.push_back(value);
                    }
                    Err((seq, problem)) => {
                        let at =
                            seq.map_or_else(|| "an entry".to_owned(), |s| format!("entry {s}"));
                        tail.problem = Some(format!("{at}: {problem}"));
                        break;
                    }
                }
            }
        }
        Ok(AuditSummary {
            verified: tail.problem.is_none(),
            entries: tail.check.as_ref().map_or(0, ChainCheck::entries),
            problem: tail.problem.clone(),
            latest: tail.latest.iter().rev().cloned().collect(),
        })
    }

    fn devices(&self, with_names: bool) -> Result<Devices, StoreError> {
        let all = {
            let mut cache = self.devices.lock().unwrap_or_else(|e| e.into_inner());
            match &*cache {
                Some((read, devices)) if read.elapsed() < DEVICES_TTL => devices.clone(),
                _ => {
                    let devices = Arc::new(self.read_devices()?);
                    *cache = Some((std::time::Instant::now(), devices.clone()));
                    devices
                }
            }
        };
        let mut devices = (*all).clone();
        if !with_names {
            for d in &mut devices.listed {
                d.name = None;
            }
        }
        Ok(devices)
    }

    /// Every enrollment, names included; `devices` strips them per viewer.
    fn read_devices(&self) -> Result<Devices, StoreError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut devices = Devices {
            active: 0,
            revoked: 0,
            expired: 0,
            listed: Vec::new(),
        };
        for e in self.store.enrollments()? {
            let state = if e.revoked_unix.is_some() {
                devices.revoked += 1;
                "revoked"
            } else if e.not_after_unix <= now {
                devices.expired += 1;
                "expired"
            } else {
                devices.active += 1;
                "active"
            };
            if devices.listed.len() < DEVICES_LISTED {
                devices.listed.push(DeviceLine {
                    pseudonym: e.pseudonym.to_string(),
                    name: Some(e.name),
                    role: e.role,
                    state,
                });
            }
        }
        Ok(devices)
    }
}
