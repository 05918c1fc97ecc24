//! Embeds libtorch's directory as an rpath so test binaries run without
//! `LD_LIBRARY_PATH` (the CLI crate does the same for the `dancegrpo` binary),
//! and compiles the shims (`csrc/c10d_shim.cpp`, `csrc/context_shim.cpp`) against the headers of the
//! same libtorch: Gloo always, NCCL with the `cuda` feature.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=csrc");
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    let lib = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.into());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    compile_shim(&lib);
}

/// The torch wheel's layout: `<site-packages>/torch/{lib,include}`, and the
/// CUDA and NCCL headers in `<site-packages>/nvidia/*/include`.
fn compile_shim(lib: &Path) {
    let torch = lib.parent().expect("libtorch lib dir has a parent");
    let include = torch.join("include");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .define("GLOG_USE_GLOG_EXPORT", None)
        .define("USE_C10D_GLOO", None)
        .include("csrc/gloo_decl")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .file("csrc/c10d_shim.cpp")
        .file("csrc/context_shim.cpp")
        .file("csrc/profiler_shim.cpp");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        build
            .define("USE_C10D_NCCL", None)
            .define("DANCEGRPO_NCCL", None)
            .define("DANCEGRPO_CUDA", None);
        for dir in nvidia_includes(torch) {
            build.include(dir);
        }
    }
    build.compile("dancegrpo_c10d");
    // The shim's symbols live in these; list them after the archive.
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
}

fn nvidia_includes(torch: &Path) -> Vec<PathBuf> {
    let nvidia = torch.parent().map(|p| p.join("nvidia"));
    let Some(Ok(entries)) = nvidia.map(std::fs::read_dir) else {
        panic!(
            "feature `cuda`: no nvidia/ beside {} (a CPU-only torch wheel?)",
            torch.display()
        );
    };
    let dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("include"))
        .filter(|p| p.is_dir())
        .collect();
    for header in ["crt/host_config.h", "nv/target"] {
        if !dirs.iter().any(|d| d.join(header).exists()) {
            panic!(
                "feature `cuda`: no {header} under {}/nvidia/*/include: build with `./dev.sh build --cuda` \
                 (it adds the nvidia-cuda-crt and nvidia-cuda-cccl header wheels)",
                torch.parent().map(|p| p.display().to_string()).unwrap_or_default()
            );
        }
    }
    dirs
}
