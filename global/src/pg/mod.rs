//! The PostgreSQL store of the global control plane: [`weft_core::store::Store`] on sqlx,
//! shared by every global replica pointed at the same database.
//!
//! Invariants:
//! - Every write transaction takes the lock on the single `revision` row as its first
//!   statement and holds it until it commits. So writes are serialized, revisions are
//!   contiguous and in commit order, and locks are always taken in the same order (counter
//!   first, then resource rows): no deadlocks between writers.
//! - Every write transaction that changes something inserts one `events` row per change and
//!   calls `pg_notify('weft_changes', <last revision>)`. A background task per [`Store`]
//!   LISTENs on that channel and publishes the latest revision on the store's watch, so
//!   changes made by other replicas wake this one's consumers too.
//! - sqlx errors never leave this module: they become [`Error::Backend`] (transient) unless
//!   they mean something to the caller (a unique violation is `AlreadyExists`).

mod listen;
pub mod testing;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use serde::Deserialize;
use serde_json::Value;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, QueryBuilder, Row, SqlSafeStr, Transaction};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use weft_core::selector::Requirement;
use weft_core::store::{
    self, Count, Error, Event, ListQuery, Op, Outcome, Page, Result, page_token, parse_page_token,
};
use weft_core::{Key, Kind, Meta, Resource};

/// The NOTIFY channel every write transaction signals, with its last revision as payload.
pub const CHANNEL: &str = "weft_changes";

/// Migrations, embedded at compile time. Kept in sqlx's `<version>_<description>.sql` layout
/// (and registered with the same checksums `sqlx::migrate!` computes), so `sqlx migrate`
/// works on them too; `sqlx::migrate!` itself needs sqlx's `macros` feature, which the
/// workspace leaves off. A new migration file must be added to this list.
const MIGRATIONS: &[(i64, &str, &str)] =
    &[(1, "store", include_str!("../../migrations/0001_store.sql"))];

/// The embedded migrations.
pub fn migrator() -> Migrator {
    Migrator::with_migrations(
        MIGRATIONS
            .iter()
            .map(|(version, description, sql)| {
                Migration::new(
                    *version,
                    Cow::Borrowed(*description),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

/// Bring the schema up to date. Safe to run from several replicas at once (sqlx takes an
/// advisory lock).
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    migrator()
        .run(pool)
        .await
        .context("postgres: run migrations")
}

/// Pool settings for a store: connections are tested before use (so the pool recovers by
/// itself after PostgreSQL restarts) and an acquire gives up after a few seconds (so requests
/// fail fast with `Backend` while the database is down instead of hanging).
pub fn pool_options() -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(3))
        .test_before_acquire(true)
        .idle_timeout(Duration::from_secs(300))
        .max_lifetime(Duration::from_secs(1800))
}

/// Connect a pool with [`pool_options`]; fails if the database cannot be reached now.
pub async fn connect(url: &str) -> anyhow::Result<PgPool> {
    pool_options()
        .connect(url)
        .await
        .with_context(|| format!("postgres {}: cannot connect", redact(url)))
}

/// The URL without its user and password, for messages.
pub fn redact(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, rest))) => format!("{scheme}://{rest}"),
        _ => url.to_string(),
    }
}

/// Store settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// Keep at least this many change-feed events; older ones are pruned in the background.
    /// `None` keeps everything.
    pub feed_retention: Option<u64>,
    /// Prune at most once per this many revisions.
    pub prune_every: u64,
    /// How often to read the revision even without notifications, in case one was lost.
    pub poll_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            feed_retention: Some(100_000),
            prune_every: 1_000,
            poll_interval: Duration::from_secs(30),
        }
    }
}

/// The PostgreSQL store. Dropping it (or cancelling the token it was given) stops its
/// listener task.
pub struct Store {
    pool: PgPool,
    tx: watch::Sender<u64>,
    stop: CancellationToken,
}

impl Drop for Store {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Store {
    /// A store on a migrated database, with default [`Options`]. Its listener task runs
    /// until `shutdown` is cancelled or the store is dropped.
    pub async fn new(pool: PgPool, shutdown: CancellationToken) -> Result<Store> {
        Store::with_options(pool, shutdown, Options::default()).await
    }

