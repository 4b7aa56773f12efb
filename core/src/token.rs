//! Zone and dataplane tokens: Ed25519-signed JWTs (compact JWS) that global issues. A zone
//! token lets a zone control plane, ingress or egress connect over KDS; a dataplane token
//! lets one proxy (a dataplane name, in a mesh, for a service) connect to its zone.
//!
//! A token is `base64url(header).base64url(claims).base64url(signature)` without padding; the
//! header is `{"alg":"EdDSA","typ":"JWT","kid":"<key id>"}` and the claims are [`Claims`]
//! (zone tokens) or [`DataplaneClaims`] (dataplane tokens, `scope: "dataplane"`). Both claim
//! sets refuse unknown fields, so neither kind of token reads as the other.
//! Pure: the only I/O is the OS random source when a key or a token id is made. Revocation
//! is the caller's job: [`verify`] returns the claims and the caller checks `claims.jti`
//! against its list.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::validate::check_dns_label;

/// The only signature algorithm accepted.
pub const ALG: &str = "EdDSA";
/// Tokens longer than this are refused before any decoding.
pub const MAX_LEN: usize = 8 * 1024;
/// How long a token is valid when the operator does not say (`720h`, 30 days).
pub const DEFAULT_VALID_FOR: Duration = Duration::from_secs(720 * 3600);

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Not a token at all, or one whose parts do not decode.
    #[error("malformed zone token: {0}")]
    Malformed(String),
    /// A well-formed token signed with another algorithm (`none`, `HS256`, ...).
    #[error("zone token uses algorithm {0:?}: only EdDSA (Ed25519) tokens are accepted")]
    Algorithm(String),
    /// Signed by a key this control plane does not know.
    #[error(
        "zone token signed by unknown key {kid:?} (issued by another global control plane, or before its signing key was replaced): issue a new one with `weftctl generate zone-token`"
    )]
    UnknownKey { kid: String },
    /// The signature does not match the header and claims: forged or altered.
    #[error("zone token for {zone:?}: bad signature (the token was altered or forged)")]
    BadSignature { zone: String },
    /// `exp` is not after now.
    #[error("zone token for {zone:?}: expired at {} (issue a new one with `weftctl generate zone-token --zone {zone}`)", rfc3339(*exp))]
    Expired { zone: String, exp: u64 },
    /// The zone name is not a DNS label.
    #[error("zone token: zone: {0}")]
    Zone(String),
    /// A validity that would give an already-expired token.
    #[error("zone token: validity {0:?} is too short (expected at least 1s, e.g. 720h)")]
    Validity(Duration),
    /// A signing or verifying key that cannot be used.
    #[error("invalid zone token key: {0}")]
    Key(String),
    /// Not a dataplane token (a zone token, or parts that do not decode).
    #[error("malformed dataplane token: {0}")]
    DataplaneMalformed(String),
    /// A dataplane token signed by a key this control plane does not know.
    #[error(
        "dataplane token signed by unknown key {kid:?} (issued by another global control plane, or before its signing key was replaced): issue a new one with `weftctl generate dataplane-token`"
    )]
    DataplaneUnknownKey { kid: String },
    #[error(
        "dataplane token for {name:?} in mesh {mesh:?}: bad signature (the token was altered or forged)"
    )]
    DataplaneBadSignature { name: String, mesh: String },
    #[error("dataplane token for {name:?} in mesh {mesh:?}: expired at {} (issue a new one with `weftctl generate dataplane-token --mesh {mesh} --name {name} --service SERVICE`)", rfc3339(*exp))]
    DataplaneExpired {
        name: String,
        mesh: String,
        exp: u64,
    },
    /// Valid, but for another mesh, dataplane or service than the proxy presents.
    #[error(
        "dataplane token for {name:?} in mesh {mesh:?}: issued for {what} {issued:?}, not {presented:?}"
    )]
    DataplaneMismatch {
        name: String,
        mesh: String,
        /// `mesh`, `dataplane` or `service`.
        what: &'static str,
        issued: String,
        presented: String,
    },
    /// A mesh, name or service a dataplane token cannot be issued for.
    #[error("dataplane token: {field}: {message}")]
    DataplaneField {
        field: &'static str,
        message: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a token lets its holder do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// A zone control plane.
    Zone,
    /// A zone ingress.
    Ingress,
    /// A zone egress.
    Egress,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Zone, Scope::Ingress, Scope::Egress];

    pub fn name(self) -> &'static str {
        match self {
            Scope::Zone => "zone",
            Scope::Ingress => "ingress",
            Scope::Egress => "egress",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Scope, String> {
        Scope::ALL
            .into_iter()
            .find(|sc| sc.name() == s)
            .ok_or_else(|| format!("invalid scope {s:?} (expected zone, ingress or egress)"))
    }
}

