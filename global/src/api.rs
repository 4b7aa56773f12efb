//! The REST API (see docs/api.md): CRUD for every kind, batch apply, inspect, health,
//! readiness, metrics and the OpenAPI document. Store errors become HTTP statuses here and
//! only here.
//!
//! Global and every zone control plane serve this same API; [`Plane`] says which one is
//! serving, and so which kinds it accepts writes to (the kind table's owner) and which origin
//! it stamps on them.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State as Extract};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use weft_core::document::{self, ParseError};
use weft_core::store::{self, ListQuery, Outcome, Store};
use weft_core::{Invalid, Key, Kind, ORIGIN_LABEL, Owner, Resource, Scope, ZONE_LABEL};

use crate::auth::{Auth, Role};
use crate::metrics::{HttpLabels, Metrics, RouteLabels};

/// Largest request body: a 10,000-policy apply fits comfortably.
pub const MAX_BODY: usize = 64 << 20;
/// Largest page of a list.
pub const MAX_PAGE: usize = 1000;
const DEFAULT_PAGE: usize = 100;

/// The control plane serving the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plane {
    /// Global: writes global-owned kinds (meshes, policies, zones) and stamps
    /// `weft.io/origin: global` on them.
    Global,
    /// The zone control plane of zone `name`: writes zone-owned kinds (dataplanes, ingresses,
    /// egresses, services) and stamps `weft.io/origin: zone` and `weft.io/zone: <name>`.
    Zone { name: String },
}

impl Plane {
    /// The owner of the kinds this plane may write.
    pub fn owner(&self) -> Owner {
        match self {
            Plane::Global => Owner::Global,
            Plane::Zone { .. } => Owner::Zone,
        }
    }

    /// Whether this plane accepts writes (and deletes) of `kind`.
    pub fn accepts(&self, kind: Kind) -> bool {
        kind.owner() == self.owner()
    }

    /// The origin labels this plane stamps on what it writes, replacing any sent.
    pub fn stamp(&self, mut r: Resource) -> Resource {
        match self {
            Plane::Global => {
                r.labels
                    .insert(ORIGIN_LABEL.to_string(), "global".to_string());
                r.labels.remove(ZONE_LABEL);
            }
            Plane::Zone { name } => {
                r.labels
                    .insert(ORIGIN_LABEL.to_string(), "zone".to_string());
                r.labels.insert(ZONE_LABEL.to_string(), name.clone());
            }
        }
        r
    }

    /// Where a stored resource came from, when that is not this plane (`global`, or
    /// `zone "west"`). Such a resource is never changed or deleted here: a zone holds global's
    /// resources and other zones' resources, synced over KDS. On global, the kinds it accepts
    /// are written by nobody else, so nothing there is foreign.
    pub fn foreign_origin(&self, r: &Resource) -> Option<String> {
        let Plane::Zone { name } = self else {
            return None;
        };
        let origin = r.labels.get(ORIGIN_LABEL).map(String::as_str);
        match (origin, r.labels.get(ZONE_LABEL)) {
            (Some("global"), _) => Some("global".to_string()),
            (_, Some(zone)) if zone != name => Some(format!("zone {zone:?}")),
            _ => None,
        }
    }

    fn describe(&self) -> String {
        match self {
            Plane::Global => "global".to_string(),
            Plane::Zone { name } => format!("zone {name:?}"),
        }
    }
}

#[derive(Clone)]
pub struct State {
    pub store: Arc<dyn Store>,
    pub auth: Auth,
    pub metrics: Arc<Metrics>,
    pub plane: Plane,
    pub tokens: Arc<crate::tokens::Tokens>,
}

pub fn router(state: State) -> Router {
    router_with(state, Router::new())
}

