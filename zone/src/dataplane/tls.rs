//! TLS material of the data-plane API: a CA and a server certificate the zone makes on its
//! first start and keeps in its data directory (the zone's store is in memory, so files are
//! what survives a restart), or the operator's own certificate and key.
//!
//! Files in `<data-dir>`: `dataplane-ca.pem` (the CA certificate, 0644: what proxies pass as
//! `--zone-ca-file`), `dataplane-ca-key.pem` (0600), `dataplane-server.pem` (the server
//! certificate then the CA, 0644), `dataplane-server-key.pem` (0600) and
//! `dataplane-server.json` (the names it was issued for and its expiry). The server
//! certificate is reissued from the kept CA when the names change or it expires within 30
//! days; the CA is kept (10 years), so proxies keep trusting a restarted zone.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use chrono::{Datelike, Utc};
use rand::Rng as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

/// The CA certificate proxies trust (`weft-dp --zone-ca-file`).
pub const CA_FILE: &str = "dataplane-ca.pem";
pub const CA_KEY_FILE: &str = "dataplane-ca-key.pem";
pub const SERVER_FILE: &str = "dataplane-server.pem";
pub const SERVER_KEY_FILE: &str = "dataplane-server-key.pem";
pub const SERVER_INFO_FILE: &str = "dataplane-server.json";
/// Names every generated server certificate carries.
pub const DEFAULT_SANS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

const CA_DAYS: i64 = 10 * 365;
const SERVER_DAYS: i64 = 365;
const RENEW_DAYS: i64 = 30;

/// What the data-plane server presents.
#[derive(Clone)]
pub struct Material {
    /// The server certificate chain, PEM.
    pub cert_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
    /// The CA file proxies should trust, when the zone made the material.
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize, PartialEq, Eq, Debug)]
#[serde(rename_all = "camelCase")]
struct ServerInfo {
    sans: Vec<String>,
    /// Unix seconds.
    not_after: i64,
}

/// Load the operator's files or the zone's own material (made on first use).
pub fn load(cfg: &crate::config::Dataplane, data_dir: &Path) -> anyhow::Result<Material> {
    match &cfg.tls_files {
        Some((cert, key)) => from_files(cert, key),
        None => bootstrap(data_dir, &cfg.sans),
    }
}

/// The operator's certificate chain and key, checked to form a usable pair.
pub fn from_files(cert: &Path, key: &Path) -> anyhow::Result<Material> {
    let read =
        |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let (cert_pem, key_pem) = (read(cert)?, read(key)?);
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            anyhow!(
                "--dataplane-cert-file {}: not a PEM certificate chain ({e})",
                cert.display()
            )
        })?;
    if chain.is_empty() {
        bail!(
            "--dataplane-cert-file {}: no PEM certificate found",
            cert.display()
        );
    }
    let key_der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| {
        anyhow!(
            "--dataplane-key-file {}: no PEM private key found ({e})",
            key.display()
        )
    })?;
    rustls::sign::CertifiedKey::from_der(chain, key_der, &rustls::crypto::ring::default_provider())
        .with_context(|| {
            format!(
                "{} and {} do not form a usable certificate and key",
                cert.display(),
                key.display()
            )
        })?;
    Ok(Material {
        cert_pem,
        key_pem,
        ca_file: None,
    })
}

/// The zone's own material in `data_dir`: the kept CA (made if absent) and a server
/// certificate for the default names plus `extra_sans`.
pub fn bootstrap(data_dir: &Path, extra_sans: &[String]) -> anyhow::Result<Material> {
    let sans = sans(extra_sans)?;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let ca_path = data_dir.join(CA_FILE);
    let ca_key_path = data_dir.join(CA_KEY_FILE);
    let (ca_pem, ca_key) = match (ca_path.exists(), ca_key_path.exists()) {
        (true, true) => {
            let cert = std::fs::read_to_string(&ca_path)
                .with_context(|| format!("reading {}", ca_path.display()))?;
            let key_pem = std::fs::read_to_string(&ca_key_path)
                .with_context(|| format!("reading {}", ca_key_path.display()))?;
            let key = KeyPair::from_pem(&key_pem).map_err(|e| {
                anyhow!(
                    "{}: the data-plane CA key does not load ({e})",
                    ca_key_path.display()
                )
            })?;
            (cert, key)
        }
        (false, false) => {
            let key = new_key()?;
            let mut p = ca_params();
            validity(&mut p, CA_DAYS);
            let cert = p
                .self_signed(&key)
                .map_err(|e| anyhow!("making the data-plane CA: {e}"))?;
            write_atomic(&ca_key_path, &key.serialize_pem(), 0o600)?;
            write_atomic(&ca_path, &cert.pem(), 0o644)?;
            tracing::info!(file = %ca_path.display(), "created the data-plane CA (proxies trust it with --zone-ca-file)");
            (cert.pem(), key)
        }
        _ => bail!(
            "{} and {} go together: restore the missing one, or remove both to make a new CA (every proxy then needs the new {CA_FILE})",
            ca_path.display(),
            ca_key_path.display()
        ),
    };

    let server_path = data_dir.join(SERVER_FILE);
    let server_key_path = data_dir.join(SERVER_KEY_FILE);
    let info_path = data_dir.join(SERVER_INFO_FILE);
    let renew_by = Utc::now().timestamp() + RENEW_DAYS * 86400;
    let kept = std::fs::read_to_string(&info_path)
        .ok()
        .and_then(|t| serde_json::from_str::<ServerInfo>(&t).ok())
        .filter(|i| i.sans == sans && i.not_after > renew_by)
        .and_then(|_| {
            let cert = std::fs::read_to_string(&server_path).ok()?;
            let key = std::fs::read_to_string(&server_key_path).ok()?;
            // Only a certificate this CA signed (the CA may have been replaced).
            cert.ends_with(&ca_pem).then_some((cert, key))
        });
    let (cert_pem, key_pem) = match kept {
        Some(k) => k,
        None => {
            let key = new_key()?;
            let (cert, not_after) = new_server(&ca_key, &key, &sans)?;
            let chain = format!("{cert}{ca_pem}");
            write_atomic(&server_key_path, &key.serialize_pem(), 0o600)?;
            write_atomic(&server_path, &chain, 0o644)?;
            write_atomic(
                &info_path,
                &serde_json::to_string_pretty(&ServerInfo {
                    sans: sans.clone(),
                    not_after,
                })?,
                0o644,
            )?;
            tracing::info!(names = ?sans, "issued the data-plane server certificate");
            (chain, key.serialize_pem())
        }
    };
    Ok(Material {
        cert_pem,
        key_pem,
        ca_file: Some(ca_path),
    })
}