/// The claims of a zone token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// The zone name (a DNS label).
    pub sub: String,
    pub scope: Scope,
    /// Issued at, unix seconds.
    pub iat: u64,
    /// Expires at, unix seconds: the token is refused from this second on.
    pub exp: u64,
    /// The token id (16 random bytes, hex): what revocation names.
    pub jti: String,
}

impl Claims {
    pub fn zone(&self) -> &str {
        &self.sub
    }

    /// The expiry as a point in time.
    pub fn expires_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.exp)
    }
}

/// The `scope` of a dataplane token: always `"dataplane"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataplaneScope {
    Dataplane,
}

/// The claims of a dataplane token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataplaneClaims {
    /// The dataplane's name.
    pub sub: String,
    pub mesh: String,
    /// The service the proxy may serve (its `kuma.io/service`-style tag).
    pub service: String,
    pub scope: DataplaneScope,
    /// Issued at, unix seconds.
    pub iat: u64,
    /// Expires at, unix seconds: the token is refused from this second on.
    pub exp: u64,
    /// The token id (16 random bytes, hex): what revocation names; zone and dataplane
    /// tokens share one revocation log.
    pub jti: String,
}

impl DataplaneClaims {
    pub fn name(&self) -> &str {
        &self.sub
    }
}

/// Check a service name: printable ASCII without spaces, at most 253 characters.
pub fn check_service(service: &str) -> Result<(), String> {
    if service.is_empty() {
        return Err("must not be empty (expected the service name, e.g. backend)".into());
    }
    if service.len() > 253 || !service.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "invalid service {service:?} (expected printable ASCII without spaces, at most 253 characters, e.g. backend)"
        ));
    }
    Ok(())
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
}

