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

    /// Runs `{head} VALUES (…), (…) {tail}` once per chunk of rows.
    pub async fn execute(&self, tx: &mut Tx, head: &str, tail: &str) -> sqlx::Result<()> {
        let style = Placeholders::of(tx);
        let columns = self.columns.max(1);
        for chunk in self.values.chunks(columns.saturating_mul(MAX_ROWS_PER_STATEMENT)) {
            let sql =
                format!("{head} VALUES {} {tail}", style.rows(columns, chunk.len().checked_div(columns).unwrap_or(0)));
            // A full chunk's statement recurs (prepared once per connection); others vary in size.
            let full = chunk.len() == columns.saturating_mul(MAX_ROWS_PER_STATEMENT);
            let mut query = sqlx::query(&sql).persistent(full);
            for v in chunk {
                query = match v {
                    Value::Text(t) => query.bind(t.clone()),
                    Value::Int(i) => query.bind(*i),
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
pub async fn fetch_by_ids(
    conn: &mut sqlx::AnyConnection,
    sql_with_list: &str,
    ids: &[String],
) -> sqlx::Result<Vec<sqlx::any::AnyRow>> {
    let style = Placeholders::of(conn);
    let mut out = Vec::new();
    for chunk in ids.chunks(MAX_IDS_PER_LIST) {
        let sql = sql_with_list.replace("{list}", &style.list(0, chunk.len()));
        let mut query = sqlx::query(&sql).persistent(chunk.len() == MAX_IDS_PER_LIST);
        for id in chunk {
            query = query.bind(id);
        }
        out.extend(query.fetch_all(&mut *conn).await?);
    }
    Ok(out)
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
    fn rows_count_whole_rows() {
        let mut rows = Rows::new(2);
        assert!(rows.is_empty());
        rows.push([Value::from("a"), Value::from(1)]);
        rows.push([Value::from(None::<String>), Value::from(None::<i64>)]);
        assert_eq!(rows.len(), 2);
    }
}
