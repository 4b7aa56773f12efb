//! weft-zone: the zone control plane of one zone. It holds the zone's resources in a memory
//! store and serves weft-global's REST API in the zone role ([`Plane::Zone`]): it accepts
//! writes to zone-owned kinds (dataplanes, ingresses, egresses, services) and stamps them
//! with its origin, refuses global-owned kinds, and never changes what came from global or
//! another zone.
//!
//! Entry points: [`run`] wires everything from a [`config::Config`]; [`serve`] does it on a
//! store and listener the caller made, so tests serve a zone on `127.0.0.1:0`.

pub mod config;
pub mod identity;
pub mod kds;
pub mod trust;

use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use weft_core::store::{Memory, Store};
use weft_global::api::{self, Plane};
use weft_global::auth::Auth;
use weft_global::metrics::{Instrumented, Metrics};
use weft_global::tokens::Tokens;

pub use config::Config;

/// Run the zone until `shutdown` is cancelled: a memory store, the connection to global when
/// one is configured, and the API.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let store: Arc<dyn Store> = Arc::new(Memory::new());
    let listener = TcpListener::bind(cfg.api_address)
        .await
        .with_context(|| format!("binding the API address {}", cfg.api_address))?;
    let link = match &cfg.global {
        None => {
            tracing::info!(zone = %cfg.zone, "running standalone (no --global-address)");
            None
        }
        Some(global) => {
            let client = kds::Client::new(
                kds::Config {
                    zone: cfg.zone.clone(),
                    global_addresses: global.addresses.iter().map(ToString::to_string).collect(),
                    token_file: global.token_file.clone(),
                    trust: match &global.trust {
                        config::Trust::CaFile(p) => kds::Trust::CaFile(p.clone()),
                        config::Trust::Fingerprint(fp) => kds::Trust::Fingerprint(fp.to_string()),
                    },
                    liveness: cfg.kds_liveness,
                },
                store.clone(),
                instance_id(),
            );
            tracing::info!(zone = %cfg.zone, global = %global.address, "joining global");
            let status = client.status();
            let identity = client.identity();
            let trust = client.trust();
            let task = tokio::spawn(
                client
                    .run(shutdown.clone())
                    .instrument(tracing::info_span!("kds", zone = %cfg.zone)),
            );
            Some((status, identity, trust, task))
        }
    };
    let (status, identity, trust) = match &link {
        Some((s, i, t, _)) => (Some(s.clone()), i.clone(), t.clone()),
        None => (
            None,
            identity::Identity::new(&cfg.zone),
            trust::Trust::new(),
        ),
    };
    let result = serve_linked(cfg, store, listener, shutdown, status, identity, trust).await;
    if let Some((_, _, _, task)) = link {
        task.abort();
    }
    result
}

fn instance_id() -> String {
    hex::encode(rand::random::<[u8; 8]>())
}

/// Serve on a store and listener the caller made, without a link to global.
pub async fn serve(
    cfg: Config,
    store: Arc<dyn Store>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let identity = identity::Identity::new(&cfg.zone);
    serve_linked(
        cfg,
        store,
        listener,
        shutdown,
        None,
        identity,
        trust::Trust::new(),
    )
    .await
}

/// Serve the zone's API on `store` and `listener` until `shutdown` is cancelled, then finish
/// in-flight requests. The admin and read-only API tokens are made on the first start against
/// `store` and written to `cfg.data_dir`. With `link`, `/metrics` reports the KDS link;
/// `/_identity/meshes` shows the public half of `identity`'s intermediate CAs;
/// `/_tokens/dataplane/verify` checks a dataplane token against `trust`.
pub async fn serve_linked(
    cfg: Config,
    store: Arc<dyn Store>,
    listener: TcpListener,
    shutdown: CancellationToken,
    link: Option<Arc<kds::Status>>,
    identity: Arc<identity::Identity>,
    trust: Arc<trust::Trust>,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    if let Some(status) = link {
        metrics.set_extra(Box::new(move || kds::render_metrics(&status)));
    }
    let store: Arc<dyn Store> = Arc::new(Instrumented::new(store, metrics.clone()));
    let auth = Auth::bootstrap(store.clone(), &cfg.data_dir).await?;
    let refresh = tokio::spawn(
        auth.clone()
            .refresh_loop(shutdown.clone())
            .instrument(tracing::info_span!("auth-refresh")),
    );
    // `api::State` carries global's zone-token issuer, whose routes a zone does not serve
    // (see `api::router`): this one signs nothing, and its key stays out of the zone's store.
    let tokens = Arc::new(Tokens::bootstrap(Arc::new(Memory::new())).await?);
    let state = api::State {
        store,
        auth,
        metrics,
        plane: Plane::Zone {
            name: cfg.zone.clone(),
        },
        tokens,
    };
    let addr = listener.local_addr()?;
    tracing::info!(%addr, zone = %cfg.zone, "weft-zone API listening");
    axum::serve(
        listener,
        api::router_with(
            state,
            identity::routes(identity).merge(trust::routes(trust)),
        ),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await?;
    refresh.abort();
    tracing::info!(zone = %cfg.zone, "weft-zone stopped");
    Ok(())
}
