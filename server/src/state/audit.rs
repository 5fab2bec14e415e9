//! The tamper-evident audit trail.
//!
//! Every security-relevant event becomes an entry that names its sequence
//! number and the hash of the entry before it. An entry's hash is SHA-256
//! of its exact JSON text, and the server's Ed25519 audit key signs that
//! hash, so editing, deleting or reordering an entry breaks the chain. An
//! export ends with the entry that records the export itself, which also
//! catches a file cut short. [`verify_export`] needs only the exported file
//! and the public key: no database, no trust in the operator's tools.

use std::{collections::BTreeMap, fmt, io::BufRead};

use covey_privacy::Pseudonym;
use covey_protocol::admin::Role;
use ring::{
    digest,
    rand::SystemRandom,
    signature::{self, Ed25519KeyPair, KeyPair},
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Signatures cover this prefix and the entry's hash, so an audit signature
/// can never be replayed as any other kind of signature.
const SIGNING_CONTEXT: &[u8] = b"covey audit entry v1\0";

/// How a public key file starts.
const PUBLIC_KEY_TAG: &str = "covey-audit-ed25519";

#[derive(Debug, thiserror::Error)]
pub enum AuditKeyError {
    #[error("cannot generate an audit key")]
    Generate,
    #[error("the stored audit key is not an Ed25519 PKCS#8 key: {0}")]
    Invalid(String),
    #[error("not an audit public key: expected `{PUBLIC_KEY_TAG} <64 hex digits>`")]
    PublicKey,
}

/// SHA-256 of an entry's JSON text; the chain's links.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct EntryHash([u8; 32]);

impl EntryHash {
    /// What the first entry links to.
    pub const GENESIS: Self = Self([0; 32]);

    pub fn of(entry_json: &str) -> Self {
        let d = digest::digest(&digest::SHA256, entry_json.as_bytes());
        let mut out = [0; 32];
        out.copy_from_slice(d.as_ref());
        Self(out)
    }

    pub fn parse(text: &str) -> Option<Self> {
        let bytes = hex::decode(text).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for EntryHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for EntryHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for EntryHash {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EntryHash {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).ok_or_else(|| serde::de::Error::custom("not a SHA-256 hash in hex"))
    }
}

/// What happened. Clients appear only under their pseudonyms; nothing here
/// describes an individual update.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AuditEvent {
    /// The state directory was created.
    Initialised {
        model: String,
        parameters: u64,
    },
    /// `covey-server run` opened the state, under this configuration.
    ServerStarted {
        config_sha256: String,
    },
    /// The configuration differs from the one the last start used.
    ConfigChanged {
        from_sha256: Option<String>,
        to_sha256: String,
    },
    Enrolled {
        client: Pseudonym,
        role: Role,
        not_after_unix: i64,
    },
    Revoked {
        client: Pseudonym,
    },
    /// A request to the operator API, allowed or refused.
    AdminRequest {
        actor: Pseudonym,
        role: Role,
        action: String,
        allowed: bool,
    },
    /// A device renewed its certificate onto a new key before it expired.
    Renewed {
        from: Pseudonym,
        to: Pseudonym,
        not_after_unix: i64,
    },
    /// The enrollment behind this pseudonym was erased on request.
    Forgotten {
        client: Pseudonym,
    },
    RoundStarted {
        round: u64,
        base_version: u64,
        selected: usize,
    },
    /// A new model version was released from `cohort` updates.
    RoundCommitted {
        round: u64,
        version: u64,
        cohort: usize,
        /// ε spent by the run so far, at the configured δ.
        epsilon: Option<f64>,
        /// Updates refused during the round, by reason.
        rejected: BTreeMap<String, u32>,
    },
    /// The round released nothing.
    RoundAborted {
        round: u64,
        reason: String,
        cohort: usize,
        rejected: BTreeMap<String, u32>,
    },
    /// The server stopped while the round was in flight.
    RoundAbandoned {
        round: u64,
    },
    /// An operator wrote a model version out in plaintext.
    ModelExported {
        version: u64,
    },
    /// The data key was re-wrapped under a new key-encryption key.
    KeyRotated,
    /// Retention deleted these round records and model versions.
    Purged {
        rounds: Vec<u64>,
        versions: Vec<u64>,
    },
    /// A dashboard login was issued to this role holder; `login` is the
    /// first 8 bytes of its token's SHA-256, never the token.
    DashboardLoginIssued {
        actor: Pseudonym,
        role: Role,
        login: String,
        expires_unix: i64,
    },
    /// A browser signed in to the dashboard with that login.
    DashboardSignedIn {
        actor: Pseudonym,
        role: Role,
        login: String,
    },
    /// A dashboard sign-in was refused (unknown, expired or revoked login).
    DashboardRefused {
        reason: String,
    },
    /// These logins of the holder's ended: signed out, or revoked.
    DashboardLoginsRevoked {
        actor: Pseudonym,
        logins: Vec<String>,
    },
    /// The trail was exported; `entries` counts every entry up to and
    /// including this one, so a shortened file is detected.
    AuditExported {
        entries: u64,
    },
}

/// One link of the chain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub time_unix_ms: u64,
    pub prev: EntryHash,
    #[serde(flatten)]
    pub event: AuditEvent,
}

