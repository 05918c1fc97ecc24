//! Makes the `dancegrpo` binary self-contained: an rpath to libtorch's directory,
//! and with the `cuda` feature a forced link of `libtorch_cuda` (no `--as-needed`
//! drop: nothing in our code references its symbols directly, CUDA kernels are
//! registered by its static initialisers).

fn main() {
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    let dir = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.into());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        if !dir.join("libtorch_cuda.so").exists() {
            panic!(
                "feature `cuda`: {} has no libtorch_cuda.so (a CPU-only libtorch?)",
                dir.display()
            );
        }
        println!("cargo:rustc-link-arg-bins=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg-bins=-ltorch_cuda");
        println!("cargo:rustc-link-arg-bins=-lc10_cuda");
        println!("cargo:rustc-link-arg-bins=-Wl,--as-needed");
    }
}
