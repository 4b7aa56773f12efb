//! Prometheus metrics of weft-global: HTTP requests and latencies, store operation
//! latencies, and resource counts by kind and mesh (read from the store at scrape time).

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use weft_core::store::{Count, Event, ListQuery, Outcome, Page, Result, Store};
use weft_core::{Key, Resource};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: String,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    pub kind: String,
    pub mesh: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs .. ~6.5 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: HistogramFamily<RouteLabels>,
    pub store_duration: HistogramFamily<OpLabels>,
    resources: Family<ResourceLabels, Gauge>,
    /// More metrics in text form, rendered by their owner (e.g. the zone's KDS link).
    extra: std::sync::OnceLock<Extra>,
}

type Extra = Box<dyn Fn() -> String + Send + Sync>;

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("weft");
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP API requests by method, route and status",
            http_requests.clone(),
        );
        let http_duration: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "http_request_duration_seconds",
            "HTTP API request latency",
            http_duration.clone(),
        );
        let store_duration: HistogramFamily<OpLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "store_operation_duration_seconds",
            "Store operation latency by operation and outcome",
            store_duration.clone(),
        );
        let resources = Family::<ResourceLabels, Gauge>::default();
        registry.register(
            "resources",
            "Resources in the store by kind and mesh",
            resources.clone(),
        );
        Metrics {
            registry,
            http_requests,
            http_duration,
            store_duration,
            resources,
            extra: std::sync::OnceLock::new(),
        }
    }

    /// Add metrics rendered by another component (Prometheus text, `# TYPE` lines included).
    /// Set once.
    pub fn set_extra(&self, render: Extra) {
        let _ = self.extra.set(render);
    }

    /// The Prometheus text exposition, with resource counts read from `store` now.
    pub async fn render(&self, store: &dyn Store) -> String {
        match store.counts().await {
            Ok(counts) => {
                self.resources.clear();
                for c in counts {
                    let labels = ResourceLabels {
                        kind: c.kind.name().to_string(),
                        mesh: c.mesh.unwrap_or_default(),
                    };
                    self.resources.get_or_create(&labels).set(c.count as i64);
                }
            }
            Err(e) => tracing::warn!(error = %e, "metrics: counting resources failed"),
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        if let Some(extra) = self.extra.get() {
            // OpenMetrics ends with `# EOF`: the extra lines go before it.
            let body = out.strip_suffix("# EOF\n").unwrap_or(&out).to_string();
            out = format!("{body}{}# EOF\n", extra());
        }
        out
    }
}

/// A `Store` that records the latency of every operation.
pub struct Instrumented {
    inner: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl Instrumented {
    pub fn new(inner: Arc<dyn Store>, metrics: Arc<Metrics>) -> Instrumented {
        Instrumented { inner, metrics }
    }

    fn observe<T>(&self, op: &'static str, start: Instant, r: &Result<T>) {
        let outcome = if r.is_ok() { "ok" } else { "error" };
        self.metrics
            .store_duration
            .get_or_create(&OpLabels { op, outcome })
            .observe(start.elapsed().as_secs_f64());
    }
}

macro_rules! timed {
    ($self:ident, $op:literal, $call:expr) => {{
        let start = Instant::now();
        let r = $call.await;
        $self.observe($op, start, &r);
        r
    }};
}

#[async_trait]
impl Store for Instrumented {
    async fn get(&self, key: &Key) -> Result<Option<Resource>> {
        timed!(self, "get", self.inner.get(key))
    }
    async fn list(&self, q: &ListQuery) -> Result<Page> {
        timed!(self, "list", self.inner.list(q))
    }
    async fn create(&self, r: Resource) -> Result<Resource> {
        timed!(self, "create", self.inner.create(r))
    }
    async fn update(&self, r: Resource, v: u64) -> Result<Resource> {
        timed!(self, "update", self.inner.update(r, v))
    }
    async fn delete(&self, key: &Key, v: Option<u64>) -> Result<()> {
        timed!(self, "delete", self.inner.delete(key, v))
    }
    async fn apply(&self, rs: Vec<Resource>, dry_run: bool) -> Result<Vec<Outcome>> {
        timed!(self, "apply", self.inner.apply(rs, dry_run))
    }
    async fn events_since(&self, since: u64, limit: usize) -> Result<Vec<Event>> {
        timed!(self, "events_since", self.inner.events_since(since, limit))
    }
    async fn revision(&self) -> Result<u64> {
        timed!(self, "revision", self.inner.revision())
    }
    fn watch(&self) -> watch::Receiver<u64> {
        self.inner.watch()
    }
    async fn counts(&self) -> Result<Vec<Count>> {
        timed!(self, "counts", self.inner.counts())
    }
    async fn system_get(&self, key: &str) -> Result<Option<String>> {
        timed!(self, "system_get", self.inner.system_get(key))
    }
    async fn system_init(&self, key: &str, value: &str) -> Result<String> {
        timed!(self, "system_init", self.inner.system_init(key, value))
    }
    async fn system_set(&self, key: &str, value: &str) -> Result<()> {
        timed!(self, "system_set", self.inner.system_set(key, value))
    }
    async fn ping(&self) -> Result<()> {
        timed!(self, "ping", self.inner.ping())
    }
}
