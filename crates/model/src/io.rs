//! Small file helpers every crate shares: atomic writes (a temporary file, fsync, rename, and the
//! folder synced), JSON and JSONL in and out with errors that name the file and line, and a stable
//! hash (FNV-1a) for cache keys and hashed features.
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a crash
/// never leaves a half-written file under the final name.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(parent_of(path))
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Makes a rename or creation in `dir` durable: fsync of the directory itself (on Unix; a no-op
/// elsewhere, where directories cannot be opened).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// The folder holding `path` (`.` for a bare file name).
pub(crate) fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Reads a JSON file; a parse error names the file and line.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::invalid(path, format!("line {}", e.line()), e.to_string()))
}

/// Pretty JSON, written atomically.
pub fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v).map_err(|e| Error::Msg(e.to_string()))?;
    s.push('\n');
    atomic_write(path, s.as_bytes())
}

/// The rows of a JSONL file (blank lines skipped); bad JSON names the file and line.
pub fn read_jsonl(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| Error::invalid(path, format!("line {}", i + 1), e.to_string()))
        })
        .collect()
}

/// Writes `rows` as JSONL, atomically: a crash leaves either the old file or the whole new one.
pub fn write_jsonl(path: &Path, rows: &[Value]) -> Result<()> {
    let mut text = Vec::new();
    for r in rows {
        writeln!(text, "{r}").map_err(|e| Error::io(path, e))?;
    }
    atomic_write(path, &text)
}

/// FNV-1a (64-bit): stable across runs and platforms, unlike std's hasher; fed as it goes, so
/// hashing a large tokenized dataset builds no text.
#[derive(Clone, Copy, Debug)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    /// Each word as its 4 little-endian bytes.
    pub fn words(&mut self, words: impl IntoIterator<Item = u32>) {
        for w in words {
            self.bytes(&w.to_le_bytes());
        }
    }
    /// The hash as 16 hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// The FNV-1a hash of `parts` joined by the unit separator `0x1f`.
pub fn fnv1a(parts: &[&str]) -> u64 {
    let mut h = Fnv::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h.bytes(&[0x1f]);
        }
        h.bytes(p.as_bytes());
    }
    h.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_published_vectors() {
        // From the FNV reference (draft-eastlake-fnv): "" and "a" and "foobar".
        assert_eq!(fnv1a(&[""]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(&["a"]), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(&["foobar"]), 0x8594_4171_f739_67e8);
        // Parts are joined by 0x1f.
        assert_eq!(fnv1a(&["foo", "bar"]), fnv1a(&["foo\u{1f}bar"]));
    }

    #[test]
    fn jsonl_round_trips_and_names_the_bad_line() {
        let dir = std::env::temp_dir().join(format!("preftune-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("rows.jsonl");
        let rows = vec![
            serde_json::json!({"a": 1}),
            serde_json::json!({"b": [2, 3]}),
        ];
        write_jsonl(&p, &rows).unwrap();
        assert_eq!(read_jsonl(&p).unwrap(), rows);
        std::fs::write(&p, "{\"a\": 1}\n\n{oops\n").unwrap();
        let e = read_jsonl(&p).unwrap_err().to_string();
        assert!(e.contains("rows.jsonl") && e.contains("line 3"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
