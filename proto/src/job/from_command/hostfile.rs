//! How many ranks `deepspeed` starts, as deepspeed/launcher/runner.py counts them: one per slot
//! of every host of its hostfile (`host slots=N` lines, `#` comments; /job/hostfile unless
//! --hostfile names another), narrowed by --include/--exclude (`node1:0,1@node2`), then the
//! first --num_nodes hosts, each with --num_gpus slots when given. Without a hostfile it runs
//! on the local GPUs only, which herd cannot count from here: --num_gpus or --include (or
//! CUDA_VISIBLE_DEVICES, which DeepSpeed turns into --include) must say how many.

use super::launcher::{Opts, COUNT_HINT, LOGS, PROCESS, RDZV};
use super::Files;

/// Where DeepSpeed looks for a hostfile when --hostfile is not given.
pub(super) const DEFAULT_HOSTFILE: &str = "/job/hostfile";

/// The hosts and slots of a hostfile, in its order.
type Pool = Vec<(String, Vec<usize>)>;

pub(super) fn world(
    opts: &Opts,
    env: &[(String, String)],
    files: &dyn Files,
    notes: &mut Vec<String>,
) -> Result<usize, String> {
    let mut hostfile = None;
    let mut include = None;
    let mut exclude = None;
    let mut num_gpus = None;
    let mut num_nodes = None;
    for (k, v) in opts {
        let v = v.as_deref().unwrap_or("");
        // DeepSpeed's counts are ints, -1 (its default) meaning unset.
        let int = |v: &str| match v.parse::<i64>() {
            Ok(n) => Ok((n > 0).then_some(n as usize)),
            Err(_) => Err(format!(
                "--{k} {v}: expected a number of processes (herd needs the count)"
            )),
        };
        let note = match k.as_str() {
            "hostfile" => {
                hostfile = Some(v);
                continue;
            }
            "include" => {
                include = Some(v.to_string());
                continue;
            }
            "exclude" => {
                exclude = Some(v);
                continue;
            }
            "num_gpus" | "num_accelerators" => {
                num_gpus = int(v)?;
                continue;
            }
            "num_nodes" => {
                num_nodes = int(v)?;
                continue;
            }
            "elastic_training" | "min_elastic_nodes" | "max_elastic_nodes" => {
                "herd's world size is fixed per job: world_size counts the ranks DeepSpeed \
                 starts, and the job neither grows nor shrinks"
            }
            "autotuning" => {
                notes.push(format!(
                    "--autotuning {v}: herd does not autotune: the job runs with the batch \
                     sizes and settings given, where DeepSpeed would first try others"
                ));
                continue;
            }
            "enable_each_rank_log" => LOGS,
            "module" | "no_python" | "no_local_rank" | "save_pid" | "bind_cores_to_rank"
            | "bind_core_list" => PROCESS,
            _ => RDZV,
        };
        notes.push(format!("--{k}: {note}"));
    }
    if include.is_some() && exclude.is_some() {
        return Err(
            "deepspeed --include with --exclude: DeepSpeed refuses the two together".into(),
        );
    }
    if (num_gpus.is_some() || num_nodes.is_some()) && (include.is_some() || exclude.is_some()) {
        return Err(
            "deepspeed --num_gpus/--num_nodes with --include/--exclude: DeepSpeed refuses them \
             together"
                .into(),
        );
    }
    let path = hostfile.unwrap_or(DEFAULT_HOSTFILE);
    let pool =
        match (files.read(path), hostfile) {
            (Ok(text), _) => Some(parse(&text).map_err(|e| {
                format!("deepspeed --hostfile {path}: {e} (DeepSpeed refuses it too)")
            })?),
            (Err(e), Some(_)) => {
                return Err(format!(
                    "deepspeed --hostfile {path}: cannot read it here ({e}): DeepSpeed starts one \
                 rank per slot of each host it lists (and runs on the local GPUs only where it \
                 is missing), so herd cannot count the ranks without it; run `herd \
                 from-command` where the file is, or {COUNT_HINT}"
                ))
            }
            (Err(_), None) => None,
        };
    let Some(pool) = pool else {
        return local(include, exclude, num_gpus, num_nodes, env, notes);
    };
    let mut active = filter(&pool, include.as_deref(), exclude)?;
    if let Some(k) = num_nodes {
        active.truncate(k);
    }
    if let Some(g) = num_gpus {
        for (_, slots) in &mut active {
            *slots = (0..g).collect();
        }
    }
    let world: usize = active.iter().map(|(_, s)| s.len()).sum();
    if world == 0 {
        return Err(format!(
            "deepspeed --hostfile {path}: no slot is left to run on after --include/--exclude"
        ));
    }
    let hosts: Vec<String> = active
        .iter()
        .map(|(h, s)| format!("{h} ({})", s.len()))
        .collect();
    let mut whence = match hostfile {
        Some(_) => format!("--hostfile {path}"),
        None => format!("no --hostfile: DeepSpeed reads {path}, which is here, so"),
    };
    for (flag, v) in [
        ("--include", include.clone()),
        ("--exclude", exclude.map(str::to_string)),
        ("--num_nodes", num_nodes.map(|n| n.to_string())),
        ("--num_gpus", num_gpus.map(|n| n.to_string())),
    ] {
        if let Some(v) = v {
            whence.push_str(&format!(" {flag} {v}"));
        }
    }
    notes.push(format!(
        "{whence}: DeepSpeed starts one rank per slot of {}: world_size {world}",
        hosts.join(", ")
    ));
    Ok(world)
}

