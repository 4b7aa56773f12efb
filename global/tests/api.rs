//! The REST API served in-process on 127.0.0.1:0, driven by a real HTTP client. Every case
//! runs twice: on the memory store and on real PostgreSQL (a database of its own). Most cases
//! serve the API as global; the `zone_*` cases serve it as the zone control plane of zone
//! `east` (the role `weft-zone` serves it in).

use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use weft_core::store::{Memory, Store};
use weft_core::{Kind, ORIGIN_LABEL, Resource, ZONE_LABEL};
use weft_global::api::{self, Plane};
use weft_global::config::Config;

struct Server {
    url: String,
    admin: String,
    readonly: String,
    http: reqwest::Client,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[derive(Clone, Copy)]
enum Backend {
    Memory,
    Postgres,
}

/// `on_both_stores!(start_fn => [case, ...], ...)`: each case, served by its start function,
/// on the memory store and on PostgreSQL.
macro_rules! on_both_stores {
    ($($start:ident => [$($case:ident),* $(,)?]),* $(,)?) => {
        mod memory {
            $($( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $case() { super::$case(super::$start(super::Backend::Memory).await).await } )*)*
        }
        mod postgres {
            $($( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $case() { super::$case(super::$start(super::Backend::Postgres).await).await } )*)*
        }
    };
}

on_both_stores!(
    start => [
        default_mesh_exists_on_first_start,
        authentication_and_roles,
        crud_with_versions,
        two_writers_from_the_same_version_one_wins,
        apply_summary_and_dry_run,
        bad_input_names_the_field_and_stores_nothing,
        openapi_matches_the_routes,
        openapi_on_global_lists_writes_of_global_owned_kinds,
        metrics_count_requests_store_ops_and_resources,
        pagination_over_http,
    ],
    start_zone => [
        zone_refuses_global_owned_writes,
        zone_accepts_and_stamps_zone_owned_writes,
        zone_never_changes_what_came_from_elsewhere,
        zone_needs_the_mesh_from_global,
        zone_openapi_matches_the_routes,
        openapi_on_a_zone_lists_writes_of_zone_owned_kinds,
    ],
);

/// The zone the `zone_*` cases serve as.
const ZONE: &str = "east";

async fn start(backend: Backend) -> Server {
    start_as(backend, Plane::Global).await
}

/// Serve as zone `east`, with the `default` mesh already there (as KDS brings it from
/// global).
async fn start_zone(backend: Backend) -> Server {
    let s = start_as(
        backend,
        Plane::Zone {
            name: ZONE.to_string(),
        },
    )
    .await;
    s.store
        .create(from_elsewhere(Kind::Mesh, None, "default", None))
        .await
        .unwrap();
    s
}

async fn start_as(backend: Backend, plane: Plane) -> Server {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let store: Arc<dyn Store> = match backend {
        Backend::Memory => Arc::new(Memory::new()),
        Backend::Postgres => Arc::new(
            weft_global::pg::testing::TestStore::create()
                .await
                .expect("test database"),
        ),
    };
    let shutdown = CancellationToken::new();
    match plane {
        Plane::Global => {
            tokio::spawn(weft_global::serve(
                cfg,
                store.clone(),
                listener,
                shutdown.clone(),
            ));
        }
        Plane::Zone { .. } => {
            // What `weft_zone::serve` does (weft-zone depends on this crate, so the test
            // cannot call it): the same router, in the zone role, without the default mesh.
            let metrics = Arc::new(weft_global::metrics::Metrics::new());
            let state = api::State {
                store: Arc::new(weft_global::metrics::Instrumented::new(
                    store.clone(),
                    metrics.clone(),
                )),
                auth: weft_global::auth::Auth::bootstrap(store.clone(), dir.path())
                    .await
                    .unwrap(),
                metrics,
                plane,
                tokens: Arc::new(
                    weft_global::tokens::Tokens::bootstrap(Arc::new(Memory::new()))
                        .await
                        .unwrap(),
                ),
            };
            let stop = shutdown.clone();
            tokio::spawn(async move {
                axum::serve(listener, api::router(state))
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
            });
        }
    }
    let http = reqwest::Client::new();
    // Ready once the token files exist and /readyz answers.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Ok(r) = http.get(format!("{url}/readyz")).send().await
            && r.status() == StatusCode::OK
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "server did not become ready"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let read = |f: &str| {
        std::fs::read_to_string(dir.path().join(f))
            .unwrap()
            .trim()
            .to_string()
    };
    Server {
        admin: read("admin-token"),
        readonly: read("readonly-token"),
        url,
        http,
        store,
        shutdown,
        _dir: dir,
    }
}

/// A resource as KDS would store it on a zone: from global (`zone: None`) or from another
/// zone.
fn from_elsewhere(kind: Kind, mesh: Option<&str>, name: &str, zone: Option<&str>) -> Resource {
    let mut labels = std::collections::BTreeMap::new();
    match zone {
        None => {
            labels.insert(ORIGIN_LABEL.to_string(), "global".to_string());
        }
        Some(z) => {
            labels.insert(ORIGIN_LABEL.to_string(), "zone".to_string());
            labels.insert(ZONE_LABEL.to_string(), z.to_string());
        }
    }
    let doc = match kind {
        Kind::Mesh => json!({}),
        Kind::MeshTimeout => {
            json!({"to": [{"targetRef": {"kind": "Mesh"}, "default": {"idleTimeout": "1m"}}]})
        }
        Kind::Dataplane => {
            json!({"networking": {"address": "10.0.9.9", "inbound": [{"port": 8080, "tags": {"weft.io/service": "web"}}]}})
        }
        Kind::ZoneIngress => {
            json!({"zone": zone.unwrap_or("west"), "networking": {"address": "10.0.9.1", "port": 10001}})
        }
        other => unreachable!("no test spec for {other}"),
    };
    Resource::new(kind, mesh, name, labels, doc).expect("valid test resource")
}

impl Server {
    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.admin)
    }

    async fn apply_yaml(&self, yaml: &str) -> (StatusCode, Value) {
        let r = self
            .req(reqwest::Method::POST, "/_apply")
            .header("content-type", "application/yaml")
            .body(yaml.to_string())
            .send()
            .await
            .unwrap();
        (r.status(), r.json().await.unwrap())
    }

    async fn count(&self, kind: weft_core::Kind) -> usize {
        self.store
            .list(&weft_core::store::ListQuery::all(kind))
            .await
            .unwrap()
            .items
            .len()
    }
}

