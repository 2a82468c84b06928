//! Checkpoints that describe themselves. A checkpoint is built in a staging directory, every file
//! fsynced, then a manifest (files, sizes, sha256, step, world size) is written last and the
//! directory renamed to `checkpoint-<step>`. "Latest" is the highest step whose manifest is valid,
//! never the newest mtime; rotation (`save_total_limit`) runs only after a save succeeded and never
//! deletes the newest complete checkpoint.

use crate::error::{io_err, Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

pub const PREFIX: &str = "checkpoint-";
pub const MANIFEST: &str = "herd_manifest.json";
const FORMAT: &str = "herd-checkpoint-v1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub step: u64,
    pub world_size: usize,
    pub files: Vec<FileEntry>,
}

pub fn checkpoint_dir(output_dir: &Path, step: u64) -> PathBuf {
    output_dir.join(format!("{PREFIX}{step}"))
}

fn staging_dir(output_dir: &Path, step: u64) -> PathBuf {
    output_dir.join(format!(".{PREFIX}{step}.partial"))
}

/// Why `dir` cannot hold a job's checkpoints and final model, found before any work rather
/// than at the first save: it is a file, or the path runs through a file. None when it is a
/// directory or can be created (its nearest existing ancestor is a directory).
pub fn output_dir_problem(dir: &Path) -> Option<String> {
    if dir.exists() {
        return (!dir.is_dir()).then(|| "exists and is not a directory".to_string());
    }
    let existing = dir
        .ancestors()
        .skip(1)
        .find(|a| a.as_os_str().is_empty() || a.exists())?;
    if existing.as_os_str().is_empty() || existing.is_dir() {
        return None;
    }
    Some(format!(
        "cannot be created: {} is not a directory",
        existing.display()
    ))
}

/// Creates `output_dir` and writes and removes a file in it, so a directory the job cannot
/// write (permissions, a read-only mount) stops it before its first step, not at its first
/// save hours later.
pub fn probe_writable(output_dir: &Path) -> Result<()> {
    let why = |source: std::io::Error| Error::NotWritable {
        path: output_dir.to_path_buf(),
        source,
    };
    fs::create_dir_all(output_dir).map_err(why)?;
    let probe = output_dir.join(format!(".herd-write-probe.{}", std::process::id()));
    fs::write(&probe, b"").map_err(why)?;
    fs::remove_file(&probe).map_err(why)
}

/// Write `bytes` to `path` atomically: temporary name beside it, fsync, rename, fsync the dir.
/// (One implementation for the whole project: the model crate's.)
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(herd_model::weights::write_atomic(path, bytes)?)
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Start a checkpoint: a fresh, empty staging directory (any leftover of a crashed save is removed).
pub fn begin(output_dir: &Path, step: u64) -> Result<PathBuf> {
    fs::create_dir_all(output_dir).map_err(io_err(output_dir))?;
    let staging = staging_dir(output_dir, step);
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(io_err(&staging))?;
    }
    fs::create_dir_all(&staging).map_err(io_err(&staging))?;
    Ok(staging)
}

/// Removes the staging directories of saves that never finished (a second Ctrl-C, a SIGKILL
/// mid-save), which nothing resumes from and which hold a whole checkpoint's bytes each; the
/// steps whose leftovers went. Called when a run starts, before it saves anything.
pub fn remove_unfinished_saves(output_dir: &Path) -> Result<Vec<u64>> {
    let mut removed = vec![];
    let entries = match fs::read_dir(output_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(io_err(output_dir)(e)),
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let step = name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".partial"))
            .and_then(parse_step);
        if let Some(step) = step.filter(|_| e.path().is_dir()) {
            fs::remove_dir_all(e.path()).map_err(io_err(&e.path()))?;
            removed.push(step);
        }
    }
    removed.sort_unstable();
    Ok(removed)
}

fn sha256_file(path: &Path) -> Result<(u64, String)> {
    let mut f = fs::File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(io_err(path))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    let hex = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((n, hex))
}

