//! The data-plane API end to end: an in-process zone on loopback, a real tonic client over
//! real TLS (trusting the zone's `dataplane-ca.pem`), token trust and an intermediate CA
//! installed in-process, and the REST API read with a real HTTP client.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use weft_core::pki::{self, IntermediateCa, RootCa};
use weft_core::store::{Memory, Store};
use weft_core::token::{Scope, SigningKey};
use weft_core::{Kind, ORIGIN_LABEL, Resource};
use weft_proto::dataplane::v1 as pb;
use weft_proto::kds::v1::GetTrustResponse;
use weft_zone::{Config, Links, Listeners, identity, kds, trust};

const WAIT: Duration = Duration::from_secs(5);

struct Zone {
    url: String,
    dp_address: String,
    ca_file: PathBuf,
    data_dir: tempfile::TempDir,
    admin: String,
    store: Arc<dyn Store>,
    key: SigningKey,
    trust: Arc<trust::Trust>,
    root: RootCa,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Drop for Zone {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn global_labels() -> BTreeMap<String, String> {
    BTreeMap::from([(ORIGIN_LABEL.to_string(), "global".to_string())])
}

/// Mesh `default` with builtin mTLS (workload certificates for 2h) and mesh `plain` without.
fn meshes() -> Vec<Resource> {
    vec![
        Resource::new(
            Kind::Mesh,
            None,
            "default",
            global_labels(),
            json!({"mtls": {"enabledBackend": "ca-1", "backends": [
                {"name": "ca-1", "type": "builtin", "dpCert": {"rotation": {"expiration": "2h"}}}
            ]}}),
        )
        .unwrap(),
        Resource::new(Kind::Mesh, None, "plain", global_labels(), json!({})).unwrap(),
    ]
}

struct Opts {
    warmup: Duration,
    trust: bool,
    data_dir: Option<tempfile::TempDir>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            warmup: Duration::ZERO,
            trust: true,
            data_dir: None,
        }
    }
}

/// Zone `east` with both APIs on `127.0.0.1:0`.
async fn start(opts: Opts) -> Zone {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = opts
        .data_dir
        .unwrap_or_else(|| tempfile::tempdir().unwrap());
    let mut cfg = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::new("east")
    };
    cfg.dataplane.warmup = opts.warmup;
    let store: Arc<dyn Store> = Arc::new(Memory::new());
    store.apply(meshes(), false).await.unwrap();

    let key = SigningKey::generate();
    let trust = trust::Trust::new();
    if opts.trust {
        trust
            .set(GetTrustResponse {
                token_keys: vec![key.public().as_bytes().to_vec()],
                revoked_ids: vec![],
            })
            .unwrap();
    }
    let root = RootCa::generate("default", Duration::from_secs(10 * 86400)).unwrap();
    let identity = identity::Identity::new("east");
    let ca_key = pki::new_key().unwrap();
    let csr = pki::intermediate_csr("default", "east", &ca_key).unwrap();
    let cert = root
        .sign_intermediate(&csr, "east", Duration::from_secs(5 * 86400))
        .unwrap();
    identity.insert(
        IntermediateCa::from_pem(&cert, &ca_key, root.cert_pem()).unwrap(),
        "ca-1",
    );

    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", api.local_addr().unwrap());
    let dp_address = format!("https://127.0.0.1:{}", dp.local_addr().unwrap().port());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(weft_zone::serve_with(
        cfg,
        store.clone(),
        Listeners {
            api,
            dataplane: Some(dp),
        },
        shutdown.clone(),
        Links {
            kds: None,
            identity,
            trust: trust.clone(),
        },
    ));
    let http = reqwest::Client::new();
    let deadline = Instant::now() + WAIT * 2;
    while !matches!(http.get(format!("{url}/readyz")).send().await, Ok(r) if r.status() == 200) {
        assert!(Instant::now() < deadline, "zone did not become ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let admin = std::fs::read_to_string(dir.path().join("admin-token"))
        .unwrap()
        .trim()
        .to_string();
    Zone {
        url,
        dp_address,
        ca_file: dir.path().join("dataplane-ca.pem"),
        data_dir: dir,
        admin,
        store,
        key,
        trust,
        root,
        shutdown,
        task,
    }
}

impl Zone {
    fn token(&self, mesh: &str, name: &str, service: &str) -> String {
        self.key
            .issue_dataplane(
                mesh,
                name,
                service,
                Duration::from_secs(3600),
                SystemTime::now(),
            )
            .unwrap()
            .0
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = reqwest::Client::new()
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.admin)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    async fn inspect(&self, name: &str) -> Value {
        let (_, v) = self.get("/_inspect/dataplanes").await;
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name)
            .unwrap_or_else(|| panic!("{name} not in {v}"))
            .clone()
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Open a stream and send `hello` (or `first` instead).
    async fn open(&self, first: pb::proxy_message::Msg) -> Result<Proxy, tonic::Status> {
        let channel = kds::connect(&self.dp_address, &kds::Trust::CaFile(self.ca_file.clone()))
            .await
            .unwrap();
        let mut client = pb::dataplane_discovery_client::DataplaneDiscoveryClient::new(channel);
        let (tx, rx) = mpsc::channel(16);
        tx.send(pb::ProxyMessage { msg: Some(first) })
            .await
            .unwrap();
        let rx = client.stream(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Proxy { tx, rx })
    }

    async fn register(&self, dp: &str, has_config: bool) -> (Proxy, pb::Registered) {
        self.register_with(dp, has_config, false).await
    }

    async fn register_with(
        &self,
        dp: &str,
        has_config: bool,
        virtual_outbounds: bool,
    ) -> (Proxy, pb::Registered) {
        let doc: Value = serde_saphyr_free(dp);
        let (mesh, name) = (doc["mesh"].as_str().unwrap(), doc["name"].as_str().unwrap());
        let service = doc["spec"]["networking"]["inbound"][0]["tags"]["weft.io/service"]
            .as_str()
            .unwrap();
        let hello = pb::Hello {
            token: self.token(mesh, name, service),
            dataplane: dp.to_string(),
            version: "test-1".to_string(),
            has_config,
            virtual_outbounds,
        };
        let mut p = self
            .open(pb::proxy_message::Msg::Hello(hello))
            .await
            .unwrap_or_else(|s| panic!("{name}: {s:?}"));
        match p.next().await {
            pb::zone_message::Msg::Registered(r) => (p, r),
            other => panic!("expected Registered, got {other:?}"),
        }
    }

    async fn refused(&self, hello: pb::Hello) -> tonic::Status {
        match self.open(pb::proxy_message::Msg::Hello(hello)).await {
            Err(s) => s,
            Ok(mut p) => match p.rx.message().await {
                Err(s) => s,
                Ok(m) => panic!("expected a refusal, got {m:?}"),
            },
        }
    }
}

/// The test documents are JSON, so no YAML parser is needed to read their names.
fn serde_saphyr_free(dp: &str) -> Value {
    serde_json::from_str(dp).unwrap()
}

struct Proxy {
    tx: mpsc::Sender<pb::ProxyMessage>,
    rx: tonic::Streaming<pb::ZoneMessage>,
}

impl Proxy {
    async fn next(&mut self) -> pb::zone_message::Msg {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("a message from the zone in time")
            .expect("the stream is healthy")
            .expect("the stream is open")
            .msg
            .expect("a message body")
    }

    async fn update(&mut self) -> pb::Update {
        match self.next().await {
            pb::zone_message::Msg::Update(u) => u,
            other => panic!("expected an Update, got {other:?}"),
        }
    }

    /// Nothing arrives for `d`.
    async fn quiet(&mut self, d: Duration) {
        if let Ok(m) = tokio::time::timeout(d, self.rx.message()).await {
            panic!("expected nothing, got {m:?}");
        }
    }

    async fn send(&self, msg: pb::proxy_message::Msg) {
        self.tx
            .send(pb::ProxyMessage { msg: Some(msg) })
            .await
            .unwrap();
    }
}

/// A Dataplane (JSON) serving `serves` on `port` and calling `calls`.
fn mk_dataplane(mesh: &str, name: &str, serves: &str, port: u16, calls: &[&str]) -> String {
    let outbound: Vec<Value> = calls
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"port": 15000 + i, "tags": {"weft.io/service": s}}))
        .collect();
    json!({
        "type": "Dataplane", "mesh": mesh, "name": name,
        "spec": {"networking": {
            "address": "10.0.0.1",
            "advertisedAddress": format!("192.168.0.{}", port % 200),
            "inbound": [{"port": port, "tags": {"weft.io/service": serves, "version": "v1"}, "protocol": "http"}],
            "outbound": outbound,
        }}
    })
    .to_string()
}