/// An entry as stored and exported: its exact JSON text, hash and signature.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SealedEntry {
    pub json: String,
    pub hash: [u8; 32],
    pub signature: Vec<u8>,
}

impl SealedEntry {
    /// The export form: one JSON object per line.
    pub fn to_line(&self) -> String {
        // `json` is the entry's own serialization, so embedding it verbatim
        // keeps the hashed bytes and the exported bytes identical.
        format!(
            "{{\"entry\":{},\"hash\":\"{}\",\"signature\":\"{}\"}}",
            self.json,
            hex::encode(self.hash),
            hex::encode(&self.signature)
        )
    }

    pub fn entry(&self) -> Result<AuditEntry, serde_json::Error> {
        serde_json::from_str(&self.json)
    }
}

/// Where the chain goes on from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainHead {
    pub next_seq: u64,
    pub prev: EntryHash,
}

impl ChainHead {
    pub const EMPTY: Self = Self {
        next_seq: 0,
        prev: EntryHash::GENESIS,
    };

    pub fn after(entry: &SealedEntry, seq: u64) -> Self {
        Self {
            next_seq: seq + 1,
            prev: EntryHash(entry.hash),
        }
    }
}

/// The server's audit signing key.
pub struct AuditSigner(Ed25519KeyPair);

impl AuditSigner {
    /// A fresh key, as PKCS#8 bytes to store.
    pub fn generate() -> Result<Vec<u8>, AuditKeyError> {
        Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map(|doc| doc.as_ref().to_vec())
            .map_err(|_| AuditKeyError::Generate)
    }

    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, AuditKeyError> {
        Ed25519KeyPair::from_pkcs8(pkcs8)
            .map(Self)
            .map_err(|e| AuditKeyError::Invalid(e.to_string()))
    }

    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0; 32];
        out.copy_from_slice(self.0.public_key().as_ref());
        out
    }

    /// The public key file's text.
    pub fn public_key_text(&self) -> String {
        format!("{PUBLIC_KEY_TAG} {}\n", hex::encode(self.public_key()))
    }

    /// Seals `events` as the next entries after `head`; returns them and
    /// the head after them. Nothing changes until the caller stores them.
    pub fn seal(
        &self,
        head: ChainHead,
        time_unix_ms: u64,
        events: impl IntoIterator<Item = AuditEvent>,
    ) -> (Vec<SealedEntry>, ChainHead) {
        let mut head = head;
        let mut sealed = Vec::new();
        for event in events {
            let entry = AuditEntry {
                seq: head.next_seq,
                time_unix_ms,
                prev: head.prev,
                event,
            };
            // Plain data with string keys always serializes.
            let json = serde_json::to_string(&entry).expect("audit entries serialize");
            let hash = EntryHash::of(&json);
            let signature = self.0.sign(&signed_message(&hash)).as_ref().to_vec();
            let entry = SealedEntry {
                json,
                hash: hash.0,
                signature,
            };
            head = ChainHead::after(&entry, head.next_seq);
            sealed.push(entry);
        }
        (sealed, head)
    }
}

