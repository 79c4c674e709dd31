//! A minimal CSV reader and writer for the label tables (header row, comma separated,
//! optional double quotes, CRLF or LF, an optional UTF-8 BOM). No embedded newlines: the
//! tables this project reads never have them. Knows nothing about CT.

use super::error::{DataError, Result};
use std::path::Path;

/// A parsed table: the header and the data rows with their 1-based line numbers.
#[derive(Clone, Debug)]
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<(usize, Vec<String>)>,
}

impl Table {
    /// The index of the first column whose name matches one of `names` (case-insensitive,
    /// surrounding spaces ignored).
    pub fn column(&self, names: &[&str]) -> Option<usize> {
        names.iter().find_map(|n| {
            self.header
                .iter()
                .position(|h| h.trim().eq_ignore_ascii_case(n))
        })
    }

    /// Like [`Table::column`], but a missing column is a [`DataError::CsvColumns`].
    pub fn require(&self, path: &Path, names: &[&str]) -> Result<usize> {
        self.column(names).ok_or_else(|| DataError::CsvColumns {
            path: path.to_path_buf(),
            wanted: names
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(" or "),
            found: if self.header.is_empty() {
                "nothing".into()
            } else {
                self.header.join(",")
            },
        })
    }
}

/// Splits one line into fields.
pub fn split_line(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', true) => quoted = false,
            ('"', false) if cur.trim().is_empty() => {
                cur.clear();
                quoted = true;
            }
            (',', false) => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// Reads a table; blank lines are skipped.
pub fn read_table(path: &Path) -> Result<Table> {
    let bytes = std::fs::read(path).map_err(|err| crate::io::IoError::Read {
        path: path.to_path_buf(),
        err,
    })?;
    let text = String::from_utf8(bytes).map_err(|_| DataError::CsvRow {
        path: path.to_path_buf(),
        line: 0,
        reason: "not UTF-8 text".into(),
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let header = match lines.next() {
        Some((_, l)) => split_line(l)
            .into_iter()
            .map(|h| h.trim().to_string())
            .collect(),
        None => Vec::new(),
    };
    let rows = lines.map(|(i, l)| (i + 1, split_line(l))).collect();
    Ok(Table { header, rows })
}

/// One CSV field, quoted when it needs to be.
pub fn field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Writes a table atomically (temp file + rename).
pub fn write_table(path: &Path, header: &[&str], rows: &[Vec<String>]) -> Result<()> {
    use std::io::Write;
    crate::io::atomic::write_atomic(path, |w| {
        writeln!(
            w,
            "{}",
            header
                .iter()
                .map(|h| field(h))
                .collect::<Vec<_>>()
                .join(",")
        )?;
        for r in rows {
            writeln!(
                w,
                "{}",
                r.iter().map(|f| field(f)).collect::<Vec<_>>().join(",")
            )?;
        }
        Ok(())
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_quotes_and_empty_fields() {
        assert_eq!(split_line("a,b,,c"), vec!["a", "b", "", "c"]);
        assert_eq!(
            split_line("\"x,y\",\"he said \"\"hi\"\"\",3"),
            vec!["x,y", "he said \"hi\"", "3"]
        );
        assert_eq!(split_line(""), vec![""]);
    }
}
