//! Many rows in one statement: a gateway sync writes thousands of rows, and one round trip per
//! row (each a channel hop to SQLite's worker thread, or a network round trip to PostgreSQL) was
//! most of its cost. The same SQL runs on both databases: `INSERT … VALUES (…), (…)` and
//! `UPDATE … FROM (VALUES …) AS v` (whose columns both name `column1`, `column2`, …).
//!
//! Placeholders are `$1, $2, …` on PostgreSQL but plain `?` on SQLite: SQLite looks numbered
//! parameters up in a list, once when it parses and once per bind, so a statement with thousands
//! of them cost time quadratic in their number (measured: ≈ 100 µs per row of a 500-row insert).

use super::Tx;

/// A value bound to one placeholder.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Text(Option<String>),
    Int(Option<i64>),
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(Some(v))
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(Some(v.to_owned()))
    }
}

impl From<Option<String>> for Value {
    fn from(v: Option<String>) -> Self {
        Value::Text(v)
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(Some(v))
    }
}

impl From<Option<i64>> for Value {
    fn from(v: Option<i64>) -> Self {
        Value::Int(v)
    }
}

/// Rows of one shape, written by one statement per chunk.
#[derive(Debug)]
pub struct Rows {
    columns: usize,
    values: Vec<Value>,
}

/// Rows per statement: far below SQLite's 32,766 and PostgreSQL's 65,535 placeholders, and
/// SQLite's 500-term compound limit.
const MAX_ROWS_PER_STATEMENT: usize = 500;

impl Rows {
    pub fn new(columns: usize) -> Self {
        Rows { columns, values: Vec::new() }
    }

    /// Adds a row; it must have `columns` values.
    pub fn push<const N: usize>(&mut self, row: [Value; N]) {
        debug_assert_eq!(N, self.columns);
        self.values.extend(row);
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn len(&self) -> usize {
        self.values.len().checked_div(self.columns).unwrap_or(0)
    }

    /// Runs `{head} VALUES (…), (…) {tail}` once per chunk of rows. The values move into the
    /// statements: a sync's thousands of rows are not copied again to be bound.
    pub async fn execute(self, tx: &mut Tx, head: &str, tail: &str) -> sqlx::Result<()> {
        let style = Placeholders::of(tx);
        let columns = self.columns.max(1);
        let per_statement = columns.saturating_mul(MAX_ROWS_PER_STATEMENT);
        let mut values = self.values.into_iter();
        while values.len() > 0 {
            let chunk = values.len().min(per_statement);
            let sql = format!("{head} VALUES {} {tail}", style.rows(columns, chunk.checked_div(columns).unwrap_or(0)));
            // A full chunk's statement recurs (prepared once per connection); others vary in size.
            let mut query = sqlx::query(&sql).persistent(chunk == per_statement);
            for v in values.by_ref().take(chunk) {
                query = match v {
                    Value::Text(t) => query.bind(t),
                    Value::Int(i) => query.bind(i),
                };
            }
            query.execute(&mut **tx).await?;
        }
        Ok(())
    }
}

/// Ids per `IN (…)` list.
pub const MAX_IDS_PER_LIST: usize = 500;

/// Runs `sql_with_list` (whose `{list}` is an `IN (…)` list) for `ids` in chunks and gathers the rows.
pub async fn fetch_by_ids<S: AsRef<str> + Sync>(
    conn: &mut sqlx::AnyConnection,
    sql_with_list: &str,
    ids: &[S],
) -> sqlx::Result<Vec<sqlx::any::AnyRow>> {
    let style = Placeholders::of(conn);
    let mut out = Vec::new();
    for chunk in ids.chunks(MAX_IDS_PER_LIST) {
        let sql = sql_with_list.replace("{list}", &style.list(0, chunk.len()));
        let mut query = sqlx::query(&sql).persistent(chunk.len() == MAX_IDS_PER_LIST);
        for id in chunk {
            query = query.bind(id.as_ref());
        }
        out.extend(query.fetch_all(&mut *conn).await?);
    }
    Ok(out)
}

/// What a column read by [`fetch_small_rows_by_ids`] holds (either may be SQL NULL).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Text,
    Int,
}

