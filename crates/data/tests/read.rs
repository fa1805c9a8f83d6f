//! Reading JSONL, JSON arrays, Parquet files and folders of shards.
use std::path::Path;
use std::sync::Arc;

use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use preftune_data::{read_rows, Error};
use serde_json::json;

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn jsonl_rows_carry_line_numbers_and_skip_blank_lines() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "d.jsonl",
        "{\"text\": \"a\"}\n\n{\"text\": \"b\"}\r\n",
    );
    let rows = read_rows(&p).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].value, json!({"text": "a"}));
    assert_eq!(rows[1].value, json!({"text": "b"}));
    assert_eq!((rows[0].loc.line, rows[1].loc.line), (1, 3));
    assert_eq!(rows[1].loc.to_string(), format!("{}:3", p.display()));
}

#[test]
fn jsonl_bad_line_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "d.jsonl",
        "{\"a\": 1}\n{\"a\": 2}\n{\"a\": \n{\"a\": 4}\n",
    );
    let err = read_rows(&p).unwrap_err();
    assert!(matches!(err, Error::Row(_)));
    let msg = err.to_string();
    let prefix = format!("{}:3: (row): not a JSON object: ", p.display());
    assert!(msg.starts_with(&prefix), "{msg}");
}

#[test]
fn jsonl_line_that_is_not_an_object_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "d.jsonl", "{\"a\": 1}\n[1, 2]\n");
    let msg = read_rows(&p).unwrap_err().to_string();
    assert!(
        msg.starts_with(&format!("{}:2: (row): not a JSON object: ", p.display())),
        "{msg}"
    );
}

#[test]
fn json_array_rows_are_numbered_by_element() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "d.json",
        "[\n  {\"prompt\": \"p1\"},\n  {\"prompt\": \"p2\"}\n]\n",
    );
    let rows = read_rows(&p).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1].value, json!({"prompt": "p2"}));
    assert_eq!((rows[0].loc.line, rows[1].loc.line), (1, 2));
}

#[test]
fn json_array_with_a_non_object_element_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "d.json", "[{\"a\": 1}, 5]");
    let msg = read_rows(&p).unwrap_err().to_string();
    assert_eq!(
        msg,
        format!(
            "{}:2: (row): not a JSON object: found a number",
            p.display()
        )
    );
}

#[test]
fn json_file_holding_json_lines_is_read_as_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "d.json", "{\"a\": 1}\n{\"a\": 2}\n");
    let rows = read_rows(&p).unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| r.value["a"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(rows[1].loc.line, 2);
}

#[test]
fn folder_of_shards_is_read_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    // Written in reverse so that directory order cannot pass for name order by accident.
    write(dir.path(), "train-00001.jsonl", "{\"i\": 3}\n{\"i\": 4}\n");
    write(dir.path(), "train-00000.jsonl", "{\"i\": 1}\n{\"i\": 2}\n");
    write(dir.path(), "README.md", "not data");
    let rows = read_rows(dir.path()).unwrap();
    let ids: Vec<i64> = rows
        .iter()
        .map(|r| r.value["i"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [1, 2, 3, 4]);
    assert!(rows[0].loc.file.ends_with("train-00000.jsonl"));
    assert!(rows[2].loc.file.ends_with("train-00001.jsonl"));
    assert_eq!(rows[2].loc.line, 1);
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let p = Path::new("/definitely/not/here.jsonl");
    let err = read_rows(p).unwrap_err();
    assert!(matches!(err, Error::Io { .. }));
    assert!(
        err.to_string().starts_with("/definitely/not/here.jsonl: "),
        "{err}"
    );
}

#[test]
fn unknown_extension_names_the_supported_ones() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "d.csv", "a,b\n");
    let err = read_rows(&p).unwrap_err();
    assert!(matches!(err, Error::File { .. }));
    assert_eq!(
        err.to_string(),
        format!(
            "{}: unsupported file type (supported: .jsonl, .json, .parquet)",
            p.display()
        )
    );
}

/// Writes a real Parquet file with two UTF8 columns, as `datasets` would for prompt-completion data.
fn write_parquet(path: &Path, rows: &[(&str, &str)]) {
    let schema = parse_message_type(
        "message schema { REQUIRED BYTE_ARRAY prompt (UTF8); REQUIRED BYTE_ARRAY completion (UTF8); }",
    )
    .unwrap();
    let props = Arc::new(WriterProperties::builder().build());
    let file = std::fs::File::create(path).unwrap();
    let mut writer = SerializedFileWriter::new(file, Arc::new(schema), props).unwrap();
    let mut group = writer.next_row_group().unwrap();
    for column in 0..2 {
        let values: Vec<ByteArray> = rows
            .iter()
            .map(|r| ByteArray::from(if column == 0 { r.0 } else { r.1 }))
            .collect();
        let mut col = group.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>()
            .write_batch(&values, None, None)
            .unwrap();
        col.close().unwrap();
    }
    group.close().unwrap();
    writer.close().unwrap();
}