/// Seal a staging directory: fsync its files, write the manifest last, rename into place.
pub fn commit(output_dir: &Path, staging: &Path, step: u64, world_size: usize) -> Result<PathBuf> {
    let mut names: Vec<String> = fs::read_dir(staging)
        .map_err(io_err(staging))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != MANIFEST && !n.starts_with('.'))
        .collect();
    names.sort();
    let mut files = Vec::with_capacity(names.len());
    for name in names {
        let p = staging.join(&name);
        fs::File::open(&p)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&p))?;
        let (bytes, sha256) = sha256_file(&p)?;
        files.push(FileEntry {
            path: name,
            bytes,
            sha256,
        });
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        step,
        world_size,
        files,
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
    write_atomic(&staging.join(MANIFEST), &json)?;
    let dest = checkpoint_dir(output_dir, step);
    if dest.exists() {
        // An earlier, possibly incomplete, save of the same step: the new one replaces it.
        fs::remove_dir_all(&dest).map_err(io_err(&dest))?;
    }
    fs::rename(staging, &dest).map_err(io_err(&dest))?;
    sync_dir(output_dir)?;
    Ok(dest)
}

/// Read a checkpoint's manifest and check that every file it lists is there with its size;
/// with `hashes`, also that the contents hash as recorded.
pub fn verify(dir: &Path, hashes: bool) -> Result<Manifest> {
    let bad = |reason: String| Error::Checkpoint {
        path: dir.to_path_buf(),
        reason,
    };
    let mpath = dir.join(MANIFEST);
    let text = fs::read(&mpath).map_err(|e| {
        bad(format!(
            "no readable {MANIFEST} ({e}): the save did not complete"
        ))
    })?;
    let m: Manifest =
        serde_json::from_slice(&text).map_err(|e| bad(format!("{MANIFEST} is not valid: {e}")))?;
    if m.format != FORMAT {
        return Err(bad(format!("unknown format {:?}", m.format)));
    }
    for f in &m.files {
        let p = dir.join(&f.path);
        let len = fs::metadata(&p)
            .map_err(|e| bad(format!("{} is missing: {e}", f.path)))?
            .len();
        if len != f.bytes {
            return Err(bad(format!(
                "{} has {len} bytes, the manifest says {}",
                f.path, f.bytes
            )));
        }
        if hashes {
            let (_, h) = sha256_file(&p)?;
            if h != f.sha256 {
                return Err(bad(format!(
                    "{} does not match its sha256 in the manifest",
                    f.path
                )));
            }
        }
    }
    Ok(m)
}

/// Parse `checkpoint-<step>` names.
pub fn parse_step(name: &str) -> Option<u64> {
    name.strip_prefix(PREFIX)?.parse().ok()
}

