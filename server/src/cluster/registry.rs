//! The cluster's registry of who may connect, shared through JetStream KV,
//! so an enrollment or a revocation made on any node reaches every leaf's
//! TLS verifier within a second.
//!
//! Each enrolled pseudonym is a key (`admitted.<pseudonym>`, its role) and
//! each revoked one another (`revoked.<pseudonym>`) in the cluster's
//! registry bucket. Every leaf watches the keys, the ones written before it
//! started included, and applies each to its [`Admitted`] set as it
//! arrives. Keys are never deleted, and a revocation is final: a pseudonym
//! once revoked is never admitted again, whatever order the keys arrive in.

use std::{collections::HashSet, sync::Arc};

use async_nats::jetstream::kv;
use bytes::Bytes;
use covey_privacy::Pseudonym;
use covey_protocol::admin::Role;
use futures_util::StreamExt;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::jetstream::{Cluster, ClusterError};
use crate::admission::pki::Admitted;

const REVOKED: &str = "revoked.";
const ADMITTED: &str = "admitted.";

/// The cluster's registry bucket.
#[derive(Clone)]
pub struct Registry {
    kv: kv::Store,
}

impl Cluster {
    /// The registry bucket (`<bucket>-registry`), created on first use.
    pub async fn registry(&self) -> Result<Registry, ClusterError> {
        let kv = self.kv_bucket("-registry", 1).await?;
        Ok(Registry { kv })
    }
}

/// One registry entry, as a watch delivers it.
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    Admitted(Pseudonym, Role),
    Revoked(Pseudonym),
}

fn parse(key: &str, value: &[u8]) -> Option<Entry> {
    if let Some(p) = key.strip_prefix(REVOKED) {
        return Some(Entry::Revoked(Pseudonym::parse(p)?));
    }
    let p = Pseudonym::parse(key.strip_prefix(ADMITTED)?)?;
    Some(Entry::Admitted(p, postcard::from_bytes(value).ok()?))
}

/// Applies one entry to `admitted`; `revoked` remembers every revocation
/// seen, so a late admission of a revoked pseudonym changes nothing.
fn apply(entry: Entry, admitted: &Admitted, revoked: &mut HashSet<Pseudonym>) {
    match entry {
        Entry::Revoked(p) => {
            revoked.insert(p);
            admitted.remove(&p);
        }
        Entry::Admitted(p, role) if !revoked.contains(&p) => admitted.insert(p, role),
        Entry::Admitted(..) => {}
    }
}

impl Registry {
    /// Records `pseudonym` as enrolled in `role` for every node.
    pub async fn admit(&self, pseudonym: &Pseudonym, role: Role) -> Result<(), ClusterError> {
        let value = postcard::to_allocvec(&role)
            .map_err(|e| ClusterError::Write(format!("encoding a role: {e}")))?;
        self.kv
            .put(format!("{ADMITTED}{pseudonym}"), Bytes::from(value))
            .await
            .map(|_| ())
            .map_err(|e| ClusterError::Write(format!("recording an enrollment: {e}")))
    }

    /// Records `pseudonym` as revoked for every node.
    pub async fn revoke(&self, pseudonym: &Pseudonym, unix: i64) -> Result<(), ClusterError> {
        self.kv
            .put(
                format!("{REVOKED}{pseudonym}"),
                Bytes::from(unix.to_string()),
            )
            .await
            .map(|_| ())
            .map_err(|e| ClusterError::Write(format!("recording a revocation: {e}")))
    }

    /// Applies every entry to `admitted`, those written before now and each
    /// one after, until the returned task is aborted. `applied` counts the
    /// entries applied, for whoever waits on them.
    pub async fn follow(
        &self,
        admitted: Arc<Admitted>,
    ) -> Result<(tokio::task::JoinHandle<()>, watch::Receiver<u64>), ClusterError> {
        let mut entries = self
            .kv
            .watch_with_history(">")
            .await
            .map_err(|e| ClusterError::Watch(format!("registry: {e}")))?;
        let (tx, applied) = watch::channel(0u64);
        let task = tokio::spawn(async move {
            let mut revoked = HashSet::new();
            while let Some(entry) = entries.next().await {
                let entry = match entry {
                    Ok(entry) => entry,
                    Err(e) => {
                        // The watcher recreates its consumer on its own.
                        debug!("registry watch: {e}");
                        continue;
                    }
                };
                if entry.operation != kv::Operation::Put {
                    continue;
                }
                let Some(parsed) = parse(&entry.key, &entry.value) else {
                    warn!("ignoring a registry key that names no pseudonym");
                    continue;
                };
                apply(parsed, &admitted, &mut revoked);
                tx.send_modify(|n| *n += 1);
            }
        });
        Ok((task, applied))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_and_a_revocation_is_final_in_any_order() {
        let p = Pseudonym::from_bytes([7; 8]);
        let role = postcard::to_allocvec(&Role::Operator).unwrap();
        assert_eq!(
            parse(&format!("admitted.{p}"), &role),
            Some(Entry::Admitted(p, Role::Operator))
        );
        assert_eq!(
            parse(&format!("revoked.{p}"), b"1"),
            Some(Entry::Revoked(p))
        );
        assert_eq!(parse("admitted.nope", &role), None);
        assert_eq!(parse(&format!("other.{p}"), &role), None);

        let admitted = Admitted::new(std::iter::empty());
        let mut revoked = HashSet::new();
        apply(Entry::Admitted(p, Role::Device), &admitted, &mut revoked);
        assert!(admitted.contains(&p));
        apply(Entry::Revoked(p), &admitted, &mut revoked);
        assert!(!admitted.contains(&p));
        // An admission that arrives after the revocation does not undo it.
        apply(Entry::Admitted(p, Role::Device), &admitted, &mut revoked);
        assert!(!admitted.contains(&p));
    }
}
