//! A device's own text: `*.txt` files (one document each) and `*.jsonl`
//! files (one document per line, in its `text` field), plus an optional
//! `heldout/` folder of the same for federated evaluation. Documents are
//! tokenized and packed into context-length sequences.
//!
//! A file that is empty, binary or not UTF-8, or a JSON line without a
//! `text` string, is refused with its name (and line): nothing is skipped
//! silently.

use std::path::{Path, PathBuf};

use crate::lm::ops::IGNORE;

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: the file is empty")]
    Empty { path: String },
    #[error("{path}: a binary file (it holds a NUL byte at offset {offset}), not text")]
    Binary { path: String, offset: usize },
    #[error("{path}: not UTF-8 text (invalid byte at offset {offset})")]
    NotUtf8 { path: String, offset: usize },
    #[error("{path}:{line}: {problem}")]
    Json {
        path: String,
        line: usize,
        problem: String,
    },
    #[error("{dir}: no *.txt or *.jsonl files")]
    NoText { dir: String },
}

/// One document and where it came from (`file` or `file:line`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document {
    pub source: String,
    pub text: String,
}

/// A device's training documents and its held-out ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TextData {
    pub train: Vec<Document>,
    pub heldout: Vec<Document>,
}

impl TextData {
    /// Reads `dir` and, if present, `dir/heldout`.
    pub fn load(dir: &Path) -> Result<Self, TextError> {
        let train = read_documents(dir)?;
        let heldout_dir = dir.join("heldout");
        let heldout = if heldout_dir.is_dir() {
            read_documents(&heldout_dir)?
        } else {
            Vec::new()
        };
        Ok(Self { train, heldout })
    }

    /// Whether `dir` holds text this module reads.
    pub fn present(dir: &Path) -> bool {
        text_files(dir).is_ok_and(|f| !f.is_empty())
    }
}

fn text_files(dir: &Path) -> Result<Vec<PathBuf>, TextError> {
    let entries = std::fs::read_dir(dir).map_err(|source| TextError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| p.extension().is_some_and(|e| e == "txt" || e == "jsonl"))
        .collect();
    files.sort();
    Ok(files)
}

/// Every document in the `*.txt` and `*.jsonl` files of `dir`, in file
/// name order.
pub fn read_documents(dir: &Path) -> Result<Vec<Document>, TextError> {
    let files = text_files(dir)?;
    if files.is_empty() {
        return Err(TextError::NoText {
            dir: dir.display().to_string(),
        });
    }
    let mut docs = Vec::new();
    for file in files {
        let path = file.display().to_string();
        let text = read_text(&file)?;
        if file.extension().is_some_and(|e| e == "jsonl") {
            let before = docs.len();
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let bad = |problem: String| TextError::Json {
                    path: path.clone(),
                    line: i + 1,
                    problem,
                };
                let value: serde_json::Value =
                    serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
                let text = value
                    .get("text")
                    .and_then(serde_json::Value::as_str)
                    .ok_or_else(|| bad("no \"text\" string field".into()))?;
                if !text.is_empty() {
                    docs.push(Document {
                        source: format!("{path}:{}", i + 1),
                        text: text.to_owned(),
                    });
                }
            }
            if docs.len() == before {
                return Err(TextError::Empty { path });
            }
        } else {
            docs.push(Document { source: path, text });
        }
    }
    Ok(docs)
}

/// A file's text, refused when empty, binary or not UTF-8.
fn read_text(file: &Path) -> Result<String, TextError> {
    let path = file.display().to_string();
    let bytes = std::fs::read(file).map_err(|source| TextError::Io {
        path: path.clone(),
        source,
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(TextError::Empty { path });
    }
    if let Some(offset) = bytes.iter().position(|&b| b == 0) {
        return Err(TextError::Binary { path, offset });
    }
    String::from_utf8(bytes).map_err(|e| TextError::NotUtf8 {
        path,
        offset: e.utf8_error().valid_up_to(),
    })
}

/// Token sequences of one length: inputs and next-token targets, with
/// [`IGNORE`] targets (and zero inputs) past the end of the stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sequences {
    pub context: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
}

impl Sequences {
    pub fn len(&self) -> usize {
        self.inputs.len() / self.context.max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty()
    }

