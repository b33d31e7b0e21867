//! The database: one code path over SQLite (the embedded default) and PostgreSQL (several ledger
//! instances on one database) through sqlx's `Any` driver.
//!
//! Every write that touches a customer's credit runs in a [`WriteTx`] that first locks the
//! customer's row and moves its `lock_version` (its revision): on PostgreSQL that row lock
//! serialises all writers of one customer across instances; on SQLite a write transaction takes
//! the database write lock when it begins (`BEGIN IMMEDIATE`: no upgrade deadlocks), an
//! in-process mutex keeps the one process's writers from contending at all, and they all run on
//! one connection of their own, whose page cache stays warm from one write to the next.

pub mod backfill;
pub mod rows;
mod schema;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use tokio::sync::{Mutex, OwnedMutexGuard};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    /// SQLite: a pool of one connection for write transactions. SQLite empties a connection's
    /// page cache when another connection has written since its last transaction, so writes
    /// taking turns on the pool's connections would each start cold and read back every page
    /// they touch; on one connection each finds what the write before it left. (PostgreSQL:
    /// none, writes use the pool.)
    sqlite_write_pool: Option<AnyPool>,
    backend: Backend,
    sqlite_writer: Arc<Mutex<()>>,
    clock: Clock,
}

/// Where the ledger's "now" comes from.
#[derive(Clone, Debug, Default)]
pub enum Clock {
    /// The database's clock, shared by all instances on one database.
    #[default]
    Database,
    /// An instant (microseconds since the Unix epoch) that its owner moves: a deterministic
    /// simulation runs the ledger on its own time.
    Manual(Arc<AtomicI64>),
}

impl Clock {
    /// A manual clock at `at`, and the handle that moves it.
    pub fn manual(at: DateTime<Utc>) -> (Clock, Arc<AtomicI64>) {
        let instant = Arc::new(AtomicI64::new(micros(at)));
        (Clock::Manual(instant.clone()), instant)
    }
}

pub type Tx = sqlx::Transaction<'static, sqlx::Any>;

/// A write transaction; dropping it without `commit` rolls back.
pub struct WriteTx {
    pub tx: Tx,
    _serial: Option<OwnedMutexGuard<()>>,
}

impl WriteTx {
    pub async fn commit(self) -> sqlx::Result<()> {
        self.tx.commit().await
    }
}

impl Db {
    /// Connects, creating an SQLite file on first start, and applies pending migrations.
    pub async fn connect(url: &str) -> anyhow::Result<Db> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            anyhow::bail!("unsupported database URL {url:?}: expected sqlite://PATH or postgres://…");
        };
        let url = match backend {
            Backend::Sqlite if !url.contains('?') => format!("{url}?mode=rwc"),
            _ => url.to_owned(),
        };
        let (pool, sqlite_write_pool) = match backend {
            Backend::Sqlite => {
                let writes = sqlite_options(1).idle_timeout(None).max_lifetime(None);
                (sqlite_options(4).connect(&url).await, Some(writes.connect(&url).await))
            }
            Backend::Postgres => (pool_options(16).connect(&url).await, None),
        };
        let context = || format!("connecting to {}", redact(&url));
        let pool = pool.with_context(context)?;
        let sqlite_write_pool = sqlite_write_pool.transpose().with_context(context)?;
        let db =
            Db { pool, sqlite_write_pool, backend, sqlite_writer: Arc::new(Mutex::new(())), clock: Clock::Database };
        db.migrate().await?;
        Ok(db)
    }

    /// The same database on another clock.
    pub fn with_clock(self, clock: Clock) -> Db {
        Db { clock, ..self }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The connections write transactions run on.
    fn write_pool(&self) -> &AnyPool {
        self.sqlite_write_pool.as_ref().unwrap_or(&self.pool)
    }

    async fn migrate(&self) -> anyhow::Result<()> {
        let _serial = self.sqlite_writer.lock().await;
        let mut tx = self.write_pool().begin().await?;
        if self.backend == Backend::Postgres {
            // Two instances starting together must not both migrate.
            sqlx::query("SELECT pg_advisory_xact_lock(4802)").execute(&mut *tx).await?;
        }
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .execute(&mut *tx)
        .await?;
        let applied: i64 = sqlx::query("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        for (version, sql) in schema::pending(self.backend, applied) {
            for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                sqlx::query(statement).execute(&mut *tx).await.with_context(|| format!("migration {version}"))?;
            }
            if version == schema::USAGE_MARKS {
                let now = Utc::now().timestamp_micros();
                backfill::usage_marks(&mut tx, now).await.context("migration 7: usage marks")?;
            }
            sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
                .bind(version)
                .bind(Utc::now().timestamp_micros())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Begins a transaction for writes.
    pub async fn begin_write(&self) -> sqlx::Result<WriteTx> {
        let serial = match self.backend {
            Backend::Sqlite => Some(self.sqlite_writer.clone().lock_owned().await),
            Backend::Postgres => None,
        };
        let tx = match self.backend {
            Backend::Sqlite => {
                // Run to its end on a task of its own: sqlx (0.8) makes a second round trip after
                // a custom BEGIN before it hands out the transaction, and a caller dropped in
                // between (a client that timed out) would leave the connection inside a
                // transaction that holds the write lock, with nothing to roll it back. Finished
                // on its task, an abandoned begin yields a transaction whose drop rolls it back.
                let pool = self.write_pool().clone();
                tokio::spawn(async move { pool.begin_with("BEGIN IMMEDIATE").await })
                    .await
                    .map_err(|e| sqlx::Error::Io(std::io::Error::other(e)))??
            }
            Backend::Postgres => self.pool.begin().await?,
        };
        Ok(WriteTx { tx, _serial: serial })
    }

    /// Begins a read-only snapshot: every statement sees the same committed state.
    pub async fn begin_read(&self) -> sqlx::Result<Tx> {
        let mut tx = self.pool.begin().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *tx).await?;
        }
        Ok(tx)
    }

    /// The ledger's clock: the database's (all instances on one database share it) unless a
    /// manual clock was set.
    pub async fn now(&self, conn: &mut sqlx::AnyConnection) -> sqlx::Result<DateTime<Utc>> {
        if let Clock::Manual(instant) = &self.clock {
            return Ok(from_micros(instant.load(Ordering::SeqCst)));
        }
        let sql = match self.backend {
            Backend::Sqlite => "SELECT CAST(unixepoch('subsec') * 1000 AS INTEGER) * 1000",
            Backend::Postgres => "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT)",
        };
        let micros: i64 = sqlx::query(sql).fetch_one(&mut *conn).await?.try_get(0)?;
        Ok(from_micros(micros))
    }
}

