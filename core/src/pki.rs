//! The certificate logic of weft's identity model: a mesh's root CA, zone intermediates issued
//! from CSRs, short-lived SPIFFE workload certificates, and checking a workload's chain.
//!
//! The chain is root → intermediate → workload:
//! - [`RootCa`]: one per mesh, made on global (ECDSA P-256, CA with path length 1, URI SAN
//!   `spiffe://<mesh>`). **Its private key never leaves global**: it only signs CSRs.
//! - [`IntermediateCa`]: one per mesh and zone. The zone makes its own key ([`new_key`]) and a
//!   CSR ([`intermediate_csr`]); global answers with [`RootCa::sign_intermediate`] (CA with path
//!   length 0, so whatever it signs cannot sign further).
//! - [`WorkloadCert`]: one per proxy, short-lived (default [`DEFAULT_WORKLOAD_VALIDITY`]). The
//!   proxy makes its own key and a CSR ([`workload_csr`]); the zone answers with
//!   [`IntermediateCa::issue_workload`], which decides the SPIFFE ID itself from (mesh, service)
//!   and never copies names from the CSR: a proxy cannot ask for another identity.
//!
//! [`verify_workload`] checks a presented chain against a mesh's root (signatures, validity,
//! CA flags, path length, EKUs via webpki) and returns the [`SpiffeId`]; the data plane's
//! rustls verifier wraps it, since rustls's own name check needs a DNS or IP SAN.
//!
//! Pure: no files, no network. Keys and serial numbers come from the OS random source.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData as _,
    SanType, SerialNumber,
};
use ring::rand::SecureRandom as _;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer as _;

/// How long a workload certificate lives unless the caller says otherwise.
pub const DEFAULT_WORKLOAD_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// Certificates start this long before they are issued, for clocks that lag.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// A certificate is renewed once this share (in percent) of its lifetime has passed.
pub const RENEW_PERCENT: u32 = 70;

/// What went wrong; every message names the certificate, CSR or identity concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A mesh, zone or service name, or a SPIFFE ID, that weft cannot use.
    #[error("{what} {value:?}: {reason}")]
    InvalidName {
        what: &'static str,
        value: String,
        reason: String,
    },
    /// PEM or DER input that does not hold what it should (a key, a certificate, a CSR).
    #[error("{what}: {reason}")]
    Malformed { what: String, reason: String },
    /// A CSR that is well formed but refused: wrong key type, or it asks for something else.
    #[error("{what}: refused: {reason}")]
    Refused { what: String, reason: String },
    /// A certificate chain that does not verify.
    #[error("{what}: not trusted: {reason}")]
    Untrusted { what: String, reason: String },
    /// Making or signing a certificate failed inside rcgen.
    #[error("{what}: {source}")]
    Sign {
        what: String,
        #[source]
        source: rcgen::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn malformed(what: impl Into<String>, reason: impl fmt::Display) -> Error {
    Error::Malformed {
        what: what.into(),
        reason: reason.to_string(),
    }
}

fn refused(what: impl Into<String>, reason: impl fmt::Display) -> Error {
    Error::Refused {
        what: what.into(),
        reason: reason.to_string(),
    }
}

fn untrusted(what: impl Into<String>, reason: impl fmt::Display) -> Error {
    Error::Untrusted {
        what: what.into(),
        reason: reason.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// SPIFFE IDs

/// A workload identity: `spiffe://<mesh>/<service>`. The mesh is the SPIFFE trust domain.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub mesh: String,
    pub service: String,
}

impl SpiffeId {
    /// Check both parts: the mesh is a trust domain (`[a-z0-9._-]`), the service one path
    /// segment (`[A-Za-z0-9._-]`, not `.` or `..`).
    pub fn new(mesh: &str, service: &str) -> Result<Self> {
        check_mesh(mesh)?;
        check_service(service)?;
        Ok(SpiffeId {
            mesh: mesh.to_string(),
            service: service.to_string(),
        })
    }

    /// Parse `spiffe://<mesh>/<service>`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |reason: &str| Error::InvalidName {
            what: "SPIFFE ID",
            value: s.to_string(),
            reason: format!("{reason} (expected e.g. spiffe://default/backend)"),
        };
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("does not start with spiffe://"))?;
        let (mesh, service) = rest
            .split_once('/')
            .ok_or_else(|| bad("has no service path"))?;
        if service.contains('/') {
            return Err(bad("has more than one path segment"));
        }
        SpiffeId::new(mesh, service).map_err(|e| match e {
            Error::InvalidName { what, reason, .. } => bad(&format!("{what}: {reason}")),
            other => other,
        })
    }

    /// The trust domain's own ID, `spiffe://<mesh>`, carried by the mesh's CA certificates.
    pub fn trust_domain_uri(mesh: &str) -> String {
        format!("spiffe://{mesh}")
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/{}", self.mesh, self.service)
    }
}

