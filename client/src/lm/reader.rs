//! Reading a family's tensors out of safetensors files, one tensor at a
//! time, straight into the dtype they will be held in.
//!
//! A device that holds a 124M base in bf16 should never hold it in f32 as
//! well: reading the whole file, widening it and then narrowing it again
//! peaked at three copies of the model. Here only the header is parsed
//! whole; each tensor's bytes are read alone and converted into their place
//! in the flat output, so the peak is the output plus the largest tensor.

use std::{
    collections::HashMap,
    fs::File,
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
};

use covey_protocol::model::{LmArch, TensorSpec};
use half::{bf16, f16};
use safetensors::tensor::{Dtype, Metadata};

use super::checkpoint::{CheckpointError, io, is_buffer, strip_prefix};

/// Headers above this are refused before they are read (safetensors' own
/// limit).
const MAX_HEADER: u64 = 100_000_000;

/// A value a flat model can be read into: f32, or the half-width floats a
/// frozen base may be held in. Checkpoints store f32, f16 or bf16.
pub trait Element: Copy + Default + Send + Sync {
    fn from_f32(v: f32) -> Self;
    fn from_f16(v: f16) -> Self;
    fn from_bf16(v: bf16) -> Self;
}

impl Element for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
    fn from_f16(v: f16) -> Self {
        v.to_f32()
    }
    fn from_bf16(v: bf16) -> Self {
        v.to_f32()
    }
}

impl Element for bf16 {
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn from_f16(v: f16) -> Self {
        bf16::from_f32(v.to_f32())
    }
    fn from_bf16(v: bf16) -> Self {
        v
    }
}

impl Element for f16 {
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn from_f16(v: f16) -> Self {
        v
    }
    fn from_bf16(v: bf16) -> Self {
        f16::from_f32(v.to_f32())
    }
}

/// Little-endian `dtype` bytes converted into `out`, which holds exactly
/// as many values; `None` for a dtype that is not a float Covey reads.
fn convert<T: Element>(dtype: Dtype, data: &[u8], out: &mut [T]) -> Option<()> {
    match dtype {
        Dtype::F32 => {
            for (o, b) in out.iter_mut().zip(data.chunks_exact(4)) {
                *o = T::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            }
        }
        Dtype::F16 => {
            for (o, b) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = T::from_f16(f16::from_le_bytes([b[0], b[1]]));
            }
        }
        Dtype::BF16 => {
            for (o, b) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = T::from_bf16(bf16::from_le_bytes([b[0], b[1]]));
            }
        }
        // numpy's default float: an external model's file may hold it.
        Dtype::F64 => {
            for (o, b) in out.iter_mut().zip(data.chunks_exact(8)) {
                let mut w = [0; 8];
                w.copy_from_slice(b);
                *o = T::from_f32(f64::from_le_bytes(w) as f32);
            }
        }
        _ => return None,
    }
    Some(())
}

/// Little-endian f32, f16, bf16 or f64 bytes as f32.
pub(crate) fn widen(dtype: Dtype, data: &[u8]) -> Option<Vec<f32>> {
    let mut out = vec![0.0; data.len() / dtype.bitsize().div_ceil(8).max(1)];
    convert(dtype, data, &mut out)?;
    Some(out)
}

/// An open safetensors file: its parsed header and where its data starts.
struct Opened {
    file: File,
    metadata: Metadata,
    data_start: u64,
}

fn format(path: &Path, problem: String) -> CheckpointError {
    CheckpointError::Format {
        path: path.display().to_string(),
        problem: format!("not a safetensors file: {problem}"),
    }
}

/// Opens `path` and reads its header; the header's offsets must cover the
/// file exactly, as `SafeTensors::deserialize` requires of a whole buffer.
fn open(path: &Path) -> Result<Opened, CheckpointError> {
    let mut file = File::open(path).map_err(io(path))?;
    let size = file.metadata().map_err(io(path))?.len();
    let mut n = [0u8; 8];
    file.read_exact(&mut n)
        .map_err(|_| format(path, "shorter than its 8-byte header length".into()))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || 8 + n > size {
        return Err(format(
            path,
            format!("header of {n} bytes in a file of {size}"),
        ));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header).map_err(io(path))?;
    let metadata: Metadata =
        serde_json::from_slice(&header).map_err(|e| format(path, e.to_string()))?;
    let data_start = 8 + n;
    if data_start + metadata.data_len() as u64 != size {
        return Err(format(
            path,
            format!(
                "its header describes {} bytes of data, the file holds {}",
                metadata.data_len(),
                size - data_start
            ),
        ));
    }
    Ok(Opened {
        file,
        metadata,
        data_start,
    })
}