const TIMEOUT: &str = r#"
type: MeshTimeout
name: backend-timeouts
mesh: default
labels: {team: payments}
spec:
  targetRef: {kind: Mesh}
  to:
    - targetRef: {kind: MeshService, name: backend}
      default: {connectionTimeout: 2s, http: {requestTimeout: 5s}}
"#;

async fn default_mesh_exists_on_first_start(s: Server) {
    let r = s
        .req(reqwest::Method::GET, "/meshes/default")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["type"], "Mesh");
    assert_eq!(body["labels"]["weft.io/origin"], "global");
}

async fn authentication_and_roles(s: Server) {
    let anon = s
        .http
        .get(format!("{}/meshes", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), StatusCode::UNAUTHORIZED);
    let anon_write = s
        .http
        .post(format!("{}/_apply", s.url))
        .body(TIMEOUT)
        .send()
        .await
        .unwrap();
    assert_eq!(anon_write.status(), StatusCode::UNAUTHORIZED);
    let wrong = s
        .http
        .get(format!("{}/meshes", s.url))
        .bearer_auth("weft-admin-forged")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let ro = s
        .http
        .get(format!("{}/meshes", s.url))
        .bearer_auth(&s.readonly)
        .send()
        .await
        .unwrap();
    assert_eq!(ro.status(), StatusCode::OK);
    let ro_write = s
        .http
        .post(format!("{}/_apply", s.url))
        .bearer_auth(&s.readonly)
        .body(TIMEOUT)
        .send()
        .await
        .unwrap();
    assert_eq!(ro_write.status(), StatusCode::FORBIDDEN);
    assert_eq!(s.count(weft_core::Kind::MeshTimeout).await, 0);
    // Health, readiness, metrics and the OpenAPI document need no token.
    for p in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        assert_eq!(
            s.http
                .get(format!("{}{p}", s.url))
                .send()
                .await
                .unwrap()
                .status(),
            StatusCode::OK,
            "{p}"
        );
    }
}

