//! Embeds libtorch's directory as an rpath so test binaries run without
//! `LD_LIBRARY_PATH` (the CLI crate does the same for the `dancegrpo` binary).

fn main() {
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        let dir = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.into());
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    }
}
