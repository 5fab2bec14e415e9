//! Language models end to end, on loopback: a LoRA run over a Hugging Face
//! checkpoint whose frozen base and tokenizer the devices fetch by hash,
//! trained on the devices' own text, evaluated centrally, and exported in
//! the formats transformers and peft read.

mod common;

use std::{path::Path, sync::Arc, time::Duration};

use candle_core::{Device, Tensor};
use covey_client::{
    ClientOptions, TextTrainer,
    assets::AssetCache,
    data::text::{Document, TextData},
    lm::{LanguageModel, checkpoint, local, train::load_base},
};
use covey_protocol::{
    ModelVersion,
    asset::AssetRequest,
    frame::{Frame, FrameLimits},
    io::{read_frame, read_message, write_message},
    message::Message,
    model::{AssetRef, ModelSpec},
};
use covey_server::{
    Server, StateDir,
    operator::export::{self, Format},
    state::model::{LoraChoice, ModelChoice},
};

const TEXT: &str =
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.";

fn reference(name: &str) -> String {
    format!(
        "{}/../client/tests/data/lm/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// A LoRA run on the reference GPT-2 with its 300-token tokenizer, central
/// evaluation on `test`, two devices per round.
fn lora_state(root: &Path, test: &Path, rounds: u64) -> StateDir {
    let mut config = common::config("gpt2", rounds, 2);
    config.training.local_optimizer = "adam".into();
    config.training.learning_rate = 0.02;
    config.training.batch_size = 4;
    config.training.epochs = 2;
    config.evaluation.test_data = test.display().to_string();
    let state = StateDir::new(root);
    let choice = ModelChoice {
        model: format!("hf:{}", reference("gpt2")),
        lora: Some(LoraChoice {
            rank: 2,
            alpha: None,
            targets: Vec::new(),
            plain: false,
            seed: 3,
        }),
        context: Some(12),
        tokenizer: Some(reference("tokenizer/tokenizer.json")),
        model_file: None,
    };
    let prepared = choice.prepare(0, &state.assets_dir()).unwrap();
    prepared.configure(&mut config).unwrap();
    state
        .init_with(&config, prepared.weights, &prepared.assets)
        .unwrap();
    state
}

fn text_dir(root: &Path) -> std::path::PathBuf {
    let dir = root.join("test-text");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("sonnet.txt"), TEXT).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lora_run_fetches_its_base_trains_on_text_and_exports() {
    let tmp = tempfile::tempdir().unwrap();
    let test = text_dir(tmp.path());
    let state = lora_state(&tmp.path().join("state"), &test, 2);
    let spec = state.config().unwrap().settings().unwrap().spec;
    let ModelSpec::Language(l) = &spec else {
        panic!("a language model")
    };
    let assets = spec.assets();
    assert_eq!(assets.len(), 2, "the tokenizer.json and the base");
    let bundles = common::enroll(&state, &["poet-0", "poet-1"]);
    let (addr, server) = common::start(&state);

    let mut clients = Vec::new();
    for (i, bundle) in bundles.into_iter().enumerate() {
        // Each device has its own cache, so each fetches the assets.
        let cache = AssetCache::new(tmp.path().join(format!("cache-{i}"))).unwrap();
        let data = TextData {
            train: vec![Document {
                source: format!("poet-{i}"),
                text: TEXT.repeat(3),
            }],
            heldout: Vec::new(),
        };
        let trainer = TextTrainer::new(data, &Device::Cpu).with_assets(cache.clone());
        let options = ClientOptions {
            assets: Some(cache.clone()),
            ..common::options(addr)
        };
        clients.push(tokio::spawn(async move {
            let summary = covey_client::run(&bundle, Box::new(trainer), options)
                .await
                .unwrap();
            (summary, cache)
        }));
    }
    let summary = tokio::time::timeout(Duration::from_secs(240), server)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(summary.final_version, 2);
    for c in clients {
        let (s, cache) = c.await.unwrap();
        assert!(s.rounds_trained >= 1);
        for a in &assets {
            assert!(
                cache.verified(a).unwrap().is_some(),
                "{a:?} was fetched and checks"
            );
            // The base went down once, not once per round.
            assert!(s.bytes_down >= a.bytes);
        }
        let adapters = 2 * (spec.param_count() as u64 * 4);
        assert!(s.bytes_down < assets.iter().map(|a| a.bytes).sum::<u64>() + 4 * adapters);
    }

    // Central evaluation scored every version, and training helped.
    let store = state.open_store().unwrap();
    let records = store.rounds().unwrap();
    let losses: Vec<f32> = records.iter().filter_map(|r| r.test_loss).collect();
    assert_eq!(losses.len(), 2);
    let weights = store.model(ModelVersion(2)).unwrap().weights;
    let initial = store.model(ModelVersion(0)).unwrap().weights;
    drop(store);
    let cache = state.assets().unwrap();
    let test_set = covey_server::rounds::central::TestSet::load(&test, &spec, &cache).unwrap();
    let before = test_set.evaluate(&spec, &initial).unwrap().loss;
    assert!(losses[1] < before, "test loss {before} -> {losses:?}");

    // hf: the LoRA-merged checkpoint computes what base + adapter compute.
    let store = state.open_store().unwrap();
    let model = store.model(ModelVersion(2)).unwrap();
    drop(store);
    let out = tmp.path().join("hf");
    export::export(&model, Format::HuggingFace, &cache, &out).unwrap();
    let merged = local::open(&out, None, None, Some(12), &Device::Cpu).unwrap();
    let base = Arc::new(load_base(l, Some(&cache), &Device::Cpu, candle_core::DType::F32).unwrap());
    let adapted = LanguageModel::new(l, &weights, Some(base), &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[3u32, 41, 7, 200, 99, 12]], &Device::Cpu).unwrap();
    let gap = (merged.model.forward(&ids).unwrap() - adapted.forward(&ids).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(gap < 1e-4, "merged logits differ by {gap}");
    // Its tokenizer.json is the run's.
    assert_eq!(
        merged.tokenizer.encode(TEXT).unwrap(),
        covey_client::lm::tokenizer::TextTokenizer::from_file(Path::new(&reference(
            "tokenizer/tokenizer.json"
        )))
        .unwrap()
        .encode(TEXT)
        .unwrap()
    );
    // lora: peft's layout, read back as the same adapter.
    let out = tmp.path().join("lora");
    export::export(&model, Format::Lora, &cache, &out).unwrap();
    assert_eq!(checkpoint::read_adapter(&out, l).unwrap(), weights);
    assert!(out.join("adapter_config.json").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assets_resume_at_an_offset_and_only_the_runs_own_are_served() {
    let tmp = tempfile::tempdir().unwrap();
    let test = text_dir(tmp.path());
    let state = lora_state(&tmp.path().join("state"), &test, 1);
    let spec = state.config().unwrap().settings().unwrap().spec;
    let base = *spec.assets().last().unwrap();
    let file = std::fs::read(state.assets().unwrap().verified(&base).unwrap().unwrap()).unwrap();
    let bundles = common::enroll(&state, &["reader"]);
    let (addr, _server) = common::start(&state);
    let conn = common::raw_connection(&bundles[0], addr).await;

    let fetch = |asset: AssetRef, offset: u64| {
        let conn = conn.clone();
        async move {
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            write_message(
                &mut send,
                &Message::FetchAsset(AssetRequest { asset, offset }),
            )
            .await
            .unwrap();
            send.finish().unwrap();
            let head = read_message(&mut recv, FrameLimits::default())
                .await
                .unwrap();
            let mut bytes = Vec::new();
            while let Some(Frame::Chunk { payload, .. }) =
                read_frame(&mut recv, FrameLimits::default()).await.unwrap()
            {
                bytes.extend(payload);
            }
            (head, bytes)
        }
    };
    let half = base.bytes / 2;
    let (head, rest) = fetch(base, half).await;
    assert_eq!(head, Message::AssetFollows { offset: half });
    assert_eq!(rest, file[half as usize..]);

    let stranger = AssetRef {
        sha256: [7; 32],
        bytes: 10,
    };
    let (head, bytes) = fetch(stranger, 0).await;
    let Message::Error(report) = head else {
        panic!("expected a refusal, got {head:?}");
    };
    assert!(
        report.detail.contains("not an asset of this run"),
        "{}",
        report.detail
    );
    assert!(bytes.is_empty());
    let (head, _) = fetch(base, base.bytes + 1).await;
    assert!(
        matches!(head, Message::Error(_)),
        "an offset past the end is refused"
    );
}

#[tokio::test]
async fn a_corrupt_base_in_the_store_stops_the_server_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let test = text_dir(tmp.path());
    let state = lora_state(&tmp.path().join("state"), &test, 1);
    let spec = state.config().unwrap().settings().unwrap().spec;
    let base = *spec.assets().last().unwrap();
    let path = state.assets().unwrap().path(&base);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let err = Server::open(&state)
        .err()
        .expect("a corrupt base is refused")
        .to_string();
    assert!(
        err.contains(&base.hex()[..12]) || err.contains("sha256:"),
        "{err}"
    );
}
