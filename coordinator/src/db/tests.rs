use super::*;

fn job(id: &str, seq: u64) -> JobRecord {
    JobRecord {
        id: id.into(),
        seq,
        state: pb::JobState::Running,
        reason: "r".into(),
        source_name: "job.yaml".into(),
        spec_yaml: "model_name_or_path: /m\n".into(),
        world_size: 2,
        max_restarts: 3,
        restarts: 1,
        restart_reasons: vec!["attempt 1: rank 1 died".into()],
        attempt: 2,
        secret: vec![1, 2, 3],
        step: 40,
        total_steps: 100,
        last_metric: Some(pb::Metric {
            step: 40,
            epoch: 0.4,
            loss: 1.5,
            learning_rate: 1e-3,
            grad_norm: 0.7,
            tokens_per_sec: 1234.0,
            unix_time: 1.7e9,
        }),
        last_eval: Some(pb::EvalMetric {
            step: 40,
            epoch: 0.4,
            values: [("eval_loss".to_string(), 1.75)].into(),
        }),
        best_checkpoint: Some(pb::BestCheckpoint {
            step: 20,
            path: "/out/checkpoint-20".into(),
            metric: "eval_loss".into(),
            value: 1.625,
        }),
        last_checkpoint_step: 30,
        last_checkpoint_path: "/out/checkpoint-30".into(),
        output_dir: "/out".into(),
        submitted: 1.0,
        started: 2.0,
        finished: 0.0,
    }
}

#[test]
fn round_trip_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let j1 = job("job-1", 1);
    let mut j2 = job("job-2", 2);
    j2.state = pb::JobState::Queued;
    j2.attempt = 0;
    j2.last_metric = None;
    let w = WorkerRecord {
        id: "w-000001".into(),
        seq: 1,
        host: "h".into(),
        device: "cpu".into(),
        collective_addr: "127.0.0.1:5000".into(),
        pid: 42,
        registered: 1.0,
        last_seen: 2.0,
        alive: true,
        job_id: "job-1".into(),
        attempt: 2,
        rank: 0,
        delivered: true,
    };
    let old_rank = RankRecord {
        job_id: "job-1".into(),
        attempt: 1,
        rank: 0,
        worker_id: "w-9".into(),
        last_step: 35,
        done_kind: 3,
    };
    let rank = RankRecord {
        job_id: "job-1".into(),
        attempt: 2,
        rank: 0,
        worker_id: "w-000001".into(),
        last_step: 40,
        done_kind: 0,
    };
    {
        let db = Db::open_in(dir.path()).unwrap();
        db.save_job(&j1).unwrap();
        db.save_job(&j2).unwrap();
        db.save_worker(&w).unwrap();
        db.save_rank(&old_rank).unwrap();
        db.save_rank(&rank).unwrap();
        let c = |s: u64| CheckpointRecord {
            job_id: "job-1".into(),
            step: s,
            path: format!("/out/checkpoint-{s}"),
            attempt: 1,
            unix: 3.0,
            rotated: false,
        };
        db.add_checkpoint(&c(10), &[]).unwrap();
        db.add_checkpoint(&c(20), &[10]).unwrap();
        db.add_metric("job-1", 2, j1.last_metric.as_ref().unwrap())
            .unwrap();
        db.add_event(&EventRecord {
            unix: 1.0,
            job_id: "job-1".into(),
            worker_id: "".into(),
            kind: "submitted".into(),
            message: "m".into(),
        })
        .unwrap();
        let lines: Vec<String> = (0..10).map(|i| format!("line {i}")).collect();
        db.add_log_lines("job-1", 0, 2, &lines, 5).unwrap();
    }
    let db = Db::open_in(dir.path()).unwrap();
    let l = db.load().unwrap();
    assert_eq!(l.jobs, vec![j1.clone(), j2]);
    assert_eq!(l.workers, vec![w]);
    assert_eq!(l.ranks, vec![rank], "only the current attempt's ranks");
    let cps = db.checkpoints("job-1").unwrap();
    assert_eq!(
        cps.iter().map(|c| (c.step, c.rotated)).collect::<Vec<_>>(),
        vec![(10, true), (20, false)]
    );
    assert_eq!(db.metrics("job-1").unwrap(), vec![j1.last_metric.unwrap()]);
    assert_eq!(db.events("job-1").unwrap().len(), 1);
    assert_eq!(
        db.log_tail("job-1", 0, 3).unwrap(),
        vec!["line 7", "line 8", "line 9"]
    );
    assert_eq!(
        db.log_tail("job-1", 0, 100).unwrap().len(),
        5,
        "rotated to `keep`"
    );
    assert!(db.log_tail("job-1", 1, 100).unwrap().is_empty());
    let mode: String = db
        .conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode.to_lowercase(), "wal");
}