/// [`router`] with `extra` routes of the serving plane (e.g. the zone's `/_identity/meshes`),
/// behind the same authentication: any token reads, the admin token writes.
pub fn router_with(state: State, extra: Router<State>) -> Router {
    let openapi = Arc::new(crate::openapi::document(&state.plane));
    let mut api = Router::new()
        .route("/_apply", post(apply))
        .route("/_inspect/meshes", get(inspect_meshes))
        .route("/_inspect/services", get(inspect_services))
        .route("/meshes/{mesh}/{plural}", get(list_in_mesh))
        .route(
            "/meshes/{mesh}/{plural}/{name}",
            get(get_in_mesh).put(put_in_mesh).delete(delete_in_mesh),
        )
        .route("/{plural}", get(list_top))
        .route(
            "/{plural}/{name}",
            get(get_top).put(put_top).delete(delete_top),
        );
    if state.plane == Plane::Global {
        // Zone tokens are issued and revoked on global only, and only global sees zones.
        api = api
            .merge(crate::tokens::routes())
            .route("/_inspect/zones", get(inspect_zones));
    } else {
        api = api.route(
            "/_tokens/{*rest}",
            any(|| async {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not found",
                    "zone tokens are issued and revoked on global, not on a zone control plane",
                )
            }),
        );
    }
    let api = api
        .merge(extra)
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    let open = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/openapi.json",
            get(move || async move { Json(openapi.as_ref().clone()) }),
        );
    api.merge(open)
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not found",
                "no such route (see /openapi.json)",
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

// ---------------------------------------------------------------------------------------
// Errors

#[derive(Debug, Serialize)]
pub struct ErrorItem {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub document: Option<usize>,
    pub field: String,
    pub message: String,
}

/// The one error body every route answers with.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub title: &'static str,
    pub detail: String,
    pub errors: Vec<ErrorItem>,
}

impl ApiError {
    pub fn new(status: StatusCode, title: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            title,
            detail: detail.into(),
            errors: Vec::new(),
        }
    }

    fn bad_request(field: &str, message: impl Into<String>) -> ApiError {
        ApiError::from(Invalid::one(field, message))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "status": self.status.as_u16(),
            "title": self.title,
            "detail": self.detail,
            "errors": self.errors,
        });
        (self.status, Json(body)).into_response()
    }
}

impl From<Invalid> for ApiError {
    fn from(i: Invalid) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            title: "invalid resource",
            detail: i.to_string(),
            errors: i
                .errors
                .into_iter()
                .map(|e| ErrorItem {
                    document: None,
                    field: e.field,
                    message: e.message,
                })
                .collect(),
        }
    }
}

impl From<ParseError> for ApiError {
    fn from(p: ParseError) -> ApiError {
        let detail = p.to_string();
        let errors =
            p.0.into_iter()
                .flat_map(|d| {
                    let index = d.index;
                    d.invalid.errors.into_iter().map(move |e| ErrorItem {
                        document: Some(index),
                        field: e.field,
                        message: e.message,
                    })
                })
                .collect();
        ApiError {
            status: StatusCode::BAD_REQUEST,
            title: "invalid resource",
            detail,
            errors,
        }
    }
}

impl From<store::Error> for ApiError {
    fn from(e: store::Error) -> ApiError {
        let detail = e.to_string();
        match e {
            store::Error::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "not found", detail),
            store::Error::Conflict { .. } | store::Error::AlreadyExists(_) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", detail)
            }
            store::Error::Invalid(i) => ApiError::from(i),
            store::Error::Compacted { .. } => ApiError::new(StatusCode::GONE, "gone", detail),
            store::Error::Backend(_) => {
                tracing::warn!(error = %detail, "store request failed");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store unavailable",
                    format!("{detail} (retry later)"),
                )
            }
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

// ---------------------------------------------------------------------------------------
// Middleware

/// Needs a bearer token; writes need the admin role.
async fn authenticate(Extract(state): Extract<State>, req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(token) = token else {
        return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "missing token: send Authorization: Bearer <token> (the admin token is in <data-dir>/admin-token)").into_response();
    };
    let Some(role) = state.auth.check(token) else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "invalid or rotated token",
        )
        .into_response();
    };
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    if !read && !role.can_write() {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("the {} token can only read", role.name()),
        )
        .into_response();
    }
    debug_assert!(read || role == Role::Admin);
    next.run(req).await
}

/// Count and time every request.
async fn observe(Extract(state): Extract<State>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let uri = req.uri().path().to_string();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let elapsed = start.elapsed();
    state
        .metrics
        .http_requests
        .get_or_create(&HttpLabels {
            method: method.clone(),
            route: route.clone(),
            status,
        })
        .inc();
    state
        .metrics
        .http_duration
        .get_or_create(&RouteLabels {
            method: method.clone(),
            route,
        })
        .observe(elapsed.as_secs_f64());
    if status >= 500 {
        tracing::warn!(%method, path = %uri, status, ms = elapsed.as_millis() as u64, "request failed");
    } else {
        tracing::debug!(%method, path = %uri, status, ms = elapsed.as_millis() as u64, "request");
    }
    resp
}

