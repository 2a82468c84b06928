//! Compiles ../cuda/*.cu as C++ for the host, with include/herd_emu.h force-included (the CUDA
//! builtins) and include/cuda_bf16.h standing in for the toolkit's header, plus the emulator's
//! runtime. Needs only the C++ compiler every Rust toolchain already links with.
use std::path::PathBuf;

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
