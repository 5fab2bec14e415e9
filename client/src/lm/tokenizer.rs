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

    /// A tokenizer.json that Hugging Face's tokenizers (and transformers'
    /// AutoTokenizer) load and that encodes text as this tokenizer does:
    /// byte-level BPE with no merges for raw bytes, GPT-2's vocabulary and
    /// merges recovered from its ranks, or a fetched file as it is.
    pub fn to_json(&self) -> Result<String, TokenizerError> {
        let build = |vocab: Vec<(String, u32)>, merges, regex, eot: Option<&str>| {
            let bpe = tokenizers::models::bpe::BPE::builder()
                .vocab_and_merges(
                    vocab
                        .into_iter()
                        .collect::<tokenizers::models::bpe::Vocab>(),
                    merges,
                )
                .build()
                .map_err(|e| TokenizerError::Builtin(e.to_string()))?;
            let mut t = tokenizers::Tokenizer::new(bpe);
            let level = tokenizers::pre_tokenizers::byte_level::ByteLevel::default()
                .add_prefix_space(false)
                .use_regex(regex);
            t.with_pre_tokenizer(Some(level));
            t.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
            if let Some(eot) = eot {
                t.add_special_tokens([tokenizers::AddedToken::from(eot, true)])
                    .map_err(|e| TokenizerError::Builtin(e.to_string()))?;
            }
            t.to_string(true)
                .map_err(|e| TokenizerError::Builtin(e.to_string()))
        };
        match self {
            Self::HuggingFace(t) => t
                .to_string(true)
                .map_err(|e| TokenizerError::Builtin(e.to_string())),
            Self::Bytes => {
                let chars = byte_chars();
                let vocab = (0..=255u8).map(|b| (chars[b as usize].to_string(), u32::from(b)));
                build(vocab.collect(), Vec::new(), false, None)
            }
            Self::Gpt2(bpe) => {
                let (vocab, merges) = gpt2_vocab_and_merges(bpe)?;
                build(vocab, merges, true, Some("<|endoftext|>"))
            }
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

/// GPT-2's map from bytes to printable characters, under which byte-level
/// BPE vocabularies are written: printable Latin-1 bytes stand for
/// themselves, the rest for U+0100 onwards in byte order.
fn byte_chars() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    (0..=255u32)
        .map(|b| {
            let code = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(code).unwrap_or('?')
        })
        .collect()
}

/// GPT-2's vocabulary and merges, recovered from r50k_base's ranks: a
/// token's merge is the last step of running BPE on its bytes with only
/// the merges ranked below it.
fn gpt2_vocab_and_merges(
    bpe: &tiktoken_rs::CoreBPE,
) -> Result<(Vec<(String, u32)>, tokenizers::models::bpe::Merges), TokenizerError> {
    let chars = byte_chars();
    let show = |bytes: &[u8]| bytes.iter().map(|&b| chars[b as usize]).collect::<String>();
    let mut tokens = Vec::with_capacity(50_256);
    let mut ranks = std::collections::HashMap::with_capacity(50_256);
    for rank in 0..50_256u32 {
        let bytes = bpe
            .decode_bytes(&[rank])
            .map_err(|e| TokenizerError::Builtin(format!("rank {rank}: {e:?}")))?;
        ranks.insert(bytes.clone(), rank);
        tokens.push(bytes);
    }
    let mut merges = Vec::new();
    for (rank, bytes) in tokens.iter().enumerate() {
        if bytes.len() < 2 {
            continue;
        }
        let mut parts: Vec<Vec<u8>> = bytes.iter().map(|&b| vec![b]).collect();
        while parts.len() > 2 {
            let best = (0..parts.len() - 1)
                .filter_map(|i| {
                    let joined = [parts[i].as_slice(), parts[i + 1].as_slice()].concat();
                    ranks
                        .get(&joined)
                        .filter(|&&r| (r as usize) < rank)
                        .map(|&r| (r, i))
                })
                .min();
            let Some((_, i)) = best else {
                return Err(TokenizerError::Builtin(format!(
                    "token {rank} has no merge path"
                )));
            };
            let right = parts.remove(i + 1);
            parts[i].extend(right);
        }
        merges.push((show(&parts[0]), show(&parts[1])));
    }
    let vocab = tokens
        .iter()
        .enumerate()
        .map(|(rank, bytes)| (show(bytes), rank as u32))
        .collect();
    Ok((vocab, merges))
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
    fn exported_tokenizer_json_encodes_as_the_original() {
        let dir = tempfile::tempdir().unwrap();
        let samples = [
            "Hello world, it's 2026!",
            "  naïve café ☃\n\tdone  ",
            "<|endoftext|> is special",
        ];
        for original in [TextTokenizer::Bytes, TextTokenizer::gpt2().unwrap()] {
            let path = dir.path().join("tokenizer.json");
            std::fs::write(&path, original.to_json().unwrap()).unwrap();
            let reloaded = TextTokenizer::from_file(&path).unwrap();
            for text in samples {
                let ids = original.encode(text).unwrap();
                if matches!(original, TextTokenizer::Gpt2(_)) && text.contains("<|endoftext|>") {
                    // The file knows the end-of-text token as special.
                    assert_eq!(reloaded.encode(text).unwrap()[0], 50_256);
                    continue;
                }
                assert_eq!(
                    reloaded.encode(text).unwrap(),
                    ids,
                    "{original:?}: {text:?}"
                );
                assert_eq!(reloaded.decode(&ids), text);
            }
        }
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
