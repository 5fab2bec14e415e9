//! Encryption at rest: every value the store writes is sealed with
//! AES-256-GCM (ring) under a data key, and the data key is stored wrapped
//! by a key-encryption key (KEK) that lives outside the database, in a
//! file or an environment variable. Rotating the KEK re-wraps 32 bytes and
//! rewrites no data.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use ring::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    rand::{SecureRandom, SystemRandom},
};

/// Format byte in front of every sealed value.
const SEALED_V1: u8 = 1;
/// Associated data of the wrapped data key.
const WRAP_CONTEXT: &[u8] = b"covey data key v1";
const KEY_LEN: usize = 32;
/// How many bytes sealing adds: the format byte, the nonce and the tag.
pub const SEAL_OVERHEAD: usize = 1 + NONCE_LEN + 16;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("key-encryption key {source_name}: {problem}")]
    Kek {
        source_name: String,
        problem: String,
    },
    #[error(
        "the key-encryption key {0} does not unwrap this database's data key: wrong key (nothing was changed)"
    )]
    WrongKek(String),
    #[error("the stored data key is malformed")]
    MalformedWrappedKey,
    #[error("{0}: stored value cannot be decrypted (corrupt, or moved from another key)")]
    Open(String),
    #[error("the system random generator failed")]
    Random,
}

/// Where the KEK comes from: `file:PATH` (relative to the state
/// directory) or `env:VARIABLE`. Either holds 64 hex digits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KekSource {
    File(PathBuf),
    Env(String),
}

impl KekSource {
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(path) = text.strip_prefix("file:").filter(|p| !p.is_empty()) {
            Ok(Self::File(PathBuf::from(path)))
        } else if let Some(var) = text.strip_prefix("env:").filter(|v| !v.is_empty()) {
            Ok(Self::Env(var.to_owned()))
        } else {
            Err(format!("expected file:PATH or env:VARIABLE, got {text:?}"))
        }
    }

    /// The file's path, resolved against the state directory.
    fn resolve(&self, root: &Path) -> Option<PathBuf> {
        match self {
            Self::File(p) => Some(root.join(p)),
            Self::Env(_) => None,
        }
    }

    /// Creates a fresh random KEK file if this source is a file that does
    /// not exist yet (an environment variable must be set by the operator).
    pub fn create_if_missing(&self, root: &Path) -> Result<bool, SealError> {
        let Some(path) = self.resolve(root) else {
            return Ok(false);
        };
        if path.exists() {
            return Ok(false);
        }
        let mut key = [0u8; KEY_LEN];
        SystemRandom::new()
            .fill(&mut key)
            .map_err(|_| SealError::Random)?;
        let fail = |e: std::io::Error| SealError::Kek {
            source_name: self.to_string(),
            problem: format!("cannot create {}: {e}", path.display()),
        };
        write_private(&path, format!("{}\n", hex::encode(key)).as_bytes()).map_err(fail)?;
        Ok(true)
    }

    pub fn load(&self, root: &Path) -> Result<Kek, SealError> {
        let fail = |problem: String| SealError::Kek {
            source_name: self.to_string(),
            problem,
        };
        let text = match self {
            Self::File(p) => {
                // join keeps an absolute path as it is.
                let path = root.join(p);
                std::fs::read_to_string(&path)
                    .map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?
            }
            Self::Env(var) => std::env::var(var)
                .map_err(|_| fail(format!("the environment variable {var} is not set")))?,
        };
        let bytes: [u8; KEY_LEN] = hex::decode(text.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| fail("expected 64 hex digits (32 bytes)".into()))?;
        Ok(Kek {
            key: aead_key(&bytes),
            name: self.to_string(),
        })
    }
}

impl fmt::Display for KekSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(p) => write!(f, "file:{}", p.display()),
            Self::Env(v) => write!(f, "env:{v}"),
        }
    }
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(contents)
}

fn aead_key(bytes: &[u8; KEY_LEN]) -> LessSafeKey {
    // A 32-byte key always fits AES-256-GCM.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("AES-256 key length"))
}

/// A loaded key-encryption key.
pub struct Kek {
    key: LessSafeKey,
    name: String,
}

impl Kek {
    /// A KEK from raw bytes, for tests and tools.
    pub fn from_bytes(bytes: [u8; KEY_LEN], name: &str) -> Self {
        Self {
            key: aead_key(&bytes),
            name: name.to_owned(),
        }
    }
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Kek({})", self.name)
    }
}

/// The key every stored value is sealed under.
pub struct DataKey {
    key: LessSafeKey,
    raw: [u8; KEY_LEN],
    rng: SystemRandom,
}

// By hand: ring's keys are not `Clone`; a copy is rebuilt from the bytes.
impl Clone for DataKey {
    fn clone(&self) -> Self {
        Self::from_raw(self.raw)
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(..)")
    }
}

impl DataKey {
    pub fn generate() -> Result<Self, SealError> {
        let mut raw = [0u8; KEY_LEN];
        SystemRandom::new()
            .fill(&mut raw)
            .map_err(|_| SealError::Random)?;
        Ok(Self::from_raw(raw))
    }