fn signed_message(hash: &EntryHash) -> Vec<u8> {
    [SIGNING_CONTEXT, hash.as_bytes()].concat()
}

/// Reads a public key file written by `covey-server audit public-key`.
pub fn parse_public_key(text: &str) -> Result<[u8; 32], AuditKeyError> {
    let hex_part = text
        .trim()
        .strip_prefix(PUBLIC_KEY_TAG)
        .ok_or(AuditKeyError::PublicKey)?
        .trim();
    hex::decode(hex_part)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(AuditKeyError::PublicKey)
}

/// A verified export.
#[derive(Clone, Debug, PartialEq)]
pub struct Verified {
    pub entries: u64,
    /// The last entry's hash: keep it, and a later export must contain it.
    pub head: EntryHash,
    pub events: Vec<AuditEntry>,
}

/// The first bad line of an export.
#[derive(Debug, thiserror::Error)]
#[error("line {line}{}: {problem}", seq.map(|s| format!(" (entry {s})")).unwrap_or_default())]
pub struct VerifyError {
    pub line: usize,
    pub seq: Option<u64>,
    pub problem: Problem,
}

#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("cannot read the file: {0}")]
    Io(String),
    #[error("not an audit entry: {0}")]
    Malformed(String),
    #[error("the hash does not match the entry's text: the entry was altered")]
    HashMismatch,
    #[error("the signature does not verify under the audit public key")]
    BadSignature,
    #[error("expected entry {expected} here: entries were deleted, inserted or reordered")]
    OutOfSequence { expected: u64 },
    #[error("does not link to the entry before it: entries were deleted, inserted or reordered")]
    BrokenLink,
    #[error("the file ends without its export record: entries after this one were removed")]
    Truncated,
    #[error("the file holds no audit entries")]
    Empty,
    #[error("no entry has the checkpoint hash {0}: history before it was rewritten")]
    MissingCheckpoint(EntryHash),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line<'a> {
    #[serde(borrow)]
    entry: &'a RawValue,
    hash: String,
    signature: String,
}

/// Checks a trail link by link as it grows. An export's verifier runs one
/// over the file; the dashboard keeps one and feeds it new entries, so a
/// long trail is verified once, not on every refresh.
pub struct ChainCheck {
    key: signature::UnparsedPublicKey<[u8; 32]>,
    head: ChainHead,
}

impl ChainCheck {
    pub fn new(public_key: [u8; 32]) -> Self {
        Self {
            key: signature::UnparsedPublicKey::new(&signature::ED25519, public_key),
            head: ChainHead::EMPTY,
        }
    }

    /// Entries verified so far.
    pub fn entries(&self) -> u64 {
        self.head.next_seq
    }

    /// The last verified entry's hash.
    pub fn head(&self) -> EntryHash {
        self.head.prev
    }

    /// Checks the next entry: its text against its hash, the signature, its
    /// place in the sequence and its link to the entry before.
    pub fn push(
        &mut self,
        json: &str,
        hash: &[u8; 32],
        sig: &[u8],
    ) -> Result<AuditEntry, (Option<u64>, Problem)> {
        let entry: AuditEntry =
            serde_json::from_str(json).map_err(|e| (None, Problem::Malformed(e.to_string())))?;
        let seq = Some(entry.seq);
        let computed = EntryHash::of(json);
        if computed.as_bytes() != hash {
            return Err((seq, Problem::HashMismatch));
        }
        self.key
            .verify(&signed_message(&computed), sig)
            .map_err(|_| (seq, Problem::BadSignature))?;
        if entry.seq != self.head.next_seq {
            return Err((
                seq,
                Problem::OutOfSequence {
                    expected: self.head.next_seq,
                },
            ));
        }
        if entry.prev != self.head.prev {
            return Err((seq, Problem::BrokenLink));
        }
        self.head = ChainHead {
            next_seq: entry.seq + 1,
            prev: computed,
        };
        Ok(entry)
    }
}

