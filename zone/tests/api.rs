//! A zone served in-process on 127.0.0.1:0 with the memory store, driven by a real HTTP
//! client: what it serves, what it accepts and stamps, what it refuses, and how it stops.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use weft_core::store::{ListQuery, Memory, Store};
use weft_core::{Kind, ORIGIN_LABEL, Resource};
use weft_zone::Config;

const DATAPLANE: &str = include_str!("../../core/tests/fixtures/dataplane.yaml");
const TIMEOUT: &str = include_str!("../../core/tests/fixtures/meshtimeout.yaml");

struct Zone {
    url: String,
    admin: String,
    http: reqwest::Client,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Drop for Zone {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Zone `east`, standalone, on an empty memory store.
async fn start() -> Zone {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::new("east")
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let store: Arc<dyn Store> = Arc::new(Memory::new());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(weft_zone::serve(
        cfg,
        store.clone(),
        listener,
        shutdown.clone(),
    ));
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(r) = http.get(format!("{url}/readyz")).send().await
            && r.status() == StatusCode::OK
        {
            break;
        }
        assert!(Instant::now() < deadline, "zone did not become ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let admin = std::fs::read_to_string(dir.path().join("admin-token"))
        .unwrap()
        .trim()
        .to_string();
    Zone {
        url,
        admin,
        http,
        store,
        shutdown,
        task: Some(task),
        _dir: dir,
    }
}

/// Zone `east` holding the `default` mesh, as KDS brings it from global.
async fn start_with_default_mesh() -> Zone {
    let z = start().await;
    let labels = [(ORIGIN_LABEL.to_string(), "global".to_string())].into();
    let mesh = Resource::new(Kind::Mesh, None, "default", labels, json!({})).unwrap();
    z.store.create(mesh).await.unwrap();
    z
}

impl Zone {
    async fn send(&self, method: Method, path: &str, yaml: Option<&str>) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.admin);
        if let Some(y) = yaml {
            req = req
                .header("content-type", "application/yaml")
                .body(y.to_string());
        }
        let r = req.send().await.unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn count(&self, kind: Kind) -> usize {
        self.store
            .list(&ListQuery::all(kind))
            .await
            .unwrap()
            .items
            .len()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_health_metrics_and_openapi() {
    let z = start_with_default_mesh().await;
    let (status, body) = z.send(Method::GET, "/meshes", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["items"][0]["name"], "default");
    let (status, body) = z
        .send(Method::GET, "/meshes/default/dataplanes", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["items"], json!([]));
    // Reads need a token, as on global.
    let anon = z
        .http
        .get(format!("{}/meshes", z.url))
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), StatusCode::UNAUTHORIZED);
    for p in ["/healthz", "/readyz"] {
        let r = z.http.get(format!("{}{p}", z.url)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{p}");
    }
    let doc: Value = z
        .http
        .get(format!("{}/openapi.json", z.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["info"]["title"], "weft zone control plane");
    assert!(doc["paths"]["/meshes/{mesh}/dataplanes/{name}"]["put"].is_object());
    assert!(doc["paths"]["/meshes/{mesh}/meshtimeouts/{name}"]["put"].is_null());
    let metrics = z
        .http
        .get(format!("{}/metrics", z.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            "weft_http_requests_total{method=\"GET\",route=\"/meshes/{mesh}/{plural}\",status=\"200\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("weft_resources{kind=\"Mesh\",mesh=\"\"} 1"),
        "{metrics}"
    );
    // Zone tokens are global's business.
    let (status, body) = z
        .send(Method::POST, "/_tokens/zone", Some("{\"zone\": \"east\"}"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("issued and revoked on global"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_owned_writes_are_accepted_and_stamped() {
    let z = start_with_default_mesh().await;
    let path = "/meshes/default/dataplanes/backend-1";
    let (status, body) = z.send(Method::PUT, path, Some(DATAPLANE)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(
        body["labels"],
        json!({"weft.io/origin": "zone", "weft.io/zone": "east"})
    );
    // A document claiming another zone is stamped with this one.
    let other = DATAPLANE
        .replace("backend-1", "backend-2")
        .replace("weft.io/zone: east", "weft.io/zone: west");
    let (status, body) = z.send(Method::POST, "/_apply", Some(&other)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["summary"]["created"], 1);
    let (_, got) = z
        .send(Method::GET, "/meshes/default/dataplanes/backend-2", None)
        .await;
    assert_eq!(got["labels"]["weft.io/zone"], "east");
    assert_eq!(got["labels"]["weft.io/origin"], "zone");
    assert_eq!(z.count(Kind::Dataplane).await, 2);
    let (status, _) = z.send(Method::DELETE, path, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(z.count(Kind::Dataplane).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_owned_writes_are_refused_and_nothing_is_stored() {
    let z = start_with_default_mesh().await;
    let message = "MeshTimeout is owned by global and cannot be written on a zone control plane (apply it on global: weftctl apply against the global control plane)";
    let (status, body) = z
        .send(
            Method::PUT,
            "/meshes/default/meshtimeouts/backend-timeouts",
            Some(TIMEOUT),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        body["errors"],
        json!([{"field": "type", "message": message}])
    );
    let (status, body) = z
        .send(
            Method::POST,
            "/_apply",
            Some(&format!("{DATAPLANE}---\n{TIMEOUT}")),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["detail"].as_str().unwrap().contains(message), "{body}");
    assert_eq!(z.count(Kind::MeshTimeout).await, 0);
    assert_eq!(z.count(Kind::Dataplane).await, 0, "nothing half-applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_zone_has_no_mesh_until_global_sends_one() {
    let z = start().await;
    let (status, body) = z.send(Method::GET, "/meshes", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["items"], json!([]), "a zone does not make meshes");
    let (status, body) = z.send(Method::POST, "/_apply", Some(DATAPLANE)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["errors"][0]["field"], "mesh");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("does not exist on this zone (meshes are created on global"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_stops_on_shutdown() {
    let mut z = start().await;
    z.shutdown.cancel();
    let task = z.task.take().unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("serve returns after shutdown")
        .unwrap();
    result.unwrap();
    assert!(
        z.http
            .get(format!("{}/healthz", z.url))
            .send()
            .await
            .is_err(),
        "no longer listening"
    );
}

#[tokio::test]
async fn run_reports_a_busy_api_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        api_address: addr,
        data_dir: dir.path().to_path_buf(),
        ..Config::new("east")
    };
    let err = weft_zone::run(cfg, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains(&format!("binding the API address {addr}")),
        "{err:#}"
    );
}
