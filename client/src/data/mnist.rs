//! MNIST in its IDX format, gzip-compressed or raw.
//!
//! Every header field is checked against the file's real size, so a corrupt
//! or truncated file is refused with its name and the problem, never read
//! past or half-loaded.

use std::{
    io::Read,
    path::{Path, PathBuf},
    sync::Arc,
};

use flate2::read::GzDecoder;

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    Format { path: String, problem: String },
    #[error("no {what} file in {dir} (looked for {candidates})")]
    Missing {
        what: &'static str,
        dir: String,
        candidates: String,
    },
    #[error("{images} holds {image_count} images but {labels} holds {label_count} labels")]
    CountMismatch {
        images: String,
        labels: String,
        image_count: usize,
        label_count: usize,
    },
}

/// Images as bytes (row-major, one byte a pixel) and their labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Mnist {
    pub rows: usize,
    pub cols: usize,
    pub pixels: Vec<u8>,
    pub labels: Vec<u8>,
}

impl Mnist {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image_len(&self) -> usize {
        self.rows * self.cols
    }

    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.pixels[i * n..(i + 1) * n]
    }

    /// Loads `{prefix}-images-idx3-ubyte[.gz]` and the matching labels.
    pub fn load(dir: &Path, prefix: &str) -> Result<Self, DataError> {
        let images = find(dir, &format!("{prefix}-images-idx3-ubyte"), "image")?;
        let labels = find(dir, &format!("{prefix}-labels-idx1-ubyte"), "label")?;
        Self::load_files(&images, &labels)
    }

    pub fn load_files(images: &Path, labels: &Path) -> Result<Self, DataError> {
        let (rows, cols, pixels, image_count) = read_images(images)?;
        let label_bytes = read_labels(labels)?;
        if label_bytes.len() != image_count {
            return Err(DataError::CountMismatch {
                images: images.display().to_string(),
                labels: labels.display().to_string(),
                image_count,
                label_count: label_bytes.len(),
            });
        }
        if let Some(bad) = label_bytes.iter().find(|&&l| l > 9) {
            return Err(DataError::Format {
                path: labels.display().to_string(),
                problem: format!("label {bad} is not a digit 0-9"),
            });
        }
        Ok(Self {
            rows,
            cols,
            pixels,
            labels: label_bytes,
        })
    }

    /// The examples at `indices`, copied.
    pub fn subset(&self, indices: &[usize]) -> Self {
        let mut pixels = Vec::with_capacity(indices.len() * self.image_len());
        for &i in indices {
            pixels.extend_from_slice(self.image(i));
        }
        Self {
            rows: self.rows,
            cols: self.cols,
            pixels,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
        }
    }
}

/// A client's share of a dataset: shared pixels, its own index list, so K
/// virtual clients never hold K copies.
#[derive(Clone, Debug)]
pub struct DataView {
    pub data: Arc<Mnist>,
    pub indices: Vec<usize>,
}

impl DataView {
    pub fn all(data: Arc<Mnist>) -> Self {
        let indices = (0..data.len()).collect();
        Self { data, indices }
    }

    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
}

fn find(dir: &Path, stem: &str, what: &'static str) -> Result<PathBuf, DataError> {
    let candidates = [dir.join(format!("{stem}.gz")), dir.join(stem)];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| DataError::Missing {
            what,
            dir: dir.display().to_string(),
            candidates: format!("{stem}.gz, {stem}"),
        })
}

