//! weft-global: the global control plane. It holds the mesh-wide truth (meshes, policies,
//! zones) in a `Store` (memory, or PostgreSQL via [`pg`]) and serves it over a REST API.
//!
//! Entry points: [`run`] wires everything from a [`config::Config`]; [`api::router`] builds
//! the HTTP API over an [`api::State`] so tests can serve it on `127.0.0.1:0`.

pub mod api;
pub mod auth;
pub mod config;
pub mod kds;
pub mod kds_tls;
pub mod leader;
pub mod mesh_ca;
pub mod metrics;
pub mod openapi;
pub mod pg;
pub mod process;
pub mod tokens;

use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use weft_core::store::Store;

use config::{Config, StoreKind};

/// Open the configured store (running migrations for PostgreSQL unless told not to).
pub async fn open_store(
    cfg: &Config,
    shutdown: &CancellationToken,
) -> anyhow::Result<Arc<dyn Store>> {
    Ok(open(cfg, shutdown).await?.0)
}

/// Open the store and the matching leader elector.
pub async fn open(
    cfg: &Config,
    shutdown: &CancellationToken,
) -> anyhow::Result<(Arc<dyn Store>, leader::Elector)> {
    Ok(match cfg.store {
        StoreKind::Memory => (
            Arc::new(weft_core::store::Memory::new()),
            leader::Elector::Alone,
        ),
        StoreKind::Postgres => {
            let url = cfg
                .postgres_url
                .as_deref()
                .context("--postgres-url (WEFT_POSTGRES_URL) is required with --store postgres")?;
            let pool = pg::connect(url)
                .await
                .with_context(|| format!("connecting to PostgreSQL at {}", pg::redact(url)))?;
            if cfg.migrate {
                pg::migrate(&pool)
                    .await
                    .context("applying database migrations")?;
            }
            (
                Arc::new(pg::Store::new(pool.clone(), shutdown.clone()).await?),
                leader::Elector::Postgres(pool),
            )
        }
    })
}

/// Run global until `shutdown` is cancelled: open the store, make the admin and read-only
/// tokens and the `default` mesh on first start, then serve the API and KDS.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (store, elector) = open(&cfg, &shutdown).await?;
    let api = TcpListener::bind(&cfg.api_address)
        .await
        .with_context(|| format!("binding the API address {}", cfg.api_address))?;
    let kds = TcpListener::bind(&cfg.kds.address)
        .await
        .with_context(|| format!("binding the KDS address {}", cfg.kds.address))?;
    serve_with(cfg, store, elector, api, Some(kds), shutdown).await
}

/// The API alone (no KDS), on a store and listener the caller made.
pub async fn serve(
    cfg: Config,
    store: Arc<dyn Store>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_with(cfg, store, leader::Elector::Alone, listener, None, shutdown).await
}

/// Everything on listeners the caller made: the API, KDS (when given a listener) and the
/// leader's duties.
pub async fn serve_with(
    cfg: Config,
    store: Arc<dyn Store>,
    elector: leader::Elector,
    listener: TcpListener,
    kds_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Arc::new(metrics::Metrics::new());
    let store: Arc<dyn Store> = Arc::new(metrics::Instrumented::new(store, metrics.clone()));
    let auth = auth::Auth::bootstrap(store.clone(), &cfg.data_dir).await?;
    ensure_default_mesh(&*store).await?;
    let tokens = Arc::new(tokens::Tokens::bootstrap(store.clone()).await?);
    let refresh = tokio::spawn(auth.clone().refresh_loop(shutdown.clone()));
    let leader = tokio::spawn(leader::run(elector, store.clone(), shutdown.clone()));
    let kds = match kds_listener {
        Some(l) => {
            let material = match &cfg.kds.tls_files {
                Some((cert, key, ca)) => kds_tls::from_files(cert, key, ca)?,
                None => kds_tls::bootstrap(&*store, &cfg.kds.tls_sans).await?,
            };
            let ca = material.write_ca(&cfg.data_dir)?;
            tracing::info!(ca = %ca.display(), "KDS CA certificate written");
            let server = kds::Server::new(
                store.clone(),
                tokens.clone(),
                uuid_like(),
                cfg.kds.liveness,
                shutdown.clone(),
            );
            let task = tokio::spawn(server.serve(l, material));
            Some(task)
        }
        None => None,
    };
    let state = api::State {
        store,
        auth,
        metrics,
        plane: api::Plane::Global,
        tokens,
    };
    let addr = listener.local_addr()?;
    tracing::info!(%addr, store = ?cfg.store, "weft-global API listening");
    let api = axum::serve(listener, api::router(state))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let result = match kds {
        // KDS is critical: if it dies, stop loudly rather than run half a control plane.
        Some(mut task) => tokio::select! {
            r = api => r.map_err(anyhow::Error::from),
            r = &mut task => {
                let stopping = shutdown.is_cancelled();
                shutdown.cancel();
                match r {
                    Ok(Ok(())) if stopping => Ok(()),
                    Ok(Ok(())) => Err(anyhow::anyhow!("the KDS server stopped")),
                    Ok(Err(e)) => Err(e.context("the KDS server failed")),
                    Err(e) => Err(anyhow::anyhow!("the KDS server task failed: {e}")),
                }
            }
        },
        None => api.await.map_err(anyhow::Error::from),
    };
    shutdown.cancel();
    refresh.abort();
    leader.abort();
    result?;
    tracing::info!("weft-global stopped");
    Ok(())
}

/// Create the `default` mesh once, on the first start against this store. A user who
/// deletes it later does not get it back on restart.
async fn ensure_default_mesh(store: &dyn Store) -> anyhow::Result<()> {
    let marker = uuid_like();
    if store.system_init("init/default-mesh", &marker).await? != marker {
        return Ok(());
    }
    let mesh = weft_core::Resource::new(
        weft_core::Kind::Mesh,
        None,
        weft_core::DEFAULT_MESH,
        [(weft_core::ORIGIN_LABEL.to_string(), "global".to_string())].into(),
        serde_json::json!({}),
    )
    .expect("the default mesh is valid");
    match store.create(mesh).await {
        Ok(_) => tracing::info!("created mesh \"default\""),
        Err(weft_core::store::Error::AlreadyExists(_)) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

fn uuid_like() -> String {
    use rand::Rng;
    hex::encode(rand::rng().random::<[u8; 16]>())
}

/// `weft-global migrate`: apply the embedded migrations.
pub async fn migrate(url: &str) -> anyhow::Result<()> {
    let pool = pg::connect(url)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {}", pg::redact(url)))?;
    pg::migrate(&pool)
        .await
        .context("applying database migrations")?;
    tracing::info!("database migrations applied");
    Ok(())
}

/// `weft-global token rotate`: replace a role's token; returns the new one.
pub async fn rotate_token(url: &str, role: auth::Role) -> anyhow::Result<String> {
    let shutdown = CancellationToken::new();
    let pool = pg::connect(url)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {}", pg::redact(url)))?;
    let store = pg::Store::new(pool, shutdown.clone()).await?;
    let token = auth::rotate(&store, role).await?;
    shutdown.cancel();
    Ok(token)
}
