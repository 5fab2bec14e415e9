//! A leaf aggregator's link to the root, over JetStream: it follows the
//! root's committed state (fetching each new version's weights from the
//! object store, checked against the root's hash), beats with how many
//! devices wait, and forwards partial sums. The hub decides what to do
//! with the root's state; this module only moves bytes.

use std::{sync::Arc, time::Duration};

use covey_protocol::RoundId;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use super::{
    jetstream::{Cluster, ClusterError},
    leaves::{Beat, Report},
    route::LeafId,
    state::RootState,
};

/// The root's latest state, with the committed version's weights.
#[derive(Clone, Debug)]
pub struct RootNews {
    pub state: RootState,
    pub weights: Arc<Vec<f32>>,
}

/// What a leaf sends up.
#[derive(Debug)]
pub enum Outbound {
    /// The unmasked partial sum of `round` (`PartialSum::to_bytes`).
    Partial { round: RoundId, bytes: Vec<u8> },
    /// Nothing to release for `round`.
    Failed { round: RoundId, reason: String },
}

/// How a leaf reaches the cluster.
#[derive(Clone)]
pub struct LeafLink {
    pub cluster: Cluster,
    pub leaf: LeafId,
    /// How often it beats and reads the root's state.
    pub every: Duration,
}

/// The channels between a leaf's hub and its link.
pub struct LinkEnds {
    pub news: mpsc::Receiver<RootNews>,
    pub outbound: mpsc::Sender<Outbound>,
    pub available: watch::Sender<u64>,
}

/// The link's side of the channels.
pub struct LinkSide {
    news: mpsc::Sender<RootNews>,
    outbound: mpsc::Receiver<Outbound>,
    available: watch::Receiver<u64>,
}

/// The channels between a leaf's hub and its link, made before either
/// starts: the hub needs its ends to open, the link the hub's address.
pub fn channels() -> (LinkEnds, LinkSide) {
    let (news_tx, news) = mpsc::channel(16);
    let (outbound, out_rx) = mpsc::channel::<Outbound>(16);
    let (available, available_rx) = watch::channel(0u64);
    (
        LinkEnds {
            news,
            outbound,
            available,
        },
        LinkSide {
            news: news_tx,
            outbound: out_rx,
            available: available_rx,
        },
    )
}

impl LeafLink {
    /// Starts following the root, advertising `addr` to devices' router;
    /// the task ends when the hub drops its ends.
    pub async fn start(
        self,
        side: LinkSide,
        addr: String,
    ) -> Result<tokio::task::JoinHandle<()>, ClusterError> {
        let key = self
            .cluster
            .patiently(|c| async move { c.root_key().await })
            .await?;
        let objects = self
            .cluster
            .patiently(|c| async move { c.objects().await })
            .await?;
        let leaves = self
            .cluster
            .patiently(|c| async move { c.leaves().await })
            .await?;
        let LinkSide {
            news: news_tx,
            outbound: mut out_rx,
            available: available_rx,
        } = side;
        let task = tokio::spawn(async move {
            let mut last_state: Option<Vec<u8>> = None;
            let mut weights: Option<(covey_protocol::ModelVersion, Arc<Vec<f32>>)> = None;
            let mut tick = tokio::time::interval(self.every);
            loop {
                tokio::select! {
                    out = out_rx.recv() => {
                        let Some(out) = out else { return };
                        let (round, report) = match out {
                            Outbound::Partial { round, bytes } => {
                                if let Err(e) = objects.put_partial(round, &self.leaf, &bytes).await {
                                    warn!(round = %round, "cannot store the partial sum: {e}");
                                    (round, Report::Failed { reason: format!("storing the partial sum: {e}") })
                                } else {
                                    (round, Report::Partial { bytes: bytes.len() as u64 })
                                }
                            }
                            Outbound::Failed { round, reason } => (round, Report::Failed { reason }),
                        };
                        if let Err(e) = leaves.report(round, &self.leaf, &report).await {
                            warn!(round = %round, "cannot report to the root: {e}");
                        }
                        continue;
                    }
                    _ = tick.tick() => {}
                }
                if news_tx.is_closed() {
                    return;
                }
                let beat = Beat {
                    available: *available_rx.borrow(),
                    addr: addr.clone(),
                };
                if let Err(e) = leaves.beat(&self.leaf, &beat).await {
                    debug!("heartbeat not written: {e}");
                }
                let record = match key.read().await {
                    Ok(Some((_, record))) => record,
                    Ok(None) => continue,
                    Err(e) => {
                        debug!("cannot read the root's state: {e}");
                        continue;
                    }
                };
                if last_state.as_ref() == Some(&record.state) {
                    continue;
                }
                let state = match RootState::from_bytes(&record.state) {
                    Ok(Some(state)) => state,
                    Ok(None) => continue,
                    Err(e) => {
                        warn!("{e}");
                        continue;
                    }
                };
                let current = match &weights {
                    Some((v, w)) if *v == state.version => w.clone(),
                    _ => match objects.get_model(&state.model).await {
                        Ok(model) => {
                            let w = Arc::new(model.weights);
                            weights = Some((state.version, w.clone()));
                            w
                        }
                        Err(e) => {
                            // Retried on the next tick; the round waits.
                            warn!(version = %state.version, "cannot fetch the committed model: {e}");
                            continue;
                        }
                    },
                };
                last_state = Some(record.state);
                if news_tx
                    .send(RootNews {
                        state,
                        weights: current,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(task)
    }
}
