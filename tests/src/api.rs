//! A control plane's REST API as tests use it (global's or a zone's: the same routes), and
//! convergence helpers that poll it until a resource is present, absent or equal, with a
//! deadline.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context as _, bail};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::{client, eventually};

/// A control plane's REST API: base URL and (admin) token.
#[derive(Clone, Debug)]
pub struct Api {
    pub url: String,
    pub token: String,
}

impl Api {
    pub fn new(url: String, token: String) -> Api {
        Api { url, token }
    }

    pub fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        client()
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token)
    }

    /// `GET path`: the document, or `None` on 404.
    pub async fn get(&self, path: &str) -> anyhow::Result<Option<Value>> {
        let r = self.req(Method::GET, path).send().await?;
        match r.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => Ok(Some(r.json().await?)),
            s => bail!("GET {path}: {s}: {}", r.text().await.unwrap_or_default()),
        }
    }

    /// Every item of a list route (`/meshes/default/meshtimeouts`), page by page
    /// (`size=1000`, following `next`).
    pub async fn list(&self, path: &str) -> anyhow::Result<Vec<Value>> {
        let mut out = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let mut url = format!("{path}?size=1000");
            if let Some(n) = &next {
                url.push_str(&format!("&next={n}"));
            }
            let r = self.req(Method::GET, &url).send().await?;
            let status = r.status();
            if !status.is_success() {
                bail!(
                    "GET {url}: {status}: {}",
                    r.text().await.unwrap_or_default()
                );
            }
            let page: Value = r.json().await?;
            let items = page["items"]
                .as_array()
                .with_context(|| format!("GET {url}: no items"))?;
            out.extend(items.iter().cloned());
            match page["next"].as_str() {
                Some(n) => next = Some(n.to_string()),
                None => return Ok(out),
            }
        }
    }

    /// Names of every item of a list route.
    pub async fn names(&self, path: &str) -> anyhow::Result<BTreeSet<String>> {
        Ok(self
            .list(path)
            .await?
            .iter()
            .filter_map(|i| i["name"].as_str().map(str::to_string))
            .collect())
    }

    /// name -> spec of every item of a list route.
    pub async fn specs(&self, path: &str) -> anyhow::Result<BTreeMap<String, Value>> {
        Ok(self
            .list(path)
            .await?
            .into_iter()
            .filter_map(|i| Some((i["name"].as_str()?.to_string(), i["spec"].clone())))
            .collect())
    }

    /// `POST /_apply` with JSON documents; the summary on success.
    pub async fn apply(&self, docs: &[Value]) -> anyhow::Result<Value> {
        let r = self
            .req(Method::POST, "/_apply")
            .header("content-type", "application/json")
            .body(Value::Array(docs.to_vec()).to_string())
            .send()
            .await?;
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("POST /_apply: {status}: {body}");
        }
        Ok(body)
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> anyhow::Result<()> {
        let r = self.req(Method::DELETE, path).send().await?;
        let status = r.status();
        if !status.is_success() {
            bail!(
                "DELETE {path}: {status}: {}",
                r.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }

    /// A metric of `/metrics` (an exact series, e.g. `weft_kds_connected`), if present.
    pub async fn metric(&self, series: &str) -> anyhow::Result<Option<f64>> {
        let text = client()
            .get(format!("{}/metrics", self.url))
            .send()
            .await?
            .text()
            .await?;
        Ok(metric_value(&text, series))
    }
}

/// The value of one series in Prometheus text.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The path of a MeshTimeout in the `default` mesh.
pub fn timeout_path(name: &str) -> String {
    format!("/meshes/default/meshtimeouts/{name}")
}

pub const TIMEOUTS: &str = "/meshes/default/meshtimeouts";
pub const DATAPLANES: &str = "/meshes/default/dataplanes";

/// A MeshTimeout document (JSON) in `default` whose connection timeout is `secs`.
pub fn timeout(name: &str, secs: u32) -> Value {
    json!({
        "type": "MeshTimeout",
        "name": name,
        "mesh": "default",
        "spec": {
            "targetRef": {"kind": "Mesh"},
            "to": [{
                "targetRef": {"kind": "Mesh"},
                "default": {"connectionTimeout": format!("{secs}s")},
            }],
        },
    })
}

/// A Dataplane document (JSON) in `default`, with extra labels.
pub fn dataplane(name: &str, ip: u8, labels: &[(&str, &str)]) -> Value {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    json!({
        "type": "Dataplane",
        "name": name,
        "mesh": "default",
        "labels": labels,
        "spec": {
            "networking": {
                "address": format!("10.0.0.{ip}"),
                "inbound": [{"port": 18080, "servicePort": 8080, "tags": {"weft.io/service": name}}],
            },
        },
    })
}

/// Wait until `path` exists on `api`; returns it.
pub async fn wait_present(api: &Api, path: &str, timeout: Duration) -> Value {
    eventually(&format!("{path} on {}", api.url), timeout, || async {
        api.get(path).await.ok().flatten()
    })
    .await
}

/// Wait until `path` is gone from `api`.
pub async fn wait_absent(api: &Api, path: &str, timeout: Duration) {
    eventually(
        &format!("{path} gone from {}", api.url),
        timeout,
        || async { matches!(api.get(path).await, Ok(None)).then_some(()) },
    )
    .await
}

/// Wait until `path` exists on `api` with this spec.
pub async fn wait_spec(api: &Api, path: &str, spec: &Value, timeout: Duration) -> Value {
    eventually(
        &format!("{path} on {} with spec {spec}", api.url),
        timeout,
        || async {
            let doc = api.get(path).await.ok().flatten()?;
            (doc["spec"] == *spec).then_some(doc)
        },
    )
    .await
}

/// Wait until the names a list route returns are exactly `want`.
pub async fn wait_names(api: &Api, list: &str, want: &BTreeSet<String>, timeout: Duration) {
    let mut last = BTreeSet::new();
    let got = tokio::time::timeout(timeout, async {
        loop {
            if let Ok(names) = api.names(list).await {
                if names == *want {
                    return;
                }
                last = names;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    if got.is_err() {
        let missing: Vec<_> = want.difference(&last).collect();
        let extra: Vec<_> = last.difference(want).collect();
        panic!(
            "timed out after {timeout:?} waiting for {list} on {} to be exactly {} names; missing {missing:?}, unexpected {extra:?}",
            api.url,
            want.len()
        );
    }
}

/// Wait until a list route on `api` holds exactly the same names and specs as on `from`.
pub async fn wait_same_specs(from: &Api, api: &Api, list: &str, timeout: Duration) {
    let want = from.specs(list).await.expect("listing the source");
    eventually(
        &format!(
            "{list} on {} to equal {} ({} items)",
            api.url,
            from.url,
            want.len()
        ),
        timeout,
        || async { (api.specs(list).await.ok()? == want).then_some(()) },
    )
    .await
}

/// Wait until global holds the dataplane `name` of zone `zone` (stored as `<name>.<zone>`,
/// labelled with its zone); returns it.
pub async fn wait_global_dataplane(
    global: &Api,
    zone: &str,
    name: &str,
    timeout: Duration,
) -> Value {
    let path = format!("{DATAPLANES}/{name}.{zone}");
    eventually(
        &format!("dataplane {name} of zone {zone} on global ({path})"),
        timeout,
        || async {
            let doc = global.get(&path).await.ok().flatten()?;
            (doc["labels"]["weft.io/zone"] == zone).then_some(doc)
        },
    )
    .await
}
