//! Output helpers shared by the commands: `-o table|yaml|json`, aligned tables, human ages.

use chrono::{DateTime, Utc};
use serde_json::Value;

/// What `-o` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Yaml,
    Json,
}

/// A table with a header row; columns are left-aligned and separated by three spaces, the
/// last column is not padded.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<S: Into<String>>(header: impl IntoIterator<Item = S>) -> Table {
        Table {
            rows: vec![header.into_iter().map(Into::into).collect()],
        }
    }

    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    pub fn render(&self) -> String {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..cols)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c > 0 {
                    line.push_str("   ");
                }
                line.push_str(cell);
                if c + 1 < row.len() {
                    line.extend(std::iter::repeat_n(' ', widths[c] - cell.chars().count()));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// A human age: `5s`, `3m`, `2h`, `4d`, `2y`. A time in the future (clock skew) is `0s`.
pub fn age(since: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (now - since).num_seconds().max(0);
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3600),
        s if s < 365 * 86_400 => format!("{}d", s / 86_400),
        s => format!("{}y", s / (365 * 86_400)),
    }
}

/// The age of a document's `creationTime`, `-` when absent or unreadable.
pub fn doc_age(doc: &Value, now: DateTime<Utc>) -> String {
    doc.get("creationTime")
        .and_then(Value::as_str)
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| age(t.with_timezone(&Utc), now))
        .unwrap_or_else(|| "-".to_string())
}

/// Pretty JSON with a final newline.
pub fn json(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("JSON values serialize");
    s.push('\n');
    s
}

/// Multi-document YAML (`---`-separated) for the given documents.
pub fn yaml_docs(docs: &[Value]) -> String {
    docs.iter()
        .map(weft_core::document::document_to_yaml)
        .collect::<Vec<_>>()
        .join("---\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn table_aligns_columns_without_trailing_spaces() {
        let mut t = Table::new(["MESH", "NAME", "AGE"]);
        t.row(["default", "a", "5s"]);
        t.row(["m", "backend-timeouts", "3m"]);
        assert_eq!(
            t.render(),
            "MESH      NAME               AGE\n\
             default   a                  5s\n\
             m         backend-timeouts   3m\n"
        );
    }

    #[test]
    fn table_with_empty_last_cell_has_no_trailing_space() {
        let mut t = Table::new(["NAME", "TOKEN"]);
        t.row(["a", ""]);
        assert_eq!(t.render(), "NAME   TOKEN\na\n");
    }

    #[test]
    fn ages_use_the_largest_unit() {
        let now = Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap();
        let ago = |s: i64| age(now - chrono::Duration::seconds(s), now);
        assert_eq!(ago(0), "0s");
        assert_eq!(ago(5), "5s");
        assert_eq!(ago(59), "59s");
        assert_eq!(ago(60), "1m");
        assert_eq!(ago(3 * 60 + 59), "3m");
        assert_eq!(ago(2 * 3600 + 1), "2h");
        assert_eq!(ago(4 * 86_400 + 7), "4d");
        assert_eq!(ago(800 * 86_400), "2y");
        assert_eq!(ago(-30), "0s", "future times (clock skew) are 0s");
    }

    #[test]
    fn doc_age_reads_creation_time() {
        let now = Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap();
        let doc = serde_json::json!({"creationTime": "2026-11-22T09:58:00Z"});
        assert_eq!(doc_age(&doc, now), "2m");
        assert_eq!(doc_age(&serde_json::json!({}), now), "-");
        assert_eq!(
            doc_age(&serde_json::json!({"creationTime": "yesterday"}), now),
            "-"
        );
    }

    #[test]
    fn yaml_docs_are_separated() {
        let docs = [
            serde_json::json!({"name": "a"}),
            serde_json::json!({"name": "b"}),
        ];
        assert_eq!(yaml_docs(&docs), "name: a\n---\nname: b\n");
        assert_eq!(yaml_docs(&[]), "");
    }
}
