//! Reading dataset files into JSON rows, each tagged with where it came from so that every later
//! error can point at `file:line`.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parquet::file::reader::{FileReader, SerializedFileReader};
use serde_json::{Map, Value};

use crate::{Error, Location, Result, Row, RowError};

/// The file extensions [`read_rows`] understands (also the ones picked up from a folder).
const EXTENSIONS: [&str; 3] = ["jsonl", "json", "parquet"];

/// Every row of a `.jsonl`, `.json` (array of objects, or JSONL under a `.json` name) or `.parquet`
/// file, or of all such files in a folder (not recursive), in file-name order. Every row is a JSON
/// object.
pub fn read_rows(path: &Path) -> Result<Vec<Row>> {
    let meta = std::fs::metadata(path).map_err(|err| io_err(path, err))?;
    if !meta.is_dir() {
        return read_file(path);
    }
    let mut files = Vec::new();
    let entries = std::fs::read_dir(path).map_err(|err| io_err(path, err))?;
    for entry in entries {
        let entry = entry.map_err(|err| io_err(path, err))?;
        let file = entry.path();
        if file.is_file() && extension(&file).is_some_and(|e| EXTENSIONS.contains(&e.as_str())) {
            files.push(file);
        }
    }
    if files.is_empty() {
        return Err(Error::File {
            path: path.to_path_buf(),
            msg: format!("no data files in this folder (looked for {})", supported()),
        });
    }
    // Shards are named so that name order is data order (`train-00000-of-00002.parquet`, ...).
    files.sort();
    let mut rows = Vec::new();
    for file in files {
        rows.extend(read_file(&file)?);
    }
    Ok(rows)
}

fn read_file(path: &Path) -> Result<Vec<Row>> {
    let file = Arc::new(path.to_path_buf());
    match extension(path).as_deref() {
        Some("jsonl") => read_jsonl(&file, &read_text(path)?),
        Some("json") => read_json(&file, &read_text(path)?),
        Some("parquet") => read_parquet(&file),
        _ => Err(Error::File {
            path: path.to_path_buf(),
            msg: format!("unsupported file type (supported: {})", supported()),
        }),
    }
}

fn supported() -> String {
    EXTENSIONS.map(|e| format!(".{e}")).join(", ")
}

fn extension(path: &Path) -> Option<String> {
    path.extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
}

fn io_err(path: &Path, err: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        err,
    }
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|err| io_err(path, err))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        // Name the line, as every other bad row is named.
        let at = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        let line = 1 + bytes[..at].iter().filter(|&&b| b == b'\n').count();
        let col = 1 + at
            - bytes[..at]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |p| p + 1);
        row_error(
            &Arc::new(path.to_path_buf()),
            line,
            format!("invalid UTF-8 at column {col} (byte {at}); save the file as UTF-8"),
        )
    })?;
    // Editors on Windows like to start UTF-8 files with a byte-order mark; serde_json does not.
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    })
}

fn row_error(file: &Arc<PathBuf>, line: usize, msg: String) -> Error {
    Error::Row(RowError {
        loc: Location {
            file: file.clone(),
            line,
        },
        field: "(row)".into(),
        msg,
    })
}

fn read_jsonl(file: &Arc<PathBuf>, text: &str) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        // Parsing straight into a map makes "valid JSON but not an object" a serde error too.
        let obj: Map<String, Value> = serde_json::from_str(line)
            .map_err(|e| row_error(file, i + 1, format!("not a JSON object: {e}")))?;
        rows.push(Row {
            loc: Location {
                file: file.clone(),
                line: i + 1,
            },
            value: Value::Object(obj),
        });
    }
    Ok(rows)
}

/// A `.json` file is either one JSON array of objects (what `datasets.Dataset.to_json(lines=False)`
/// and most hand-written files hold) or JSON Lines under a `.json` name (what `to_json()` writes by
/// default).
fn read_json(file: &Arc<PathBuf>, text: &str) -> Result<Vec<Row>> {
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        // A file that opens an array is meant to be one; report where its JSON breaks rather
        // than complaining that line 1 (`[`) is not an object.
        Err(e) if text.trim_start().starts_with('[') => {
            return Err(row_error(
                file,
                e.line(),
                format!("invalid JSON array: {e}"),
            ));
        }
        Err(_) => return read_jsonl(file, text),
    };
    let items = match value {
        Value::Array(items) => items,
        obj @ Value::Object(_) => vec![obj],
        other => {
            return Err(row_error(
                file,
                1,
                format!(
                    "expected an array of JSON objects, found {}",
                    crate::format::kind(&other)
                ),
            ))
        }
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, value)| {
            if !value.is_object() {
                return Err(row_error(
                    file,
                    i + 1,
                    format!("not a JSON object: found {}", crate::format::kind(&value)),
                ));
            }
            Ok(Row {
                loc: Location {
                    file: file.clone(),
                    line: i + 1,
                },
                value,
            })
        })
        .collect()
}

fn read_parquet(file: &Arc<PathBuf>) -> Result<Vec<Row>> {
    let path = file.as_path();
    let parquet_err = |e: parquet::errors::ParquetError| Error::File {
        path: path.to_path_buf(),
        msg: format!("reading Parquet: {e}"),
    };
    let handle = std::fs::File::open(path).map_err(|err| io_err(path, err))?;
    let reader = SerializedFileReader::new(handle).map_err(parquet_err)?;
    let iter = reader.get_row_iter(None).map_err(parquet_err)?;
    let mut rows = Vec::new();
    for (i, row) in iter.enumerate() {
        let row = row.map_err(|e| row_error(file, i + 1, format!("reading Parquet row: {e}")))?;
        rows.push(Row {
            loc: Location {
                file: file.clone(),
                line: i + 1,
            },
            value: row.to_json_value(),
        });
    }
    Ok(rows)
}
