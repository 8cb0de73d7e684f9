//! Portable SQL: the one small connection trait that store code shared by
//! both backends is written against (R37). A unit of work takes
//! `&mut dyn Sql` and runs inside the writer's group transaction, on SQLite
//! (`SqliteSql`, the writer's `rusqlite::Connection`) or on PostgreSQL
//! (`PgSql`, a `postgres::Transaction`).
//!
//! The SQL text is the same on both: `$1`-style parameters (SQLite binds
//! them by name here, so `$2` before `$1` is fine), `ON CONFLICT … DO
//! NOTHING / DO UPDATE`, `RETURNING`, integers as 64-bit (`BIGINT` on
//! PostgreSQL), booleans as 0/1 integers, times as RFC 3339 text. The few
//! places that must differ ask [`Sql::backend`] (e.g. `FOR UPDATE` row
//! locks, which SQLite neither has nor needs: its writer holds the whole
//! database).

use std::collections::HashMap;

use crate::error::StoreError;

/// Which engine runs the SQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// One bound parameter or one column of a result row.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    /// Raw bytes (SQLite BLOB, PostgreSQL BYTEA): captured task output.
    Bytes(Vec<u8>),
}

impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value::Int(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Int(v as i64)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Value {
        Value::Text(v.to_string())
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Value {
        Value::Text(v.clone())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Value {
        Value::Text(v)
    }
}
impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Value {
        Value::Bytes(v.to_vec())
    }
}
impl From<&Vec<u8>> for Value {
    fn from(v: &Vec<u8>) -> Value {
        Value::Bytes(v.clone())
    }
}
impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Value {
        Value::Bytes(v)
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Value {
        v.map_or(Value::Null, Into::into)
    }
}

/// Bound parameters: `vals![a, b, c]`.
#[macro_export]
macro_rules! vals {
    ($($v:expr),* $(,)?) => { &[$($crate::persistence::sql::Value::from($v)),*] };
}

/// A result row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row(pub Vec<Value>);

impl Row {
    fn col(&self, i: usize) -> Result<&Value, StoreError> {
        self.0
            .get(i)
            .ok_or_else(|| StoreError::Invalid(format!("no column {i} in a result row")))
    }

    pub fn int(&self, i: usize) -> Result<i64, StoreError> {
        match self.col(i)? {
            Value::Int(v) => Ok(*v),
            other => Err(StoreError::Invalid(format!(
                "column {i}: expected an integer, found {other:?}"
            ))),
        }
    }

    pub fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        match self.col(i)? {
            Value::Null => Ok(None),
            _ => self.int(i).map(Some),
        }
    }

    pub fn text(&self, i: usize) -> Result<String, StoreError> {
        match self.col(i)? {
            Value::Text(v) => Ok(v.clone()),
            Value::Int(v) => Ok(v.to_string()),
            Value::Null => Err(StoreError::Invalid(format!(
                "column {i}: expected text, found NULL"
            ))),
            Value::Bytes(_) => Err(StoreError::Invalid(format!(
                "column {i}: expected text, found bytes"
            ))),
        }
    }

    pub fn bytes(&self, i: usize) -> Result<Vec<u8>, StoreError> {
        match self.col(i)? {
            Value::Bytes(v) => Ok(v.clone()),
            Value::Text(v) => Ok(v.clone().into_bytes()),
            other => Err(StoreError::Invalid(format!(
                "column {i}: expected bytes, found {other:?}"
            ))),
        }
    }

    pub fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        match self.col(i)? {
            Value::Null => Ok(None),
            _ => self.text(i).map(Some),
        }
    }
}

/// The connection a portable unit of work runs on (inside the writer's
/// transaction: never BEGIN or COMMIT here).
pub trait Sql {
    fn backend(&self) -> Backend;
    /// Run a statement; the number of rows it changed.
    fn exec(&mut self, sql: &str, params: &[Value]) -> Result<u64, StoreError>;
    /// Run a query; every row.
    fn rows(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StoreError>;

    /// The first row, if any.
    fn row(&mut self, sql: &str, params: &[Value]) -> Result<Option<Row>, StoreError> {
        Ok(self.rows(sql, params)?.into_iter().next())
    }

    /// ` FOR UPDATE` on PostgreSQL (lock the rows read until COMMIT, so two
    /// instances serialise on them); nothing on SQLite, whose writer holds
    /// the whole database for the transaction anyway.
    fn for_update(&self) -> &'static str {
        match self.backend() {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE",
        }
    }
}

