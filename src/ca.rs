//! latchkey's certificate authority, and the leaf certificates it mints for the tunnel form.
//!
//! [`Ca`] is the CA itself: made once by `latchkey ca init` or loaded from where that stored it,
//! its key only ever leaving in a [`Secret`]. [`Leaves`] terminates a tunnel's TLS: one leaf per
//! CONNECT host, minted on first use, cached with its `rustls::ServerConfig` (bounded, least
//! recently used out first) and re-minted when less than an hour of it is left.
//!
//! What zeroizing cannot reach is said plainly: the CA key's DER inside rcgen is wiped when the
//! [`Ca`] is dropped, and a leaf key's DER as soon as rustls has loaded it, but the key schedules
//! inside ring (rcgen's and rustls' signing keys) and the buffers of the PEM parser are not.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, Ia5String, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, DnsName, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime,
};
use rustls::server::ServerConfig;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::RootCertStore;
use time::{Duration, OffsetDateTime};
use zeroize::Zeroize;

use crate::secret::Secret;

/// How long a new CA is valid.
const CA_LIFETIME: Duration = Duration::days(3652);
/// How far back a new CA's validity starts: a client whose clock runs behind ours must not see a
/// CA from the future.
const CA_BACKDATE: Duration = Duration::hours(1);
/// How long a leaf is valid, counted from its backdated start.
const LEAF_LIFETIME: Duration = Duration::days(1);
/// How far back a leaf's validity starts, for clients whose clocks run a little behind.
const LEAF_BACKDATE: Duration = Duration::minutes(5);
/// A cached leaf with less than this left is minted again, so that no client is handed a
/// certificate that expires during its connection.
const RENEW_BEFORE: Duration = Duration::hours(1);
/// The longest DNS name (RFC 1035, in its dotted text form).
const MAX_HOST_LEN: usize = 253;
/// Serial numbers: 16 random bytes, top bit clear so the DER integer stays positive.
const SERIAL_LEN: usize = 16;
/// The name a loaded CA signs its self-test leaf for; `.invalid` is reserved (RFC 2606).
const SELF_TEST_HOST: &str = "self-test.latchkey.invalid";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("could not make a certificate: {0}")]
    Certificate(#[source] rcgen::Error),
    #[error("the system's random number generator failed")]
    Random,
    #[error("the CA certificate is unusable: {0}")]
    BadCert(&'static str),
    // rcgen's parse errors can quote the PEM they choked on: this one never says more.
    #[error(
        "the CA key is not a PKCS#8 PEM private key (\"BEGIN PRIVATE KEY\") of a supported type"
    )]
    BadKey,
    #[error("the CA key does not belong to the CA certificate")]
    KeyMismatch,
    #[error("the CA certificate is not a CA: {0}")]
    NotCa(&'static str),
    #[error("a leaf signed by this CA does not verify against its certificate: {0}")]
    SelfTest(#[source] rustls::Error),
    #[error("not a host name or IP address that a certificate can name")]
    BadHost,
    #[error("rustls refused a minted certificate: {0}")]
    Tls(#[source] rustls::Error),
}

/// latchkey's certificate authority: its certificate (public, for clients to trust) and its key.
pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    /// What rcgen signs leaves with: for a loaded CA, a certificate re-made from the original's
    /// subject and key identifier, so that leaves name the original as their issuer. Only those
    /// fields are used; its own DER goes nowhere.
    issuer: Certificate,
    key: KeyPair,
}

impl Ca {
    /// Makes a new CA: an ECDSA P-256 key, self-signed, `CA:true` with path length 0 (it signs
    /// leaves only), valid for ten years from an hour ago.
    pub fn generate(common_name: &str) -> Result<Ca, CaError> {
        let provider = rustls::crypto::ring::default_provider();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Certificate)?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name_dn(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = now - CA_BACKDATE;
        params.not_after = now + CA_LIFETIME;
        params.serial_number = Some(random_serial(&provider)?);
        let issuer = params.self_signed(&key).map_err(CaError::Certificate)?;
        Ok(Ca {
            cert_pem: issuer.pem(),
            cert_der: issuer.der().clone(),
            issuer,
            key,
        })
    }

    /// Loads a CA from its certificate and key as `latchkey ca init` stored them.
    ///
    /// Refuses a certificate PEM that holds anything but one certificate (a private key pasted
    /// into the same file would otherwise be served as `/ca.pem`), a certificate that is not a
    /// CA, a key that is not the certificate's, and a CA whose leaves do not verify against it.
    pub fn from_pem(cert_pem: &str, key_pem: &Secret) -> Result<Ca, CaError> {
        let cert_der = single_certificate(cert_pem)?;
        let params = CertificateParams::from_ca_cert_der(&cert_der)
            .map_err(|_| CaError::BadCert("not an X.509 certificate rcgen can read"))?;
        match params.is_ca {
            IsCa::Ca(_) => {}
            IsCa::NoCa | IsCa::ExplicitNoCa => {
                return Err(CaError::NotCa("no basicConstraints with CA:true"))
            }
        }
        // An absent key usage extension allows every use; a present one must allow signing.
        if !params.key_usages.is_empty()
            && !params.key_usages.contains(&KeyUsagePurpose::KeyCertSign)
        {
            return Err(CaError::NotCa("its key usage does not include keyCertSign"));
        }

        let key = KeyPair::from_pem(key_pem.expose()).map_err(|_| CaError::BadKey)?;
        if !spki_matches(&cert_der, &key.public_key_der())? {
            return Err(CaError::KeyMismatch);
        }

        let issuer = params.self_signed(&key).map_err(CaError::Certificate)?;
        let ca = Ca {
            cert_pem: pem_encode("CERTIFICATE", &cert_der),
            cert_der,
            issuer,
            key,
        };
        ca.self_test()?;
        Ok(ca)
    }

    /// The CA certificate in PEM, for clients to trust (`GET /ca.pem`, `latchkey ca export`).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The one certificate of a PEM text, as latchkey serves it: refused when the text holds
    /// anything else (a private key pasted beside it must never be handed out).
    pub fn certificate_pem(pem: &str) -> Result<String, CaError> {
        Ok(pem_encode("CERTIFICATE", &single_certificate(pem)?))
    }

    /// The CA certificate in DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA key in PKCS#8 PEM, for storing it.
    pub fn key_pem(&self) -> Secret {
        Secret::new(self.key.serialize_pem())
    }

    /// Mints a leaf for `host`, signed by this CA.
    fn mint(
        &self,
        host: &Host,
        now: OffsetDateTime,
        lifetime: Duration,
        provider: &CryptoProvider,
    ) -> Result<Leaf, CaError> {
        let mut key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Certificate)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name_dn(host.as_str());
        params.subject_alt_names = vec![match host {
            Host::Dns(name) => {
                SanType::DnsName(Ia5String::try_from(name.as_ref()).map_err(|_| CaError::BadHost)?)
            }
            Host::Ip(ip, _) => SanType::IpAddress(*ip),
        }];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - LEAF_BACKDATE;
        params.not_after = params.not_before + lifetime;
        params.serial_number = Some(random_serial(provider)?);
        let not_after = params.not_after;
        // Errors wait until the key's DER is wiped: a `?` here would skip that.
        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(CaError::Certificate);

        let mut key_der = key.serialize_der();
        key.zeroize();
        let signing_key = rustls::crypto::ring::sign::any_ecdsa_type(&PrivateKeyDer::Pkcs8(
            PrivatePkcs8KeyDer::from(key_der.as_slice()),
        ))
        .map_err(CaError::Tls);
        key_der.zeroize();

        Ok(Leaf {
            cert: cert?.into(),
            key: signing_key?,
            not_after,
        })
    }

    /// Signs a leaf and verifies it the way a client will, so that a CA whose subject does not
    /// survive rcgen's round trip (and so whose leaves would name another issuer) is refused at
    /// load, not at a client's first handshake.
    fn self_test(&self) -> Result<(), CaError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let host = Host::parse(SELF_TEST_HOST)?;
        let now = OffsetDateTime::now_utc();
        let leaf = self.mint(&host, now, LEAF_LIFETIME, &provider)?;
        let mut roots = RootCertStore::empty();
        roots
            .add(self.cert_der.clone())
            .map_err(|_| CaError::BadCert("webpki cannot use it as a trust anchor"))?;
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|_| CaError::BadCert("webpki cannot use it as a trust anchor"))?;
        verifier
            .verify_server_cert(&leaf.cert, &[], &host.server_name(), &[], UnixTime::now())
            .map_err(CaError::SelfTest)?;
        Ok(())
    }
}

