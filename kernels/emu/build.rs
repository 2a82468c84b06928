//! Compiles ../cuda/*.cu as C++ for the host, with include/herd_emu.h force-included (the CUDA
//! builtins) and include/cuda_bf16.h standing in for the toolkit's header, plus the emulator's
//! runtime. Needs only the C++ compiler every Rust toolchain already links with.
use std::path::PathBuf;

#[allow(dead_code)]
#[path = "../cuda/signatures.rs"]
mod signatures;

fn main() {
    let here = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let cuda = here.join("../cuda");
    println!("cargo::rerun-if-changed=include");
    println!("cargo::rerun-if-changed=src/runtime.cpp");
    println!("cargo::rerun-if-changed={}", cuda.display());
    let mut kernels: Vec<PathBuf> = std::fs::read_dir(&cuda)
        .expect("kernels/cuda")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    kernels.sort();
    // The Rust declarations of the entry points, from the .cu files themselves.
    let mut entries = Vec::new();
    for k in &kernels {
        let stem = k.file_stem().unwrap().to_string_lossy();
        let text = std::fs::read_to_string(k)
            .unwrap_or_else(|e| panic!("herd-kernels-emu: reading {}: {e}", k.display()));
        entries.extend(signatures::parse(&stem, &text).unwrap_or_else(|e| panic!("{e}")));
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    std::fs::write(out.join("table.rs"), signatures::emulator_table(&entries)).unwrap_or_else(
        |e| {
            panic!(
                "herd-kernels-emu: writing table.rs in {}: {e}",
                out.display()
            )
        },
    );
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .warnings(false)
        .flag("-pthread")
        .flag("-x")
        .flag("c++")
        .flag("-include")
        .flag(here.join("include/herd_emu.h").to_str().unwrap())
        .include(here.join("include"))
        .files(&kernels)
        .file("src/runtime.cpp")
        .compile("herd_kernels_emu");
    println!("cargo::rustc-link-lib=pthread");
}
