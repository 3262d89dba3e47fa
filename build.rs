// Records the git commit in the binary so manifests say exactly what produced a run, and,
// with the `cuda` feature only, compiles kernels/*.cu to PTX (loaded at run time by
// candle's CUDA device). The CPU build needs no CUDA toolkit.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!("cargo:rustc-env=BSA_GIT_COMMIT={commit}");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        compile_cuda_kernels();
    }
}

/// nvcc -ptx for each kernel, for the compute capability candle is built for
/// (CUDA_COMPUTE_CAP, default 90: H100/H200). PTX (not a cubin) so the driver finishes the
/// compile for the exact GPU.
fn compile_cuda_kernels() {
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let nvcc = std::env::var("NVCC").ok().or_else(|| {
        ["CUDA_ROOT", "CUDA_HOME", "CUDA_PATH"]
            .iter()
            .find_map(|v| std::env::var(v).ok())
            .map(|root| format!("{root}/bin/nvcc"))
    });
    let nvcc = nvcc.unwrap_or_else(|| "nvcc".to_string());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    for name in ["sampler", "paged_attention"] {
        let src = format!("kernels/{name}.cu");
        println!("cargo:rerun-if-changed={src}");
        let dst = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["-ptx", "-O3", "-std=c++17", &format!("-arch=compute_{cap}"), "-o"])
            .arg(&dst)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {nvcc} to compile {src}: {e}; the cuda feature needs the CUDA toolkit (see ../shared/gpu/README.md or set NVCC)"));
        assert!(status.success(), "{nvcc} failed on {src}");
    }
}