impl Drop for Ca {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("subject", &self.issuer.params().distinguished_name)
            .field("key", &format_args!("<redacted>"))
            .finish()
    }
}

/// Whether a server config came from the cache or was minted for this call (for metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Minted {
    Hit,
    Minted,
}

impl Minted {
    /// A metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Minted::Hit => "hit",
            Minted::Minted => "minted",
        }
    }
}

/// Leaf certificates minted per CONNECT host, each with the `ServerConfig` that presents it.
///
/// Bounded to `max_entries` hosts; when full, the least recently used host goes. Concurrent
/// misses for one host may both mint; the later insert wins and both configs are valid. The lock
/// is held only for map operations, never while minting.
pub struct Leaves {
    ca: Arc<Ca>,
    provider: Arc<CryptoProvider>,
    max_entries: usize,
    lifetime: Duration,
    cache: Mutex<Lru>,
}

impl Leaves {
    /// `max_entries` below one is taken as one: a leaf is always cached for at least its host.
    pub fn new(ca: Arc<Ca>, max_entries: usize) -> Leaves {
        Leaves {
            ca,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            max_entries: max_entries.max(1),
            lifetime: LEAF_LIFETIME,
            cache: Mutex::new(Lru::default()),
        }
    }

    /// The TLS server config that presents `host`'s leaf, whatever SNI the client sends (the
    /// caller checks the SNI against the CONNECT host after the handshake and answers 421).
    ///
    /// `host` is a DNS name (any case) or an IP literal, IPv6 with or without brackets.
    pub fn server_config(&self, host: &str) -> Result<(Arc<ServerConfig>, Minted), CaError> {
        let host = Host::parse(host)?;
        let now = OffsetDateTime::now_utc();
        if let Some(config) = self.lock().hit(host.as_str(), now) {
            return Ok((config, Minted::Hit));
        }

        let leaf = self.ca.mint(&host, now, self.lifetime, &self.provider)?;
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(CaError::Tls)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(CertifiedKey::new(
                vec![leaf.cert, self.ca.cert_der.clone()],
                leaf.key,
            ))));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let config = Arc::new(config);

        let renew_at = leaf.not_after - RENEW_BEFORE;
        self.lock().insert(
            host.as_str().to_owned(),
            config.clone(),
            renew_at,
            self.max_entries,
        );
        Ok((config, Minted::Minted))
    }

    /// How many hosts are cached.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        // Nothing panics while the lock is held, and every update leaves the map whole: a
        // poisoned lock still guards a consistent cache.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for Leaves {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leaves")
            .field("ca", &self.ca)
            .field("max_entries", &self.max_entries)
            .field("cached", &self.len())
            .finish()
    }
}

