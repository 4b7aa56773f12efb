//! TLS material for global's KDS server: a self-signed CA and a server certificate made on
//! the first start and shared by every replica through the store, or files the operator
//! provides.
//!
//! The CA (ECDSA P-256, CN "weft global CA", 10 years) lives in system key `kds/tls/ca`; the
//! server certificate it signs (1 year; SANs `localhost`, `127.0.0.1`, `::1` plus configured
//! names) in `kds/tls/server`. Zones trust the CA, either from `<data-dir>/kds-ca.pem` or by
//! pinning its [`Material::fingerprint`]. The CA key never leaves global's store.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use chrono::{Datelike, Utc};
use rand::Rng;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use weft_core::store::Store;

/// System key of the CA certificate and key.
pub const CA_KEY: &str = "kds/tls/ca";
/// System key of the server certificate, its key and the names it was issued for.
pub const SERVER_KEY: &str = "kds/tls/server";
/// Names every server certificate carries.
pub const DEFAULT_SANS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];
/// File name of the CA certificate in the data directory.
pub const CA_FILE: &str = "kds-ca.pem";

const CA_DAYS: i64 = 10 * 365;
const SERVER_DAYS: i64 = 365;
/// A stored server certificate with less time left than this is reissued on start.
const RENEW_DAYS: i64 = 30;

/// PEM material for the KDS server.
#[derive(Clone, PartialEq, Eq)]
pub struct Material {
    /// The CA certificate zones trust.
    pub ca_pem: String,
    /// The server certificate chain: the server certificate, then the CA (so a zone that
    /// pins the CA's fingerprint sees it in the handshake).
    pub cert_pem: String,
    /// The server certificate's private key (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("ca", &fingerprint_of_pem(&self.ca_pem).ok())
            .finish_non_exhaustive()
    }
}

impl Material {
    /// `sha256:<hex>` of the CA certificate's DER: what a zone pins.
    ///
    /// # Panics
    /// If `ca_pem` holds no certificate; [`bootstrap`] and [`from_files`] make sure it does.
    pub fn fingerprint(&self) -> String {
        fingerprint_of_pem(&self.ca_pem).expect("Material holds a CA certificate")
    }

    /// Write the CA certificate to `<data_dir>/kds-ca.pem` (public, mode 0644); returns the
    /// path.
    pub fn write_ca(&self, data_dir: &Path) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let path = data_dir.join(CA_FILE);
        let tmp = path.with_extension("pem.tmp");
        std::fs::write(&tmp, &self.ca_pem).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

/// `sha256:<hex>` of the DER of the first certificate in `pem`.
pub fn fingerprint_of_pem(pem: &str) -> anyhow::Result<String> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| anyhow!("no PEM certificate found ({e})"))?;
    Ok(fingerprint_of_der(&der))
}

/// `sha256:<hex>` of a certificate's DER.
pub fn fingerprint_of_der(der: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(der)))
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredCa {
    cert_pem: String,
    key_pem: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredServer {
    cert_pem: String,
    key_pem: String,
    /// The names it was issued for, sorted.
    sans: Vec<String>,
    /// Unix seconds.
    not_after: i64,
}

/// Load the KDS TLS material from the store, making the CA and server certificate on the
/// first start (replicas starting at once share one CA). The server certificate is
/// reissued from the stored CA when `extra_sans` (DNS names or IP addresses) changed or it
/// expires within 30 days.
pub async fn bootstrap(store: &dyn Store, extra_sans: &[String]) -> anyhow::Result<Material> {
    let sans = sans(extra_sans)?;
    let ca_raw = match store.system_get(CA_KEY).await? {
        Some(raw) => raw,
        None => {
            let fresh = serde_json::to_string(&new_ca()?)?;
            let stored = store.system_init(CA_KEY, &fresh).await?;
            if stored == fresh {
                tracing::info!("created the KDS CA");
            }
            stored
        }
    };
    let ca: StoredCa =
        serde_json::from_str(&ca_raw).with_context(|| format!("system key {CA_KEY}"))?;
    let ca_key = KeyPair::from_pem(&ca.key_pem)
        .map_err(|e| anyhow!("system key {CA_KEY}: the CA key does not load ({e})"))?;

    let server: StoredServer = match store.system_get(SERVER_KEY).await? {
        None => {
            let fresh = serde_json::to_string(&new_server(&ca_key, &sans)?)?;
            let stored = store.system_init(SERVER_KEY, &fresh).await?;
            serde_json::from_str(&stored).with_context(|| format!("system key {SERVER_KEY}"))?
        }
        Some(raw) => {
            let stored: Option<StoredServer> = serde_json::from_str(&raw)
                .inspect_err(|e| tracing::warn!(error = %e, "stored KDS server certificate is unreadable; reissuing it"))
                .ok();
            let renew_by = Utc::now().timestamp() + RENEW_DAYS * 86400;
            match stored {
                Some(s) if s.sans == sans && s.not_after > renew_by => s,
                _ => {
                    let fresh = new_server(&ca_key, &sans)?;
                    store
                        .system_set(SERVER_KEY, &serde_json::to_string(&fresh)?)
                        .await?;
                    tracing::info!(names = ?sans, "reissued the KDS server certificate");
                    fresh
                }
            }
        }
    };
    // A server certificate is always the one for the names asked for, even when another
    // replica with different names initialized the slot a moment earlier.
    let server = if server.sans == sans {
        server
    } else {
        new_server(&ca_key, &sans)?
    };
    let material = Material {
        cert_pem: format!("{}{}", server.cert_pem, ca.cert_pem),
        ca_pem: ca.cert_pem,
        key_pem: server.key_pem,
    };
    tracing::info!(ca_fingerprint = %material.fingerprint(), names = ?sans, "KDS TLS material loaded; zones pin the CA with --global-fingerprint");
    Ok(material)
}

/// Use certificates the operator provides: `cert` (the server certificate chain; include
/// the CA for fingerprint pinning), its private `key`, and the `ca` zones should trust.
pub fn from_files(cert: &Path, key: &Path, ca: &Path) -> anyhow::Result<Material> {
    let read =
        |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let (cert_pem, key_pem, ca_pem) = (read(cert)?, read(key)?, read(ca)?);
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("{}: not a PEM certificate chain ({e})", cert.display()))?;
    if chain.is_empty() {
        bail!("{}: no PEM certificate found", cert.display());
    }
    let key_der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| anyhow!("{}: no PEM private key found ({e})", key.display()))?;
    rustls::sign::CertifiedKey::from_der(chain, key_der, &rustls::crypto::ring::default_provider())
        .with_context(|| {
            format!(
                "{} and {} do not form a usable certificate and key",
                cert.display(),
                key.display()
            )
        })?;
    fingerprint_of_pem(&ca_pem).with_context(|| format!("{}", ca.display()))?;
    Ok(Material {
        ca_pem,
        cert_pem,
        key_pem,
    })
}

