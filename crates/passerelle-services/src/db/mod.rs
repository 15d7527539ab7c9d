//! The service's own database: an SQLite file (the embedded default) or PostgreSQL (when the
//! URL says `postgres://`), behind one type.
//!
//! The two engines keep the same contract, which the services' test suite checks against
//! both: the same tables and columns (each engine's own DDL, in `migrations/<engine>/`),
//! migrations applied once however many instances start together, every write in one
//! transaction, and "busy" (locked, pool exhausted, server going away) told apart from a
//! real failure so that it becomes a 503 worth retrying rather than a 500.
//!
//! What differs is how a query runs, and each engine does what suits it:
//! - [`sqlite`]: reads inline on the async worker (a warm primary-key lookup takes
//!   microseconds), writes on the blocking pool behind one connection.
//! - [`postgres`]: everything async over a pool of connections (`deadpool-postgres`),
//!   prepared statements cached per connection.
//!
//! The SQL itself lives with the resources ([`crate::resource`]), in each engine's dialect.

pub(crate) mod postgres;
mod sqlite;

use std::path::PathBuf;

pub use postgres::PgDatabase;
pub use sqlite::SqliteDatabase;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(
        "unsupported database URL {0:?}: use sqlite://<path>, a file path, or \
         postgres://user:password@host:port/database"
    )]
    Url(String),
    #[error("cannot open database {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot create directory {path}: {source}")]
    Dir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("migration {name} failed: {source}")]
    Migration {
        name: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database connection pool: {0}")]
    Pool(#[from] r2d2::Error),
    #[error("database: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("database connection pool: {0}")]
    PgPool(#[from] deadpool_postgres::PoolError),
    #[error("cannot reach PostgreSQL at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("database worker stopped")]
    Worker,
}

impl DbError {
    /// True when the database is momentarily unable to serve (locked past the busy timeout,
    /// pool exhausted, a server restarting or out of connections): worth a 503 and a retry
    /// rather than a 500.
    pub fn is_busy(&self) -> bool {
        match self {
            DbError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                )
            }
            DbError::Pool(_) | DbError::PgPool(_) => true,
            DbError::Postgres(e) => postgres::is_transient(e),
            _ => false,
        }
    }
}

/// Ordered schema migrations of one service, in one engine's dialect.
pub type Migrations = &'static [(&'static str, &'static str)];

/// A service's migrations in both dialects. `service` names its line in PostgreSQL's
/// migration table (services may share one PostgreSQL database; each owns its tables).
#[derive(Debug, Clone, Copy)]
pub struct Schema {
    pub service: &'static str,
    pub sqlite: Migrations,
    pub postgres: Migrations,
}

/// Where a database is, from `services.<name>.database_url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// `sqlite:///abs/path.db`, `sqlite://rel/path.db`, `sqlite:path.db` or a plain path.
    Sqlite(PathBuf),
    /// `postgres://` or `postgresql://`, as libpq reads it.
    Postgres(String),
}

pub fn parse_url(url: &str) -> Result<DatabaseUrl, DbError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(DatabaseUrl::Postgres(url.to_string()));
    }
    let path = if let Some(p) = url.strip_prefix("sqlite://") {
        p
    } else if let Some(p) = url.strip_prefix("sqlite:") {
        p
    } else if url.contains("://") {
        return Err(DbError::Url(redact(url)));
    } else {
        url
    };
    if path.is_empty() || path == ":memory:" {
        return Err(DbError::Url(url.to_string()));
    }
    Ok(DatabaseUrl::Sqlite(PathBuf::from(path)))
}

/// The URL with its password replaced by `***`, for logs, errors and `/ready`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // The authority ends at the first '/', '?' or '#'; its credentials end at its last '@'.
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// A column value a resource writes: the two types its tables hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Text(String),
    Integer(i64),
}

/// A result row, read by position: what [`crate::resource::Resource::from_row`] needs from
/// either engine.
pub trait Columns {
    type Error;
    fn integer(&self, index: usize) -> Result<i64, Self::Error>;
    fn text(&self, index: usize) -> Result<String, Self::Error>;
}

/// A service database. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Database {
    Sqlite(SqliteDatabase),
    Postgres(PgDatabase),
}

impl Database {
    /// Opens the database at `url` (creating an SQLite file and its directory if needed) and
    /// brings its schema up to date. `connections`: pooled connections (about one per worker
    /// thread).
    pub async fn open(url: &str, schema: Schema, connections: u32) -> Result<Self, DbError> {
        match parse_url(url)? {
            DatabaseUrl::Sqlite(path) => Ok(Database::Sqlite(SqliteDatabase::open(
                path,
                schema.sqlite,
                connections,
            )?)),
            DatabaseUrl::Postgres(url) => Ok(Database::Postgres(
                PgDatabase::open(&url, schema, connections).await?,
            )),
        }
    }

    /// A trivial query, for readiness.
    pub async fn ping(&self) -> Result<(), DbError> {
        match self {
            Database::Sqlite(db) => db.ping(),
            Database::Postgres(db) => db.ping().await,
        }
    }

    /// Where the data is, for `/ready` and the logs (no password).
    pub fn describe(&self) -> serde_json::Value {
        match self {
            Database::Sqlite(db) => serde_json::json!({ "path": db.path().display().to_string() }),
            Database::Postgres(db) => serde_json::json!({ "url": db.url() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let sqlite = |p: &str| DatabaseUrl::Sqlite(PathBuf::from(p));
        assert_eq!(
            parse_url("sqlite:///var/lib/x.db").unwrap(),
            sqlite("/var/lib/x.db")
        );
        assert_eq!(
            parse_url("sqlite://data/x.db").unwrap(),
            sqlite("data/x.db")
        );
        assert_eq!(parse_url("sqlite:x.db").unwrap(), sqlite("x.db"));
        assert_eq!(parse_url("x.db").unwrap(), sqlite("x.db"));
        assert_eq!(
            parse_url("postgres://u:p@h/db").unwrap(),
            DatabaseUrl::Postgres("postgres://u:p@h/db".into())
        );
        assert!(matches!(
            parse_url("postgresql://h/db").unwrap(),
            DatabaseUrl::Postgres(_)
        ));
        assert!(parse_url("sqlite::memory:").is_err());
        assert!(parse_url("sqlite://").is_err());
        // An unknown scheme is refused, without echoing its password.
        let e = parse_url("mysql://root:hunter2@h/db")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mysql://root:***@h/db"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://app:s3cr@t@db.internal:5432/users?sslmode=require"),
            "postgres://app:***@db.internal:5432/users?sslmode=require"
        );
        assert_eq!(redact("postgres://app@db/users"), "postgres://app@db/users");
        assert_eq!(redact("postgres://db/users"), "postgres://db/users");
        assert_eq!(redact("/var/lib/users.db"), "/var/lib/users.db");
    }
}