/// The tunnel form's leaves once latchkey has a CA: set at most once (at start, or later when
/// Vault first answers), shared by every worker and the admin listener.
#[derive(Clone, Default)]
pub struct LeavesSlot(Arc<OnceLock<Arc<Leaves>>>);

impl LeavesSlot {
    /// A slot holding `leaves`, or an empty one.
    pub fn new(leaves: Option<Leaves>) -> LeavesSlot {
        let slot = LeavesSlot::default();
        if let Some(leaves) = leaves {
            slot.set(leaves);
        }
        slot
    }

    /// The leaves, when there is a CA.
    pub fn get(&self) -> Option<&Arc<Leaves>> {
        self.0.get()
    }

    /// Puts the leaves in; false if there were some already (those stay).
    pub fn set(&self, leaves: Leaves) -> bool {
        self.0.set(Arc::new(leaves)).is_ok()
    }

    /// The CA certificate (PEM), when there is a CA.
    pub fn cert_pem(&self) -> Option<&str> {
        self.get().map(|l| l.ca.cert_pem())
    }
}

impl fmt::Debug for LeavesSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("LeavesSlot").field(&self.get()).finish()
    }
}

/// A minted leaf: its certificate, its signing key, and when it expires.
struct Leaf {
    cert: CertificateDer<'static>,
    key: Arc<dyn rustls::sign::SigningKey>,
    not_after: OffsetDateTime,
}

