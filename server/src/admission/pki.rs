//! The enrollment CA and the TLS configuration it implies: mutual TLS is
//! the only way in, and only certificates still in the registry pass.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use covey_privacy::{Pseudonym, PseudonymKey};
use covey_protocol::{ADMIN_ALPN, ALPN, SERVER_NAME, admin::Role};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::{
    DistinguishedName as TlsName, RootCertStore, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{what} is not valid PEM: {detail}")]
    Pem { what: &'static str, detail: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The server's certificate and key, as PEM.
pub struct ServerIdentity {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A freshly issued certificate: PEM, its key, DER (for pseudonyms) and expiry.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: Vec<u8>,
    pub not_after_unix: i64,
}

/// The CA's distinguished name and usages; rebuilt identically to sign.
fn ca_params() -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Covey enrollment CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::seconds(lifetime.as_secs() as i64);
}

/// A new CA, valid for ten years.
pub fn create_ca() -> Result<Issued, PkiError> {
    let key = KeyPair::generate()?;
    let mut params = ca_params()?;
    validity(&mut params, Duration::from_secs(10 * 365 * 86_400));
    params.serial_number = Some(random_serial());
    let not_after_unix = params.not_after.unix_timestamp();
    let cert = params.self_signed(&key)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert_der: cert.der().to_vec(),
        not_after_unix,
    })
}

fn issue(
    ca_key_pem: &str,
    common_name: &str,
    san: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
    lifetime: Duration,
) -> Result<Issued, PkiError> {
    let key = KeyPair::generate()?;
    let (cert_pem, cert_der, not_after_unix) =
        sign(ca_key_pem, common_name, san, usage, lifetime, &key)?;
    Ok(Issued {
        cert_pem,
        key_pem: key.serialize_pem(),
        cert_der,
        not_after_unix,
    })
}

/// A P-256 public key received as its uncompressed SEC1 point.
struct P256PublicKey<'a>(&'a [u8]);

impl rcgen::PublicKeyData for P256PublicKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// A device certificate for `name` on a key the device generated and
/// holds (renewal); returns PEM, DER and expiry.
pub fn issue_client_cert_for(
    ca_key_pem: &str,
    name: &str,
    p256_public_key: &[u8],
    lifetime: Duration,
) -> Result<(String, Vec<u8>, i64), PkiError> {
    sign(
        ca_key_pem,
        name,
        Vec::new(),
        ExtendedKeyUsagePurpose::ClientAuth,
        lifetime,
        &P256PublicKey(p256_public_key),
    )
}

fn sign(
    ca_key_pem: &str,
    common_name: &str,
    san: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
    lifetime: Duration,
    key: &impl rcgen::PublicKeyData,
) -> Result<(String, Vec<u8>, i64), PkiError> {
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(|e| PkiError::Pem {
        what: "CA key",
        detail: e.to_string(),
    })?;
    let issuer = Issuer::new(ca_params()?, ca_key);
    let mut params = CertificateParams::new(san)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, lifetime);
    let not_after_unix = params.not_after.unix_timestamp();
    let cert = params.signed_by(key, &issuer)?;
    Ok((cert.pem(), cert.der().to_vec(), not_after_unix))
}

/// The server's certificate, named [`SERVER_NAME`] rather than an address.
pub fn issue_server_cert(ca_key_pem: &str) -> Result<Issued, PkiError> {
    issue(
        ca_key_pem,
        SERVER_NAME,
        vec![SERVER_NAME.to_owned()],
        ExtendedKeyUsagePurpose::ServerAuth,
        Duration::from_secs(5 * 365 * 86_400),
    )
}

/// A device certificate for `name`.
pub fn issue_client_cert(
    ca_key_pem: &str,
    name: &str,
    lifetime: Duration,
) -> Result<Issued, PkiError> {
    issue(
        ca_key_pem,
        name,
        Vec::new(),
        ExtendedKeyUsagePurpose::ClientAuth,
        lifetime,
    )
}

pub fn parse_cert(pem: &str, what: &'static str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::Pem {
        what,
        detail: e.to_string(),
    })
}

