//! Zone tokens and KDS TLS material on global: the `/_tokens` API served in-process on
//! 127.0.0.1:0 (two replicas sharing one store, memory and PostgreSQL), revocation seen
//! across replicas, and the KDS certificate chain checked by rustls in a real handshake.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use weft_core::store::{Memory, Store};
use weft_core::token::{self, Scope};
use weft_global::config::Config;
use weft_global::kds_tls;
use weft_global::tokens::{self, Tokens};

// ---------------------------------------------------------------------------------------
// Harness

#[derive(Clone, Copy)]
enum Backend {
    Memory,
    Postgres,
}

async fn mk_store(backend: Backend) -> Arc<dyn Store> {
    match backend {
        Backend::Memory => Arc::new(Memory::new()),
        Backend::Postgres => Arc::new(
            weft_global::pg::testing::TestStore::create()
                .await
                .expect("test database"),
        ),
    }
}

/// One global replica serving on 127.0.0.1:0.
struct Replica {
    url: String,
    shutdown: CancellationToken,
    dir: tempfile::TempDir,
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start(store: Arc<dyn Store>) -> Replica {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    tokio::spawn(weft_global::serve(cfg, store, listener, shutdown.clone()));
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(r) = http.get(format!("{url}/readyz")).send().await
            && r.status() == StatusCode::OK
        {
            break;
        }
        assert!(Instant::now() < deadline, "replica did not become ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Replica { url, shutdown, dir }
}

struct Api {
    http: reqwest::Client,
    token: String,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        url: String,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn post(&self, r: &Replica, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(
            reqwest::Method::POST,
            format!("{}{path}", r.url),
            Some(body),
        )
        .await
    }

    async fn get(&self, r: &Replica, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::GET, format!("{}{path}", r.url), None)
            .await
    }
}

fn read_token(r: &Replica, role: &str) -> String {
    std::fs::read_to_string(r.dir.path().join(format!("{role}-token")))
        .unwrap()
        .trim()
        .to_string()
}

macro_rules! on_both_stores {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $case() { super::$case(super::Backend::Memory).await } )*
        }
        mod postgres {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $case() { super::$case(super::Backend::Postgres).await } )*
        }
    };
}

on_both_stores!(
    issue_verify_revoke_across_replicas,
    bad_requests_name_the_field,
    roles_apply_to_token_routes,
    signing_key_is_made_once,
    kds_material_is_shared_and_stable,
);

// ---------------------------------------------------------------------------------------
// Zone tokens