    pub async fn with_options(
        pool: PgPool,
        shutdown: CancellationToken,
        options: Options,
    ) -> Result<Store> {
        let revision = read_revision(&pool).await.map_err(backend)?;
        let (tx, _) = watch::channel(revision);
        let stop = shutdown.child_token();
        listen::spawn(pool.clone(), tx.clone(), stop.clone(), options);
        Ok(Store { pool, tx, stop })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Delete change-feed events with revision <= `keep_after_revision`; returns how many.
    /// Consumers behind that point get `Compacted` and must list again.
    pub async fn prune_events(&self, keep_after_revision: u64) -> Result<u64> {
        prune(&self.pool, keep_after_revision)
            .await
            .map_err(backend)
    }

    fn publish(&self, revision: u64) {
        publish(&self.tx, revision);
    }

    async fn begin(&self) -> Result<Transaction<'static, Postgres>> {
        retry_once!(self.pool.begin())
    }
}

/// Raise the watched revision to `revision` (never lower it: notifications and local commits
/// arrive in any order).
fn publish(tx: &watch::Sender<u64>, revision: u64) {
    tx.send_if_modified(|cur| {
        if revision > *cur {
            *cur = revision;
            true
        } else {
            false
        }
    });
}

async fn prune(pool: &PgPool, keep_after_revision: u64) -> sqlx::Result<u64> {
    let done = sqlx::query("DELETE FROM events WHERE revision <= $1")
        .bind(to_i64(keep_after_revision))
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}

async fn read_revision<'e>(ex: impl sqlx::PgExecutor<'e>) -> sqlx::Result<u64> {
    let rev: i64 = sqlx::query_scalar("SELECT revision FROM revision WHERE id")
        .fetch_one(ex)
        .await?;
    Ok(rev as u64)
}

// ---- errors ----

fn backend(e: sqlx::Error) -> Error {
    match e {
        sqlx::Error::PoolTimedOut => Error::Backend(
            "postgres: no connection available in time (is the database up?)".to_string(),
        ),
        e => Error::Backend(format!("postgres: {e}")),
    }
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
}

/// True for errors that mean the connection broke (not the statement): safe to retry a read,
/// or a write that had not committed.
fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        // Class 08: connection exception; 57P01..57P03: the server is shutting down/starting.
        sqlx::Error::Database(d) => d
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    }
}

/// Run a read (or the start of a transaction) and retry it once if the connection broke
/// under it, e.g. a pooled connection that PostgreSQL closed when it restarted.
macro_rules! retry_once {
    ($call:expr) => {
        match $call.await {
            Err(e) if is_connection_error(&e) => {
                tracing::debug!(error = %e, "postgres connection broken; retrying once");
                $call.await
            }
            other => other,
        }
        .map_err(backend)
    };
}
use retry_once;

/// Commit on success, roll back (now, releasing the counter lock) on error.
async fn finish<T>(tx: Transaction<'static, Postgres>, result: Result<T>) -> Result<T> {
    match result {
        Ok(v) => {
            tx.commit().await.map_err(backend)?;
            Ok(v)
        }
        Err(e) => {
            if let Err(re) = tx.rollback().await {
                tracing::debug!(error = %re, "rollback failed");
            }
            Err(e)
        }
    }
}

// ---- rows ----

macro_rules! columns {
    () => {
        "kind, mesh, name, version, labels, spec, creation_time, modification_time"
    };
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Timestamps as PostgreSQL keeps them (microseconds), so what a write returns equals what
/// a later read returns.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

fn decode_err(msg: String) -> sqlx::Error {
    sqlx::Error::Decode(msg.into())
}

fn parse_kind(s: &str) -> sqlx::Result<Kind> {
    Kind::ALL
        .iter()
        .copied()
        .find(|k| k.name() == s)
        .ok_or_else(|| decode_err(format!("unknown kind {s:?} in the database")))
}

fn mesh_of(mesh: String) -> Option<String> {
    (!mesh.is_empty()).then_some(mesh)
}

fn decode_resource(row: &PgRow) -> sqlx::Result<Resource> {
    let kind = parse_kind(row.try_get("kind")?)?;
    let version: i64 = row.try_get("version")?;
    Ok(Resource {
        kind,
        mesh: mesh_of(row.try_get("mesh")?),
        name: row.try_get("name")?,
        labels: row
            .try_get::<Json<BTreeMap<String, String>>, _>("labels")?
            .0,
        spec: row.try_get("spec")?,
        meta: Meta {
            version: version as u64,
            creation_time: Some(row.try_get("creation_time")?),
            modification_time: Some(row.try_get("modification_time")?),
        },
    })
}

/// The part of an event's `resource` document not already in the event's columns.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EventDoc {
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    spec: Value,
    creation_time: Option<DateTime<Utc>>,
    modification_time: Option<DateTime<Utc>>,
}