/// Every `checkpoint-<step>` directory under `output_dir` with its step, ascending, complete or not.
pub fn list(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    if !output_dir.exists() {
        return Ok(vec![]);
    }
    let mut out: Vec<(u64, PathBuf)> = fs::read_dir(output_dir)
        .map_err(io_err(output_dir))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .filter_map(|e| parse_step(&e.file_name().to_string_lossy()).map(|s| (s, e.path())))
        .collect();
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint (highest step with a valid manifest; contents hashed), skipping
/// incomplete or corrupt ones with a warning.
pub fn latest_complete(output_dir: &Path) -> Result<Option<(u64, PathBuf, Manifest)>> {
    for (step, dir) in list(output_dir)?.into_iter().rev() {
        match verify(&dir, true) {
            Ok(m) if m.step == step => return Ok(Some((step, dir, m))),
            Ok(m) => {
                tracing::warn!(dir = %dir.display(), "manifest says step {}, skipping", m.step)
            }
            Err(e) => tracing::warn!("skipping incomplete checkpoint: {e}"),
        }
    }
    Ok(None)
}

/// Which complete checkpoints `save_total_limit` removes, as transformers' rotate_checkpoints:
/// the oldest first, never the newest (to resume from) nor the best (`best`, the step of the
/// trainer state's best_model_checkpoint), until `limit` are left, or the protected ones. Pure.
pub fn rotation_victims(
    complete_steps: &[u64],
    limit: Option<usize>,
    best: Option<u64>,
) -> Vec<u64> {
    let Some(limit) = limit.filter(|&l| l > 0) else {
        return vec![];
    };
    let mut steps = complete_steps.to_vec();
    steps.sort_unstable();
    steps.dedup();
    let Some(&newest) = steps.last() else {
        return vec![];
    };
    let protected = |s: u64| s == newest || Some(s) == best;
    let protected_count = if best.is_some_and(|b| b != newest) {
        2
    } else {
        1
    };
    let keep = limit.max(protected_count);
    let mut remaining = steps.len();
    let mut victims = vec![];
    for s in steps {
        if remaining <= keep {
            break;
        }
        if !protected(s) {
            victims.push(s);
            remaining -= 1;
        }
    }
    victims
}

/// What is removed once training ends: with `save_total_limit: 1` and a best checkpoint, every
/// other one, the newest too (transformers does the same after loading the best). Pure.
pub fn final_victims(complete_steps: &[u64], limit: Option<usize>, best: Option<u64>) -> Vec<u64> {
    match (limit, best) {
        (Some(1), Some(best)) => complete_steps
            .iter()
            .copied()
            .filter(|&s| s != best)
            .collect(),
        _ => vec![],
    }
}

/// Remove the complete checkpoints `steps` (final_victims); the removed steps.
pub fn remove(output_dir: &Path, steps: &[u64]) -> Result<Vec<u64>> {
    let mut removed = vec![];
    for (step, dir) in list(output_dir)? {
        if steps.contains(&step) {
            fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
            removed.push(step);
        }
    }
    Ok(removed)
}

/// The steps of the complete checkpoints in `output_dir`.
pub fn complete_steps(output_dir: &Path) -> Result<Vec<u64>> {
    Ok(complete_of(&list(output_dir)?))
}

/// The steps of `list`'s checkpoints whose manifest verifies.
fn complete_of(all: &[(u64, PathBuf)]) -> Vec<u64> {
    all.iter()
        .filter(|(_, d)| verify(d, false).is_ok())
        .map(|(s, _)| *s)
        .collect()
}

/// Apply `save_total_limit` after a successful save, keeping the best checkpoint. Incomplete
/// checkpoints older than the newest complete one are leftovers of crashes and are removed too.
pub fn rotate(output_dir: &Path, limit: Option<usize>, best: Option<u64>) -> Result<Vec<u64>> {
    let all = list(output_dir)?;
    let complete = complete_of(&all);
    let Some(&newest) = complete.iter().max() else {
        return Ok(vec![]);
    };
    let mut removed = vec![];
    let victims = rotation_victims(&complete, limit, best);
    for (step, dir) in &all {
        let stale = !complete.contains(step) && *step < newest;
        if victims.contains(step) || stale {
            fs::remove_dir_all(dir).map_err(io_err(dir))?;
            removed.push(*step);
        }
        if stale {
            // Not save_total_limit's doing: say why a checkpoint-N folder went away.
            tracing::warn!(
                "removed {}: incomplete (no manifest, or files that do not match it) and older \
                 than the newest complete checkpoint-{newest}",
                dir.display()
            );
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unwritable_output_dir_is_found_by_the_probe() {
        let t = tempfile::tempdir().unwrap();
        probe_writable(&t.path().join("new/out")).unwrap();
        assert!(t.path().join("new/out").is_dir());
        assert_eq!(fs::read_dir(t.path().join("new/out")).unwrap().count(), 0);
        let e = probe_writable(Path::new("/proc/herd-probe")).unwrap_err();
        assert!(e.to_string().contains("output_dir is not writable"), "{e}");
        // A permission a restart would meet again fails the job at once; a full disk may pass.
        let denied = |kind| Error::NotWritable {
            path: "/out".into(),
            source: std::io::Error::from(kind),
        };
        assert!(denied(std::io::ErrorKind::PermissionDenied).repeats_on_restart());
        assert!(denied(std::io::ErrorKind::ReadOnlyFilesystem).repeats_on_restart());
        assert!(!denied(std::io::ErrorKind::StorageFull).repeats_on_restart());
    }

    #[test]
    fn an_output_dir_through_a_file_is_refused_before_any_work() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("afile");
        fs::write(&file, "mine").unwrap();
        assert_eq!(output_dir_problem(t.path()), None);
        assert_eq!(output_dir_problem(&t.path().join("new/deeper")), None);
        assert_eq!(output_dir_problem(Path::new("relative-new")), None);
        assert_eq!(
            output_dir_problem(&file).as_deref(),
            Some("exists and is not a directory")
        );
        let e = output_dir_problem(&file.join("sub/out")).unwrap();
        assert!(
            e.contains("cannot be created") && e.contains("afile is not a directory"),
            "{e}"
        );
    }

    #[test]
    fn rotation_keeps_the_newest_n() {
        assert_eq!(
            rotation_victims(&[200, 400, 600], Some(1), None),
            vec![200, 400]
        );
        assert_eq!(rotation_victims(&[600, 200, 400], Some(2), None), vec![200]);
        assert_eq!(rotation_victims(&[200], Some(1), None), Vec::<u64>::new());
        assert_eq!(rotation_victims(&[200, 400], None, None), Vec::<u64>::new());
        // The best is kept besides the newest, even past the limit.
        assert_eq!(
            rotation_victims(&[2, 4, 6, 8], Some(2), Some(4)),
            vec![2, 6]
        );
        assert_eq!(
            rotation_victims(&[2, 4, 6, 8], Some(1), Some(4)),
            vec![2, 6]
        );
        assert_eq!(
            rotation_victims(&[2, 4, 6, 8], Some(1), Some(8)),
            vec![2, 4, 6]
        );
        // At the end, one checkpoint allowed: only the best stays.
        assert_eq!(final_victims(&[6, 12], Some(1), Some(6)), vec![12]);
        assert_eq!(final_victims(&[6, 12], Some(2), Some(6)), Vec::<u64>::new());
        assert_eq!(final_victims(&[12], Some(1), None), Vec::<u64>::new());
        // Numeric, not lexicographic: checkpoint-1000 is newer than checkpoint-999.
        assert_eq!(rotation_victims(&[999, 1000], Some(1), None), vec![999]);
    }

    fn save(out: &Path, step: u64, body: &[u8]) -> PathBuf {
        let st = begin(out, step).unwrap();
        fs::write(st.join("model.safetensors"), body).unwrap();
        commit(out, &st, step, 1).unwrap()
    }

    #[test]
    fn latest_skips_incomplete_and_corrupt() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path();
        save(out, 2, b"two");
        let four = save(out, 4, b"four");
        // A crash mid-save of step 6: directory without manifest.
        fs::create_dir_all(out.join("checkpoint-6")).unwrap();
        fs::write(out.join("checkpoint-6/model.safetensors"), b"half").unwrap();
        assert_eq!(latest_complete(out).unwrap().unwrap().0, 4);
        // Bit rot in step 4: same size, other contents.
        fs::write(four.join("model.safetensors"), b"FOUR").unwrap();
        assert_eq!(latest_complete(out).unwrap().unwrap().0, 2);
        // Truncation is caught without hashing.
        fs::write(out.join("checkpoint-2/model.safetensors"), b"tw").unwrap();
        assert!(verify(&out.join("checkpoint-2"), false).is_err());
        assert!(latest_complete(out).unwrap().is_none());
    }

    #[test]
    fn unfinished_saves_are_removed_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path();
        assert!(remove_unfinished_saves(&out.join("absent"))
            .unwrap()
            .is_empty());
        save(out, 2, b"a");
        let partial = begin(out, 4).unwrap();
        fs::write(partial.join("model.safetensors"), b"half").unwrap();
        fs::create_dir_all(out.join(".checkpoint-6.partial")).unwrap();
        fs::write(out.join(".checkpoint-8.partial"), b"a file, not ours").unwrap();
        fs::create_dir_all(out.join(".other.partial")).unwrap();
        assert_eq!(remove_unfinished_saves(out).unwrap(), vec![4, 6]);
        assert!(!partial.exists() && !out.join(".checkpoint-6.partial").exists());
        for kept in ["checkpoint-2", ".checkpoint-8.partial", ".other.partial"] {
            assert!(out.join(kept).exists(), "{kept}");
        }
    }

    #[test]
    fn rotate_never_deletes_newest_and_cleans_stale() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path();
        save(out, 1, b"a");
        fs::create_dir_all(out.join("checkpoint-2")).unwrap(); // crashed save
        save(out, 3, b"c");
        let removed = rotate(out, Some(1), None).unwrap();
        assert_eq!(removed, vec![1, 2]);
        assert_eq!(
            list(out).unwrap().iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![3]
        );
        // A crashed save newer than the newest complete one is left for resume to skip.
        fs::create_dir_all(out.join("checkpoint-9")).unwrap();
        assert_eq!(rotate(out, Some(1), None).unwrap(), Vec::<u64>::new());
        assert!(out.join("checkpoint-3").exists());
    }

    #[test]
    fn manifest_lists_sizes_and_hashes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = save(tmp.path(), 7, b"abc");
        let m = verify(&dir, true).unwrap();
        assert_eq!(m.step, 7);
        assert_eq!(m.files[0].bytes, 3);
        assert_eq!(
            m.files[0].sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(!tmp.path().join(".checkpoint-7.partial").exists());
    }
}
