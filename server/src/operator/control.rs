//! Requests to a running server through files in the state directory's
//! `control/` folder: the CLI queues one, the server (which holds the
//! database) applies it within a second and leaves its answer beside it.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use covey_privacy::Pseudonym;
use covey_protocol::admin::Role;

use crate::{
    dir::{self, DirError, StateDir},
    operator::report::ReportError,
    state::store::Store,
};

/// Why a queued request was refused; its text is the answer the CLI reads.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error(transparent)]
    Dir(#[from] DirError),
    #[error(transparent)]
    Report(#[from] ReportError),
}

/// An operator request for a running server, which holds the database.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum ControlRequest {
    Revoke {
        name: String,
    },
    /// Erase the enrollment (right to erasure); also refuses the client.
    Forget {
        name: String,
    },
    /// Register a certificate the CLI already signed.
    Enroll {
        name: String,
        cert_pem: String,
        not_after_unix: i64,
        #[serde(default)]
        role: Role,
    },
    /// Federated evaluation of `versions` on idle clients' held-out data.
    Evaluate {
        id: u64,
        versions: Vec<u64>,
        timeout_secs: u64,
    },
    /// Export the audit trail to `control/audit-<id>.jsonl`.
    ExportAudit {
        id: u64,
    },
    /// Write the compliance report to `control/report-<id>/`.
    Report {
        id: u64,
    },
}

/// The answer to an `Evaluate` request, written to `control/eval-<id>.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalOutcome {
    pub id: u64,
    /// Idle clients asked, and how many answered in time.
    pub asked: usize,
    pub answered: usize,
    /// Answering clients that hold held-out data, and their examples.
    pub clients_with_data: usize,
    pub examples: u64,
    pub versions: Vec<VersionMetrics>,
    pub error: Option<String>,
}

/// Example-weighted means over the clients' held-out data.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VersionMetrics {
    pub version: u64,
    pub accuracy: f64,
    pub loss: f64,
}

/// What applying requests changed, for the server's TLS admission set.
#[derive(Debug, Default)]
pub struct Applied {
    pub revoked: Vec<Pseudonym>,
    pub admitted: Vec<(Pseudonym, Role)>,
    /// Evaluations to start: (id, versions, timeout in seconds).
    pub evaluations: Vec<(u64, Vec<u64>, u64)>,
}

fn apply(
    dir: &StateDir,
    store: &Store,
    request: ControlRequest,
    applied: &mut Applied,
) -> Result<(), Refusal> {
    match request {
        ControlRequest::Revoke { name } => applied.revoked.extend(dir.revoke(store, &name)?),
        ControlRequest::Forget { name } => applied.revoked.extend(dir.forget(store, &name)?),
        ControlRequest::Enroll {
            name,
            cert_pem,
            not_after_unix,
            role,
        } => {
            dir::check_name(&name)?;
            dir::refuse_duplicate(store, &name)?;
            let pseudonym = dir::register(store, &name, &cert_pem, not_after_unix, role)?;
            applied.admitted.push((pseudonym, role));
        }
        ControlRequest::Evaluate {
            id,
            versions,
            timeout_secs,
        } => applied.evaluations.push((id, versions, timeout_secs)),
        ControlRequest::ExportAudit { id } => {
            dir.export_audit(store, &dir.audit_export_path(id))?;
        }
        ControlRequest::Report { id } => {
            crate::operator::report::write(dir, store, &dir.report_path(id))?;
        }
    }
    Ok(())
}

impl StateDir {
    /// Hands `request` to the running server, which holds the database; it
    /// applies requests within a second, or at its next start.
    pub fn queue(&self, request: &ControlRequest) -> Result<PathBuf, DirError> {
        let dir = self.control_path();
        fs::create_dir_all(&dir).map_err(dir::io_err(&dir))?;
        let nonce: u64 = rand::random();
        let tmp = dir.join(format!(".request-{nonce:016x}.tmp"));
        let path = dir.join(format!("request-{nonce:016x}"));
        let body = serde_json::to_vec(request).map_err(|e| DirError::Io {
            path: tmp.display().to_string(),
            source: std::io::Error::other(e),
        })?;
        dir::write_file(&tmp, &body, true)?;
        fs::rename(&tmp, &path).map_err(dir::io_err(&path))?;
        Ok(path)
    }

