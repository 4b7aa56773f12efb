//! Leader election for work that must run once across global replicas (cleanup of deleted
//! zones' resources). On PostgreSQL: a session advisory lock held on a dedicated
//! connection; whoever holds it leads, and losing the connection loses the lead. On the
//! memory store (a single process) this process always leads.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use weft_core::Kind;
use weft_core::store::{Op, Store};

/// The advisory lock key ("weft" in ASCII).
const LOCK_KEY: i64 = 0x7765_6674;
const RETRY: Duration = Duration::from_secs(5);

pub enum Elector {
    /// A single process: always the leader.
    Alone,
    Postgres(PgPool),
}

/// Run the leader's duties whenever this replica leads, until shutdown.
pub async fn run(elector: Elector, store: Arc<dyn Store>, shutdown: CancellationToken) {
    match elector {
        Elector::Alone => duties(store, shutdown).await,
        Elector::Postgres(pool) => loop {
            if shutdown.is_cancelled() {
                return;
            }
            match lead_with_lock(&pool, store.clone(), &shutdown).await {
                Ok(true) => tracing::info!("lost the lead"),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election failed; retrying"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RETRY) => {}
            }
        },
    }
}

/// Try the lock; if taken, lead until the connection fails or shutdown. Returns whether
/// this replica led.
async fn lead_with_lock(
    pool: &PgPool,
    store: Arc<dyn Store>,
    shutdown: &CancellationToken,
) -> anyhow::Result<bool> {
    let mut conn = pool.acquire().await?.detach();
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(LOCK_KEY)
        .fetch_one(&mut conn)
        .await?;
    if !got {
        return Ok(false);
    }
    tracing::info!("this replica leads");
    let stop = shutdown.child_token();
    let work = tokio::spawn(duties(store, stop.clone()));
    // Hold the lock while the connection lives; check it now and then.
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(RETRY) => {
                if sqlx::query("SELECT 1").execute(&mut conn).await.is_err() {
                    break;
                }
            }
        }
    }
    stop.cancel();
    let _ = work.await;
    Ok(true)
}

/// What the leader does: remove what deleted zones owned, on taking the lead and whenever
/// a `Zone` is deleted.
async fn duties(store: Arc<dyn Store>, stop: CancellationToken) {
    let mut watch = store.watch();
    let mut cursor = match store.revision().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "leader: reading the revision failed");
            0
        }
    };
    let mut pending = true;
    loop {
        if pending {
            match crate::kds::cleanup_deleted_zones(&*store).await {
                Ok(_) => pending = false,
                Err(e) => {
                    tracing::warn!(error = %e, "cleaning up deleted zones failed; will retry")
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(60)) => pending = true,
            changed = watch.changed() => {
                if changed.is_err() {
                    return;
                }
                match store.events_since(cursor, 10_000).await {
                    Ok(events) => {
                        if let Some(last) = events.last() {
                            cursor = last.revision;
                        }
                        if events.iter().any(|e| e.op == Op::Delete && e.key.kind == Kind::Zone) {
                            pending = true;
                        }
                    }
                    Err(_) => {
                        cursor = store.revision().await.unwrap_or(cursor);
                        pending = true;
                    }
                }
            }
        }
    }
}