impl FromStr for SpiffeId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        SpiffeId::parse(s)
    }
}

fn check_mesh(mesh: &str) -> Result<()> {
    let reason = if mesh.is_empty() {
        Some("is empty")
    } else if mesh.len() > 63 {
        Some("is longer than 63 characters")
    } else if !mesh
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    {
        Some("may hold only lowercase letters, digits, '.', '_' and '-'")
    } else {
        None
    };
    match reason {
        Some(r) => Err(Error::InvalidName {
            what: "mesh",
            value: mesh.to_string(),
            reason: r.to_string(),
        }),
        None => Ok(()),
    }
}

fn check_service(service: &str) -> Result<()> {
    let reason = if service.is_empty() {
        Some("is empty")
    } else if service.len() > 253 {
        Some("is longer than 253 characters")
    } else if service == "." || service == ".." {
        Some("may not be '.' or '..'")
    } else if !service
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        Some("may hold only letters, digits, '.', '_' and '-'")
    } else {
        None
    };
    match reason {
        Some(r) => Err(Error::InvalidName {
            what: "service",
            value: service.to_string(),
            reason: r.to_string(),
        }),
        None => Ok(()),
    }
}

fn check_zone(zone: &str) -> Result<()> {
    let ok = !zone.is_empty()
        && zone.len() <= 63
        && zone
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !zone.starts_with('-')
        && !zone.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName {
            what: "zone",
            value: zone.to_string(),
            reason: "is not a DNS label (lowercase letters, digits and '-', at most 63)".into(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Keys and CSRs

/// A fresh ECDSA P-256 private key, PKCS#8 PEM. Every party makes its own and keeps it.
pub fn new_key() -> Result<String> {
    Ok(generate_key()?.serialize_pem())
}

fn generate_key() -> Result<KeyPair> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| Error::Sign {
        what: "generating a P-256 key".into(),
        source,
    })
}

fn load_key(what: &str, key_pem: &str) -> Result<KeyPair> {
    let key = KeyPair::from_pem(key_pem)
        .map_err(|e| malformed(what, format!("no usable PEM private key ({e})")))?;
    if key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
        return Err(refused(
            what,
            "the key is not ECDSA P-256 (make one with pki::new_key)",
        ));
    }
    Ok(key)
}

/// The CSR a zone sends global for its intermediate CA of `mesh`, signed with `key_pem`.
pub fn intermediate_csr(mesh: &str, zone: &str, key_pem: &str) -> Result<String> {
    check_mesh(mesh)?;
    check_zone(zone)?;
    let what = format!("intermediate CSR for zone {zone} of mesh {mesh}");
    let key = load_key(&what, key_pem)?;
    let mut p = CertificateParams::default();
    p.distinguished_name = intermediate_dn(mesh, zone);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.subject_alt_names = vec![uri_san(&SpiffeId::trust_domain_uri(mesh))?];
    csr_pem(&what, &p, &key)
}

/// The CSR a proxy sends its zone for a workload certificate, signed with `key_pem`. It names
/// `spiffe://<mesh>/<service>`, but the zone decides the identity itself.
pub fn workload_csr(mesh: &str, service: &str, key_pem: &str) -> Result<String> {
    let id = SpiffeId::new(mesh, service)?;
    let what = format!("workload CSR for {id}");
    let key = load_key(&what, key_pem)?;
    let mut p = CertificateParams::default();
    p.distinguished_name = workload_dn(&id);
    p.subject_alt_names = vec![uri_san(&id.to_string())?];
    csr_pem(&what, &p, &key)
}

fn csr_pem(what: &str, p: &CertificateParams, key: &KeyPair) -> Result<String> {
    let sign_err = |source| Error::Sign {
        what: what.to_string(),
        source,
    };
    p.serialize_request(key)
        .map_err(sign_err)?
        .pem()
        .map_err(sign_err)
}