/// The private key global signs tokens with.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.key_id())
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A new random key.
    ///
    /// # Panics
    /// If the OS random source fails (nothing secure can be done then).
    pub fn generate() -> SigningKey {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .expect("the OS random source is unavailable");
        SigningKey::from_pkcs8(doc.as_ref()).expect("ring reads back the key it generated")
    }

    /// Load a PKCS#8 (v1 or v2) Ed25519 private key, as [`SigningKey::to_pkcs8`] writes it.
    pub fn from_pkcs8(der: &[u8]) -> Result<SigningKey> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| Error::Key(format!("not a PKCS#8 Ed25519 private key ({e})")))?;
        Ok(SigningKey {
            pair,
            pkcs8: der.to_vec(),
        })
    }

    /// The PKCS#8 DER form: a secret.
    pub fn to_pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    pub fn public(&self) -> VerifyingKey {
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(self.pair.public_key().as_ref());
        VerifyingKey(bytes)
    }

    /// The `kid` of tokens this key signs (see [`VerifyingKey::key_id`]).
    pub fn key_id(&self) -> String {
        self.public().key_id()
    }

    /// Sign a token for `zone`, valid from `now` for `valid_for` (whole seconds).
    pub fn issue(
        &self,
        zone: &str,
        scope: Scope,
        valid_for: Duration,
        now: SystemTime,
    ) -> Result<(String, Claims)> {
        check_dns_label(zone).map_err(Error::Zone)?;
        if valid_for.as_secs() == 0 {
            return Err(Error::Validity(valid_for));
        }
        let iat = unix(now);
        let claims = Claims {
            sub: zone.to_string(),
            scope,
            iat,
            exp: iat.saturating_add(valid_for.as_secs()),
            jti: new_id(),
        };
        Ok((self.sign(&claims), claims))
    }

    /// Sign a dataplane token for dataplane `name` of `mesh` serving `service`, valid from
    /// `now` for `valid_for` (whole seconds).
    pub fn issue_dataplane(
        &self,
        mesh: &str,
        name: &str,
        service: &str,
        valid_for: Duration,
        now: SystemTime,
    ) -> Result<(String, DataplaneClaims)> {
        let field = |field, message| Error::DataplaneField { field, message };
        check_dns_label(mesh).map_err(|m| field("mesh", m))?;
        check_dns_label(name).map_err(|m| field("name", m))?;
        check_service(service).map_err(|m| field("service", m))?;
        if valid_for.as_secs() == 0 {
            return Err(Error::Validity(valid_for));
        }
        let iat = unix(now);
        let claims = DataplaneClaims {
            sub: name.to_string(),
            mesh: mesh.to_string(),
            service: service.to_string(),
            scope: DataplaneScope::Dataplane,
            iat,
            exp: iat.saturating_add(valid_for.as_secs()),
            jti: new_id(),
        };
        Ok((self.sign(&claims), claims))
    }

    fn sign<C: Serialize>(&self, claims: &C) -> String {
        let header = Header {
            alg: ALG.to_string(),
            typ: Some("JWT".to_string()),
            kid: Some(self.key_id()),
        };
        let mut token = String::new();
        B64.encode_string(json(&header), &mut token);
        token.push('.');
        B64.encode_string(json(claims), &mut token);
        let signature = self.pair.sign(token.as_bytes());
        token.push('.');
        B64.encode_string(signature.as_ref(), &mut token);
        token
    }
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("token parts serialize")
}

/// A public key that checks token signatures.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct VerifyingKey([u8; 32]);

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifyingKey({})", self.key_id())
    }
}