// ---------------------------------------------------------------------------------------
// Health and metrics

async fn readyz(Extract(state): Extract<State>) -> Response {
    match tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Err(e)) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")).into_response()
        }
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: store did not answer within 2s\n",
        )
            .into_response(),
    }
}

async fn metrics(Extract(state): Extract<State>) -> Response {
    let text = state.metrics.render(&*state.store).await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------
// Reads

fn kind_of(plural: &str) -> ApiResult<Kind> {
    Kind::ALL
        .iter()
        .copied()
        .find(|k| k.plural() == plural)
        .ok_or_else(|| {
            let all: Vec<&str> = Kind::ALL.iter().map(|k| k.plural()).collect();
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not found",
                format!(
                    "unknown resource type {plural:?} (expected one of {})",
                    all.join(", ")
                ),
            )
        })
}

fn mesh_scoped(plural: &str) -> ApiResult<Kind> {
    let kind = kind_of(plural)?;
    if kind.scope() != Scope::Mesh {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not found",
            format!("{kind} is not mesh-scoped: use /{plural}"),
        ));
    }
    Ok(kind)
}

fn global_scoped(plural: &str) -> ApiResult<Kind> {
    let kind = kind_of(plural)?;
    if kind.scope() != Scope::Global {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not found",
            format!("{kind} is mesh-scoped: use /meshes/{{mesh}}/{plural}/{{name}}"),
        ));
    }
    Ok(kind)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListParams {
    label_selector: Option<String>,
    size: Option<usize>,
    next: Option<String>,
}

async fn list(
    state: &State,
    kind: Kind,
    mesh: Option<String>,
    p: ListParams,
) -> ApiResult<Json<Value>> {
    let selector = match &p.label_selector {
        Some(s) => s
            .parse()
            .map_err(|e: String| ApiError::bad_request("labelSelector", e))?,
        None => Default::default(),
    };
    let size = p.size.unwrap_or(DEFAULT_PAGE);
    if size == 0 || size > MAX_PAGE {
        return Err(ApiError::bad_request(
            "size",
            format!("must be 1-{MAX_PAGE}"),
        ));
    }
    let q = ListQuery {
        kind,
        mesh,
        selector,
        limit: Some(size),
        after: p.next,
    };
    let page = state.store.list(&q).await?;
    let items: Vec<Value> = page.items.iter().map(document::to_value).collect();
    Ok(Json(json!({ "items": items, "next": page.next })))
}

async fn list_top(
    Extract(state): Extract<State>,
    Path(plural): Path<String>,
    Query(p): Query<ListParams>,
) -> ApiResult<Json<Value>> {
    let kind = kind_of(&plural)?;
    list(&state, kind, None, p).await
}

async fn list_in_mesh(
    Extract(state): Extract<State>,
    Path((mesh, plural)): Path<(String, String)>,
    Query(p): Query<ListParams>,
) -> ApiResult<Json<Value>> {
    let kind = mesh_scoped(&plural)?;
    list(&state, kind, Some(mesh), p).await
}