async fn crud_with_versions(s: Server) {
    let path = "/meshes/default/meshtimeouts/backend-timeouts";
    let r = s
        .req(reqwest::Method::PUT, path)
        .header("content-type", "application/yaml")
        .body(TIMEOUT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()["etag"], "\"1\"");
    let got: Value = s
        .req(reqwest::Method::GET, path)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["version"], 1);
    assert_eq!(got["labels"]["team"], "payments");
    assert_eq!(got["labels"]["weft.io/origin"], "global");
    assert_eq!(
        got["spec"]["to"][0]["default"]["http"]["requestTimeout"],
        "5s"
    );
    // Same content again: unchanged, same version.
    let r = s
        .req(reqwest::Method::PUT, path)
        .header("content-type", "application/yaml")
        .body(TIMEOUT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["etag"], "\"1\"");
    // Body without type/name/mesh takes them from the URL; a mismatch is refused.
    let body = json!({"spec": {"targetRef": {"kind": "Mesh"}, "to": [{"targetRef": {"kind": "Mesh"}, "default": {"idleTimeout": "1m"}}]}});
    let r = s
        .req(reqwest::Method::PUT, path)
        .header("if-match", "1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["etag"], "\"2\"");
    let mut wrong = body.clone();
    wrong["name"] = json!("other");
    let r = s
        .req(reqwest::Method::PUT, path)
        .json(&wrong)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["errors"][0]["field"], "name");
    // Create-only on an existing resource.
    let r = s
        .req(reqwest::Method::PUT, path)
        .header("if-none-match", "*")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    // List, in the mesh and across meshes, with a selector.
    let list: Value = s
        .req(reqwest::Method::GET, "/meshes/default/meshtimeouts")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert!(list["next"].is_null());
    let list: Value = s
        .req(
            reqwest::Method::GET,
            "/meshtimeouts?labelSelector=team%3Dnobody",
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 0);
    // Delete with a stale version fails, then succeeds.
    let r = s
        .req(reqwest::Method::DELETE, path)
        .header("if-match", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let r = s.req(reqwest::Method::DELETE, path).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = s.req(reqwest::Method::GET, path).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let e: Value = r.json().await.unwrap();
    assert!(
        e["detail"].as_str().unwrap().contains("backend-timeouts"),
        "{e}"
    );
}

async fn two_writers_from_the_same_version_one_wins(s: Server) {
    let path = "/meshes/default/meshtimeouts/backend-timeouts";
    s.req(reqwest::Method::PUT, path)
        .header("content-type", "application/yaml")
        .body(TIMEOUT)
        .send()
        .await
        .unwrap();
    let a = TIMEOUT.replace("5s", "6s");
    let b = TIMEOUT.replace("5s", "7s");
    let (ra, rb) = tokio::join!(
        s.req(reqwest::Method::PUT, path)
            .header("content-type", "application/yaml")
            .header("if-match", "1")
            .body(a)
            .send(),
        s.req(reqwest::Method::PUT, path)
            .header("content-type", "application/yaml")
            .header("if-match", "1")
            .body(b)
            .send(),
    );
    let mut statuses = [ra.unwrap(), rb.unwrap()];
    statuses.sort_by_key(|r| r.status());
    let [ok, conflict] = statuses;
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(conflict.status(), StatusCode::CONFLICT);
    let e: Value = conflict.json().await.unwrap();
    assert!(
        e["detail"]
            .as_str()
            .unwrap()
            .contains("\"backend-timeouts\""),
        "{e}"
    );
}