/// A CSR whose signature checked out and whose key is ECDSA P-256.
struct Csr {
    params: CertificateSigningRequestParams,
    common_name: Option<String>,
    uris: Vec<String>,
}

/// Parse a CSR, check its self-signature and that its key is one weft issues for (P-256).
fn parse_csr(what: &str, csr_pem: &str) -> Result<Csr> {
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| malformed(what, format!("no PEM certificate request found ({e})")))?;
    let (_, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| malformed(what, format!("not a certificate request ({e})")))?;
    let spki = &csr.certification_request_info.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        || curve != Some(x509_parser::oid_registry::OID_EC_P256)
    {
        return Err(refused(
            what,
            "the key is not ECDSA P-256 (make one with pki::new_key)",
        ));
    }
    let common_name = csr
        .certification_request_info
        .subject
        .iter_common_name()
        .next()
        .map(|cn| cn.as_str().map(str::to_string))
        .transpose()
        .map_err(|e| malformed(what, format!("unreadable common name ({e})")))?;
    let mut uris = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            for name in &san.general_names {
                match name {
                    GeneralName::URI(u) => uris.push(u.to_string()),
                    other => uris.push(format!("{other}")),
                }
            }
        }
    }
    // rcgen checks the signature (so the requester holds the key) and reads the public key.
    let params = CertificateSigningRequestParams::from_der(&der).map_err(|e| match e {
        rcgen::Error::InvalidCertificationRequestSignature => {
            refused(what, "its signature does not match its key")
        }
        other => refused(what, format!("unsupported request ({other})")),
    })?;
    if params.public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
        return Err(refused(
            what,
            "the key is not ECDSA P-256 (make one with pki::new_key)",
        ));
    }
    Ok(Csr {
        params,
        common_name,
        uris,
    })
}

// ---------------------------------------------------------------------------------------------
// Certificate contents

fn root_cn(mesh: &str) -> String {
    format!("weft {mesh} root CA")
}

fn intermediate_cn(mesh: &str, zone: &str) -> String {
    format!("weft {mesh} zone {zone} CA")
}

fn intermediate_dn(mesh: &str, zone: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "weft");
    dn.push(DnType::OrganizationalUnitName, format!("mesh {mesh}"));
    dn.push(DnType::CommonName, intermediate_cn(mesh, zone));
    dn
}

fn workload_dn(id: &SpiffeId) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "weft");
    dn.push(DnType::OrganizationalUnitName, format!("mesh {}", id.mesh));
    // A common name is at most 64 characters; the URI SAN is the identity anyway.
    if id.service.len() <= 64 {
        dn.push(DnType::CommonName, id.service.clone());
    }
    dn
}

fn uri_san(uri: &str) -> Result<SanType> {
    Ok(SanType::URI(
        uri.to_string()
            .try_into()
            .map_err(|e| malformed(format!("URI {uri:?}"), e))?,
    ))
}

/// A positive 127-bit random serial number.
fn serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| malformed("serial number", "the OS random source failed"))?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01 << 6; // never a leading zero byte
    Ok(SerialNumber::from_slice(&bytes))
}

fn to_offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

/// Set the validity window: from `now - CLOCK_SKEW` to `now + valid_for`, no later than `cap`.
/// Returns (not_before, not_after) at second precision, as written in the certificate.
fn set_validity(
    p: &mut CertificateParams,
    now: SystemTime,
    valid_for: Duration,
    cap: Option<SystemTime>,
) -> (SystemTime, SystemTime) {
    let secs = |t: SystemTime| {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        UNIX_EPOCH + Duration::from_secs(d.as_secs())
    };
    let not_before = secs(now.checked_sub(CLOCK_SKEW).unwrap_or(UNIX_EPOCH));
    let mut not_after = secs(now + valid_for);
    if let Some(cap) = cap {
        not_after = not_after.min(cap);
    }
    p.not_before = to_offset(not_before);
    p.not_after = to_offset(not_after);
    (not_before, not_after)
}

fn parse_cert<'a>(what: &str, der: &'a [u8]) -> Result<X509Certificate<'a>> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c)
        .map_err(|e| malformed(what, format!("not an X.509 certificate ({e})")))
}

