//! Compiles src/bridge.cpp against the libtorch torch-sys links, with the
//! distributed backends whose headers are present:
//!
//! - Gloo (`cfg(align_gloo)`): Gloo's headers, Debian's libgloo-dev
//!   (`/usr/include/gloo`, or the directory holding `gloo/` in
//!   `ALIGN_GLOO_INCLUDE`); `ALIGN_NATIVE_GLOO=0` leaves it out.
//! - NCCL (`cfg(align_nccl)`): a CUDA build of libtorch (`libtorch_cuda.so`)
//!   plus `nccl.h` and the CUDA runtime headers, from the nvidia wheels next
//!   to torch (`site-packages/nvidia/...`), `ALIGN_NCCL_INCLUDE` /
//!   `ALIGN_CUDA_INCLUDE`, or `/usr/local/cuda`; `ALIGN_NATIVE_NCCL=0`
//!   leaves it out.
//!
//! The script reruns only when bridge.cpp, this file or one of those
//! variables changes (the Makefile touches this file after installing
//! libgloo-dev).
use std::path::{Path, PathBuf};

fn env(name: &str) -> Option<String> {
    println!("cargo:rerun-if-env-changed={name}");
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn disabled(name: &str) -> bool {
    matches!(env(name).as_deref(), Some("0" | "false" | "no" | "off"))
}

/// libtorch's lib directory, as torch-sys found it.
fn libtorch_lib() -> PathBuf {
    if let Some(dir) = env("DEP_TCH_LIBTORCH_LIB") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = env("LIBTORCH") {
        return Path::new(&dir).join("lib");
    }
    panic!("align-native: neither DEP_TCH_LIBTORCH_LIB (from torch-sys) nor LIBTORCH is set");
}

/// Whether libtorch was built with the C++11 ABI of libstdc++: its mangled
/// names then carry `B5cxx11` (std::__cxx11::basic_string in a signature).
/// `LIBTORCH_CXX11_ABI` overrides, as for torch-sys.
fn cxx11_abi(lib: &Path) -> &'static str {
    if let Some(v) = env("LIBTORCH_CXX11_ABI") {
        return if v == "0" { "0" } else { "1" };
    }
    match std::fs::read(lib.join("libc10.so")) {
        Ok(bytes) => {
            if bytes.windows(7).any(|w| w == b"B5cxx11") {
                "1"
            } else {
                "0"
            }
        }
        Err(_) => "1",
    }
}

fn first_with(candidates: &[PathBuf], file: &str) -> Option<PathBuf> {
    candidates.iter().find(|d| d.join(file).is_file()).cloned()
}

fn main() {
    println!("cargo:rerun-if-changed=src/bridge.cpp");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo::rustc-check-cfg=cfg(align_gloo)");
    println!("cargo::rustc-check-cfg=cfg(align_nccl)");

    let lib = libtorch_lib();
    let root = lib.parent().map(Path::to_path_buf).unwrap_or_else(|| lib.clone());
    let include = root.join("include");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .file("src/bridge.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", cxx11_abi(&lib))
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .flag_if_supported("-Wno-missing-field-initializers")
        .flag_if_supported("-Wno-unknown-pragmas")
        .warnings(false);

    // Gloo.
    let gloo_dirs: Vec<PathBuf> = env("ALIGN_GLOO_INCLUDE")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from("/usr/include")])
        .collect();
    let gloo = if disabled("ALIGN_NATIVE_GLOO") { None } else { first_with(&gloo_dirs, "gloo/config.h") };
    match &gloo {
        Some(dir) => {
            if dir != Path::new("/usr/include") {
                build.include(dir);
            }
            build.define("USE_C10D_GLOO", None).define("ALIGN_GLOO", None);
            println!("cargo:rustc-cfg=align_gloo");
        }
        None => println!(
            "cargo:warning=align-native: no Gloo headers (libgloo-dev), the bridge is built without Gloo"
        ),
    }

    // NCCL, on a CUDA libtorch only.
    let cuda_torch = lib.join("libtorch_cuda.so").is_file();
    let site = root.parent().map(Path::to_path_buf).unwrap_or_default();
    let nvidia = site.join("nvidia");
    let mut nccl_dirs: Vec<PathBuf> = env("ALIGN_NCCL_INCLUDE").map(PathBuf::from).into_iter().collect();
    nccl_dirs.extend([
        nvidia.join("nccl/include"),
        PathBuf::from("/usr/include"),
        PathBuf::from("/usr/local/cuda/include"),
    ]);
    // ALIGN_CUDA_INCLUDE: a ':'-separated list searched first.
    let mut cuda_dirs: Vec<PathBuf> =
        env("ALIGN_CUDA_INCLUDE").map(|v| v.split(':').map(PathBuf::from).collect()).unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir(&nvidia) {
        // nvidia/cu13/include (CUDA 13 wheels), nvidia/cuda_runtime/include (CUDA 12).
        let mut found: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("include")).collect();
        found.sort();
        cuda_dirs.extend(found);
    }
    cuda_dirs.push(PathBuf::from("/usr/local/cuda/include"));
    cuda_dirs.retain(|d| d.is_dir());
    // The CUDA runtime headers include crt/host_config.h and CCCL's
    // nv/target, which the nvidia-cuda-runtime wheel lacks: they come with a
    // CUDA toolkit (/usr/local/cuda) or the nvidia-cuda-crt and
    // nvidia-cuda-cccl wheels. Without them there is no NCCL part.
    let nccl = if disabled("ALIGN_NATIVE_NCCL") || !cuda_torch {
        None
    } else {
        let found = (
            first_with(&nccl_dirs, "nccl.h"),
            first_with(&cuda_dirs, "cuda_runtime_api.h"),
            first_with(&cuda_dirs, "crt/host_config.h"),
            first_with(&cuda_dirs, "nv/target"),
        );
        match found {
            (Some(n), Some(c), Some(_), Some(_)) => Some((n, c)),
            (n, c, crt, _) => {
                let missing = if n.is_none() {
                    "nccl.h"
                } else if c.is_none() {
                    "cuda_runtime_api.h"
                } else if crt.is_none() {
                    "crt/host_config.h (a CUDA toolkit's headers, or the nvidia-cuda-crt wheel; ALIGN_CUDA_INCLUDE)"
                } else {
                    "nv/target (a CUDA toolkit's headers, or the nvidia-cuda-cccl wheel; ALIGN_CUDA_INCLUDE)"
                };
                println!("cargo:warning=align-native: CUDA libtorch but no {missing}, the bridge is built without NCCL");
                None
            }
        }
    };
    if let Some((n, c)) = &nccl {
        build
            .include(n)
            .include(c)
            .define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None)
            .define("ALIGN_NCCL", None);
        // Headers that sit beside cuda_runtime_api.h in other wheels (cublas, cusparse...).
        for d in &cuda_dirs {
            if d != c {
                build.include(d);
            }
        }
        println!("cargo:rustc-cfg=align_nccl");
    }

    build.compile("align_native_bridge");

    println!("cargo:rustc-link-search=native={}", lib.display());
    // As build-support/rpath.rs: test executables start without
    // LD_LIBRARY_PATH and keep libtorch_cuda.so (CUDA stays visible).
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if cuda_torch {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    if nccl.is_some() {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    for l in ["torch", "torch_cpu", "c10"] {
        println!("cargo:rustc-link-lib=dylib={l}");
    }
}
