//! Real servers and clients on loopback run FedAvg rounds.

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use covey_client::{
    CandleTrainer,
    data::{DataView, Mnist},
    partition::Partition,
    trainer::{DeviceData, evaluate},
};
use covey_protocol::{ModelVersion, model::ModelSpec};
use covey_server::state::store::RoundOutcome;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clients_three_rounds_follow_fedavg_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let state = init(tmp.path(), &config("logreg", 3, 3));
    let bundles = enroll(&state, &["a", "b", "c"]);
    let (addr, server) = start(&state);
    let clients = spawn_scripted(&bundles, addr, Duration::ZERO);
    let summary = server.await.unwrap();
    assert_eq!(summary.final_version, 3);
    assert_eq!(summary.rounds_committed, 3);
    for c in clients {
        let s = c.await.unwrap();
        assert_eq!(s.final_version, Some(ModelVersion(3)));
        assert_eq!(s.updates_accepted, 3);
    }

    let store = state.open_store().unwrap();
    let initial = store.model(ModelVersion(0)).unwrap().weights;
    for v in 1..=3 {
        let model = store.model(ModelVersion(v)).unwrap();
        assert_close(
            &model.weights,
            &expected_model(&initial, &[0, 1, 2], v),
            1e-6,
        );
    }
    let rounds = store.rounds().unwrap();
    assert_eq!(rounds.len(), 3);
    for (i, r) in rounds.iter().enumerate() {
        assert_eq!(
            r.outcome,
            RoundOutcome::Committed {
                version: ModelVersion(i as u64 + 1)
            }
        );
        assert_eq!((r.selected, r.accepted, r.dropped), (3, 3, 0));
        // Example-weighted mean of the losses 1, 2, 3 with weights 10, 20, 30.
        assert!((r.mean_client_loss.unwrap() - 14.0 / 6.0).abs() < 1e-5);
        assert!(r.bytes_up > 3 * 7850 * 4 && r.bytes_down > 3 * 7850 * 4);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_candle_training_improves_the_global_model() {
    let data_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data/mnist");
    let train = Arc::new(Mnist::load(&data_dir, "train").unwrap());
    let test = Mnist::load(&data_dir, "t10k").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config("logreg", 2, 3);
    cfg.training.learning_rate = 0.1;
    cfg.training.update_encoding = "bf16".into();
    cfg.evaluation.test_data = data_dir.display().to_string();
    let state = init(tmp.path(), &cfg);
    let bundles = enroll(&state, &["a", "b", "c"]);
    let (addr, server) = start(&state);
    let parts = Partition::Iid.split(&train.labels[..1500], 3, 1);
    let clients: Vec<_> = bundles
        .into_iter()
        .zip(parts)
        .map(|(b, indices)| {
            let view = DataView {
                data: train.clone(),
                indices,
            };
            tokio::spawn(async move {
                let trainer = CandleTrainer::new(&view, &covey_client::Device::Cpu).unwrap();
                covey_client::run(&b, Box::new(trainer), options(addr))
                    .await
                    .unwrap()
            })
        })
        .collect();
    assert_eq!(server.await.unwrap().final_version, 2);
    for c in clients {
        assert_eq!(c.await.unwrap().updates_accepted, 2);
    }
    let store = state.open_store().unwrap();
    let spec = store.spec().unwrap();
    let test = DeviceData::new(&DataView::all(Arc::new(test)), &covey_client::Device::Cpu).unwrap();
    let acc = |v| evaluate(&spec, &store.model(ModelVersion(v)).unwrap().weights, &test).unwrap();
    let (before, after) = (acc(0), acc(2));
    assert!(
        after.loss < before.loss,
        "loss {} -> {}",
        before.loss,
        after.loss
    );
    assert!(
        after.accuracy > 0.8,
        "accuracy after 2 rounds: {}",
        after.accuracy
    );
    assert_eq!(
        spec,
        ModelSpec::mnist(covey_protocol::model::Architecture::LogReg)
    );
}

/// A scripted device that notes the learning rate each task carries.
struct Noting {
    inner: ScriptedTrainer,
    seen: Arc<std::sync::Mutex<Vec<(u64, f32)>>>,
}

impl covey_client::Trainer for Noting {
    fn train(
        &mut self,
        task: &covey_protocol::message::Task,
        global: &[f32],
    ) -> Result<covey_client::TrainOutput, covey_client::trainer::TrainError> {
        self.seen
            .lock()
            .unwrap()
            .push((task.base_version.0, task.hyper.learning_rate));
        self.inner.train(task, global)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_sent_the_learning_rate_decayed_for_their_base_version() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config("logreg", 5, 2);
    cfg.training.learning_rate = 0.1;
    cfg.training.learning_rate_decay = "step:2:0.5".into();
    let state = init(tmp.path(), &cfg);
    let bundles = enroll(&state, &["a", "b"]);
    let (addr, server) = start(&state);
    let seen = shared(std::sync::Mutex::new(Vec::new()));
    let clients: Vec<_> = bundles
        .into_iter()
        .enumerate()
        .map(|(i, b)| {
            let trainer = Box::new(Noting {
                inner: ScriptedTrainer {
                    id: i as u32,
                    pause: Duration::ZERO,
                },
                seen: seen.clone(),
            });
            tokio::spawn(async move { covey_client::run(&b, trainer, options(addr)).await })
        })
        .collect();
    assert_eq!(server.await.unwrap().final_version, 5);
    for c in clients {
        assert_eq!(c.await.unwrap().unwrap().updates_accepted, 5);
    }
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let halved = |v: u64| 0.1 * 0.5f32.powi((v / 2) as i32);
    let expected: Vec<(u64, f32)> = (0..5).flat_map(|v| [(v, halved(v)); 2]).collect();
    assert_eq!(seen, expected);
    // The versions still follow FedAvg: the rate is the devices' business.
    let store = state.open_store().unwrap();
    let initial = store.model(ModelVersion(0)).unwrap().weights;
    assert_close(
        &store.model(ModelVersion(5)).unwrap().weights,
        &expected_model(&initial, &[0, 1], 5),
        1e-6,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_run_tells_late_clients_and_server_optimizers_apply() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config("logreg", 1, 2);
    cfg.aggregation.optimizer = "fedavgm".into();
    cfg.aggregation.server_learning_rate = 0.5;
    let state = init(tmp.path(), &cfg);
    let bundles = enroll(&state, &["a", "b"]);
    let (addr, server) = start(&state);
    let clients = spawn_scripted(&bundles, addr, Duration::ZERO);
    assert_eq!(server.await.unwrap().final_version, 1);
    for c in clients {
        c.await.unwrap();
    }
    let store = state.open_store().unwrap();
    let w0 = store.model(ModelVersion(0)).unwrap().weights;
    let w1 = store.model(ModelVersion(1)).unwrap().weights;
    // First FedAvgM step: m = Δ̄, so w1 = w0 + 0.5·Δ̄.
    let full = expected_model(&w0, &[0, 1], 1);
    let expected: Vec<f32> = w0
        .iter()
        .zip(&full)
        .map(|(a, b)| a + 0.5 * (b - a))
        .collect();
    assert_close(&w1, &expected, 1e-6);
    assert!(!store.optimizer_state().unwrap().m.is_empty());
}