fn with_etag(status: StatusCode, r: &Resource) -> Response {
    let mut resp = (status, Json(document::to_value(r))).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", r.meta.version)) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

async fn fetch(state: &State, key: Key) -> ApiResult<Response> {
    match state.store.get(&key).await? {
        Some(r) => Ok(with_etag(StatusCode::OK, &r)),
        None => Err(store::Error::NotFound(key).into()),
    }
}

async fn get_top(
    Extract(state): Extract<State>,
    Path((plural, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    let kind = global_scoped(&plural)?;
    fetch(&state, Key::new(kind, None, &name)).await
}

async fn get_in_mesh(
    Extract(state): Extract<State>,
    Path((mesh, plural, name)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    let kind = mesh_scoped(&plural)?;
    fetch(&state, Key::new(kind, Some(&mesh), &name)).await
}

/// Every zone with its connection insight: online/offline, last seen, version, what global
/// holds from it, per-kind KDS counts and the last NACK.
async fn inspect_zones(Extract(state): Extract<State>) -> ApiResult<Json<Value>> {
    let now = chrono::Utc::now();
    let mut items = Vec::new();
    for z in store::list_all(&*state.store, ListQuery::all(Kind::Zone)).await? {
        let insight = crate::kds::read_insight(&*state.store, &z.name)
            .await?
            .unwrap_or_default();
        let mut resources = 0usize;
        for kind in weft_core::kds::kinds(weft_core::kds::Direction::ZoneToGlobal) {
            let mut q = ListQuery::all(kind);
            q.selector = format!("{ZONE_LABEL}={}", z.name)
                .parse()
                .map_err(|e: String| ApiError::bad_request("zone", e))?;
            resources += store::list_all(&*state.store, q).await?.len();
        }
        let enabled = z
            .spec
            .get("enabled")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let status = if !enabled {
            "disabled"
        } else if insight.online(now) {
            "online"
        } else {
            "offline"
        };
        items.push(json!({
            "name": z.name,
            "enabled": enabled,
            "status": status,
            "lastSeen": insight.last_seen,
            "connectedSince": insight.connected_since,
            "version": insight.version,
            "globalInstance": insight.global_instance,
            "resources": resources,
            "kinds": insight.kinds,
            "lastNack": insight.last_nack,
            "lastDisconnect": insight.last_disconnect,
        }));
    }
    Ok(Json(json!({ "items": items })))
}

async fn inspect_meshes(Extract(state): Extract<State>) -> ApiResult<Json<Value>> {
    let counts = state.store.counts().await?;
    let mut by_mesh = store::counts_by_mesh(&counts);
    // Every mesh appears, also an empty one.
    for m in store::list_all(&*state.store, ListQuery::all(Kind::Mesh)).await? {
        by_mesh.entry(m.name).or_default();
    }
    let items: Vec<Value> = by_mesh
        .into_iter()
        .map(|(mesh, counts)| {
            let total: u64 = counts.values().sum();
            let counts: BTreeMap<&str, u64> =
                counts.into_iter().map(|(k, n)| (k.name(), n)).collect();
            json!({"mesh": mesh, "counts": counts, "total": total})
        })
        .collect();
    Ok(Json(json!({ "items": items })))
}

/// `GET /_inspect/services`: every service of every mesh from the MeshServices the zones
/// report (`status.instances`), grouped by (mesh, service). Global allocates no VIPs (each
/// zone has its own), so `vip` is null here; a zone's answer has the same shape with its VIP.
async fn inspect_services(Extract(state): Extract<State>) -> ApiResult<Json<Value>> {
    let services = store::list_all(&*state.store, ListQuery::all(Kind::MeshService)).await?;
    Ok(Json(services_summary(&services)))
}

/// The `/_inspect/services` answer for a set of MeshServices.
pub fn services_summary(services: &[Resource]) -> Value {
    #[derive(Default)]
    struct Entry {
        zones: BTreeMap<String, u64>,
        ports: std::collections::BTreeSet<u64>,
    }
    let mut by: BTreeMap<(String, String), Entry> = BTreeMap::new();
    for r in services {
        let zone = r.labels.get(ZONE_LABEL).cloned().unwrap_or_default();
        let service = r
            .spec
            .pointer("/selector/dataplaneTags/weft.io~1service")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| {
                r.name
                    .strip_suffix(&format!(".{zone}"))
                    .unwrap_or(&r.name)
                    .to_string()
            });
        let e = by
            .entry((r.mesh.clone().unwrap_or_default(), service))
            .or_default();
        let instances = r
            .spec
            .pointer("/status/instances")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        *e.zones.entry(zone).or_default() += instances;
        for p in r
            .spec
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(port) = p.get("port").and_then(Value::as_u64) {
                e.ports.insert(port);
            }
        }
    }
    let items: Vec<Value> = by
        .into_iter()
        .map(|((mesh, service), e)| {
            let instances: u64 = e.zones.values().sum();
            let zones: Vec<Value> = e
                .zones
                .into_iter()
                .map(|(zone, n)| json!({"zone": zone, "instances": n}))
                .collect();
            json!({"mesh": mesh, "service": service, "zones": zones, "instances": instances, "vip": null, "ports": e.ports})
        })
        .collect();
    json!({ "items": items })
}

// ---------------------------------------------------------------------------------------
// Writes

fn is_yaml(headers: &HeaderMap, body: &[u8]) -> bool {
    match headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        Some(ct) if ct.contains("yaml") => true,
        Some(ct) if ct.contains("json") => false,
        _ => !matches!(
            body.iter().find(|b| !b.is_ascii_whitespace()),
            Some(b'{') | Some(b'[')
        ),
    }
}

fn body_text(body: &Bytes) -> ApiResult<&str> {
    std::str::from_utf8(body).map_err(|_| ApiError::bad_request("", "request body is not UTF-8"))
}

/// Refuse kinds this plane may not write (before looking at their spec: that is the useful
/// message).
fn writable(plane: &Plane, kind: Kind) -> Result<(), Invalid> {
    if plane.accepts(kind) {
        return Ok(());
    }
    Err(Invalid::one(
        "type",
        match plane {
            Plane::Global => format!(
                "{kind} is owned by zones and cannot be written on global (apply it on the zone's control plane)"
            ),
            Plane::Zone { .. } => format!(
                "{kind} is owned by global and cannot be written on a zone control plane (apply it on global: weftctl apply against the global control plane)"
            ),
        },
    ))
}

/// Refuse to change or delete a stored resource that came from elsewhere (see
/// [`Plane::foreign_origin`]); `verb` is `changed` or `deleted`.
fn not_foreign(plane: &Plane, stored: &Resource, verb: &str) -> Result<(), Invalid> {
    match plane.foreign_origin(stored) {
        None => Ok(()),
        Some(origin) => Err(Invalid::one(
            "name",
            format!(
                "{} came from {origin} and cannot be {verb} on {} (it is synced from {origin}: change it there)",
                stored.key(),
                plane.describe(),
            ),
        )),
    }
}

/// The stored resources for `keys`, read only on a zone: on global nothing is foreign (see
/// [`Plane::foreign_origin`]), so global skips the reads.
///
/// The check and the write that follows are not one transaction; on a zone the only other
/// writer is the KDS client, whose next sync puts a foreign resource back.
async fn stored_on_zone(state: &State, keys: &[Key]) -> ApiResult<Vec<Option<Resource>>> {
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        out.push(match state.plane {
            Plane::Global => None,
            Plane::Zone { .. } => state.store.get(key).await?,
        });
    }
    Ok(out)
}