async fn apply_summary_and_dry_run(s: Server) {
    let yaml = format!(
        "{TIMEOUT}---\ntype: Mesh\nname: other\n---\n{}",
        TIMEOUT.replace("mesh: default", "mesh: other")
    );
    let r = s
        .req(reqwest::Method::POST, "/_apply?dryRun=true")
        .header("content-type", "application/yaml")
        .body(yaml.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["summary"]["created"], 3);
    assert_eq!(
        s.count(weft_core::Kind::MeshTimeout).await,
        0,
        "dry run wrote nothing"
    );
    let (st, body) = s.apply_yaml(&yaml).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(
        body["summary"],
        json!({"created": 3, "updated": 0, "unchanged": 0})
    );
    let (_, body) = s.apply_yaml(&yaml.replace("2s", "3s")).await;
    assert_eq!(
        body["summary"],
        json!({"created": 0, "updated": 2, "unchanged": 1})
    );
    let inspect: Value = s
        .req(reqwest::Method::GET, "/_inspect/meshes")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let items = inspect["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["mesh"], "default");
    assert_eq!(items[0]["counts"]["MeshTimeout"], 1);
}

/// Every bad input is a 400 naming the field, and nothing of the request is stored.
async fn bad_input_names_the_field_and_stores_nothing(s: Server) {
    let ok_doc = "type: MeshTimeout\nname: fine\nmesh: default\nspec:\n  to:\n    - targetRef: {kind: Mesh}\n      default: {connectionTimeout: 1s}\n";
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "malformed YAML",
            "type: MeshTimeout\nname: [unclosed\n",
            "",
            "malformed YAML",
        ),
        (
            "unknown kind",
            "type: MeshTimeOut\nname: x\nmesh: default\nspec: {}\n",
            "type",
            "unknown kind",
        ),
        (
            "unknown field",
            "type: MeshTimeout\nname: x\nmesh: default\nspec:\n  to:\n    - targetRef: {kind: Mesh}\n      default: {connectTimeout: 1s}\n",
            "spec.to[0].default.connectTimeout",
            "unknown field",
        ),
        (
            "bad duration",
            "type: MeshTimeout\nname: x\nmesh: default\nspec:\n  to:\n    - targetRef: {kind: Mesh}\n      default: {http: {requestTimeout: 5 seconds}}\n",
            "spec.to[0].default.http.requestTimeout",
            "invalid duration \"5 seconds\"",
        ),
        (
            "name not a DNS label",
            "type: MeshTimeout\nname: Backend_Timeouts\nmesh: default\nspec:\n  to:\n    - targetRef: {kind: Mesh}\n      default: {idleTimeout: 1s}\n",
            "name",
            "DNS label",
        ),
        (
            "missing required field",
            "type: MeshTimeout\nmesh: default\nspec:\n  to:\n    - targetRef: {kind: Mesh}\n      default: {idleTimeout: 1s}\n",
            "",
            "missing field `name`",
        ),
        (
            "targetRef kind not allowed",
            "type: MeshTimeout\nname: x\nmesh: default\nspec:\n  from:\n    - targetRef: {kind: MeshExternalService, name: ext}\n      default: {idleTimeout: 1s}\n",
            "spec.from[0].targetRef.kind",
            "MeshExternalService is not allowed here",
        ),
        (
            "zone-owned kind",
            "type: Dataplane\nname: dp-1\nmesh: default\nspec: {}\n",
            "type",
            "owned by zones",
        ),
        (
            "missing mesh",
            "type: MeshTimeout\nname: x\nmesh: nowhere\nspec:\n  to:\n    - targetRef: {kind: Mesh}\n      default: {idleTimeout: 1s}\n",
            "mesh",
            "does not exist",
        ),
    ];
    for (what, bad, field, message) in cases {
        // The bad document comes after a good one: nothing may be half-applied.
        let (status, body) = s.apply_yaml(&format!("{ok_doc}---\n{bad}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {body}");
        let errors = body["errors"].as_array().unwrap();
        assert!(
            errors
                .iter()
                .any(|e| e["field"] == *field && e["message"].as_str().unwrap().contains(message)),
            "{what}: expected field {field:?} with {message:?}, got {body}"
        );
        assert!(
            body["detail"].as_str().unwrap().contains(message),
            "{what}: {body}"
        );
        assert_eq!(
            s.count(weft_core::Kind::MeshTimeout).await,
            0,
            "{what}: nothing stored"
        );
    }
}