/// The host cache: a map, and the same keys ordered by last use for eviction.
#[derive(Default)]
struct Lru {
    entries: HashMap<String, Entry>,
    by_use: BTreeMap<u64, String>,
    tick: u64,
}

struct Entry {
    config: Arc<ServerConfig>,
    renew_at: OffsetDateTime,
    last_used: u64,
}

impl Lru {
    /// The cached config for `host` if it has more than [`RENEW_BEFORE`] left, marked as used.
    fn hit(&mut self, host: &str, now: OffsetDateTime) -> Option<Arc<ServerConfig>> {
        let entry = self.entries.get_mut(host)?;
        if now >= entry.renew_at {
            return None;
        }
        self.tick += 1;
        // Moves the key's own String to its new place in the order: no allocation on a hit.
        let key = self
            .by_use
            .remove(&entry.last_used)
            .unwrap_or_else(|| host.to_owned());
        self.by_use.insert(self.tick, key);
        entry.last_used = self.tick;
        Some(entry.config.clone())
    }

    fn insert(
        &mut self,
        host: String,
        config: Arc<ServerConfig>,
        renew_at: OffsetDateTime,
        max_entries: usize,
    ) {
        self.tick += 1;
        self.by_use.insert(self.tick, host.clone());
        let entry = Entry {
            config,
            renew_at,
            last_used: self.tick,
        };
        if let Some(old) = self.entries.insert(host, entry) {
            self.by_use.remove(&old.last_used);
        }
        while self.entries.len() > max_entries {
            let Some((_, oldest)) = self.by_use.pop_first() else {
                break;
            };
            self.entries.remove(&oldest);
        }
    }
}

/// A CONNECT host a certificate can name, in its canonical text: DNS names lower-cased, IPv6
/// without brackets.
enum Host {
    Dns(DnsName<'static>),
    Ip(IpAddr, String),
}

impl Host {
    fn parse(host: &str) -> Result<Host, CaError> {
        if host.is_empty() || host.len() > MAX_HOST_LEN {
            return Err(CaError::BadHost);
        }
        if let Some(inner) = host.strip_prefix('[') {
            let v6 = inner.strip_suffix(']').ok_or(CaError::BadHost)?;
            let ip = IpAddr::V6(v6.parse::<Ipv6Addr>().map_err(|_| CaError::BadHost)?);
            return Ok(Host::Ip(ip, ip.to_string()));
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(Host::Ip(ip, ip.to_string()));
        }
        // A trailing dot would need the SNI check upstream to agree on its removal; a client
        // that sends one is rare enough to refuse.
        if host.ends_with('.') {
            return Err(CaError::BadHost);
        }
        // webpki's own rules for a reference name: letters, digits, `-`, `_`, labels of at most
        // 63 bytes, no wildcard, no final label that looks like a number.
        DnsName::try_from(host.to_ascii_lowercase())
            .map(Host::Dns)
            .map_err(|_| CaError::BadHost)
    }

    fn as_str(&self) -> &str {
        match self {
            Host::Dns(name) => name.as_ref(),
            Host::Ip(_, text) => text,
        }
    }

    fn server_name(&self) -> ServerName<'static> {
        match self {
            Host::Dns(name) => ServerName::DnsName(name.clone()),
            Host::Ip(ip, _) => ServerName::IpAddress((*ip).into()),
        }
    }
}

fn common_name_dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn random_serial(provider: &CryptoProvider) -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; SERIAL_LEN];
    provider
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| CaError::Random)?;
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
}

