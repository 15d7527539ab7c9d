//! SQLite: one file, shared by every instance of the service.
//!
//! SQLite in WAL mode lets readers in any process run while one writer commits, which is
//! exactly the shape of this workload (many reads, few writes):
//!
//! - **Reads** run inline on the async worker with a pooled read-only connection. A primary
//!   key lookup on a warm page cache takes microseconds; shipping it to a blocking thread
//!   would cost more than the query. WAL readers never wait for writers, so they cannot
//!   stall the runtime behind a lock.
//! - **Writes** go to Tokio's blocking pool and share one connection behind a mutex: SQLite
//!   admits one writer at a time anyway, and a write may wait on another process's lock or
//!   on `fsync`. `synchronous=FULL` makes every acknowledged write durable.
//! - **Migrations** run in a `BEGIN IMMEDIATE` transaction, so instances starting together
//!   apply them exactly once; `PRAGMA user_version` records how far the schema has come.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{Connection, OpenFlags};

use super::{Columns, DbError, Migrations};

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A service's SQLite database. Cheap to clone.
#[derive(Clone)]
pub struct SqliteDatabase {
    read: r2d2::Pool<SqliteConnectionManager>,
    write: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteDatabase")
            .field("path", &self.path)
            .finish()
    }
}

impl SqliteDatabase {
    /// Opens (creating if needed) the database at `url` and brings its schema up to date.
    pub fn open(
        path: PathBuf,
        migrations: Migrations,
        read_connections: u32,
    ) -> Result<Self, DbError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| DbError::Dir {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let open_err = |source| DbError::Open {
            path: path.display().to_string(),
            source,
        };
        let mut write = Connection::open(&path).map_err(open_err)?;
        write.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        // WAL is persistent in the file; setting it again is a no-op.
        write
            .pragma_update(None, "journal_mode", "WAL")
            .and_then(|_| write.pragma_update(None, "synchronous", "FULL"))
            .and_then(|_| write.pragma_update(None, "foreign_keys", "ON"))
            .map_err(open_err)?;
        migrate(&mut write, migrations)?;

        let manager = SqliteConnectionManager::file(&path)
            .with_flags(
                OpenFlags::SQLITE_OPEN_READ_ONLY
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX
                    | OpenFlags::SQLITE_OPEN_URI,
            )
            .with_init(|c| {
                c.busy_timeout(BUSY_TIMEOUT)?;
                c.pragma_update(None, "query_only", "ON")
            });
        let read = r2d2::Pool::builder()
            .max_size(read_connections.max(1))
            .min_idle(Some(1))
            .connection_timeout(Duration::from_secs(2))
            .build(manager)?;
        Ok(Self {
            read,
            write: Arc::new(Mutex::new(write)),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs a read inline (see the module docs for why that is right here).
    pub fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, DbError> {
        let conn = self.read.get()?;
        Ok(f(&conn)?)
    }

    /// Runs a write on the blocking pool, serialized with this process's other writes.
    pub async fn write<T, E>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
    {
        let write = self.write.clone();
        tokio::task::spawn_blocking(move || {
            // A std mutex, not a Tokio one: it is only ever held on this blocking thread,
            // never across an await.
            let mut conn = write
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&mut conn)
        })
        .await
        .map_err(|_| E::from(DbError::Worker))?
    }

    /// The write connection, for blocking callers (seeding before the server starts).
    pub fn write_blocking(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.write
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A trivial query, for readiness.
    pub fn ping(&self) -> Result<(), DbError> {
        self.read(|c| {
            c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                .map(|_| ())
        })
    }
}

impl Columns for rusqlite::Row<'_> {
    type Error = rusqlite::Error;
    fn integer(&self, index: usize) -> Result<i64, rusqlite::Error> {
        self.get(index)
    }
    fn text(&self, index: usize) -> Result<String, rusqlite::Error> {
        self.get(index)
    }
}

impl rusqlite::ToSql for super::Field {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(match self {
            super::Field::Text(s) => rusqlite::types::ToSqlOutput::from(s.as_str()),
            super::Field::Integer(i) => rusqlite::types::ToSqlOutput::from(*i),
        })
    }
}

fn migrate(conn: &mut Connection, migrations: Migrations) -> Result<(), DbError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let applied: usize =
        tx.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))? as usize;
    for (i, (name, sql)) in migrations.iter().enumerate().skip(applied) {
        tx.execute_batch(sql).map_err(|source| DbError::Migration {
            name,
            source: Box::new(source),
        })?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tracing::info!(migration = name, "applied migration");
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_apply_once_across_openers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        const M: Migrations = &[
            ("one", "CREATE TABLE a (x INTEGER);"),
            ("two", "CREATE TABLE b (y INTEGER);"),
        ];
        let a = SqliteDatabase::open(path.clone(), M, 2).unwrap();
        let b = SqliteDatabase::open(path, M, 2).unwrap();
        let v: i64 = b
            .read(|c| c.pragma_query_value(None, "user_version", |r| r.get(0)))
            .unwrap();
        assert_eq!(v, 2);
        a.ping().unwrap();
        // Read connections cannot write.
        assert!(
            a.read(|c| c.execute("INSERT INTO a VALUES (1)", []))
                .is_err()
        );
    }
}