/// Serialise this transaction with every other one that names `lock`, on
/// PostgreSQL: the `meta` row `lock` is locked until COMMIT (created when
/// missing), so appends to a chained log by several instances read the
/// head the previous one committed (READ COMMITTED takes a new snapshot
/// per statement). Nothing on SQLite, whose writer is alone.
pub fn serialise_on(db: &mut dyn Sql, lock: &str) -> Result<(), StoreError> {
    if db.backend() == Backend::Postgres {
        db.exec(
            "INSERT INTO meta (key, value) VALUES ($1, '')
             ON CONFLICT (key) DO UPDATE SET value = ''",
            crate::vals![lock],
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// SQLite

/// The writer's SQLite connection seen through [`Sql`].
pub struct SqliteSql<'a>(pub &'a rusqlite::Connection);

impl SqliteSql<'_> {
    /// Bind `params[k - 1]` to each `$k` of the statement: one pass over
    /// its parameters, by their names (SQLite numbers named parameters in
    /// order of appearance, so `$2` may come first), no allocation.
    fn bind<'s>(
        stmt: &mut rusqlite::CachedStatement<'s>,
        params: &[Value],
    ) -> Result<(), StoreError> {
        let count = stmt.parameter_count();
        for idx in 1..=count {
            let k = stmt
                .parameter_name(idx)
                .and_then(|n| n.strip_prefix('$'))
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|k| (1..=params.len()).contains(k))
                .ok_or_else(|| {
                    StoreError::Invalid(format!(
                        "statement parameter {:?} is not one of $1..${}",
                        stmt.parameter_name(idx),
                        params.len()
                    ))
                })?;
            match &params[k - 1] {
                Value::Null => stmt.raw_bind_parameter(idx, rusqlite::types::Null)?,
                Value::Int(n) => stmt.raw_bind_parameter(idx, n)?,
                Value::Text(s) => stmt.raw_bind_parameter(idx, s.as_str())?,
                Value::Bytes(b) => stmt.raw_bind_parameter(idx, b.as_slice())?,
            }
        }
        // Every parameter given must appear in the text (each `$k` once
        // among the statement's parameters).
        if count != params.len() {
            return Err(StoreError::Invalid(format!(
                "statement has {count} parameters, {} given",
                params.len()
            )));
        }
        Ok(())
    }
}

fn sqlite_value(v: rusqlite::types::ValueRef<'_>) -> Result<Value, StoreError> {
    use rusqlite::types::ValueRef;
    Ok(match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(n) => Value::Int(n),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Bytes(b.to_vec()),
        ValueRef::Real(_) => {
            return Err(StoreError::Invalid(
                "portable store code reads integers, text and bytes only".into(),
            ))
        }
    })
}

