//! Zone tokens from the outside: what a verifier accepts and every way it refuses.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use weft_core::token::{self, Error, Scope, SigningKey};

const T0: u64 = 1_800_000_000;

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn mk_token(key: &SigningKey) -> String {
    key.issue("east", Scope::Zone, Duration::from_secs(3600), at(T0))
        .unwrap()
        .0
}

fn parts(token: &str) -> Vec<String> {
    token.split('.').map(str::to_string).collect()
}

fn decode_json(part: &str) -> serde_json::Value {
    serde_json::from_slice(&B64.decode(part).unwrap()).unwrap()
}

fn encode_json(v: &serde_json::Value) -> String {
    B64.encode(serde_json::to_vec(v).unwrap())
}

#[test]
fn round_trip_with_several_keys() {
    let old = SigningKey::generate();
    let new = SigningKey::generate();
    let keys = [old.public(), new.public()];
    for key in [&old, &new] {
        let (t, issued) = key
            .issue(
                "zone-1",
                Scope::Egress,
                Duration::from_secs(720 * 3600),
                at(T0),
            )
            .unwrap();
        let claims = token::verify(&t, &keys, at(T0 + 1)).unwrap();
        assert_eq!(claims, issued);
        assert_eq!(claims.zone(), "zone-1");
        assert_eq!(claims.scope, Scope::Egress);
        assert_eq!(claims.exp - claims.iat, 720 * 3600);
    }
    // Two tokens for the same zone have different ids.
    let a = token::inspect(&mk_token(&old)).unwrap();
    let b = token::inspect(&mk_token(&old)).unwrap();
    assert_ne!(a.jti, b.jti);
}

#[test]
fn tampered_claims_fail_the_signature() {
    let key = SigningKey::generate();
    let t = mk_token(&key);
    let mut p = parts(&t);
    let mut claims = decode_json(&p[1]);
    claims["sub"] = "west".into();
    p[1] = encode_json(&claims);
    let err = token::verify(&p.join("."), &[key.public()], at(T0)).unwrap_err();
    assert_eq!(
        err,
        Error::BadSignature {
            zone: "west".into()
        }
    );
    assert!(err.to_string().contains("bad signature"), "{err}");

    // A longer expiry, or a signature that was cut short, fails too.
    let mut p = parts(&t);
    let mut claims = decode_json(&p[1]);
    claims["exp"] = (T0 + 10 * 365 * 86400).into();
    p[1] = encode_json(&claims);
    assert!(matches!(
        token::verify(&p.join("."), &[key.public()], at(T0)),
        Err(Error::BadSignature { .. })
    ));
    let mut p = parts(&t);
    p[2].truncate(20);
    assert!(matches!(
        token::verify(&p.join("."), &[key.public()], at(T0)),
        Err(Error::BadSignature { .. })
    ));
}

#[test]
fn another_key_is_unknown_and_a_forged_kid_fails_the_signature() {
    let ours = SigningKey::generate();
    let theirs = SigningKey::generate();
    let t = mk_token(&theirs);
    let err = token::verify(&t, &[ours.public()], at(T0)).unwrap_err();
    assert_eq!(
        err,
        Error::UnknownKey {
            kid: theirs.key_id()
        }
    );
    assert!(token::verify(&t, &[], at(T0)).is_err());

    // Their token relabelled with our key id.
    let mut p = parts(&t);
    let mut header = decode_json(&p[0]);
    header["kid"] = ours.key_id().into();
    p[0] = encode_json(&header);
    assert!(matches!(
        token::verify(&p.join("."), &[ours.public()], at(T0)),
        Err(Error::BadSignature { .. })
    ));
}

