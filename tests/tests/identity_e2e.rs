//! Mesh identity across planes, end to end: real `weft-global` on real PostgreSQL makes a
//! mesh's root CA, a real `weft-zone` obtains its intermediate CA over KDS from a CSR, and
//! the root's private key is nowhere on the zone's side. Every outcome is awaited by polling
//! with a deadline.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use weft_core::Kind;
use weft_core::pki;
use weft_core::store::Store as _;
use weft_global::pg::testing::TestDb;
use weft_proto::kds::v1 as pb;
use weft_tests::{Backend, Global, Zone, eventually};
use weft_zone::identity;
use x509_parser::prelude::{FromDer as _, X509Certificate};

const SYNC: Duration = Duration::from_secs(30);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn postgres_global() -> (TestDb, Global) {
    let db = TestDb::create().await.unwrap();
    let g = Global::start(Backend::Postgres(db.url().to_string()))
        .await
        .unwrap();
    (db, g)
}

/// A Mesh with builtin mTLS (backend `ca-1`).
fn mtls_mesh(name: &str) -> Value {
    json!({"type": "Mesh", "name": name, "spec": {"mtls": {"enabledBackend": "ca-1", "backends": [{"name": "ca-1", "type": "builtin"}]}}})
}

/// The root CA global keeps for `mesh`: (cert PEM, key PEM), read from its store.
async fn stored_root(db: &TestDb, mesh: &str) -> (String, String) {
    let store = db.store(CancellationToken::new()).await.unwrap();
    let raw = store
        .system_get(&weft_global::mesh_ca::key(mesh, "ca-1"))
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("global stored no root CA for mesh {mesh}"));
    let v: Value = serde_json::from_str(&raw).unwrap();
    (
        v["certPem"].as_str().unwrap().to_string(),
        v["keyPem"].as_str().unwrap().to_string(),
    )
}

fn der(pem: &str) -> Vec<u8> {
    let certs = pki::certs_from_pem(pem).unwrap();
    assert_eq!(certs.len(), 1, "one certificate in {pem}");
    certs[0].as_ref().to_vec()
}

fn cn(cert: &X509Certificate<'_>) -> String {
    cert.subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string()
}

/// Check `intermediate` is a CA (path length 0) for `mesh` and zone `zone`, issued by `root`
/// and signed with the root's key.
fn check_chain(intermediate_pem: &str, root_pem: &str, mesh: &str, zone: &str) {
    let (i_der, r_der) = (der(intermediate_pem), der(root_pem));
    let (_, inter) = X509Certificate::from_der(&i_der).unwrap();
    let (_, root) = X509Certificate::from_der(&r_der).unwrap();
    assert_eq!(cn(&inter), format!("weft {mesh} zone {zone} CA"));
    assert_eq!(cn(&root), format!("weft {mesh} root CA"));
    assert_eq!(inter.issuer(), root.subject());
    let bc = inter.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca && bc.path_len_constraint == Some(0), "{bc:?}");
    let san = inter.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(
        format!("{:?}", san.general_names),
        format!("[URI(\"spiffe://{mesh}\")]")
    );
    // The signature over the intermediate's body checks with the root's public key.
    let root_key = ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_ASN1,
        root.public_key().subject_public_key.data.as_ref(),
    );
    root_key
        .verify(
            inter.tbs_certificate.as_ref(),
            inter.signature_value.data.as_ref(),
        )
        .expect("the intermediate is signed by the mesh root");
}

/// The base64 lines of a PEM body (no BEGIN/END lines).
fn pem_body_lines(pem: &str) -> Vec<&str> {
    pem.lines()
        .filter(|l| !l.starts_with("-----") && !l.trim().is_empty())
        .collect()
}

