//! The listener task of a [`Store`](super::Store): LISTEN on [`CHANNEL`] and publish the
//! latest revision on the store's watch, so writes by other replicas wake local consumers.
//!
//! Notifications are lost while the listener is disconnected, so after every (re)connect the
//! task reads the current revision from the table and publishes that; it also polls it every
//! `poll_interval` in case a connection died silently. The task also prunes the change feed.
//! It only ends when its token is cancelled: connection failures are retried with backoff.

use std::pin::pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgNotification, PgPoolOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{CHANNEL, Options, prune, publish, read_revision};

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

pub(super) fn spawn(
    pool: PgPool,
    tx: watch::Sender<u64>,
    stop: CancellationToken,
    options: Options,
) {
    let task = Task {
        pool,
        tx,
        options,
        pruned_at: 0,
    };
    let span = tracing::info_span!("pg_listener", channel = CHANNEL);
    tokio::spawn(task.run(stop).instrument(span));
}

struct Task {
    pool: PgPool,
    tx: watch::Sender<u64>,
    options: Options,
    /// The revision at which this task last pruned the change feed.
    pruned_at: u64,
}

impl Task {
    async fn run(mut self, stop: CancellationToken) {
        let mut backoff = MIN_BACKOFF;
        loop {
            let subscribed = tokio::select! {
                _ = stop.cancelled() => break,
                s = subscribe(&self.pool) => s,
            };
            match subscribed {
                Ok(listener) => {
                    tracing::debug!("listening");
                    backoff = MIN_BACKOFF;
                    let notifications = notifications(listener);
                    match self.listen(notifications, &stop).await {
                        Ok(()) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "listener connection lost; reconnecting")
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "cannot listen for changes")
                }
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        tracing::debug!("stopped");
    }

    /// Handle notifications until the token is cancelled (`Ok`) or the listener fails.
    async fn listen(
        &mut self,
        notifications: impl Stream<Item = sqlx::Result<Option<PgNotification>>>,
        stop: &CancellationToken,
    ) -> sqlx::Result<()> {
        let mut notifications = pin!(notifications);
        // Notifications sent while we were not listening are lost: catch up from the table.
        self.resync().await;
        let period = self.options.poll_interval.max(Duration::from_millis(10));
        let mut poll = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // `next()` on the stream is cancel-safe: an unfinished receive stays in the stream.
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = poll.tick() => self.resync().await,
                n = notifications.next() => match n {
                    Some(Ok(Some(n))) => match n.payload().parse::<u64>() {
                        Ok(revision) => {
                            publish(&self.tx, revision);
                            self.maybe_prune(revision).await;
                        }
                        Err(_) => tracing::warn!(payload = n.payload(), "ignoring a notification that is not a revision"),
                    },
                    // The connection was lost and sqlx re-established it (LISTEN included).
                    Some(Ok(None)) => {
                        tracing::info!("listener reconnected");
                        self.resync().await;
                    }
                    Some(Err(e)) => return Err(e),
                    None => return Err(sqlx::Error::Protocol("listener stream ended".to_string())),
                },
            }
        }
    }

    async fn resync(&mut self) {
        match read_revision(&self.pool).await {
            Ok(revision) => {
                publish(&self.tx, revision);
                self.maybe_prune(revision).await;
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the current revision"),
        }
    }

    async fn maybe_prune(&mut self, revision: u64) {
        let Some(keep) = self.options.feed_retention else {
            return;
        };
        if revision
            < self
                .pruned_at
                .saturating_add(self.options.prune_every.max(1))
            || revision <= keep
        {
            return;
        }
        self.pruned_at = revision;
        match prune(&self.pool, revision - keep).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(
                pruned = n,
                through = revision - keep,
                "pruned the change feed"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot prune the change feed"),
        }
    }
}

/// A listener on its own one-connection pool (sqlx reconnects it through that pool), with the
/// store pool's connect options.
async fn subscribe(pool: &PgPool) -> sqlx::Result<PgListener> {
    let own = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_lazy_with((*pool.connect_options()).clone());
    let mut listener = PgListener::connect_with(&own).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

/// Notifications as a stream; `Ok(None)` says the connection was lost and re-established.
fn notifications(listener: PgListener) -> impl Stream<Item = sqlx::Result<Option<PgNotification>>> {
    futures::stream::unfold(listener, |mut l| async move {
        let next = l.try_recv().await;
        Some((next, l))
    })
}
