//! preftune patch: PTX only. Upstream also builds a static library of MoE/GGUF matmul kernels
//! (minutes of nvcc per architecture) and links `libcudart` at link time; preftune uses neither,
//! and its binary must start on machines with no CUDA libraries at all (they are loaded at run
//! time). See vendor/candle-kernels/PREFTUNE.md.
use cudaforge::{KernelBuilder, Result};
use std::env;
use std::path::PathBuf;

fn main() -> Result<()> {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src");
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let bindings = KernelBuilder::new()
        .source_dir("src")
        .arg("--expt-relaxed-constexpr")
        .arg("-std=c++17")
        .arg("-O3")
        .build_ptx()?;
    bindings.write(out_dir.join("ptx.rs"))?;
    Ok(())
}