/// Checks every line of an exported trail against `public_key`, and that
/// each of `checkpoints` (heads of earlier exports) is in it.
pub fn verify_export(
    reader: impl BufRead,
    public_key: &[u8; 32],
    checkpoints: &[EntryHash],
) -> Result<Verified, VerifyError> {
    let mut chain = ChainCheck::new(*public_key);
    let mut events = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut last_line = 0;
    for (index, text) in reader.lines().enumerate() {
        let line = index + 1;
        let fail = |seq, problem| VerifyError { line, seq, problem };
        let text = text.map_err(|e| fail(None, Problem::Io(e.to_string())))?;
        if text.trim().is_empty() {
            continue;
        }
        let parsed: Line = serde_json::from_str(&text)
            .map_err(|e| fail(None, Problem::Malformed(e.to_string())))?;
        let hash = EntryHash::parse(&parsed.hash).ok_or_else(|| {
            let seq = serde_json::from_str::<AuditEntry>(parsed.entry.get())
                .ok()
                .map(|e| e.seq);
            fail(seq, Problem::HashMismatch)
        })?;
        let sig = hex::decode(&parsed.signature).unwrap_or_default();
        let entry = chain
            .push(parsed.entry.get(), hash.as_bytes(), &sig)
            .map_err(|(seq, problem)| fail(seq, problem))?;
        seen.insert(hash);
        events.push(entry);
        last_line = line;
    }
    let head = chain.head;
    let Some(last) = events.last() else {
        return Err(VerifyError {
            line: last_line,
            seq: None,
            problem: Problem::Empty,
        });
    };
    let closed =
        matches!(last.event, AuditEvent::AuditExported { entries } if entries == head.next_seq);
    if !closed {
        return Err(VerifyError {
            line: last_line,
            seq: Some(last.seq),
            problem: Problem::Truncated,
        });
    }
    if let Some(missing) = checkpoints.iter().find(|c| !seen.contains(c)) {
        return Err(VerifyError {
            line: last_line,
            seq: None,
            problem: Problem::MissingCheckpoint(*missing),
        });
    }
    Ok(Verified {
        entries: head.next_seq,
        head: head.prev,
        events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn signer() -> AuditSigner {
        AuditSigner::from_pkcs8(&AuditSigner::generate().unwrap()).unwrap()
    }

    /// An export of `n` round events closed by its export record.
    fn export(signer: &AuditSigner, n: u64) -> Vec<String> {
        let mut events: Vec<AuditEvent> = (0..n)
            .map(|round| AuditEvent::RoundCommitted {
                round,
                version: round + 1,
                cohort: 10,
                epsilon: Some(0.1 * round as f64 + 1e-17),
                rejected: BTreeMap::from([("norm_above_clip".into(), 1)]),
            })
            .collect();
        events.push(AuditEvent::AuditExported { entries: n + 1 });
        let (sealed, head) = signer.seal(ChainHead::EMPTY, 1_700_000_000_000, events);
        assert_eq!(head.next_seq, n + 1);
        sealed.iter().map(SealedEntry::to_line).collect()
    }

    fn verify(lines: &[String], signer: &AuditSigner) -> Result<Verified, VerifyError> {
        verify_export(lines.join("\n").as_bytes(), &signer.public_key(), &[])
    }

    #[test]
    fn an_untouched_export_verifies() {
        let s = signer();
        let lines = export(&s, 5);
        let v = verify(&lines, &s).unwrap();
        assert_eq!(v.entries, 6);
        assert_eq!(v.events.len(), 6);
        assert!(lines[0].contains("\"event\":\"round_committed\""));
        // The head is the last line's hash, and works as a checkpoint.
        let first: Line = serde_json::from_str(&lines[0]).unwrap();
        let checkpoint = EntryHash::parse(&first.hash).unwrap();
        verify_export(
            lines.join("\n").as_bytes(),
            &s.public_key(),
            &[checkpoint, v.head],
        )
        .unwrap();
    }

    #[test]
    fn each_kind_of_tampering_names_the_first_bad_line() {
        let s = signer();
        let lines = export(&s, 5);

        let mut edited = lines.clone();
        edited[2] = edited[2].replace("\"cohort\":10", "\"cohort\":11");
        let e = verify(&edited, &s).unwrap_err();
        assert_eq!((e.line, e.seq), (3, Some(2)));
        assert!(matches!(e.problem, Problem::HashMismatch), "{e}");

        // Re-hashing the edit does not help without the key.
        let parsed: Line = serde_json::from_str(&edited[2]).unwrap();
        let rehashed = EntryHash::of(parsed.entry.get());
        edited[2] = format!(
            "{{\"entry\":{},\"hash\":\"{rehashed}\",\"signature\":\"{}\"}}",
            parsed.entry.get(),
            parsed.signature
        );
        let e = verify(&edited, &s).unwrap_err();
        assert!(matches!(e.problem, Problem::BadSignature), "{e}");
        assert_eq!(e.line, 3);

        let mut deleted = lines.clone();
        deleted.remove(1);
        let e = verify(&deleted, &s).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(
            matches!(e.problem, Problem::OutOfSequence { expected: 1 }),
            "{e}"
        );

        let mut reordered = lines.clone();
        reordered.swap(3, 4);
        let e = verify(&reordered, &s).unwrap_err();
        assert_eq!(e.line, 4);
        assert!(e.to_string().contains("line 4 (entry 4)"), "{e}");

        let mut truncated = lines.clone();
        truncated.pop();
        let e = verify(&truncated, &s).unwrap_err();
        assert_eq!((e.line, e.seq), (5, Some(4)));
        assert!(matches!(e.problem, Problem::Truncated), "{e}");

        let e = verify(&lines[1..], &s).unwrap_err();
        assert!(matches!(e.problem, Problem::OutOfSequence { expected: 0 }));

        let e = verify(&[], &s).unwrap_err();
        assert!(matches!(e.problem, Problem::Empty));

        let mut garbage = lines.clone();
        garbage[0] = "{not json".into();
        assert!(matches!(
            verify(&garbage, &s).unwrap_err().problem,
            Problem::Malformed(_)
        ));
    }

    #[test]
    fn another_key_or_a_missing_checkpoint_is_refused() {
        let s = signer();
        let lines = export(&s, 3);
        let e = verify(&lines, &signer()).unwrap_err();
        assert_eq!(e.line, 1);
        assert!(matches!(e.problem, Problem::BadSignature));

        // A rewritten history, signed with the right key, still lacks the
        // head an auditor kept from an earlier export.
        let earlier = verify(&export(&s, 4), &s).unwrap().head;
        let e =
            verify_export(lines.join("\n").as_bytes(), &s.public_key(), &[earlier]).unwrap_err();
        assert!(matches!(e.problem, Problem::MissingCheckpoint(_)), "{e}");
    }

    #[test]
    fn public_key_files_round_trip() {
        let s = signer();
        assert_eq!(
            parse_public_key(&s.public_key_text()).unwrap(),
            s.public_key()
        );
        assert!(parse_public_key("ssh-ed25519 AAAA").is_err());
        assert!(parse_public_key("covey-audit-ed25519 00ff").is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Flipping any byte of any line's entry is caught at that line or
        /// before it.
        #[test]
        fn any_edit_is_caught(line in 0usize..6, at in 0usize..400, bit in 0u8..8) {
            let s = signer();
            let mut lines = export(&s, 5);
            let parsed: Line = serde_json::from_str(&lines[line]).unwrap();
            let entry = parsed.entry.get();
            let at = at % entry.len();
            let mut bytes = entry.as_bytes().to_vec();
            bytes[at] ^= 1 << bit;
            let Ok(altered) = String::from_utf8(bytes) else { return Ok(()) };
            lines[line] = lines[line].replacen(entry, &altered, 1);
            let e = verify(&lines, &s).unwrap_err();
            prop_assert!(e.line <= line + 1, "{}", e);
        }
    }
}