fn decode_event(row: &PgRow) -> sqlx::Result<Event> {
    let revision: i64 = row.try_get("revision")?;
    let op = match row.try_get::<&str, _>("op")? {
        "create" => Op::Create,
        "update" => Op::Update,
        "delete" => Op::Delete,
        other => {
            return Err(decode_err(format!(
                "unknown event op {other:?} in the database"
            )));
        }
    };
    let key = Key {
        kind: parse_kind(row.try_get("kind")?)?,
        mesh: mesh_of(row.try_get("mesh")?),
        name: row.try_get("name")?,
    };
    let version = row.try_get::<i64, _>("version")? as u64;
    let resource = match row.try_get::<Option<Value>, _>("resource")? {
        None => None,
        Some(doc) => {
            let doc: EventDoc = serde_json::from_value(doc)
                .map_err(|e| decode_err(format!("event {revision}: {e}")))?;
            Some(Resource {
                kind: key.kind,
                mesh: key.mesh.clone(),
                name: key.name.clone(),
                labels: doc.labels,
                spec: doc.spec,
                meta: Meta {
                    version,
                    creation_time: doc.creation_time,
                    modification_time: doc.modification_time,
                },
            })
        }
    };
    Ok(Event {
        revision: revision as u64,
        op,
        key,
        version,
        resource: resource.map(std::sync::Arc::new),
    })
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Create => "create",
        Op::Update => "update",
        Op::Delete => "delete",
    }
}

// ---- statements shared by the writes ----

/// Take the counter lock and reserve `n` revisions; returns the last one.
async fn bump(tx: &mut Transaction<'static, Postgres>, n: u64) -> Result<u64> {
    let rev: i64 = sqlx::query_scalar(
        "UPDATE revision SET revision = revision + $1 WHERE id RETURNING revision",
    )
    .bind(to_i64(n))
    .fetch_one(&mut **tx)
    .await
    .map_err(backend)?;
    Ok(rev as u64)
}

/// Take the counter lock without reserving revisions yet; returns the current revision.
async fn lock_counter(tx: &mut Transaction<'static, Postgres>) -> Result<u64> {
    let rev: i64 = sqlx::query_scalar("SELECT revision FROM revision WHERE id FOR UPDATE")
        .fetch_one(&mut **tx)
        .await
        .map_err(backend)?;
    Ok(rev as u64)
}

