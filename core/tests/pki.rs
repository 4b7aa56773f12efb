//! The identity model's certificates: root → intermediate (via CSR) → workload (via CSR), and
//! what verification refuses.

use std::time::{Duration, SystemTime};

use weft_core::pki::{self, IntermediateCa, RootCa, SpiffeId};
use x509_parser::extensions::GeneralName;

const DAY: Duration = Duration::from_secs(24 * 3600);
const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// A mesh root and zone `east`'s intermediate for it, made the way global and the zone do:
/// the zone's key stays with the zone, global sees only the CSR.
fn mk_mesh(mesh: &str) -> (RootCa, IntermediateCa) {
    let root = RootCa::generate(mesh, 10 * YEAR).unwrap();
    let zone_key = pki::new_key().unwrap();
    let csr = pki::intermediate_csr(mesh, "east", &zone_key).unwrap();
    let cert = root.sign_intermediate(&csr, "east", YEAR).unwrap();
    let ca = IntermediateCa::from_pem(&cert, &zone_key, root.cert_pem()).unwrap();
    (root, ca)
}

fn mk_workload(ca: &IntermediateCa, service: &str, now: SystemTime) -> (pki::WorkloadCert, String) {
    let key = pki::new_key().unwrap();
    let csr = pki::workload_csr(ca.mesh(), service, &key).unwrap();
    let cert = ca
        .issue_workload(
            &csr,
            ca.mesh(),
            service,
            pki::DEFAULT_WORKLOAD_VALIDITY,
            now,
        )
        .unwrap();
    (cert, key)
}

fn der_of(pem: &str) -> Vec<u8> {
    pki::certs_from_pem(pem).unwrap()[0].to_vec()
}

fn uri_sans(der: &[u8]) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.subject_alternative_name()
        .unwrap()
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
        .unwrap_or_default()
}

fn basic_constraints(der: &[u8]) -> Option<(bool, Option<u32>)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.basic_constraints()
        .unwrap()
        .map(|bc| (bc.value.ca, bc.value.path_len_constraint))
}

#[test]
fn chain_verifies_and_names_the_service() {
    let (root, ca) = mk_mesh("default");
    let now = SystemTime::now();
    let (cert, _) = mk_workload(&ca, "backend", now);
    assert_eq!(cert.id.to_string(), "spiffe://default/backend");
    assert_eq!(pki::certs_from_pem(&cert.chain_pem).unwrap().len(), 2);
    assert!(cert.chain_pem.starts_with(&cert.cert_pem));
    let id = pki::verify_workload_pem(&cert.chain_pem, root.cert_pem(), now).unwrap();
    assert_eq!(id, SpiffeId::parse("spiffe://default/backend").unwrap());
    // The zone hands proxies the root it was given.
    let id = pki::verify_workload_pem(&cert.chain_pem, ca.root_pem(), now).unwrap();
    assert_eq!(id.service, "backend");
    // Default validity is 24h (plus the backdating for clock skew).
    let life = cert.not_after.duration_since(cert.not_before).unwrap();
    assert_eq!(life, DAY + pki::CLOCK_SKEW);
    assert_eq!(
        uri_sans(&der_of(&cert.cert_pem)),
        ["spiffe://default/backend"]
    );
    // Without the intermediate the workload does not chain to the root.
    let e = pki::verify_workload_pem(&cert.cert_pem, root.cert_pem(), now).unwrap_err();
    assert!(e.to_string().contains("does not chain"), "{e}");
}

#[test]
fn another_meshs_workload_is_not_trusted() {
    let (root, _) = mk_mesh("default");
    let (other_root, other_ca) = mk_mesh("other");
    let now = SystemTime::now();
    let (cert, _) = mk_workload(&other_ca, "backend", now);
    assert!(pki::verify_workload_pem(&cert.chain_pem, other_root.cert_pem(), now).is_ok());
    let e = pki::verify_workload_pem(&cert.chain_pem, root.cert_pem(), now).unwrap_err();
    assert!(matches!(e, pki::Error::Untrusted { .. }), "{e}");

    // Another mesh's intermediate does not load against this mesh's root.
    let zone_key = pki::new_key().unwrap();
    let csr = pki::intermediate_csr("other", "east", &zone_key).unwrap();
    let cert = other_root.sign_intermediate(&csr, "east", YEAR).unwrap();
    assert!(IntermediateCa::from_pem(&cert, &zone_key, other_root.cert_pem()).is_ok());
    let e = IntermediateCa::from_pem(&cert, &zone_key, root.cert_pem()).unwrap_err();
    assert!(e.to_string().contains("its root is mesh default's"), "{e}");
    // And an intermediate does not issue for a mesh it is not for.
    let key = pki::new_key().unwrap();
    let csr = pki::workload_csr("default", "backend", &key).unwrap();
    let e = other_ca
        .issue_workload(&csr, "default", "backend", DAY, now)
        .unwrap_err();
    assert!(e.to_string().contains("is for mesh other"), "{e}");
}

