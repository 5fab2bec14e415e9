//! Per-round keys of one member: two X25519 key pairs, the channel key `c`
//! (encrypts shares end to end) and the masking key `s` (pairwise masks),
//! and everything derived from them.
//!
//! x25519-dalek rather than ring: ring's agreement keys are single-use and
//! cannot be exported, but each key here agrees with k neighbours and the
//! masking key must be Shamir-shared.

use ring::{
    aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey},
    hkdf,
};
use rustls_pki_types::CertificateDer;
/// Certificate validity is checked at a time the caller gives: this crate
/// reads no clocks.
pub use rustls_pki_types::UnixTime;
use serde::{Deserialize, Serialize};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::RoundId;

use super::{RosterEntry, SecAggError};

/// A member's two public keys, as advertised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PublicKeys {
    pub channel: [u8; 32],
    pub masking: [u8; 32],
}

impl PublicKeys {
    /// The bytes a member signs with its enrolled key: bound to the round
    /// so an advertisement cannot be replayed into another one.
    pub fn signed_message(&self, round: RoundId) -> Vec<u8> {
        let mut m = b"covey secagg keys v1".to_vec();
        m.extend_from_slice(&round.0.to_be_bytes());
        m.extend_from_slice(&self.channel);
        m.extend_from_slice(&self.masking);
        m
    }
}

/// Both secret keys of one member for one round.
pub struct KeyPairs {
    channel: StaticSecret,
    masking: StaticSecret,
}

impl KeyPairs {
    pub fn from_bytes(channel: [u8; 32], masking: [u8; 32]) -> Self {
        Self {
            channel: StaticSecret::from(channel),
            masking: StaticSecret::from(masking),
        }
    }

    pub fn public(&self) -> PublicKeys {
        PublicKeys {
            channel: PublicKey::from(&self.channel).to_bytes(),
            masking: PublicKey::from(&self.masking).to_bytes(),
        }
    }

    pub fn masking_secret(&self) -> [u8; 32] {
        self.masking.to_bytes()
    }

    pub fn channel_secret(&self) -> &StaticSecret {
        &self.channel
    }
}

/// The masking public key a (reconstructed) masking secret belongs to.
pub fn masking_public(secret: &[u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(*secret)).to_bytes()
}

/// HKDF-SHA256 of an X25519 agreement, bound to the round and both
/// members; refuses low-order points, which would give a known secret.
fn agree(
    secret: &StaticSecret,
    peer: &[u8; 32],
    label: &[u8],
    round: RoundId,
    a: u32,
    b: u32,
) -> Result<[u8; 32], SecAggError> {
    let shared = secret.diffie_hellman(&PublicKey::from(*peer));
    if !shared.was_contributory() {
        return Err(SecAggError::WeakKey);
    }
    let (lo, hi) = (a.min(b), a.max(b));
    let mut info = label.to_vec();
    info.extend_from_slice(&round.0.to_be_bytes());
    info.extend_from_slice(&lo.to_be_bytes());
    info.extend_from_slice(&hi.to_be_bytes());
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"covey secagg").extract(shared.as_bytes());
    let info = [info.as_slice()];
    let okm = prk
        .expand(&info, hkdf::HKDF_SHA256)
        .map_err(|_| SecAggError::WeakKey)?;
    let mut out = [0u8; 32];
    okm.fill(&mut out).map_err(|_| SecAggError::WeakKey)?;
    Ok(out)
}

/// The seed of the pairwise mask between members `a` and `b`.
pub fn pairwise_seed(
    masking_secret: &[u8; 32],
    peer_masking: &[u8; 32],
    round: RoundId,
    a: u32,
    b: u32,
) -> Result<[u8; 32], SecAggError> {
    let secret = StaticSecret::from(*masking_secret);
    agree(&secret, peer_masking, b"pairwise mask", round, a, b)
}

/// An AES-256-GCM channel between two members, through the server.
pub struct Channel {
    key: LessSafeKey,
    aad: Vec<u8>,
}

impl Channel {
    pub fn new(
        own: &StaticSecret,
        peer_channel: &[u8; 32],
        round: RoundId,
        a: u32,
        b: u32,
    ) -> Result<Self, SecAggError> {
        let key = agree(own, peer_channel, b"share channel", round, a, b)?;
        let key = UnboundKey::new(&AES_256_GCM, &key).map_err(|_| SecAggError::WeakKey)?;
        let mut aad = b"covey secagg shares".to_vec();
        aad.extend_from_slice(&round.0.to_be_bytes());
        Ok(Self {
            key: LessSafeKey::new(key),
            aad,
        })
    }