#[test]
fn parquet_rows_are_read_with_row_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("train.parquet");
    write_parquet(
        &p,
        &[
            ("What is 2+2?", "4"),
            ("Capital of France?", "Paris"),
            ("Hi", "Hello!"),
        ],
    );
    let rows = read_rows(&p).unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(
        rows[0].value,
        json!({"prompt": "What is 2+2?", "completion": "4"})
    );
    assert_eq!(
        rows[2].value,
        json!({"prompt": "Hi", "completion": "Hello!"})
    );
    assert_eq!(
        rows.iter().map(|r| r.loc.line).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(rows[1].loc.to_string(), format!("{}:2", p.display()));
}

#[test]
fn folder_mixes_formats_by_name_order() {
    let dir = tempfile::tempdir().unwrap();
    write_parquet(&dir.path().join("a.parquet"), &[("p1", "c1")]);
    write(
        dir.path(),
        "b.jsonl",
        "{\"prompt\": \"p2\", \"completion\": \"c2\"}\n",
    );
    let rows = read_rows(dir.path()).unwrap();
    let prompts: Vec<&str> = rows
        .iter()
        .map(|r| r.value["prompt"].as_str().unwrap())
        .collect();
    assert_eq!(prompts, ["p1", "p2"]);
}

#[test]
fn corrupt_parquet_is_a_file_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "bad.parquet", "this is not parquet");
    let err = read_rows(&p).unwrap_err();
    assert!(matches!(err, Error::File { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with(&format!("{}: reading Parquet: ", p.display())),
        "{err}"
    );
}

#[test]
fn parquet_conversations_come_back_as_lists_of_message_objects() {
    // The layout `datasets` writes for a `messages` column: a LIST of structs.
    let schema = parse_message_type(
        "message schema {
           REQUIRED group messages (LIST) {
             REPEATED group list {
               REQUIRED group element {
                 REQUIRED BYTE_ARRAY role (UTF8);
                 REQUIRED BYTE_ARRAY content (UTF8);
               }
             }
           }
         }",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("chat.parquet");
    let file = std::fs::File::create(&p).unwrap();
    let props = Arc::new(WriterProperties::builder().build());
    let mut writer = SerializedFileWriter::new(file, Arc::new(schema), props).unwrap();
    let mut group = writer.next_row_group().unwrap();
    // Row 1: two messages; row 2: one message.
    let columns: [&[&str]; 2] = [&["user", "assistant", "user"], &["Hi", "Hello!", "Bye"]];
    for values in columns {
        let values: Vec<ByteArray> = values.iter().map(|v| ByteArray::from(*v)).collect();
        let mut col = group.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>()
            .write_batch(&values, Some(&[1, 1, 1]), Some(&[0, 1, 0]))
            .unwrap();
        col.close().unwrap();
    }
    group.close().unwrap();
    writer.close().unwrap();

    let rows = read_rows(&p).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        rows[0].value,
        json!({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]})
    );
    assert_eq!(
        rows[1].value,
        json!({"messages": [{"role": "user", "content": "Bye"}]})
    );
}

/// A file that is not UTF-8 is refused at its line and column, like any other bad row.
#[test]
fn invalid_utf8_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.jsonl");
    std::fs::write(
        &p,
        b"{\"text\": \"a\"}\n{\"text\": \"b\"}\n{\"text\": \"caf\xe9\"}\n",
    )
    .unwrap();
    let e = read_rows(&p).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("{}:3: ", p.display())) && e.contains("invalid UTF-8 at column 14"),
        "{e}"
    );
}

/// A key given twice in a row (serde_json would keep the last silently) is refused at its line,
/// in JSONL and JSON arrays, nested objects included.
#[test]
fn duplicate_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text, line) in [
        (
            "a.jsonl",
            "{\"a\": 1}\n{\"prompt\": \"x\", \"prompt\": \"y\"}\n",
            2,
        ),
        (
            "b.jsonl",
            "{\"m\": [{\"role\": \"user\", \"role\": \"system\"}]}\n",
            1,
        ),
        ("c.json", "[{\"a\": 1},\n {\"a\": 1, \"a\": 2}]\n", 2),
        // One pretty-printed object, not JSON Lines: its line, not line 1's `{`.
        (
            "d.json",
            "{\n  \"prompt\": \"x\",\n  \"chosen\": \"y\",\n  \"chosen\": \"z\"\n}\n",
            4,
        ),
    ] {
        let p = write(dir.path(), name, text);
        let msg = read_rows(&p).unwrap_err().to_string();
        assert!(
            msg.starts_with(&format!("{}:{line}: ", p.display())) && msg.contains("appears twice"),
            "{name}: {msg}"
        );
    }
}

/// A runaway line stops the read at its line, before it is parsed; a line at the limit is read.
#[test]
fn a_line_over_the_limit_is_refused_with_its_line() {
    use preftune_data::MAX_LINE_BYTES;
    let dir = tempfile::tempdir().unwrap();
    let row = |bytes: usize| {
        let pad = bytes - r#"{"text":""}"#.len();
        format!("{{\"text\":\"{}\"}}\n", "x".repeat(pad))
    };
    let ok = write(dir.path(), "ok.jsonl", &row(MAX_LINE_BYTES));
    assert_eq!(read_rows(&ok).unwrap().len(), 1);
    let text = format!("{}{}", row(100), row(MAX_LINE_BYTES + 1));
    let big = write(dir.path(), "big.jsonl", &text);
    let e = read_rows(&big).unwrap_err().to_string();
    assert!(e.contains("big.jsonl:2") && e.contains("16 MiB"), "{e}");
}