#[test]
fn expired_workload_is_refused() {
    let (root, ca) = mk_mesh("default");
    let now = SystemTime::now();
    let key = pki::new_key().unwrap();
    let csr = pki::workload_csr("default", "backend", &key).unwrap();
    let past = now - 3 * 3600 * Duration::from_secs(1);
    let cert = ca
        .issue_workload(&csr, "default", "backend", Duration::from_secs(3600), past)
        .unwrap();
    let e = pki::verify_workload_pem(&cert.chain_pem, root.cert_pem(), now).unwrap_err();
    assert!(e.to_string().contains("expired"), "{e}");
    assert!(matches!(e, pki::Error::Untrusted { .. }), "{e}");

    // One issued for later (beyond the clock-skew backdating) is not valid yet.
    let later = now + 2 * pki::CLOCK_SKEW;
    let cert = ca
        .issue_workload(&csr, "default", "backend", DAY, later)
        .unwrap();
    let e = pki::verify_workload_pem(&cert.chain_pem, root.cert_pem(), now).unwrap_err();
    assert!(e.to_string().contains("not valid yet"), "{e}");
    assert!(pki::verify_workload_pem(&cert.chain_pem, root.cert_pem(), later).is_ok());

    // Nor is anything once the mesh's root has expired.
    let e =
        pki::verify_workload_pem(&cert.chain_pem, root.cert_pem(), now + 11 * YEAR).unwrap_err();
    assert!(
        e.to_string()
            .contains("root CA of mesh default is not valid"),
        "{e}"
    );
}

#[test]
fn workload_never_outlives_its_intermediate() {
    let root = RootCa::generate("default", YEAR).unwrap();
    let key = pki::new_key().unwrap();
    let csr = pki::intermediate_csr("default", "east", &key).unwrap();
    let cert = root
        .sign_intermediate(&csr, "east", Duration::from_secs(3600))
        .unwrap();
    let ca = IntermediateCa::from_pem(&cert, &key, root.cert_pem()).unwrap();
    let (w, _) = mk_workload(&ca, "backend", SystemTime::now());
    assert_eq!(w.not_after, ca.not_after());
    // An expired intermediate issues nothing.
    let csr = pki::workload_csr("default", "backend", &pki::new_key().unwrap()).unwrap();
    let e = ca
        .issue_workload(&csr, "default", "backend", DAY, SystemTime::now() + DAY)
        .unwrap_err();
    assert!(e.to_string().contains("expired; renew it"), "{e}");
}

#[test]
fn csr_cannot_choose_its_identity() {
    let (root, ca) = mk_mesh("default");
    let now = SystemTime::now();
    let key = pki::new_key().unwrap();
    // The proxy of `web` asks for `backend`'s identity...
    let csr = pki::workload_csr("default", "backend", &key).unwrap();
    // ...but its zone knows it is `web`.
    let cert = ca.issue_workload(&csr, "default", "web", DAY, now).unwrap();
    assert_eq!(uri_sans(&der_of(&cert.cert_pem)), ["spiffe://default/web"]);
    let id = pki::verify_workload_pem(&cert.chain_pem, root.cert_pem(), now).unwrap();
    assert_eq!(id.to_string(), "spiffe://default/web");

    // A hand-made CSR with extra names and CA:true gets the same end-entity certificate.
    let mut p = rcgen::CertificateParams::new(vec!["evil.example.com".to_string()]).unwrap();
    p.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://default/admin".to_string().try_into().unwrap(),
    ));
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let kp = rcgen::KeyPair::from_pem(&key).unwrap();
    let csr = p.serialize_request(&kp).unwrap().pem().unwrap();
    let cert = ca.issue_workload(&csr, "default", "web", DAY, now).unwrap();
    let der = der_of(&cert.cert_pem);
    assert_eq!(uri_sans(&der), ["spiffe://default/web"]);
    let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
    let names = parsed.subject_alternative_name().unwrap().unwrap();
    assert_eq!(names.value.general_names.len(), 1, "only the SPIFFE ID");
    assert_eq!(basic_constraints(&der), Some((false, None)));
    let eku = parsed.extended_key_usage().unwrap().unwrap();
    assert!(eku.value.server_auth && eku.value.client_auth);
    let ku = parsed.key_usage().unwrap().unwrap();
    assert!(ku.value.digital_signature() && !ku.value.key_cert_sign());
}

