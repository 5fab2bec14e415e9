//! Fetching the files a task names by hash (a LoRA base, a tokenizer.json)
//! into the device's asset cache, resuming where an earlier try stopped.

use covey_protocol::{
    Message,
    asset::{AssetDownload, AssetRequest, AssetStreamError},
    frame::{Frame, FrameLimits},
    io::{StreamError, read_frame, read_message, write_message},
    model::ModelSpec,
};
use tracing::info;

use crate::{
    assets::{AssetCache, AssetError},
    progress,
};

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The link broke: retry on the next connection, from what arrived.
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("quinn: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("the server refused the download: {0}")]
    Refused(String),
    #[error(transparent)]
    Chunk(#[from] AssetStreamError),
    #[error(transparent)]
    Cache(#[from] AssetError),
}

/// Ensures every asset of `spec` is in `cache`; returns the bytes received.
pub async fn fetch_assets(
    conn: &quinn::Connection,
    spec: &ModelSpec,
    cache: &AssetCache,
) -> Result<u64, FetchError> {
    let mut received = 0;
    for asset in spec.assets() {
        if cache.verified(&asset)?.is_some() {
            continue;
        }
        let offset = cache.resume_at(&asset);
        info!(?asset, offset, "fetching an asset of the task's model");
        let (mut send, mut recv) = conn.open_bi().await?;
        write_message(
            &mut send,
            &Message::FetchAsset(AssetRequest { asset, offset }),
        )
        .await?;
        let _ = send.finish();
        let limits = FrameLimits::default();
        match read_message(&mut recv, limits).await? {
            Message::AssetFollows { offset: o } if o == offset => {}
            Message::Error(report) => return Err(FetchError::Refused(report.detail)),
            other => {
                return Err(StreamError::Unexpected {
                    expected: "AssetFollows",
                    got: other.kind(),
                }
                .into());
            }
        }
        let mut download = AssetDownload::new(asset, offset);
        // A base model is hundreds of MB: show how far it is.
        let bar = progress::bar(asset.bytes, progress::BYTES, "fetching the base".into());
        if let Some(b) = &bar {
            b.set_position(offset);
        }
        let mut at_tenths = progress::tenths(offset, asset.bytes);
        while !download.is_complete() {
            match read_frame(&mut recv, limits).await? {
                Some(Frame::Chunk { index, payload }) => {
                    let at = download.accept(index, payload.len())?;
                    cache.append(&asset, at, &payload)?;
                    received += payload.len() as u64;
                    let done = at + payload.len() as u64;
                    match &bar {
                        Some(b) => b.set_position(done),
                        None if progress::tenths(done, asset.bytes) > at_tenths => {
                            at_tenths = progress::tenths(done, asset.bytes);
                            info!(
                                done,
                                total = asset.bytes,
                                "fetched {}% of the asset",
                                at_tenths * 10
                            );
                        }
                        None => {}
                    }
                }
                Some(Frame::Message(m)) => {
                    return Err(StreamError::Unexpected {
                        expected: "an asset chunk",
                        got: m.kind(),
                    }
                    .into());
                }
                None => return Err(StreamError::Truncated.into()),
            }
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        cache.finish(&asset)?;
        info!(?asset, "asset fetched and checked");
    }
    Ok(received)
}
