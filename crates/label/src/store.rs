//! The label store: one SQLite file in WAL mode with `synchronous = FULL`, so a judgement that
//! was answered with 200 survives a crash or restart. Every assignment and submission runs in an
//! `IMMEDIATE` transaction: the write lock is taken before the read, so two annotators (or two
//! server processes on one file) can never both take the last free copy of an item.
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// What annotators do with an item: pick the better of two responses on a nuanced scale, order
/// k responses best to worst, or give one response a thumbs up or down (KTO's data). Fixed per
/// database when the first candidates are imported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Pair,
    Rank,
    Thumbs,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode> {
        match s {
            "pair" | "pairwise" => Ok(Mode::Pair),
            "rank" | "ranking" => Ok(Mode::Rank),
            "thumbs" | "thumb" => Ok(Mode::Thumbs),
            other => Err(Error::Input(format!(
                "mode: expected `pair`, `rank` or `thumbs`, found `{other}`"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Pair => "pair",
            Mode::Rank => "rank",
            Mode::Thumbs => "thumbs",
        }
    }

    /// The submission field of this mode's judgements.
    pub fn field(self) -> &'static str {
        match self {
            Mode::Pair => "scale",
            Mode::Rank => "ranking",
            Mode::Thumbs => "up",
        }
    }
}

/// The steps of the pairwise scale, from the left response's point of view: `3` is "left much
/// better", `0` "about the same", `-3` "right much better". Exported margins are the magnitude.
pub const SCALE: [(i64, &str); 7] = [
    (3, "Left much better"),
    (2, "Left better"),
    (1, "Left slightly better"),
    (0, "About the same"),
    (-1, "Right slightly better"),
    (-2, "Right better"),
    (-3, "Right much better"),
];

/// How candidates become items.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    pub mode: Mode,
    /// Share of items that go to `overlap_copies` annotators instead of one, so agreement can be
    /// measured on them.
    pub overlap: f64,
    pub overlap_copies: usize,
    /// Seeds which items are overlapping (a hash of the item and the seed, so re-imports agree).
    pub seed: u64,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            mode: Mode::Pair,
            overlap: 0.0,
            overlap_copies: 2,
            seed: 0,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ImportReport {
    pub rows: usize,
    pub items_added: usize,
    /// Items already in the database (the same prompt and responses), left as they were.
    pub items_existing: usize,
    pub overlapping_items_added: usize,
    /// In pairwise mode responses are paired in order (1st with 2nd, 3rd with 4th, ...); an odd
    /// last response of a row has no partner and is not shown.
    pub unpaired_responses: usize,
}

impl std::fmt::Display for ImportReport {
    /// One line: `12 rows, 10 items added (2 overlapping), 2 already there, 0 unpaired responses`.
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "{} rows, {} items added ({} overlapping), {} already there, {} unpaired responses",
            self.rows,
            self.items_added,
            self.overlapping_items_added,
            self.items_existing,
            self.unpaired_responses
        )
    }
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Annotator {
    pub id: i64,
    pub name: String,
    pub is_admin: bool,
}

/// One message of a prompt as shown: plain-text prompts are one message with role `prompt`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// An item as one annotator sees it: responses in that annotator's display order.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Shown {
    pub item_id: i64,
    pub mode: Mode,
    pub prompt: Vec<Message>,
    pub responses: Vec<String>,
}

/// A judgement in display terms, as the page sends it.
#[derive(Clone, Debug, PartialEq)]
pub enum Judgement {
    /// Left minus right on [`SCALE`], -3..=3.
    Pair { scale: i64 },
    /// Display indices, best first: a permutation of 0..k.
    Rank { order: Vec<usize> },
    /// Thumbs up (true) or down on the item's one response.
    Thumbs { up: bool },
}