#[test]
fn bad_csrs_are_refused() {
    let (root, ca) = mk_mesh("default");
    let now = SystemTime::now();
    let key = pki::new_key().unwrap();

    // A P-384 key is not what weft issues for.
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    let csr = p.serialize_request(&p384).unwrap().pem().unwrap();
    let e = ca
        .issue_workload(&csr, "default", "web", DAY, now)
        .unwrap_err();
    assert!(e.to_string().contains("not ECDSA P-256"), "{e}");
    let e = root.sign_intermediate(&csr, "east", YEAR).unwrap_err();
    assert!(e.to_string().contains("not ECDSA P-256"), "{e}");

    // A CSR whose signature does not match its key (one byte of the signature changed).
    let csr = pki::workload_csr("default", "web", &key).unwrap();
    let mut der = pki_types_csr_der(&csr);
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let tampered = pem("CERTIFICATE REQUEST", &der);
    let e = ca
        .issue_workload(&tampered, "default", "web", DAY, now)
        .unwrap_err();
    assert!(matches!(e, pki::Error::Refused { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("workload CSR for spiffe://default/web"),
        "{e}"
    );

    // Garbage.
    let e = ca
        .issue_workload("nope", "default", "web", DAY, now)
        .unwrap_err();
    assert!(matches!(e, pki::Error::Malformed { .. }), "{e}");

    // An intermediate CSR for another zone or mesh is refused.
    let zone_key = pki::new_key().unwrap();
    let csr = pki::intermediate_csr("default", "west", &zone_key).unwrap();
    let e = root.sign_intermediate(&csr, "east", YEAR).unwrap_err();
    assert!(
        e.to_string()
            .contains("intermediate CSR for zone east of mesh default"),
        "{e}"
    );
    assert!(
        e.to_string().contains("\"weft default zone west CA\""),
        "{e}"
    );
    let csr = pki::intermediate_csr("other", "east", &zone_key).unwrap();
    assert!(root.sign_intermediate(&csr, "east", YEAR).is_err());
    // So is the root's own key.
    let csr = pki::intermediate_csr("default", "east", &root.key_pem()).unwrap();
    let e = root.sign_intermediate(&csr, "east", YEAR).unwrap_err();
    assert!(e.to_string().contains("root CA's own"), "{e}");
}

#[test]
fn only_the_intermediate_signs_workloads() {
    let (root, ca) = mk_mesh("default");
    let now = SystemTime::now();
    let ders: Vec<_> = [root.cert_pem(), ca.cert_pem()]
        .iter()
        .map(|p| der_of(p))
        .collect();
    assert_eq!(basic_constraints(&ders[0]), Some((true, Some(1))));
    assert_eq!(basic_constraints(&ders[1]), Some((true, Some(0))));
    let (_, root_cert) = x509_parser::parse_x509_certificate(&ders[0]).unwrap();
    assert_eq!(
        root_cert
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap(),
        "weft default root CA"
    );
    let (_, int_cert) = x509_parser::parse_x509_certificate(&ders[1]).unwrap();
    let cn = int_cert.subject().iter_common_name().next().unwrap();
    assert_eq!(cn.as_str().unwrap(), "weft default zone east CA");

    // A workload signs a "certificate" with its own key, as if it were a CA.
    let (cert, key) = mk_workload(&ca, "backend", now);
    let kp = rcgen::KeyPair::from_pem(&key).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&cert.cert_pem, &kp).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://default/admin".to_string().try_into().unwrap(),
    )];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    let forged_key = rcgen::KeyPair::generate().unwrap();
    let forged = p.signed_by(&forged_key, &issuer).unwrap();
    let chain = format!("{}{}", forged.pem(), cert.chain_pem);
    let e = pki::verify_workload_pem(&chain, root.cert_pem(), now).unwrap_err();
    assert!(matches!(e, pki::Error::Untrusted { .. }), "{e}");
    assert!(
        e.to_string().contains("workload certificate used as a CA"),
        "{e}"
    );

    // An intermediate presented as a workload certificate is refused too.
    let e = pki::verify_workload_pem(ca.cert_pem(), root.cert_pem(), now).unwrap_err();
    assert!(matches!(e, pki::Error::Untrusted { .. }), "{e}");
}