/// Record changes in one statement: insert their events (revisions contiguous, ascending),
/// set the counter to the last revision, notify, and with `write_resources` also upsert the
/// resources' final states (the last change per key wins). Labels and specs are sent once
/// and the event documents are built by PostgreSQL from them.
async fn record(
    tx: &mut Transaction<'static, Postgres>,
    events: &[Event],
    write_resources: bool,
) -> Result<()> {
    let Some(last) = events.last() else {
        return Ok(());
    };
    let n = events.len();
    let mut revisions = Vec::with_capacity(n);
    let mut ops = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut meshes = Vec::with_capacity(n);
    let mut names = Vec::with_capacity(n);
    let mut versions = Vec::with_capacity(n);
    let mut labels = Vec::with_capacity(n);
    let mut specs = Vec::with_capacity(n);
    let mut created = Vec::with_capacity(n);
    let mut modified = Vec::with_capacity(n);
    for e in events {
        revisions.push(to_i64(e.revision));
        ops.push(op_name(e.op));
        kinds.push(e.key.kind.name());
        meshes.push(e.key.mesh_str());
        names.push(e.key.name.as_str());
        versions.push(to_i64(e.version));
        let r = e.resource.as_ref();
        labels.push(r.map(|r| Json(&r.labels)));
        specs.push(r.map(|r| &r.spec));
        created.push(r.and_then(|r| r.meta.creation_time));
        modified.push(r.and_then(|r| r.meta.modification_time));
    }
    sqlx::query(
        "WITH c AS (
            SELECT * FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[],
                                 $7::jsonb[], $8::jsonb[], $9::timestamptz[], $10::timestamptz[])
                AS c(revision, op, kind, mesh, name, version, labels, spec, creation_time, modification_time)
        ), upserted AS (
            INSERT INTO resources (kind, mesh, name, version, labels, spec, creation_time, modification_time)
            SELECT DISTINCT ON (kind, mesh, name)
                kind, mesh, name, version, labels, spec, creation_time, modification_time
            FROM c WHERE $11 AND spec IS NOT NULL
            ORDER BY kind, mesh, name, revision DESC
            ON CONFLICT (kind, mesh, name) DO UPDATE SET
                version = EXCLUDED.version, labels = EXCLUDED.labels, spec = EXCLUDED.spec,
                modification_time = EXCLUDED.modification_time
        ), recorded AS (
            INSERT INTO events (revision, op, kind, mesh, name, version, resource, time)
            SELECT revision, op, kind, mesh, name, version,
                CASE WHEN spec IS NOT NULL THEN
                    jsonb_build_object('type', kind, 'name', name, 'version', version, 'labels', labels,
                        'spec', spec, 'creationTime', creation_time, 'modificationTime', modification_time)
                    || CASE WHEN mesh = '' THEN '{}'::jsonb ELSE jsonb_build_object('mesh', mesh) END
                END,
                now()
            FROM c
        ), counter AS (
            UPDATE revision SET revision = $12 WHERE id
        )
        SELECT pg_notify('weft_changes', $12::text)",
    )
    .bind(revisions)
    .bind(ops)
    .bind(kinds)
    .bind(meshes)
    .bind(names)
    .bind(versions)
    .bind(labels)
    .bind(specs)
    .bind(created)
    .bind(modified)
    .bind(write_resources)
    .bind(to_i64(last.revision))
    .execute(&mut **tx)
    .await
    .map_err(backend)?;
    Ok(())
}

/// The current version of `key`, inside the transaction (to tell `NotFound` from `Conflict`).
async fn current_version(
    tx: &mut Transaction<'static, Postgres>,
    key: &Key,
) -> Result<Option<u64>> {
    let v: Option<i64> = sqlx::query_scalar(
        "SELECT version FROM resources WHERE kind = $1 AND mesh = $2 AND name = $3",
    )
    .bind(key.kind.name())
    .bind(key.mesh_str())
    .bind(&key.name)
    .fetch_optional(&mut **tx)
    .await
    .map_err(backend)?;
    Ok(v.map(|v| v as u64))
}

fn mismatch(key: &Key, expected: u64, current: Option<u64>) -> Error {
    match current {
        None => Error::NotFound(key.clone()),
        Some(current) => Error::Conflict {
            key: key.clone(),
            expected,
            current,
        },
    }
}

/// The stored resources among `keys`, one query.
async fn fetch_many<'e>(
    ex: impl sqlx::PgExecutor<'e>,
    keys: &[Key],
) -> sqlx::Result<HashMap<Key, Resource>> {
    let kinds: Vec<&str> = keys.iter().map(|k| k.kind.name()).collect();
    let meshes: Vec<&str> = keys.iter().map(Key::mesh_str).collect();
    let names: Vec<&str> = keys.iter().map(|k| k.name.as_str()).collect();
    let rows = sqlx::query(concat!(
        "SELECT ",
        "r.kind, r.mesh, r.name, r.version, r.labels, r.spec, r.creation_time, r.modification_time",
        " FROM resources r JOIN UNNEST($1::text[], $2::text[], $3::text[]) AS k(kind, mesh, name)",
        " ON r.kind = k.kind AND r.mesh = k.mesh AND r.name = k.name"
    ))
    .bind(kinds)
    .bind(meshes)
    .bind(names)
    .fetch_all(ex)
    .await?;
    rows.iter()
        .map(|row| decode_resource(row).map(|r| (r.key(), r)))
        .collect()
}

/// What an `apply` batch does, planned in order against the stored state (so a batch that
/// names one resource twice behaves like two applies in a row).
struct Plan {
    outcomes: Vec<Outcome>,
    /// One per change, in order; revisions not yet assigned.
    changes: Vec<(Op, Resource)>,
}