/// Like [`fetch_by_ids`], for reads that return thousands of rows of a few plain columns (the
/// reads of a gateway sync), each row as its `columns`' values. On SQLite the database packs each
/// chunk's rows into one JSON array, so the driver hands over one row per chunk: it hands every
/// row from its worker thread to the caller's task, each a wake-up of a parked thread, and thread
/// hand-offs were about a quarter of the ledger's CPU under gateway syncs (packed: −18 % CPU per
/// range, bench/RESULTS.md §0h). PostgreSQL's driver reads rows off its socket in the caller's
/// task; packing them there measured no better, so they come as rows. `select` names each column
/// of `columns` and has an `IN ({list})`.
pub async fn fetch_small_rows_by_ids<S: AsRef<str> + Sync>(
    conn: &mut sqlx::AnyConnection,
    select: &str,
    columns: &[(&str, Kind)],
    ids: &[S],
) -> sqlx::Result<Vec<Vec<Value>>> {
    let style = Placeholders::of(conn);
    if style == Placeholders::Numbered {
        let rows = fetch_by_ids(conn, select, ids).await?;
        return rows.iter().map(|row| from_row(row, columns)).collect();
    }
    let names: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
    let packed = format!("SELECT json_group_array(json_array({})) FROM ({select}) AS packed", names.join(", "));
    let mut out = Vec::new();
    for chunk in ids.chunks(MAX_IDS_PER_LIST) {
        let sql = packed.replace("{list}", &style.list(0, chunk.len()));
        let mut query = sqlx::query_scalar::<_, String>(&sql).persistent(chunk.len() == MAX_IDS_PER_LIST);
        for id in chunk {
            query = query.bind(id.as_ref());
        }
        let json = query.fetch_one(&mut *conn).await?;
        let rows: Vec<Vec<serde_json::Value>> =
            serde_json::from_str(&json).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        for row in rows {
            out.push(from_json(row, columns)?);
        }
    }
    Ok(out)
}

fn from_row(row: &sqlx::any::AnyRow, columns: &[(&str, Kind)]) -> sqlx::Result<Vec<Value>> {
    use sqlx::Row as _;
    (0..columns.len())
        .map(|i| {
            Ok(match columns[i].1 {
                Kind::Text => Value::Text(row.try_get(i)?),
                Kind::Int => Value::Int(row.try_get(i)?),
            })
        })
        .collect()
}

fn from_json(row: Vec<serde_json::Value>, columns: &[(&str, Kind)]) -> sqlx::Result<Vec<Value>> {
    use serde_json::Value as J;
    if row.len() != columns.len() {
        let message = format!("a packed row of {} columns, not {}", row.len(), columns.len());
        return Err(sqlx::Error::Decode(message.into()));
    }
    row.into_iter()
        .zip(columns)
        .enumerate()
        .map(|(i, (cell, (_, kind)))| match (kind, cell) {
            (Kind::Text, J::String(s)) => Ok(Value::Text(Some(s))),
            (Kind::Text, J::Null) => Ok(Value::Text(None)),
            (Kind::Int, J::Number(n)) if n.is_i64() => Ok(Value::Int(n.as_i64())),
            (Kind::Int, J::Null) => Ok(Value::Int(None)),
            (kind, other) => Err(column_mismatch(i, &format!("{kind:?}"), &other)),
        })
        .collect()
}

fn column_mismatch(i: usize, wanted: &str, found: &serde_json::Value) -> sqlx::Error {
    sqlx::Error::ColumnDecode { index: i.to_string(), source: format!("expected {wanted}, found {found}").into() }
}

impl Value {
    /// The text of a column that is not NULL.
    pub fn text(&self) -> sqlx::Result<&str> {
        match self {
            Value::Text(Some(s)) => Ok(s),
            other => Err(value_mismatch("text", other)),
        }
    }

