//! Two builds of the same CUDA sources (src/cuda):
//! - for the tests, always: compiled for the host against the emulator (src/cuda/emu), linked only
//!   into this crate's integration tests (`rustc-link-arg-tests`), never into a binary;
//! - with the `cuda` feature: PTX from nvcc, embedded by `lib.rs`.
use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=src/cuda");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));

    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .file("src/cuda/emu/emu.cpp")
        .define("PREFTUNE_EMULATE", None)
        .include("src/cuda")
        .opt_level(2)
        // Round every operation on its own, as the kernels' `__fmul_rn` and kin do on a GPU.
        .flag_if_supported("-ffp-contract=off")
        .cargo_metadata(false)
        .compile("preftune_cuda_emu");
    println!(
        "cargo::rustc-link-arg-tests={}",
        out.join("libpreftune_cuda_emu.a").display()
    );
    println!("cargo::rustc-link-arg-tests=-lstdc++");

    if env::var_os("CARGO_FEATURE_CUDA").is_some() {
        let nvcc = env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
        let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
        println!("cargo::rustc-env=PREFTUNE_CUDA_COMPUTE_CAP={cap}");
        let ptx = out.join("preftune.ptx");
        let status = Command::new(&nvcc)
            .args(["--ptx", "-std=c++17", "-O3", "--expt-relaxed-constexpr"])
            .arg(format!("-arch=compute_{cap}"))
            .arg("src/cuda/preftune.cu")
            .arg("-o")
            .arg(&ptx)
            .status()
            .unwrap_or_else(|e| {
                panic!("could not run {nvcc} (scripts/build-cuda.sh sets NVCC): {e}")
            });
        assert!(status.success(), "{nvcc} failed on src/cuda/preftune.cu");
    }
}
