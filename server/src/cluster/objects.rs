//! Model versions and leaves' partial sums in a JetStream object store.
//!
//! The root puts version n+1 here before the swap on its key that commits
//! it, so a version is always in the store before anyone is told of it; a
//! put whose swap then fails is an orphan nobody names. Each model is named
//! in the root's state by a [`ModelRef`] carrying our own SHA-256 of its
//! bytes, checked on every read, so a leaf never serves a model the root did
//! not commit. A model travels as the store's own record (header and
//! weights, `StoredModel::to_bytes`), so its spec and round come with it.
//! Leaves put their partial sum of a round under the round and
//! their name; the root reads them once the leaf says it is there.

use std::time::Duration;

use async_nats::jetstream::{self, object_store};
use covey_protocol::{ModelVersion, RoundId};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use super::{
    at_rest::AtRest,
    jetstream::{Cluster, ClusterError},
    route::LeafId,
};
use crate::{fold::aggregate::OptimizerState, state::store::StoredModel};

/// A committed model as the root's state names it: its version, and the
/// length and SHA-256 of its record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    pub version: ModelVersion,
    pub bytes: u64,
    pub sha256: [u8; 32],
}

/// The server optimizer's moments after a committed version, as the root's
/// state names them, checked like a model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MomentsRef {
    pub version: ModelVersion,
    pub bytes: u64,
    pub sha256: [u8; 32],
}

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("object '{name}': {detail}")]
    Store { name: String, detail: String },
    #[error("object '{name}' is not what the root committed: {problem}")]
    Mismatch { name: String, problem: String },
}

/// The cluster's object bucket.
#[derive(Clone)]
pub struct Objects {
    store: object_store::ObjectStore,
    timeout: Duration,
    at_rest: AtRest,
}

fn model_name(version: ModelVersion) -> String {
    format!("model-{}", version.0)
}

