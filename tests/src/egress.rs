//! Real `weft-ingress --mode egress` processes (a zone token with scope `egress`), and a
//! plain HTTP server playing an external host.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::ingress::Ingress;
use crate::{Global, Zone};

/// Start zone egress `name` for `zone`; external TLS is verified against `external_ca`
/// (PEM file).
pub async fn start(
    g: &Global,
    zone: &Zone,
    name: &str,
    external_ca: &Path,
) -> anyhow::Result<Ingress> {
    let extra = vec![
        "--external-ca-file".to_string(),
        external_ca.display().to_string(),
    ];
    Ingress::start_mode(g, zone, name, "egress", &extra).await
}

/// An HTTP server outside the mesh: answers every request with its name and counts them.
pub struct ExternalHost {
    pub port: u16,
    pub hits: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl ExternalHost {
    pub async fn http(name: &str) -> anyhow::Result<ExternalHost> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let hits = Arc::new(AtomicU64::new(0));
        let (n, h) = (name.to_string(), hits.clone());
        let app = axum::Router::new().fallback(move || {
            let (n, h) = (n.clone(), h.clone());
            async move {
                h.fetch_add(1, Ordering::Relaxed);
                n
            }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(ExternalHost { port, hits, task })
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Drop for ExternalHost {
    fn drop(&mut self) {
        self.task.abort();
    }
}
