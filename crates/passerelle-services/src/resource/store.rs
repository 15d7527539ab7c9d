//! Where a resource's rows live: the SQL of its table in the dialect of the service's
//! engine, and the operations its handlers need, run on that engine (see [`crate::db`]).
//!
//! Every operation answers in [`ApiError`]s, so a handler does not know which engine it
//! talks to: a unique violation is a 409 naming the field, a check violation a 422, a busy
//! database a 503, on both.

use std::sync::Arc;

use rusqlite::{OptionalExtension, params_from_iter};
use tokio_postgres::types::ToSql;

use super::Resource;
use crate::api::{ApiError, FieldError};
use crate::db::{Database, DbError, Field, postgres};

/// The SQL of one resource in one dialect, built once at start.
#[derive(Debug)]
struct Queries {
    select_one: String,
    /// The row a write is about to change, locked until the transaction ends.
    select_for_update: String,
    select_page: String,
    select_many: String,
    insert: String,
    insert_with_id: String,
    update: String,
    delete: String,
    count: String,
    /// After rows were written with explicit ids: where generated ids continue (PostgreSQL).
    after_seed: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Sqlite,
    Postgres,
}

impl Queries {
    fn of<R: Resource>(dialect: Dialect) -> Self {
        let p = |i: usize| match dialect {
            Dialect::Sqlite => format!("?{i}"),
            Dialect::Postgres => format!("${i}"),
        };
        let table = R::PLURAL;
        let fields = R::FIELDS.join(", ");
        let cols = format!("id, {fields}, created_at, updated_at, version");
        let n = R::FIELDS.len();
        let placeholders = (1..=n).map(p).collect::<Vec<_>>().join(", ");
        let sets = R::FIELDS
            .iter()
            .enumerate()
            .map(|(i, f)| format!("{f} = {}", p(i + 1)))
            .collect::<Vec<_>>()
            .join(", ");
        let select_one = format!("SELECT {cols} FROM {table} WHERE id = {}", p(1));
        let (select_for_update, select_many, after_seed) = match dialect {
            // The write transaction is `BEGIN IMMEDIATE`: the whole database is locked.
            Dialect::Sqlite => (
                select_one.clone(),
                format!("SELECT {cols} FROM {table} WHERE id IN (SELECT value FROM json_each(?1))"),
                None,
            ),
            Dialect::Postgres => (
                format!("{select_one} FOR UPDATE"),
                format!("SELECT {cols} FROM {table} WHERE id = ANY($1)"),
                Some(format!(
                    "SELECT setval(pg_get_serial_sequence('{table}', 'id'), \
                     GREATEST((SELECT MAX(id) FROM {table}), 1))"
                )),
            ),
        };
        Self {
            select_one,
            select_for_update,
            select_page: format!(
                "SELECT {cols} FROM {table} WHERE id > {} ORDER BY id LIMIT {}",
                p(1),
                p(2)
            ),
            select_many,
            insert: format!(
                "INSERT INTO {table} ({fields}, created_at, updated_at, version) \
                 VALUES ({placeholders}, {a}, {a}, 1) RETURNING {cols}",
                a = p(n + 1)
            ),
            insert_with_id: format!(
                "INSERT INTO {table} (id, {fields}, created_at, updated_at, version) \
                 VALUES ({id}, {placeholders}, {a}, {a}, 1)",
                a = p(n + 1),
                id = p(n + 2)
            ),
            update: format!(
                "UPDATE {table} SET {sets}, updated_at = {a}, version = version + 1 \
                 WHERE id = {b} RETURNING {cols}",
                a = p(n + 1),
                b = p(n + 2)
            ),
            delete: format!("DELETE FROM {table} WHERE id = {}", p(1)),
            count: format!("SELECT COUNT(*) FROM {table}"),
            after_seed,
        }
    }
}