    fn from_raw(raw: [u8; KEY_LEN]) -> Self {
        Self {
            key: aead_key(&raw),
            raw,
            rng: SystemRandom::new(),
        }
    }

    /// The data key sealed under `kek`, to store beside the data.
    pub fn wrap(&self, kek: &Kek) -> Result<Vec<u8>, SealError> {
        seal_with(&kek.key, &self.rng, WRAP_CONTEXT, &self.raw)
    }

    pub fn unwrap(wrapped: &[u8], kek: &Kek) -> Result<Self, SealError> {
        let raw = open_with(&kek.key, WRAP_CONTEXT, wrapped).map_err(|e| match e {
            Opened::Malformed => SealError::MalformedWrappedKey,
            Opened::Rejected => SealError::WrongKek(kek.name.clone()),
        })?;
        let raw: [u8; KEY_LEN] = raw.try_into().map_err(|_| SealError::MalformedWrappedKey)?;
        Ok(Self::from_raw(raw))
    }

    /// Seals `plain` for the slot `location` (tree and key), so a value
    /// copied to another slot no longer opens.
    pub fn seal(&self, location: &[u8], plain: &[u8]) -> Result<Vec<u8>, SealError> {
        seal_with(&self.key, &self.rng, location, plain)
    }

    pub fn open(&self, location: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        open_with(&self.key, location, sealed)
            .map_err(|_| SealError::Open(String::from_utf8_lossy(location).into_owned()))
    }
}

enum Opened {
    Malformed,
    Rejected,
}

fn seal_with(
    key: &LessSafeKey,
    rng: &SystemRandom,
    aad: &[u8],
    plain: &[u8],
) -> Result<Vec<u8>, SealError> {
    // Random 96-bit nonces: safe far beyond the values one server writes
    // (the bound is about 2^32 seals per key).
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut nonce).map_err(|_| SealError::Random)?;
    let mut out = Vec::with_capacity(1 + NONCE_LEN + plain.len() + AES_256_GCM.tag_len());
    out.push(SEALED_V1);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plain);
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[1 + NONCE_LEN..],
        )
        .map_err(|_| SealError::Random)?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

fn open_with(key: &LessSafeKey, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, Opened> {
    if sealed.len() < 1 + NONCE_LEN + AES_256_GCM.tag_len() || sealed[0] != SEALED_V1 {
        return Err(Opened::Malformed);
    }
    let nonce: [u8; NONCE_LEN] = sealed[1..1 + NONCE_LEN]
        .try_into()
        .map_err(|_| Opened::Malformed)?;
    let mut body = sealed[1 + NONCE_LEN..].to_vec();
    let plain = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut body,
        )
        .map_err(|_| Opened::Rejected)?;
    let len = plain.len();
    body.truncate(len);
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_open_only_in_their_slot_and_under_their_key() {
        let key = DataKey::generate().unwrap();
        let sealed = key.seal(b"models/0", b"weights").unwrap();
        assert_ne!(&sealed[1 + NONCE_LEN..][..7], b"weights");
        assert_eq!(key.open(b"models/0", &sealed).unwrap(), b"weights");
        assert!(key.open(b"models/1", &sealed).is_err());
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(key.open(b"models/0", &flipped).is_err());
        assert!(key.open(b"models/0", &sealed[..10]).is_err());
        let other = DataKey::generate().unwrap();
        assert!(other.open(b"models/0", &sealed).is_err());
        // Fresh nonces: the same value seals differently each time.
        assert_ne!(sealed, key.seal(b"models/0", b"weights").unwrap());
    }

    #[test]
    fn a_wrapped_key_opens_with_its_kek_only() {
        let kek = Kek::from_bytes([1; 32], "test");
        let wrong = Kek::from_bytes([2; 32], "wrong");
        let key = DataKey::generate().unwrap();
        let wrapped = key.wrap(&kek).unwrap();
        let back = DataKey::unwrap(&wrapped, &kek).unwrap();
        assert_eq!(back.raw, key.raw);
        let err = DataKey::unwrap(&wrapped, &wrong).unwrap_err();
        assert!(err.to_string().contains("wrong key"), "{err}");
        assert!(matches!(
            DataKey::unwrap(&[1, 2, 3], &kek),
            Err(SealError::MalformedWrappedKey)
        ));
    }

    #[test]
    fn kek_sources_parse_load_and_name_their_problem() {
        let dir = tempfile::tempdir().unwrap();
        let source = KekSource::parse("file:kek.key").unwrap();
        assert!(source.create_if_missing(dir.path()).unwrap());
        assert!(!source.create_if_missing(dir.path()).unwrap());
        source.load(dir.path()).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("kek.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(dir.path().join("bad.key"), "nothex").unwrap();
        let err = KekSource::parse("file:bad.key")
            .unwrap()
            .load(dir.path())
            .unwrap_err();
        assert!(err.to_string().contains("64 hex digits"), "{err}");
        let err = KekSource::parse("env:COVEY_TEST_SURELY_UNSET")
            .unwrap()
            .load(dir.path())
            .unwrap_err();
        assert!(err.to_string().contains("is not set"), "{err}");
        assert!(KekSource::parse("vault:x").is_err());
        assert!(KekSource::parse("file:").is_err());
    }
}
