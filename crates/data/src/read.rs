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

/// The longest JSONL line read, in bytes. Parsing a row costs several times its size before any
/// truncation, so a runaway line (a whole corpus on one line, a binary file) stops with its
/// `file:line` instead of taking the machine's memory. Apache Arrow's JSON reader bounds a row
/// the same way (by its block size).
pub const MAX_LINE_BYTES: usize = 16 << 20;

fn read_jsonl(file: &Arc<PathBuf>, text: &str) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.len() > MAX_LINE_BYTES {
            return Err(row_error(
                file,
                i + 1,
                format!(
                    "the line is {:.1} MiB, over the {} MiB a row may have; split the text over \
                     several rows",
                    line.len() as f64 / (1 << 20) as f64,
                    MAX_LINE_BYTES >> 20
                ),
            ));
        }
        if line.trim().is_empty() {
            continue;
        }
        let obj: Map<String, Value> = match serde_json::from_str::<Strict>(line) {
            Ok(Strict(Value::Object(obj))) => obj,
            Ok(Strict(other)) => {
                return Err(row_error(
                    file,
                    i + 1,
                    format!("not a JSON object: found {}", crate::format::kind(&other)),
                ))
            }
            Err(e) => return Err(row_error(file, i + 1, format!("not a JSON object: {e}"))),
        };
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
    let value: Value = match serde_json::from_str::<Strict>(text) {
        Ok(Strict(v)) => v,
        // A file that opens an array is meant to be one, and a well-formed value that breaks a
        // rule (a repeated key in a pretty-printed object) was read whole: report where, rather
        // than complaining that line 1 (`[` or `{`) is not an object.
        Err(e)
            if text.trim_start().starts_with('[')
                || e.classify() == serde_json::error::Category::Data =>
        {
            return Err(row_error(file, e.line(), format!("invalid JSON: {e}")));
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

/// A JSON value whose objects may not repeat a key: serde_json keeps the last one silently, and a
/// row with `"chosen"` twice would train on whichever came last.
struct Strict(Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> std::result::Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> std::result::Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> std::result::Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<Value, D::Error> {
        serde::Deserialize::deserialize(d).map(|Strict(v)| v)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if out.contains_key(&k) {
                return Err(serde::de::Error::custom(format!("key {k:?} appears twice")));
            }
            let Strict(v) = map.next_value()?;
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}