fn cert_uris(what: &str, cert: &X509Certificate<'_>) -> Result<Vec<String>> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| malformed(what, format!("unreadable subjectAltName ({e})")))?;
    Ok(san
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The mesh of a CA certificate: its one URI SAN `spiffe://<mesh>`.
fn ca_mesh(what: &str, cert: &X509Certificate<'_>) -> Result<String> {
    let uris = cert_uris(what, cert)?;
    match uris.as_slice() {
        [uri] => match uri.strip_prefix("spiffe://") {
            Some(mesh) if check_mesh(mesh).is_ok() => Ok(mesh.to_string()),
            _ => Err(malformed(
                what,
                format!("URI SAN {uri:?} is not a trust domain spiffe://<mesh>"),
            )),
        },
        _ => Err(malformed(
            what,
            "a weft CA carries exactly one URI SAN, spiffe://<mesh>",
        )),
    }
}

fn check_ca(what: &str, cert: &X509Certificate<'_>, max_path_len: u32) -> Result<()> {
    let bc = cert
        .basic_constraints()
        .map_err(|e| malformed(what, format!("unreadable basicConstraints ({e})")))?
        .ok_or_else(|| malformed(what, "not a CA certificate (no basicConstraints)"))?;
    if !bc.value.ca {
        return Err(malformed(what, "not a CA certificate (CA:false)"));
    }
    match bc.value.path_len_constraint {
        Some(n) if n <= max_path_len => Ok(()),
        _ => Err(malformed(
            what,
            format!("a weft CA at this level has path length at most {max_path_len}"),
        )),
    }
}

fn check_key_matches(what: &str, cert: &X509Certificate<'_>, key: &KeyPair) -> Result<()> {
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(malformed(
            what,
            "the private key does not belong to the certificate",
        ));
    }
    Ok(())
}

fn not_after_of(cert: &X509Certificate<'_>) -> SystemTime {
    time_of(cert.validity().not_after.timestamp())
}

fn time_of(unix: i64) -> SystemTime {
    if unix >= 0 {
        UNIX_EPOCH + Duration::from_secs(unix as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(unix.unsigned_abs())
    }
}

fn first_cert(what: &str, pem: &str) -> Result<CertificateDer<'static>> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| malformed(what, format!("no PEM certificate found ({e})")))
}

/// Every certificate in a PEM bundle, in order.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| malformed("certificate chain", format!("not PEM certificates ({e})")))?;
    if certs.is_empty() {
        return Err(malformed("certificate chain", "no PEM certificate found"));
    }
    Ok(certs)
}

// ---------------------------------------------------------------------------------------------
// Root CA (global only)

/// A mesh's root CA. Lives on global only; zones get [`RootCa::cert_pem`], never the key.
pub struct RootCa {
    mesh: String,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key: KeyPair,
    not_after: SystemTime,
}

impl fmt::Debug for RootCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RootCa")
            .field("mesh", &self.mesh)
            .finish_non_exhaustive()
    }
}