fn services(u: &pb::Update) -> BTreeMap<String, &pb::ServiceEndpoints> {
    u.services.iter().map(|s| (s.service.clone(), s)).collect()
}

async fn eventually<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let deadline = Instant::now() + WAIT;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn refused_hellos_name_the_cause() {
    let z = start(Opts {
        trust: false,
        ..Opts::default()
    })
    .await;
    let web = mk_dataplane("default", "web-1", "web", 8080, &[]);
    let hello = |token: String, dp: &str| pb::Hello {
        token,
        dataplane: dp.to_string(),
        version: "t".into(),
        has_config: false,
        virtual_outbounds: false,
    };

    // No trust from global yet: the zone says so.
    let s = z
        .refused(hello(z.token("default", "web-1", "web"), &web))
        .await;
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    assert!(
        s.message()
            .contains("has not obtained the token keys from global"),
        "{s:?}"
    );
    z.trust
        .set(GetTrustResponse {
            token_keys: vec![z.key.public().as_bytes().to_vec()],
            revoked_ids: vec![],
        })
        .unwrap();

    // Not a Hello first.
    let s = match z
        .open(pb::proxy_message::Msg::Ack(pb::Ack { nonce: 1 }))
        .await
    {
        Err(s) => s,
        Ok(_) => panic!("an Ack first was accepted"),
    };
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("must be Hello, got Ack"), "{s:?}");

    // An invalid Dataplane names the field.
    let bad = json!({"type": "Dataplane", "mesh": "default", "name": "web-1",
        "spec": {"networking": {"address": "10.0.0.1", "inbound": []}}})
    .to_string();
    let s = z
        .refused(hello(z.token("default", "web-1", "web"), &bad))
        .await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("spec.networking.inbound"), "{s:?}");
    let s = z
        .refused(hello(
            z.token("default", "web-1", "web"),
            "type: Mesh\nname: x\n",
        ))
        .await;
    assert!(s.message().contains("expected Dataplane"), "{s:?}");

    // An unknown mesh.
    let nope = mk_dataplane("nope", "web-1", "web", 8080, &[]);
    let s = z
        .refused(hello(z.token("nope", "web-1", "web"), &nope))
        .await;
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert!(
        s.message()
            .contains("mesh \"nope\" does not exist in zone east"),
        "{s:?}"
    );

    // Token problems: missing, expired, revoked, other mesh, other name, other service.
    let unauth = |s: tonic::Status, want: &str| {
        assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
        assert!(s.message().contains(want), "want {want:?} in {s:?}");
    };
    unauth(
        z.refused(hello(String::new(), &web)).await,
        "missing dataplane token",
    );
    let expired = z
        .key
        .issue_dataplane(
            "default",
            "web-1",
            "web",
            Duration::from_secs(60),
            SystemTime::now() - Duration::from_secs(3600),
        )
        .unwrap()
        .0;
    unauth(z.refused(hello(expired, &web)).await, "expired at");
    unauth(
        z.refused(hello(z.token("plain", "web-1", "web"), &web))
            .await,
        "issued for mesh \"plain\"",
    );
    unauth(
        z.refused(hello(z.token("default", "web-2", "web"), &web))
            .await,
        "issued for dataplane \"web-2\"",
    );
    unauth(
        z.refused(hello(z.token("default", "web-1", "api"), &web))
            .await,
        "issued for service \"api\"",
    );
    let two = json!({"type": "Dataplane", "mesh": "default", "name": "web-1",
        "spec": {"networking": {"address": "10.0.0.1", "inbound": [
            {"port": 8080, "tags": {"weft.io/service": "web"}},
            {"port": 8081, "tags": {"weft.io/service": "admin"}}]}}})
    .to_string();
    unauth(
        z.refused(hello(z.token("default", "web-1", "web"), &two))
            .await,
        "spec.networking.inbound[1].tags.weft.io/service: \"admin\" is not the token's service",
    );
    let (revoked, claims) = z
        .key
        .issue_dataplane(
            "default",
            "web-1",
            "web",
            Duration::from_secs(60),
            SystemTime::now(),
        )
        .unwrap();
    z.trust
        .set(GetTrustResponse {
            token_keys: vec![z.key.public().as_bytes().to_vec()],
            revoked_ids: vec![claims.jti],
        })
        .unwrap();
    unauth(z.refused(hello(revoked, &web)).await, "was revoked");
    // Nothing refused reached the store.
    assert!(
        z.store
            .get(&weft_core::Key::new(
                Kind::Dataplane,
                Some("default"),
                "web-1"
            ))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        z.metrics()
            .await
            .contains("weft_dataplane_sessions_refused_total 12")
    );
}