impl Sql for SqliteSql<'_> {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    fn exec(&mut self, sql: &str, params: &[Value]) -> Result<u64, StoreError> {
        let mut stmt = self.0.prepare_cached(sql)?;
        Self::bind(&mut stmt, params)?;
        let n = stmt.raw_execute()?;
        Ok(n as u64)
    }

    fn rows(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StoreError> {
        let mut stmt = self.0.prepare_cached(sql)?;
        Self::bind(&mut stmt, params)?;
        let n = stmt.column_count();
        let mut rows = stmt.raw_query();
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut row = Vec::with_capacity(n);
            for i in 0..n {
                row.push(sqlite_value(r.get_ref(i)?)?);
            }
            out.push(Row(row));
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------
// PostgreSQL

impl postgres::types::ToSql for Value {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut postgres::types::private::BytesMut,
    ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use postgres::types::Type;
        match self {
            Value::Null => Ok(postgres::types::IsNull::Yes),
            Value::Int(n) => match *ty {
                Type::INT2 => i16::try_from(*n)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(*n)?.to_sql(ty, out),
                Type::BOOL => (*n != 0).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR => n.to_string().to_sql(ty, out),
                _ => n.to_sql(ty, out),
            },
            Value::Text(s) => s.as_str().to_sql(ty, out),
            Value::Bytes(b) => b.as_slice().to_sql(ty, out),
        }
    }

    /// Any column type: the conversion above picks the encoding (and
    /// fails with the types named when they cannot match).
    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

/// A PostgreSQL transaction seen through [`Sql`], with the writer's
/// per-connection statement cache.
pub struct PgSql<'a, 'c> {
    pub tx: &'a mut postgres::Transaction<'c>,
    pub cache: &'a mut HashMap<String, postgres::Statement>,
}

impl PgSql<'_, '_> {
    fn statement(&mut self, sql: &str) -> Result<postgres::Statement, StoreError> {
        if let Some(s) = self.cache.get(sql) {
            return Ok(s.clone());
        }
        let s = self.tx.prepare(sql).map_err(StoreError::from_pg)?;
        self.cache.insert(sql.to_string(), s.clone());
        Ok(s)
    }
}

fn pg_params(params: &[Value]) -> Vec<&(dyn postgres::types::ToSql + Sync)> {
    params
        .iter()
        .map(|p| p as &(dyn postgres::types::ToSql + Sync))
        .collect()
}

fn pg_row(r: &postgres::Row) -> Result<Row, StoreError> {
    use postgres::types::Type;
    let mut out = Vec::with_capacity(r.len());
    for (i, c) in r.columns().iter().enumerate() {
        let v = match *c.type_() {
            Type::INT8 => r.try_get::<_, Option<i64>>(i).map(|v| v.into()),
            Type::INT4 => r
                .try_get::<_, Option<i32>>(i)
                .map(|v| v.map(i64::from).into()),
            Type::INT2 => r
                .try_get::<_, Option<i16>>(i)
                .map(|v| v.map(i64::from).into()),
            Type::BOOL => r.try_get::<_, Option<bool>>(i).map(|v| v.into()),
            Type::BYTEA => r.try_get::<_, Option<Vec<u8>>>(i).map(|v| v.into()),
            _ => r.try_get::<_, Option<String>>(i).map(|v| v.into()),
        }
        .map_err(StoreError::from_pg)?;
        out.push(v);
    }
    Ok(Row(out))
}

impl Sql for PgSql<'_, '_> {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }

    fn exec(&mut self, sql: &str, params: &[Value]) -> Result<u64, StoreError> {
        let stmt = self.statement(sql)?;
        self.tx
            .execute(&stmt, &pg_params(params))
            .map_err(StoreError::from_pg)
    }

    fn rows(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StoreError> {
        let stmt = self.statement(sql)?;
        let rows = self
            .tx
            .query(&stmt, &pg_params(params))
            .map_err(StoreError::from_pg)?;
        rows.iter().map(pg_row).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_binds_dollar_parameters_by_number_whatever_their_order() {
        let c = rusqlite::Connection::open_in_memory().unwrap();
        let mut db = SqliteSql(&c);
        db.exec("CREATE TABLE t (a INTEGER, b TEXT)", &[]).unwrap();
        db.exec("INSERT INTO t (b, a) VALUES ($2, $1)", vals![7i64, "seven"])
            .unwrap();
        let row = db
            .row(
                "SELECT a, b FROM t WHERE a = $1 AND b = $2",
                vals![7i64, "seven"],
            )
            .unwrap()
            .unwrap();
        assert_eq!(row.int(0).unwrap(), 7);
        assert_eq!(row.text(1).unwrap(), "seven");
        let none: Option<&str> = None;
        db.exec("INSERT INTO t (a, b) VALUES ($1, $2)", vals![8i64, none])
            .unwrap();
        let row = db.row("SELECT b FROM t WHERE a = 8", &[]).unwrap().unwrap();
        assert_eq!(row.opt_text(0).unwrap(), None);
        // A parameter used twice is bound once; one given but unused, or
        // used but not given, is an error.
        db.exec("INSERT INTO t (a, b) VALUES ($1, $1)", vals![9i64])
            .unwrap();
        let row = db.row("SELECT b FROM t WHERE a = 9", &[]).unwrap().unwrap();
        assert_eq!(row.text(0).unwrap(), "9");
        assert!(db
            .exec("INSERT INTO t (a) VALUES ($1)", vals![1i64, "x"])
            .is_err());
        assert!(db
            .exec("INSERT INTO t (a, b) VALUES ($1, $2)", vals![1i64])
            .is_err());
    }

    #[test]
    fn sqlite_binds_and_reads_bytes_as_a_blob() {
        let c = rusqlite::Connection::open_in_memory().unwrap();
        let mut db = SqliteSql(&c);
        db.exec("CREATE TABLE b (k INTEGER, v BLOB)", &[]).unwrap();
        let raw: &[u8] = b"a\xff\x00z";
        db.exec("INSERT INTO b (k, v) VALUES ($1, $2)", vals![1i64, raw])
            .unwrap();
        let row = db
            .row("SELECT v, typeof(v) FROM b WHERE k = 1", &[])
            .unwrap()
            .unwrap();
        assert_eq!(row.bytes(0).unwrap(), raw);
        assert_eq!(row.text(1).unwrap(), "blob");
        assert!(row.text(0).is_err(), "bytes are not text");
    }
}