impl RootCa {
    /// A new root CA for `mesh`, valid from now for `valid_for`: ECDSA P-256, CN
    /// `weft <mesh> root CA`, path length 1 (intermediates below it cannot make CAs), URI SAN
    /// `spiffe://<mesh>`.
    pub fn generate(mesh: &str, valid_for: Duration) -> Result<RootCa> {
        check_mesh(mesh)?;
        let what = format!("root CA of mesh {mesh}");
        let key = generate_key()?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "weft");
        dn.push(DnType::OrganizationalUnitName, format!("mesh {mesh}"));
        dn.push(DnType::CommonName, root_cn(mesh));
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.subject_alt_names = vec![uri_san(&SpiffeId::trust_domain_uri(mesh))?];
        p.serial_number = Some(serial()?);
        let (_, not_after) = set_validity(&mut p, SystemTime::now(), valid_for, None);
        let cert = p.self_signed(&key).map_err(|source| Error::Sign {
            what: what.clone(),
            source,
        })?;
        Ok(RootCa {
            mesh: mesh.to_string(),
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key,
            not_after,
        })
    }

    /// Load a stored root CA, checking that the key is the certificate's and that the
    /// certificate is a weft root (CA, path length ≤ 1, URI SAN `spiffe://<mesh>`).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<RootCa> {
        let what = "root CA";
        let cert_der = first_cert(what, cert_pem)?;
        let key = load_key(what, key_pem)?;
        let cert = parse_cert(what, &cert_der)?;
        let mesh = ca_mesh(what, &cert)?;
        let what = format!("root CA of mesh {mesh}");
        check_ca(&what, &cert, 1)?;
        check_key_matches(&what, &cert, &key)?;
        let not_after = not_after_of(&cert);
        Ok(RootCa {
            mesh,
            cert_pem: cert_pem.to_string(),
            cert_der,
            key,
            not_after,
        })
    }

    pub fn mesh(&self) -> &str {
        &self.mesh
    }

    /// The certificate, PEM: what zones and proxies trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The private key, PKCS#8 PEM: for global's store only.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Sign zone `zone`'s intermediate CSR: a CA with path length 0 named
    /// `weft <mesh> zone <zone> CA`, URI SAN `spiffe://<mesh>`, valid for `valid_for` (never
    /// past the root). Refuses a CSR whose signature does not check, whose key is not P-256 or
    /// is the root's own, or that names another zone or mesh.
    pub fn sign_intermediate(
        &self,
        csr_pem: &str,
        zone: &str,
        valid_for: Duration,
    ) -> Result<String> {
        check_zone(zone)?;
        let mesh = &self.mesh;
        let what = format!("intermediate CSR for zone {zone} of mesh {mesh}");
        let csr = parse_csr(&what, csr_pem)?;
        if csr.params.public_key.der_bytes() == self.key.public_key_raw() {
            return Err(refused(&what, "the key is the root CA's own"));
        }
        let want_cn = intermediate_cn(mesh, zone);
        if let Some(cn) = &csr.common_name
            && *cn != want_cn
        {
            return Err(refused(
                &what,
                format!("it asks for {cn:?}, expected {want_cn:?}"),
            ));
        }
        let want_uri = SpiffeId::trust_domain_uri(mesh);
        if let Some(other) = csr.uris.iter().find(|u| **u != want_uri) {
            return Err(refused(
                &what,
                format!("it asks for the name {other:?}, expected only {want_uri:?}"),
            ));
        }

        let mut p = CertificateParams::default();
        p.distinguished_name = intermediate_dn(mesh, zone);
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.subject_alt_names = vec![uri_san(&want_uri)?];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(serial()?);
        set_validity(&mut p, SystemTime::now(), valid_for, Some(self.not_after));
        let issuer =
            Issuer::from_ca_cert_der(&self.cert_der, &self.key).map_err(|source| Error::Sign {
                what: format!("root CA of mesh {mesh}"),
                source,
            })?;
        let cert = p
            .signed_by(&csr.params.public_key, &issuer)
            .map_err(|source| Error::Sign { what, source })?;
        Ok(cert.pem())
    }
}

// ---------------------------------------------------------------------------------------------
// Intermediate CA (one per zone and mesh)

/// A zone's intermediate CA for one mesh: its own key, the certificate global signed, and the
/// mesh's root certificate (never the root's key).
pub struct IntermediateCa {
    mesh: String,
    zone: String,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    root_pem: String,
    key: KeyPair,
    not_after: SystemTime,
}

impl fmt::Debug for IntermediateCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IntermediateCa")
            .field("mesh", &self.mesh)
            .field("zone", &self.zone)
            .finish_non_exhaustive()
    }
}

/// A workload certificate and what goes with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadCert {
    /// The identity the certificate carries.
    pub id: SpiffeId,
    /// The workload certificate alone, PEM.
    pub cert_pem: String,
    /// What the proxy presents: the workload certificate, then the intermediate, PEM.
    pub chain_pem: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl WorkloadCert {
    /// When the proxy should ask for the next one: [`renew_at`].
    pub fn renew_at(&self) -> SystemTime {
        renew_at(self.not_before, self.not_after)
    }
}

