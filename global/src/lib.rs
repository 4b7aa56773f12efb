//! weft-global: the global control plane. It holds the mesh-wide truth (meshes, policies,
//! zones) in a `Store` (memory, or PostgreSQL via [`pg`]) and serves it over a REST API.
//!
//! Entry points: [`run`] wires everything from a [`config::Config`]; [`api::router`] builds
//! the HTTP API over an [`api::State`] so tests can serve it on `127.0.0.1:0`.

pub mod api;
pub mod auth;
pub mod config;
pub mod kds_tls;
pub mod metrics;
pub mod openapi;
pub mod pg;
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
    Ok(match cfg.store {
        StoreKind::Memory => Arc::new(weft_core::store::Memory::new()),
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
            Arc::new(pg::Store::new(pool, shutdown.clone()).await?)
        }
    })
}

/// Run global until `shutdown` is cancelled: open the store, make the admin and read-only
/// tokens and the `default` mesh on first start, then serve the API.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let store = open_store(&cfg, &shutdown).await?;
    let listener = TcpListener::bind(&cfg.api_address)
        .await
        .with_context(|| format!("binding the API address {}", cfg.api_address))?;
    serve(cfg, store, listener, shutdown).await
}

/// Like [`run`], on a store and listener the caller made.
pub async fn serve(
    cfg: Config,
    store: Arc<dyn Store>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Arc::new(metrics::Metrics::new());
    let store: Arc<dyn Store> = Arc::new(metrics::Instrumented::new(store, metrics.clone()));
    let auth = auth::Auth::bootstrap(store.clone(), &cfg.data_dir).await?;
    ensure_default_mesh(&*store).await?;
    let tokens = Arc::new(tokens::Tokens::bootstrap(store.clone()).await?);
    let refresh = tokio::spawn(auth.clone().refresh_loop(shutdown.clone()));
    let state = api::State {
        store,
        auth,
        metrics,
        plane: api::Plane::Global,
        tokens,
    };
    let addr = listener.local_addr()?;
    tracing::info!(%addr, store = ?cfg.store, "weft-global API listening");
    axum::serve(listener, api::router(state))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await?;
    refresh.abort();
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
