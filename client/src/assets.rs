//! Files a task names by content, such as a LoRA run's frozen base or a
//! tokenizer.json: fetched once, kept on disk under their SHA-256, checked
//! before every use, and resumed where a broken download stopped.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
};

use covey_protocol::model::AssetRef;

#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error("asset cache {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the download of {asset:?} does not hash to its name; it was discarded")]
    Corrupt { asset: AssetRef },
    #[error("{asset:?} is not in the cache at {dir}")]
    Absent { asset: AssetRef, dir: String },
    #[error("{asset:?}: {offset} bytes received, past its length")]
    TooLong { asset: AssetRef, offset: u64 },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AssetError + '_ {
    move |source| AssetError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The SHA-256 of a file, read in 1 MiB blocks.
pub fn sha256_file(path: &Path) -> Result<[u8; 32], AssetError> {
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok(out)
}

/// A file's [`AssetRef`]: its hash and length.
pub fn asset_of(path: &Path) -> Result<AssetRef, AssetError> {
    let bytes = std::fs::metadata(path).map_err(io(path))?.len();
    Ok(AssetRef {
        sha256: sha256_file(path)?,
        bytes,
    })
}

/// A folder of assets, each named by its hash.
#[derive(Clone, Debug)]
pub struct AssetCache {
    dir: PathBuf,
}

impl AssetCache {
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, AssetError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn complete(&self, a: &AssetRef) -> PathBuf {
        self.dir.join(a.hex())
    }

    fn partial(&self, a: &AssetRef) -> PathBuf {
        self.dir.join(format!("{}.part", a.hex()))
    }

    /// The asset's path if it is here and hashes to its name. A file that
    /// does not is removed, so it is fetched again.
    pub fn verified(&self, a: &AssetRef) -> Result<Option<PathBuf>, AssetError> {
        let path = self.complete(a);
        if !path.exists() {
            return Ok(None);
        }
        if asset_of(&path)? == *a {
            return Ok(Some(path));
        }
        tracing::warn!(asset = ?a, "a cached asset does not match its hash; fetching it again");
        std::fs::remove_file(&path).map_err(io(&path))?;
        Ok(None)
    }

    /// Whether the asset is here and hashes to its name; unlike
    /// [`Self::verified`] it leaves a file that does not in place (the
    /// server's own store, which nothing refills).
    pub fn intact(&self, a: &AssetRef) -> Result<Option<bool>, AssetError> {
        let path = self.complete(a);
        if !path.exists() {
            return Ok(None);
        }
        Ok(Some(asset_of(&path)? == *a))
    }

    /// The asset's path, or an error saying it must be fetched first.
    pub fn require(&self, a: &AssetRef) -> Result<PathBuf, AssetError> {
        self.verified(a)?.ok_or_else(|| AssetError::Absent {
            asset: *a,
            dir: self.dir.display().to_string(),
        })
    }

    /// Bytes of an interrupted download already on disk: where to resume.
    pub fn resume_at(&self, a: &AssetRef) -> u64 {
        let len = std::fs::metadata(self.partial(a)).map_or(0, |m| m.len());
        if len > a.bytes { 0 } else { len }
    }

    /// Appends bytes received at `offset` to the download in progress.
    pub fn append(&self, a: &AssetRef, offset: u64, bytes: &[u8]) -> Result<(), AssetError> {
        let path = self.partial(a);
        let end = offset + bytes.len() as u64;
        if end > a.bytes {
            return Err(AssetError::TooLong {
                asset: *a,
                offset: end,
            });
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        let have = file.metadata().map_err(io(&path))?.len();
        if have != offset {
            // Out of step with the file: start again from nothing.
            file.set_len(0).map_err(io(&path))?;
            if offset != 0 {
                return Ok(());
            }
        }
        file.write_all(bytes).map_err(io(&path))
    }

    /// Checks a complete download and moves it into place.
    pub fn finish(&self, a: &AssetRef) -> Result<PathBuf, AssetError> {
        let part = self.partial(a);
        if asset_of(&part)? != *a {
            std::fs::remove_file(&part).map_err(io(&part))?;
            return Err(AssetError::Corrupt { asset: *a });
        }
        let path = self.complete(a);
        std::fs::rename(&part, &path).map_err(io(&path))?;
        Ok(path)
    }

    /// Moves a file on the cache's volume into the cache under its hash.
    pub fn adopt(&self, file: &Path) -> Result<AssetRef, AssetError> {
        let a = asset_of(file)?;
        let path = self.complete(&a);
        std::fs::rename(file, &path).map_err(io(&path))?;
        Ok(a)
    }

    /// The path of an asset in the cache, present or not.
    pub fn path(&self, a: &AssetRef) -> PathBuf {
        self.complete(a)
    }

    /// Puts a local file into the cache (an operator seeding a device, or
    /// a simulation's clients sharing the server's copy).
    pub fn insert(&self, file: &Path) -> Result<AssetRef, AssetError> {
        let a = asset_of(file)?;
        let path = self.complete(&a);
        if !path.exists() {
            std::fs::copy(file, &path).map_err(io(&path))?;
        }
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downloads_resume_and_are_checked_before_use() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source");
        let content: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&source, &content).unwrap();
        let a = asset_of(&source).unwrap();
        let cache = AssetCache::new(dir.path().join("cache")).unwrap();
        assert_eq!(cache.verified(&a).unwrap(), None);
        assert!(cache.require(&a).is_err());
        cache.append(&a, 0, &content[..1200]).unwrap();
        // The connection broke: the next try resumes at 1200.
        assert_eq!(cache.resume_at(&a), 1200);
        cache.append(&a, 1200, &content[1200..]).unwrap();
        let path = cache.finish(&a).unwrap();
        assert_eq!(cache.verified(&a).unwrap(), Some(path.clone()));
        // Corrupted on disk: refused and removed, so it is fetched again.
        std::fs::write(&path, b"tampered").unwrap();
        assert_eq!(cache.verified(&a).unwrap(), None);
        assert!(!path.exists());
        // A download that does not hash to its name is discarded.
        cache.append(&a, 0, &vec![0u8; 5000]).unwrap();
        assert!(matches!(cache.finish(&a), Err(AssetError::Corrupt { .. })));
        assert_eq!(cache.resume_at(&a), 0);
        assert!(cache.append(&a, 4999, &[1, 2]).is_err(), "past its length");
        assert_eq!(cache.insert(&source).unwrap(), a);
        assert!(cache.verified(&a).unwrap().is_some());
    }
}
