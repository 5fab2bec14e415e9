//! What leaves tell the root, in the cluster's leaves bucket: each leaf's
//! heartbeat (`beat.<leaf>`: devices waiting, the address devices reach it
//! at) and its report for a round (`report.<round>.<leaf>`: its partial sum
//! is in the object store, or it has none). The root never compares a
//! leaf's clock with its own: a leaf is alive while its beat key keeps
//! getting new revisions, timed on the root's clock.

use async_nats::jetstream::kv;
use bytes::Bytes;
use covey_protocol::RoundId;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::warn;

use super::{
    jetstream::{Cluster, ClusterError, forward_puts},
    route::LeafId,
};

/// A leaf's heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beat {
    /// Devices checked in and waiting for a task.
    pub available: u64,
    /// Where devices reach this leaf (`host:port`).
    pub addr: String,
}

/// A leaf's word on a round it was given a quota in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Report {
    /// Its partial sum is in the object store, this many bytes long.
    Partial { bytes: u64 },
    /// It has nothing to release (too few devices finished, or secure
    /// aggregation failed); its devices count as dropouts.
    Failed { reason: String },
}

/// Something a leaf wrote, as the root's watch delivers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Heard {
    Beat {
        leaf: LeafId,
        beat: Beat,
    },
    Report {
        round: RoundId,
        leaf: LeafId,
        report: Report,
    },
}

/// The cluster's leaves bucket.
#[derive(Clone)]
pub struct Leaves {
    kv: kv::Store,
}

impl Cluster {
    /// The leaves bucket (`<bucket>-leaves`), created on first use.
    pub async fn leaves(&self) -> Result<Leaves, ClusterError> {
        let kv = self.kv_bucket("-leaves", 1).await?;
        Ok(Leaves { kv })
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Bytes, ClusterError> {
    postcard::to_allocvec(value)
        .map(Bytes::from)
        .map_err(|e| ClusterError::Write(e.to_string()))
}

impl Leaves {
    pub async fn beat(&self, leaf: &LeafId, beat: &Beat) -> Result<(), ClusterError> {
        self.kv
            .put(format!("beat.{leaf}"), encode(beat)?)
            .await
            .map(|_| ())
            .map_err(|e| ClusterError::Write(format!("leaf heartbeat: {e}")))
    }

    /// Records `leaf`'s report for `round`, once: a second report for the
    /// same round is refused by the store, so a restarted leaf cannot
    /// replace what the root may already have merged.
    pub async fn report(
        &self,
        round: RoundId,
        leaf: &LeafId,
        report: &Report,
    ) -> Result<(), ClusterError> {
        self.kv
            .create(format!("report.{}.{leaf}", round.0), encode(report)?)
            .await
            .map(|_| ())
            .map_err(|e| ClusterError::Write(format!("round {} report: {e}", round.0)))
    }

    /// Every beat and report, the ones already written first, until the
    /// receiver is dropped.
    pub async fn watch(&self) -> Result<mpsc::Receiver<Heard>, ClusterError> {
        let entries = self
            .kv
            .watch_with_history(">")
            .await
            .map_err(|e| ClusterError::Watch(format!("leaves: {e}")))?;
        Ok(forward_puts(entries, 256, "leaves", |key, value| {
            let heard = parse(key, value);
            if heard.is_none() {
                warn!("ignoring a malformed entry in the leaves bucket");
            }
            heard
        }))
    }
}

/// A key and value of the leaves bucket, or `None` if they are not ours.
fn parse(key: &str, value: &[u8]) -> Option<Heard> {
    if let Some(leaf) = key.strip_prefix("beat.") {
        let leaf = LeafId::parse(leaf).ok()?;
        let beat = postcard::from_bytes(value).ok()?;
        return Some(Heard::Beat { leaf, beat });
    }
    let (round, leaf) = key.strip_prefix("report.")?.split_once('.')?;
    Some(Heard::Report {
        round: RoundId(round.parse().ok()?),
        leaf: LeafId::parse(leaf).ok()?,
        report: postcard::from_bytes(value).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_parse_back_and_strangers_do_not() {
        let beat = Beat {
            available: 7,
            addr: "10.0.0.1:4433".into(),
        };
        let bytes = postcard::to_allocvec(&beat).unwrap();
        assert_eq!(
            parse("beat.leaf-1", &bytes),
            Some(Heard::Beat {
                leaf: LeafId("leaf-1".into()),
                beat
            })
        );
        let report = Report::Partial { bytes: 99 };
        let bytes = postcard::to_allocvec(&report).unwrap();
        assert_eq!(
            parse("report.12.b", &bytes),
            Some(Heard::Report {
                round: RoundId(12),
                leaf: LeafId("b".into()),
                report
            })
        );
        assert_eq!(parse("report.x.b", &bytes), None);
        assert_eq!(parse("report.12", &bytes), None);
        assert_eq!(parse("other.12.b", &bytes), None);
        assert_eq!(parse("beat.a", &[0xff, 0xff, 0xff]), None);
    }
}
