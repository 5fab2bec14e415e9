//! A leaf aggregator's link to the root, over JetStream: it follows the
//! root's committed state (fetching each new version's weights from the
//! object store, checked against the root's hash), beats with how many
//! devices wait, and forwards partial sums. The hub decides what to do
//! with the root's state; this module only moves bytes.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use covey_protocol::RoundId;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use super::{
    jetstream::{Cluster, ClusterError},
    leaves::{Beat, Heard, Leaves, Report},
    route::{LeafId, Pace, Router, Routing},
    state::RootState,
};

/// A leaf whose beat has not changed for this long is not routed to.
const LEAF_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// Which devices this leaf serves, from the live leaves the link sees.
    pub router: Router,
}

/// The link's side of the channels.
pub struct LinkSide {
    news: mpsc::Sender<RootNews>,
    outbound: mpsc::Receiver<Outbound>,
    available: watch::Receiver<u64>,
    live: watch::Sender<BTreeMap<LeafId, String>>,
}

/// The channels between a leaf's hub and its link, made before either
/// starts: the hub needs its ends to open, the link the hub's address.
pub fn channels(me: LeafId, pace: Pace, routing: Routing) -> (LinkEnds, LinkSide) {
    let (news_tx, news) = mpsc::channel(16);
    let (outbound, out_rx) = mpsc::channel::<Outbound>(16);
    let (available, available_rx) = watch::channel(0u64);
    let (live, live_rx) = watch::channel(BTreeMap::new());
    (
        LinkEnds {
            news,
            outbound,
            available,
            router: Router::new(me, live_rx, available_rx.clone(), pace, routing),
        },
        LinkSide {
            news: news_tx,
            outbound: out_rx,
            available: available_rx,
            live,
        },
    )
}

/// Keeps `live` to the leaves whose beats keep changing, on this clock.
async fn follow_leaves(leaves: Leaves, live: watch::Sender<BTreeMap<LeafId, String>>) {
    let mut seen: BTreeMap<LeafId, (String, Instant)> = BTreeMap::new();
    let mut heard: Option<mpsc::Receiver<Heard>> = None;
    let mut last_heard = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        if heard.is_none() || last_heard.elapsed() > LEAF_TIMEOUT / 2 {
            // Beats come several times a second: silence means the watch's
            // consumer went with a NATS node.
            heard = leaves.watch().await.ok();
            last_heard = Instant::now();
        }
        let Some(rx) = heard.as_mut() else {
            tick.tick().await;
            continue;
        };
        tokio::select! {
            h = rx.recv() => match h {
                Some(Heard::Beat { leaf, beat }) => {
                    last_heard = Instant::now();
                    seen.insert(leaf, (beat.addr, Instant::now()));
                }
                Some(_) => last_heard = Instant::now(),
                None => heard = None,
            },
            _ = tick.tick() => {}
        }
        if live.is_closed() {
            return;
        }
        let now: BTreeMap<LeafId, String> = seen
            .iter()
            .filter(|(_, (_, at))| at.elapsed() < LEAF_TIMEOUT)
            .map(|(l, (a, _))| (l.clone(), a.clone()))
            .collect();
        live.send_if_modified(|m| {
            let changed = *m != now;
            *m = now;
            changed
        });
    }
}

impl LeafLink {
    /// Starts following the root, advertising `addr` to devices' router;
    /// the task ends when the hub drops its ends.
    pub async fn start(
        self,
        side: LinkSide,
        addr: String,
    ) -> Result<tokio::task::JoinHandle<()>, ClusterError> {
        let (key, objects, leaves) = self.cluster.open_roles().await?;
        let LinkSide {
            news: news_tx,
            outbound: mut out_rx,
            available: available_rx,
            live,
        } = side;
        let routes = tokio::spawn(follow_leaves(leaves.clone(), live));
        let task = tokio::spawn(async move {
            let _routes = AbortOnDrop(routes);
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
                let state = match RootState::open(self.cluster.at_rest(), &record.state) {
                    Ok(Some(state)) => state,
                    Ok(None) => continue,
                    Err(e) => {
                        // Once per value the key holds, not every tick.
                        warn!("{e}");
                        last_state = Some(record.state);
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

/// Stops the route follower with the link.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