pub fn parse_key(pem: &str, what: &'static str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::Pem {
        what,
        detail: e.to_string(),
    })
}

/// Pseudonyms of the certificates allowed in, with their roles. Shared
/// with the verifier, so the running server can revoke without a restart.
#[derive(Debug, Default)]
pub struct Admitted(RwLock<HashMap<Pseudonym, Role>>);

impl Admitted {
    pub fn new(entries: impl IntoIterator<Item = (Pseudonym, Role)>) -> Self {
        Self(RwLock::new(entries.into_iter().collect()))
    }

    pub fn contains(&self, p: &Pseudonym) -> bool {
        self.role(p).is_some()
    }

    pub fn role(&self, p: &Pseudonym) -> Option<Role> {
        self.0.read().ok().and_then(|s| s.get(p).copied())
    }

    pub fn insert(&self, p: Pseudonym, role: Role) {
        if let Ok(mut s) = self.0.write() {
            s.insert(p, role);
        }
    }

    pub fn remove(&self, p: &Pseudonym) {
        if let Ok(mut s) = self.0.write() {
            s.remove(p);
        }
    }
}

/// The CA's checks (chain, expiry, client-auth usage), then the registry's:
/// a certificate that was revoked or never enrolled is refused in the
/// handshake, before any application byte.
#[derive(Debug)]
struct EnrolledClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    admitted: Arc<Admitted>,
    key: Arc<PseudonymKey>,
}

impl ClientCertVerifier for EnrolledClientVerifier {
    fn root_hint_subjects(&self) -> &[TlsName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let pseudonym = self.key.pseudonym_of(end_entity);
        if self.admitted.contains(&pseudonym) {
            Ok(ClientCertVerified::assertion())
        } else {
            tracing::warn!(client = %pseudonym, "refused a certificate that is revoked or not enrolled");
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// TLS 1.3 with client certificates required, ALPN `covey/1` (training) or
/// `covey-admin/1` (the operator API), ring provider.
pub fn server_tls_config(
    ca_cert_pem: &str,
    server: &ServerIdentity,
    admitted: Arc<Admitted>,
    key: Arc<PseudonymKey>,
) -> Result<rustls::ServerConfig, PkiError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(parse_cert(ca_cert_pem, "CA certificate")?)?;
    let inner =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let verifier = Arc::new(EnrolledClientVerifier {
        inner,
        admitted,
        key,
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![parse_cert(&server.cert_pem, "server certificate")?],
            parse_key(&server.key_pem, "server key")?,
        )?;
    config.alpn_protocols = vec![ALPN.to_vec(), ADMIN_ALPN.to_vec()];
    Ok(config)
}

/// HTTPS for the dashboard off loopback: the server's certificate, no
/// client certificates (browsers sign in with a login instead).
pub fn https_config(server: &ServerIdentity) -> Result<rustls::ServerConfig, PkiError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(
            // The whole chain, for an operator's own certificate.
            CertificateDer::pem_slice_iter(server.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| PkiError::Pem {
                    what: "dashboard certificate",
                    detail: e.to_string(),
                })?,
            parse_key(&server.key_pem, "dashboard key")?,
        )?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_chain_to_the_ca() {
        let ca = create_ca().unwrap();
        let client = issue_client_cert(&ca.key_pem, "device-1", Duration::from_secs(3600)).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(parse_cert(&ca.cert_pem, "ca").unwrap()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
        let der = CertificateDer::from(client.cert_der.clone());
        verifier
            .verify_client_cert(&der, &[], UnixTime::now())
            .unwrap();

        let other = create_ca().unwrap();
        let stranger = issue_client_cert(&other.key_pem, "x", Duration::from_secs(3600)).unwrap();
        let der = CertificateDer::from(stranger.cert_der);
        assert!(
            verifier
                .verify_client_cert(&der, &[], UnixTime::now())
                .is_err()
        );
    }

    #[test]
    fn a_bad_ca_key_is_named() {
        let err = issue_client_cert("not a key", "d", Duration::from_secs(60))
            .err()
            .unwrap();
        assert!(err.to_string().starts_with("CA key is not valid PEM"));
    }
}
