//! The two cluster roles as processes: `covey-server coordinator` (a root
//! replica) and `covey-server aggregator` (a leaf). Both read the same
//! state directory layout as `covey-server run`: its config, its CA and
//! server certificate, its enrollments; the shared state is JetStream's.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;
use tracing::info;

use super::{
    jetstream::{Cluster, ClusterConfig, ClusterError},
    leaf::LeafLink,
    lease::{Timing, TimingError},
    root::{Root, RootError, RootOptions},
    route::{LeafId, Pace, Routing},
    state::{CorruptState, RootState},
};
use crate::{
    dir::{DirError, StateDir},
    rounds::central::{TestSet, TestSetError},
    serve::{RunSummary, ServeError, Server},
};

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(transparent)]
    Dir(#[from] DirError),
    #[error(transparent)]
    Store(#[from] crate::state::store::StoreError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Root(#[from] RootError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error(transparent)]
    TestSet(#[from] TestSetError),
    #[error("--lease-ms: {0}")]
    Lease(#[from] TimingError),
    #[error(transparent)]
    State(#[from] CorruptState),
}

/// Refuses to start a role that cannot read the cluster's state (another
/// directory's data key, another version), before it joins anything.
async fn check_state_opens(cluster: &Cluster) -> Result<(), ProcessError> {
    let key = cluster
        .patiently(|c| async move { c.root_key().await })
        .await?;
    if let Some((_, record)) = key.read().await? {
        RootState::open(cluster.at_rest(), &record.state)?;
    }
    Ok(())
}

/// Runs a root replica until `stop` turns true or the run is finished.
pub async fn coordinator(
    dir: &StateDir,
    cluster: &ClusterConfig,
    name: &str,
    lease: Duration,
    stop: watch::Receiver<bool>,
) -> Result<(), ProcessError> {
    let config = dir.config()?;
    let settings = config.settings().map_err(DirError::from)?;
    let (initial, test_set, data_key, auditor) = {
        // Read once and closed: the root's state is JetStream's.
        let store = dir.open_store()?;
        let initial = store.model(store.current_version()?)?;
        let test_set = match config.evaluation.test_data.as_str() {
            "" => None,
            path => Some(Arc::new(TestSet::load(
                std::path::Path::new(path),
                &settings.spec,
                &dir.assets()?,
            )?)),
        };
        (initial, test_set, store.data_key(), store.audit_signer()?)
    };
    let timing = Timing::new(lease, lease / 4)?;
    let cluster = Cluster::connect(cluster, data_key).await?;
    check_state_opens(&cluster).await?;
    info!(name, "root replica standing by for the lease");
    let min_per_leaf = settings.min_cohort.get();
    Root {
        cluster,
        initial,
        test_set,
        options: RootOptions {
            name: name.to_owned(),
            lease: timing,
            // Beats stop for a few seconds while JetStream moves a lost
            // node's stream leaders; a leaf is not lost for that.
            leaf_timeout: (lease * 3).max(Duration::from_secs(5)),
            min_per_leaf,
            forward_grace: lease * 2,
        },
        settings,
        auditor,
        config_sha256: dir.config_sha256()?,
    }
    .run(stop)
    .await?;
    Ok(())
}

/// Runs a leaf until its root ends the run.
pub async fn aggregator(
    dir: &StateDir,
    cluster: &ClusterConfig,
    leaf: LeafId,
    pace: Pace,
    routing: Routing,
    public_addr: Option<String>,
) -> Result<RunSummary, ProcessError> {
    let config = dir.config()?;
    // The store is closed again before the leaf's server opens it.
    let data_key = dir.open_store()?.data_key();
    let cluster = Cluster::connect(cluster, data_key).await?;
    check_state_opens(&cluster).await?;
    let link = LeafLink {
        cluster: cluster.clone(),
        leaf: leaf.clone(),
        every: Duration::from_millis(250),
    };
    let (ends, side) = super::leaf::channels(leaf.clone(), pace, routing);
    let server = Server::open_leaf(dir, leaf, ends)?;
    // Each leaf's own, where a shared config.toml cannot say it; a port
    // of 0 means "the one bound".
    let public_addr = public_addr.unwrap_or_else(|| config.server.public_addr.clone());
    let addr = match public_addr.rsplit_once(':') {
        Some((host, "0")) => format!(
            "{host}:{}",
            server.local_addr().map_err(ServeError::from_io)?.port()
        ),
        _ => public_addr.clone(),
    };
    let link_task = link.start(side, addr).await?;
    let admitted = server.admitted();
    let (revocations, _) = cluster
        .patiently(|c| {
            let admitted = admitted.clone();
            async move { c.registry().await?.follow(admitted).await }
        })
        .await?;
    let summary = server.run().await;
    revocations.abort();
    link_task.abort();
    Ok(summary?)
}