fn plan(resources: Vec<Resource>, mut state: HashMap<Key, Resource>) -> Plan {
    let now = now();
    let mut outcomes = Vec::with_capacity(resources.len());
    let mut changes = Vec::new();
    for mut r in resources {
        let key = r.key();
        let outcome = match state.get(&key) {
            None => {
                r.meta = Meta {
                    version: 1,
                    creation_time: Some(now),
                    modification_time: Some(now),
                };
                Outcome::Created(r)
            }
            Some(cur) if cur.same_content(&r) => Outcome::Unchanged(cur.clone()),
            Some(cur) => {
                r.meta = Meta {
                    version: cur.meta.version + 1,
                    creation_time: cur.meta.creation_time,
                    modification_time: Some(now),
                };
                Outcome::Updated(r)
            }
        };
        let op = match &outcome {
            Outcome::Created(_) => Some(Op::Create),
            Outcome::Updated(_) => Some(Op::Update),
            Outcome::Unchanged(_) => None,
        };
        if let Some(op) = op {
            let r = outcome.resource().clone();
            changes.push((op, r.clone()));
            state.insert(key, r);
        }
        outcomes.push(outcome);
    }
    Plan { outcomes, changes }
}

fn event(revision: u64, op: Op, r: Resource) -> Event {
    Event {
        revision,
        op,
        key: r.key(),
        version: r.meta.version,
        resource: Some(std::sync::Arc::new(r)),
    }
}

// ---- the trait ----

