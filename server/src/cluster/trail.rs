//! The root's audit trail in JetStream: the same hash-chained, signed
//! entries as a single server's (`state::audit`), in the bucket
//! `<bucket>-audit`, one key per sequence number, each sealed at rest.
//!
//! It has a single writer by construction. The entries a root adds travel
//! inside the state it swaps onto the root key (`RootState::pending`), so
//! they are committed, or refused with a deposed root's write, together
//! with the change they record. Before a root proposes the next state it
//! copies the current state's entries here; a copy made twice (by a root
//! and its successor) writes the same entry twice. Nothing that was not
//! committed on the root key ever reaches this bucket.
//!
//! Exports close the trail with an `AuditExported` entry, which only the
//! leading root may add: an exporter asks for it under `export.<id>` and the
//! root answers under `exported.<id>` with the entry count to read.

use std::{io::Write, time::Duration};

use async_nats::jetstream::kv;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::{
    at_rest::AtRest,
    jetstream::{Cluster, ClusterError, forward_puts},
};
use crate::state::audit::{ChainHead, SealedEntry};

/// The trail's bucket.
#[derive(Clone)]
pub struct Trail {
    kv: kv::Store,
    at_rest: AtRest,
}

#[derive(Debug, thiserror::Error)]
pub enum TrailError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("audit entry {0} is missing from the trail")]
    Missing(u64),
    #[error("audit entry {seq} cannot be read: {problem}")]
    Unreadable { seq: u64, problem: String },
    #[error(
        "no root replica closed the trail within {0:?}: is a `covey-server coordinator` running against this bucket?"
    )]
    NoRoot(Duration),
    #[error("writing the export: {0}")]
    Write(#[from] std::io::Error),
}

fn entry_key(seq: u64) -> String {
    // Zero-padded, so the bucket's keys sort in the chain's order.
    format!("entry.{seq:020}")
}

fn request_key(id: u64) -> String {
    format!("export.{id:016x}")
}

fn answer_key(id: u64) -> String {
    format!("exported.{id:016x}")
}

impl Cluster {
    /// The audit trail's bucket (`<bucket>-audit`), created on first use.
    pub async fn trail(&self) -> Result<Trail, ClusterError> {
        let kv = self.kv_bucket("-audit", 1).await?;
        Ok(Trail {
            kv,
            at_rest: self.at_rest().clone(),
        })
    }
}

impl Trail {
    /// Stores `entries`, the last ones before `head`.
    pub async fn store(
        &self,
        head: ChainHead,
        entries: &[SealedEntry],
    ) -> Result<(), ClusterError> {
        let first = head.next_seq.saturating_sub(entries.len() as u64);
        for (i, entry) in entries.iter().enumerate() {
            let key = entry_key(first + i as u64);
            let plain =
                postcard::to_allocvec(entry).map_err(|e| ClusterError::Write(e.to_string()))?;
            let sealed = self
                .at_rest
                .seal(&key, &plain)
                .map_err(|e| ClusterError::Write(e.to_string()))?;
            self.kv
                .put(&key, Bytes::from(sealed))
                .await
                .map_err(|e| ClusterError::Write(format!("audit entry: {e}")))?;
        }
        Ok(())
    }

    /// The first `count` entries, in order.
    pub async fn read(&self, count: u64) -> Result<Vec<SealedEntry>, TrailError> {
        let mut out = Vec::new();
        for seq in 0..count {
            let key = entry_key(seq);
            let sealed = self
                .kv
                .get(&key)
                .await
                .map_err(|e| ClusterError::Read(format!("audit entry {seq}: {e}")))?
                .ok_or(TrailError::Missing(seq))?;
            let unreadable = |problem: String| TrailError::Unreadable { seq, problem };
            let plain = self
                .at_rest
                .open(&key, &sealed)
                .map_err(|e| unreadable(e.to_string()))?;
            out.push(postcard::from_bytes(&plain).map_err(|e| unreadable(e.to_string()))?);
        }
        Ok(out)
    }

    /// Asks the leading root to close the trail for export `id`.
    pub async fn request_export(&self, id: u64) -> Result<(), ClusterError> {
        self.kv
            .put(request_key(id), Bytes::new())
            .await
            .map(|_| ())
            .map_err(|e| ClusterError::Write(format!("export request: {e}")))
    }

    /// Export requests, the ones already waiting first, until the receiver
    /// is dropped.
    pub async fn export_requests(&self) -> Result<mpsc::Receiver<u64>, ClusterError> {
        let entries = self
            .kv
            .watch_with_history("export.*")
            .await
            .map_err(|e| ClusterError::Watch(format!("export requests: {e}")))?;
        Ok(forward_puts(entries, 16, "export requests", |key, _| {
            let id = key.strip_prefix("export.")?;
            u64::from_str_radix(id, 16).ok()
        }))
    }

    /// Export `id` may read the first `entries` entries; its request is done.
    pub async fn answer_export(&self, id: u64, entries: u64) -> Result<(), ClusterError> {
        self.kv
            .put(answer_key(id), Bytes::from(entries.to_string()))
            .await
            .map_err(|e| ClusterError::Write(format!("export answer: {e}")))?;
        // A leftover request is answered already: `exported` says so.
        let _ = self.kv.delete(request_key(id)).await;
        Ok(())
    }

    /// How many entries export `id` may read, once the root answered.
    pub async fn exported(&self, id: u64) -> Result<Option<u64>, ClusterError> {
        let value = self
            .kv
            .get(answer_key(id))
            .await
            .map_err(|e| ClusterError::Read(format!("export answer: {e}")))?;
        Ok(value.and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok()))
    }
}

/// Asks the leading root to close the trail, then writes every entry up to
/// and including the closing one to `out`, one JSON line each, as
/// `covey-server audit export` does for a single server. Waits up to
/// `patience` for the root. Returns the number of entries.
pub async fn export(
    trail: &Trail,
    out: &mut impl Write,
    patience: Duration,
) -> Result<u64, TrailError> {
    let id: u64 = rand::random();
    trail.request_export(id).await?;
    let deadline = tokio::time::Instant::now() + patience;
    let entries = loop {
        if let Some(entries) = trail.exported(id).await? {
            break entries;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(TrailError::NoRoot(patience));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for entry in trail.read(entries).await? {
        writeln!(out, "{}", entry.to_line())?;
    }
    out.flush()?;
    Ok(entries)
}
