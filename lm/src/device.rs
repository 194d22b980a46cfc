//! Parsing `--device auto|cpu|cuda[:N]` and `--dtype f32|bf16` once into tch values.

use anyhow::{bail, Result};
use tch::{Device, Kind};

/// `auto` picks CUDA when libtorch sees a GPU (`cuda:LOCAL_RANK` under
/// torchrun), the CPU otherwise.
pub fn parse_device(s: &str) -> Result<Device> {
    Ok(match s {
        "auto" => crate::dist::auto_device().unwrap_or_else(Device::cuda_if_available),
        "cpu" => Device::Cpu,
        "cuda" => {
            if !tch::Cuda::is_available() {
                bail!("--device cuda: libtorch sees no CUDA device (tch::Cuda::is_available() is false)");
            }
            Device::Cuda(0)
        }
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) if tch::Cuda::is_available() && (n as i64) < tch::Cuda::device_count() => Device::Cuda(n),
            Some(n) => {
                bail!("--device cuda:{n}: no such CUDA device ({} visible)", tch::Cuda::device_count())
            }
            None => bail!("unknown device {other:?}; use auto, cpu, cuda or cuda:N"),
        },
    })
}

pub fn parse_dtype(s: &str) -> Result<Kind> {
    Ok(match s {
        "f32" | "float32" | "fp32" => Kind::Float,
        "bf16" | "bfloat16" => Kind::BFloat16,
        other => bail!("unknown dtype {other:?}; use f32 or bf16"),
    })
}
