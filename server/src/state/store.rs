//! The server's durable state in sled.
//!
//! Trees: `models` (version → header + f32 bytes), `rounds` (round id →
//! record), `registry` (pseudonym → enrollment), `audit` (sequence number →
//! sealed audit entry), `logins` (SHA-256 of a dashboard token → login),
//! `meta` (current version, next round id, optimizer
//! moments, secrets). A commit writes the new version, its round record,
//! the optimizer state, the current-version pointer and its audit entry in
//! one transaction and then flushes, so a crash at any point leaves either
//! the old state or the new one, and the trail always matches the state.
//!
//! Every value is sealed (AES-256-GCM, bound to its tree and key) under a
//! data key that is stored wrapped by the operator's key-encryption key;
//! see [`crate::state::sealing`]. Keys (version numbers, round ids, pseudonyms,
//! sequence numbers) stay plain so sled can order them.

use std::{
    io::Write,
    path::Path,
    sync::{Mutex, MutexGuard},
};

use covey_privacy::Pseudonym;
use covey_protocol::{
    ModelVersion, RoundId, admin::Role, dashboard::LoginDigest, model::ModelSpec,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use sled::{
    Transactional,
    transaction::{ConflictableTransactionError, TransactionError},
};

use crate::{
    fold::aggregate::OptimizerState,
    rounds::compliance::Retention,
    rounds::dp::PrivacyLedger,
    state::audit::{AuditEvent, AuditKeyError, AuditSigner, ChainHead, SealedEntry},
    state::sealing::{DataKey, Kek, SealError},
};

const CURRENT_VERSION: &[u8] = b"current_version";
const NEXT_ROUND: &[u8] = b"next_round";
const OPTIMIZER: &[u8] = b"optimizer";
const PRIVACY: &[u8] = b"privacy";
const PSEUDONYM_KEY: &[u8] = b"pseudonym_key";
const AUDIT_KEY: &[u8] = b"audit_key";
const CONFIG_SHA256: &[u8] = b"config_sha256";
/// The data key, wrapped by the KEK; the one value not sealed under itself.
const DATA_KEY: &[u8] = b"data_key";
const SPEC: &[u8] = b"spec";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open the state database at {path}: {source} (is a covey-server already running on this directory?)"
    )]
    Open { path: String, source: sled::Error },
    #[error("state database: {0}")]
    Db(#[from] sled::Error),
    #[error("state database is corrupt: {0}")]
    Corrupt(String),
    #[error("model version {0} is not stored")]
    NoSuchVersion(u64),
    #[error("the state directory is not initialised (missing {0}); run `covey-server init` first")]
    NotInitialised(&'static str),
    #[error(transparent)]
    AuditKey(#[from] AuditKeyError),
    #[error("writing the audit export: {0}")]
    Write(#[from] std::io::Error),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error(
        "this database was written without encryption at rest by an older covey-server; export what you need and start a new state directory"
    )]
    Unencrypted,
}

impl From<TransactionError<()>> for StoreError {
    fn from(e: TransactionError<()>) -> Self {
        match e {
            TransactionError::Storage(e) => Self::Db(e),
            TransactionError::Abort(()) => Self::Corrupt("transaction aborted".into()),
        }
    }
}

/// Metadata stored in front of a model's weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelHeader {
    pub version: ModelVersion,
    pub spec: ModelSpec,
    /// The round that produced it; `None` for the initial model.
    pub round: Option<RoundId>,
    pub created_unix_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredModel {
    pub header: ModelHeader,
    pub weights: Vec<f32>,
}

impl StoredModel {
    /// The record as the store keeps it (before sealing), and as the
    /// cluster's object store carries it between root and leaves.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_model(self)
    }

    /// Decodes a record, checking its weights against its spec.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StoreError> {
        decode_model(bytes)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RoundOutcome {
    InFlight,
    Committed {
        version: ModelVersion,
    },
    Aborted {
        reason: String,
    },
    /// The server stopped while the round was in flight; it was retried.
    Abandoned,
}

/// What the server keeps about a round: aggregates only, never anything
/// about an individual client's update.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: RoundId,
    pub base: ModelVersion,
    pub outcome: RoundOutcome,
    pub selected: usize,
    pub accepted: usize,
    pub dropped: usize,
    pub started_unix_ms: u64,
    pub ended_unix_ms: Option<u64>,
    /// Example-weighted mean of the clients' local training loss.
    pub mean_client_loss: Option<f32>,
    /// The committed model on the server's held-out test set, if configured.
    pub test_accuracy: Option<f32>,
    pub test_loss: Option<f32>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Under central DP: the clip this round used, and the ε spent by
    /// the run up to and including it (at the configured δ).
    pub clip: Option<f64>,
    pub epsilon: Option<f64>,
    /// Updates refused while this round ran, by reason.
    pub rejected: std::collections::BTreeMap<String, u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Enrollment {
    pub name: String,
    pub pseudonym: Pseudonym,
    pub role: Role,
    pub enrolled_unix: i64,
    pub not_after_unix: i64,
    pub revoked_unix: Option<i64>,
}

/// What a purge deleted.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Purged {
    pub rounds: Vec<RoundId>,
    pub versions: Vec<ModelVersion>,
}

impl Purged {
    pub fn is_empty(&self) -> bool {
        self.rounds.is_empty() && self.versions.is_empty()
    }
}

pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain data structures always serialize.
    postcard::to_stdvec(value).expect("record serialization is infallible")
}

fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn encode_model(model: &StoredModel) -> Vec<u8> {
    let header = encode(&model.header);
    let mut out = Vec::with_capacity(4 + header.len() + 4 * model.weights.len());
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    for w in &model.weights {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out
}

fn decode_model(bytes: &[u8]) -> Result<StoredModel, StoreError> {
    let corrupt = |d: &str| StoreError::Corrupt(format!("model record: {d}"));
    let len_bytes: [u8; 4] = bytes
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| corrupt("truncated header length"))?;
    let header_len = u32::from_le_bytes(len_bytes) as usize;
    let header_bytes = bytes
        .get(4..4 + header_len)
        .ok_or_else(|| corrupt("truncated header"))?;
    let header: ModelHeader = decode(header_bytes, "model header")?;
    let body = &bytes[4 + header_len..];
    let expected = header.spec.param_count();
    if body.len() != 4 * expected {
        return Err(corrupt(&format!(
            "{} weight bytes for {expected} parameters",
            body.len()
        )));
    }
    let weights = body
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok(StoredModel { header, weights })
}

/// The audit key and where the chain goes on, loaded on first use.
struct Chain {
    signer: AuditSigner,
    head: ChainHead,
}

/// Audit entries sealed but not yet stored; the chain's head moves only
/// when the caller's transaction stored them.
struct Pending<'a> {
    chain: MutexGuard<'a, Option<Chain>>,
    rows: Vec<([u8; 8], Vec<u8>)>,
    head: ChainHead,
}

impl Pending<'_> {
    fn insert(
        &self,
        audit: &sled::transaction::TransactionalTree,
    ) -> Result<(), ConflictableTransactionError<()>> {
        for (key, value) in &self.rows {
            audit.insert(key, value.as_slice())?;
        }
        Ok(())
    }

    fn stored(mut self) {
        if let Some(chain) = self.chain.as_mut() {
            chain.head = self.head;
        }
    }
}

/// The audit event a round record's outcome calls for, if any.
pub fn round_event(record: &RoundRecord) -> Option<AuditEvent> {
    let round = record.round.0;
    match &record.outcome {
        RoundOutcome::InFlight => Some(AuditEvent::RoundStarted {
            round,
            base_version: record.base.0,
            selected: record.selected,
        }),
        RoundOutcome::Committed { version } => Some(AuditEvent::RoundCommitted {
            round,
            version: version.0,
            cohort: record.accepted,
            epsilon: record.epsilon,
            rejected: record.rejected.clone(),
        }),
        RoundOutcome::Aborted { reason } => Some(AuditEvent::RoundAborted {
            round,
            reason: reason.clone(),
            cohort: record.accepted,
            rejected: record.rejected.clone(),
        }),
        RoundOutcome::Abandoned => Some(AuditEvent::RoundAbandoned { round }),
    }
}

/// A dashboard login, stored under the SHA-256 of its token; the token
/// itself is never stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Login {
    pub actor: Pseudonym,
    pub role: Role,
    pub issued_unix: i64,
    pub expires_unix: i64,
}

pub struct Store {
    db: sled::Db,
    logins: sled::Tree,
    models: sled::Tree,
    rounds: sled::Tree,
    registry: sled::Tree,
    audit: sled::Tree,
    meta: sled::Tree,
    chain: Mutex<Option<Chain>>,
    data_key: DataKey,
}

/// Where a value lives, as the associated data of its seal.
fn location(tree: &sled::Tree, key: &[u8]) -> Vec<u8> {
    [tree.name().as_ref(), b"/", key].concat()
}