    /// Each direction uses its own nonce: one message per direction per
    /// round, and the sender's index makes the nonces distinct.
    fn nonce(from: u32, to: u32) -> Nonce {
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&from.to_be_bytes());
        n[4..8].copy_from_slice(&to.to_be_bytes());
        Nonce::assume_unique_for_key(n)
    }

    pub fn seal(&self, from: u32, to: u32, mut plaintext: Vec<u8>) -> Vec<u8> {
        // Sealing fails only past GCM's length limit, far above a share.
        let _ = self.key.seal_in_place_append_tag(
            Self::nonce(from, to),
            Aad::from(self.aad.as_slice()),
            &mut plaintext,
        );
        plaintext
    }

    pub fn open(
        &self,
        from: u32,
        to: u32,
        mut ciphertext: Vec<u8>,
    ) -> Result<Vec<u8>, SecAggError> {
        let len = self
            .key
            .open_in_place(
                Self::nonce(from, to),
                Aad::from(self.aad.as_slice()),
                &mut ciphertext,
            )
            .map_err(|_| SecAggError::BadCiphertext { from })?
            .len();
        ciphertext.truncate(len);
        Ok(ciphertext)
    }
}

/// Signs advertisements with a member's enrolled key (ECDSA P-256, the
/// key type Covey's enrollment issues).
pub struct KeySigner {
    key: ring::signature::EcdsaKeyPair,
    rng: ring::rand::SystemRandom,
}

impl KeySigner {
    /// From the PKCS#8 PEM of an identity bundle.
    pub fn from_pem(key_pem: &str) -> Result<Self, SecAggError> {
        use rustls_pki_types::{PrivatePkcs8KeyDer, pem::PemObject};
        let der = PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| SecAggError::Identity(format!("private key: {e}")))?;
        let rng = ring::rand::SystemRandom::new();
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            der.secret_pkcs8_der(),
            &rng,
        )
        .map_err(|e| SecAggError::Identity(format!("not an ECDSA P-256 key: {e}")))?;
        Ok(Self { key, rng })
    }

    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SecAggError> {
        self.key
            .sign(&self.rng, message)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| SecAggError::Identity("signing failed".into()))
    }
}

/// Checks a signature against the public key of a certificate.
pub fn verify_signature(cert_der: &[u8], message: &[u8], signature: &[u8]) -> bool {
    let der = CertificateDer::from(cert_der);
    webpki::EndEntityCert::try_from(&der).is_ok_and(|cert| {
        cert.verify_signature(webpki::ring::ECDSA_P256_SHA256, message, signature)
            .is_ok()
    })
}

/// Checks that a peer's certificate was issued by the enrollment CA for
/// client authentication and is valid now.
pub struct PeerVerifier {
    ca_der: Vec<u8>,
}

impl PeerVerifier {
    pub fn from_ca_pem(ca_pem: &str) -> Result<Self, SecAggError> {
        use rustls_pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
            .map_err(|e| SecAggError::Identity(format!("CA certificate: {e}")))?;
        Ok(Self {
            ca_der: der.to_vec(),
        })
    }

    /// The check a member makes of each roster entry in `round`: an
    /// enrolled certificate, valid at `now`, that signed the neighbour's keys.
    pub fn roster_check(
        &self,
        round: RoundId,
        now: UnixTime,
    ) -> impl Fn(&RosterEntry, &PublicKeys) -> bool + '_ {
        move |entry, keys| {
            self.verify(
                &entry.certificate,
                &keys.signed_message(round),
                &entry.signature,
                now,
            )
        }
    }

    /// A certificate from the enrollment CA, valid at `now`, that signed
    /// `message`.
    pub fn verify(&self, cert_der: &[u8], message: &[u8], signature: &[u8], now: UnixTime) -> bool {
        let ca = CertificateDer::from(self.ca_der.as_slice());
        let Ok(anchor) = webpki::anchor_from_trusted_cert(&ca) else {
            return false;
        };
        let der = CertificateDer::from(cert_der);
        let Ok(cert) = webpki::EndEntityCert::try_from(&der) else {
            return false;
        };
        cert.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            now,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .is_ok()
            && verify_signature(cert_der, message, signature)
    }
}
