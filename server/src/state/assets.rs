//! Serving the files tasks name by hash (a LoRA base, a tokenizer.json)
//! from the state directory's asset store.
//!
//! Only the assets of the run's own model are served, each checked against
//! its hash when the server starts, so a corrupted file is an error at
//! start-up rather than a download every device refuses.

use std::{collections::HashMap, path::PathBuf, time::Duration};

use covey_client::assets::{AssetCache, AssetError};
use covey_protocol::{
    Message,
    asset::{ASSET_CHUNK, AssetRequest},
    io::{write_bytes_chunk, write_message},
    message::{CloseCode, ErrorReport},
    model::{AssetRef, ModelSpec},
};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

#[derive(Debug, thiserror::Error)]
pub enum ServedAssetError {
    #[error("the model's asset {asset:?} is missing from {dir}")]
    Missing { asset: AssetRef, dir: String },
    #[error(
        "the model's asset {asset:?} in {dir} does not match its hash: the file is corrupt; restore it from a backup or the checkpoint it came from"
    )]
    Corrupt { asset: AssetRef, dir: String },
    #[error(transparent)]
    Cache(#[from] AssetError),
}

/// The files of one run's model, by hash.
#[derive(Debug, Default)]
pub struct ServedAssets {
    files: HashMap<[u8; 32], (AssetRef, PathBuf)>,
}

impl ServedAssets {
    /// Finds and checks every asset `spec` names in `cache`.
    pub fn for_spec(spec: &ModelSpec, cache: &AssetCache) -> Result<Self, ServedAssetError> {
        let mut files = HashMap::new();
        let dir = || cache.dir().display().to_string();
        for asset in spec.assets() {
            match cache.intact(&asset)? {
                None => return Err(ServedAssetError::Missing { asset, dir: dir() }),
                Some(false) => return Err(ServedAssetError::Corrupt { asset, dir: dir() }),
                Some(true) => {
                    files.insert(asset.sha256, (asset, cache.path(&asset)));
                }
            }
        }
        Ok(Self { files })
    }

    /// The asset's file, positioned at the request's offset.
    async fn open(&self, request: &AssetRequest) -> Result<tokio::fs::File, String> {
        let a = request.asset;
        let Some((_, path)) = self.files.get(&a.sha256).filter(|(known, _)| *known == a) else {
            return Err(format!("{a:?} is not an asset of this run's model"));
        };
        if request.offset > a.bytes {
            return Err(format!("offset {} is past {a:?}'s end", request.offset));
        }
        let unreadable = |e: std::io::Error| format!("{a:?} cannot be read here: {e}");
        let mut file = tokio::fs::File::open(path).await.map_err(unreadable)?;
        file.seek(std::io::SeekFrom::Start(request.offset))
            .await
            .map_err(unreadable)?;
        Ok(file)
    }
}

/// Why a fetch was refused, for the device and the logs.
pub struct Refusal(pub String);

/// Sends `request`'s asset from its offset. Each chunk must leave within
/// `stall` (a device that stops reading is cut off); the download as a
/// whole may take as long as the link needs. Returns the bytes written.
pub async fn serve(
    send: &mut quinn::SendStream,
    served: &ServedAssets,
    request: AssetRequest,
    stall: Duration,
) -> Result<u64, Refusal> {
    let asset = request.asset;
    let mut file = match served.open(&request).await {
        Ok(file) => file,
        Err(detail) => {
            let _ = write_message(
                send,
                &Message::Error(ErrorReport {
                    code: CloseCode::ProtocolViolation,
                    detail: detail.clone(),
                }),
            )
            .await;
            return Err(Refusal(detail));
        }
    };
    let io = |e: std::io::Error| Refusal(format!("sending {asset:?}: {e}"));
    let mut sent = write_message(
        send,
        &Message::AssetFollows {
            offset: request.offset,
        },
    )
    .await
    .map_err(|e| Refusal(e.to_string()))?;
    let mut left = asset.bytes - request.offset;
    let mut buf = vec![0u8; ASSET_CHUNK];
    let mut index = 0u32;
    while left > 0 {
        let n = (left as usize).min(ASSET_CHUNK);
        file.read_exact(&mut buf[..n]).await.map_err(io)?;
        let chunk = write_bytes_chunk(send, index, &buf[..n]);
        sent += tokio::time::timeout(stall, chunk)
            .await
            .map_err(|_| Refusal(format!("the device stopped reading {asset:?}")))?
            .map_err(|e| Refusal(e.to_string()))?;
        left -= n as u64;
        index += 1;
    }
    Ok(sent)
}
