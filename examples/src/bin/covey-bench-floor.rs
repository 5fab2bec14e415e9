//! The machine's floors for the round benchmark: how fast one QUIC
//! connection with Covey's TLS setup (TLS 1.3, ring, mutual auth) moves
//! bytes over loopback, with nothing of Covey's protocol on top.
//!
//! `cargo run --release -p covey-examples --bin covey-bench-floor`
#![forbid(unsafe_code)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use covey_client::session::client_config;
use covey_privacy::PseudonymKey;
use covey_server::{
    ServerConfig, StateDir,
    admission::pki::{self, Admitted},
};

const TOTAL: usize = 1 << 30;
const BLOCK: usize = 1 << 20;

fn main() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let state = StateDir::new(tmp.path());
    state.init(&ServerConfig::default())?;
    let store = state.open_store()?;
    let bundle = state.enroll(&store, "floor", Duration::from_secs(3600), None)?;
    let key = Arc::new(PseudonymKey::from_bytes(&store.pseudonym_key()?)?);
    let admitted = Arc::new(Admitted::new(
        store
            .enrollments()?
            .into_iter()
            .map(|e| (e.pseudonym, e.role)),
    ));
    let tls = pki::server_tls_config(
        &state.ca_cert_pem()?,
        &state.server_identity()?,
        admitted,
        key,
    )?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let server = quinn::Endpoint::server(
            quinn::ServerConfig::with_crypto(Arc::new(crypto)),
            "127.0.0.1:0".parse()?,
        )?;
        let addr = server.local_addr()?;
        let sink = tokio::spawn(async move {
            let conn = server.accept().await.context("no connection")?.await?;
            let mut recv = conn.accept_uni().await?;
            let mut buf = vec![0u8; BLOCK];
            let mut got = 0usize;
            while let Some(n) = recv.read(&mut buf).await? {
                got += n;
            }
            Ok::<_, anyhow::Error>(got)
        });
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        client.set_default_client_config(client_config(&bundle, Duration::from_secs(10))?);
        let handshake = Instant::now();
        let conn = client.connect(addr, &bundle.server_name)?.await?;
        let handshake = handshake.elapsed();
        let block = vec![7u8; BLOCK];
        let started = Instant::now();
        let mut send = conn.open_uni().await?;
        for _ in 0..TOTAL / BLOCK {
            send.write_all(&block).await?;
        }
        send.finish()?;
        let got = sink.await??;
        let elapsed = started.elapsed();
        println!(
            "loopback QUIC + TLS 1.3 (ring), one stream: {:.0} MB/s ({} MiB in {:.2}s); handshake {:.2} ms",
            got as f64 / elapsed.as_secs_f64() / 1e6,
            got >> 20,
            elapsed.as_secs_f64(),
            handshake.as_secs_f64() * 1e3
        );
        conn.close(0u32.into(), b"done");
        client.wait_idle().await;
        Ok::<_, anyhow::Error>(())
    })
}