async fn openapi_matches_the_routes(s: Server) {
    let doc: Value = s
        .http
        .get(format!("{}/openapi.json", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() > 40);
    for (path, ops) in paths {
        let concrete = path
            .replace("{mesh}", "default")
            .replace("{name}", "probe-name");
        for method in ops.as_object().unwrap().keys() {
            let m: reqwest::Method = method.to_uppercase().parse().unwrap();
            let mut req = s.req(m.clone(), &concrete);
            if m == reqwest::Method::PUT {
                req = req.header("if-match", "999").json(&json!({"spec": {}}));
            }
            if m == reqwest::Method::POST {
                req = req.header("content-type", "application/yaml").body("");
            }
            let r = req.send().await.unwrap();
            let status = r.status();
            let body = r.text().await.unwrap();
            // Served by a route: never the router's 404 "no such route" or a 405.
            assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert!(!body.contains("no such route"), "{method} {path}: {body}");
        }
    }
    // And a path it does not list is not served.
    let r = s
        .req(reqwest::Method::GET, "/meshes/default/meshtimeouts/x/y")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

async fn metrics_count_requests_store_ops_and_resources(s: Server) {
    s.apply_yaml(TIMEOUT).await;
    s.req(reqwest::Method::GET, "/meshes/default/meshtimeouts")
        .send()
        .await
        .unwrap();
    let text = s
        .http
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("weft_http_requests_total{method=\"GET\",route=\"/meshes/{mesh}/{plural}\",status=\"200\"} 1"), "{text}");
    assert!(
        text.contains(
            "weft_http_request_duration_seconds_count{method=\"POST\",route=\"/_apply\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains("weft_store_operation_duration_seconds_count{op=\"apply\",outcome=\"ok\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("weft_resources{kind=\"MeshTimeout\",mesh=\"default\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("weft_resources{kind=\"Mesh\",mesh=\"\"} 1"),
        "{text}"
    );
}

async fn pagination_over_http(s: Server) {
    let docs: Vec<String> = (0..250)
        .map(|i| TIMEOUT.replace("backend-timeouts", &format!("t{i:03}")))
        .collect();
    let (st, _) = s.apply_yaml(&docs.join("---\n")).await;
    assert_eq!(st, StatusCode::OK);
    let mut names = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let mut url = "/meshes/default/meshtimeouts?size=100".to_string();
        if let Some(n) = &next {
            url.push_str(&format!("&next={n}"));
        }
        let page: Value = s
            .req(reqwest::Method::GET, &url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        names.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["name"].as_str().unwrap().to_string()),
        );
        match page["next"].as_str() {
            Some(n) => next = Some(n.to_string()),
            None => break,
        }
    }
    assert_eq!(names.len(), 250);
    assert_eq!(names[0], "t000");
    assert_eq!(names[249], "t249");
    let r = s
        .req(reqwest::Method::GET, "/meshes/default/meshtimeouts?size=0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

// ---------------------------------------------------------------------------------------
// OpenAPI per plane

/// The methods the document lists for one `kind` resource.
fn methods_for_one(doc: &Value, kind: Kind) -> Vec<String> {
    let path = match kind.scope() {
        weft_core::Scope::Global => format!("/{}/{{name}}", kind.plural()),
        weft_core::Scope::Mesh => format!("/meshes/{{mesh}}/{}/{{name}}", kind.plural()),
    };
    let mut methods: Vec<String> = doc["paths"][&path]
        .as_object()
        .unwrap_or_else(|| panic!("{path} listed"))
        .keys()
        .cloned()
        .collect();
    methods.sort();
    methods
}

/// Writes are listed exactly for the kinds `plane` accepts; `/_apply` says which they are.
async fn openapi_lists_writes_for(s: &Server, plane: &Plane) -> Value {
    let doc: Value = s
        .http
        .get(format!("{}/openapi.json", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc, weft_global::openapi::document(plane));
    for &kind in Kind::ALL {
        let want: &[&str] = if plane.accepts(kind) {
            &["delete", "get", "put"]
        } else {
            &["get"]
        };
        assert_eq!(methods_for_one(&doc, kind), want, "{kind}");
    }
    let listed: Vec<(String, Vec<&str>)> = weft_global::openapi::paths(plane);
    assert_eq!(listed.len(), doc["paths"].as_object().unwrap().len());
    doc
}

async fn openapi_on_global_lists_writes_of_global_owned_kinds(s: Server) {
    let doc = openapi_lists_writes_for(&s, &Plane::Global).await;
    assert_eq!(doc["info"]["title"], "weft global control plane");
    let accepts = doc["paths"]["/_apply"]["post"]["description"]
        .as_str()
        .unwrap();
    assert!(
        accepts.contains("MeshTimeout") && !accepts.contains("Dataplane"),
        "{accepts}"
    );
    assert_eq!(methods_for_one(&doc, Kind::Mesh), ["delete", "get", "put"]);
    assert_eq!(methods_for_one(&doc, Kind::Dataplane), ["get"]);
}

async fn openapi_on_a_zone_lists_writes_of_zone_owned_kinds(s: Server) {
    let plane = Plane::Zone {
        name: ZONE.to_string(),
    };
    let doc = openapi_lists_writes_for(&s, &plane).await;
    assert_eq!(doc["info"]["title"], "weft zone control plane");
    let accepts = doc["paths"]["/_apply"]["post"]["description"]
        .as_str()
        .unwrap();
    assert_eq!(
        accepts,
        "Accepts Dataplane, ZoneIngress, ZoneEgress, MeshService."
    );
    assert_eq!(methods_for_one(&doc, Kind::Mesh), ["get"]);
    assert_eq!(methods_for_one(&doc, Kind::MeshTimeout), ["get"]);
    assert_eq!(
        methods_for_one(&doc, Kind::Dataplane),
        ["delete", "get", "put"]
    );
    assert_ne!(doc, weft_global::openapi::document(&Plane::Global));
}

async fn zone_openapi_matches_the_routes(s: Server) {
    openapi_matches_the_routes(s).await
}

// ---------------------------------------------------------------------------------------
// The zone role

const DATAPLANE: &str = include_str!("../../core/tests/fixtures/dataplane.yaml");
const ZONE_INGRESS: &str = include_str!("../../core/tests/fixtures/zoneingress.yaml");
const MESH_SERVICE: &str = include_str!("../../core/tests/fixtures/meshservice.yaml");

const GLOBAL_OWNED: &str = "MeshTimeout is owned by global and cannot be written on a zone control plane (apply it on global: weftctl apply against the global control plane)";

impl Server {
    async fn send_yaml(
        &self,
        method: reqwest::Method,
        path: &str,
        yaml: &str,
    ) -> (StatusCode, Value) {
        let r = self
            .req(method, path)
            .header("content-type", "application/yaml")
            .body(yaml.to_string())
            .send()
            .await
            .unwrap();
        (r.status(), r.json().await.unwrap())
    }

    async fn stored(&self, kind: Kind, mesh: Option<&str>, name: &str) -> Option<Resource> {
        self.store
            .get(&weft_core::Key::new(kind, mesh, name))
            .await
            .unwrap()
    }
}

async fn zone_refuses_global_owned_writes(s: Server) {
    // In a batch after a good Dataplane: the batch is refused whole, with global's message.
    let (status, body) = s.apply_yaml(&format!("{DATAPLANE}---\n{TIMEOUT}")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        body["errors"],
        json!([{"document": 2, "field": "type", "message": GLOBAL_OWNED}])
    );
    assert!(
        body["detail"].as_str().unwrap().contains(GLOBAL_OWNED),
        "{body}"
    );
    assert_eq!(s.count(Kind::MeshTimeout).await, 0);
    assert_eq!(s.count(Kind::Dataplane).await, 0, "nothing half-applied");
    // The same through PUT.
    let (status, body) = s
        .send_yaml(
            reqwest::Method::PUT,
            "/meshes/default/meshtimeouts/backend-timeouts",
            TIMEOUT,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["errors"][0]["message"], GLOBAL_OWNED);
    assert_eq!(s.count(Kind::MeshTimeout).await, 0);
    // Meshes come from global too.
    let (status, body) = s.apply_yaml("type: Mesh\nname: other\n").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("Mesh is owned by global and cannot be written on a zone control plane"),
        "{body}"
    );
    assert_eq!(s.count(Kind::Mesh).await, 1);
    // And a global-owned resource synced from global cannot be deleted here.
    s.store
        .create(from_elsewhere(
            Kind::MeshTimeout,
            Some("default"),
            "synced",
            None,
        ))
        .await
        .unwrap();
    let r = s
        .req(
            reqwest::Method::DELETE,
            "/meshes/default/meshtimeouts/synced",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains(
            "MeshTimeout is owned by global and cannot be deleted on a zone control plane"
        ),
        "{body}"
    );
    assert!(
        s.stored(Kind::MeshTimeout, Some("default"), "synced")
            .await
            .is_some()
    );
}

async fn zone_accepts_and_stamps_zone_owned_writes(s: Server) {
    // Whatever origin the document claims, the zone stamps its own; other labels stay.
    let claimed = DATAPLANE.replace(
        "labels: {weft.io/zone: east}",
        "labels: {weft.io/zone: west, weft.io/origin: global, team: web}",
    );
    assert_ne!(claimed, DATAPLANE);
    let path = "/meshes/default/dataplanes/backend-1";
    let (status, body) = s.send_yaml(reqwest::Method::PUT, path, &claimed).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let stamped = json!({"weft.io/origin": "zone", "weft.io/zone": ZONE, "team": "web"});
    assert_eq!(body["labels"], stamped);
    let stored = s
        .stored(Kind::Dataplane, Some("default"), "backend-1")
        .await
        .unwrap();
    assert_eq!(stored.labels["weft.io/origin"], "zone");
    assert_eq!(stored.labels["weft.io/zone"], ZONE);
    assert_eq!(stored.spec["networking"]["address"], "10.0.1.15");
    // Batch apply of the other zone-owned kinds.
    let (status, body) = s
        .apply_yaml(&format!("{ZONE_INGRESS}---\n{MESH_SERVICE}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["summary"],
        json!({"created": 2, "updated": 0, "unchanged": 0})
    );
    let ingress: Value = s
        .req(reqwest::Method::GET, "/zoneingresses/east-ingress")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ingress["labels"]["weft.io/origin"], "zone");
    assert_eq!(ingress["labels"]["weft.io/zone"], ZONE);
    // The zone's own resources can be changed and deleted.
    let (status, body) = s
        .send_yaml(
            reqwest::Method::PUT,
            path,
            &claimed.replace("10.0.1.15", "10.0.1.16"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["version"], 2);
    let r = s.req(reqwest::Method::DELETE, path).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(s.count(Kind::Dataplane).await, 0);
}

async fn zone_never_changes_what_came_from_elsewhere(s: Server) {
    s.store
        .create(from_elsewhere(
            Kind::Dataplane,
            Some("default"),
            "from-global",
            None,
        ))
        .await
        .unwrap();
    s.store
        .create(from_elsewhere(
            Kind::ZoneIngress,
            None,
            "west-ingress",
            Some("west"),
        ))
        .await
        .unwrap();
    for (path, origin) in [
        ("/meshes/default/dataplanes/from-global", "global"),
        ("/zoneingresses/west-ingress", "zone \"west\""),
    ] {
        for if_match in [None, Some("1")] {
            let mut req = s.req(reqwest::Method::DELETE, path);
            if let Some(v) = if_match {
                req = req.header("if-match", v);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{path}");
            let body: Value = r.json().await.unwrap();
            let detail = body["detail"].as_str().unwrap();
            assert!(
                detail.contains(&format!(
                    "came from {origin} and cannot be deleted on zone \"east\""
                )),
                "{path}: {body}"
            );
        }
    }
    // Not overwritten through PUT ...
    let (status, body) = s
        .send_yaml(
            reqwest::Method::PUT,
            "/meshes/default/dataplanes/from-global",
            &DATAPLANE.replace("backend-1", "from-global"),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["errors"][0]["field"], "name");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("came from global and cannot be changed on zone \"east\""),
        "{body}"
    );
    // ... nor through apply, where the zone's own document in the batch is not applied either.
    let own = DATAPLANE.replace("backend-1", "own-1");
    let foreign = ZONE_INGRESS.replace("east-ingress", "west-ingress");
    let (status, body) = s.apply_yaml(&format!("{own}---\n{foreign}")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["errors"][0]["document"], 2, "{body}");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("came from zone \"west\" and cannot be changed"),
        "{body}"
    );
    // Everything is as it was.
    assert_eq!(s.count(Kind::Dataplane).await, 1);
    let dp = s
        .stored(Kind::Dataplane, Some("default"), "from-global")
        .await
        .unwrap();
    assert_eq!(dp.meta.version, 1);
    assert_eq!(dp.labels["weft.io/origin"], "global");
    let ingress = s
        .stored(Kind::ZoneIngress, None, "west-ingress")
        .await
        .unwrap();
    assert_eq!(ingress.meta.version, 1);
    assert_eq!(ingress.labels["weft.io/zone"], "west");
}

async fn zone_needs_the_mesh_from_global(s: Server) {
    let (status, body) = s
        .apply_yaml(&DATAPLANE.replace("mesh: default", "mesh: payments"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["errors"][0]["field"], "mesh");
    assert!(
        body["errors"][0]["message"].as_str().unwrap().contains(
            "mesh \"payments\" does not exist on this zone (meshes are created on global"
        ),
        "{body}"
    );
    assert_eq!(s.count(Kind::Dataplane).await, 0);
}