impl VerifyingKey {
    /// The 32 raw bytes of an Ed25519 public key.
    pub fn from_bytes(bytes: &[u8]) -> Result<VerifyingKey> {
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| {
            Error::Key(format!(
                "an Ed25519 public key is 32 bytes, got {}",
                bytes.len()
            ))
        })?;
        Ok(VerifyingKey(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key id: the first 8 bytes of the SHA-256 of the public key, in hex.
    pub fn key_id(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, &self.0);
        hex(&digest.as_ref()[..8])
    }
}

/// Check a token: its structure, algorithm, key, signature, expiry (`exp <= now` is expired)
/// and zone name. Returns the claims; the caller checks revocation.
pub fn verify(token: &str, keys: &[VerifyingKey], now: SystemTime) -> Result<Claims> {
    let (header, claims, signed, signature) = split::<Claims>(token)?;
    if header.alg != ALG {
        return Err(Error::Algorithm(header.alg));
    }
    let kid = header
        .kid
        .ok_or_else(|| Error::Malformed("the header has no kid".into()))?;
    let key = keys
        .iter()
        .find(|k| k.key_id() == kid)
        .ok_or(Error::UnknownKey { kid })?;
    UnparsedPublicKey::new(&ED25519, key.as_bytes())
        .verify(signed.as_bytes(), &signature)
        .map_err(|_| Error::BadSignature {
            zone: claims.sub.clone(),
        })?;
    if claims.exp <= unix(now) {
        return Err(Error::Expired {
            zone: claims.sub,
            exp: claims.exp,
        });
    }
    check_dns_label(&claims.sub).map_err(Error::Zone)?;
    Ok(claims)
}

/// Check a dataplane token that a proxy presents as dataplane `name` of `mesh` serving
/// `service`: its structure, algorithm, key, signature, expiry, and that it was issued for
/// exactly that mesh, dataplane and service. Returns the claims; the caller checks revocation.
pub fn verify_dataplane(
    token: &str,
    keys: &[VerifyingKey],
    now: SystemTime,
    mesh: &str,
    name: &str,
    service: &str,
) -> Result<DataplaneClaims> {
    let (header, claims, signed, signature) =
        split::<DataplaneClaims>(token).map_err(|e| match e {
            Error::Malformed(m) => Error::DataplaneMalformed(m),
            other => other,
        })?;
    if header.alg != ALG {
        return Err(Error::Algorithm(header.alg));
    }
    let kid = header
        .kid
        .ok_or_else(|| Error::DataplaneMalformed("the header has no kid".into()))?;
    let key = keys
        .iter()
        .find(|k| k.key_id() == kid)
        .ok_or(Error::DataplaneUnknownKey { kid })?;
    UnparsedPublicKey::new(&ED25519, key.as_bytes())
        .verify(signed.as_bytes(), &signature)
        .map_err(|_| Error::DataplaneBadSignature {
            name: claims.sub.clone(),
            mesh: claims.mesh.clone(),
        })?;
    if claims.exp <= unix(now) {
        return Err(Error::DataplaneExpired {
            name: claims.sub,
            mesh: claims.mesh,
            exp: claims.exp,
        });
    }
    for (what, issued, presented) in [
        ("mesh", &claims.mesh, mesh),
        ("dataplane", &claims.sub, name),
        ("service", &claims.service, service),
    ] {
        if issued != presented {
            return Err(Error::DataplaneMismatch {
                name: claims.sub.clone(),
                mesh: claims.mesh.clone(),
                what,
                issued: issued.clone(),
                presented: presented.to_string(),
            });
        }
    }
    Ok(claims)
}

/// The token id of a zone or dataplane token, reading **only its structure** (for revoking
/// a token given whole).
pub fn inspect_id(token: &str) -> Result<String> {
    match split::<Claims>(token) {
        Ok((_, c, _, _)) => Ok(c.jti),
        Err(zone) => split::<DataplaneClaims>(token)
            .map(|(_, c, _, _)| c.jti)
            .map_err(|_| zone),
    }
}

/// Read a token's claims **without checking anything but its structure**: for showing a
/// token's id, zone and expiry, never for deciding whether to trust it.
pub fn inspect(token: &str) -> Result<Claims> {
    split(token).map(|(_, claims, _, _)| claims)
}

/// Header, claims, the signed text and the signature bytes.
fn split<C: serde::de::DeserializeOwned>(token: &str) -> Result<(Header, C, &str, Vec<u8>)> {
    let token = token.trim();
    if token.len() > MAX_LEN {
        return Err(Error::Malformed(format!(
            "{} bytes long (at most {MAX_LEN})",
            token.len()
        )));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Error::Malformed(
            "expected three base64url parts separated by '.'".into(),
        ));
    };
    let decode = |what: &str, part: &str| {
        B64.decode(part)
            .map_err(|e| Error::Malformed(format!("{what} is not base64url ({e})")))
    };
    let header: Header = serde_json::from_slice(&decode("header", h)?)
        .map_err(|e| Error::Malformed(format!("header: {e}")))?;
    let claims: C = serde_json::from_slice(&decode("claims", c)?)
        .map_err(|e| Error::Malformed(format!("claims: {e}")))?;
    let signature = decode("signature", s)?;
    let signed = &token[..h.len() + 1 + c.len()];
    Ok((header, claims, signed, signature))
}

/// Seconds since the unix epoch (0 before it).
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `2026-12-22T10:00:00Z`.
pub fn rfc3339(unix_secs: u64) -> String {
    i64::try_from(unix_secs)
        .ok()
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .map_or_else(
            || format!("unix time {unix_secs}"),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        )
}