#[test]
fn expired_is_refused_with_its_time() {
    let key = SigningKey::generate();
    let (t, claims) = key
        .issue("east", Scope::Zone, Duration::from_secs(30 * 60), at(T0))
        .unwrap();
    assert!(token::verify(&t, &[key.public()], at(claims.exp - 1)).is_ok());
    for now in [claims.exp, claims.exp + 1, claims.exp + 86400] {
        let err = token::verify(&t, &[key.public()], at(now)).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("zone token for \"east\": expired at 2027-01-15T08:30:00Z"),
            "{err}"
        );
    }
}

#[test]
fn garbage_is_malformed() {
    let key = SigningKey::generate();
    let good = mk_token(&key);
    let p = parts(&good);
    let long = "a".repeat(token::MAX_LEN + 1);
    let cases = [
        String::new(),
        "not a token".to_string(),
        "a.b".to_string(),
        "a.b.c.d".to_string(),
        format!("{}.{}", p[0], p[1]),
        format!("{good}.x"),
        format!("!!!.{}.{}", p[1], p[2]),
        format!("{}.{}.{}", p[0], B64.encode("not json"), p[2]),
        format!(
            "{}.{}.{}",
            p[0],
            encode_json(&serde_json::json!({"sub": "east"})),
            p[2]
        ),
        format!("{}.{}.{}=", p[0], p[1], p[2]),
        format!(
            "{}.{}.{}",
            encode_json(&serde_json::json!({"alg": "EdDSA"})),
            p[1],
            p[2]
        ),
        long,
    ];
    for case in cases {
        let err = token::verify(&case, &[key.public()], at(T0)).unwrap_err();
        assert!(matches!(err, Error::Malformed(_)), "{case:?} gave {err:?}");
        assert!(
            err.to_string().starts_with("malformed zone token: "),
            "{err}"
        );
    }
    // An unknown scope in otherwise good claims is malformed too.
    let mut claims = decode_json(&p[1]);
    claims["scope"] = "admin".into();
    let t = format!("{}.{}.{}", p[0], encode_json(&claims), p[2]);
    assert!(matches!(
        token::verify(&t, &[key.public()], at(T0)),
        Err(Error::Malformed(m)) if m.contains("admin")
    ));
}

#[test]
fn other_algorithms_are_refused() {
    let key = SigningKey::generate();
    let p = parts(&mk_token(&key));
    for alg in ["none", "HS256", "RS256", "ES256", "eddsa"] {
        let header = serde_json::json!({"alg": alg, "typ": "JWT", "kid": key.key_id()});
        for sig in [p[2].as_str(), ""] {
            let t = format!("{}.{}.{sig}", encode_json(&header), p[1]);
            assert_eq!(
                token::verify(&t, &[key.public()], at(T0)),
                Err(Error::Algorithm(alg.into())),
                "alg {alg}"
            );
        }
    }
}

#[test]
fn a_signed_token_for_an_invalid_zone_is_refused() {
    // Only reachable with the signing key, e.g. a token made by an older, laxer issuer.
    let key = SigningKey::generate();
    let good = mk_token(&key);
    let mut claims = decode_json(&parts(&good)[1]);
    claims["sub"] = "East_1".into();
    let header = parts(&good)[0].clone();
    let signed = format!("{header}.{}", encode_json(&claims));
    // Re-sign through ring directly with the same PKCS#8 key.
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(key.to_pkcs8()).unwrap();
    let t = format!("{signed}.{}", B64.encode(pair.sign(signed.as_bytes())));
    let err = token::verify(&t, &[key.public()], at(T0)).unwrap_err();
    assert!(matches!(err, Error::Zone(_)), "{err:?}");
    assert!(err.to_string().contains("\"East_1\""), "{err}");
}

#[test]
fn valid_for_takes_go_durations() {
    let d: weft_core::validate::Duration = "720h".parse().unwrap();
    let key = SigningKey::generate();
    let (_, c) = key.issue("east", Scope::Zone, d.as_std(), at(T0)).unwrap();
    assert_eq!(c.exp, T0 + 30 * 86400);
    assert_eq!(token::rfc3339(c.exp), "2027-02-14T08:00:00Z");
}
