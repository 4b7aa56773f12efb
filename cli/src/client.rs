//! The HTTP client for the global control plane's REST API (docs/api.md): builds URLs, sends
//! the bearer token, and turns failures into messages that say what to do.

use std::fmt;
use std::time::Duration;

use anyhow::{Result, anyhow};
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use serde_json::Value;

use crate::config::Target;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// One problem listed in an error body.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Problem {
    /// 1-based index of the document in the request (for `/_apply`).
    #[serde(default)]
    pub document: Option<usize>,
    #[serde(default)]
    pub field: String,
    #[serde(default)]
    pub message: String,
}

/// An error answer of the API: `{"status", "title", "detail", "errors"}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct ApiError {
    #[serde(default)]
    pub status: u16,
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub detail: String,
    #[serde(default)]
    pub errors: Vec<Problem>,
}

impl ApiError {
    /// Read an error body; one that is not the API's error shape (a proxy's page, say) is
    /// reported with its status and start.
    pub fn from_body(status: StatusCode, body: &str) -> ApiError {
        match serde_json::from_str::<ApiError>(body) {
            Ok(mut e) if !e.detail.is_empty() || !e.title.is_empty() => {
                e.status = status.as_u16();
                e
            }
            _ => {
                let body = body.trim();
                let short: String = body.chars().take(200).collect();
                let detail = if short.is_empty() {
                    format!("HTTP {status}")
                } else {
                    format!("HTTP {status}: {short}")
                };
                ApiError {
                    status: status.as_u16(),
                    title: String::new(),
                    detail,
                    errors: Vec::new(),
                }
            }
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let detail = if self.detail.is_empty() {
            &self.title
        } else {
            &self.detail
        };
        f.write_str(detail)?;
        match self.status {
            401 => f.write_str(
                " (the token is missing or invalid: pass --token or set WEFTCTL_TOKEN, or store it with \
                 `weftctl config control-planes add --name NAME --address URL --token-file FILE --overwrite`)",
            ),
            403 => f.write_str(" (the token is read-only: writes need the admin token)"),
            _ => Ok(()),
        }
    }
}

impl std::error::Error for ApiError {}

/// A client for one control plane.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    address: String,
    token: Option<String>,
}

impl Client {
    pub fn new(target: &Target) -> Result<Client> {
        // reqwest is built without a default crypto provider; ring is ours. Installing twice
        // is harmless (the second install reports the first one and changes nothing).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("weftctl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| anyhow!("cannot build the HTTP client: {e}"))?;
        let base = Url::parse(&target.address)
            .map_err(|e| anyhow!("invalid address {:?}: {e}", target.address))?;
        if base.cannot_be_a_base() {
            return Err(anyhow!(
                "invalid address {:?} (expected e.g. http://127.0.0.1:5681)",
                target.address
            ));
        }
        Ok(Client {
            http,
            base,
            address: target.address.clone(),
            token: target.token.clone(),
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// The URL of `segments` (each percent-encoded) under the address, with `query`.
    pub fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("checked in new")
            .pop_if_empty()
            .extend(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    pub async fn get(&self, segments: &[&str], query: &[(&str, &str)]) -> Result<Value> {
        self.send(Method::GET, segments, query, None).await
    }

    pub async fn post(
        &self,
        segments: &[&str],
        query: &[(&str, &str)],
        body: &Value,
    ) -> Result<Value> {
        self.send(Method::POST, segments, query, Some(body)).await
    }

    pub async fn delete(&self, segments: &[&str]) -> Result<Value> {
        self.send(Method::DELETE, segments, &[], None).await
    }

    /// `GET /healthz` answers with a success status.
    pub async fn healthz(&self) -> Result<()> {
        self.send(Method::GET, &["healthz"], &[], None)
            .await
            .map(drop)
    }

    async fn send(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<Value> {
        let mut req = self.http.request(method, self.url(segments, query));
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.map_err(|e| self.transport_error(&e))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| self.transport_error(&e))?;
        if !status.is_success() {
            return Err(ApiError::from_body(status, &text).into());
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        // `/healthz` may answer plain text; anything else is JSON.
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    fn transport_error(&self, e: &reqwest::Error) -> anyhow::Error {
        let address = &self.address;
        let refused = io_kind(e) == Some(std::io::ErrorKind::ConnectionRefused);
        if refused {
            return anyhow!(
                "cannot connect to the control plane at {address}: connection refused \
                 (is weft-global running there? add the right one with \
                 `weftctl config control-planes add --name NAME --address URL`, or pass --address URL)"
            );
        }
        if e.is_timeout() {
            return anyhow!(
                "control plane at {address} did not answer in time ({})",
                root_cause(e)
            );
        }
        if e.is_connect() {
            return anyhow!(
                "cannot connect to the control plane at {address}: {} \
                 (check the address, or add the right one with `weftctl config control-planes add --name NAME --address URL`)",
                root_cause(e)
            );
        }
        anyhow!("request to {address} failed: {}", root_cause(e))
    }
}

fn io_kind(e: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        cur = err.source();
    }
    None
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk_client(address: &str) -> Client {
        Client::new(&Target {
            address: address.into(),
            token: None,
        })
        .unwrap()
    }

    #[test]
    fn urls_encode_segments_and_query() {
        let c = mk_client("http://127.0.0.1:5681");
        assert_eq!(
            c.url(&["meshes", "default", "meshtimeouts"], &[]).as_str(),
            "http://127.0.0.1:5681/meshes/default/meshtimeouts"
        );
        assert_eq!(
            c.url(
                &["meshtimeouts"],
                &[("next", "default/a"), ("labelSelector", "app=web,!legacy")]
            )
            .as_str(),
            "http://127.0.0.1:5681/meshtimeouts?next=default%2Fa&labelSelector=app%3Dweb%2C%21legacy"
        );
        assert_eq!(c.url(&["zones", "a/b"], &[]).path(), "/zones/a%2Fb");
        let prefixed = mk_client("https://cp.example.com/weft");
        assert_eq!(
            prefixed.url(&["_apply"], &[]).as_str(),
            "https://cp.example.com/weft/_apply"
        );
    }

    #[test]
    fn error_bodies_give_the_detail_and_auth_hints() {
        let body = r#"{"status":400,"title":"invalid resource","detail":"document 2: spec.x: bad","errors":[{"document":2,"field":"spec.x","message":"bad"}]}"#;
        let e = ApiError::from_body(StatusCode::BAD_REQUEST, body);
        assert_eq!(e.to_string(), "document 2: spec.x: bad");
        assert_eq!(
            e.errors,
            vec![Problem {
                document: Some(2),
                field: "spec.x".into(),
                message: "bad".into()
            }]
        );

        let e = ApiError::from_body(
            StatusCode::UNAUTHORIZED,
            r#"{"status":401,"title":"unauthorized","detail":"missing bearer token"}"#,
        );
        assert!(
            e.to_string()
                .starts_with("missing bearer token (the token is missing or invalid"),
            "{e}"
        );
        let e = ApiError::from_body(
            StatusCode::FORBIDDEN,
            r#"{"status":403,"title":"forbidden","detail":"read-only token"}"#,
        );
        assert!(e.to_string().contains("read-only"), "{e}");

        let e = ApiError::from_body(StatusCode::BAD_GATEWAY, "<html>bad gateway</html>");
        assert_eq!(
            e.to_string(),
            "HTTP 502 Bad Gateway: <html>bad gateway</html>"
        );
    }
}