/// Check that the meshes named exist (in the store, or created by the same batch).
async fn check_meshes(state: &State, resources: &[Resource]) -> ApiResult<Vec<Option<Invalid>>> {
    let in_batch: HashSet<&str> = resources
        .iter()
        .filter(|r| r.kind == Kind::Mesh)
        .map(|r| r.name.as_str())
        .collect();
    let mut known: BTreeMap<String, bool> = BTreeMap::new();
    let mut out = Vec::with_capacity(resources.len());
    for r in resources {
        let Some(mesh) = r.mesh.as_deref() else {
            out.push(None);
            continue;
        };
        if in_batch.contains(mesh) {
            out.push(None);
            continue;
        }
        let exists = match known.get(mesh) {
            Some(e) => *e,
            None => {
                let e = state
                    .store
                    .get(&Key::new(Kind::Mesh, None, mesh))
                    .await?
                    .is_some();
                known.insert(mesh.to_string(), e);
                e
            }
        };
        out.push((!exists).then(|| {
            Invalid::one(
                "mesh",
                match state.plane {
                    Plane::Global => format!("mesh {mesh:?} does not exist (create it first)"),
                    Plane::Zone { .. } => format!(
                        "mesh {mesh:?} does not exist on this zone (meshes are created on global and reach zones over KDS)"
                    ),
                },
            )
        }));
    }
    Ok(out)
}