/// A new token id: 16 random bytes in hex.
fn new_id() -> String {
    let mut b = [0u8; 16];
    SystemRandom::new()
        .fill(&mut b)
        .expect("the OS random source is unavailable");
    hex(&b)
}

/// Whether `id` looks like a token id (32 lowercase hex digits).
pub fn is_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    const T0: u64 = 1_800_000_000;

    #[test]
    fn round_trip_and_expiry_boundary() {
        let key = SigningKey::generate();
        let (token, claims) = key
            .issue("east", Scope::Ingress, Duration::from_secs(60), at(T0))
            .unwrap();
        assert_eq!(
            (claims.sub.as_str(), claims.scope, claims.iat, claims.exp),
            ("east", Scope::Ingress, T0, T0 + 60)
        );
        assert!(is_id(&claims.jti), "{}", claims.jti);
        let keys = [key.public()];
        assert_eq!(verify(&token, &keys, at(T0 + 59)).unwrap(), claims);
        assert_eq!(inspect(&token).unwrap(), claims);
        let err = verify(&token, &keys, at(T0 + 60)).unwrap_err();
        assert!(matches!(err, Error::Expired { exp, .. } if exp == T0 + 60));
        assert_eq!(
            err.to_string(),
            "zone token for \"east\": expired at 2027-01-15T08:01:00Z (issue a new one with `weftctl generate zone-token --zone east`)"
        );
    }

    #[test]
    fn header_is_the_documented_one() {
        let key = SigningKey::generate();
        let (token, _) = key
            .issue("east", Scope::Zone, Duration::from_secs(60), at(T0))
            .unwrap();
        let h = B64.decode(token.split('.').next().unwrap()).unwrap();
        assert_eq!(
            String::from_utf8(h).unwrap(),
            format!(r#"{{"alg":"EdDSA","typ":"JWT","kid":"{}"}}"#, key.key_id())
        );
        assert_eq!(key.key_id().len(), 16);
    }

    #[test]
    fn pkcs8_round_trip_keeps_the_key() {
        let key = SigningKey::generate();
        let again = SigningKey::from_pkcs8(key.to_pkcs8()).unwrap();
        assert_eq!(again.public(), key.public());
        let vk = VerifyingKey::from_bytes(key.public().as_bytes()).unwrap();
        assert_eq!(vk, key.public());
        assert!(matches!(
            SigningKey::from_pkcs8(b"nope"),
            Err(Error::Key(_))
        ));
        assert!(matches!(
            VerifyingKey::from_bytes(&[0; 31]),
            Err(Error::Key(_))
        ));
        assert!(!format!("{key:?}").contains(&hex(key.to_pkcs8())));
    }

    #[test]
    fn issue_refuses_bad_zone_names_and_zero_validity() {
        let key = SigningKey::generate();
        let err = key
            .issue("East", Scope::Zone, Duration::from_secs(60), at(T0))
            .unwrap_err();
        assert!(matches!(err, Error::Zone(_)));
        assert!(err.to_string().contains("\"East\""), "{err}");
        assert!(matches!(
            key.issue("east", Scope::Zone, Duration::from_millis(500), at(T0)),
            Err(Error::Validity(_))
        ));
    }

    #[test]
    fn scopes_parse_and_print() {
        for s in Scope::ALL {
            assert_eq!(s.name().parse::<Scope>().unwrap(), s);
        }
        assert_eq!(
            "mesh".parse::<Scope>().unwrap_err(),
            "invalid scope \"mesh\" (expected zone, ingress or egress)"
        );
    }

    #[test]
    fn dataplane_tokens_check_mesh_name_service_and_expiry() {
        let key = SigningKey::generate();
        let keys = [key.public()];
        let (token, claims) = key
            .issue_dataplane(
                "default",
                "web-1",
                "backend",
                Duration::from_secs(60),
                at(T0),
            )
            .unwrap();
        assert_eq!(
            (claims.name(), claims.mesh.as_str(), claims.service.as_str()),
            ("web-1", "default", "backend")
        );
        assert_eq!(
            (claims.scope, claims.iat, claims.exp),
            (DataplaneScope::Dataplane, T0, T0 + 60)
        );
        assert!(is_id(&claims.jti));
        let ok = verify_dataplane(&token, &keys, at(T0 + 59), "default", "web-1", "backend");
        assert_eq!(ok.unwrap(), claims);
        assert_eq!(inspect_id(&token).unwrap(), claims.jti);
        let check = |mesh, name, service| {
            verify_dataplane(&token, &keys, at(T0), mesh, name, service)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            check("default", "web-1", "frontend"),
            r#"dataplane token for "web-1" in mesh "default": issued for service "backend", not "frontend""#
        );
        assert_eq!(
            check("other", "web-1", "backend"),
            r#"dataplane token for "web-1" in mesh "default": issued for mesh "default", not "other""#
        );
        assert_eq!(
            check("default", "web-2", "backend"),
            r#"dataplane token for "web-1" in mesh "default": issued for dataplane "web-1", not "web-2""#
        );
        let err = verify_dataplane(&token, &keys, at(T0 + 60), "default", "web-1", "backend")
            .unwrap_err();
        assert!(
            matches!(err, Error::DataplaneExpired { exp, .. } if exp == T0 + 60),
            "{err}"
        );
        assert!(
            err.to_string().contains("expired at 2027-01-15T08:01:00Z"),
            "{err}"
        );
        // Another global's key.
        let other = [SigningKey::generate().public()];
        assert!(matches!(
            verify_dataplane(&token, &other, at(T0), "default", "web-1", "backend"),
            Err(Error::DataplaneUnknownKey { .. })
        ));
        // Altered claims.
        let mut parts: Vec<String> = token.split('.').map(String::from).collect();
        let mut c: serde_json::Value =
            serde_json::from_slice(&B64.decode(&parts[1]).unwrap()).unwrap();
        c["service"] = "frontend".into();
        parts[1] = B64.encode(serde_json::to_vec(&c).unwrap());
        assert!(matches!(
            verify_dataplane(
                &parts.join("."),
                &keys,
                at(T0),
                "default",
                "web-1",
                "frontend"
            ),
            Err(Error::DataplaneBadSignature { .. })
        ));
    }

    #[test]
    fn zone_and_dataplane_tokens_do_not_pass_for_each_other() {
        let key = SigningKey::generate();
        let keys = [key.public()];
        let (zone, zc) = key
            .issue("east", Scope::Zone, Duration::from_secs(60), at(T0))
            .unwrap();
        let (dp, _) = key
            .issue_dataplane("default", "east", "east", Duration::from_secs(60), at(T0))
            .unwrap();
        assert!(matches!(
            verify(&dp, &keys, at(T0)),
            Err(Error::Malformed(_))
        ));
        let err = verify_dataplane(&zone, &keys, at(T0), "default", "east", "east").unwrap_err();
        assert!(
            err.to_string().starts_with("malformed dataplane token: "),
            "{err}"
        );
        assert_eq!(inspect_id(&zone).unwrap(), zc.jti);
    }

    #[test]
    fn dataplane_tokens_refuse_bad_fields() {
        let key = SigningKey::generate();
        let issue = |mesh, name, service| {
            key.issue_dataplane(mesh, name, service, Duration::from_secs(60), at(T0))
                .unwrap_err()
        };
        assert!(matches!(
            issue("Default", "web", "s"),
            Error::DataplaneField { field: "mesh", .. }
        ));
        assert!(matches!(
            issue("default", "", "s"),
            Error::DataplaneField { field: "name", .. }
        ));
        let e = issue("default", "web", "a b");
        assert!(
            matches!(
                e,
                Error::DataplaneField {
                    field: "service",
                    ..
                }
            ),
            "{e}"
        );
        assert!(matches!(
            key.issue_dataplane("default", "web", "s", Duration::ZERO, at(T0)),
            Err(Error::Validity(_))
        ));
    }
}