/// The names of the server certificate: the defaults plus `extra`, checked, sorted.
fn sans(extra: &[String]) -> anyhow::Result<Vec<String>> {
    let mut out: BTreeSet<String> = DEFAULT_SANS.iter().map(|s| s.to_string()).collect();
    for name in extra {
        let name = name.trim();
        let ok = name.parse::<IpAddr>().is_ok() || is_dns_name(name);
        if !ok {
            bail!(
                "KDS TLS name {name:?} is not a DNS name or IP address (expected e.g. global.example.com or 10.0.0.5)"
            );
        }
        out.insert(name.to_ascii_lowercase());
    }
    Ok(out.into_iter().collect())
}

/// A DNS name, optionally with a leading `*.` wildcard.
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "weft");
    dn.push(DnType::CommonName, "weft global CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// Valid from yesterday (clock skew) for `days`.
fn validity(p: &mut CertificateParams, days: i64) {
    let ymd =
        |t: chrono::DateTime<Utc>| rcgen::date_time_ymd(t.year(), t.month() as u8, t.day() as u8);
    let now = Utc::now();
    p.not_before = ymd(now - chrono::Duration::days(1));
    p.not_after = ymd(now + chrono::Duration::days(days));
    // A positive 127-bit serial.
    let mut serial = rand::rng().random::<[u8; 16]>();
    serial[0] &= 0x7f;
    p.serial_number = Some(SerialNumber::from_slice(&serial));
}

fn new_key() -> anyhow::Result<KeyPair> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| anyhow!("generating a P-256 key: {e}"))
}

fn new_ca() -> anyhow::Result<StoredCa> {
    let key = new_key()?;
    let mut p = ca_params();
    validity(&mut p, CA_DAYS);
    let cert = p
        .self_signed(&key)
        .map_err(|e| anyhow!("making the KDS CA: {e}"))?;
    Ok(StoredCa {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A server certificate for `sans`, signed by the CA key. The issuer is rebuilt from the
/// same parameters the CA was made with, so its name and key identifier match.
fn new_server(ca_key: &KeyPair, sans: &[String]) -> anyhow::Result<StoredServer> {
    let key = new_key()?;
    let mut p = CertificateParams::new(Vec::<String>::new())
        .map_err(|e| anyhow!("KDS certificate parameters: {e}"))?;
    p.subject_alt_names = sans
        .iter()
        .map(|s| {
            Ok(match s.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    s.clone()
                        .try_into()
                        .map_err(|e| anyhow!("KDS TLS name {s:?}: {e}"))?,
                ),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "weft");
    dn.push(DnType::CommonName, "weft global KDS");
    p.distinguished_name = dn;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.use_authority_key_identifier_extension = true;
    validity(&mut p, SERVER_DAYS);
    let not_after = p.not_after.unix_timestamp();
    let issuer = Issuer::new(ca_params(), ca_key);
    let cert = p
        .signed_by(&key, &issuer)
        .map_err(|e| anyhow!("signing the KDS server certificate: {e}"))?;
    Ok(StoredServer {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        sans: sans.to_vec(),
        not_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_normalized() {
        assert_eq!(
            sans(&[
                "Global.Example.com".into(),
                "10.0.0.5".into(),
                "localhost".into()
            ])
            .unwrap(),
            [
                "10.0.0.5",
                "127.0.0.1",
                "::1",
                "global.example.com",
                "localhost"
            ]
        );
        assert!(sans(&["*.example.com".into()]).is_ok());
        for bad in ["", "a b", "-x.com", "x..com", "http://x"] {
            let e = sans(&[bad.into()]).unwrap_err().to_string();
            assert!(e.contains("is not a DNS name or IP address"), "{bad}: {e}");
        }
    }

    #[test]
    fn fingerprint_of_garbage_is_an_error() {
        assert!(fingerprint_of_pem("nope").is_err());
        assert_eq!(
            fingerprint_of_der(b"x"),
            "sha256:2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"
        );
    }
}