impl IntermediateCa {
    /// Load the zone's intermediate: its certificate (from global), the zone's own key, and
    /// `chain_to_root_pem`, the certificates up to and including the mesh's root. Checks the
    /// key is the certificate's, the certificate is a CA with path length 0 for a mesh, it is
    /// signed by the root, and the root is a root of the same mesh.
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        chain_to_root_pem: &str,
    ) -> Result<IntermediateCa> {
        let what = "intermediate CA";
        let cert_der = first_cert(what, cert_pem)?;
        let key = load_key(what, key_pem)?;
        let cert = parse_cert(what, &cert_der)?;
        let mesh = ca_mesh(what, &cert)?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or_default();
        let zone = cn
            .strip_prefix(&format!("weft {mesh} zone "))
            .and_then(|z| z.strip_suffix(" CA"))
            .filter(|z| check_zone(z).is_ok())
            .ok_or_else(|| {
                malformed(
                    what,
                    format!("common name {cn:?} is not \"weft {mesh} zone <zone> CA\""),
                )
            })?
            .to_string();
        let what = format!("intermediate CA of zone {zone} for mesh {mesh}");
        check_ca(&what, &cert, 0)?;
        check_key_matches(&what, &cert, &key)?;

        let chain = certs_from_pem(chain_to_root_pem)
            .map_err(|e| malformed(&what, format!("chain to the root: {e}")))?;
        let root_der = chain.last().expect("certs_from_pem returns at least one");
        let root = parse_cert(&what, root_der)?;
        let root_mesh = ca_mesh(&format!("{what}: root"), &root)?;
        if root_mesh != mesh {
            return Err(untrusted(&what, format!("its root is mesh {root_mesh}'s")));
        }
        // The direct issuer is the first certificate of the chain (normally the root itself).
        let issuer = parse_cert(&what, &chain[0])?;
        if cert.issuer() != issuer.subject() {
            return Err(untrusted(&what, "not issued by the given root"));
        }
        cert.verify_signature(Some(issuer.public_key()))
            .map_err(|e| {
                untrusted(
                    &what,
                    format!("signature does not check against the root ({e})"),
                )
            })?;
        let root_pem = pem_of(root_der);
        let not_after = not_after_of(&cert);
        drop(cert);
        Ok(IntermediateCa {
            mesh,
            zone,
            cert_pem: cert_pem.to_string(),
            cert_der,
            root_pem,
            key,
            not_after,
        })
    }

    pub fn mesh(&self) -> &str {
        &self.mesh
    }

    pub fn zone(&self) -> &str {
        &self.zone
    }

    /// The intermediate's certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The mesh's root certificate, PEM: the trust bundle the zone hands its proxies.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Issue a workload certificate for `spiffe://<mesh>/<service>` to the holder of the CSR's
    /// key, valid from `now` (less [`CLOCK_SKEW`]) for `valid_for`, never past the
    /// intermediate. The identity comes from (`mesh`, `service`) only; names in the CSR are
    /// ignored. End-entity (CA:false), digitalSignature, serverAuth and clientAuth.
    pub fn issue_workload(
        &self,
        csr_pem: &str,
        mesh: &str,
        service: &str,
        valid_for: Duration,
        now: SystemTime,
    ) -> Result<WorkloadCert> {
        let id = SpiffeId::new(mesh, service)?;
        let what = format!("workload certificate for {id}");
        if mesh != self.mesh {
            return Err(refused(
                &what,
                format!(
                    "zone {}'s intermediate CA is for mesh {}",
                    self.zone, self.mesh
                ),
            ));
        }
        if now >= self.not_after {
            return Err(refused(
                &what,
                format!(
                    "zone {}'s intermediate CA for mesh {} has expired; renew it",
                    self.zone, self.mesh
                ),
            ));
        }
        let csr = parse_csr(&format!("workload CSR for {id}"), csr_pem)?;
        if csr.params.public_key.der_bytes() == self.key.public_key_raw() {
            return Err(refused(&what, "the key is the intermediate CA's own"));
        }

        let mut p = CertificateParams::default();
        p.distinguished_name = workload_dn(&id);
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.subject_alt_names = vec![uri_san(&id.to_string())?];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(serial()?);
        let (not_before, not_after) = set_validity(&mut p, now, valid_for, Some(self.not_after));
        let issuer =
            Issuer::from_ca_cert_der(&self.cert_der, &self.key).map_err(|source| Error::Sign {
                what: format!(
                    "intermediate CA of zone {} for mesh {}",
                    self.zone, self.mesh
                ),
                source,
            })?;
        let cert = p
            .signed_by(&csr.params.public_key, &issuer)
            .map_err(|source| Error::Sign { what, source })?;
        let cert_pem = cert.pem();
        Ok(WorkloadCert {
            id,
            chain_pem: format!("{cert_pem}{}", self.cert_pem),
            cert_pem,
            not_before,
            not_after,
        })
    }
}