/// Reads the family's tensors from safetensors files into one flat vector
/// in [`Family::tensors`](covey_protocol::model::Family::tensors) order,
/// each converted to `T` as it is read. Buffers the family recomputes
/// (GPT-2's causal masks) are skipped; a missing, misshaped, unexpected or
/// non-float tensor is refused by name.
pub fn read_tensors<T: Element>(
    files: &[PathBuf],
    arch: &LmArch,
) -> Result<Vec<T>, CheckpointError> {
    let family = arch.family();
    let wanted = family.tensors();
    let mut offsets = Vec::with_capacity(wanted.len());
    let mut total = 0usize;
    for t in &wanted {
        offsets.push(total);
        total += t.len();
    }
    let index: HashMap<&str, usize> = wanted
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let mut out = vec![T::default(); total];
    let mut seen = vec![false; wanted.len()];
    let mut bytes = Vec::new();
    for file in files {
        let path = file.display().to_string();
        let mut opened = open(file)?;
        let mut infos: Vec<_> = opened.metadata.tensors().into_iter().collect();
        // In file order, so the reads run forward through the file.
        infos.sort_by_key(|(_, info)| info.data_offsets);
        for (name, info) in infos {
            if is_buffer(&name, arch) {
                continue;
            }
            let short = strip_prefix(&name, arch);
            let Some(&i) = index.get(short) else {
                return Err(CheckpointError::Unexpected {
                    path,
                    name,
                    family: family.name(),
                });
            };
            let spec: &TensorSpec = &wanted[i];
            if info.shape != spec.shape {
                return Err(CheckpointError::Shape {
                    path,
                    name,
                    got: info.shape.clone(),
                    expected: spec.shape.clone(),
                });
            }
            let (start, end) = info.data_offsets;
            bytes.resize(end - start, 0);
            opened
                .file
                .seek(SeekFrom::Start(opened.data_start + start as u64))
                .map_err(io(file))?;
            opened.file.read_exact(&mut bytes).map_err(io(file))?;
            let place = &mut out[offsets[i]..offsets[i] + spec.len()];
            convert(info.dtype, &bytes, place).ok_or_else(|| CheckpointError::DType {
                path: path.clone(),
                name: name.clone(),
                dtype: format!("{:?}", info.dtype),
            })?;
            seen[i] = true;
        }
        // The largest tensor's buffer is not kept past its file.
        bytes = Vec::new();
    }
    if let Some(i) = seen.iter().position(|s| !s) {
        return Err(CheckpointError::Missing {
            path: files
                .first()
                .map(|f| f.display().to_string())
                .unwrap_or_default(),
            name: wanted[i].name.clone(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lm::checkpoint;
    use std::collections::HashMap;

    fn reference(name: &str) -> PathBuf {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/lm")).join(name)
    }

    /// The reference GPT-2 checkpoint read three ways: f32, and narrowed to
    /// bf16 and f16 while reading, which must equal narrowing the f32 read.
    #[test]
    fn narrow_reads_equal_the_f32_read_narrowed() {
        let dir = reference("gpt2");
        let arch = checkpoint::read_config(&dir).unwrap();
        let files = [dir.join("model.safetensors")];
        let wide: Vec<f32> = read_tensors(&files, &arch).unwrap();
        assert_eq!(
            wide.len(),
            arch.family()
                .tensors()
                .iter()
                .map(TensorSpec::len)
                .sum::<usize>()
        );
        assert!(wide.iter().any(|v| *v != 0.0));
        let b: Vec<bf16> = read_tensors(&files, &arch).unwrap();
        let h: Vec<f16> = read_tensors(&files, &arch).unwrap();
        for ((w, b), h) in wide.iter().zip(&b).zip(&h) {
            assert_eq!(*b, bf16::from_f32(*w));
            assert_eq!(*h, f16::from_f32(*w));
        }
    }

    /// A bf16 file widens exactly, and converts to f16 through f32.
    #[test]
    fn a_half_width_file_is_read_in_any_element_type() {
        let dir = reference("gpt2");
        let arch = checkpoint::read_config(&dir).unwrap();
        let wide: Vec<f32> = read_tensors(&[dir.join("model.safetensors")], &arch).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("half.safetensors");
        let specs = arch.family().tensors();
        let mut raw: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
        let mut at = 0;
        for t in &specs {
            let bytes = wide[at..at + t.len()]
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                .collect();
            raw.push((t.name.clone(), bytes, t.shape.clone()));
            at += t.len();
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = raw
            .iter()
            .map(|(n, b, s)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(Dtype::BF16, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None::<HashMap<String, String>>, &path).unwrap();
        let back: Vec<f32> = read_tensors(std::slice::from_ref(&path), &arch).unwrap();
        let halves: Vec<f16> = read_tensors(&[path], &arch).unwrap();
        for ((w, b), h) in wide.iter().zip(&back).zip(&halves) {
            assert_eq!(*b, bf16::from_f32(*w).to_f32());
            assert_eq!(*h, f16::from_f32(*b));
        }
    }

    /// A file cut short, one whose header lies about its length, and an
    /// empty one are refused with the file named, never read past.
    #[test]
    fn truncated_and_lying_files_are_refused_by_name() {
        let dir = reference("gpt2");
        let arch = checkpoint::read_config(&dir).unwrap();
        let whole = std::fs::read(dir.join("model.safetensors")).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let cut = tmp.path().join("cut.safetensors");
        std::fs::write(&cut, &whole[..whole.len() - 100]).unwrap();
        let err = read_tensors::<f32>(&[cut], &arch).unwrap_err().to_string();
        assert!(
            err.contains("cut.safetensors") && err.contains("header describes"),
            "{err}"
        );
        let liar = tmp.path().join("liar.safetensors");
        let mut bytes = whole.clone();
        bytes[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        std::fs::write(&liar, &bytes).unwrap();
        let err = read_tensors::<f32>(&[liar], &arch).unwrap_err().to_string();
        assert!(
            err.contains("liar.safetensors") && err.contains("header of"),
            "{err}"
        );
        let empty = tmp.path().join("empty.safetensors");
        std::fs::write(&empty, b"").unwrap();
        let err = read_tensors::<f32>(&[empty], &arch)
            .unwrap_err()
            .to_string();
        assert!(err.contains("8-byte header length"), "{err}");
    }
}