/// No hostfile: DeepSpeed runs on this machine's GPUs, all of them unless told which.
fn local(
    mut include: Option<String>,
    exclude: Option<&str>,
    num_gpus: Option<usize>,
    num_nodes: Option<usize>,
    env: &[(String, String)],
    notes: &mut Vec<String>,
) -> Result<usize, String> {
    let visible = env
        .iter()
        .rev()
        .find(|(k, _)| k == "CUDA_VISIBLE_DEVICES")
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty());
    if let Some(v) = visible {
        if include.is_some() || exclude.is_some() || num_gpus.is_some() || num_nodes > Some(1) {
            notes.push(format!(
                "CUDA_VISIBLE_DEVICES={v}: DeepSpeed ignores it when --include, --exclude, \
                 --num_gpus or --num_nodes is given"
            ));
        } else {
            notes.push(format!(
                "CUDA_VISIBLE_DEVICES={v}: DeepSpeed runs on those GPUs (--include localhost:{v})"
            ));
            include = Some(format!("localhost:{v}"));
        }
    }
    if exclude.is_some() {
        return Err(format!(
            "deepspeed --exclude without a hostfile: DeepSpeed runs on this machine's GPUs but \
             those excluded, which herd cannot count from here; {COUNT_HINT}"
        ));
    }
    if let Some(inc) = include {
        let mut world = 0;
        for (host, slots) in node_configs(&inc)? {
            if host != "localhost" {
                return Err(format!(
                    "deepspeed --include {inc}: {host} is not in a hostfile (none was read: \
                     DeepSpeed reads {DEFAULT_HOSTFILE} unless --hostfile names one, and knows \
                     only localhost without it)"
                ));
            }
            if slots.is_empty() {
                return Err(format!(
                    "deepspeed --include {inc}: every GPU of this machine, which herd cannot \
                     count from here; name them (localhost:0,1,…) or {COUNT_HINT}"
                ));
            }
            world += slots.len();
        }
        return Ok(world);
    }
    let Some(g) = num_gpus else {
        return Err(format!(
            "deepspeed without --num_gpus, --include or a hostfile starts one rank per GPU of \
             the machine it runs on, which herd cannot count from here: say how many with \
             --num_gpus N (or {COUNT_HINT})"
        ));
    };
    let nodes = num_nodes.unwrap_or(1);
    if nodes > 1 {
        notes.push(format!(
            "--num_nodes {nodes}: DeepSpeed takes the first {nodes} hosts of its hostfile \
             ({DEFAULT_HOSTFILE} unless --hostfile names one; not read here): world_size counts \
             {nodes} × {g}, fewer if it lists fewer hosts"
        ));
    }
    Ok(nodes * g)
}