fn pem_of(der: &CertificateDer<'_>) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        // Base64 is ASCII.
        out.extend(line.iter().map(|&b| b as char));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

// ---------------------------------------------------------------------------------------------
// Verification

static SIG_ALGS: &[&dyn rustls_pki_types::SignatureVerificationAlgorithm] = &[
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P256_SHA384,
    webpki::ring::ECDSA_P384_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
    webpki::ring::ED25519,
];

/// Verify a workload's chain (`chain[0]` the workload certificate, then intermediates) against
/// the mesh's `root` at `now`, and return its identity.
///
/// webpki checks the signatures, every validity window, CA flags and path lengths (so a
/// certificate signed by a workload key fails), and the clientAuth EKU; on top of that the root
/// must be within its validity, the workload must also allow serverAuth, and it must carry
/// exactly one URI SAN, a SPIFFE ID in the root's mesh.
pub fn verify_workload(
    chain: &[CertificateDer<'_>],
    root: &CertificateDer<'_>,
    now: SystemTime,
) -> Result<SpiffeId> {
    let what = "workload certificate";
    let Some((leaf_der, intermediates)) = chain.split_first() else {
        return Err(malformed(what, "the chain is empty"));
    };
    let root_cert = parse_cert("root CA", root)?;
    let mesh = ca_mesh("root CA", &root_cert)?;
    let what = format!("workload certificate (mesh {mesh})");
    let unix = now
        .duration_since(UNIX_EPOCH)
        .map_err(|_| malformed(&what, "the time is before 1970"))?;
    let root_validity = root_cert.validity();
    let t = unix.as_secs() as i64;
    if t < root_validity.not_before.timestamp() || t > root_validity.not_after.timestamp() {
        return Err(untrusted(
            &what,
            format!("the root CA of mesh {mesh} is not valid now"),
        ));
    }

    let anchor = webpki::anchor_from_trusted_cert(root)
        .map_err(|e| malformed(format!("root CA of mesh {mesh}"), format!("{e:?}")))?;
    let leaf = webpki::EndEntityCert::try_from(leaf_der)
        .map_err(|e| malformed(&what, format!("{e:?}")))?;
    leaf.verify_for_usage(
        SIG_ALGS,
        &[anchor],
        intermediates,
        UnixTime::since_unix_epoch(unix),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(|e| untrusted(&what, describe(&e)))?;

    let cert = parse_cert(&what, leaf_der)?;
    let eku = cert
        .extended_key_usage()
        .map_err(|e| malformed(&what, format!("unreadable extendedKeyUsage ({e})")))?;
    match eku {
        Some(e) if e.value.server_auth && e.value.client_auth => {}
        _ => {
            return Err(untrusted(
                &what,
                "it does not allow both serverAuth and clientAuth",
            ));
        }
    }
    let uris = cert_uris(&what, &cert)?;
    let [uri] = uris.as_slice() else {
        return Err(untrusted(
            &what,
            format!("it carries {} URI SANs, expected one SPIFFE ID", uris.len()),
        ));
    };
    let id = SpiffeId::parse(uri).map_err(|e| untrusted(&what, e))?;
    if id.mesh != mesh {
        return Err(untrusted(
            &what,
            format!("it names {id}, outside mesh {mesh}"),
        ));
    }
    Ok(id)
}

/// [`verify_workload`] on PEM: `chain_pem` is the workload certificate then intermediates,
/// `root_pem` the mesh's root.
pub fn verify_workload_pem(chain_pem: &str, root_pem: &str, now: SystemTime) -> Result<SpiffeId> {
    let chain = certs_from_pem(chain_pem)?;
    let root = first_cert("root CA", root_pem)?;
    verify_workload(&chain, &root, now)
}

fn describe(e: &webpki::Error) -> String {
    use webpki::Error as E;
    match e {
        E::CertExpired { .. } => "expired".into(),
        E::CertNotValidYet { .. } => "not valid yet".into(),
        E::UnknownIssuer => "it does not chain to the mesh's root".into(),
        E::CaUsedAsEndEntity => "a CA certificate used as a workload certificate".into(),
        E::EndEntityUsedAsCa => "a workload certificate used as a CA".into(),
        E::PathLenConstraintViolated => "the chain is longer than the CAs allow".into(),
        E::InvalidSignatureForPublicKey => "a signature does not check".into(),
        other => format!("{other:?}"),
    }
}

/// When to renew a certificate valid from `not_before` to `not_after`: after 70% of its
/// lifetime ([`RENEW_PERCENT`]). A window that ends before it starts renews at once.
pub fn renew_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    match not_after.duration_since(not_before) {
        Ok(lifetime) => not_before + lifetime * RENEW_PERCENT / 100,
        Err(_) => not_before,
    }
}