#[tokio::test]
async fn full_update_then_per_service_deltas_and_withdrawal() {
    let z = start(Opts::default()).await;
    let (mut web, reg) = z
        .register(
            &mk_dataplane("default", "web-1", "web", 8080, &["api", "db"]),
            false,
        )
        .await;
    assert_eq!(
        (
            reg.zone.as_str(),
            reg.mesh.as_str(),
            reg.name.as_str(),
            reg.mtls
        ),
        ("east", "default", "web-1", true)
    );
    let first = web.update().await;
    assert!(first.full);
    let view: Value = serde_json::from_str(first.view_json.as_deref().unwrap()).unwrap();
    assert_eq!(view["dataplane"], "web-1");
    assert_eq!(view["mtls"], true);
    let s = services(&first);
    assert_eq!(s.keys().collect::<Vec<_>>(), ["api", "db"]);
    assert!(s.values().all(|s| s.endpoints.is_empty()));

    // The registered Dataplane is in the store, stamped as this zone's.
    let stored = z
        .store
        .get(&weft_core::Key::new(
            Kind::Dataplane,
            Some("default"),
            "web-1",
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.labels["weft.io/zone"], "east");
    assert_eq!(stored.labels["weft.io/origin"], "zone");

    // api-1 registers: web-1 gets api's endpoints only, and no view.
    let (mut api, _) = z
        .register(&mk_dataplane("default", "api-1", "api", 9090, &[]), false)
        .await;
    assert!(api.update().await.full);
    let delta = web.update().await;
    assert!(!delta.full);
    assert_eq!(delta.view_json, None);
    assert!(delta.removed_services.is_empty());
    let s = services(&delta);
    assert_eq!(s.keys().collect::<Vec<_>>(), ["api"]);
    assert_eq!(s["api"].protocol, "http");
    let e = &s["api"].endpoints[0];
    assert_eq!(
        (
            e.address.as_str(),
            e.port,
            e.dataplane.as_str(),
            e.zone.as_str(),
            e.weight
        ),
        ("192.168.0.90", 9090, "api-1", "east", 1)
    );
    assert_eq!(e.tags["version"], "v1");

    // An unrelated service's proxy changes nothing for web-1.
    let (_other, _) = z
        .register(
            &mk_dataplane("default", "other-1", "other", 7070, &[]),
            false,
        )
        .await;
    web.quiet(Duration::from_millis(300)).await;

    // ACK and NACK are recorded and visible.
    web.send(pb::proxy_message::Msg::Ack(pb::Ack { nonce: first.nonce }))
        .await;
    web.send(pb::proxy_message::Msg::Nack(pb::Nack {
        nonce: delta.nonce,
        reason: "services[api]: no route to 192.168.0.90".into(),
    }))
    .await;
    eventually("the NACK in /_inspect/dataplanes", || async {
        z.inspect("web-1").await["lastNack"]["reason"] == "services[api]: no route to 192.168.0.90"
    })
    .await;
    let item = z.inspect("web-1").await;
    assert_eq!(item["status"], "online");
    assert_eq!(item["service"], "web");
    assert_eq!(item["zone"], "east");
    assert_eq!(item["version"], "test-1");
    assert_eq!(item["lastAckedNonce"], first.nonce);
    assert_eq!(item["lastSentNonce"], delta.nonce);
    assert_eq!(item["lastNack"]["nonce"], delta.nonce);
    let (status, cfg) = z.get("/_inspect/dataplanes/default/web-1/config").await;
    assert_eq!(status, 200);
    assert_eq!(cfg["view"]["dataplane"], "web-1");
    assert_eq!(cfg["services"]["api"]["endpoints"][0]["dataplane"], "api-1");
    let (status, err) = z.get("/_inspect/dataplanes/default/ghost/config").await;
    assert_eq!(status, 404);
    assert!(
        err["detail"].as_str().unwrap().contains("\"ghost\""),
        "{err}"
    );
    let m = z.metrics().await;
    assert!(m.contains("weft_dataplane_connected 3"), "{m}");
    assert!(m.contains("weft_dataplane_nacks_total 1"), "{m}");

    // api-1's stream drops: its endpoints are withdrawn at once, and it shows offline.
    drop(api);
    let gone = web.update().await;
    let s = services(&gone);
    assert_eq!(s.keys().collect::<Vec<_>>(), ["api"]);
    assert!(s["api"].endpoints.is_empty());
    eventually("api-1 offline", || async {
        z.inspect("api-1").await["status"] == "offline"
    })
    .await;

    // The Dataplane changed through the REST API: web-1 stops calling db.
    let changed = mk_dataplane("default", "web-1", "web", 8080, &["api"]);
    let r = reqwest::Client::new()
        .put(format!("{}/meshes/default/dataplanes/web-1", z.url))
        .bearer_auth(&z.admin)
        .header("content-type", "application/json")
        .body(changed)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let u = web.update().await;
    assert_eq!(u.removed_services, ["db"]);
    assert!(u.view_json.is_some(), "the outbounds are in the view");
}

#[tokio::test]
async fn a_policy_change_sends_a_new_view_quickly() {
    let z = start(Opts::default()).await;
    let (mut web, _) = z
        .register(
            &mk_dataplane("default", "web-1", "web", 8080, &["api"]),
            false,
        )
        .await;
    let first = web.update().await;
    assert!(!first.view_json.unwrap().contains("MeshTrafficPermission"));

    let mtp = Resource::new(
        Kind::MeshTrafficPermission,
        Some("default"),
        "allow-all",
        global_labels(),
        json!({"targetRef": {"kind": "Mesh"}, "from": [{"targetRef": {"kind": "Mesh"}, "default": {"action": "Allow"}}]}),
    )
    .unwrap();
    let at = Instant::now();
    z.store.apply(vec![mtp], false).await.unwrap();
    let u = web.update().await;
    assert!(
        at.elapsed() < Duration::from_secs(1),
        "took {:?}",
        at.elapsed()
    );
    assert!(!u.full);
    assert!(u.services.is_empty(), "no endpoint changed: {u:?}");
    let view: Value = serde_json::from_str(u.view_json.as_deref().unwrap()).unwrap();
    assert_eq!(
        view["inbounds"][0]["from"]["MeshTrafficPermission"][0]["conf"]["action"], "Allow",
        "{view}"
    );
    // A policy of another mesh changes nothing here.
    let other = Resource::new(
        Kind::MeshTrafficPermission,
        Some("plain"),
        "allow-all",
        global_labels(),
        json!({"targetRef": {"kind": "Mesh"}, "from": [{"targetRef": {"kind": "Mesh"}, "default": {"action": "Deny"}}]}),
    )
    .unwrap();
    z.store.apply(vec![other], false).await.unwrap();
    web.quiet(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn certificates_chain_to_the_mesh_root_with_the_service_identity() {
    let z = start(Opts::default()).await;
    let (mut web, _) = z
        .register(&mk_dataplane("default", "web-1", "web", 8080, &[]), false)
        .await;
    web.update().await;
    let key = pki::new_key().unwrap();
    // The CSR asks for another service: the zone decides the identity.
    let csr = pki::workload_csr("default", "admin", &key).unwrap();
    web.send(pb::proxy_message::Msg::CertificateRequest(
        pb::CertificateRequest {
            csr_pem: csr,
            ..Default::default()
        },
    ))
    .await;
    let cert = match web.next().await {
        pb::zone_message::Msg::Certificate(c) => c,
        other => panic!("expected a Certificate, got {other:?}"),
    };
    assert_eq!(cert.roots_pem, [z.root.cert_pem().to_string()]);
    let id =
        pki::verify_workload_pem(&cert.chain_pem, &cert.roots_pem[0], SystemTime::now()).unwrap();
    assert_eq!(id.to_string(), "spiffe://default/web");
    // The Mesh says 2h.
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let left = cert.not_after_unix - now;
    assert!((7000..=7300).contains(&left), "{left}s");
    eventually("certExpires in /_inspect", || async {
        z.inspect("web-1").await["certExpires"].is_string()
    })
    .await;
    let (_, cfg) = z.get("/_inspect/dataplanes/default/web-1/config").await;
    assert_eq!(cfg["certificate"]["spiffeId"], "spiffe://default/web");

    // A bad CSR.
    web.send(pb::proxy_message::Msg::CertificateRequest(
        pb::CertificateRequest {
            csr_pem: "not a csr".into(),
            ..Default::default()
        },
    ))
    .await;
    match web.next().await {
        pb::zone_message::Msg::CertificateError(e) => assert!(e.reason.contains("CSR"), "{e:?}"),
        other => panic!("expected a CertificateError, got {other:?}"),
    }

    // mTLS off.
    let (mut plain, reg) = z
        .register(&mk_dataplane("plain", "p-1", "p", 8080, &[]), false)
        .await;
    assert!(!reg.mtls);
    plain.update().await;
    plain
        .send(pb::proxy_message::Msg::CertificateRequest(
            pb::CertificateRequest {
                csr_pem: pki::workload_csr("plain", "p", &key).unwrap(),
                ..Default::default()
            },
        ))
        .await;
    match plain.next().await {
        pb::zone_message::Msg::CertificateError(e) => {
            assert!(e.reason.contains("mTLS off"), "{e:?}")
        }
        other => panic!("expected a CertificateError, got {other:?}"),
    }
    assert!(
        z.metrics()
            .await
            .contains("weft_dataplane_certificates_issued_total 1")
    );
}

#[tokio::test]
async fn a_second_session_replaces_the_first() {
    let z = start(Opts::default()).await;
    let dp = mk_dataplane("default", "web-1", "web", 8080, &[]);
    let (mut a, _) = z.register(&dp, false).await;
    a.update().await;
    let (mut b, _) = z.register(&dp, false).await;
    assert!(b.update().await.full);
    let s = tokio::time::timeout(WAIT, a.rx.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(s.code(), Code::Aborted);
    assert!(s.message().contains("replaced by a newer session"), "{s:?}");
    // The old stream's end does not take the new one offline.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(z.inspect("web-1").await["status"], "online");
}

#[tokio::test]
async fn warm_up_holds_only_sessions_that_have_a_config() {
    let z = start(Opts {
        warmup: Duration::from_millis(1500),
        ..Opts::default()
    })
    .await;
    let started = Instant::now();
    let (mut old, _) = z
        .register(
            &mk_dataplane("default", "web-1", "web", 8080, &["api"]),
            true,
        )
        .await;
    let (mut new, _) = z
        .register(&mk_dataplane("default", "api-1", "api", 9090, &[]), false)
        .await;
    // A fresh proxy is answered at once ...
    assert!(new.update().await.full);
    assert!(started.elapsed() < Duration::from_millis(1000));
    // ... one with a config waits for the warm-up, then gets one full update that already
    // holds what registered meanwhile.
    old.quiet(Duration::from_millis(700)).await;
    let u = old.update().await;
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        started.elapsed()
    );
    assert!(u.full);
    assert_eq!(services(&u)["api"].endpoints.len(), 1);
    // After the warm-up, has_config does not delay anyone.
    let (mut late, _) = z
        .register(&mk_dataplane("default", "db-1", "db", 5432, &[]), true)
        .await;
    let at = Instant::now();
    assert!(late.update().await.full);
    assert!(at.elapsed() < Duration::from_millis(500));
}

#[tokio::test]
async fn a_restarted_zone_keeps_its_data_plane_ca() {
    let z = start(Opts::default()).await;
    let ca = std::fs::read_to_string(&z.ca_file).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        for f in ["dataplane-ca-key.pem", "dataplane-server-key.pem"] {
            let mode = std::fs::metadata(z.data_dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
    }
    // Stop the first zone and keep its data directory.
    let mut z = z;
    z.shutdown.cancel();
    let task = std::mem::replace(&mut z.task, tokio::spawn(async { Ok(()) }));
    task.await.unwrap().unwrap();
    let data_dir = std::mem::replace(&mut z.data_dir, tempfile::tempdir().unwrap());
    drop(z);
    let z2 = start(Opts {
        data_dir: Some(data_dir),
        ..Opts::default()
    })
    .await;
    assert_eq!(std::fs::read_to_string(&z2.ca_file).unwrap(), ca);
    // The old CA file verifies the restarted zone.
    let (mut p, _) = z2
        .register(&mk_dataplane("default", "web-1", "web", 8080, &[]), false)
        .await;
    assert!(p.update().await.full);
}

// ---------------------------------------------------------------------------------------
// Cross-zone: ingresses, managed MeshServices, remote endpoints, VIPs.

fn zone_token(z: &Zone, zone: &str, scope: Scope) -> String {
    z.key
        .issue(zone, scope, Duration::from_secs(3600), SystemTime::now())
        .unwrap()
        .0
}

fn mk_ingress(name: &str) -> String {
    json!({"type": "ZoneIngress", "name": name, "spec": {"networking": {
        "address": "10.0.0.9", "port": 10001,
        "advertisedAddress": "203.0.113.1", "advertisedPort": 443}}})
    .to_string()
}

fn ingress_hello(token: String, name: &str) -> pb::Hello {
    pb::Hello {
        token,
        dataplane: mk_ingress(name),
        version: "ingress-test".into(),
        has_config: false,
        virtual_outbounds: false,
    }
}

fn key(kind: Kind, mesh: Option<&str>, name: &str) -> weft_core::Key {
    weft_core::Key::new(kind, mesh, name)
}

/// A resource received from another zone: named `<name>.<zone>` as KDS names it (validated
/// under its base name, as `kds::admit` does).
fn received(kind: Kind, mesh: Option<&str>, name: &str, zone: &str, spec: Value) -> Resource {
    let labels = BTreeMap::from([
        (ORIGIN_LABEL.to_string(), "global".to_string()),
        ("weft.io/zone".to_string(), zone.to_string()),
    ]);
    let mut r = Resource::new(kind, mesh, name, labels, spec).unwrap();
    r.name = format!("{name}.{zone}");
    r
}

/// Another zone's MeshService and ZoneIngress, stored the way KDS stores them on a zone.
fn remote_resources(instances: u32) -> Vec<Resource> {
    vec![
        received(
            Kind::MeshService,
            Some("default"),
            "backend",
            "west",
            json!({"selector": {"dataplaneTags": {"weft.io/service": "backend"}},
                "ports": [{"port": 8080, "appProtocol": "http"}],
                "status": {"instances": instances}}),
        ),
        received(
            Kind::ZoneIngress,
            None,
            "ingress",
            "west",
            json!({"zone": "west", "networking": {"address": "10.1.0.1", "port": 10001,
                "advertisedAddress": "198.51.100.7", "advertisedPort": 443}}),
        ),
    ]
}

#[tokio::test]
async fn an_ingress_registers_with_an_ingress_token_and_gets_every_mesh() {
    let z = start(Opts::default()).await;
    let (_b1, _) = z
        .register(
            &mk_dataplane("default", "backend-1", "backend", 8080, &[]),
            false,
        )
        .await;
    let (_p1, _) = z
        .register(&mk_dataplane("plain", "p-1", "p", 7070, &[]), false)
        .await;

    // Refused: a zone-scope token, another zone's token, no token.
    let s = z
        .refused(ingress_hello(
            zone_token(&z, "east", Scope::Zone),
            "ingress-1",
        ))
        .await;
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    assert!(s.message().contains("has scope zone, not ingress"), "{s:?}");
    let s = z
        .refused(ingress_hello(
            zone_token(&z, "west", Scope::Ingress),
            "ingress-1",
        ))
        .await;
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    assert!(s.message().contains("not this zone \"east\""), "{s:?}");
    let s = z.refused(ingress_hello(String::new(), "ingress-1")).await;
    assert!(s.message().contains("missing zone token"), "{s:?}");
    let zi = key(Kind::ZoneIngress, None, "ingress-1");
    assert!(z.store.get(&zi).await.unwrap().is_none());

    let mut ing = z
        .open(pb::proxy_message::Msg::Hello(ingress_hello(
            zone_token(&z, "east", Scope::Ingress),
            "ingress-1",
        )))
        .await
        .unwrap();
    match ing.next().await {
        pb::zone_message::Msg::Registered(r) => assert_eq!(
            (r.zone.as_str(), r.mesh.as_str(), r.name.as_str(), r.mtls),
            ("east", "", "ingress-1", false)
        ),
        other => panic!("expected Registered, got {other:?}"),
    }
    let full = ing.update().await;
    assert!(full.full);
    assert_eq!(full.view_json, None);
    assert!(!full.vips_replace);
    let got: BTreeMap<(String, String), &pb::ServiceEndpoints> = full
        .services
        .iter()
        .map(|s| ((s.mesh.clone(), s.service.clone()), s))
        .collect();
    assert_eq!(
        got.keys().cloned().collect::<Vec<_>>(),
        [
            ("default".to_string(), "backend".to_string()),
            ("plain".to_string(), "p".to_string())
        ]
    );
    let backend = got[&("default".to_string(), "backend".to_string())];
    assert_eq!(backend.protocol, "http");
    assert_eq!(backend.endpoints.len(), 1);
    assert_eq!(backend.endpoints[0].dataplane, "backend-1");

    // Stored as this zone's, so KDS carries it to global.
    let stored = z.store.get(&zi).await.unwrap().unwrap();
    assert_eq!(stored.labels["weft.io/zone"], "east");
    assert_eq!(stored.labels["weft.io/origin"], "zone");
    assert_eq!(stored.spec["zone"], "east");
    assert_eq!(stored.spec["networking"]["advertisedPort"], 443);

    // No certificate for an ingress.
    ing.send(pb::proxy_message::Msg::CertificateRequest(
        pb::CertificateRequest {
            csr_pem: "unused".into(),
            ..Default::default()
        },
    ))
    .await;
    match ing.next().await {
        pb::zone_message::Msg::CertificateError(e) => {
            assert!(e.reason.contains("pass TLS through"), "{e:?}")
        }
        other => panic!("expected a CertificateError, got {other:?}"),
    }

    // Another backend instance: the ingress gets only that service, with its mesh.
    let (_b2, _) = z
        .register(
            &mk_dataplane("default", "backend-2", "backend", 8081, &[]),
            false,
        )
        .await;
    let delta = ing.update().await;
    assert!(!delta.full);
    assert_eq!(delta.services.len(), 1);
    assert_eq!(
        (
            delta.services[0].mesh.as_str(),
            delta.services[0].service.as_str()
        ),
        ("default", "backend")
    );
    assert_eq!(delta.services[0].endpoints.len(), 2);

    // Another zone's offer never reaches the ingress.
    z.store.apply(remote_resources(3), false).await.unwrap();
    ing.quiet(Duration::from_millis(300)).await;

    // The session ends: the ZoneIngress goes.
    drop(ing);
    eventually("the ZoneIngress deleted", || async {
        z.store.get(&zi).await.unwrap().is_none()
    })
    .await;
}

#[tokio::test]
async fn the_zone_maintains_a_mesh_service_per_local_service() {
    let z = start(Opts::default()).await;
    // A user-written MeshService for web: left alone.
    let user = Resource::new(
        Kind::MeshService,
        Some("default"),
        "web",
        BTreeMap::from([
            (ORIGIN_LABEL.to_string(), "zone".to_string()),
            ("weft.io/zone".to_string(), "east".to_string()),
        ]),
        json!({"selector": {"dataplaneTags": {"weft.io/service": "web"}}, "ports": [{"port": 80, "targetPort": 8080}]}),
    )
    .unwrap();
    z.store.apply(vec![user.clone()], false).await.unwrap();
    let (_w, _) = z
        .register(&mk_dataplane("default", "web-1", "web", 8080, &[]), false)
        .await;
    let (b1, _) = z
        .register(
            &mk_dataplane("default", "backend-1", "backend", 8080, &[]),
            false,
        )
        .await;
    let ms = key(Kind::MeshService, Some("default"), "backend");
    let instances = |n: u64| {
        let z = &z;
        let ms = ms.clone();
        async move {
            z.store
                .get(&ms)
                .await
                .unwrap()
                .is_some_and(|r| r.spec["status"]["instances"] == n)
        }
    };
    eventually("MeshService backend with 1 instance", || instances(1)).await;
    let r = z.store.get(&ms).await.unwrap().unwrap();
    assert_eq!(r.labels["weft.io/managed-by"], "weft-zone");
    assert_eq!(r.labels["weft.io/zone"], "east");
    assert_eq!(r.labels["weft.io/origin"], "zone");
    assert_eq!(
        r.spec["selector"]["dataplaneTags"]["weft.io/service"],
        "backend"
    );
    assert_eq!(
        r.spec["ports"],
        json!([{"port": 8080, "appProtocol": "http"}])
    );
    let web = z
        .store
        .get(&key(Kind::MeshService, Some("default"), "web"))
        .await
        .unwrap()
        .unwrap();
    assert!(
        web.same_content(&user),
        "the user's MeshService changed: {web:?}"
    );

    let (_b2, _) = z
        .register(
            &mk_dataplane("default", "backend-2", "backend", 8080, &[]),
            false,
        )
        .await;
    eventually("2 instances", || instances(2)).await;
    drop(b1);
    eventually("1 instance after a proxy left", || instances(1)).await;
    drop(_b2);
    eventually("0 instances", || instances(0)).await;
    // The Dataplanes are deleted: the MeshService goes.
    for n in ["backend-1", "backend-2"] {
        z.store
            .delete(&key(Kind::Dataplane, Some("default"), n), None)
            .await
            .unwrap();
    }
    eventually("MeshService backend deleted", || async {
        z.store.get(&ms).await.unwrap().is_none()
    })
    .await;
}

#[tokio::test]
async fn a_proxy_gets_other_zones_instances_through_their_ingress() {
    let z = start(Opts::default()).await;
    let (_b, _) = z
        .register(
            &mk_dataplane("default", "backend-1", "backend", 8080, &[]),
            false,
        )
        .await;
    z.store.apply(remote_resources(2), false).await.unwrap();
    let (mut web, _) = z
        .register(
            &mk_dataplane("default", "web-1", "web", 9000, &["backend"]),
            false,
        )
        .await;
    let first = web.update().await;
    assert!(!first.vips_replace && first.vips.is_empty(), "{first:?}");
    let mut held = Held::default();
    held.apply(&first);
    web.until(&mut held, "backend's west endpoint", |h| {
        h.services["backend"].endpoints.len() == 2
    })
    .await;
    assert!(held.vips.is_empty(), "no VIPs without virtual outbounds");
    let backend = held.services["backend"].clone();
    assert_eq!(backend.protocol, "http");
    let by_zone: BTreeMap<&str, &pb::Endpoint> = backend
        .endpoints
        .iter()
        .map(|e| (e.zone.as_str(), e))
        .collect();
    assert_eq!(backend.endpoints.len(), 2, "{backend:?}");
    assert_eq!(by_zone["east"].dataplane, "backend-1");
    assert_eq!(by_zone["east"].weight, 1);
    let west = by_zone["west"];
    assert_eq!(
        (
            west.address.as_str(),
            west.port,
            west.dataplane.as_str(),
            west.weight
        ),
        ("198.51.100.7", 443, "ingress.west", 2)
    );
    assert_eq!(west.tags["weft.io/service"], "backend");
    assert_eq!(west.tags["weft.io/zone"], "west");

    // West reports no instance: only the local endpoint stays.
    z.store.apply(remote_resources(0), false).await.unwrap();
    let u = web.update().await;
    let s = services(&u);
    assert_eq!(s.keys().collect::<Vec<_>>(), ["backend"]);
    assert_eq!(s["backend"].endpoints.len(), 1);
    assert_eq!(s["backend"].endpoints[0].zone, "east");
    // Back with 4: the ingress endpoint returns with weight 4.
    z.store.apply(remote_resources(4), false).await.unwrap();
    let u = web.update().await;
    let west: Vec<_> = services(&u)["backend"]
        .endpoints
        .iter()
        .filter(|e| e.zone == "west")
        .map(|e| e.weight)
        .collect();
    assert_eq!(west, [4]);
    // Another zone's service web-1 does not call changes nothing for it.
    let other = received(
        Kind::MeshService,
        Some("default"),
        "db",
        "west",
        json!({"selector": {"dataplaneTags": {"weft.io/service": "db"}},
            "ports": [{"port": 5432}], "status": {"instances": 1}}),
    );
    z.store.apply(vec![other], false).await.unwrap();
    web.quiet(Duration::from_millis(300)).await;
}

/// What a proxy holds after applying updates as weft-dp does.
#[derive(Default, Debug)]
struct Held {
    services: BTreeMap<String, pb::ServiceEndpoints>,
    vips: Vec<pb::Vip>,
}

impl Held {
    fn apply(&mut self, u: &pb::Update) {
        if u.full {
            self.services.clear();
        }
        for s in &u.services {
            self.services.insert(s.service.clone(), s.clone());
        }
        for r in &u.removed_services {
            self.services.remove(r);
        }
        if u.vips_replace {
            self.vips = u.vips.clone();
        }
    }
}

impl Proxy {
    /// Apply updates to `held` until `done` holds (updates are asynchronous: what the store
    /// got a moment ago may come in the next update).
    async fn until(&mut self, held: &mut Held, what: &str, done: impl Fn(&Held) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(held) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {held:?}"
            );
            let u = self.update().await;
            held.apply(&u);
        }
    }
}

/// name -> (address, zone, ports) of a VIP table.
fn vip_map(vips: &[pb::Vip]) -> BTreeMap<String, (String, String, Vec<u32>)> {
    vips.iter()
        .map(|v| {
            (
                v.name.clone(),
                (v.address.clone(), v.zone.clone(), v.ports.clone()),
            )
        })
        .collect()
}

#[tokio::test]
async fn virtual_outbounds_get_every_service_and_stable_vips() {
    let z = start(Opts::default()).await;
    let (_b, _) = z
        .register(
            &mk_dataplane("default", "backend-1", "backend", 8080, &[]),
            false,
        )
        .await;
    z.store.apply(remote_resources(1), false).await.unwrap();
    let (_p, _) = z
        .register(&mk_dataplane("plain", "p-1", "p", 7070, &[]), false)
        .await;
    // Declares no outbound: gets every service of its mesh anyway, and the VIPs.
    let (mut fe, _) = z
        .register_with(
            &mk_dataplane("default", "frontend-1", "frontend", 9000, &[]),
            false,
            true,
        )
        .await;
    let first = fe.update().await;
    assert!(first.full && first.vips_replace, "{first:?}");
    let mut held = Held::default();
    held.apply(&first);
    fe.until(&mut held, "backend in both zones and its VIPs", |h| {
        h.services
            .get("backend")
            .is_some_and(|s| s.endpoints.len() == 2)
            && h.vips.iter().any(|v| v.name == "backend.west.mesh")
    })
    .await;
    assert!(held.services.contains_key("frontend"));
    assert!(!held.services.contains_key("p"), "another mesh's service");
    let vips = vip_map(&held.vips);
    for (name, zone) in [
        ("backend.mesh", ""),
        ("backend.east.mesh", "east"),
        ("backend.west.mesh", "west"),
        ("frontend.mesh", ""),
        ("frontend.east.mesh", "east"),
    ] {
        let (address, z, ports) = vips
            .get(name)
            .unwrap_or_else(|| panic!("{name} not in {vips:?}"));
        assert_eq!(z, zone, "{name}");
        let ip: std::net::Ipv4Addr = address.parse().unwrap();
        assert!(
            ip.octets()[0] == 127 && (240..=255).contains(&ip.octets()[1]),
            "{name}: {ip} is not in 127.240.0.0/12"
        );
        assert!(!ports.is_empty(), "{name}");
    }
    assert_eq!(vips["backend.west.mesh"].2, [8080]);
    assert_eq!(vips["frontend.mesh"].2, [9000]);
    assert!(
        held.vips.iter().all(|v| v.service != "p"),
        "another mesh's VIP"
    );
    let addresses: std::collections::BTreeSet<&String> = vips.values().map(|v| &v.0).collect();
    assert_eq!(addresses.len(), vips.len(), "duplicate VIPs: {vips:?}");

    // A new service of the mesh appears: its endpoints and a new table arrive.
    let (_db, _) = z
        .register(&mk_dataplane("default", "db-1", "db", 5432, &[]), false)
        .await;
    fe.until(&mut held, "db and db.mesh", |h| {
        h.services.contains_key("db") && h.vips.iter().any(|v| v.name == "db.mesh")
    })
    .await;
    let table = vip_map(&held.vips);
    assert_eq!(table["backend.mesh"], vips["backend.mesh"], "a VIP moved");

    // /_inspect/services: per zone, the total, the ports and this zone's VIP of backend.mesh.
    eventually("backend in /_inspect/services with both zones", || async {
        let (_, v) = z.get("/_inspect/services").await;
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["service"] == "backend" && i["instances"] == 2)
    })
    .await;
    let (status, v) = z.get("/_inspect/services").await;
    assert_eq!(status, 200);
    let item = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["service"] == "backend")
        .unwrap()
        .clone();
    assert_eq!(item["mesh"], "default");
    assert_eq!(
        item["zones"],
        json!([{"zone": "east", "instances": 1}, {"zone": "west", "instances": 1}])
    );
    assert_eq!(item["ports"], json!([8080]));
    assert_eq!(item["vip"], table["backend.mesh"].0.as_str());

    // Restart on the same data dir: the same names get the same addresses.
    eventually("vips.json written", || async {
        std::fs::read_to_string(z.data_dir.path().join("vips.json"))
            .is_ok_and(|t| t.contains("db.east.mesh"))
    })
    .await;
    let mut z = z;
    z.shutdown.cancel();
    let task = std::mem::replace(&mut z.task, tokio::spawn(async { Ok(()) }));
    task.await.unwrap().unwrap();
    let data_dir = std::mem::replace(&mut z.data_dir, tempfile::tempdir().unwrap());
    drop(z);
    let z2 = start(Opts {
        data_dir: Some(data_dir),
        ..Opts::default()
    })
    .await;
    // Registered in another order than before.
    let (_db, _) = z2
        .register(&mk_dataplane("default", "db-1", "db", 5432, &[]), false)
        .await;
    z2.store.apply(remote_resources(1), false).await.unwrap();
    let (_b, _) = z2
        .register(
            &mk_dataplane("default", "backend-1", "backend", 8080, &[]),
            false,
        )
        .await;
    let (mut fe2, _) = z2
        .register_with(
            &mk_dataplane("default", "frontend-1", "frontend", 9000, &[]),
            false,
            true,
        )
        .await;
    let mut again = Held::default();
    fe2.until(&mut again, "the whole VIP table after the restart", |h| {
        h.vips.len() == table.len()
    })
    .await;
    assert_eq!(vip_map(&again.vips), table, "VIPs changed across a restart");
}