/// A state dir written by a version-1 coordinator (no last_eval, no best_checkpoint column)
/// or a version-2 one (no best_checkpoint) opens, gains the columns, and keeps its jobs.
#[test]
fn older_databases_are_migrated() {
    for (version, dropped) in [
        (1, &["last_eval", "best_checkpoint"][..]),
        (2, &["best_checkpoint"]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut j = job("job-1", 1);
        j.last_eval = None;
        j.best_checkpoint = None;
        {
            let db = Db::open_in(dir.path()).unwrap();
            db.save_job(&j).unwrap();
            for c in dropped {
                db.conn
                    .execute_batch(&format!("ALTER TABLE jobs DROP COLUMN {c};"))
                    .unwrap();
            }
            db.conn
                .execute(
                    "UPDATE meta SET value = ?1 WHERE key = 'schema_version'",
                    [version.to_string()],
                )
                .unwrap();
        }
        let db = Db::open_in(dir.path()).unwrap();
        assert_eq!(
            db.load().unwrap().jobs,
            vec![j.clone()],
            "from version {version}"
        );
        let full = job("job-1", 1);
        j.last_eval = full.last_eval;
        j.best_checkpoint = full.best_checkpoint;
        db.save_job(&j).unwrap();
        assert_eq!(db.load().unwrap().jobs, vec![j]);
        let v: String = db
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key='schema_version'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(v, "3");
    }
}

/// A database from a newer coordinator is refused, naming both versions, and left as it is.
#[test]
fn a_newer_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = Db::open_in(dir.path()).unwrap();
        db.conn
            .execute_batch("UPDATE meta SET value = '9' WHERE key = 'schema_version';")
            .unwrap();
    }
    let Err(e) = Db::open_in(dir.path()) else {
        panic!("a version-9 database was opened");
    };
    let e = e.to_string();
    assert!(
        e.contains("schema version 9") && e.contains("knows 3"),
        "{e}"
    );
}

fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn the_database_holding_the_secrets_is_private() {
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("a/state");
    let db = Db::open_in(&state).unwrap();
    db.save_job(&job("job-1", 1)).unwrap();
    assert_eq!(mode(&state), 0o700, "a state dir the coordinator creates");
    assert_eq!(
        mode(&root.path().join("a")),
        0o700,
        "and its missing parents"
    );
    for f in ["herd.db", "herd.db-wal", "herd.db-shm"] {
        assert_eq!(mode(&state.join(f)), 0o600, "{f}");
    }
    drop(db);

    // An older coordinator left them 0644: opening takes the others' access away.
    use std::os::unix::fs::PermissionsExt;
    for f in ["herd.db", "herd.db-wal", "herd.db-shm"] {
        let p = state.join(f);
        if p.exists() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    let db = Db::open_in(&state).unwrap();
    assert_eq!(db.load().unwrap().jobs.len(), 1);
    for f in ["herd.db", "herd.db-wal", "herd.db-shm"] {
        let p = state.join(f);
        if p.exists() {
            assert_eq!(mode(&p), 0o600, "{f} after reopening");
        }
    }
}
