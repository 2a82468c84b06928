//! With the `cuda` feature: compile every cuda/*.cu to PTX with nvcc (sm_$CUDA_COMPUTE_CAP,
//! default 90 = H100/H200) into OUT_DIR, and generate the typed launchers of their entry points
//! (cuda/signatures.rs) as OUT_DIR/launchers.rs; src/cuda.rs includes both. Without it: nothing,
//! so CPU builds and CI need no CUDA toolkit.
use std::{env, path::PathBuf, process::Command};

#[allow(dead_code)]
#[path = "cuda/signatures.rs"]
mod signatures;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=cuda");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let nvcc = env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let cap = cap.trim_end_matches('a');
    let mut sources: Vec<PathBuf> = std::fs::read_dir("cuda")
        .expect("kernels/cuda")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    let mut stems = Vec::new();
    let mut entries = Vec::new();
    for src in &sources {
        let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(src)
            .unwrap_or_else(|e| panic!("herd-kernels: reading {}: {e}", src.display()));
        entries.extend(signatures::parse(&stem, &text).unwrap_or_else(|e| panic!("{e}")));
        stems.push(stem);
    }
    std::fs::write(
        out.join("launchers.rs"),
        signatures::launchers(&stems, &entries),
    )
    .unwrap_or_else(|e| {
        panic!(
            "herd-kernels: writing launchers.rs in {}: {e}",
            out.display()
        )
    });
    for src in sources {
        let ptx = out.join(src.with_extension("ptx").file_name().unwrap());
        let status = Command::new(&nvcc)
            // -fmad=false: no contraction of a*b+c into one FMA, so each kernel rounds as its
            // host reference and the emulator do (AdamW's moments bit for bit with the host
            // optimizer's); these kernels are bound by memory, not by arithmetic.
            .args(["--ptx", "-O3", "-std=c++17", "-lineinfo", "-fmad=false"])
            .arg(format!("-arch=sm_{cap}"))
            .arg(&src)
            .arg("-o")
            .arg(&ptx)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "herd-kernels: cannot run nvcc `{nvcc}` ({e}). The cuda feature needs the \
                     CUDA toolkit at build time: eval \"$(bash scripts/cuda-build-env.sh)\" \
                     (see README, CUDA)"
                )
            });
        assert!(
            status.success(),
            "herd-kernels: nvcc failed on {}",
            src.display()
        );
    }
}