/// The one certificate of a PEM text; sections of other kinds are refused, so that the text can
/// never carry a key out to clients.
fn single_certificate(pem: &str) -> Result<CertificateDer<'static>, CaError> {
    use rustls::pki_types::pem::SectionKind;
    let mut cert = None;
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(pem.as_bytes()) {
        // The parser's error can quote a line of the text, which might be a key's: not kept.
        let (kind, der) = section.map_err(|_| CaError::BadCert("not valid PEM"))?;
        match kind {
            SectionKind::Certificate if cert.is_none() => cert = Some(CertificateDer::from(der)),
            SectionKind::Certificate => {
                return Err(CaError::BadCert("more than one certificate in the PEM"))
            }
            _ => {
                return Err(CaError::BadCert(
                    "the PEM holds something besides a certificate",
                ))
            }
        }
    }
    cert.ok_or(CaError::BadCert("no PEM certificate found"))
}

/// Whether the certificate's subject public key is the one of `key_spki` (a DER
/// SubjectPublicKeyInfo). webpki's trust anchor holds the SPKI without its outer SEQUENCE header.
fn spki_matches(cert: &CertificateDer<'_>, key_spki: &[u8]) -> Result<bool, CaError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(cert.clone())
        .map_err(|_| CaError::BadCert("webpki cannot use it as a trust anchor"))?;
    let anchor = roots
        .roots
        .first()
        .ok_or(CaError::BadCert("webpki cannot use it as a trust anchor"))?;
    Ok(der_sequence_contents(key_spki) == Some(anchor.subject_public_key_info.as_ref()))
}

/// The contents of a DER SEQUENCE (tag 0x30, definite length in short or long form).
fn der_sequence_contents(der: &[u8]) -> Option<&[u8]> {
    let (&tag, rest) = der.split_first()?;
    if tag != 0x30 {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (len_bytes, rest) = rest.split_at_checked(n)?;
        let len = len_bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, rest)
    };
    (rest.len() == len).then_some(rest)
}