    /// Waits up to `timeout` for the server to take `request`: `Some(Ok)`
    /// once applied, `Some(Err(reason))` if refused, `None` if no server
    /// took it in time.
    pub fn await_request(&self, request: &Path, timeout: Duration) -> Option<Result<(), String>> {
        let deadline = std::time::Instant::now() + timeout;
        while request.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if request.exists() {
            return None;
        }
        match fs::read_to_string(request.with_extension("refused")) {
            Ok(reason) => {
                let _ = fs::remove_file(request.with_extension("refused"));
                Some(Err(reason))
            }
            Err(_) => Some(Ok(())),
        }
    }

    fn report_path(&self, id: u64) -> PathBuf {
        self.control_path().join(format!("report-{id:016x}"))
    }

    /// Moves a running server's report `id` into `out`.
    pub fn take_report(&self, id: u64, out: &Path) -> Result<(), DirError> {
        let from = self.report_path(id);
        fs::create_dir_all(out).map_err(dir::io_err(out))?;
        for name in ["report.json", "report.html"] {
            let (src, dst) = (from.join(name), out.join(name));
            fs::copy(&src, &dst).map_err(dir::io_err(&dst))?;
        }
        fs::remove_dir_all(&from).map_err(dir::io_err(&from))
    }

    fn audit_export_path(&self, id: u64) -> PathBuf {
        self.control_path().join(format!("audit-{id:016x}.jsonl"))
    }

    /// Moves a running server's audit export `id` to `out`.
    pub fn take_audit_export(&self, id: u64, out: &Path) -> Result<(), DirError> {
        let from = self.audit_export_path(id);
        if fs::rename(&from, out).is_err() {
            // Another filesystem: copy, then remove.
            fs::copy(&from, out).map_err(dir::io_err(out))?;
            fs::remove_file(&from).map_err(dir::io_err(&from))?;
        }
        Ok(())
    }

    fn eval_path(&self, id: u64) -> PathBuf {
        self.control_path().join(format!("eval-{id:016x}.json"))
    }

    pub fn write_eval_outcome(&self, outcome: &EvalOutcome) -> Result<(), DirError> {
        let path = self.eval_path(outcome.id);
        let body = serde_json::to_vec_pretty(outcome).map_err(|e| DirError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(e),
        })?;
        dir::replace_file(&path, &body, false)
    }

    /// Takes the outcome of evaluation `id` once the server wrote it.
    pub fn take_eval_outcome(&self, id: u64) -> Option<EvalOutcome> {
        let path = self.eval_path(id);
        let bytes = fs::read(&path).ok()?;
        let _ = fs::remove_file(&path);
        serde_json::from_slice(&bytes).ok()
    }

    /// Withdraws a request no server took; false if a server took it first.
    pub fn withdraw(&self, request: &Path) -> bool {
        fs::rename(request, request.with_extension("withdrawn"))
            .map(|()| {
                let _ = fs::remove_file(request.with_extension("withdrawn"));
            })
            .is_ok()
    }

    /// Applies queued requests to `store` (the server calls this).
    pub fn apply_requests(&self, store: &Store) -> Result<Applied, DirError> {
        let mut applied = Applied::default();
        let dir = self.control_path();
        let Ok(entries) = fs::read_dir(&dir) else {
            return Ok(applied);
        };
        let mut paths: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("request-") && !n.contains('.'))
            })
            .collect();
        paths.sort();
        for path in paths {
            let outcome = fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    serde_json::from_slice::<ControlRequest>(&b).map_err(|e| e.to_string())
                })
                .and_then(|request| {
                    apply(self, store, request, &mut applied).map_err(|e| e.to_string())
                });
            if let Err(reason) = outcome {
                dir::write_file(&path.with_extension("refused"), reason.as_bytes(), false)?;
            }
            fs::remove_file(&path).map_err(dir::io_err(&path))?;
        }
        Ok(applied)
    }
}