impl Store {
    async fn get_once(&self, key: &Key) -> sqlx::Result<Option<Resource>> {
        sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM resources WHERE kind = $1 AND mesh = $2 AND name = $3"
        ))
        .bind(key.kind.name())
        .bind(key.mesh_str())
        .bind(&key.name)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(decode_resource)
        .transpose()
    }

    async fn list_once(
        &self,
        q: &ListQuery,
        after: Option<&(String, String)>,
    ) -> sqlx::Result<Vec<Resource>> {
        let mut qb = QueryBuilder::<Postgres>::new(concat!(
            "SELECT ",
            columns!(),
            " FROM resources WHERE kind = "
        ));
        qb.push_bind(q.kind.name());
        if let Some(mesh) = &q.mesh {
            qb.push(" AND mesh = ").push_bind(mesh.as_str());
        }
        if let Some((mesh, name)) = after {
            qb.push(" AND (mesh, name) > (")
                .push_bind(mesh.as_str())
                .push(", ")
                .push_bind(name.as_str())
                .push(")");
        }
        for req in &q.selector.0 {
            match req {
                Requirement::Equals(k, v) => {
                    qb.push(" AND labels @> ")
                        .push_bind(Json(BTreeMap::from([(k.as_str(), v.as_str())])));
                }
                Requirement::NotEquals(k, v) => {
                    qb.push(" AND NOT labels @> ")
                        .push_bind(Json(BTreeMap::from([(k.as_str(), v.as_str())])));
                }
                Requirement::Exists(k) => {
                    qb.push(" AND labels ? ").push_bind(k.as_str());
                }
                Requirement::NotExists(k) => {
                    qb.push(" AND NOT labels ? ").push_bind(k.as_str());
                }
            }
        }
        qb.push(" ORDER BY mesh, name");
        if let Some(limit) = q.limit {
            // One more than asked, to know whether another page follows.
            qb.push(" LIMIT ")
                .push_bind(to_i64(limit as u64).saturating_add(1));
        }
        let rows = qb.build().fetch_all(&self.pool).await?;
        rows.iter().map(decode_resource).collect()
    }

    async fn events_once(&self, since: u64, limit: usize) -> sqlx::Result<Result<Vec<Event>>> {
        let rows = sqlx::query(
            "SELECT revision, op, kind, mesh, name, version, resource FROM events
            WHERE revision > $1 ORDER BY revision LIMIT $2",
        )
        .bind(to_i64(since))
        .bind(to_i64(limit as u64))
        .fetch_all(&self.pool)
        .await?;
        let events: Vec<Event> = rows.iter().map(decode_event).collect::<sqlx::Result<_>>()?;
        match events.first() {
            Some(first) if first.revision == since + 1 => return Ok(Ok(events)),
            // Revisions are contiguous and become visible in order: a gap after `since`
            // means pruned events.
            Some(first) => {
                return Ok(Err(Error::Compacted {
                    since,
                    oldest: first.revision,
                }));
            }
            None => {}
        }
        let (current, oldest): (i64, Option<i64>) = sqlx::query_as(
            "SELECT (SELECT revision FROM revision WHERE id), (SELECT min(revision) FROM events)",
        )
        .fetch_one(&self.pool)
        .await?;
        let (current, oldest) = (current as u64, oldest.map(|o| o as u64));
        if current <= since {
            return Ok(Ok(Vec::new()));
        }
        match oldest {
            Some(o) if o <= since + 1 => Ok(Ok(Vec::new())), // written after our first query
            Some(o) => Ok(Err(Error::Compacted { since, oldest: o })),
            None => Ok(Err(Error::Compacted {
                since,
                oldest: current + 1,
            })),
        }
    }

    async fn counts_once(&self) -> sqlx::Result<Vec<Count>> {
        let rows: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT kind, mesh, count(*) FROM resources GROUP BY kind, mesh")
                .fetch_all(&self.pool)
                .await?;
        let mut counts = rows
            .into_iter()
            .map(|(kind, mesh, count)| {
                Ok(Count {
                    kind: parse_kind(&kind)?,
                    mesh: mesh_of(mesh),
                    count: count as u64,
                })
            })
            .collect::<sqlx::Result<Vec<_>>>()?;
        counts.sort_by(|a, b| (a.kind, &a.mesh).cmp(&(b.kind, &b.mesh)));
        Ok(counts)
    }

    async fn system_get_once(&self, key: &str) -> sqlx::Result<Option<String>> {
        sqlx::query_scalar("SELECT value FROM system WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
    }

    async fn system_init_once(&self, key: &str, value: &str) -> sqlx::Result<String> {
        // Two statements: the SELECT must see a row a concurrent replica committed while our
        // INSERT waited on it, which a single statement's snapshot would not.
        sqlx::query("INSERT INTO system (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await?;
        sqlx::query_scalar("SELECT value FROM system WHERE key = $1")
            .bind(key)
            .fetch_one(&self.pool)
            .await
    }

    async fn system_set_once(&self, key: &str, value: &str) -> sqlx::Result<()> {
        sqlx::query("INSERT INTO system (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn ping_once(&self) -> sqlx::Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn create_in(tx: &mut Transaction<'static, Postgres>, r: &Resource) -> Result<u64> {
        let rev = bump(tx, 1).await?;
        let inserted = sqlx::query(
            "INSERT INTO resources (kind, mesh, name, version, labels, spec, creation_time, modification_time)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(r.kind.name())
        .bind(r.mesh.as_deref().unwrap_or(""))
        .bind(&r.name)
        .bind(to_i64(r.meta.version))
        .bind(Json(&r.labels))
        .bind(&r.spec)
        .bind(r.meta.creation_time)
        .bind(r.meta.modification_time)
        .execute(&mut **tx)
        .await;
        match inserted {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => return Err(Error::AlreadyExists(r.key())),
            Err(e) => return Err(backend(e)),
        }
        record(tx, &[event(rev, Op::Create, r.clone())], false).await?;
        Ok(rev)
    }

    async fn update_in(
        tx: &mut Transaction<'static, Postgres>,
        r: &mut Resource,
        expected: u64,
    ) -> Result<u64> {
        let key = r.key();
        let rev = bump(tx, 1).await?;
        let row: Option<(i64, DateTime<Utc>)> = sqlx::query_as(
            "UPDATE resources SET version = version + 1, labels = $5, spec = $6, modification_time = $7
            WHERE kind = $1 AND mesh = $2 AND name = $3 AND version = $4
            RETURNING version, creation_time",
        )
        .bind(key.kind.name())
        .bind(key.mesh_str())
        .bind(&key.name)
        .bind(to_i64(expected))
        .bind(Json(&r.labels))
        .bind(&r.spec)
        .bind(r.meta.modification_time)
        .fetch_optional(&mut **tx)
        .await
        .map_err(backend)?;
        let Some((version, created)) = row else {
            return Err(mismatch(&key, expected, current_version(tx, &key).await?));
        };
        r.meta.version = version as u64;
        r.meta.creation_time = Some(created);
        record(tx, &[event(rev, Op::Update, r.clone())], false).await?;
        Ok(rev)
    }

    async fn delete_in(
        tx: &mut Transaction<'static, Postgres>,
        key: &Key,
        expected: Option<u64>,
    ) -> Result<u64> {
        if key.kind == Kind::Mesh {
            return Store::delete_mesh_in(tx, key, expected).await;
        }
        let rev = bump(tx, 1).await?;
        let version: Option<i64> = sqlx::query_scalar(
            "DELETE FROM resources
            WHERE kind = $1 AND mesh = $2 AND name = $3 AND ($4::int8 IS NULL OR version = $4)
            RETURNING version",
        )
        .bind(key.kind.name())
        .bind(key.mesh_str())
        .bind(&key.name)
        .bind(expected.map(to_i64))
        .fetch_optional(&mut **tx)
        .await
        .map_err(backend)?;
        let Some(version) = version else {
            return Err(mismatch(
                key,
                expected.unwrap_or(0),
                current_version(tx, key).await?,
            ));
        };
        let e = Event {
            revision: rev,
            op: Op::Delete,
            key: key.clone(),
            version: version as u64,
            resource: None,
        };
        record(tx, &[e], false).await?;
        Ok(rev)
    }

    /// Delete a mesh and everything in it: one event per resource, the mesh's last.
    async fn delete_mesh_in(
        tx: &mut Transaction<'static, Postgres>,
        key: &Key,
        expected: Option<u64>,
    ) -> Result<u64> {
        let base = lock_counter(tx).await?;
        let current = current_version(tx, key).await?;
        match (current, expected) {
            (None, _) => return Err(Error::NotFound(key.clone())),
            (Some(cur), Some(exp)) if cur != exp => return Err(mismatch(key, exp, Some(cur))),
            _ => {}
        }
        let mut inside: Vec<(String, String, i64)> =
            sqlx::query_as("DELETE FROM resources WHERE mesh = $1 RETURNING kind, name, version")
                .bind(&key.name)
                .fetch_all(&mut **tx)
                .await
                .map_err(backend)?;
        let mesh_version: i64 = sqlx::query_scalar(
            "DELETE FROM resources WHERE kind = $1 AND mesh = '' AND name = $2 RETURNING version",
        )
        .bind(Kind::Mesh.name())
        .bind(&key.name)
        .fetch_one(&mut **tx)
        .await
        .map_err(backend)?;
        inside.sort();
        let mut events = Vec::with_capacity(inside.len() + 1);
        for (kind, name, version) in inside {
            let kind = parse_kind(&kind).map_err(backend)?;
            events.push((
                Key {
                    kind,
                    mesh: Some(key.name.clone()),
                    name,
                },
                version,
            ));
        }
        events.push((key.clone(), mesh_version));
        let events: Vec<Event> = events
            .into_iter()
            .enumerate()
            .map(|(i, (key, version))| Event {
                revision: base + 1 + i as u64,
                op: Op::Delete,
                key,
                version: version as u64,
                resource: None,
            })
            .collect();
        let last = base + events.len() as u64;
        record(tx, &events, false).await?;
        Ok(last)
    }

    async fn apply_in(
        tx: &mut Transaction<'static, Postgres>,
        resources: Vec<Resource>,
    ) -> Result<(Vec<Outcome>, Option<u64>)> {
        let base = lock_counter(tx).await?;
        let keys: Vec<Key> = resources.iter().map(Resource::key).collect();
        let state = fetch_many(&mut **tx, &keys).await.map_err(backend)?;
        let plan = plan(resources, state);
        if plan.changes.is_empty() {
            return Ok((plan.outcomes, None));
        }
        let events: Vec<Event> = plan
            .changes
            .into_iter()
            .enumerate()
            .map(|(i, (op, r))| event(base + 1 + i as u64, op, r))
            .collect();
        let last = base + events.len() as u64;
        record(tx, &events, true).await?;
        Ok((plan.outcomes, Some(last)))
    }
}

#[async_trait]
impl store::Store for Store {
    async fn get(&self, key: &Key) -> Result<Option<Resource>> {
        retry_once!(self.get_once(key))
    }

    async fn list(&self, q: &ListQuery) -> Result<Page> {
        let after = q.after.as_deref().map(parse_page_token).transpose()?;
        let mut items = retry_once!(self.list_once(q, after.as_ref()))?;
        let mut next = None;
        if let Some(limit) = q.limit
            && items.len() > limit
        {
            items.truncate(limit);
            next = items.last().map(page_token);
        }
        Ok(Page { items, next })
    }

    async fn create(&self, mut r: Resource) -> Result<Resource> {
        let now = now();
        r.meta = Meta {
            version: 1,
            creation_time: Some(now),
            modification_time: Some(now),
        };
        let mut tx = self.begin().await?;
        let result = Store::create_in(&mut tx, &r).await;
        let rev = finish(tx, result).await?;
        self.publish(rev);
        Ok(r)
    }

    async fn update(&self, mut r: Resource, expected_version: u64) -> Result<Resource> {
        r.meta.modification_time = Some(now());
        let mut tx = self.begin().await?;
        let result = Store::update_in(&mut tx, &mut r, expected_version).await;
        let rev = finish(tx, result).await?;
        self.publish(rev);
        Ok(r)
    }

    async fn delete(&self, key: &Key, expected_version: Option<u64>) -> Result<()> {
        let mut tx = self.begin().await?;
        let result = Store::delete_in(&mut tx, key, expected_version).await;
        let rev = finish(tx, result).await?;
        self.publish(rev);
        Ok(())
    }

    async fn apply(&self, resources: Vec<Resource>, dry_run: bool) -> Result<Vec<Outcome>> {
        if resources.is_empty() {
            return Ok(Vec::new());
        }
        if dry_run {
            let keys: Vec<Key> = resources.iter().map(Resource::key).collect();
            let state = retry_once!(fetch_many(&self.pool, &keys))?;
            return Ok(plan(resources, state).outcomes);
        }
        let mut tx = self.begin().await?;
        let result = Store::apply_in(&mut tx, resources).await;
        let (outcomes, rev) = finish(tx, result).await?;
        if let Some(rev) = rev {
            self.publish(rev);
        }
        Ok(outcomes)
    }

    async fn events_since(&self, since: u64, limit: usize) -> Result<Vec<Event>> {
        retry_once!(self.events_once(since, limit))?
    }

    async fn revision(&self) -> Result<u64> {
        retry_once!(read_revision(&self.pool))
    }

    fn watch(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }

    async fn counts(&self) -> Result<Vec<Count>> {
        retry_once!(self.counts_once())
    }

    async fn system_get(&self, key: &str) -> Result<Option<String>> {
        retry_once!(self.system_get_once(key))
    }

    async fn system_init(&self, key: &str, value: &str) -> Result<String> {
        retry_once!(self.system_init_once(key, value))
    }

    async fn system_set(&self, key: &str, value: &str) -> Result<()> {
        retry_once!(self.system_set_once(key, value))
    }

    async fn ping(&self) -> Result<()> {
        retry_once!(self.ping_once())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mk(name: &str, timeout: &str) -> Resource {
        weft_core::store::conformance::mk_timeout("m", name, &[], timeout)
    }

    #[test]
    fn plan_orders_repeats_within_a_batch() {
        let p = plan(
            vec![mk("a", "1s"), mk("a", "2s"), mk("a", "2s")],
            HashMap::new(),
        );
        assert_eq!(
            p.outcomes.iter().map(Outcome::action).collect::<Vec<_>>(),
            ["created", "updated", "unchanged"]
        );
        assert_eq!(
            p.changes
                .iter()
                .map(|(op, r)| (*op, r.meta.version))
                .collect::<Vec<_>>(),
            [(Op::Create, 1), (Op::Update, 2)]
        );
        assert_eq!(p.changes[1].1.spec, mk("a", "2s").spec);
        assert_eq!(
            p.changes[1].1.meta.creation_time,
            p.changes[0].1.meta.creation_time
        );
    }

    #[test]
    fn plan_keeps_unchanged_versions() {
        let mut cur = mk("a", "1s");
        cur.meta = Meta {
            version: 7,
            creation_time: Some(now()),
            modification_time: Some(now()),
        };
        let p = plan(
            vec![mk("a", "1s")],
            HashMap::from([(cur.key(), cur.clone())]),
        );
        assert_eq!(p.outcomes, [Outcome::Unchanged(cur)]);
        assert!(p.changes.is_empty());
    }

    #[test]
    fn event_doc_reads_the_document_form() {
        let r = mk("a", "1s");
        let doc: EventDoc = serde_json::from_value(weft_core::document::to_value(&r)).unwrap();
        assert_eq!(doc.spec, r.spec);
        let doc: EventDoc = serde_json::from_value(json!({"labels": {"x": "y"}})).unwrap();
        assert_eq!(doc.labels["x"], "y");
    }

    #[test]
    fn redacts_credentials() {
        assert_eq!(
            redact("postgres://weft:secret@db:5432/weft"),
            "postgres://db:5432/weft"
        );
        assert_eq!(redact("postgres://db/weft"), "postgres://db/weft");
    }
}