/// `host slots=N` lines, as DeepSpeed's `_parse_hostfile` reads them.
fn parse(text: &str) -> Result<Pool, String> {
    let mut pool: Pool = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let host = words.next().unwrap_or_default();
        let slots = words
            .next()
            .and_then(|w| w.strip_prefix("slots="))
            .map(|d| {
                d.chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
            })
            .and_then(|d| d.parse::<usize>().ok())
            .ok_or_else(|| format!("a bad entry: {line:?} (expected `HOST slots=N`)"))?;
        if pool.iter().any(|(h, _)| h == host) {
            return Err(format!("{host} is listed twice"));
        }
        pool.push((host.to_string(), (0..slots).collect()));
    }
    if pool.is_empty() {
        return Err("it lists no host".into());
    }
    Ok(pool)
}

/// `node1:0,1@node2` as (host, slots) in its order, a host's slots merged, sorted and
/// deduplicated; no slots means the whole host.
fn node_configs(spec: &str) -> Result<Vec<(String, Vec<usize>)>, String> {
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    for node in spec.split('@') {
        let (host, slots) = match node.split_once(':') {
            None => (node, vec![]),
            Some((host, list)) => {
                let slots = list
                    .split(',')
                    .map(|s| s.trim().parse::<usize>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| format!("{spec:?}: expected HOST[:SLOT,SLOT…][@HOST…]"))?;
                (host, slots)
            }
        };
        match out.iter_mut().find(|(h, _)| h == host) {
            Some((_, s)) => s.extend(slots),
            None => out.push((host.to_string(), slots)),
        }
    }
    for (_, s) in &mut out {
        s.sort_unstable();
        s.dedup();
    }
    Ok(out)
}

/// DeepSpeed's `parse_inclusion_exclusion`: the hostfile's slots narrowed to those included,
/// or less those excluded; hosts left with no slot are dropped; the hostfile's order kept.
fn filter(pool: &Pool, include: Option<&str>, exclude: Option<&str>) -> Result<Pool, String> {
    let (spec, including) = match (include, exclude) {
        (Some(s), _) => (s, true),
        (None, Some(s)) => (s, false),
        (None, None) => return Ok(pool.clone()),
    };
    let flag = if including { "--include" } else { "--exclude" };
    let configs = node_configs(spec)?;
    for (host, slots) in &configs {
        let Some((_, have)) = pool.iter().find(|(h, _)| h == host) else {
            return Err(format!(
                "deepspeed {flag} {spec}: {host} is not in the hostfile"
            ));
        };
        if let Some(s) = slots.iter().find(|s| !have.contains(s)) {
            return Err(format!(
                "deepspeed {flag} {spec}: {host} has {} slots in the hostfile, so no slot {s}",
                have.len()
            ));
        }
    }
    let mut out = Pool::new();
    for (host, have) in pool {
        let named = configs.iter().find(|(h, _)| h == host).map(|(_, s)| s);
        let slots: Vec<usize> = match (including, named) {
            (true, None) => continue,
            (true, Some(s)) if s.is_empty() => have.clone(),
            (true, Some(s)) => s.clone(),
            (false, None) => have.clone(),
            (false, Some(s)) if s.is_empty() => continue,
            (false, Some(s)) => have.iter().copied().filter(|x| !s.contains(x)).collect(),
        };
        if !slots.is_empty() {
            out.push((host.clone(), slots));
        }
    }
    Ok(out)
}
