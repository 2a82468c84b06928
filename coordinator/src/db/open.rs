//! Opening the job database: the schema and its migrations, and the files' privacy.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};

use super::{Db, DB_FILE_NAME};
use crate::error::{Error, Result};

const SCHEMA_VERSION: i64 = 3;

/// What takes a database from version `v` to `v + 1`, by `v` (1 had no last_eval column, 2 no
/// best_checkpoint column; nothing else changed).
const MIGRATIONS: [(i64, &str); 2] = [
    (1, "ALTER TABLE jobs ADD COLUMN last_eval TEXT;"),
    (2, "ALTER TABLE jobs ADD COLUMN best_checkpoint TEXT;"),
];

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL UNIQUE,
    state INTEGER NOT NULL,
    reason TEXT NOT NULL,
    source_name TEXT NOT NULL,
    spec_yaml TEXT NOT NULL,
    world_size INTEGER NOT NULL,
    max_restarts INTEGER NOT NULL,
    restarts INTEGER NOT NULL,
    restart_reasons TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    secret BLOB NOT NULL,
    step INTEGER NOT NULL,
    total_steps INTEGER NOT NULL,
    last_metric TEXT,
    last_eval TEXT,
    best_checkpoint TEXT,
    last_checkpoint_step INTEGER NOT NULL,
    last_checkpoint_path TEXT NOT NULL,
    output_dir TEXT NOT NULL,
    submitted REAL NOT NULL,
    started REAL NOT NULL,
    finished REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    host TEXT NOT NULL,
    device TEXT NOT NULL,
    collective_addr TEXT NOT NULL,
    pid INTEGER NOT NULL,
    registered REAL NOT NULL,
    last_seen REAL NOT NULL,
    alive INTEGER NOT NULL,
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    delivered INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    worker_id TEXT NOT NULL,
    last_step INTEGER NOT NULL,
    done_kind INTEGER NOT NULL,
    PRIMARY KEY (job_id, attempt, rank)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    job_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    path TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    unix REAL NOT NULL,
    rotated INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, step)
);
CREATE TABLE IF NOT EXISTS metrics (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    step INTEGER NOT NULL,
    epoch REAL NOT NULL,
    loss REAL NOT NULL,
    learning_rate REAL NOT NULL,
    grad_norm REAL NOT NULL,
    tokens_per_sec REAL NOT NULL,
    unix REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_by_job ON metrics (job_id, id);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    unix REAL NOT NULL,
    job_id TEXT NOT NULL,
    worker_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS log_lines (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    rank INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    line TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS log_lines_by_rank ON log_lines (job_id, rank, id);
";

/// `dir` and any missing parents, created with mode 0700 (an existing directory is left as
/// it is: it may be shared on purpose).
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })
}

/// Creates the database file with mode 0600 before SQLite opens it, and takes group and other
/// access away from an existing one and its `-wal` / `-shm` files (an older herd made them
/// 0644).
fn make_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    let with_suffix = |suffix: &str| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    };
    for f in [path.to_path_buf(), with_suffix("-wal"), with_suffix("-shm")] {
        let f = f.as_path();
        let Ok(meta) = std::fs::metadata(f) else {
            continue; // no side file yet
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(mode & 0o700))
                .map_err(io(f))?;
            tracing::warn!(
                "{}: was readable by others (mode {mode:o}); now {:o}",
                f.display(),
                mode & 0o700
            );
        }
    }
    Ok(())
}
impl Db {
    /// Open (creating) `<state_dir>/herd.db`.
    pub fn open_in(state_dir: &Path) -> Result<Db> {
        create_private_dir(state_dir)?;
        Db::open(&state_dir.join(DB_FILE_NAME))
    }

    pub fn open(path: &Path) -> Result<Db> {
        let ctx = |e: rusqlite::Error| Error::Db {
            path: path.to_path_buf(),
            source: e,
        };
        make_private(path)?;
        let conn = Connection::open(path).map_err(ctx)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(ctx)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(ctx)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!("{}: journal_mode is {mode}, not WAL", path.display());
        }
        conn.execute_batch("PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=OFF;")
            .map_err(ctx)?;
        conn.execute_batch(SCHEMA).map_err(ctx)?;
        let version: Option<String> = conn
            .query_row(
                "SELECT value FROM meta WHERE key='schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(ctx)?;
        match version {
            None => {
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)",
                    params![SCHEMA_VERSION.to_string()],
                )
                .map_err(ctx)?;
            }
            Some(v) if v == SCHEMA_VERSION.to_string() => {}
            Some(v) if MIGRATIONS.iter().any(|(from, _)| from.to_string() == v) => {
                // Each step and its new version in one transaction, so a crash between
                // steps leaves a database some version opens.
                for (from, sql) in MIGRATIONS
                    .iter()
                    .skip_while(|(from, _)| from.to_string() != v)
                {
                    conn.execute_batch(&format!(
                        "BEGIN; {sql} UPDATE meta SET value = '{}' WHERE key = 'schema_version'; COMMIT;",
                        from + 1
                    ))
                    .map_err(ctx)?;
                }
            }
            Some(v) => {
                return Err(Error::Schema {
                    path: path.to_path_buf(),
                    message: format!("schema version {v}, this coordinator knows {SCHEMA_VERSION}"),
                })
            }
        }
        Ok(Db {
            conn,
            path: path.to_path_buf(),
        })
    }
}