/// Parse a single-document body, filling `type`, `name` and `mesh` from the path.
fn parse_one(
    headers: &HeaderMap,
    body: &Bytes,
    kind: Kind,
    mesh: Option<&str>,
    name: &str,
) -> ApiResult<Resource> {
    let text = body_text(body)?;
    let values = if is_yaml(headers, body) {
        document::yaml_values(text)?
    } else {
        document::json_values(text)?
    };
    let mut value = match <[Value; 1]>::try_from(values) {
        Ok([v]) => v,
        Err(v) => {
            return Err(ApiError::bad_request(
                "",
                format!("expected one document, got {}", v.len()),
            ));
        }
    };
    let Some(obj) = value.as_object_mut() else {
        return Err(ApiError::bad_request("", "expected a resource object"));
    };
    let mut expect = vec![
        ("type", kind.name().to_string()),
        ("name", name.to_string()),
    ];
    if let Some(m) = mesh {
        expect.push(("mesh", m.to_string()));
    }
    for (field, want) in expect {
        match obj.get(field) {
            None => {
                obj.insert(field.to_string(), Value::String(want));
            }
            Some(Value::String(got)) if *got == want => {}
            Some(got) => {
                return Err(ApiError::bad_request(
                    field,
                    format!("{got} does not match the URL ({want:?})"),
                ));
            }
        }
    }
    Ok(document::from_value(value)?)
}

fn version_header(headers: &HeaderMap, name: header::HeaderName) -> ApiResult<Option<String>> {
    headers
        .get(&name)
        .map(|v| {
            v.to_str().map(|s| {
                s.trim()
                    .trim_start_matches("W/")
                    .trim_matches('"')
                    .to_string()
            })
        })
        .transpose()
        .map_err(|_| ApiError::bad_request(name.as_str(), "not valid text"))
}