#[test]
fn the_zone_never_sees_the_root_key() {
    let root = RootCa::generate("default", 10 * YEAR).unwrap();
    let secret = private_scalar(&root.key_pem());
    assert_eq!(secret.len(), 32);

    // Everything the zone holds: its key and CSR, the certificate global returns, the root's
    // certificate. Signing took only the CSR.
    let zone_key = pki::new_key().unwrap();
    let csr = pki::intermediate_csr("default", "east", &zone_key).unwrap();
    let cert = root.sign_intermediate(&csr, "east", YEAR).unwrap();
    let ca = IntermediateCa::from_pem(&cert, &zone_key, root.cert_pem()).unwrap();
    let (workload, _) = mk_workload(&ca, "backend", SystemTime::now());
    for (name, pem_text) in [
        ("zone key", zone_key.as_str()),
        ("intermediate CSR", csr.as_str()),
        ("intermediate certificate", cert.as_str()),
        ("root certificate", ca.root_pem()),
        ("workload chain", workload.chain_pem.as_str()),
    ] {
        assert!(
            !pem_text.contains("PRIVATE KEY") || name == "zone key",
            "{name}"
        );
        for block in pem_blocks(pem_text) {
            assert!(
                !contains(&block, &secret),
                "{name} holds the root's private key"
            );
        }
    }
    assert_ne!(private_scalar(&zone_key), secret);
    // A zone's intermediate key is not a root key either: it cannot load as one.
    assert!(RootCa::from_pem(root.cert_pem(), &zone_key).is_err());
    // The root itself round-trips through PEM and keeps signing.
    let again = RootCa::from_pem(root.cert_pem(), &root.key_pem()).unwrap();
    assert_eq!(again.mesh(), "default");
    let csr = pki::intermediate_csr("default", "west", &pki::new_key().unwrap()).unwrap();
    assert!(again.sign_intermediate(&csr, "west", YEAR).is_ok());
}

#[test]
fn renew_at_seventy_percent() {
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    assert_eq!(
        pki::renew_at(start, start + Duration::from_secs(1000)),
        start + Duration::from_secs(700)
    );
    assert_eq!(
        pki::renew_at(start, start + DAY),
        start + Duration::from_secs(24 * 36 * 70)
    );
    assert_eq!(pki::renew_at(start, start - DAY), start);
    let (_, ca) = mk_mesh("default");
    let (cert, _) = mk_workload(&ca, "backend", SystemTime::now());
    let life = cert.not_after.duration_since(cert.not_before).unwrap();
    assert_eq!(cert.renew_at(), cert.not_before + life * 7 / 10);
}

#[test]
fn spiffe_id_round_trip_and_bad_inputs() {
    for s in [
        "spiffe://default/backend",
        "spiffe://mesh-1.prod/web_v2.svc",
    ] {
        let id: SpiffeId = s.parse().unwrap();
        assert_eq!(id.to_string(), s);
    }
    let id = SpiffeId::parse("spiffe://default/backend").unwrap();
    assert_eq!(
        (id.mesh.as_str(), id.service.as_str()),
        ("default", "backend")
    );
    for bad in [
        "",
        "default/backend",
        "https://default/backend",
        "spiffe://default",
        "spiffe://default/",
        "spiffe:///backend",
        "spiffe://Default/backend",
        "spiffe://default/a/b",
        "spiffe://default/..",
        "spiffe://default/back end",
        "spiffe://default:443/backend",
        "spiffe://user@default/backend",
        "spiffe://default/backend?x=1",
        "spiffe://default/backend#x",
    ] {
        let e = SpiffeId::parse(bad).unwrap_err();
        assert!(e.to_string().starts_with("SPIFFE ID"), "{bad}: {e}");
        assert!(
            e.to_string().contains("spiffe://default/backend"),
            "{bad}: {e}"
        );
    }
    assert!(pki::workload_csr("default", "a/b", &pki::new_key().unwrap()).is_err());
    assert!(RootCa::generate("Bad Mesh", YEAR).is_err());
}

// --- helpers -----------------------------------------------------------------------------

/// The DER contents of every PEM block in `text`.
fn pem_blocks(text: &str) -> Vec<Vec<u8>> {
    use base64::Engine as _;
    let mut out = Vec::new();
    let mut body: Option<String> = None;
    for line in text.lines() {
        if line.starts_with("-----BEGIN ") {
            body = Some(String::new());
        } else if line.starts_with("-----END ") {
            let b = body.take().expect("END after BEGIN");
            out.push(base64::engine::general_purpose::STANDARD.decode(b).unwrap());
        } else if let Some(b) = body.as_mut() {
            b.push_str(line.trim());
        }
    }
    assert!(!out.is_empty(), "no PEM block in {text:?}");
    out
}

fn pem(tag: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    format!("-----BEGIN {tag}-----\n{b64}\n-----END {tag}-----\n")
}

fn pki_types_csr_der(csr_pem: &str) -> Vec<u8> {
    pem_blocks(csr_pem).remove(0)
}

/// The 32-byte private scalar inside a P-256 PKCS#8 key (`ECPrivateKey`: version 1, then an
/// OCTET STRING of 32 bytes).
fn private_scalar(key_pem: &str) -> Vec<u8> {
    let der = pem_blocks(key_pem).remove(0);
    let marker = [0x02, 0x01, 0x01, 0x04, 0x20];
    let at = der
        .windows(marker.len())
        .position(|w| w == marker)
        .expect("an ECPrivateKey");
    der[at + marker.len()..at + marker.len() + 32].to_vec()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
