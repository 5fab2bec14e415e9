//! The root lease over NATS JetStream KV: one key, `root`, in a replicated
//! bucket, read and swapped on revisions. This module only moves bytes; the
//! decisions are [`Lease`]'s.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use super::{
    at_rest::AtRest,
    lease::{Lease, NotLeader, Outcome, Refused, Request, RootRecord},
};
use crate::state::sealing::DataKey;

/// How long a starting process waits for JetStream to answer.
const STARTUP_PATIENCE: Duration = Duration::from_secs(60);

/// The key the root's lease and state live under.
const ROOT_KEY: &str = "root";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot reach NATS at {urls}: {detail}")]
    Connect { urls: String, detail: String },
    #[error("JetStream bucket '{bucket}': {detail}")]
    Bucket { bucket: String, detail: String },
    #[error("reading the root key: {0}")]
    Read(String),
    #[error("writing to JetStream: {0}")]
    Write(String),
    #[error("watching JetStream: {0}")]
    Watch(String),
    #[error("the root key does not hold a root record: {0}")]
    Corrupt(String),
}

/// Where the cluster's shared state lives.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// NATS URLs of the cluster's nodes; any one that answers will do.
    pub urls: Vec<String>,
    pub bucket: String,
    /// How many NATS nodes hold each value: 3 tolerates one down.
    pub replicas: usize,
    /// How long one request to JetStream may take before it counts as
    /// unavailable.
    pub request_timeout: Duration,
}

/// A connection to the cluster's JetStream, from which each replica opens
/// the buckets it uses.
#[derive(Clone)]
pub struct Cluster {
    js: jetstream::Context,
    config: ClusterConfig,
    at_rest: AtRest,
}

