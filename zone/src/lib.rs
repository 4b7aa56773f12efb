//! weft-zone: the zone control plane of one zone. It holds the zone's resources in a memory
//! store and serves weft-global's REST API in the zone role ([`Plane::Zone`]): it accepts
//! writes to zone-owned kinds (dataplanes, ingresses, egresses, services) and stamps them
//! with its origin, refuses global-owned kinds, and never changes what came from global or
//! another zone.
//!
//! It also serves the data-plane API ([`dataplane`]) that proxies register with.
//!
//! Entry points: [`run`] wires everything from a [`config::Config`]; [`serve`] and
//! [`serve_with`] do it on a store and listeners the caller made, so tests serve a zone on
//! `127.0.0.1:0`.

pub mod config;
pub mod dataplane;
pub mod identity;
pub mod kds;
pub mod trust;
pub mod vip;

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
    let dataplane_listener = TcpListener::bind(cfg.dataplane.address)
        .await
        .with_context(|| {
            format!(
                "binding the data-plane API address {} (--dataplane-address)",
                cfg.dataplane.address
            )
        })?;
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
    let result = serve_with(
        cfg,
        store,
        Listeners {
            api: listener,
            dataplane: Some(dataplane_listener),
        },
        shutdown,
        Links {
            kds: status,
            identity,
            trust,
        },
    )
    .await;
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

/// Where a zone serves.
pub struct Listeners {
    /// The REST API.
    pub api: TcpListener,
    /// The data-plane API; `None` serves none (the API still lists dataplanes as offline).
    pub dataplane: Option<TcpListener>,
}

/// What a zone obtains from global (empty for a standalone zone).
pub struct Links {
    /// The KDS link's status, for `/metrics`.
    pub kds: Option<Arc<kds::Status>>,
    /// The zone's intermediate CAs.
    pub identity: Arc<identity::Identity>,
    /// The dataplane token trust.
    pub trust: Arc<trust::Trust>,
}

/// [`serve_with`] with only the REST API.
///
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
    serve_with(
        cfg,
        store,
        Listeners {
            api: listener,
            dataplane: None,
        },
        shutdown,
        Links {
            kds: link,
            identity,
            trust,
        },
    )
    .await
}

/// Serve the REST API and, with `listeners.dataplane`, the data-plane API (TLS material from
/// `cfg.data_dir` or the configured files) until `shutdown`. The data-plane API is critical:
/// if it fails, the zone stops.
pub async fn serve_with(
    cfg: Config,
    store: Arc<dyn Store>,
    listeners: Listeners,
    shutdown: CancellationToken,
    links: Links,
) -> anyhow::Result<()> {
    let Links {
        kds: link,
        identity,
        trust,
    } = links;
    let listener = listeners.api;
    let metrics = Arc::new(Metrics::new());
    let store: Arc<dyn Store> = Arc::new(Instrumented::new(store, metrics.clone()));
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating the data directory {}", cfg.data_dir.display()))?;
    let vips = vip::Allocator::load(&cfg.data_dir, cfg.vip.cidr, cfg.vip.retention)?;
    tracing::info!(cidr = %cfg.vip.cidr, kept = vips.len(), "mesh VIPs");
    let hub = dataplane::Hub::new(
        &cfg.zone,
        store.clone(),
        identity.clone(),
        trust.clone(),
        cfg.dataplane.clone(),
        cfg.data_dir.clone(),
        vips,
    );
    {
        // `set_extra` takes one renderer: the KDS link's and the data-plane API's lines.
        let hub = hub.clone();
        metrics.set_extra(Box::new(move || {
            let mut out = link
                .as_ref()
                .map(|s| kds::render_metrics(s))
                .unwrap_or_default();
            out.push_str(&hub.render_metrics());
            out
        }));
    }
    // The data-plane server runs until shutdown; if it fails, the whole zone stops.
    let stop = shutdown.child_token();
    let dataplane_task = match listeners.dataplane {
        None => None,
        Some(l) => {
            let tls = dataplane::tls::load(&cfg.dataplane, &cfg.data_dir)?;
            let hub = hub.clone();
            let stop = stop.clone();
            Some(tokio::spawn(
                async move {
                    let r = hub.serve(l, tls, stop.clone()).await;
                    if let Err(e) = &r {
                        tracing::error!(error = %format!("{e:#}"), "the data-plane API failed: stopping the zone");
                    }
                    stop.cancel();
                    r
                }
                .instrument(tracing::info_span!("dataplane-api")),
            ))
        }
    };
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
    let served = axum::serve(
        listener,
        api::router_with(
            state,
            identity::routes(identity)
                .merge(trust::routes(trust))
                .merge(dataplane::insight::routes(hub.clone())),
        )
        .layer(axum::middleware::from_fn(move |req, next| {
            dataplane::insight::fill_vips(hub.clone(), req, next)
        })),
    )
    .with_graceful_shutdown(stop.clone().cancelled_owned())
    .await;
    stop.cancel();
    refresh.abort();
    if let Some(task) = dataplane_task {
        match task.await {
            Ok(Err(e)) => return Err(e.context("data-plane API")),
            Err(e) => anyhow::bail!("data-plane API task failed: {e}"),
            Ok(Ok(())) if !shutdown.is_cancelled() => {
                anyhow::bail!("data-plane API stopped unexpectedly")
            }
            Ok(Ok(())) => {}
        }
    }
    served?;
    tracing::info!(zone = %cfg.zone, "weft-zone stopped");
    Ok(())
}
