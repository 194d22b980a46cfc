//! Build script shared by every crate that links libtorch.
//!
//! torch-sys (`links = "tch"`) publishes the directory holding libtorch as
//! `DEP_TCH_LIBTORCH_LIB` to crates that depend on it directly. We give the
//! binaries and test executables an rpath to it so that they start without
//! `LD_LIBRARY_PATH`, and keep `libtorch_cuda.so` on the link line
//! (`--no-as-needed`) so that CUDA is not silently reported as unavailable.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        let cuda = std::path::Path::new(&dir).join("libtorch_cuda.so");
        if cuda.exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-ltorch_cuda");
            println!("cargo:rustc-link-arg=-Wl,--as-needed");
        }
    }
}
