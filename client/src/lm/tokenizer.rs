//! From a device's text to token ids and back: raw bytes, GPT-2's BPE
//! (r50k_base, built into the binary by tiktoken-rs), or a Hugging Face
//! `tokenizer.json` (the `tokenizers` crate).

use std::{path::Path, sync::OnceLock};

use covey_protocol::model::TokenizerSpec;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: not a Hugging Face tokenizer.json: {problem}")]
    Load { path: String, problem: String },
    #[error("GPT-2's built-in BPE: {0}")]
    Builtin(String),
    #[error("tokenizing: {0}")]
    Encode(String),
    #[error("the task's tokenizer.json ({0}) has not been fetched")]
    NotFetched(String),
}

/// Token ids of a tokenizer's end-of-text marker, by the names the
/// common families give it.
const END_OF_TEXT: &[&str] = &["<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>"];

pub enum TextTokenizer {
    Bytes,
    Gpt2(&'static tiktoken_rs::CoreBPE),
    HuggingFace(Box<tokenizers::Tokenizer>),
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Bytes => "bytes",
            Self::Gpt2(_) => "gpt2 bpe",
            Self::HuggingFace(_) => "tokenizer.json",
        })
    }
}

impl TextTokenizer {
    /// The tokenizer a spec names; `file` is where a fetched
    /// tokenizer.json lies.
    pub fn for_spec(spec: &TokenizerSpec, file: Option<&Path>) -> Result<Self, TokenizerError> {
        match spec {
            TokenizerSpec::Bytes => Ok(Self::Bytes),
            TokenizerSpec::Gpt2Bpe => Self::gpt2(),
            TokenizerSpec::HuggingFace(asset) => match file {
                Some(path) => Self::from_file(path),
                None => Err(TokenizerError::NotFetched(asset.hex())),
            },
        }
    }

    pub fn gpt2() -> Result<Self, TokenizerError> {
        // The table is built once per process.
        static GPT2: OnceLock<Result<tiktoken_rs::CoreBPE, String>> = OnceLock::new();
        match GPT2.get_or_init(|| tiktoken_rs::r50k_base().map_err(|e| e.to_string())) {
            Ok(bpe) => Ok(Self::Gpt2(bpe)),
            Err(e) => Err(TokenizerError::Builtin(e.clone())),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        tokenizers::Tokenizer::from_file(path)
            .map(|t| Self::HuggingFace(Box::new(t)))
            .map_err(|e| TokenizerError::Load {
                path: path.display().to_string(),
                problem: e.to_string(),
            })
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Bytes => 256,
            Self::Gpt2(_) => 50_257,
            Self::HuggingFace(t) => t.get_vocab_size(true),
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Self::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Self::Gpt2(bpe) => Ok(bpe.encode_ordinary(text)),
            Self::HuggingFace(t) => t
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| TokenizerError::Encode(e.to_string())),
        }
    }

    /// Text of `ids`; bytes that are not UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Self::Bytes => {
                let bytes: Vec<u8> = ids.iter().filter_map(|&i| u8::try_from(i).ok()).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Self::Gpt2(bpe) => bpe
                .decode_bytes(ids)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default(),
            Self::HuggingFace(t) => t.decode(ids, true).unwrap_or_default(),
        }
    }

    /// What goes between two documents packed into one stream: the
    /// end-of-text token where the tokenizer has one, a blank line else.
    pub fn separator(&self) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Self::Gpt2(_) => Ok(vec![50_256]),
            Self::HuggingFace(t) => match END_OF_TEXT.iter().find_map(|s| t.token_to_id(s)) {
                Some(id) => Ok(vec![id]),
                None => self.encode("\n\n"),
            },
            Self::Bytes => self.encode("\n\n"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_and_gpt2_matches_its_published_ids() {
        let bytes = TextTokenizer::Bytes;
        let text = "naïve ☃";
        let ids = bytes.encode(text).unwrap();
        assert_eq!(ids.len(), text.len());
        assert_eq!(bytes.decode(&ids), text);
        let gpt2 = TextTokenizer::gpt2().unwrap();
        // GPT-2's tokenizer: "Hello world" is [15496, 995].
        assert_eq!(gpt2.encode("Hello world").unwrap(), vec![15496, 995]);
        assert_eq!(gpt2.decode(&[15496, 995]), "Hello world");
        assert_eq!(gpt2.separator().unwrap(), vec![50_256]);
        assert_eq!(gpt2.vocab_size(), 50_257);
    }

    #[test]
    fn a_bad_tokenizer_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, "{ not json").unwrap();
        let err = TextTokenizer::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
    }
}