impl Cluster {
    /// Connects, retrying in the background while nodes are down. What
    /// this process writes to JetStream is sealed under `data_key`, the
    /// state directory's (`Store::data_key`).
    pub async fn connect(config: &ClusterConfig, data_key: DataKey) -> Result<Self, ClusterError> {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(config.request_timeout)
            .connect(config.urls.as_slice())
            .await
            .map_err(|e| ClusterError::Connect {
                urls: config.urls.join(","),
                detail: e.to_string(),
            })?;
        let js = jetstream::ContextBuilder::new()
            .timeout(config.request_timeout)
            .build(client);
        Ok(Self {
            js,
            at_rest: AtRest::new(data_key, &config.bucket),
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// How this cluster's values are sealed at rest.
    pub fn at_rest(&self) -> &AtRest {
        &self.at_rest
    }

    /// Retries opening a bucket while JetStream cannot answer yet (a
    /// cluster still electing its leaders, a node just lost), for up to
    /// `STARTUP_PATIENCE`; then the last error.
    pub async fn patiently<T, F, Fut>(&self, open: F) -> Result<T, ClusterError>
    where
        F: Fn(Self) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClusterError>>,
    {
        let deadline = Instant::now() + STARTUP_PATIENCE;
        loop {
            match open(self.clone()).await {
                Ok(t) => return Ok(t),
                Err(e) if Instant::now() < deadline => {
                    debug!("JetStream not ready, retrying: {e}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub(super) fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// A replicated KV bucket, `<bucket><suffix>`, created on first use.
    pub(super) async fn kv_bucket(
        &self,
        suffix: &str,
        history: i64,
    ) -> Result<kv::Store, ClusterError> {
        let bucket = format!("{}{suffix}", self.config.bucket);
        self.js
            .create_or_update_key_value(kv::Config {
                bucket: bucket.clone(),
                history,
                storage: jetstream::stream::StorageType::File,
                num_replicas: self.config.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| ClusterError::Bucket {
                bucket,
                detail: e.to_string(),
            })
    }

    /// What both roles open: the root's key, the object store and the
    /// leaves' bucket, waiting for JetStream as `patiently` does.
    pub async fn open_roles(
        &self,
    ) -> Result<(RootKey, super::objects::Objects, super::leaves::Leaves), ClusterError> {
        let key = self
            .patiently(|c| async move { c.root_key().await })
            .await?;
        let objects = self.patiently(|c| async move { c.objects().await }).await?;
        let leaves = self.patiently(|c| async move { c.leaves().await }).await?;
        Ok((key, objects, leaves))
    }

    /// The root's key, in its bucket, created on the cluster's first start.
    pub async fn root_key(&self) -> Result<RootKey, ClusterError> {
        let kv = self.kv_bucket("", 8).await?;
        Ok(RootKey {
            kv,
            timeout: self.config.request_timeout,
        })
    }
}

/// Forwards the values a KV watch puts, as `parse` reads them, into a
/// channel of `capacity` until its receiver is dropped. Deletions, watch
/// errors and values `parse` refuses (`None`) are skipped.
pub(super) fn forward_puts<T: Send + 'static>(
    mut entries: kv::Watch,
    capacity: usize,
    what: &'static str,
    parse: impl Fn(&str, &[u8]) -> Option<T> + Send + 'static,
) -> mpsc::Receiver<T> {
    use futures_util::StreamExt;
    let (tx, rx) = mpsc::channel(capacity);
    tokio::spawn(async move {
        while let Some(entry) = entries.next().await {
            let entry = match entry {
                Ok(entry) if entry.operation == kv::Operation::Put => entry,
                Ok(_) => continue,
                Err(e) => {
                    debug!("{what} watch: {e}");
                    continue;
                }
            };
            if let Some(value) = parse(&entry.key, &entry.value)
                && tx.send(value).await.is_err()
            {
                return;
            }
        }
    });
    rx
}

/// The root key, in its bucket.
#[derive(Clone)]
pub struct RootKey {
    kv: kv::Store,
    timeout: Duration,
}

impl RootKey {
    /// The key's revision and record; `None` if it was never written.
    pub async fn read(&self) -> Result<Option<(u64, RootRecord)>, ClusterError> {
        let entry = tokio::time::timeout(self.timeout, self.kv.entry(ROOT_KEY))
            .await
            .map_err(|_| ClusterError::Read("timed out".into()))?
            .map_err(|e| ClusterError::Read(e.to_string()))?;
        let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
            return Ok(None);
        };
        let record =
            postcard::from_bytes(&entry.value).map_err(|e| ClusterError::Corrupt(e.to_string()))?;
        Ok(Some((entry.revision, record)))
    }

    /// Makes the write the lease asked for: the key's new revision, or why not.
    pub async fn write(&self, request: &Request) -> Result<u64, Refused> {
        let value = match postcard::to_allocvec(request.record()) {
            Ok(bytes) => Bytes::from(bytes),
            // A record always encodes; refuse rather than write garbage.
            Err(_) => return Err(Refused::Unavailable),
        };
        let sent = async {
            match request {
                Request::Create(_) => match self.kv.create(ROOT_KEY, value).await {
                    Ok(revision) => Ok(revision),
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                        Err(Refused::Conflict)
                    }
                    Err(e) => {
                        debug!("root key create failed: {e}");
                        Err(Refused::Unavailable)
                    }
                },
                Request::Swap { expected, .. } => {
                    match self.kv.update(ROOT_KEY, value, *expected).await {
                        Ok(revision) => Ok(revision),
                        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                            Err(Refused::Conflict)
                        }
                        Err(e) => {
                            debug!("root key swap failed: {e}");
                            Err(Refused::Unavailable)
                        }
                    }
                }
            }
        };
        tokio::time::timeout(self.timeout, sent)
            .await
            .unwrap_or(Err(Refused::Unavailable))
    }
}

/// Where a replica stands, as its driver last saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Standing {
    /// The term this replica leads in, if it does.
    pub leading: Option<u64>,
    /// The committed state, as last read or written.
    pub state: Option<Vec<u8>>,
}

/// Why a proposed state was not committed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error(transparent)]
    NotLeader(#[from] NotLeader),
    #[error("the state was not committed: the lease was lost or the store did not answer")]
    NotCommitted,
    #[error("the lease's driver has stopped")]
    Stopped,
}

struct Proposal {
    state: Vec<u8>,
    reply: oneshot::Sender<Result<u64, ProposeError>>,
}

/// A replica taking part in the root election. Dropping it stops its
/// driver; the lease then lapses and a standby takes over.
pub struct Replica {
    proposals: mpsc::Sender<Proposal>,
    standing: watch::Receiver<Standing>,
    driver: tokio::task::JoinHandle<()>,
}

impl Replica {
    /// Starts the driver of `lease` against `key`.
    pub fn start(key: RootKey, lease: Lease) -> Self {
        let (proposals, rx) = mpsc::channel(16);
        let (tx, standing) = watch::channel(Standing::default());
        let driver = tokio::spawn(drive(key, lease, rx, tx));
        Self {
            proposals,
            standing,
            driver,
        }
    }

    pub fn standing(&self) -> watch::Receiver<Standing> {
        self.standing.clone()
    }

    /// Commits `state` if this replica leads: the key's new revision.
    pub async fn propose(&self, state: Vec<u8>) -> Result<u64, ProposeError> {
        let (reply, answer) = oneshot::channel();
        self.proposals
            .send(Proposal { state, reply })
            .await
            .map_err(|_| ProposeError::Stopped)?;
        answer.await.map_err(|_| ProposeError::Stopped)?
    }

    /// Stops at once, as a crash would: no hand-over, the lease lapses.
    pub fn kill(self) {
        self.driver.abort();
    }
}

async fn drive(
    key: RootKey,
    mut lease: Lease,
    mut proposals: mpsc::Receiver<Proposal>,
    standing: watch::Sender<Standing>,
) {
    let mut waiting: Option<oneshot::Sender<Result<u64, ProposeError>>> = None;
    let mut read_due = Instant::now();
    loop {
        let now = Instant::now();
        if now >= read_due {
            match key.read().await {
                Ok(entry) => lease.observed(entry, Instant::now()),
                // Garbage in the key stalls the cluster until an operator
                // looks; an unreachable store is routine while nodes fail.
                Err(e @ ClusterError::Corrupt(_)) => warn!("{e}"),
                Err(e) => debug!("cannot read the root key: {e}"),
            }
            // Followers read at the renewal cadence: a takeover is noticed
            // within one period of the lease lapsing.
            read_due = Instant::now() + lease.timing().renew_every() / 2;
        }
        while let Some(request) = lease.poll(Instant::now()) {
            let result = key.write(&request).await;
            let outcome = lease.written(result, Instant::now());
            match outcome {
                Outcome::Elected { term } => info!(term, "this replica now holds the root lease"),
                Outcome::Deposed => warn!("this replica lost the root lease"),
                Outcome::Committed { revision, .. } => {
                    if let Some(reply) = waiting.take() {
                        let _ = reply.send(Ok(revision));
                    }
                }
                Outcome::NotCommitted => {
                    if let Some(reply) = waiting.take() {
                        let _ = reply.send(Err(ProposeError::NotCommitted));
                    }
                }
                Outcome::Quiet => {}
            }
            if result.is_err() {
                // Whatever happened, the key says what holds now.
                read_due = Instant::now();
                break;
            }
        }
        if !lease.proposing()
            && let Some(reply) = waiting.take()
        {
            // Dropped unsent: the lease lapsed first.
            let _ = reply.send(Err(ProposeError::NotCommitted));
        }
        let now_standing = Standing {
            leading: lease.leading(Instant::now()),
            state: lease.state().map(<[u8]>::to_vec),
        };
        // Wake watchers only for a change, not every read.
        standing.send_if_modified(|s| {
            let changed = *s != now_standing;
            if changed {
                *s = now_standing;
            }
            changed
        });
        if read_due <= Instant::now() {
            continue;
        }
        let wake = lease.wake(Instant::now()).min(read_due);
        tokio::select! {
            proposal = proposals.recv(), if waiting.is_none() => {
                let Some(Proposal { state, reply }) = proposal else { return };
                match lease.propose(state, Instant::now()) {
                    Ok(()) => waiting = Some(reply),
                    Err(e) => { let _ = reply.send(Err(e.into())); }
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
}