fn read_all(path: &Path) -> Result<Vec<u8>, DataError> {
    let io = |source| DataError::Io {
        path: path.display().to_string(),
        source,
    };
    let raw = std::fs::read(path).map_err(io)?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| DataError::Format {
                path: path.display().to_string(),
                problem: format!("corrupt gzip stream: {e}"),
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn check_header(
    path: &Path,
    bytes: &[u8],
    magic: u32,
    dims: usize,
) -> Result<Vec<usize>, DataError> {
    let fail = |problem: String| DataError::Format {
        path: path.display().to_string(),
        problem,
    };
    let header_len = 4 + 4 * dims;
    if bytes.len() < header_len {
        return Err(fail(format!(
            "truncated header: {} bytes, need {header_len}",
            bytes.len()
        )));
    }
    let found = be_u32(bytes, 0);
    if found != magic {
        return Err(fail(format!(
            "bad magic number 0x{found:08x}, expected 0x{magic:08x}"
        )));
    }
    let sizes: Vec<usize> = (0..dims)
        .map(|d| be_u32(bytes, 4 + 4 * d) as usize)
        .collect();
    let expected = sizes
        .iter()
        .try_fold(1usize, |acc, &s| acc.checked_mul(s))
        .and_then(|body| body.checked_add(header_len))
        .ok_or_else(|| fail(format!("sizes {sizes:?} overflow")))?;
    if bytes.len() != expected {
        return Err(fail(format!(
            "header announces {sizes:?} ({expected} bytes) but the file has {} bytes{}",
            bytes.len(),
            if bytes.len() < expected {
                " (truncated)"
            } else {
                ""
            }
        )));
    }
    Ok(sizes)
}

fn read_images(path: &Path) -> Result<(usize, usize, Vec<u8>, usize), DataError> {
    let bytes = read_all(path)?;
    let sizes = check_header(path, &bytes, IMAGES_MAGIC, 3)?;
    Ok((sizes[1], sizes[2], bytes[16..].to_vec(), sizes[0]))
}

fn read_labels(path: &Path) -> Result<Vec<u8>, DataError> {
    let bytes = read_all(path)?;
    check_header(path, &bytes, LABELS_MAGIC, 1)?;
    Ok(bytes[8..].to_vec())
}

/// Writes `data` as gzip IDX files `{prefix}-images-idx3-ubyte.gz` and
/// `{prefix}-labels-idx1-ubyte.gz` in `dir` (used to cut the shipped subset).
pub fn write_idx_gz(data: &Mnist, dir: &Path, prefix: &str) -> std::io::Result<()> {
    use flate2::{Compression, write::GzEncoder};
    use std::io::Write;
    let mut images = Vec::with_capacity(16 + data.pixels.len());
    images.extend_from_slice(&IMAGES_MAGIC.to_be_bytes());
    for v in [data.len(), data.rows, data.cols] {
        images.extend_from_slice(&(v as u32).to_be_bytes());
    }
    images.extend_from_slice(&data.pixels);
    let mut labels = Vec::with_capacity(8 + data.len());
    labels.extend_from_slice(&LABELS_MAGIC.to_be_bytes());
    labels.extend_from_slice(&(data.len() as u32).to_be_bytes());
    labels.extend_from_slice(&data.labels);
    for (name, bytes) in [
        (format!("{prefix}-images-idx3-ubyte.gz"), images),
        (format!("{prefix}-labels-idx1-ubyte.gz"), labels),
    ] {
        let mut enc = GzEncoder::new(std::fs::File::create(dir.join(name))?, Compression::best());
        enc.write_all(&bytes)?;
        enc.finish()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Mnist {
        Mnist {
            rows: 2,
            cols: 2,
            pixels: (0..12).collect(),
            labels: vec![3, 1, 4],
        }
    }

    #[test]
    fn written_files_load_back_gzipped_and_raw() {
        let dir = tempfile::tempdir().unwrap();
        write_idx_gz(&tiny(), dir.path(), "train").unwrap();
        assert_eq!(Mnist::load(dir.path(), "train").unwrap(), tiny());

        // Raw (uncompressed) files load too.
        let raw = tempfile::tempdir().unwrap();
        for f in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"] {
            let bytes = read_all(&dir.path().join(format!("{f}.gz"))).unwrap();
            std::fs::write(raw.path().join(f), bytes).unwrap();
        }
        assert_eq!(Mnist::load(raw.path(), "train").unwrap(), tiny());
    }

    fn corrupt(edit: impl Fn(&mut Vec<u8>)) -> String {
        let dir = tempfile::tempdir().unwrap();
        write_idx_gz(&tiny(), dir.path(), "train").unwrap();
        let path = dir.path().join("train-images-idx3-ubyte.gz");
        let mut bytes = read_all(&path).unwrap();
        edit(&mut bytes);
        std::fs::remove_file(&path).unwrap();
        std::fs::write(dir.path().join("train-images-idx3-ubyte"), bytes).unwrap();
        Mnist::load(dir.path(), "train").unwrap_err().to_string()
    }

    #[test]
    fn corrupt_and_truncated_files_are_named() {
        let err = corrupt(|b| b[3] = 0x99);
        assert!(
            err.contains("train-images-idx3-ubyte: bad magic number 0x00000899"),
            "{err}"
        );
        let err = corrupt(|b| b.truncate(20));
        assert!(err.contains("(truncated)"), "{err}");
        let err = corrupt(|b| b.truncate(6));
        assert!(err.contains("truncated header"), "{err}");
        let err = corrupt(|b| b[7] = 9);
        assert!(err.contains("header announces [9, 2, 2]"), "{err}");
    }

    #[test]
    fn corrupt_gzip_and_missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        write_idx_gz(&tiny(), dir.path(), "train").unwrap();
        let path = dir.path().join("train-labels-idx1-ubyte.gz");
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes.truncate(n / 2);
        std::fs::write(&path, bytes).unwrap();
        let err = Mnist::load(dir.path(), "train").unwrap_err().to_string();
        assert!(
            err.contains("train-labels-idx1-ubyte.gz: corrupt gzip stream"),
            "{err}"
        );
        let err = Mnist::load(dir.path(), "t10k").unwrap_err().to_string();
        assert!(err.starts_with("no image file in"), "{err}");
    }

    #[test]
    fn mismatched_counts_and_bad_labels_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = tiny();
        write_idx_gz(&d, dir.path(), "a").unwrap();
        d.labels.pop();
        d.pixels.truncate(8);
        write_idx_gz(&d, dir.path(), "b").unwrap();
        let err = Mnist::load_files(
            &dir.path().join("a-images-idx3-ubyte.gz"),
            &dir.path().join("b-labels-idx1-ubyte.gz"),
        )
        .unwrap_err();
        assert!(matches!(
            err,
            DataError::CountMismatch {
                image_count: 3,
                label_count: 2,
                ..
            }
        ));
        let mut d = tiny();
        d.labels[0] = 12;
        write_idx_gz(&d, dir.path(), "c").unwrap();
        let err = Mnist::load(dir.path(), "c").unwrap_err().to_string();
        assert!(err.contains("label 12 is not a digit"), "{err}");
    }
}