fn egress_hello(token: String, name: &str) -> pb::Hello {
    pb::Hello {
        token,
        dataplane: json!({"type": "ZoneEgress", "name": name,
            "spec": {"networking": {"address": "10.0.0.8", "port": 10002}}})
        .to_string(),
        version: "egress-test".into(),
        has_config: false,
        virtual_outbounds: false,
    }
}

#[tokio::test]
async fn an_egress_gets_external_services_and_a_certificate_per_mesh() {
    let z = start(Opts::default()).await;
    let ext = Resource::new(
        Kind::MeshExternalService,
        Some("default"),
        "httpbin",
        global_labels(),
        json!({"match": {"type": "HostnameGenerator", "port": 80, "protocol": "http"},
               "endpoints": [{"address": "httpbin.org", "port": 443}], "tls": {"enabled": true}}),
    )
    .unwrap();
    z.store.apply(vec![ext], false).await.unwrap();
    let (mut web, _) = z
        .register(
            &mk_dataplane("default", "web-1", "web", 8080, &["httpbin"]),
            false,
        )
        .await;
    let full = web.update().await;
    assert!(
        services(&full)["httpbin"].endpoints.is_empty(),
        "no egress yet"
    );

    // Refused: an ingress token.
    let s = z
        .refused(egress_hello(
            zone_token(&z, "east", Scope::Ingress),
            "egress-1",
        ))
        .await;
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    assert!(s.message().contains("not egress"), "{s:?}");

    let mut eg = z
        .open(pb::proxy_message::Msg::Hello(egress_hello(
            zone_token(&z, "east", Scope::Egress),
            "egress-1",
        )))
        .await
        .unwrap();
    match eg.next().await {
        pb::zone_message::Msg::Registered(r) => {
            assert_eq!((r.zone.as_str(), r.mesh.as_str()), ("east", ""))
        }
        other => panic!("expected Registered, got {other:?}"),
    }
    let full = eg.update().await;
    assert_eq!(full.services.len(), 1);
    let s = &full.services[0];
    assert_eq!(
        (s.mesh.as_str(), s.service.as_str()),
        ("default", "httpbin")
    );
    assert_eq!(s.endpoints[0].address, "httpbin.org");
    assert!(s.external.as_ref().unwrap().tls);
    let stored = z
        .store
        .get(&key(Kind::ZoneEgress, None, "egress-1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.spec["zone"], "east");

    // The proxy now reaches httpbin through the egress, verified as the egress (an update
    // for the external service's own arrival in the index may come first).
    let mut delta = web.update().await;
    while services(&delta)
        .get("httpbin")
        .is_none_or(|s| s.endpoints.is_empty())
    {
        delta = web.update().await;
    }
    let eps = &services(&delta)["httpbin"].endpoints;
    assert_eq!(eps.len(), 1);
    assert_eq!((eps[0].address.as_str(), eps[0].port), ("10.0.0.8", 10002));
    assert_eq!(eps[0].server_identity, "spiffe://default/zone-egress.east");

    // A certificate per mesh, as the egress of this zone; none for a mesh without mTLS.
    let k = pki::new_key().unwrap();
    let csr = pki::workload_csr("default", "anything", &k).unwrap();
    eg.send(pb::proxy_message::Msg::CertificateRequest(
        pb::CertificateRequest {
            csr_pem: csr.clone(),
            mesh: "default".into(),
        },
    ))
    .await;
    let cert = match eg.next().await {
        pb::zone_message::Msg::Certificate(c) => c,
        other => panic!("expected a Certificate, got {other:?}"),
    };
    assert_eq!(cert.mesh, "default");
    let id =
        pki::verify_workload_pem(&cert.chain_pem, &cert.roots_pem[0], SystemTime::now()).unwrap();
    assert_eq!(id.to_string(), "spiffe://default/zone-egress.east");
    eg.send(pb::proxy_message::Msg::CertificateRequest(
        pb::CertificateRequest {
            csr_pem: csr,
            mesh: "plain".into(),
        },
    ))
    .await;
    match eg.next().await {
        pb::zone_message::Msg::CertificateError(e) => {
            assert_eq!(e.mesh, "plain");
            assert!(e.reason.contains("mTLS off"), "{e:?}");
        }
        other => panic!("expected a CertificateError, got {other:?}"),
    }

    // The session ends: the ZoneEgress goes, and so does the proxy's endpoint.
    drop(eg);
    eventually("the ZoneEgress deleted", || async {
        z.store
            .get(&key(Kind::ZoneEgress, None, "egress-1"))
            .await
            .unwrap()
            .is_none()
    })
    .await;
    let delta = web.update().await;
    assert!(services(&delta)["httpbin"].endpoints.is_empty());
}

/// Mesh `default` with mTLS and `routing.zoneEgress` on or off.
fn mesh_with_zone_egress(on: bool) -> Resource {
    Resource::new(
        Kind::Mesh,
        None,
        "default",
        global_labels(),
        json!({"mtls": {"enabledBackend": "ca-1", "backends": [
            {"name": "ca-1", "type": "builtin", "dpCert": {"rotation": {"expiration": "2h"}}}
        ]}, "routing": {"zoneEgress": on}}),
    )
    .unwrap()
}

#[tokio::test]
async fn a_zone_egress_mesh_reaches_other_zones_through_the_egress() {
    let z = start(Opts::default()).await;
    z.store
        .apply(vec![mesh_with_zone_egress(true)], false)
        .await
        .unwrap();
    z.store.apply(remote_resources(2), false).await.unwrap();
    let (mut web, _) = z
        .register(
            &mk_dataplane("default", "web-1", "web", 9000, &["backend"]),
            false,
        )
        .await;
    let mut held = Held::default();
    held.apply(&web.update().await);
    // No egress: no way to west (not west's ingress either), once west's MeshService is in.
    web.until(&mut held, "west's protocol", |h| {
        h.services["backend"].protocol == "http"
    })
    .await;
    assert!(
        held.services["backend"].endpoints.is_empty(),
        "without an egress a zoneEgress mesh gets no remote endpoint: {held:?}"
    );

    let mut eg = z
        .open(pb::proxy_message::Msg::Hello(egress_hello(
            zone_token(&z, "east", Scope::Egress),
            "egress-1",
        )))
        .await
        .unwrap();
    assert!(matches!(
        eg.next().await,
        pb::zone_message::Msg::Registered(_)
    ));
    // The egress's routes: west's ingress for backend of mesh default, no `external`.
    let full = eg.update().await;
    assert!(full.full);
    let routes = services(&full);
    let route = routes.get("backend").expect("a route for backend");
    assert_eq!(route.mesh, "default");
    assert!(route.external.is_none(), "{route:?}");
    assert_eq!(route.endpoints.len(), 1, "{route:?}");
    let e = &route.endpoints[0];
    assert_eq!(
        (e.address.as_str(), e.port, e.zone.as_str(), e.weight),
        ("198.51.100.7", 443, "west", 2)
    );
    assert_eq!(e.dataplane, "ingress.west");

    // The proxy: the egress, for zone west, weight = west's instances, no server identity.
    web.until(&mut held, "backend through the egress", |h| {
        !h.services["backend"].endpoints.is_empty()
    })
    .await;
    let eps = &held.services["backend"].endpoints;
    assert_eq!(eps.len(), 1, "{eps:?}");
    assert_eq!(
        (
            eps[0].address.as_str(),
            eps[0].port,
            eps[0].zone.as_str(),
            eps[0].weight,
            eps[0].dataplane.as_str()
        ),
        ("10.0.0.8", 10002, "west", 2, "egress-1")
    );
    assert_eq!(eps[0].server_identity, "", "the egress does not terminate");
    assert_eq!(eps[0].tags["weft.io/zone"], "west");

    // West's instances change: both the proxy's weight and the egress's route follow.
    z.store.apply(remote_resources(3), false).await.unwrap();
    web.until(&mut held, "weight 3", |h| {
        h.services["backend"].endpoints.first().map(|e| e.weight) == Some(3)
    })
    .await;
    let u = eg.update().await;
    assert_eq!(services(&u)["backend"].endpoints[0].weight, 3);

    // routing.zoneEgress off: the proxy goes to west's ingress again, the egress loses the
    // route.
    z.store
        .apply(vec![mesh_with_zone_egress(false)], false)
        .await
        .unwrap();
    web.until(&mut held, "backend through west's ingress", |h| {
        h.services["backend"]
            .endpoints
            .first()
            .map(|e| e.address.as_str())
            == Some("198.51.100.7")
    })
    .await;
    let u = eg.update().await;
    assert_eq!(u.removed_services, ["backend"], "{u:?}");
    assert!(u.services.is_empty(), "{u:?}");

    // On again, then the egress goes away: no remote endpoint at all.
    z.store
        .apply(vec![mesh_with_zone_egress(true)], false)
        .await
        .unwrap();
    web.until(&mut held, "backend through the egress again", |h| {
        h.services["backend"]
            .endpoints
            .first()
            .map(|e| e.address.as_str())
            == Some("10.0.0.8")
    })
    .await;
    let u = eg.update().await;
    assert_eq!(services(&u)["backend"].endpoints[0].zone, "west");
    drop(eg);
    web.until(&mut held, "no endpoint without the egress", |h| {
        h.services["backend"].endpoints.is_empty()
    })
    .await;
}