/// One resource's table on the service's database.
#[derive(Debug, Clone)]
pub struct Store {
    db: Database,
    queries: Arc<Queries>,
}

/// Parameters as PostgreSQL takes them.
fn pg_params(values: &[Field]) -> Vec<&(dyn ToSql + Sync)> {
    values.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

/// Turns a failed write into the answer a client should get: a unique violation is a 409
/// naming the field, a check violation a 422; anything else as [`DbError`] says.
fn sqlite_write_error<R: Resource>(e: rusqlite::Error) -> ApiError {
    if let rusqlite::Error::SqliteFailure(f, Some(msg)) = &e
        && f.code == rusqlite::ErrorCode::ConstraintViolation
    {
        // `UNIQUE constraint failed: users.email`
        if let Some(cols) = msg.strip_prefix("UNIQUE constraint failed: ") {
            let field = cols
                .split(',')
                .next()
                .and_then(|c| c.trim().split('.').nth(1))
                .unwrap_or("?");
            return conflict::<R>(field);
        }
        return ApiError::Validation(vec![FieldError::new("body", msg.clone())]);
    }
    ApiError::from(e)
}

fn pg_write_error<R: Resource>(e: tokio_postgres::Error) -> ApiError {
    if let Some(field) = postgres::unique_violation_column(&e) {
        return conflict::<R>(&field);
    }
    if let Some(msg) = postgres::check_violation(&e) {
        return ApiError::Validation(vec![FieldError::new("body", msg)]);
    }
    ApiError::from(e)
}

fn conflict<R: Resource>(field: &str) -> ApiError {
    ApiError::Conflict {
        field: field.to_string(),
        message: format!("another {} already has this {field}", R::SINGULAR),
    }
}

fn not_found<R: Resource>(id: i64) -> ApiError {
    ApiError::NotFound {
        what: R::SINGULAR,
        id,
    }
}

fn sqlite_row<R: Resource>(
    conn: &rusqlite::Connection,
    sql: &str,
    id: i64,
) -> rusqlite::Result<Option<R>> {
    conn.prepare_cached(sql)?
        .query_row([id], |row| R::from_row(row))
        .optional()
}

/// Row `id` in a write transaction (`BEGIN IMMEDIATE`: the database is held), or 404.
fn sqlite_locked<R: Resource>(
    tx: &rusqlite::Transaction<'_>,
    q: &Queries,
    id: i64,
) -> Result<R, ApiError> {
    sqlite_row::<R>(tx, &q.select_for_update, id)?.ok_or_else(|| not_found::<R>(id))
}

impl Store {
    pub fn new<R: Resource>(db: Database) -> Self {
        let dialect = match db {
            Database::Sqlite(_) => Dialect::Sqlite,
            Database::Postgres(_) => Dialect::Postgres,
        };
        Self {
            db,
            queries: Arc::new(Queries::of::<R>(dialect)),
        }
    }

    /// The row `id`, if there is one.
    pub async fn get<R: Resource>(&self, id: i64) -> Result<Option<R>, ApiError> {
        let q = &self.queries;
        match &self.db {
            Database::Sqlite(db) => Ok(db.read(|c| sqlite_row::<R>(c, &q.select_one, id))?),
            Database::Postgres(db) => {
                let client = db.client().await?;
                let stmt = client.prepare_cached(&q.select_one).await?;
                match client.query_opt(&stmt, &[&id]).await? {
                    Some(row) => Ok(Some(R::from_row(&row)?)),
                    None => Ok(None),
                }
            }
        }
    }

    /// Up to `limit` rows with ids above `after`, by id.
    pub async fn page<R: Resource>(&self, after: i64, limit: i64) -> Result<Vec<R>, ApiError> {
        let q = &self.queries;
        match &self.db {
            Database::Sqlite(db) => Ok(db.read(|c| {
                let mut stmt = c.prepare_cached(&q.select_page)?;
                let rows = stmt.query_map([after, limit], |row| R::from_row(row))?;
                rows.collect::<rusqlite::Result<Vec<R>>>()
            })?),
            Database::Postgres(db) => {
                let client = db.client().await?;
                let stmt = client.prepare_cached(&q.select_page).await?;
                let rows = client.query(&stmt, &[&after, &limit]).await?;
                Ok(rows
                    .iter()
                    .map(R::from_row)
                    .collect::<Result<Vec<R>, _>>()?)
            }
        }
    }

    /// The rows among `ids` that exist, in no particular order.
    pub async fn many<R: Resource>(&self, ids: &[i64]) -> Result<Vec<R>, ApiError> {
        let q = &self.queries;
        match &self.db {
            Database::Sqlite(db) => {
                let list =
                    serde_json::to_string(ids).map_err(|e| ApiError::Internal(e.to_string()))?;
                Ok(db.read(|c| {
                    let mut stmt = c.prepare_cached(&q.select_many)?;
                    let rows = stmt.query_map([list], |row| R::from_row(row))?;
                    rows.collect::<rusqlite::Result<Vec<R>>>()
                })?)
            }
            Database::Postgres(db) => {
                let client = db.client().await?;
                let stmt = client.prepare_cached(&q.select_many).await?;
                let rows = client.query(&stmt, &[&ids]).await?;
                Ok(rows
                    .iter()
                    .map(R::from_row)
                    .collect::<Result<Vec<R>, _>>()?)
            }
        }
    }

    /// Inserts a row with these field values (in [`Resource::FIELDS`] order), stamped `now`.
    pub async fn insert<R: Resource>(
        &self,
        mut values: Vec<Field>,
        now: String,
    ) -> Result<R, ApiError> {
        values.push(Field::Text(now));
        match &self.db {
            Database::Sqlite(db) => {
                let q = self.queries.clone();
                db.write(move |c| {
                    c.prepare_cached(&q.insert)?
                        .query_row(params_from_iter(values), |row| R::from_row(row))
                        .map_err(sqlite_write_error::<R>)
                })
                .await
            }
            Database::Postgres(db) => {
                let client = db.client().await?;
                let stmt = client.prepare_cached(&self.queries.insert).await?;
                let row = client
                    .query_one(&stmt, &pg_params(&values))
                    .await
                    .map_err(pg_write_error::<R>)?;
                Ok(R::from_row(&row)?)
            }
        }
    }

    /// Replaces row `id` with the values `change` computes from it (it may refuse, e.g. on
    /// `If-Match`), stamped `now`: in one transaction that holds the row meanwhile.
    pub async fn update<R, F>(&self, id: i64, now: String, change: F) -> Result<R, ApiError>
    where
        R: Resource,
        F: FnOnce(&R) -> Result<Vec<Field>, ApiError> + Send + 'static,
    {
        let finish = move |mut values: Vec<Field>| {
            values.push(Field::Text(now));
            values.push(Field::Integer(id));
            values
        };
        match &self.db {
            Database::Sqlite(db) => {
                let q = self.queries.clone();
                db.write(move |c| {
                    let tx =
                        c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                    let current = sqlite_locked::<R>(&tx, &q, id)?;
                    let values = finish(change(&current)?);
                    let updated = tx
                        .prepare_cached(&q.update)?
                        .query_row(params_from_iter(values), |row| R::from_row(row))
                        .map_err(sqlite_write_error::<R>)?;
                    tx.commit()?;
                    Ok(updated)
                })
                .await
            }
            Database::Postgres(db) => {
                let mut client = db.client().await?;
                let tx = client.transaction().await?;
                let current = self.pg_locked::<R>(&tx, id).await?;
                let values = finish(change(&current)?);
                let stmt = tx.prepare_cached(&self.queries.update).await?;
                let row = tx
                    .query_one(&stmt, &pg_params(&values))
                    .await
                    .map_err(pg_write_error::<R>)?;
                let updated = R::from_row(&row)?;
                tx.commit().await?;
                Ok(updated)
            }
        }
    }

    /// Deletes row `id` if `check` accepts it (e.g. `If-Match`), in one transaction.
    pub async fn delete<R, F>(&self, id: i64, check: F) -> Result<(), ApiError>
    where
        R: Resource,
        F: FnOnce(&R) -> Result<(), ApiError> + Send + 'static,
    {
        match &self.db {
            Database::Sqlite(db) => {
                let q = self.queries.clone();
                db.write(move |c| {
                    let tx =
                        c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                    let current = sqlite_locked::<R>(&tx, &q, id)?;
                    check(&current)?;
                    tx.prepare_cached(&q.delete)?.execute([id])?;
                    tx.commit()?;
                    Ok(())
                })
                .await
            }
            Database::Postgres(db) => {
                let mut client = db.client().await?;
                let tx = client.transaction().await?;
                let current = self.pg_locked::<R>(&tx, id).await?;
                check(&current)?;
                let stmt = tx.prepare_cached(&self.queries.delete).await?;
                tx.execute(&stmt, &[&id]).await?;
                tx.commit().await?;
                Ok(())
            }
        }
    }

    /// Writes demo rows `1..=rows` if the table is empty, in one transaction (a crash
    /// mid-seed leaves an empty table, and the next start seeds again). Instances seeding
    /// together seed once. Returns how many rows were written.
    pub async fn seed<R: Resource>(&self, rows: u64) -> Result<u64, ApiError> {
        let created = "2026-01-01T00:00:00.000Z";
        let row_values = |i: u64| -> Result<Vec<Field>, ApiError> {
            let mut values = R::validate(R::demo(i)).map_err(ApiError::Validation)?;
            values.push(Field::Text(created.into()));
            values.push(Field::Integer(i as i64));
            Ok(values)
        };
        if rows == 0 {
            return Ok(0);
        }
        let q = &self.queries;
        match &self.db {
            Database::Sqlite(db) => {
                let mut conn = db.write_blocking();
                let tx =
                    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let existing: i64 = tx.query_row(&q.count, [], |r| r.get(0))?;
                if existing > 0 {
                    return Ok(0);
                }
                {
                    let mut stmt = tx.prepare(&q.insert_with_id)?;
                    for i in 1..=rows {
                        stmt.execute(params_from_iter(row_values(i)?))?;
                    }
                }
                tx.commit()?;
            }
            Database::Postgres(db) => {
                let mut client = db.client().await?;
                let tx = client.transaction().await?;
                // Another instance seeding now waits here, then finds the rows.
                tx.batch_execute(&format!("LOCK TABLE {} IN EXCLUSIVE MODE", R::PLURAL))
                    .await?;
                let existing: i64 = tx.query_one(&q.count, &[]).await?.try_get(0)?;
                if existing > 0 {
                    return Ok(0);
                }
                let stmt = tx.prepare(&q.insert_with_id).await?;
                for i in 1..=rows {
                    tx.execute(&stmt, &pg_params(&row_values(i)?)).await?;
                }
                if let Some(sql) = &q.after_seed {
                    tx.query_one(sql.as_str(), &[]).await?;
                }
                tx.commit().await?;
            }
        }
        Ok(rows)
    }

    /// Row `id`, locked until `tx` ends (a write's first step on PostgreSQL).
    async fn pg_locked<R: Resource>(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        id: i64,
    ) -> Result<R, ApiError> {
        let stmt = tx.prepare_cached(&self.queries.select_for_update).await?;
        match tx.query_opt(&stmt, &[&id]).await? {
            Some(row) => Ok(R::from_row(&row)?),
            None => Err(not_found::<R>(id)),
        }
    }

    /// A trivial query, for readiness.
    pub async fn ping(&self) -> Result<(), DbError> {
        self.db.ping().await
    }
}