    /// Targets that count in the loss.
    pub fn tokens(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE).count()
    }

    /// Inputs and targets of sequences `indices`, concatenated.
    pub fn batch(&self, indices: &[u32]) -> (Vec<u32>, Vec<u32>) {
        let c = self.context;
        let mut inputs = Vec::with_capacity(indices.len() * c);
        let mut targets = Vec::with_capacity(indices.len() * c);
        for &i in indices {
            let at = i as usize * c;
            inputs.extend_from_slice(&self.inputs[at..at + c]);
            targets.extend_from_slice(&self.targets[at..at + c]);
        }
        (inputs, targets)
    }
}

/// Joins the documents' tokens with `separator` and cuts the stream into
/// sequences of `context` tokens, each predicting the token after every
/// position. Nothing is dropped: a document longer than the context spans
/// several sequences, and the last one is padded with ignored targets.
pub fn pack(docs: &[Vec<u32>], separator: &[u32], context: usize) -> Sequences {
    let mut stream = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            stream.extend_from_slice(separator);
        }
        stream.extend_from_slice(d);
    }
    let context = context.max(1);
    let mut seqs = Sequences {
        context,
        ..Default::default()
    };
    if stream.len() < 2 {
        return seqs;
    }
    let mut start = 0;
    while start + 1 < stream.len() {
        for p in 0..context {
            let at = start + p;
            seqs.inputs.push(stream.get(at).copied().unwrap_or(0));
            seqs.targets
                .push(stream.get(at + 1).copied().unwrap_or(IGNORE));
        }
        start += context;
    }
    seqs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) {
        std::fs::write(dir.join(name), bytes).unwrap();
    }

    #[test]
    fn txt_and_jsonl_documents_load_in_name_order_with_heldout() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "b.txt", "second file".as_bytes());
        write(
            dir.path(),
            "a.jsonl",
            b"{\"text\": \"one\"}\n\n{\"text\": \"two\", \"id\": 3}\n",
        );
        write(dir.path(), "notes.md", b"ignored: not .txt or .jsonl");
        std::fs::create_dir(dir.path().join("heldout")).unwrap();
        write(&dir.path().join("heldout"), "h.txt", b"held out");
        let data = TextData::load(dir.path()).unwrap();
        let texts: Vec<&str> = data.train.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(texts, ["one", "two", "second file"]);
        assert!(data.train[1].source.ends_with("a.jsonl:3"));
        assert_eq!(data.heldout.len(), 1);
        assert!(TextData::present(dir.path()));
    }

    #[test]
    fn bad_files_are_refused_by_name() {
        let cases: [(&str, &[u8], &str); 5] = [
            ("empty.txt", b"  \n", "empty.txt: the file is empty"),
            (
                "bin.txt",
                b"ab\0cd",
                "bin.txt: a binary file (it holds a NUL byte at offset 2)",
            ),
            (
                "latin1.txt",
                b"caf\xe9",
                "latin1.txt: not UTF-8 text (invalid byte at offset 3)",
            ),
            (
                "x.jsonl",
                b"{\"text\": 1}",
                "x.jsonl:1: no \"text\" string field",
            ),
            ("y.jsonl", b"{\"text\": \"a\"}\nnope", "y.jsonl:2: not JSON"),
        ];
        for (name, bytes, message) in cases {
            let dir = tempfile::tempdir().unwrap();
            write(dir.path(), name, bytes);
            let err = TextData::load(dir.path()).unwrap_err().to_string();
            assert!(err.contains(message), "{name}: {err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let err = TextData::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no *.txt or *.jsonl files"), "{err}");
    }

    #[test]
    fn packing_keeps_every_token_and_splits_long_documents() {
        let docs = vec![vec![1, 2, 3, 4, 5, 6, 7], vec![8, 9]];
        let seqs = pack(&docs, &[0], 4);
        // Stream 1..7 0 8 9: ten tokens, nine targets, three sequences.
        assert_eq!(seqs.len(), 3);
        assert_eq!(seqs.inputs, [1, 2, 3, 4, 5, 6, 7, 0, 8, 9, 0, 0]);
        assert_eq!(
            seqs.targets,
            [2, 3, 4, 5, 6, 7, 0, 8, 9, IGNORE, IGNORE, IGNORE]
        );
        assert_eq!(seqs.tokens(), 9);
        let (inputs, targets) = seqs.batch(&[2, 0]);
        assert_eq!(inputs, [8, 9, 0, 0, 1, 2, 3, 4]);
        assert_eq!(targets[..2], [9, IGNORE]);
        assert!(pack(&[vec![5]], &[0], 4).is_empty());
    }
}