/// Locks a customer for the rest of the transaction and returns its new revision (which grows
/// with every write); `None` if there is no such live customer.
pub async fn lock_customer(tx: &mut Tx, customer_id: &str) -> sqlx::Result<Option<i64>> {
    let row = rows::fetch_by_ids(tx, LOCK, &[customer_id.to_owned()]).await?.pop();
    row.map(|r| r.try_get(1)).transpose()
}

/// Bumps the lock version (the customer's revision) of the live customers among `{list}`.
const LOCK: &str =
    "UPDATE customers SET lock_version = lock_version + 1 WHERE id IN ({list}) AND deleted_at IS NULL RETURNING id, lock_version";

/// Locks many customers (ids sorted, no duplicates) and returns the new revision of each live
/// one, **without writing it**: the transaction must write each one it answers with its last
/// update of the customer's row (the store's `Writes::revisions`), so that a sync updates each
/// row once, not twice (the second update was a sixth of a gateway sync's PostgreSQL time). On
/// PostgreSQL the rows are locked in id order, so that two transactions locking overlapping sets
/// cannot deadlock; on SQLite the transaction holds the database's write lock from its start.
pub async fn lock_customers(
    tx: &mut Tx,
    backend: Backend,
    ids: &[String],
) -> sqlx::Result<std::collections::HashMap<String, i64>> {
    let sql = match backend {
        Backend::Postgres => {
            "SELECT id, lock_version FROM customers WHERE id IN ({list}) AND deleted_at IS NULL ORDER BY id FOR UPDATE"
        }
        Backend::Sqlite => "SELECT id, lock_version FROM customers WHERE id IN ({list}) AND deleted_at IS NULL",
    };
    let mut revisions = std::collections::HashMap::with_capacity(ids.len());
    let columns = [("id", rows::Kind::Text), ("lock_version", rows::Kind::Int)];
    for row in rows::fetch_small_rows_by_ids(tx, sql, &columns, ids).await? {
        let [id, version] = row.as_slice() else { return Err(rows::wrong_columns(&row)) };
        revisions.insert(id.text()?.to_owned(), version.int()?.saturating_add(1));
    }
    Ok(revisions)
}

/// An instant as the API and the webhooks write it: RFC 3339 in UTC, with as many fractional
/// digits as needed.
pub fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

pub fn from_micros(micros: i64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp_micros(micros).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

pub fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

/// Reads an optional column, treating SQL NULL as `None`.
pub fn opt<'r, T>(row: &'r AnyRow, column: &str) -> sqlx::Result<Option<T>>
where
    T: sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    row.try_get::<Option<T>, _>(column)
}

/// A database URL without its password, for messages.
pub fn redact(url: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let base = match (base.find("://"), base.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = base[scheme..at].trim_start_matches("://");
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}://{}:***@{}", &base[..scheme], user, base[at..].trim_start_matches('@'))
        }
        _ => base.to_owned(),
    };
    // The drivers also take a password as a parameter.
    let secret = |name: &str| ["password", "sslpassword"].iter().any(|s| name.eq_ignore_ascii_case(s));
    match query {
        None => base,
        Some(query) => {
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((name, _)) if secret(name) => format!("{name}=***"),
                    _ => p.to_owned(),
                })
                .collect();
            format!("{base}?{}", params.join("&"))
        }
    }
}

fn pool_options(max_connections: u32) -> AnyPoolOptions {
    AnyPoolOptions::new().max_connections(max_connections).acquire_timeout(Duration::from_secs(10))
}

/// SQLite connections with the ledger's settings.
fn sqlite_options(max_connections: u32) -> AnyPoolOptions {
    // WAL lets readers run beside the writer; synchronous=FULL makes every acknowledged
    // commit durable; the busy timeout covers a second process (e.g. `check`).
    pool_options(max_connections).after_connect(|conn, _| {
        Box::pin(async move {
            for pragma in [
                "PRAGMA journal_mode = WAL",
                "PRAGMA synchronous = FULL",
                "PRAGMA busy_timeout = 10000",
                // 64 MiB of page cache (default 2 MiB): a sync of a thousand customers
                // touches more pages than that, and spilling them mid-transaction costs.
                "PRAGMA cache_size = -65536",
                "PRAGMA foreign_keys = ON",
            ] {
                sqlx::query(pragma).execute(&mut *conn).await?;
            }
            Ok(())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn a_database_url_is_logged_without_any_password() {
        let logged = redact("postgres://ledger:pw1@db.internal/ledger?sslmode=require&password=s3cret&SSLPASSWORD=k3y");
        assert_eq!(logged, "postgres://ledger:***@db.internal/ledger?sslmode=require&password=***&SSLPASSWORD=***");
        assert_eq!(redact("sqlite://ledger.db?mode=rwc"), "sqlite://ledger.db?mode=rwc");
    }
}