async fn put(
    state: &State,
    headers: HeaderMap,
    body: Bytes,
    kind: Kind,
    mesh: Option<&str>,
    name: &str,
) -> ApiResult<Response> {
    writable(&state.plane, kind)?;
    let r = state
        .plane
        .stamp(parse_one(&headers, &body, kind, mesh, name)?);
    if let Some(Some(invalid)) = check_meshes(state, std::slice::from_ref(&r)).await?.pop() {
        return Err(invalid.into());
    }
    if let Some(Some(stored)) = stored_on_zone(state, &[r.key()]).await?.pop() {
        not_foreign(&state.plane, &stored, "changed")?;
    }
    if let Some(v) = version_header(&headers, header::IF_MATCH)? {
        let expected: u64 = v.parse().map_err(|_| {
            ApiError::bad_request("If-Match", format!("{v:?} is not a version number"))
        })?;
        let r = state.store.update(r, expected).await?;
        return Ok(with_etag(StatusCode::OK, &r));
    }
    if version_header(&headers, header::IF_NONE_MATCH)?.as_deref() == Some("*") {
        let r = state.store.create(r).await?;
        return Ok(with_etag(StatusCode::CREATED, &r));
    }
    let outcome = state
        .store
        .apply(vec![r], false)
        .await?
        .pop()
        .expect("one outcome per resource");
    let status = if matches!(outcome, Outcome::Created(_)) {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(with_etag(status, outcome.resource()))
}

async fn put_top(
    Extract(state): Extract<State>,
    Path((plural, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let kind = global_scoped(&plural)?;
    put(&state, headers, body, kind, None, &name).await
}

async fn put_in_mesh(
    Extract(state): Extract<State>,
    Path((mesh, plural, name)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let kind = mesh_scoped(&plural)?;
    put(&state, headers, body, kind, Some(&mesh), &name).await
}

async fn delete(state: &State, headers: HeaderMap, key: Key) -> ApiResult<Json<Value>> {
    let kind = key.kind;
    if !state.plane.accepts(kind) {
        return Err(ApiError::bad_request(
            "type",
            match state.plane {
                Plane::Global => {
                    format!("{kind} is owned by zones and cannot be deleted on global")
                }
                Plane::Zone { .. } => format!(
                    "{kind} is owned by global and cannot be deleted on a zone control plane (delete it on global: weftctl delete against the global control plane)"
                ),
            },
        ));
    }
    let mut expected = match version_header(&headers, header::IF_MATCH)? {
        Some(v) => Some(v.parse().map_err(|_| {
            ApiError::bad_request("If-Match", format!("{v:?} is not a version number"))
        })?),
        None => None,
    };
    if let Some(Some(stored)) = stored_on_zone(state, std::slice::from_ref(&key))
        .await?
        .pop()
    {
        not_foreign(&state.plane, &stored, "deleted")?;
        // Delete the version checked, so a sync landing in between is not deleted unseen.
        expected.get_or_insert(stored.meta.version);
    }
    state.store.delete(&key, expected).await?;
    Ok(Json(json!({})))
}

async fn delete_top(
    Extract(state): Extract<State>,
    Path((plural, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let kind = global_scoped(&plural)?;
    delete(&state, headers, Key::new(kind, None, &name)).await
}

async fn delete_in_mesh(
    Extract(state): Extract<State>,
    Path((mesh, plural, name)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let kind = mesh_scoped(&plural)?;
    delete(&state, headers, Key::new(kind, Some(&mesh), &name)).await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApplyParams {
    #[serde(default)]
    dry_run: bool,
}

/// Validate every document, then write all of them in one transaction, or none.
async fn apply(
    Extract(state): Extract<State>,
    Query(p): Query<ApplyParams>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let text = body_text(&body)?;
    let values = if is_yaml(&headers, &body) {
        document::yaml_values(text)?
    } else {
        document::json_values(text)?
    };
    let mut errors = Vec::new();
    let mut resources = Vec::with_capacity(values.len());
    let mut described = Vec::with_capacity(values.len());
    for (i, v) in values.into_iter().enumerate() {
        let what = document::describe(&v);
        let owner_check = v
            .get("type")
            .and_then(Value::as_str)
            .and_then(Kind::from_name)
            .map_or(Ok(()), |kind| writable(&state.plane, kind));
        match owner_check.and_then(|()| document::from_value(v)) {
            Ok(r) => {
                resources.push(state.plane.stamp(r));
                described.push((i + 1, what));
            }
            Err(invalid) => errors.push(document::DocumentError {
                index: i + 1,
                what,
                invalid,
            }),
        }
    }
    let mesh_checks = check_meshes(&state, &resources).await?;
    let keys: Vec<Key> = resources.iter().map(Resource::key).collect();
    let stored = stored_on_zone(&state, &keys).await?;
    let mut seen = HashSet::new();
    for (((r, mesh_check), stored), (index, what)) in
        resources.iter().zip(mesh_checks).zip(stored).zip(described)
    {
        let mut problems = mesh_check.unwrap_or_default();
        if let Some(Err(foreign)) = stored.map(|s| not_foreign(&state.plane, &s, "changed")) {
            problems.errors.extend(foreign.errors);
        }
        if !seen.insert(r.key()) {
            problems.add("name", format!("{} appears twice in this request", r.key()));
        }
        if !problems.is_empty() {
            errors.push(document::DocumentError {
                index,
                what,
                invalid: problems,
            });
        }
    }
    if !errors.is_empty() {
        errors.sort_by_key(|e| e.index);
        return Err(ParseError(errors).into());
    }
    let admitted = resources;
    let outcomes = state.store.apply(admitted, p.dry_run).await?;
    let mut summary: BTreeMap<&str, usize> =
        [("created", 0), ("updated", 0), ("unchanged", 0)].into();
    let results: Vec<Value> = outcomes
        .iter()
        .map(|o| {
            *summary.entry(o.action()).or_default() += 1;
            let r = o.resource();
            json!({"type": r.kind.name(), "mesh": r.mesh, "name": r.name, "action": o.action(), "version": r.meta.version})
        })
        .collect();
    if !p.dry_run {
        tracing::info!(
            created = summary["created"],
            updated = summary["updated"],
            unchanged = summary["unchanged"],
            "applied resources"
        );
    }
    Ok(Json(
        json!({"dryRun": p.dry_run, "results": results, "summary": summary}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, zone: &str, instances: u32, port: u16) -> Resource {
        let labels = [(ZONE_LABEL.to_string(), zone.to_string())].into();
        let spec = json!({
            "selector": {"dataplaneTags": {"weft.io/service": "backend"}},
            "ports": [{"port": port}],
            "status": {"instances": instances}
        });
        // Global stores a zone's resources as `<name>.<zone>` (not a valid name to write).
        let mut r =
            Resource::new(Kind::MeshService, Some("payments"), "backend", labels, spec).unwrap();
        r.name = name.to_string();
        r
    }

    #[test]
    fn services_are_grouped_across_zones() {
        let out = services_summary(&[
            service("backend.east", "east", 1, 8080),
            service("backend.west", "west", 2, 8080),
        ]);
        assert_eq!(
            out,
            json!({"items": [{"mesh": "payments", "service": "backend",
                "zones": [{"zone": "east", "instances": 1}, {"zone": "west", "instances": 2}],
                "instances": 3, "vip": null, "ports": [8080]}]})
        );
    }
}