impl Judgement {
    pub fn mode(&self) -> Mode {
        match self {
            Judgement::Pair { .. } => Mode::Pair,
            Judgement::Rank { .. } => Mode::Rank,
            Judgement::Thumbs { .. } => Mode::Thumbs,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Submission {
    pub judgement: Judgement,
    pub unsafe_flag: bool,
    pub comment: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Submitted {
    Saved,
    /// The item is not in this annotator's queue (or does not exist): nothing is revealed.
    NotYours,
    AlreadyLabelled,
    Invalid(String),
}

/// A stored judgement, in terms of the item's own response order.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Label {
    pub item_id: i64,
    pub annotator: String,
    /// The prompt exactly as the candidates file had it (text or messages).
    pub prompt: Value,
    pub responses: Vec<String>,
    pub mode: Mode,
    /// Pairwise: response 0 minus response 1 on the scale (positive: the first is better).
    /// Thumbs: 1 up, -1 down.
    pub choice: Option<i64>,
    /// Ranking: response indices, best first.
    pub ranking: Option<Vec<usize>>,
    /// Which response was shown first (left), for the position-bias check.
    pub first_shown: usize,
    pub unsafe_flag: bool,
    pub comment: String,
    pub created_at: String,
}

#[cfg(test)]
impl Label {
    /// A pairwise judgement of responses "A" and "B" to prompt "p", for unit tests.
    pub(crate) fn test_pair(
        item_id: i64,
        annotator: &str,
        choice: i64,
        first_shown: usize,
    ) -> Label {
        Label {
            item_id,
            annotator: annotator.into(),
            prompt: json!("p"),
            responses: vec!["A".into(), "B".into()],
            mode: Mode::Pair,
            choice: Some(choice),
            ranking: None,
            first_shown,
            unsafe_flag: false,
            comment: String::new(),
            created_at: String::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct AnnotatorProgress {
    pub name: String,
    pub is_admin: bool,
    pub assigned: usize,
    pub labelled: usize,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Progress {
    pub mode: Option<Mode>,
    pub items: usize,
    /// Judgements wanted in all: the sum over items of their copies.
    pub wanted: usize,
    pub labelled: usize,
    pub overlapping_items: usize,
    pub annotators: Vec<AnnotatorProgress>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS annotators(
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_hash TEXT NOT NULL UNIQUE,
    is_admin INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items(
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    prompt TEXT NOT NULL,
    responses TEXT NOT NULL,
    source TEXT NOT NULL,
    copies INTEGER NOT NULL,
    assigned INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS assignments(
    item_id INTEGER NOT NULL REFERENCES items(id),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    display_order TEXT NOT NULL,
    assigned_at TEXT NOT NULL,
    PRIMARY KEY(item_id, annotator_id));
CREATE INDEX IF NOT EXISTS assignments_by_annotator ON assignments(annotator_id);
CREATE TABLE IF NOT EXISTS labels(
    item_id INTEGER NOT NULL,
    annotator_id INTEGER NOT NULL,
    choice INTEGER,
    ranking TEXT,
    first_shown INTEGER NOT NULL,
    unsafe_flag INTEGER NOT NULL,
    comment TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY(item_id, annotator_id),
    FOREIGN KEY(item_id, annotator_id) REFERENCES assignments(item_id, annotator_id));
CREATE TABLE IF NOT EXISTS sessions(
    id_hash TEXT PRIMARY KEY,
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    expires_at INTEGER NOT NULL);
";

/// A revoked annotator's `token_hash` starts with this; no token hashes to it (hashes are hex).
const REVOKED: &str = "revoked:";

pub struct Store {
    conn: Connection,
    path: PathBuf,
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Tokens are stored hashed: a copy of the database does not hand out logins.
fn token_hash(token: &str) -> String {
    sha256_hex(token.as_bytes())
}

/// A new secret: `prefix` and 48 hex digits (192 random bits from the OS-seeded generator).
fn random_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 24];
    rand::Rng::fill(&mut rand::thread_rng(), &mut bytes[..]);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{hex}")
}

/// An annotator from a row of `id, name, is_admin`.
fn annotator_row(r: &rusqlite::Row) -> rusqlite::Result<Annotator> {
    Ok(Annotator {
        id: r.get(0)?,
        name: r.get(1)?,
        is_admin: r.get::<_, i64>(2)? != 0,
    })
}

/// The id of the annotator `name` (trimmed), or an error naming the database.
fn annotator_id(tx: &rusqlite::Transaction, path: &Path, name: &str) -> Result<i64> {
    tx.query_row(
        "SELECT id FROM annotators WHERE name = ?1",
        params![name.trim()],
        |r| r.get(0),
    )
    .optional()
    .map_err(db_err(path))?
    .ok_or_else(|| Error::UnknownAnnotator {
        path: path.into(),
        name: name.trim().into(),
    })
}

fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Creates the database file readable by its owner only (0600), as ssh does for keys: it holds
/// people's judgements and their login hashes. SQLite gives its `-wal` and `-shm` files the same
/// mode. An existing file is left as it is.
fn create_private(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Deterministic uniform number in [0, 1) from an item key and a seed.
fn unit_hash(key: &str, seed: u64) -> f64 {
    let h = Sha256::digest(format!("{seed}:{key}").as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[..8]);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// A prompt for display: plain text, or a list of `{role, content}` messages.
pub fn prompt_messages(prompt: &Value) -> Option<Vec<Message>> {
    match prompt {
        Value::String(s) => Some(vec![Message {
            role: "prompt".into(),
            content: s.clone(),
        }]),
        Value::Array(items) => items
            .iter()
            .map(|m| {
                Some(Message {
                    role: m.get("role")?.as_str()?.to_string(),
                    content: m.get("content")?.as_str()?.to_string(),
                })
            })
            .collect(),
        _ => None,
    }
}

/// SQLite errors as [`Error::Db`], naming the database file.
fn db_err(path: &Path) -> impl Fn(rusqlite::Error) -> Error + Copy + '_ {
    move |err| Error::Db {
        path: path.to_path_buf(),
        err,
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        let db = db_err(path);
        create_private(path)?;
        let conn = Connection::open(path).map_err(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(db)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(db)?;
        if mode != "wal" {
            return Err(Error::Input(format!(
                "{}: SQLite would not switch to WAL mode (got `{mode}`); use a local file system",
                path.display()
            )));
        }
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")
            .map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        Ok(Store {
            conn,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db(&self, err: rusqlite::Error) -> Error {
        db_err(&self.path)(err)
    }

    pub fn mode(&self) -> Result<Option<Mode>> {
        let m: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'mode'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.db(e))?;
        m.map(|s| Mode::parse(&s)).transpose()
    }

    /// Adds the rows of a candidates file (`prompt`, `responses`, optional `sampling`) as items.
    /// All or nothing: a bad row fails the import naming its file, line and field. Importing the
    /// same candidates again adds nothing, so files from several models can be merged.
    pub fn import(&mut self, path: &Path, opts: &ImportOptions) -> Result<ImportReport> {
        if !(0.0..=1.0).contains(&opts.overlap) {
            return Err(Error::Input(format!(
                "overlap: expected a share between 0 and 1, found {}",
                opts.overlap
            )));
        }
        if opts.overlap > 0.0 && opts.overlap_copies < 2 {
            return Err(Error::Input(
                "overlap_copies: overlapping items need at least 2 annotators".into(),
            ));
        }
        let rows = preftune_data::read_rows(path)?;
        // Validate everything before writing anything.
        let mut items: Vec<(Value, Vec<String>, Value)> = vec![];
        let mut report = ImportReport {
            rows: rows.len(),
            ..Default::default()
        };
        for row in &rows {
            let bad = |field: &str, msg: &str| Error::Input(format!("{}: {field}: {msg}", row.loc));
            let prompt = row
                .value
                .get("prompt")
                .ok_or_else(|| bad("prompt", "missing field"))?;
            if prompt_messages(prompt).is_none() {
                return Err(bad(
                    "prompt",
                    "expected text or a list of {\"role\", \"content\"} messages",
                ));
            }
            let responses = match row.value.get("responses") {
                Some(Value::Array(a)) => a
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        r.as_str()
                            .map(String::from)
                            .ok_or_else(|| bad(&format!("responses[{i}]"), "expected a string"))
                    })
                    .collect::<Result<Vec<String>>>()?,
                Some(_) => return Err(bad("responses", "expected a list of strings")),
                None => return Err(bad("responses", "missing field")),
            };
            let least = if opts.mode == Mode::Thumbs { 1 } else { 2 };
            if responses.len() < least {
                return Err(bad(
                    "responses",
                    &format!(
                        "needs at least {least} response{} in {} mode, found {}",
                        if least == 1 { "" } else { "s" },
                        opts.mode.as_str(),
                        responses.len()
                    ),
                ));
            }
            let source = json!({"file": row.loc.file.display().to_string(), "line": row.loc.line,
                                "sampling": row.value.get("sampling")});
            match opts.mode {
                Mode::Rank => items.push((prompt.clone(), responses, source)),
                // Each response is an item of its own.
                Mode::Thumbs => {
                    for r in responses {
                        items.push((prompt.clone(), vec![r], source.clone()));
                    }
                }
                Mode::Pair => {
                    report.unpaired_responses += responses.len() % 2;
                    for pair in responses.chunks_exact(2) {
                        items.push((prompt.clone(), pair.to_vec(), source.clone()));
                    }
                }
            }
        }
        let dberr = db_err(&self.path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(dberr)?;
        let stored: Option<String> = tx
            .query_row("SELECT value FROM meta WHERE key = 'mode'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(dberr)?;
        match stored {
            Some(m) if m != opts.mode.as_str() => {
                return Err(Error::Input(format!(
                "{}: this database labels in `{m}` mode; candidates cannot be added in `{}` mode",
                self.path.display(),
                opts.mode.as_str()
            )))
            }
            Some(_) => {}
            None => {
                tx.execute(
                    "INSERT INTO meta(key, value) VALUES ('mode', ?1)",
                    params![opts.mode.as_str()],
                )
                .map_err(dberr)?;
            }
        }
        {
            let mut ins = tx
                .prepare(
                    "INSERT OR IGNORE INTO items(key, prompt, responses, source, copies)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(dberr)?;
            for (prompt, responses, source) in &items {
                let canon = json!([prompt, responses]).to_string();
                let key = sha256_hex(canon.as_bytes());
                let overlapping = unit_hash(&key, opts.seed) < opts.overlap;
                let copies = if overlapping { opts.overlap_copies } else { 1 };
                let n = ins
                    .execute(params![
                        key,
                        prompt.to_string(),
                        serde_json::to_string(responses).unwrap_or_default(),
                        source.to_string(),
                        copies as i64
                    ])
                    .map_err(dberr)?;
                if n == 1 {
                    report.items_added += 1;
                    report.overlapping_items_added += overlapping as usize;
                } else {
                    report.items_existing += 1;
                }
            }
        }
        tx.commit().map_err(dberr)?;
        Ok(report)
    }

    /// Creates an annotator and returns their login token (shown once; only its hash is kept).
    pub fn add_annotator(&mut self, name: &str, admin: bool) -> Result<String> {
        let name = name.trim();
        if name.is_empty() || name.chars().any(char::is_control) {
            return Err(Error::Input(
                "annotator name: must be non-empty printable text".into(),
            ));
        }
        let token = random_secret("pt_");
        let r = self.conn.execute(
            "INSERT INTO annotators(name, token_hash, is_admin, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![name, token_hash(&token), admin as i64, now()],
        );
        match r {
            Ok(_) => Ok(token),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(Error::Input(format!(
                    "{}: an annotator named `{name}` exists already",
                    self.path.display()
                )))
            }
            Err(e) => Err(self.db(e)),
        }
    }

    /// Gives the annotator `name` a new token and ends their sessions: the old token stops
    /// working at once. Returns the new token (shown once).
    pub fn rotate_token(&mut self, name: &str) -> Result<String> {
        let token = random_secret("pt_");
        self.replace_token(name, &token_hash(&token))?;
        Ok(token)
    }

    /// Revokes the annotator `name`'s token and ends their sessions; their judgements stay.
    /// `rotate_token` gives them a new one later.
    pub fn revoke_token(&mut self, name: &str) -> Result<()> {
        self.replace_token(name, &random_secret(REVOKED))
    }

    fn replace_token(&mut self, name: &str, hash: &str) -> Result<()> {
        let path = self.path.clone();
        let dberr = db_err(&path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(dberr)?;
        let id = annotator_id(&tx, &path, name)?;
        tx.execute(
            "UPDATE annotators SET token_hash = ?1 WHERE id = ?2",
            params![hash, id],
        )
        .map_err(dberr)?;
        tx.execute("DELETE FROM sessions WHERE annotator_id = ?1", params![id])
            .map_err(dberr)?;
        tx.commit().map_err(dberr)
    }

    /// Starts a browser session for `who`, valid for `ttl`: the cookie carries this random id,
    /// never the annotator's token, and only its hash is stored. Expired sessions are dropped.
    pub fn start_session(&mut self, who: &Annotator, ttl: std::time::Duration) -> Result<String> {
        let id = random_secret("ps_");
        let now = unix_now();
        let expires = now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));
        self.conn
            .execute("DELETE FROM sessions WHERE expires_at <= ?1", params![now])
            .map_err(|e| self.db(e))?;
        self.conn
            .execute(
                "INSERT INTO sessions(id_hash, annotator_id, expires_at) VALUES (?1, ?2, ?3)",
                params![token_hash(&id), who.id, expires],
            )
            .map_err(|e| self.db(e))?;
        Ok(id)
    }

    /// The annotator of a live session; `None` for an unknown, ended or expired one.
    pub fn session(&self, id: &str) -> Result<Option<Annotator>> {
        self.conn
            .query_row(
                "SELECT a.id, a.name, a.is_admin FROM sessions s JOIN annotators a \
                 ON a.id = s.annotator_id WHERE s.id_hash = ?1 AND s.expires_at > ?2",
                params![token_hash(id), unix_now()],
                annotator_row,
            )
            .optional()
            .map_err(|e| self.db(e))
    }

    /// Ends a session (logout); unknown ids are ignored.
    pub fn end_session(&mut self, id: &str) -> Result<()> {
        self.conn
            .execute(
                "DELETE FROM sessions WHERE id_hash = ?1",
                params![token_hash(id)],
            )
            .map(|_| ())
            .map_err(|e| self.db(e))
    }

    pub fn authenticate(&self, token: &str) -> Result<Option<Annotator>> {
        self.conn
            .query_row(
                "SELECT id, name, is_admin FROM annotators WHERE token_hash = ?1",
                params![token_hash(token)],
                annotator_row,
            )
            .optional()
            .map_err(|e| self.db(e))
    }

    /// Hands back items assigned and never judged, so that someone else can label them: those of
    /// the annotator `name` (all of them when `None`), assigned more than `older_than` ago (at
    /// any time when `None`). Each released item gets its copy back. The annotator who held it
    /// can no longer submit it (`Submitted::NotYours`); their next request shows them a new one.
    /// Returns how many were released, per annotator (only those with any), by name.
    pub fn release(
        &mut self,
        name: Option<&str>,
        older_than: Option<std::time::Duration>,
    ) -> Result<Vec<(String, usize)>> {
        let path = self.path.clone();
        let dberr = db_err(&path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(dberr)?;
        let who: Option<i64> = name.map(|n| annotator_id(&tx, &path, n)).transpose()?;
        // `assigned_at` is RFC 3339 in UTC with milliseconds, so text order is time order.
        let before: Option<String> = older_than
            .map(|d| {
                chrono::Duration::from_std(d)
                    .ok()
                    .and_then(|d| chrono::Utc::now().checked_sub_signed(d))
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                    .ok_or_else(|| Error::Input(format!("release: {d:?} is too long ago")))
            })
            .transpose()?;
        let stale: Vec<(i64, i64, String)> = {
            let mut stmt = tx
                .prepare(
                    "SELECT a.item_id, a.annotator_id, n.name FROM assignments a
                     JOIN annotators n ON n.id = a.annotator_id
                     WHERE NOT EXISTS (SELECT 1 FROM labels l
                                       WHERE l.item_id = a.item_id AND l.annotator_id = a.annotator_id)
                       AND (?1 IS NULL OR a.annotator_id = ?1)
                       AND (?2 IS NULL OR a.assigned_at < ?2)",
                )
                .map_err(dberr)?;
            let rows = stmt
                .query_map(params![who, before], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
                .map_err(dberr)?;
            rows
        };
        let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
        for (item, annotator, name) in stale {
            tx.execute(
                "DELETE FROM assignments WHERE item_id = ?1 AND annotator_id = ?2",
                params![item, annotator],
            )
            .map_err(dberr)?;
            tx.execute(
                "UPDATE items SET assigned = assigned - 1 WHERE id = ?1 AND assigned > 0",
                params![item],
            )
            .map_err(dberr)?;
            *counts.entry(name).or_default() += 1;
        }
        tx.commit().map_err(dberr)?;
        Ok(counts.into_iter().collect())
    }

    /// The annotator's next item: the oldest one assigned to them and not yet labelled (so a
    /// reload or restart shows the same item), else a new assignment of an item that still has a
    /// free copy and that they have not seen, preferring items someone else already started (so
    /// overlapping items complete). `None` when their queue is empty.
    pub fn next(&mut self, who: &Annotator) -> Result<Option<Shown>> {
        let dberr = db_err(&self.path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(dberr)?;
        let pending: Option<i64> = tx
            .query_row(
                "SELECT a.item_id FROM assignments a
                 WHERE a.annotator_id = ?1 AND NOT EXISTS
                   (SELECT 1 FROM labels l WHERE l.item_id = a.item_id AND l.annotator_id = ?1)
                 ORDER BY a.assigned_at, a.item_id LIMIT 1",
                params![who.id],
                |r| r.get(0),
            )
            .optional()
            .map_err(dberr)?;
        let id = match pending {
            Some(id) => id,
            None => {
                let free: Option<(i64, String)> = tx
                    .query_row(
                        "SELECT i.id, i.responses FROM items i
                         WHERE i.assigned < i.copies AND NOT EXISTS
                           (SELECT 1 FROM assignments a WHERE a.item_id = i.id AND a.annotator_id = ?1)
                         ORDER BY i.assigned > 0 DESC, i.id LIMIT 1",
                        params![who.id],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()
                    .map_err(dberr)?;
                let Some((id, responses)) = free else {
                    tx.commit().map_err(dberr)?;
                    return Ok(None);
                };
                let k = serde_json::from_str::<Vec<String>>(&responses)
                    .map(|r| r.len())
                    .unwrap_or(0);
                let mut order: Vec<usize> = (0..k).collect();
                order.shuffle(&mut rand::thread_rng());
                tx.execute(
                    "INSERT INTO assignments(item_id, annotator_id, display_order, assigned_at)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![
                        id,
                        who.id,
                        serde_json::to_string(&order).unwrap_or_default(),
                        now()
                    ],
                )
                .map_err(dberr)?;
                tx.execute(
                    "UPDATE items SET assigned = assigned + 1 WHERE id = ?1",
                    params![id],
                )
                .map_err(dberr)?;
                id
            }
        };
        tx.commit().map_err(dberr)?;
        self.shown(who, id)
    }

    /// The item as `who` sees it, only if it is assigned to them.
    pub fn shown(&self, who: &Annotator, item_id: i64) -> Result<Option<Shown>> {
        let Some((prompt, responses, order)) = self.assignment(who, item_id)? else {
            return Ok(None);
        };
        let mode = self.mode()?.unwrap_or(Mode::Pair);
        Ok(Some(Shown {
            item_id,
            mode,
            prompt: prompt_messages(&prompt).unwrap_or_default(),
            responses: order.iter().map(|&i| responses[i].clone()).collect(),
        }))
    }

    #[allow(clippy::type_complexity)]
    fn assignment(
        &self,
        who: &Annotator,
        item_id: i64,
    ) -> Result<Option<(Value, Vec<String>, Vec<usize>)>> {
        let row: Option<(String, String, String)> = self
            .conn
            .query_row(
                "SELECT i.prompt, i.responses, a.display_order FROM assignments a
                 JOIN items i ON i.id = a.item_id
                 WHERE a.item_id = ?1 AND a.annotator_id = ?2",
                params![item_id, who.id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(|e| self.db(e))?;
        let Some((p, r, o)) = row else {
            return Ok(None);
        };
        let corrupt = |what: &str| {
            Error::Input(format!(
                "{}: item {item_id}: stored {what} is not valid JSON",
                self.path.display()
            ))
        };
        let prompt: Value = serde_json::from_str(&p).map_err(|_| corrupt("prompt"))?;
        let responses: Vec<String> = serde_json::from_str(&r).map_err(|_| corrupt("responses"))?;
        let order: Vec<usize> = serde_json::from_str(&o).map_err(|_| corrupt("display order"))?;
        if order.len() != responses.len() || order.iter().any(|&i| i >= responses.len()) {
            return Err(corrupt("display order"));
        }
        Ok(Some((prompt, responses, order)))
    }

    /// Stores a judgement. The first one per annotator and item stands; later ones are refused
    /// (`AlreadyLabelled`), so a retried request cannot count twice.
    pub fn submit(&mut self, who: &Annotator, item_id: i64, s: &Submission) -> Result<Submitted> {
        let dberr = db_err(&self.path);
        let Some((_, responses, order)) = self.assignment(who, item_id)? else {
            return Ok(Submitted::NotYours);
        };
        if s.comment.chars().count() > 10_000 {
            return Ok(Submitted::Invalid(
                "comment: at most 10,000 characters".into(),
            ));
        }
        let mode = self.mode()?.unwrap_or(Mode::Pair);
        if s.judgement.mode() != mode {
            return Ok(Submitted::Invalid(format!(
                "this item is labelled in {} mode: send `{}`",
                mode.as_str(),
                mode.field()
            )));
        }
        let (choice, ranking) = match &s.judgement {
            Judgement::Thumbs { up } => (Some(if *up { 1 } else { -1 }), None),
            Judgement::Pair { scale } => {
                if !(-3..=3).contains(scale) {
                    return Ok(Submitted::Invalid(format!(
                        "scale: expected -3..=3 (left minus right), found {scale}"
                    )));
                }
                // Stored relative to response 0: flip when response 1 was on the left.
                let choice = if order[0] == 0 { *scale } else { -*scale };
                (Some(choice), None)
            }
            Judgement::Rank { order: shown } => {
                let k = responses.len();
                let mut seen = vec![false; k];
                for &d in shown {
                    if d >= k || seen[d] {
                        return Ok(Submitted::Invalid(format!(
                            "ranking: expected each of 0..{k} once (display positions, best first)"
                        )));
                    }
                    seen[d] = true;
                }
                if shown.len() != k {
                    return Ok(Submitted::Invalid(format!(
                        "ranking: expected all {k} responses, found {}",
                        shown.len()
                    )));
                }
                let original: Vec<usize> = shown.iter().map(|&d| order[d]).collect();
                (
                    None,
                    Some(serde_json::to_string(&original).unwrap_or_default()),
                )
            }
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(dberr)?;
        let n = tx
            .execute(
                "INSERT OR IGNORE INTO labels(item_id, annotator_id, choice, ranking, first_shown,
                                              unsafe_flag, comment, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    item_id,
                    who.id,
                    choice,
                    ranking,
                    order[0] as i64,
                    s.unsafe_flag as i64,
                    s.comment,
                    now()
                ],
            )
            .map_err(dberr)?;
        tx.commit().map_err(dberr)?;
        Ok(if n == 1 {
            Submitted::Saved
        } else {
            Submitted::AlreadyLabelled
        })
    }

    /// Items done per annotator and overall.
    pub fn progress(&self) -> Result<Progress> {
        let q = |sql: &str| -> Result<usize> {
            self.conn
                .query_row(sql, [], |r| r.get::<_, i64>(0))
                .map(|n| n as usize)
                .map_err(|e| self.db(e))
        };
        let mut stmt = self
            .conn
            .prepare(
                "SELECT n.name, n.is_admin,
                   (SELECT COUNT(*) FROM assignments a WHERE a.annotator_id = n.id),
                   (SELECT COUNT(*) FROM labels l WHERE l.annotator_id = n.id)
                 FROM annotators n ORDER BY n.name",
            )
            .map_err(|e| self.db(e))?;
        let annotators = stmt
            .query_map([], |r| {
                Ok(AnnotatorProgress {
                    name: r.get(0)?,
                    is_admin: r.get::<_, i64>(1)? != 0,
                    assigned: r.get::<_, i64>(2)? as usize,
                    labelled: r.get::<_, i64>(3)? as usize,
                })
            })
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.db(e))?;
        Ok(Progress {
            mode: self.mode()?,
            items: q("SELECT COUNT(*) FROM items")?,
            wanted: q("SELECT COALESCE(SUM(copies), 0) FROM items")?,
            labelled: q("SELECT COUNT(*) FROM labels")?,
            overlapping_items: q("SELECT COUNT(*) FROM items WHERE copies > 1")?,
            annotators,
        })
    }

    /// Every stored judgement, by item then annotator.
    pub fn labels(&self) -> Result<Vec<Label>> {
        let mode = self.mode()?.unwrap_or(Mode::Pair);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT l.item_id, n.name, i.prompt, i.responses, l.choice, l.ranking,
                        l.first_shown, l.unsafe_flag, l.comment, l.created_at
                 FROM labels l JOIN items i ON i.id = l.item_id
                 JOIN annotators n ON n.id = l.annotator_id
                 ORDER BY l.item_id, n.name",
            )
            .map_err(|e| self.db(e))?;
        #[allow(clippy::type_complexity)]
        let raw: Vec<(
            i64,
            String,
            String,
            String,
            Option<i64>,
            Option<String>,
            i64,
            i64,
            String,
            String,
        )> = stmt
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                    r.get(9)?,
                ))
            })
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.db(e))?;
        raw.into_iter()
            .map(
                |(
                    item_id,
                    annotator,
                    p,
                    r,
                    choice,
                    ranking,
                    first,
                    unsafe_flag,
                    comment,
                    created_at,
                )| {
                    let corrupt = || {
                        Error::Input(format!(
                            "{}: item {item_id}: stored JSON is not valid",
                            self.path.display()
                        ))
                    };
                    Ok(Label {
                        item_id,
                        annotator,
                        prompt: serde_json::from_str(&p).map_err(|_| corrupt())?,
                        responses: serde_json::from_str(&r).map_err(|_| corrupt())?,
                        mode,
                        choice,
                        ranking: ranking
                            .map(|s| serde_json::from_str(&s).map_err(|_| corrupt()))
                            .transpose()?,
                        first_shown: first as usize,
                        unsafe_flag: unsafe_flag != 0,
                        comment,
                        created_at,
                    })
                },
            )
            .collect()
    }
}