/// Fail if `text` (from `what`) holds any private key or any line of `root_key`.
fn assert_no_key(what: &str, text: &str, root_key: &str) {
    assert!(
        !text.contains("PRIVATE KEY"),
        "{what} holds a private key:\n{text}"
    );
    for line in pem_body_lines(root_key) {
        assert!(
            !text.contains(line),
            "{what} holds part of the root key:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_gets_an_intermediate_chained_to_the_mesh_root_and_never_the_root_key() {
    let _serial = SERIAL.lock().await;
    let (db, mut g) = postgres_global().await;
    g.api().apply(&[mtls_mesh("secure")]).await.unwrap();
    let a = Zone::join("a", &g, &[]).await.unwrap();

    let item = eventually("zone a's intermediate CA for mesh secure", SYNC, || async {
        let v = a.api().get("/_identity/meshes").await.ok()??;
        v["items"]
            .as_array()?
            .iter()
            .find(|i| i["mesh"] == "secure")
            .cloned()
    })
    .await;
    assert_eq!(item["zone"], "a", "{item}");
    assert_eq!(item["spiffeTrustDomain"], "spiffe://secure", "{item}");
    assert!(
        item["notAfter"].as_str().is_some_and(|s| s.len() >= 20),
        "{item}"
    );
    let intermediate = item["intermediate"].as_str().unwrap();
    let root = item["root"].as_str().unwrap();
    check_chain(intermediate, root, "secure", "a");

    // The root the zone holds is the one global keeps; its key is global's alone.
    let (root_cert, root_key) = stored_root(&db, "secure").await;
    assert_eq!(root, root_cert);
    assert!(
        root_key.contains("PRIVATE KEY"),
        "the stored key is a PEM key"
    );

    // Only meshes with builtin mTLS get one: not `default`.
    let listed = a.api().get("/_identity/meshes").await.unwrap().unwrap();
    let meshes: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["mesh"].as_str().unwrap())
        .collect();
    assert_eq!(meshes, ["secure"]);

    // No private key, and nothing of the root key, in any answer of the zone's API...
    let mut paths: Vec<String> = [
        "/_identity/meshes",
        "/meshes",
        "/meshes/secure",
        "/_inspect/meshes",
        "/metrics",
        "/openapi.json",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    paths.extend(Kind::ALL.iter().map(|k| format!("/{}", k.plural())));
    for p in &paths {
        let r = a.api().req(Method::GET, p).send().await.unwrap();
        assert!(r.status().is_success(), "GET {p} on zone a: {}", r.status());
        let text = r.text().await.unwrap();
        assert_no_key(&format!("zone a: GET {p}"), &text, &root_key);
    }
    // ... nor in its log or its data dir; nor in global's answers about the mesh.
    assert_no_key("zone a's log", &a.logs(), &root_key);
    // The only keys there are the zone's own data-plane TLS keys (its CA for the API proxies
    // dial, and the server's): not the root's, and not any CA of the mesh.
    let mut own_keys = Vec::new();
    for entry in std::fs::read_dir(a.data_dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("dataplane-") && name.ends_with("-key.pem") {
            own_keys.push(name.clone());
            for line in pem_body_lines(&root_key) {
                assert!(!text.contains(line), "{name} holds part of the root key");
            }
        } else {
            assert_no_key(&path.display().to_string(), &text, &root_key);
        }
    }
    own_keys.sort();
    assert_eq!(
        own_keys,
        ["dataplane-ca-key.pem", "dataplane-server-key.pem"],
        "unexpected key files in the zone's data dir"
    );
    for p in ["/meshes", "/meshes/secure", "/_inspect/zones"] {
        let text = g
            .api()
            .req(Method::GET, p)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_no_key(&format!("global: GET {p}"), &text, &root_key);
    }
    // Global logged the issuance.
    let logs = g.logs();
    assert!(
        logs.lines().any(|l| l.contains("issued an intermediate CA")
            && l.contains("zone=a")
            && l.contains("mesh=secure")
            && l.contains("not_after")),
        "{logs}"
    );

    // A second mesh with mTLS applied later gets its own intermediate, under its own root.
    g.api().apply(&[mtls_mesh("payments")]).await.unwrap();
    let pay = eventually(
        "zone a's intermediate CA for mesh payments",
        SYNC,
        || async {
            let v = a.api().get("/_identity/meshes").await.ok()??;
            v["items"]
                .as_array()?
                .iter()
                .find(|i| i["mesh"] == "payments")
                .cloned()
        },
    )
    .await;
    check_chain(
        pay["intermediate"].as_str().unwrap(),
        pay["root"].as_str().unwrap(),
        "payments",
        "a",
    );
    assert_ne!(pay["root"], item["root"]);
    assert_eq!(
        pay["root"].as_str().unwrap(),
        stored_root(&db, "payments").await.0
    );

    // With global gone, the zone keeps what it has.
    g.kill9();
    eventually("zone a disconnected", SYNC, || async {
        (a.connected().await == Some(false)).then_some(())
    })
    .await;
    let held = a.api().get("/_identity/meshes").await.unwrap().unwrap();
    let held: Vec<&Value> = held["items"].as_array().unwrap().iter().collect();
    assert_eq!(held.len(), 2, "{held:?}");
    assert!(
        held.iter()
            .any(|i| i["intermediate"] == item["intermediate"])
    );
}

/// Call SignIntermediate as `zone` (the `weft-zone` header) with `token`.
async fn sign(
    g: &Global,
    token: &str,
    zone: &str,
    mesh: &str,
    csr: &str,
) -> Result<pb::SignIntermediateResponse, tonic::Status> {
    let channel = weft_zone::kds::connect(
        &g.kds_address(),
        &weft_zone::kds::Trust::CaFile(g.ca_file()),
    )
    .await
    .unwrap();
    identity::sign(
        pb::kds_client::KdsClient::new(channel),
        token,
        zone,
        mesh,
        csr,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_signs_only_for_the_token_zone_and_only_meshes_with_builtin_mtls() {
    let _serial = SERIAL.lock().await;
    let (_db, g) = postgres_global().await;
    g.api()
        .apply(&[
            mtls_mesh("secure"),
            json!({"type": "Mesh", "name": "provided", "spec": {"mtls": {"enabledBackend": "p", "backends": [{"name": "p", "type": "provided"}]}}}),
        ])
        .await
        .unwrap();
    let token_b = g.zone_token("b", "1h").await.unwrap().token;
    let key = pki::new_key().unwrap();
    let csr_b = pki::intermediate_csr("secure", "b", &key).unwrap();
    let csr_a = pki::intermediate_csr("secure", "a", &key).unwrap();

    // The control: zone b with its own token and its own CSR gets a working intermediate.
    let ok = sign(&g, &token_b, "b", "secure", &csr_b).await.unwrap();
    let ca = pki::IntermediateCa::from_pem(&ok.cert_pem, &key, &ok.root_pem).unwrap();
    assert_eq!((ca.mesh(), ca.zone()), ("secure", "b"));
    assert!(
        ok.not_after_unix > chrono_now() + 300 * 24 * 3600,
        "{}",
        ok.not_after_unix
    );

    // Zone b's token, calling itself zone a: refused before anything is signed.
    let e = sign(&g, &token_b, "a", "secure", &csr_a).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("the zone token is for zone \"b\""),
        "{e:?}"
    );
    // Zone b's token with a CSR naming zone a: refused.
    let e = sign(&g, &token_b, "b", "secure", &csr_a).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("refused") && e.message().contains("zone a"),
        "{e:?}"
    );
    // No token at all.
    let e = sign(&g, "", "b", "secure", &csr_b).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

    // Meshes without builtin mTLS, and meshes that do not exist.
    let csr = |mesh| pki::intermediate_csr(mesh, "b", &key).unwrap();
    let e = sign(&g, &token_b, "b", "default", &csr("default"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert_eq!(
        e.message(),
        "zone b: mesh \"default\" has no mTLS enabled (set spec.mtls.enabledBackend to a backend of type builtin)"
    );
    let e = sign(&g, &token_b, "b", "provided", &csr("provided"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("of type provided"), "{e:?}");
    let e = sign(&g, &token_b, "b", "nope", &csr("nope"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");

    // A zone whose token is for another zone gets no intermediate, end to end.
    let imposter = Zone::builder("a")
        .global(&g)
        .token(&token_b)
        .start()
        .await
        .unwrap();
    imposter
        .wait_log("the zone token is for zone \"b\"", SYNC)
        .await;
    let v = imposter
        .api()
        .get("/_identity/meshes")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v["items"], json!([]), "{v}");
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