fn moments_name(version: ModelVersion) -> String {
    format!("moments-{}", version.0)
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

fn partial_name(round: RoundId, leaf: &LeafId) -> String {
    // Object names allow any text; the leaf's name is ours, not a device's.
    format!("partial-{}-{}", round.0, leaf.0)
}

impl Cluster {
    /// The object bucket (`<bucket>-objects`), created on first use.
    pub async fn objects(&self) -> Result<Objects, ClusterError> {
        let bucket = format!("{}-objects", self.config().bucket);
        let js = self.jetstream();
        let store =
            match js.get_object_store(&bucket).await {
                Ok(store) => store,
                Err(_) => {
                    let created = js
                        .create_object_store(object_store::Config {
                            bucket: bucket.clone(),
                            storage: jetstream::stream::StorageType::File,
                            num_replicas: self.config().replicas,
                            ..Default::default()
                        })
                        .await;
                    match created {
                        Ok(store) => store,
                        // Another replica created it first.
                        Err(e) => js.get_object_store(&bucket).await.map_err(|_| {
                            ClusterError::Bucket {
                                bucket: bucket.clone(),
                                detail: e.to_string(),
                            }
                        })?,
                    }
                }
            };
        Ok(Objects {
            store,
            timeout: self.config().request_timeout,
            at_rest: self.at_rest().clone(),
        })
    }
}

impl Objects {
    /// Seals `plain` for `name` and puts it; returns the sealed length.
    async fn put(&self, name: &str, plain: &[u8]) -> Result<usize, ObjectError> {
        let bytes = self
            .at_rest
            .seal(name, plain)
            .map_err(|e| ObjectError::Store {
                name: name.into(),
                detail: e.to_string(),
            })?;
        let mut reader = bytes.as_slice();
        // A model is many chunks: allow a request timeout per megabyte.
        let budget = self.timeout * (1 + (bytes.len() >> 20) as u32);
        tokio::time::timeout(budget, self.store.put(name, &mut reader))
            .await
            .map_err(|_| ObjectError::Store {
                name: name.into(),
                detail: "timed out".into(),
            })?
            .map_err(|e| ObjectError::Store {
                name: name.into(),
                detail: e.to_string(),
            })?;
        Ok(bytes.len())
    }

    /// Gets `name` as stored (sealed), at most `limit` bytes of it.
    async fn get(&self, name: &str, limit: usize) -> Result<Vec<u8>, ObjectError> {
        let failed = |detail: String| ObjectError::Store {
            name: name.into(),
            detail,
        };
        let read = async {
            let object = self
                .store
                .get(name)
                .await
                .map_err(|e| failed(e.to_string()))?;
            let mut bytes = Vec::new();
            // One byte past the limit tells an oversized object from a full one.
            object
                .take(limit as u64 + 1)
                .read_to_end(&mut bytes)
                .await
                .map_err(|e| failed(e.to_string()))?;
            if bytes.len() > limit {
                return Err(failed(format!("larger than the {limit} bytes expected")));
            }
            Ok(bytes)
        };
        let budget = self.timeout * (1 + (limit >> 20) as u32);
        tokio::time::timeout(budget, read)
            .await
            .map_err(|_| failed("timed out".into()))?
    }

    /// Stores `model` under its version; the reference goes into the
    /// root's state with the commit.
    pub async fn put_model(&self, model: &StoredModel) -> Result<ModelRef, ObjectError> {
        let bytes = model.to_bytes();
        let sealed = self.put(&model_name(model.header.version), &bytes).await?;
        Ok(ModelRef {
            version: model.header.version,
            bytes: sealed as u64,
            sha256: sha256(&bytes),
        })
    }

    /// The plaintext of `name`, checked against the length and hash its
    /// reference gives.
    async fn get_checked(
        &self,
        name: &str,
        len: u64,
        sha: &[u8; 32],
    ) -> Result<Vec<u8>, ObjectError> {
        let mismatch = |problem: String| ObjectError::Mismatch {
            name: name.into(),
            problem,
        };
        let expected = usize::try_from(len)
            .map_err(|_| mismatch(format!("{len} bytes do not fit in memory")))?;
        let bytes = self.get(name, expected).await?;
        if bytes.len() != expected {
            return Err(mismatch(format!(
                "{} bytes, the reference says {expected}",
                bytes.len()
            )));
        }
        let bytes = self
            .at_rest
            .open(name, &bytes)
            .map_err(|e| mismatch(e.to_string()))?;
        if sha256(&bytes) != *sha {
            return Err(mismatch("its SHA-256 differs".into()));
        }
        Ok(bytes)
    }

    /// The model `model` names, checked against its length, hash and
    /// version before it is decoded.
    pub async fn get_model(&self, model: &ModelRef) -> Result<StoredModel, ObjectError> {
        let name = model_name(model.version);
        let mismatch = |problem: String| ObjectError::Mismatch {
            name: name.clone(),
            problem,
        };
        let bytes = self.get_checked(&name, model.bytes, &model.sha256).await?;
        let stored = StoredModel::from_bytes(&bytes).map_err(|e| mismatch(e.to_string()))?;
        if stored.header.version != model.version {
            return Err(mismatch(format!(
                "it holds version {}",
                stored.header.version
            )));
        }
        Ok(stored)
    }

    /// Stores the optimizer's moments after `version`; the reference goes
    /// into the root's state with that version's commit.
    pub async fn put_moments(
        &self,
        version: ModelVersion,
        moments: &OptimizerState,
    ) -> Result<MomentsRef, ObjectError> {
        let name = moments_name(version);
        let bytes = postcard::to_allocvec(moments).map_err(|e| ObjectError::Store {
            name: name.clone(),
            detail: e.to_string(),
        })?;
        let sealed = self.put(&name, &bytes).await?;
        Ok(MomentsRef {
            version,
            bytes: sealed as u64,
            sha256: sha256(&bytes),
        })
    }

    /// The moments `moments` names, checked.
    pub async fn get_moments(&self, moments: &MomentsRef) -> Result<OptimizerState, ObjectError> {
        let name = moments_name(moments.version);
        let bytes = self
            .get_checked(&name, moments.bytes, &moments.sha256)
            .await?;
        postcard::from_bytes(&bytes).map_err(|e| ObjectError::Mismatch {
            name,
            problem: e.to_string(),
        })
    }

    /// A leaf's partial sum of `round`, encoded.
    pub async fn put_partial(
        &self,
        round: RoundId,
        leaf: &LeafId,
        encoded: &[u8],
    ) -> Result<(), ObjectError> {
        self.put(&partial_name(round, leaf), encoded).await?;
        Ok(())
    }

    /// The bytes a leaf put for `round`, at most `limit` of them; the root
    /// decodes and checks them (`rounds::split`).
    pub async fn get_partial(
        &self,
        round: RoundId,
        leaf: &LeafId,
        limit: usize,
    ) -> Result<Vec<u8>, ObjectError> {
        let name = partial_name(round, leaf);
        let sealed = self
            .get(&name, limit.saturating_add(AtRest::OVERHEAD))
            .await?;
        self.at_rest
            .open(&name, &sealed)
            .map_err(|e| ObjectError::Mismatch {
                name,
                problem: e.to_string(),
            })
    }
}