    /// The integer of a column that is not NULL.
    pub fn int(&self) -> sqlx::Result<i64> {
        match self {
            Value::Int(Some(i)) => Ok(*i),
            other => Err(value_mismatch("an integer", other)),
        }
    }

    /// The integer of a column that may be NULL.
    pub fn opt_int(&self) -> sqlx::Result<Option<i64>> {
        match self {
            Value::Int(i) => Ok(*i),
            other => Err(value_mismatch("an integer or NULL", other)),
        }
    }
}

/// A row of [`fetch_small_rows_by_ids`] that has not the columns asked for.
pub fn wrong_columns(row: &[Value]) -> sqlx::Error {
    sqlx::Error::Decode(format!("a row of {} columns was not expected: {row:?}", row.len()).into())
}

fn value_mismatch(wanted: &str, found: &Value) -> sqlx::Error {
    sqlx::Error::Decode(format!("expected {wanted}, found {found:?}").into())
}

/// How a database spells the placeholders of a statement that has no others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placeholders {
    /// `$1, $2, …` (PostgreSQL).
    Numbered,
    /// `?, ?, …` in order (SQLite).
    Positional,
}

impl Placeholders {
    fn of(conn: &sqlx::AnyConnection) -> Self {
        if conn.backend_name().eq_ignore_ascii_case("sqlite") {
            Placeholders::Positional
        } else {
            Placeholders::Numbered
        }
    }

    /// `n` placeholders after the first `before`, comma-separated.
    fn list(self, before: usize, n: usize) -> String {
        let mut out = String::with_capacity(n.saturating_mul(6));
        for i in 0..n {
            if i > 0 {
                out.push_str(", ");
            }
            match self {
                Placeholders::Numbered => {
                    out.push('$');
                    out.push_str(&before.saturating_add(i).saturating_add(1).to_string());
                }
                Placeholders::Positional => out.push('?'),
            }
        }
        out
    }

    /// `(…), (…)`: `rows` rows of `columns` placeholders.
    fn rows(self, columns: usize, rows: usize) -> String {
        (0..rows).map(|r| format!("({})", self.list(r.saturating_mul(columns), columns))).collect::<Vec<_>>().join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_number_rows_then_columns() {
        assert_eq!(Placeholders::Numbered.rows(2, 2), "($1, $2), ($3, $4)");
        assert_eq!(Placeholders::Numbered.rows(1, 1), "($1)");
        assert_eq!(Placeholders::Positional.rows(2, 2), "(?, ?), (?, ?)");
        assert_eq!(Placeholders::Numbered.list(0, 3), "$1, $2, $3");
    }

    #[test]
    fn packed_rows_read_as_their_columns_and_nothing_else() {
        let columns = [("a", Kind::Text), ("b", Kind::Int)];
        let row = |json: &str| from_json(serde_json::from_str(json).unwrap(), &columns);
        assert_eq!(
            row(r#"["x\"\u0001", -9223372036854775808]"#).unwrap(),
            [Value::from("x\"\u{1}"), Value::from(i64::MIN)]
        );
        assert_eq!(row("[null, null]").unwrap(), [Value::from(None::<String>), Value::from(None::<i64>)]);
        for wrong in
            ["[1, 2]", r#"["x", "2"]"#, r#"["x", 1.5]"#, r#"["x", 18446744073709551615]"#, r#"["x"]"#, r#"["x", 1, 2]"#]
        {
            assert!(row(wrong).is_err(), "{wrong}");
        }
        let read = [Value::from("t"), Value::from(7), Value::from(None::<i64>)];
        assert_eq!((read[0].text().unwrap(), read[1].int().unwrap(), read[2].opt_int().unwrap()), ("t", 7, None));
        assert!(read[0].int().is_err() && read[1].text().is_err() && read[2].int().is_err());
    }

    #[test]
    fn rows_count_whole_rows() {
        let mut rows = Rows::new(2);
        assert!(rows.is_empty());
        rows.push([Value::from("a"), Value::from(1)]);
        rows.push([Value::from(None::<String>), Value::from(None::<i64>)]);
        assert_eq!(rows.len(), 2);
    }
}