impl Store {
    /// Opens (or creates) the database; `kek` unwraps its data key. A wrong
    /// KEK is refused before anything is written.
    pub fn open(path: &Path, kek: &Kek) -> Result<Self, StoreError> {
        // Every write flushes explicitly, so sled's background flusher is
        // off; it would also hold the file lock for a while after a drop.
        // sled's default 1 GiB cache would keep every model version written.
        let config = sled::Config::new()
            .path(path)
            .flush_every_ms(None)
            .cache_capacity(64 << 20);
        let mut attempts = 0;
        let db = loop {
            match config.open() {
                Ok(db) => break db,
                // A handle dropped a moment ago may still be releasing the lock.
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock") && attempts < 20 =>
                {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(source) => {
                    return Err(StoreError::Open {
                        path: path.display().to_string(),
                        source,
                    });
                }
            }
        };
        let meta = db.open_tree("meta")?;
        let data_key = match meta.get(DATA_KEY)? {
            Some(wrapped) => DataKey::unwrap(&wrapped, kek)?,
            None if meta.get(CURRENT_VERSION)?.is_some() => return Err(StoreError::Unencrypted),
            None => {
                let key = DataKey::generate()?;
                meta.insert(DATA_KEY, key.wrap(kek)?)?;
                db.flush()?;
                key
            }
        };
        Ok(Self {
            models: db.open_tree("models")?,
            rounds: db.open_tree("rounds")?,
            registry: db.open_tree("registry")?,
            audit: db.open_tree("audit")?,
            logins: db.open_tree("logins")?,
            meta,
            chain: Mutex::new(None),
            data_key,
            db,
        })
    }

    /// Re-wraps the data key under `new`; no data is rewritten. The caller
    /// opened the store with the current KEK, which proves it holds it.
    pub fn rotate_kek(&self, new: &Kek) -> Result<(), StoreError> {
        let wrapped = self.data_key.wrap(new)?;
        let pending = self.seal([AuditEvent::KeyRotated])?;
        (&self.meta, &self.audit)
            .transaction(|(meta, audit)| {
                meta.insert(DATA_KEY, wrapped.as_slice())?;
                pending.insert(audit)?;
                Ok(())
            })
            .map_err(StoreError::from)?;
        self.db.flush()?;
        pending.stored();
        Ok(())
    }

    /// `plain`, sealed for `key` in `tree`.
    fn sealed(&self, tree: &sled::Tree, key: &[u8], plain: &[u8]) -> Result<Vec<u8>, StoreError> {
        Ok(self.data_key.seal(&location(tree, key), plain)?)
    }

    /// The plaintext stored at `key` in `tree`.
    fn get(&self, tree: &sled::Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        tree.get(key)?
            .map(|v| Ok(self.data_key.open(&location(tree, key), &v)?))
            .transpose()
    }

    /// Every plaintext value in `tree`, in key order.
    fn values(&self, tree: &sled::Tree) -> Result<Vec<Vec<u8>>, StoreError> {
        tree.iter()
            .map(|kv| {
                let (k, v) = kv?;
                Ok(self.data_key.open(&location(tree, &k), &v)?)
            })
            .collect()
    }

    /// The audit chain, loading its key (made on first use by state
    /// directories older than the trail) and head.
    fn chain(&self) -> Result<MutexGuard<'_, Option<Chain>>, StoreError> {
        // A panic elsewhere cannot leave the head half-moved: it moves in one store.
        let mut guard = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            let pkcs8 = match self.get(&self.meta, AUDIT_KEY)? {
                Some(key) => key,
                None => {
                    let key = AuditSigner::generate()?;
                    self.meta
                        .insert(AUDIT_KEY, self.sealed(&self.meta, AUDIT_KEY, &key)?)?;
                    self.db.flush()?;
                    key
                }
            };
            let head = match self.audit.last()? {
                Some((key, value)) => {
                    let seq: [u8; 8] = key
                        .as_ref()
                        .try_into()
                        .map_err(|_| StoreError::Corrupt("audit entry key".into()))?;
                    let value = self.data_key.open(&location(&self.audit, &key), &value)?;
                    let entry: SealedEntry = decode(&value, "audit entry")?;
                    ChainHead::after(&entry, u64::from_be_bytes(seq))
                }
                None => ChainHead::EMPTY,
            };
            *guard = Some(Chain {
                signer: AuditSigner::from_pkcs8(&pkcs8)?,
                head,
            });
        }
        Ok(guard)
    }

    fn seal(
        &self,
        events: impl IntoIterator<Item = AuditEvent>,
    ) -> Result<Pending<'_>, StoreError> {
        let chain = self.chain()?;
        let Some(Chain { signer, head }) = chain.as_ref() else {
            return Err(StoreError::Corrupt("audit chain not loaded".into()));
        };
        let (sealed, next) = signer.seal(*head, unix_ms_now(), events);
        let rows = sealed
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let key = (head.next_seq + i as u64).to_be_bytes();
                Ok((key, self.sealed(&self.audit, &key, &encode(e))?))
            })
            .collect::<Result<_, StoreError>>()?;
        Ok(Pending {
            chain,
            rows,
            head: next,
        })
    }

    /// Appends events that go with no other write.
    pub fn audit(&self, events: impl IntoIterator<Item = AuditEvent>) -> Result<(), StoreError> {
        let pending = self.seal(events)?;
        self.audit
            .transaction(|audit| pending.insert(audit))
            .map_err(StoreError::from)?;
        self.db.flush()?;
        pending.stored();
        Ok(())
    }

    /// Records a start of `covey-server run` under the configuration whose
    /// SHA-256 is `config_sha256`, noting when it changed.
    pub fn audit_start(&self, config_sha256: &str) -> Result<(), StoreError> {
        let previous = self
            .get(&self.meta, CONFIG_SHA256)?
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        let mut events = Vec::new();
        if previous.as_deref() != Some(config_sha256) {
            events.push(AuditEvent::ConfigChanged {
                from_sha256: previous,
                to_sha256: config_sha256.to_owned(),
            });
        }
        events.push(AuditEvent::ServerStarted {
            config_sha256: config_sha256.to_owned(),
        });
        let pending = self.seal(events)?;
        let config = self.sealed(&self.meta, CONFIG_SHA256, config_sha256.as_bytes())?;
        (&self.audit, &self.meta)
            .transaction(|(audit, meta)| {
                pending.insert(audit)?;
                meta.insert(CONFIG_SHA256, config.as_slice())?;
                Ok(())
            })
            .map_err(StoreError::from)?;
        self.db.flush()?;
        pending.stored();
        Ok(())
    }

    /// The data key, for what this state directory's server keeps outside
    /// the database: a cluster's state in JetStream, sealed under the same
    /// key every provisioned copy of the directory unwraps.
    pub fn data_key(&self) -> DataKey {
        self.data_key.clone()
    }

    /// The audit signing key, for a trail kept outside the database: a
    /// cluster root's, which verifies under this directory's public key.
    pub fn audit_signer(&self) -> Result<AuditSigner, StoreError> {
        // Loading the chain makes the key on first use.
        drop(self.chain()?);
        let pkcs8 = self
            .get(&self.meta, AUDIT_KEY)?
            .ok_or_else(|| StoreError::Corrupt("audit key missing".into()))?;
        Ok(AuditSigner::from_pkcs8(&pkcs8)?)
    }

    /// The audit public key file's text.
    pub fn audit_public_key(&self) -> Result<String, StoreError> {
        let chain = self.chain()?;
        chain
            .as_ref()
            .map(|c| c.signer.public_key_text())
            .ok_or_else(|| StoreError::Corrupt("audit chain not loaded".into()))
    }

    /// Every stored audit entry, in order.
    pub fn audit_entries(&self) -> Result<Vec<SealedEntry>, StoreError> {
        self.values(&self.audit)?
            .iter()
            .map(|v| decode(v, "audit entry"))
            .collect()
    }

    /// Stored audit entries from sequence number `first` on.
    pub fn audit_entries_from(&self, first: u64) -> Result<Vec<SealedEntry>, StoreError> {
        self.audit
            .range(first.to_be_bytes()..)
            .map(|kv| {
                let (k, v) = kv?;
                let plain = self.data_key.open(&location(&self.audit, &k), &v)?;
                decode(&plain, "audit entry")
            })
            .collect()
    }

    /// Records the export, then writes the whole trail, one JSON line per
    /// entry, ending with that record. Returns the number of entries.
    pub fn export_audit(&self, out: &mut impl Write) -> Result<u64, StoreError> {
        let entries = self.chain()?.as_ref().map_or(0, |c| c.head.next_seq) + 1;
        self.audit([AuditEvent::AuditExported { entries }])?;
        let mut written = 0;
        for entry in self.audit_entries()? {
            writeln!(out, "{}", entry.to_line())?;
            written += 1;
        }
        out.flush()?;
        if written != entries {
            return Err(StoreError::Corrupt(format!(
                "the audit trail holds {written} entries, its head says {entries}"
            )));
        }
        Ok(written)
    }

    /// Writes the initial state: version 0 and the pseudonym secret.
    pub fn initialise(
        &self,
        spec: &ModelSpec,
        weights: Vec<f32>,
        pseudonym_key: &[u8],
    ) -> Result<(), StoreError> {
        let model = StoredModel {
            header: ModelHeader {
                version: ModelVersion::INITIAL,
                spec: spec.clone(),
                round: None,
                created_unix_ms: unix_ms_now(),
            },
            weights,
        };
        let zero = 0u64.to_be_bytes();
        let encoded = self.sealed(&self.models, &zero, &encode_model(&model))?;
        let meta_rows = [
            (CURRENT_VERSION, zero.to_vec()),
            (NEXT_ROUND, 1u64.to_be_bytes().to_vec()),
            (PSEUDONYM_KEY, pseudonym_key.to_vec()),
            (SPEC, encode(&spec)),
        ]
        .into_iter()
        .map(|(k, v)| Ok((k, self.sealed(&self.meta, k, &v)?)))
        .collect::<Result<Vec<_>, StoreError>>()?;
        let pending = self.seal([AuditEvent::Initialised {
            model: spec.to_string(),
            parameters: spec.param_count() as u64,
        }])?;
        (&self.models, &self.meta, &self.audit).transaction(|(models, meta, audit)| {
            models.insert(&zero, encoded.as_slice())?;
            for (key, value) in &meta_rows {
                meta.insert(*key, value.as_slice())?;
            }
            pending.insert(audit)?;
            Ok::<(), ConflictableTransactionError<()>>(())
        })?;
        self.db.flush()?;
        pending.stored();
        Ok(())
    }

    fn meta_u64(&self, key: &'static [u8]) -> Result<u64, StoreError> {
        let bytes = self
            .get(&self.meta, key)?
            .ok_or(StoreError::NotInitialised("meta record"))?;
        let arr: [u8; 8] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| StoreError::Corrupt(format!("meta {}", String::from_utf8_lossy(key))))?;
        Ok(u64::from_be_bytes(arr))
    }

    pub fn current_version(&self) -> Result<ModelVersion, StoreError> {
        self.meta_u64(CURRENT_VERSION).map(ModelVersion)
    }

    pub fn next_round(&self) -> Result<RoundId, StoreError> {
        self.meta_u64(NEXT_ROUND).map(RoundId)
    }

    pub fn spec(&self) -> Result<ModelSpec, StoreError> {
        let bytes = self
            .get(&self.meta, SPEC)?
            .ok_or(StoreError::NotInitialised("model spec"))?;
        decode(&bytes, "model spec")
    }

    pub fn pseudonym_key(&self) -> Result<Vec<u8>, StoreError> {
        self.get(&self.meta, PSEUDONYM_KEY)?
            .ok_or(StoreError::NotInitialised("pseudonym key"))
    }

    pub fn optimizer_state(&self) -> Result<OptimizerState, StoreError> {
        match self.get(&self.meta, OPTIMIZER)? {
            Some(bytes) => decode(&bytes, "optimizer state"),
            None => Ok(OptimizerState::default()),
        }
    }

    /// The privacy spent so far, if any round committed under DP.
    pub fn privacy_ledger(&self) -> Result<Option<PrivacyLedger>, StoreError> {
        self.get(&self.meta, PRIVACY)?
            .map(|bytes| {
                decode(&bytes, "privacy ledger").or_else(|e| {
                    // Written before the ledger kept its history.
                    decode::<crate::rounds::dp::LegacyPrivacyLedger>(&bytes, "privacy ledger")
                        .map(Into::into)
                        .map_err(|_| e)
                })
            })
            .transpose()
    }

    pub fn model(&self, version: ModelVersion) -> Result<StoredModel, StoreError> {
        let bytes = self
            .get(&self.models, &version.0.to_be_bytes())?
            .ok_or(StoreError::NoSuchVersion(version.0))?;
        let model = decode_model(&bytes)?;
        if model.header.version != version {
            return Err(StoreError::Corrupt(format!(
                "record for {version} holds {}",
                model.header.version
            )));
        }
        Ok(model)
    }

    pub fn versions(&self) -> Result<Vec<ModelVersion>, StoreError> {
        self.models
            .iter()
            .keys()
            .map(|k| {
                let k = k?;
                let arr: [u8; 8] = k
                    .as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("model key".into()))?;
                Ok(ModelVersion(u64::from_be_bytes(arr)))
            })
            .collect()
    }

    /// Records the start of a round and reserves its id, durably, before
    /// any task is sent.
    pub fn begin_round(&self, record: &RoundRecord) -> Result<(), StoreError> {
        let key = record.round.0.to_be_bytes();
        let value = self.sealed(&self.rounds, &key, &encode(record))?;
        let next = self.sealed(&self.meta, NEXT_ROUND, &record.round.next().0.to_be_bytes())?;
        let pending = self.seal(round_event(record))?;
        (&self.rounds, &self.meta, &self.audit).transaction(|(rounds, meta, audit)| {
            rounds.insert(&key, value.as_slice())?;
            meta.insert(NEXT_ROUND, next.as_slice())?;
            pending.insert(audit)?;
            Ok::<(), ConflictableTransactionError<()>>(())
        })?;
        self.db.flush()?;
        pending.stored();
        Ok(())
    }

    /// Stores a new version, its round record and the optimizer moments in
    /// one transaction.
    pub fn commit_round(
        &self,
        model: &StoredModel,
        record: &RoundRecord,
        optimizer: &OptimizerState,
        privacy: Option<&PrivacyLedger>,
    ) -> Result<(), StoreError> {
        let version = model.header.version;
        if version != self.current_version()?.next() {
            return Err(StoreError::Corrupt(format!(
                "commit of {version} does not follow {}",
                self.current_version()?
            )));
        }
        let version_key = version.0.to_be_bytes();
        let round_key = record.round.0.to_be_bytes();
        let model_bytes = self.sealed(&self.models, &version_key, &encode_model(model))?;
        let record_bytes = self.sealed(&self.rounds, &round_key, &encode(record))?;
        let optimizer_bytes = self.sealed(&self.meta, OPTIMIZER, &encode(optimizer))?;
        let privacy_bytes = privacy
            .map(|p| self.sealed(&self.meta, PRIVACY, &encode(p)))
            .transpose()?;
        let current = self.sealed(&self.meta, CURRENT_VERSION, &version_key)?;
        let pending = self.seal(round_event(record))?;
        let trees = (&self.models, &self.rounds, &self.meta, &self.audit);
        trees.transaction(|(models, rounds, meta, audit)| {
            models.insert(&version_key, model_bytes.as_slice())?;
            rounds.insert(&round_key, record_bytes.as_slice())?;
            meta.insert(OPTIMIZER, optimizer_bytes.as_slice())?;
            if let Some(bytes) = &privacy_bytes {
                // The version and the privacy it spent are stored together or not at all.
                meta.insert(PRIVACY, bytes.as_slice())?;
            }
            meta.insert(CURRENT_VERSION, current.as_slice())?;
            pending.insert(audit)?;
            Ok::<(), ConflictableTransactionError<()>>(())
        })?;
        self.db.flush()?;
        pending.stored();
        Ok(())
    }

    /// Updates a round record that commits nothing (an abort).
    pub fn put_round(&self, record: &RoundRecord) -> Result<(), StoreError> {
        let key = record.round.0.to_be_bytes();
        let value = self.sealed(&self.rounds, &key, &encode(record))?;
        let pending = self.seal(round_event(record))?;
        (&self.rounds, &self.audit).transaction(|(rounds, audit)| {
            rounds.insert(&key, value.as_slice())?;
            pending.insert(audit)?;
            Ok::<(), ConflictableTransactionError<()>>(())
        })?;
        self.db.flush()?;
        pending.stored();
        Ok(())
    }

    pub fn rounds(&self) -> Result<Vec<RoundRecord>, StoreError> {
        self.values(&self.rounds)?
            .iter()
            .map(|v| decode(v, "round record"))
            .collect()
    }

    /// Marks rounds left in flight by a crash as abandoned; returns how many.
    pub fn recover(&self) -> Result<usize, StoreError> {
        let mut abandoned = 0;
        for mut record in self.rounds()? {
            if record.outcome == RoundOutcome::InFlight {
                record.outcome = RoundOutcome::Abandoned;
                record.ended_unix_ms = None;
                self.put_round(&record)?;
                abandoned += 1;
            }
        }
        Ok(abandoned)
    }

    pub fn enroll(&self, e: &Enrollment) -> Result<(), StoreError> {
        let value = self.sealed(&self.registry, e.pseudonym.as_bytes(), &encode(e))?;
        let pending = self.seal([AuditEvent::Enrolled {
            client: e.pseudonym,
            role: e.role,
            not_after_unix: e.not_after_unix,
        }])?;
        (&self.registry, &self.audit).transaction(|(registry, audit)| {
            registry.insert(e.pseudonym.as_bytes(), value.as_slice())?;
            pending.insert(audit)?;
            Ok::<(), ConflictableTransactionError<()>>(())
        })?;
        self.db.flush()?;
        pending.stored();
        Ok(())
    }

    pub fn enrollments(&self) -> Result<Vec<Enrollment>, StoreError> {
        self.values(&self.registry)?
            .iter()
            .map(|v| decode(v, "enrollment"))
            .collect()
    }

    /// Stores a dashboard login with the audit entry that issues it.
    pub fn put_login(&self, digest: &LoginDigest, login: &Login) -> Result<(), StoreError> {
        let value = self.sealed(&self.logins, &digest.0, &encode(login))?;
        let pending = self.seal([AuditEvent::DashboardLoginIssued {
            actor: login.actor,
            role: login.role,
            login: digest.to_string(),
            expires_unix: login.expires_unix,
        }])?;
        (&self.logins, &self.audit).transaction(|(logins, audit)| {
            logins.insert(&digest.0, value.as_slice())?;
            pending.insert(audit)?;
            Ok::<(), ConflictableTransactionError<()>>(())
        })?;
        self.db.flush()?;
        pending.stored();
        Ok(())
    }

    /// Every stored dashboard login, expired ones included.
    pub fn logins(&self) -> Result<Vec<(LoginDigest, Login)>, StoreError> {
        self.logins
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let digest: [u8; 32] = k
                    .as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("login key is not a SHA-256".into()))?;
                let plain = self.data_key.open(&location(&self.logins, &k), &v)?;
                Ok((LoginDigest(digest), decode(&plain, "login")?))
            })
            .collect()
    }

    /// Deletes the given logins of `actor`, with one audit entry naming
    /// them; nothing is written when the list is empty.
    pub fn remove_logins(
        &self,
        actor: Pseudonym,
        digests: &[LoginDigest],
    ) -> Result<(), StoreError> {
        if digests.is_empty() {
            return Ok(());
        }
        let pending = self.seal([AuditEvent::DashboardLoginsRevoked {
            actor,
            logins: digests.iter().map(|d| d.to_string()).collect(),
        }])?;
        (&self.logins, &self.audit).transaction(|(logins, audit)| {
            for d in digests {
                logins.remove(&d.0)?;
            }
            pending.insert(audit)?;
            Ok::<(), ConflictableTransactionError<()>>(())
        })?;
        self.db.flush()?;
        pending.stored();
        Ok(())
    }

    /// Revokes every active certificate enrolled under `name`; returns
    /// their pseudonyms.
    pub fn revoke(&self, name: &str, now_unix: i64) -> Result<Vec<Pseudonym>, StoreError> {
        let revoked: Vec<Enrollment> = self
            .enrollments()?
            .into_iter()
            .filter(|e| e.name == name && e.revoked_unix.is_none())
            .map(|e| Enrollment {
                revoked_unix: Some(now_unix),
                ..e
            })
            .collect();
        let rows = revoked
            .iter()
            .map(|e| {
                let key = e.pseudonym.as_bytes();
                Ok((
                    key.to_vec(),
                    Some(self.sealed(&self.registry, key, &encode(e))?),
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let events = revoked.iter().map(|e| AuditEvent::Revoked {
            client: e.pseudonym,
        });
        self.write_registry(rows, events)?;
        Ok(revoked.iter().map(|e| e.pseudonym).collect())
    }

    /// Deletes what `retention` no longer keeps, as of `now_ms`, with the
    /// audit entry that lists it, in one transaction. Rounds in flight and
    /// the current version are never deleted.
    pub fn purge(&self, retention: Retention, now_ms: u64) -> Result<Purged, StoreError> {
        let mut purged = Purged::default();
        if let Some(keep) = retention.rounds {
            let cutoff = now_ms.saturating_sub(keep.as_millis() as u64);
            purged.rounds = self
                .rounds()?
                .iter()
                .filter(|r| r.outcome != RoundOutcome::InFlight)
                .filter(|r| r.ended_unix_ms.unwrap_or(r.started_unix_ms) < cutoff)
                .map(|r| r.round)
                .collect();
        }
        if let Some(keep) = retention.versions {
            let current = self.current_version()?;
            let versions = self.versions()?;
            let old = versions.len().saturating_sub(keep.get());
            purged.versions = versions[..old]
                .iter()
                .copied()
                .filter(|v| *v != current)
                .collect();
        }
        if purged.is_empty() {
            return Ok(purged);
        }
        let pending = self.seal([AuditEvent::Purged {
            rounds: purged.rounds.iter().map(|r| r.0).collect(),
            versions: purged.versions.iter().map(|v| v.0).collect(),
        }])?;
        (&self.rounds, &self.models, &self.audit).transaction(|(rounds, models, audit)| {
            for r in &purged.rounds {
                rounds.remove(&r.0.to_be_bytes())?;
            }
            for v in &purged.versions {
                models.remove(&v.0.to_be_bytes())?;
            }
            pending.insert(audit)?;
            Ok::<(), ConflictableTransactionError<()>>(())
        })?;
        self.db.flush()?;
        pending.stored();
        Ok(purged)
    }

    /// The right to erasure: deletes every enrollment under `name`, the only
    /// link between that name and its pseudonyms, which leaves them
    /// unadmitted. The audit trail keeps the pseudonyms alone, so its chain
    /// stays whole. Returns the pseudonyms.
    pub fn forget(&self, name: &str) -> Result<Vec<Pseudonym>, StoreError> {
        let forgotten: Vec<Pseudonym> = self
            .enrollments()?
            .into_iter()
            .filter(|e| e.name == name)
            .map(|e| e.pseudonym)
            .collect();
        let rows = forgotten
            .iter()
            .map(|p| (p.as_bytes().to_vec(), None))
            .collect();
        let events = forgotten
            .iter()
            .map(|p| AuditEvent::Forgotten { client: *p });
        self.write_registry(rows, events)?;
        Ok(forgotten)
    }

    /// Writes (`Some`) or deletes (`None`) registry rows with their audit
    /// entries, in one transaction.
    fn write_registry(
        &self,
        rows: Vec<(Vec<u8>, Option<Vec<u8>>)>,
        events: impl IntoIterator<Item = AuditEvent>,
    ) -> Result<(), StoreError> {
        let pending = self.seal(events)?;
        (&self.registry, &self.audit).transaction(|(registry, audit)| {
            for (key, value) in &rows {
                match value {
                    Some(v) => registry.insert(key.as_slice(), v.as_slice())?,
                    None => registry.remove(key.as_slice())?,
                };
            }
            pending.insert(audit)?;
            Ok::<(), ConflictableTransactionError<()>>(())
        })?;
        self.db.flush()?;
        pending.stored();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use covey_protocol::model::Architecture;

    fn kek() -> Kek {
        Kek::from_bytes([7; 32], "test")
    }

    /// Every byte of the database's files.
    fn db_bytes(dir: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        for entry in walk(dir) {
            out.extend(std::fs::read(entry).unwrap());
        }
        out
    }

    fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                files.extend(walk(&path));
            } else {
                files.push(path);
            }
        }
        files
    }

    #[test]
    fn values_are_sealed_and_a_wrong_kek_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ModelSpec::mnist(Architecture::LogReg);
        // A recognisable weight pattern, and a recognisable name.
        let weights: Vec<f32> = (0..spec.param_count())
            .map(|i| 1.0 + i as f32 / 1024.0)
            .collect();
        let pattern: Vec<u8> = weights[100..116]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        {
            let store = Store::open(dir.path(), &kek()).unwrap();
            store.initialise(&spec, weights.clone(), &[9; 32]).unwrap();
            store
                .enroll(&Enrollment {
                    name: "alice-phone".into(),
                    pseudonym: Pseudonym::from_bytes([1; 8]),
                    role: Role::Device,
                    enrolled_unix: 0,
                    not_after_unix: 1,
                    revoked_unix: None,
                })
                .unwrap();
        }
        let bytes = db_bytes(dir.path());
        assert!(!bytes.windows(pattern.len()).any(|w| w == pattern));
        assert!(!bytes.windows(11).any(|w| w == b"alice-phone"));

        let wrong = Kek::from_bytes([8; 32], "env:WRONG");
        let err = Store::open(dir.path(), &wrong).err().unwrap().to_string();
        assert!(
            err.contains("env:WRONG") && err.contains("wrong key"),
            "{err}"
        );
        assert_eq!(
            Store::open(dir.path(), &kek())
                .unwrap()
                .enrollments()
                .unwrap()
                .len(),
            1
        );

        // Rotation: the new KEK opens, the old one no longer does, and the
        // data is as it was.
        let new = Kek::from_bytes([9; 32], "new");
        {
            let store = Store::open(dir.path(), &kek()).unwrap();
            store.rotate_kek(&new).unwrap();
        }
        assert!(Store::open(dir.path(), &kek()).is_err());
        let store = Store::open(dir.path(), &new).unwrap();
        assert_eq!(store.model(ModelVersion(0)).unwrap().weights, weights);
        assert_eq!(store.enrollments().unwrap()[0].name, "alice-phone");
        let events: Vec<AuditEvent> = store
            .audit_entries()
            .unwrap()
            .iter()
            .map(|e| e.entry().unwrap().event)
            .collect();
        assert!(matches!(events.last(), Some(AuditEvent::KeyRotated)));
    }

    #[test]
    fn retention_purges_old_rounds_and_versions_but_never_the_current_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &kek()).unwrap();
        let spec = ModelSpec::mnist(Architecture::LogReg);
        store
            .initialise(&spec, spec.initial_weights(0), &[9; 32])
            .unwrap();
        let day = 86_400_000u64;
        for round in 1..=4u64 {
            let mut r = record(
                round,
                RoundOutcome::Committed {
                    version: ModelVersion(round),
                },
            );
            r.ended_unix_ms = Some(round * day);
            store
                .begin_round(&record(round, RoundOutcome::InFlight))
                .unwrap();
            let model = StoredModel {
                header: ModelHeader {
                    version: ModelVersion(round),
                    spec: spec.clone(),
                    round: Some(RoundId(round)),
                    created_unix_ms: 0,
                },
                weights: vec![0.0; spec.param_count()],
            };
            store
                .commit_round(&model, &r, &OptimizerState::default(), None)
                .unwrap();
        }
        store
            .begin_round(&record(5, RoundOutcome::InFlight))
            .unwrap();
        assert!(
            store
                .purge(Retention::default(), 100 * day)
                .unwrap()
                .is_empty()
        );
        let retention = Retention {
            rounds: Some(std::time::Duration::from_secs(86_400 * 2)),
            versions: std::num::NonZeroUsize::new(2),
        };
        // At day 4.5, rounds that ended before day 2.5 go: 1 and 2.
        let purged = store.purge(retention, 4 * day + day / 2).unwrap();
        assert_eq!(purged.rounds, vec![RoundId(1), RoundId(2)]);
        assert_eq!(
            purged.versions,
            vec![ModelVersion(0), ModelVersion(1), ModelVersion(2)]
        );
        let left: Vec<u64> = store.rounds().unwrap().iter().map(|r| r.round.0).collect();
        assert_eq!(left, vec![3, 4, 5]);
        assert_eq!(
            store.versions().unwrap(),
            vec![ModelVersion(3), ModelVersion(4)]
        );
        assert!(matches!(
            store
                .audit_entries()
                .unwrap()
                .last()
                .unwrap()
                .entry()
                .unwrap()
                .event,
            AuditEvent::Purged { .. }
        ));
        // Nothing more to do: nothing more recorded.
        let entries = store.audit_entries().unwrap().len();
        assert!(
            store
                .purge(retention, 4 * day + day / 2)
                .unwrap()
                .is_empty()
        );
        assert_eq!(store.audit_entries().unwrap().len(), entries);
    }

    #[test]
    fn a_value_moved_to_another_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &kek()).unwrap();
        let spec = ModelSpec::mnist(Architecture::LogReg);
        store
            .initialise(&spec, spec.initial_weights(0), &[9; 32])
            .unwrap();
        store
            .begin_round(&record(1, RoundOutcome::InFlight))
            .unwrap();
        // Someone with write access copies round 1's record over round 2.
        let sealed = store.rounds.get(1u64.to_be_bytes()).unwrap().unwrap();
        store.rounds.insert(2u64.to_be_bytes(), sealed).unwrap();
        let err = store.rounds().unwrap_err().to_string();
        assert!(err.contains("cannot be decrypted"), "{err}");
    }

    fn record(round: u64, outcome: RoundOutcome) -> RoundRecord {
        RoundRecord {
            round: RoundId(round),
            base: ModelVersion(round - 1),
            outcome,
            selected: 3,
            accepted: 3,
            dropped: 0,
            started_unix_ms: 1,
            ended_unix_ms: None,
            mean_client_loss: None,
            test_accuracy: None,
            test_loss: None,
            bytes_up: 0,
            bytes_down: 0,
            clip: None,
            epsilon: None,
            rejected: Default::default(),
        }
    }

    #[test]
    fn versions_commit_in_order_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ModelSpec::mnist(Architecture::LogReg);
        {
            let store = Store::open(dir.path(), &kek()).unwrap();
            store
                .initialise(&spec, spec.initial_weights(0), &[9; 32])
                .unwrap();
            store
                .begin_round(&record(1, RoundOutcome::InFlight))
                .unwrap();
            let model = StoredModel {
                header: ModelHeader {
                    version: ModelVersion(1),
                    spec: spec.clone(),
                    round: Some(RoundId(1)),
                    created_unix_ms: 5,
                },
                weights: vec![0.5; spec.param_count()],
            };
            let state = OptimizerState {
                m: vec![1.0],
                v: vec![],
            };
            let mut ledger = PrivacyLedger::new(covey_privacy::ClipNorm::new(0.5).unwrap());
            ledger.rounds = 1;
            store
                .commit_round(
                    &model,
                    &record(
                        1,
                        RoundOutcome::Committed {
                            version: ModelVersion(1),
                        },
                    ),
                    &state,
                    Some(&ledger),
                )
                .unwrap();
            // Committing the same version twice is refused.
            assert!(
                store
                    .commit_round(&model, &record(1, RoundOutcome::InFlight), &state, None)
                    .is_err()
            );
            assert_eq!(store.privacy_ledger().unwrap(), Some(ledger.clone()));
            store
                .begin_round(&record(2, RoundOutcome::InFlight))
                .unwrap();
        }
        let store = Store::open(dir.path(), &kek()).unwrap();
        assert_eq!(store.current_version().unwrap(), ModelVersion(1));
        assert_eq!(store.next_round().unwrap(), RoundId(3));
        assert_eq!(store.model(ModelVersion(1)).unwrap().weights[0], 0.5);
        assert_eq!(store.optimizer_state().unwrap().m, vec![1.0]);
        assert_eq!(
            store.versions().unwrap(),
            vec![ModelVersion(0), ModelVersion(1)]
        );
        assert_eq!(store.recover().unwrap(), 1);
        assert_eq!(store.rounds().unwrap()[1].outcome, RoundOutcome::Abandoned);
        assert!(matches!(
            store.model(ModelVersion(7)),
            Err(StoreError::NoSuchVersion(7))
        ));
    }

    #[test]
    fn corrupt_model_records_are_named() {
        assert!(
            decode_model(&[1, 2])
                .unwrap_err()
                .to_string()
                .contains("truncated header length")
        );
        let spec = ModelSpec::mnist(Architecture::LogReg);
        let mut bytes = encode_model(&StoredModel {
            header: ModelHeader {
                version: ModelVersion(0),
                spec: spec.clone(),
                round: None,
                created_unix_ms: 0,
            },
            weights: vec![0.0; spec.param_count()],
        });
        bytes.pop();
        assert!(
            decode_model(&bytes)
                .unwrap_err()
                .to_string()
                .contains("weight bytes")
        );
    }

    #[test]
    fn an_uninitialised_directory_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &kek()).unwrap();
        assert!(
            store
                .current_version()
                .unwrap_err()
                .to_string()
                .contains("covey-server init")
        );
    }
}
