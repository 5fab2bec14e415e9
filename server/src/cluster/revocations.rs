//! Revocations shared through JetStream KV, so a certificate revoked on any
//! node is refused by every leaf's TLS verifier within a second.
//!
//! Each revoked pseudonym is a key (`revoked.<pseudonym>`) in the cluster's
//! registry bucket; every node watches the keys, the ones written before it
//! started included, and removes each from its [`Admitted`] set as it
//! arrives. Keys are never deleted: a revocation is final, as in the store.

use std::sync::Arc;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use covey_privacy::Pseudonym;
use futures_util::StreamExt;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::jetstream::{Cluster, ClusterError};
use crate::admission::pki::Admitted;

const PREFIX: &str = "revoked.";

/// The cluster's registry bucket.
#[derive(Clone)]
pub struct Revocations {
    kv: kv::Store,
}

impl Cluster {
    /// The registry bucket (`<bucket>-registry`), created on first use.
    pub async fn revocations(&self) -> Result<Revocations, ClusterError> {
        let bucket = format!("{}-registry", self.config().bucket);
        let kv = self
            .jetstream()
            .create_or_update_key_value(kv::Config {
                bucket: bucket.clone(),
                history: 1,
                storage: jetstream::stream::StorageType::File,
                num_replicas: self.config().replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| ClusterError::Bucket {
                bucket,
                detail: e.to_string(),
            })?;
        Ok(Revocations { kv })
    }
}

impl Revocations {
    /// Records `pseudonym` as revoked for every node.
    pub async fn revoke(&self, pseudonym: &Pseudonym, unix: i64) -> Result<(), ClusterError> {
        self.kv
            .put(
                format!("{PREFIX}{pseudonym}"),
                Bytes::from(unix.to_string()),
            )
            .await
            .map(|_| ())
            .map_err(|e| ClusterError::Write(format!("recording a revocation: {e}")))
    }

    /// Removes every revoked pseudonym from `admitted`, those revoked before
    /// now and each one after, until the returned task is aborted. `applied`
    /// counts the revocations applied, for whoever waits on them.
    pub async fn follow(
        &self,
        admitted: Arc<Admitted>,
    ) -> Result<(tokio::task::JoinHandle<()>, watch::Receiver<u64>), ClusterError> {
        let mut entries = self
            .kv
            .watch_with_history(format!("{PREFIX}>"))
            .await
            .map_err(|e| ClusterError::Watch(format!("revocations: {e}")))?;
        let (tx, applied) = watch::channel(0u64);
        let task = tokio::spawn(async move {
            while let Some(entry) = entries.next().await {
                let entry = match entry {
                    Ok(entry) => entry,
                    Err(e) => {
                        // The watcher recreates its consumer on its own.
                        debug!("revocation watch: {e}");
                        continue;
                    }
                };
                if entry.operation != kv::Operation::Put {
                    continue;
                }
                let Some(pseudonym) = entry.key.strip_prefix(PREFIX).and_then(Pseudonym::parse)
                else {
                    warn!("ignoring a registry key that names no pseudonym");
                    continue;
                };
                admitted.remove(&pseudonym);
                tx.send_modify(|n| *n += 1);
            }
        });
        Ok((task, applied))
    }
}