async fn issue_verify_revoke_across_replicas(backend: Backend) {
    let store = mk_store(backend).await;
    let a = start(store.clone()).await;
    let b = start(store.clone()).await;
    let api = Api {
        http: reqwest::Client::new(),
        token: read_token(&a, "admin"),
    };
    // What the KDS server of a third replica would hold.
    let kds = Tokens::bootstrap(store.clone()).await.unwrap();

    let (status, body) = api
        .post(
            &a,
            "/_tokens/zone",
            json!({"zone": "east", "scope": "ingress", "validFor": "24h"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let tok = body["token"].as_str().unwrap();
    let id = body["id"].as_str().unwrap();
    assert_eq!(
        (body["zone"].as_str(), body["scope"].as_str()),
        (Some("east"), Some("ingress"))
    );
    let claims = kds.verify(tok).await.unwrap();
    assert_eq!(
        (claims.sub.as_str(), claims.scope, claims.jti.as_str()),
        ("east", Scope::Ingress, id)
    );
    assert_eq!(claims.exp - claims.iat, 24 * 3600);
    assert_eq!(
        body["expiresAt"].as_str().unwrap(),
        token::rfc3339(claims.exp)
    );
    let expires =
        chrono::DateTime::parse_from_rfc3339(body["expiresAt"].as_str().unwrap()).unwrap();
    let left = expires.timestamp() - chrono::Utc::now().timestamp();
    assert!((24 * 3600 - 60..=24 * 3600).contains(&left), "{left}");

    // Defaults: scope zone, 720h.
    let (status, body) = api.post(&b, "/_tokens/zone", json!({"zone": "west"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let west = body["token"].as_str().unwrap().to_string();
    let west_claims = kds.verify(&west).await.unwrap();
    assert_eq!(
        (west_claims.scope, west_claims.exp - west_claims.iat),
        (Scope::Zone, 720 * 3600)
    );

    // Revoked through replica b: the KDS side refuses it on its next check, a refuses to
    // list it as anything but revoked, and the other token still works.
    let (status, body) = api.post(&b, "/_tokens/revoke", json!({"id": id})).await;
    assert_eq!((status, body), (StatusCode::OK, json!({})));
    let err = kds.verify(tok).await.unwrap_err();
    assert!(matches!(err, tokens::Error::Revoked { .. }), "{err:?}");
    assert!(!err.is_transient());
    assert!(
        err.to_string().starts_with(&format!(
            "zone token {id} for zone \"east\" was revoked at "
        )),
        "{err}"
    );
    kds.verify(&west).await.unwrap();
    let (status, body) = api.get(&a, "/_tokens/revoked").await;
    assert_eq!(status, StatusCode::OK);
    let items = body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{body}");
    assert_eq!(items[0]["id"].as_str(), Some(id));
    assert!(chrono::DateTime::parse_from_rfc3339(items[0]["revokedAt"].as_str().unwrap()).is_ok());

    // Revoking again is fine and lists it once.
    let (status, _) = api.post(&a, "/_tokens/revoke", json!({"id": id})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(kds.revoked().await.unwrap().len(), 1);

    // Expiry as the KDS server sees it later on.
    let later = SystemTime::now() + Duration::from_secs(721 * 3600);
    assert!(matches!(
        kds.verify_at(&west, later).await,
        Err(tokens::Error::Token(token::Error::Expired { .. }))
    ));

    // A token from another global (another store, another key) is unknown here.
    let other = Tokens::bootstrap(mk_store(Backend::Memory).await)
        .await
        .unwrap();
    let (foreign, _) = other
        .issue("east", Scope::Zone, Duration::from_secs(60))
        .unwrap();
    assert!(matches!(
        kds.verify(&foreign).await,
        Err(tokens::Error::Token(token::Error::UnknownKey { .. }))
    ));
}

async fn bad_requests_name_the_field(backend: Backend) {
    let store = mk_store(backend).await;
    let a = start(store.clone()).await;
    let api = Api {
        http: reqwest::Client::new(),
        token: read_token(&a, "admin"),
    };
    let cases = [
        (json!({"zone": "East"}), "zone"),
        (json!({"zone": ""}), "zone"),
        (json!({"scope": "zone"}), "zone"),
        (json!({"zone": "east", "scope": "mesh"}), "scope"),
        (json!({"zone": "east", "validFor": "30 days"}), "validFor"),
        (json!({"zone": "east", "validFor": "0s"}), "validFor"),
        (json!({"zone": "east", "validFor": 3600}), "validFor"),
        (json!({"zone": "east", "valid_for": "1h"}), "valid_for"),
    ];
    for (body, field) in cases {
        let (status, resp) = api.post(&a, "/_tokens/zone", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} gave {resp}");
        let fields: Vec<&str> = resp["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["field"].as_str().unwrap())
            .collect();
        assert_eq!(fields, [field], "{body} gave {resp}");
    }
    // Several problems at once are all reported.
    let (status, resp) = api
        .post(
            &a,
            "/_tokens/zone",
            json!({"zone": "A", "scope": "x", "validFor": "y"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(resp["errors"].as_array().unwrap().len(), 3, "{resp}");
    assert!(
        resp["detail"]
            .as_str()
            .unwrap()
            .contains("expected e.g. 720h"),
        "{resp}"
    );

    for id in ["", "nope", "0123456789ABCDEF0123456789ABCDEF"] {
        let (status, resp) = api.post(&a, "/_tokens/revoke", json!({"id": id})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{id:?}: {resp}");
        assert_eq!(resp["errors"][0]["field"], "id", "{resp}");
    }
    let (status, _) = api.post(&a, "/_tokens/revoke", json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let resp = api
        .http
        .post(format!("{}/_tokens/zone", a.url))
        .bearer_auth(&api.token)
        .body("zone: east")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    // Nothing was revoked by any of that.
    let (_, body) = api.get(&a, "/_tokens/revoked").await;
    assert_eq!(body, json!({"items": []}));
}

async fn roles_apply_to_token_routes(backend: Backend) {
    let store = mk_store(backend).await;
    let a = start(store).await;
    let http = reqwest::Client::new();
    let readonly = Api {
        http: http.clone(),
        token: read_token(&a, "readonly"),
    };
    let (status, _) = readonly
        .post(&a, "/_tokens/zone", json!({"zone": "east"}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = readonly
        .post(
            &a,
            "/_tokens/revoke",
            json!({"id": "0123456789abcdef0123456789abcdef"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = readonly.get(&a, "/_tokens/revoked").await;
    assert_eq!(status, StatusCode::OK);
    for path in ["/_tokens/zone", "/_tokens/revoke"] {
        let resp = http
            .post(format!("{}{path}", a.url))
            .json(&json!({"zone": "east"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    // A zone token is not an API token.
    let admin = Api {
        http,
        token: read_token(&a, "admin"),
    };
    let (_, body) = admin
        .post(&a, "/_tokens/zone", json!({"zone": "east"}))
        .await;
    let as_api = Api {
        http: admin.http.clone(),
        token: body["token"].as_str().unwrap().to_string(),
    };
    assert_eq!(
        as_api.get(&a, "/_tokens/revoked").await.0,
        StatusCode::UNAUTHORIZED
    );
}

async fn signing_key_is_made_once(backend: Backend) {
    let store = mk_store(backend).await;
    // Replicas starting at once agree on one key.
    let starts: Vec<_> = (0..4)
        .map(|_| tokio::spawn(Tokens::bootstrap(store.clone())))
        .collect();
    let mut keys = Vec::new();
    for s in starts {
        keys.push(s.await.unwrap().unwrap().verifying_keys());
    }
    assert!(keys.windows(2).all(|w| w[0] == w[1]), "{keys:?}");
    // A restart keeps it: tokens issued before verify after.
    let first = Tokens::bootstrap(store.clone()).await.unwrap();
    let (t, _) = first
        .issue("east", Scope::Egress, Duration::from_secs(60))
        .unwrap();
    drop(first);
    let again = Tokens::bootstrap(store.clone()).await.unwrap();
    assert_eq!(again.verifying_keys(), keys[0]);
    assert_eq!(again.verify(&t).await.unwrap().scope, Scope::Egress);
    let stored = store
        .system_get(tokens::SIGNING_KEY)
        .await
        .unwrap()
        .unwrap();
    assert!(!stored.is_empty());
}

// ---------------------------------------------------------------------------------------
// KDS TLS

async fn kds_material_is_shared_and_stable(backend: Backend) {
    let store = mk_store(backend).await;
    let starts: Vec<_> = (0..3)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { kds_tls::bootstrap(&*store, &[]).await })
        })
        .collect();
    let mut all = Vec::new();
    for s in starts {
        all.push(s.await.unwrap().unwrap());
    }
    let m = all[0].clone();
    assert!(
        all.iter().all(|x| x.fingerprint() == m.fingerprint()),
        "one CA for all replicas"
    );
    assert!(m.fingerprint().starts_with("sha256:") && m.fingerprint().len() == 7 + 64);
    assert_eq!(
        kds_tls::fingerprint_of_pem(&m.ca_pem).unwrap(),
        m.fingerprint()
    );

    // Same names: the same certificate after a restart.
    let again = kds_tls::bootstrap(&*store, &[]).await.unwrap();
    assert_eq!(again, m);
    for name in ["localhost", "127.0.0.1", "::1"] {
        handshake(&m, name).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    assert!(
        handshake(&m, "global.example.com").is_err(),
        "a name not in the certificate"
    );

    // New names: a new server certificate from the same CA.
    let extra = vec!["global.example.com".to_string(), "10.1.2.3".to_string()];
    let more = kds_tls::bootstrap(&*store, &extra).await.unwrap();
    assert_eq!(more.fingerprint(), m.fingerprint());
    assert_ne!(more.cert_pem, m.cert_pem);
    for name in ["global.example.com", "10.1.2.3", "localhost"] {
        handshake(&more, name).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    assert_eq!(kds_tls::bootstrap(&*store, &extra).await.unwrap(), more);
    assert!(
        kds_tls::bootstrap(&*store, &["not a name".to_string()])
            .await
            .is_err()
    );

    // Another store's CA does not vouch for this server.
    let other = kds_tls::bootstrap(&*mk_store(Backend::Memory).await, &[])
        .await
        .unwrap();
    assert_ne!(other.fingerprint(), m.fingerprint());
    let mixed = kds_tls::Material {
        ca_pem: other.ca_pem.clone(),
        ..m.clone()
    };
    assert!(handshake(&mixed, "localhost").is_err());

    // The CA file, and the same material read back from files.
    let dir = tempfile::tempdir().unwrap();
    let path = more.write_ca(&dir.path().join("data")).unwrap();
    assert_eq!(path, dir.path().join("data/kds-ca.pem"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), more.ca_pem);
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    std::fs::write(&cert, &more.cert_pem).unwrap();
    std::fs::write(&key, &more.key_pem).unwrap();
    let files = kds_tls::from_files(&cert, &key, &path).unwrap();
    assert_eq!(files, more);
    std::fs::write(&key, &other.key_pem).unwrap();
    let err = kds_tls::from_files(&cert, &key, &path).unwrap_err();
    assert!(
        format!("{err:#}").contains("do not form a usable certificate and key"),
        "{err:#}"
    );
    let err = kds_tls::from_files(&cert, &dir.path().join("missing.key"), &path).unwrap_err();
    assert!(format!("{err:#}").contains("missing.key"), "{err:#}");
}

/// A full TLS handshake in memory: a rustls client trusting only `m.ca_pem`, connecting to
/// `name`, against a rustls server with `m.cert_pem` and `m.key_pem`.
fn handshake(m: &kds_tls::Material, name: &str) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(m.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let client_cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let chain = CertificateDer::pem_slice_iter(m.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    assert_eq!(chain.len(), 2, "server certificate, then the CA");
    let key = PrivateKeyDer::from_pem_slice(m.key_pem.as_bytes()).unwrap();
    let server_cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    let server_name = ServerName::try_from(name.to_string()).unwrap();
    let mut client = rustls::ClientConnection::new(Arc::new(client_cfg), server_name).unwrap();
    let mut server = rustls::ServerConnection::new(Arc::new(server_cfg)).unwrap();
    for _ in 0..10 {
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
        let mut buf = Vec::new();
        client.write_tls(&mut buf).unwrap();
        server.read_tls(&mut &buf[..]).unwrap();
        server.process_new_packets().map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        server.write_tls(&mut buf).unwrap();
        client.read_tls(&mut &buf[..]).unwrap();
        client.process_new_packets().map_err(|e| e.to_string())?;
    }
    Err("handshake did not finish".into())
}
