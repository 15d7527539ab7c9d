//! PostgreSQL: a pool of connections shared by the instance's requests.
//!
//! - **Pool.** `deadpool-postgres`, sized like SQLite's read pool (about one connection per
//!   worker thread, plus one). A request waits at most [`POOL_WAIT`] for a connection, then
//!   gets a 503 (busy), never an unbounded queue. Connections are checked cheaply when
//!   handed out again (`RecyclingMethod::Fast`: is it closed?).
//! - **Statements** are prepared once per connection and cached there (`prepare_cached`).
//! - **Writes** run in a transaction that locks the row it changes (`SELECT … FOR
//!   UPDATE`), so two instances updating one row serialize, as they do on SQLite's single
//!   writer, and `If-Match` is checked against the version that will be replaced.
//! - **Migrations** run in one transaction holding a transaction-level advisory lock, so
//!   instances starting together apply them exactly once. The table
//!   `passerelle_schema(service, version)` records how far each service's schema has come
//!   (the two services may share one database: their tables do not collide).
//! - **Durability** is the server's: a write is acknowledged after `COMMIT` returns, with the
//!   server's `synchronous_commit` (on by default).
//!
//! Connections are plain TCP (`NoTls`): `sslmode=require` is refused at connect time.

use std::time::Duration;

use bytes::BytesMut;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{IsNull, ToSql, Type};

use super::{Columns, DbError, Field, Schema, redact};

/// How long a request waits for a pooled connection before it is answered 503.
pub const POOL_WAIT: Duration = Duration::from_secs(2);

/// How long opening one connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The advisory lock migrations hold: any constant every instance agrees on.
const MIGRATION_LOCK: i64 = 0x7073_6c5f_6d69_6772; // "psl_migr"

/// A service's PostgreSQL database. Cheap to clone.
#[derive(Clone)]
pub struct PgDatabase {
    pool: Pool,
    /// The URL without its password.
    url: String,
}

impl std::fmt::Debug for PgDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgDatabase")
            .field("url", &self.url)
            .finish()
    }
}

impl PgDatabase {
    /// Connects a pool of up to `connections` to `url` and applies `schema`'s migrations.
    pub async fn open(url: &str, schema: Schema, connections: u32) -> Result<Self, DbError> {
        let shown = redact(url);
        let connect_error = |reason: String| DbError::Connect {
            url: shown.clone(),
            reason,
        };
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|e: tokio_postgres::Error| {
                connect_error(format!("not a valid PostgreSQL URL: {e}"))
            })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name(format!("passerelle-{}", schema.service));
        }
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(connections.max(1) as usize)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| connect_error(e.to_string()))?;
        let mut client = pool.get().await.map_err(|e| connect_error(e.to_string()))?;
        let db = Self {
            pool: pool.clone(),
            url: shown.clone(),
        };
        migrate(&mut client, schema).await?;
        Ok(db)
    }

    /// The URL without its password.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A pooled connection, within [`POOL_WAIT`].
    pub async fn client(&self) -> Result<Object, DbError> {
        Ok(self.pool.get().await?)
    }

    /// A trivial query, for readiness.
    pub async fn ping(&self) -> Result<(), DbError> {
        self.client().await?.simple_query("SELECT 1").await?;
        Ok(())
    }
}

/// Errors that say "try again": the server is busy, restarting or short of connections, or
/// the connection broke. A unique or check violation is not one of them.
pub fn is_transient(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        Some(code) => [
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::LOCK_NOT_AVAILABLE,
            SqlState::TOO_MANY_CONNECTIONS,
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::QUERY_CANCELED,
        ]
        .contains(code),
        // No SQLSTATE: the connection itself failed or closed.
        None => true,
    }
}

async fn migrate(client: &mut Object, schema: Schema) -> Result<(), DbError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS passerelle_schema (
             service    TEXT PRIMARY KEY,
             version    INTEGER NOT NULL,
             updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let applied: i32 = tx
        .query_opt(
            "SELECT version FROM passerelle_schema WHERE service = $1",
            &[&schema.service],
        )
        .await?
        .map(|row| row.try_get(0))
        .transpose()?
        .unwrap_or(0);
    for (i, (name, sql)) in schema
        .postgres
        .iter()
        .enumerate()
        .skip(applied.max(0) as usize)
    {
        tx.batch_execute(sql)
            .await
            .map_err(|source| DbError::Migration {
                name,
                source: Box::new(source),
            })?;
        tx.execute(
            "INSERT INTO passerelle_schema (service, version) VALUES ($1, $2)
             ON CONFLICT (service) DO UPDATE SET version = EXCLUDED.version, updated_at = now()",
            &[&schema.service, &(i as i32 + 1)],
        )
        .await?;
        tracing::info!(migration = name, "applied migration");
    }
    tx.commit().await?;
    Ok(())
}

impl Columns for tokio_postgres::Row {
    type Error = tokio_postgres::Error;
    fn integer(&self, index: usize) -> Result<i64, tokio_postgres::Error> {
        self.try_get(index)
    }
    fn text(&self, index: usize) -> Result<String, tokio_postgres::Error> {
        self.try_get(index)
    }
}

impl ToSql for Field {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Field::Text(s) => s.to_sql(ty, out),
            Field::Integer(i) => i.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        <String as ToSql>::accepts(ty) || <i64 as ToSql>::accepts(ty)
    }

    // Checked per value, not per type: an integer is never written into a text column.
    fn to_sql_checked(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Field::Text(s) => s.to_sql_checked(ty, out),
            Field::Integer(i) => i.to_sql_checked(ty, out),
        }
    }
}

/// The column a unique violation is about, from the server's detail
/// (`Key (email)=(a@b.c) already exists.`).
pub fn unique_violation_column(e: &tokio_postgres::Error) -> Option<String> {
    let db = e.as_db_error()?;
    if db.code() != &SqlState::UNIQUE_VIOLATION {
        return None;
    }
    let column = db
        .detail()
        .and_then(|d| d.strip_prefix("Key ("))
        .and_then(|d| d.split_once(')'))
        .map(|(cols, _)| cols.split(',').next().unwrap_or(cols).trim().to_string());
    Some(column.unwrap_or_else(|| "?".into()))
}

/// The server's message for a check violation (a value the table refuses).
pub fn check_violation(e: &tokio_postgres::Error) -> Option<String> {
    let db = e.as_db_error()?;
    (db.code() == &SqlState::CHECK_VIOLATION || db.code() == &SqlState::NOT_NULL_VIOLATION)
        .then(|| db.message().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_values_fit_only_their_own_column_type() {
        let mut out = BytesMut::new();
        assert!(
            Field::Integer(3)
                .to_sql_checked(&Type::TEXT, &mut out)
                .is_err()
        );
        assert!(
            Field::Text("x".into())
                .to_sql_checked(&Type::INT8, &mut out)
                .is_err()
        );
        assert!(
            Field::Integer(3)
                .to_sql_checked(&Type::INT8, &mut out)
                .is_ok()
        );
        assert!(
            Field::Text("x".into())
                .to_sql_checked(&Type::TEXT, &mut out)
                .is_ok()
        );
    }
}