/// PEM text for public DER (the CA certificate): base64 in lines of 64, as RFC 7468 asks.
fn pem_encode(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize]);
            } else {
                b64.push(b'=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.chunks(64) {
        out.extend(line.iter().map(|&c| char::from(c)));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified};
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;

    fn install_provider() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }

    fn test_ca() -> Ca {
        Ca::generate("latchkey test CA").unwrap()
    }

    fn verifier(ca: &Ca) -> Arc<WebPkiServerVerifier> {
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        WebPkiServerVerifier::builder(Arc::new(roots))
            .build()
            .unwrap()
    }

    fn verify(ca: &Ca, chain: &[CertificateDer<'static>], name: &str) -> Result<(), rustls::Error> {
        let (end_entity, intermediates) = chain.split_first().unwrap();
        verifier(ca)
            .verify_server_cert(
                end_entity,
                intermediates,
                &ServerName::try_from(name.to_owned()).unwrap(),
                &[],
                UnixTime::now(),
            )
            .map(|_| ())
    }

    /// A client verifier that accepts any chain and keeps it, so a test can look at what the
    /// server presented whatever SNI the client sent.
    #[derive(Debug)]
    struct Recording {
        inner: Arc<WebPkiServerVerifier>,
        seen: Mutex<Vec<CertificateDer<'static>>>,
    }

    impl ServerCertVerifier for Recording {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            let mut seen = self.seen.lock().unwrap();
            seen.push(end_entity.clone().into_owned());
            seen.extend(intermediates.iter().map(|c| c.clone().into_owned()));
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    }

    /// The chain a server config presents to a client that sends `sni`.
    async fn presented_chain(
        ca: &Ca,
        server: Arc<ServerConfig>,
        sni: &str,
    ) -> Vec<CertificateDer<'static>> {
        let recording = Arc::new(Recording {
            inner: verifier(ca),
            seen: Mutex::new(Vec::new()),
        });
        let client = ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(recording.clone())
            .with_no_client_auth();
        handshake(server, Arc::new(client), sni).await.unwrap();
        let seen = recording.seen.lock().unwrap().clone();
        seen
    }

    /// A TLS handshake over an in-memory pipe, then one byte each way; the client's view of it.
    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        sni: &str,
    ) -> std::io::Result<(Option<Vec<u8>>, Vec<CertificateDer<'static>>)> {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let name = ServerName::try_from(sni.to_owned()).unwrap();
        let serve = async move {
            let mut tls = TlsAcceptor::from(server).accept(server_io).await?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await?;
            tls.write_all(&byte).await?;
            tls.shutdown().await
        };
        let connect = async move {
            let mut tls = TlsConnector::from(client).connect(name, client_io).await?;
            tls.write_all(b"x").await?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await?;
            let (_, conn) = tls.get_ref();
            let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
            let chain = conn
                .peer_certificates()
                .unwrap_or_default()
                .iter()
                .map(|c| c.clone().into_owned())
                .collect();
            Ok::<_, std::io::Error>((alpn, chain))
        };
        let (served, connected) = tokio::join!(serve, connect);
        let seen = connected?;
        served?;
        Ok(seen)
    }

    fn trusting_client(ca: &Ca, alpn: &[&[u8]]) -> ClientConfig {
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let mut client = ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        client
    }

    #[test]
    fn generate_round_trips_through_pem() {
        let ca = test_ca();
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(ca.key_pem().expose().contains("BEGIN PRIVATE KEY"));
        let loaded = Ca::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        assert_eq!(loaded.cert_der(), ca.cert_der());
        assert_eq!(loaded.key_pem(), ca.key_pem());
    }

    #[test]
    fn generated_ca_is_a_constrained_signing_ca() {
        let ca = test_ca();
        let params = CertificateParams::from_ca_cert_der(ca.cert_der()).unwrap();
        assert_eq!(params.is_ca, IsCa::Ca(BasicConstraints::Constrained(0)));
        assert_eq!(
            params.key_usages,
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign]
        );
        let now = OffsetDateTime::now_utc();
        assert!(params.not_before < now && params.not_before > now - Duration::days(1));
        assert!(params.not_after > now + Duration::days(3650));
        let other = test_ca();
        let other_params = CertificateParams::from_ca_cert_der(other.cert_der()).unwrap();
        assert_ne!(params.serial_number, other_params.serial_number);
    }

    #[test]
    fn from_pem_refuses_the_key_of_another_ca() {
        let ca = test_ca();
        let other = test_ca();
        let err = Ca::from_pem(ca.cert_pem(), &other.key_pem()).unwrap_err();
        assert!(matches!(err, CaError::KeyMismatch), "{err}");
    }

    #[test]
    fn from_pem_refuses_a_certificate_that_is_not_a_ca() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = CertificateParams::new(vec!["not-a-ca.example".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let err = Ca::from_pem(&cert.pem(), &Secret::new(key.serialize_pem())).unwrap_err();
        assert!(matches!(err, CaError::NotCa(_)), "{err}");
    }

    #[test]
    fn from_pem_refuses_a_key_next_to_the_certificate() {
        let ca = test_ca();
        let combined = format!("{}{}", ca.cert_pem(), ca.key_pem().expose());
        let err = Ca::from_pem(&combined, &ca.key_pem()).unwrap_err();
        assert!(matches!(err, CaError::BadCert(_)), "{err}");
        assert!(!err.to_string().contains("PRIVATE"));
    }

    #[test]
    fn a_bad_key_is_refused_without_quoting_it() {
        let ca = test_ca();
        let key = ca.key_pem();
        let body: Vec<&str> = key
            .expose()
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        // A key with one character spoiled: its text must not come back in the error.
        let spoiled = key.expose().replacen(body[1], &format!("!{}", body[1]), 1);
        let err = Ca::from_pem(ca.cert_pem(), &Secret::new(spoiled)).unwrap_err();
        assert!(matches!(err, CaError::BadKey), "{err}");
        let shown = format!("{err} {err:?}");
        for line in body {
            assert!(!shown.contains(line));
        }
    }

    #[test]
    fn debug_never_prints_the_key() {
        let ca = test_ca();
        let key = ca.key_pem();
        let shown = format!("{ca:?}");
        assert!(shown.contains("<redacted>"), "{shown}");
        for line in key.expose().lines().filter(|l| !l.starts_with("-----")) {
            assert!(!shown.contains(line), "{shown}");
        }
        let leaves = Leaves::new(Arc::new(ca), 4);
        let shown = format!("{leaves:?}");
        assert!(shown.contains("<redacted>"), "{shown}");
        assert!(!shown.contains("PRIVATE"));
    }

    #[tokio::test]
    async fn a_leaf_verifies_for_its_host_and_no_other() {
        install_provider();
        let ca = Arc::new(test_ca());
        let leaves = Leaves::new(ca.clone(), 16);
        let (config, minted) = leaves.server_config("API.Example.com").unwrap();
        assert_eq!(minted, Minted::Minted);
        let chain = presented_chain(&ca, config, "api.example.com").await;
        assert_eq!(chain.len(), 2);
        assert_eq!(&chain[1], ca.cert_der());
        verify(&ca, &chain, "api.example.com").unwrap();
        verify(&ca, &chain, "other.example.com").unwrap_err();
        verify(&ca, &chain, "example.com").unwrap_err();

        let leaf = CertificateParams::from_ca_cert_der(&chain[0]).unwrap();
        assert_eq!(
            leaf.extended_key_usages,
            vec![ExtendedKeyUsagePurpose::ServerAuth]
        );
        let lifetime = leaf.not_after - leaf.not_before;
        assert_eq!(lifetime, LEAF_LIFETIME);
        let now = OffsetDateTime::now_utc();
        assert!(leaf.not_before <= now - LEAF_BACKDATE + Duration::seconds(5));
    }

    #[tokio::test]
    async fn the_host_certificate_whatever_the_sni() {
        install_provider();
        let ca = Arc::new(test_ca());
        let leaves = Leaves::new(ca.clone(), 16);
        let (config, _) = leaves.server_config("api.example.com").unwrap();
        let chain = presented_chain(&ca, config, "evil.example.net").await;
        verify(&ca, &chain, "api.example.com").unwrap();
        verify(&ca, &chain, "evil.example.net").unwrap_err();
    }

    #[tokio::test]
    async fn an_ip_host_gets_an_ip_san() {
        install_provider();
        let ca = Arc::new(test_ca());
        let leaves = Leaves::new(ca.clone(), 16);
        for (host, name) in [
            ("127.0.0.1", "127.0.0.1"),
            ("[::1]", "::1"),
            ("::1", "::1"),
            ("[2001:DB8::1]", "2001:db8::1"),
        ] {
            let (config, _) = leaves.server_config(host).unwrap();
            let chain = presented_chain(&ca, config, "localhost").await;
            verify(&ca, &chain, name).unwrap();
            verify(&ca, &chain, "localhost").unwrap_err();
        }
        // `::1` with and without brackets is one host.
        assert_eq!(leaves.len(), 3);
    }

    #[tokio::test]
    async fn a_real_handshake_negotiates_h2_and_shows_the_chain() {
        install_provider();
        let ca = Arc::new(test_ca());
        let leaves = Leaves::new(ca.clone(), 16);
        let (config, _) = leaves.server_config("api.example.com").unwrap();

        let client = trusting_client(&ca, &[b"h2", b"http/1.1"]);
        let (alpn, chain) = handshake(config.clone(), Arc::new(client), "api.example.com")
            .await
            .unwrap();
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
        assert_eq!(chain.len(), 2);
        assert_eq!(&chain[1], ca.cert_der());

        let client = trusting_client(&ca, &[b"http/1.1"]);
        let (alpn, _) = handshake(config.clone(), Arc::new(client), "api.example.com")
            .await
            .unwrap();
        assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));

        // TLS 1.2 is offered too.
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let tls12 = ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
            .with_root_certificates(roots)
            .with_no_client_auth();
        handshake(config.clone(), Arc::new(tls12), "api.example.com")
            .await
            .unwrap();

        // A client that does not trust latchkey's CA refuses the leaf.
        let other = test_ca();
        let client = trusting_client(&other, &[b"h2"]);
        handshake(config, Arc::new(client), "api.example.com")
            .await
            .unwrap_err();
    }

    #[test]
    fn the_cache_hits_the_second_time() {
        install_provider();
        let leaves = Leaves::new(Arc::new(test_ca()), 16);
        let (first, minted) = leaves.server_config("api.example.com").unwrap();
        assert_eq!(minted, Minted::Minted);
        let (second, hit) = leaves.server_config("API.EXAMPLE.COM").unwrap();
        assert_eq!(hit, Minted::Hit);
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(leaves.len(), 1);
        assert_eq!(Minted::Hit.as_str(), "hit");
    }

    #[test]
    fn eviction_keeps_at_most_max_entries_least_recently_used_first() {
        install_provider();
        let leaves = Leaves::new(Arc::new(test_ca()), 2);
        leaves.server_config("a.example").unwrap();
        leaves.server_config("b.example").unwrap();
        // `a` used again, so `b` is the least recently used when `c` comes.
        assert_eq!(leaves.server_config("a.example").unwrap().1, Minted::Hit);
        leaves.server_config("c.example").unwrap();
        assert_eq!(leaves.len(), 2);
        assert_eq!(leaves.server_config("a.example").unwrap().1, Minted::Hit);
        assert_eq!(leaves.server_config("c.example").unwrap().1, Minted::Hit);
        assert_eq!(leaves.server_config("b.example").unwrap().1, Minted::Minted);
        assert_eq!(leaves.len(), 2);
        for i in 0..20 {
            leaves.server_config(&format!("h{i}.example")).unwrap();
            assert!(leaves.len() <= 2);
        }
        let lru = leaves.lock();
        assert_eq!(lru.by_use.len(), lru.entries.len());
    }

    #[test]
    fn a_leaf_close_to_expiry_is_minted_again() {
        install_provider();
        let mut leaves = Leaves::new(Arc::new(test_ca()), 4);
        // Less than RENEW_BEFORE from the start: never good enough to hand out twice.
        leaves.lifetime = Duration::minutes(30);
        let (first, _) = leaves.server_config("api.example.com").unwrap();
        let (second, minted) = leaves.server_config("api.example.com").unwrap();
        assert_eq!(minted, Minted::Minted);
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(leaves.len(), 1);
        let lru = leaves.lock();
        assert_eq!(lru.by_use.len(), 1);
    }

    #[test]
    fn concurrent_callers_keep_the_cache_consistent() {
        install_provider();
        let leaves = Arc::new(Leaves::new(Arc::new(test_ca()), 3));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let leaves = leaves.clone();
                std::thread::spawn(move || {
                    for i in 0..30 {
                        let host = format!("h{}.example", (i + t) % 5);
                        leaves.server_config(&host).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let lru = leaves.lock();
        assert!(lru.entries.len() <= 3);
        assert_eq!(lru.by_use.len(), lru.entries.len());
        for (tick, host) in &lru.by_use {
            assert_eq!(lru.entries[host].last_used, *tick);
        }
    }

    #[test]
    fn bad_hosts_are_refused() {
        let long = format!("{}.example", "a.".repeat(125));
        assert!(long.len() > MAX_HOST_LEN);
        for host in [
            "",
            long.as_str(),
            "*.example.com",
            "exa mple.com",
            "example.com.",
            "a..example",
            "-a.example",
            "[::1",
            "[127.0.0.1]",
            "fe80::1%eth0",
            "1.2.3",
            "example.com:443",
            "ex\u{e4}mple.com",
        ] {
            assert!(
                matches!(Host::parse(host), Err(CaError::BadHost)),
                "{host:?} was accepted"
            );
        }
        assert_eq!(
            Host::parse("API.Example.COM").unwrap().as_str(),
            "api.example.com"
        );
        assert_eq!(Host::parse("localhost").unwrap().as_str(), "localhost");
        assert_eq!(
            Host::parse("[::FFFF:1.2.3.4]").unwrap().as_str(),
            "::ffff:1.2.3.4"
        );
    }

    #[test]
    fn pem_encoding_matches_rcgen() {
        let ca = test_ca();
        let loaded = Ca::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        // rcgen's PEM (the generated CA) and ours (the loaded one) agree byte for byte, modulo
        // line endings.
        assert_eq!(loaded.cert_pem(), ca.cert_pem().replace("\r\n", "\n"));
        for len in 1..70 {
            let der: Vec<u8> = (0..len).map(|i| (i * 37 + 250) as u8).collect();
            let pem = pem_encode("CERTIFICATE", &der);
            assert_eq!(single_certificate(&pem).unwrap().as_ref(), der.as_slice());
        }
    }
}