/// Write `text` to `path` with `mode`, through a temporary file renamed into place.
pub fn write_atomic(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// The defaults plus `extra`, checked, lower-cased, sorted.
fn sans(extra: &[String]) -> anyhow::Result<Vec<String>> {
    let mut out: BTreeSet<String> = DEFAULT_SANS.iter().map(|s| s.to_string()).collect();
    for name in extra {
        let name = name.trim();
        if !(name.parse::<IpAddr>().is_ok() || is_dns_name(name)) {
            bail!(
                "--dataplane-san {name:?} is not a DNS name or IP address (expected e.g. zone-east.example.com or 10.0.0.5)"
            );
        }
        out.insert(name.to_ascii_lowercase());
    }
    Ok(out.into_iter().collect())
}

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
    dn.push(DnType::CommonName, "weft zone data-plane API CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// Valid from yesterday (clock skew) for `days`, with a random positive serial.
fn validity(p: &mut CertificateParams, days: i64) {
    let ymd =
        |t: chrono::DateTime<Utc>| rcgen::date_time_ymd(t.year(), t.month() as u8, t.day() as u8);
    let now = Utc::now();
    p.not_before = ymd(now - chrono::Duration::days(1));
    p.not_after = ymd(now + chrono::Duration::days(days));
    let mut serial = rand::rng().random::<[u8; 16]>();
    serial[0] &= 0x7f;
    p.serial_number = Some(SerialNumber::from_slice(&serial));
}

fn new_key() -> anyhow::Result<KeyPair> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| anyhow!("generating a P-256 key: {e}"))
}

/// A server certificate for `sans` signed by the CA key; returns its PEM and expiry. The
/// issuer is rebuilt from the parameters the CA was made with, so names and key ids match.
fn new_server(ca_key: &KeyPair, key: &KeyPair, sans: &[String]) -> anyhow::Result<(String, i64)> {
    let mut p = CertificateParams::new(Vec::<String>::new())
        .map_err(|e| anyhow!("data-plane certificate parameters: {e}"))?;
    p.subject_alt_names = sans
        .iter()
        .map(|s| {
            Ok(match s.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    s.clone()
                        .try_into()
                        .map_err(|e| anyhow!("--dataplane-san {s:?}: {e}"))?,
                ),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "weft");
    dn.push(DnType::CommonName, "weft zone data-plane API");
    p.distinguished_name = dn;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.use_authority_key_identifier_extension = true;
    validity(&mut p, SERVER_DAYS);
    let not_after = p.not_after.unix_timestamp();
    let issuer = Issuer::new(ca_params(), ca_key);
    let cert = p
        .signed_by(key, &issuer)
        .map_err(|e| anyhow!("signing the data-plane server certificate: {e}"))?;
    Ok((cert.pem(), not_after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_ca_is_kept_and_the_server_reissued_when_names_change() {
        let dir = tempfile::tempdir().unwrap();
        let a = bootstrap(dir.path(), &[]).unwrap();
        let ca = std::fs::read_to_string(dir.path().join(CA_FILE)).unwrap();
        assert!(a.cert_pem.ends_with(&ca));
        #[cfg(unix)]
        {
            assert_eq!(mode(&dir.path().join(CA_KEY_FILE)), 0o600);
            assert_eq!(mode(&dir.path().join(SERVER_KEY_FILE)), 0o600);
        }
        // A restart with the same names: the same certificate.
        let b = bootstrap(dir.path(), &[]).unwrap();
        assert_eq!(a.cert_pem, b.cert_pem);
        // New names: a new server certificate from the same CA.
        let c = bootstrap(dir.path(), &["zone.example.com".into()]).unwrap();
        assert_ne!(a.cert_pem, c.cert_pem);
        assert!(c.cert_pem.ends_with(&ca));
        assert_eq!(
            std::fs::read_to_string(dir.path().join(CA_FILE)).unwrap(),
            ca
        );
        // A lost key is an error, not a silent new CA.
        std::fs::remove_file(dir.path().join(CA_KEY_FILE)).unwrap();
        let e = bootstrap(dir.path(), &[]).unwrap_err().to_string();
        assert!(e.contains("go together"), "{e}");
        assert!(sans(&["a b".into()]).is_err());
    }
}
