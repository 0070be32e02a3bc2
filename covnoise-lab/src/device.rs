//! Which burn device a run trains on, from its command-line name.
//!
//! The default is burn's `flex` CPU backend. The `wgpu` and `cuda` cargo
//! features add GPU devices; a name whose feature was not built is refused
//! with the cargo command that builds it.

use burn::tensor::Device;

use covnoise::error::{CovnoiseError, Result};

/// The names `--device` accepts.
pub const DEVICE_NAMES: &str =
    "cpu, ndarray, wgpu, wgpu-cpu (a software Vulkan adapter such as lavapipe), cuda, cuda:N";

/// The device named `spec`: `cpu`, `wgpu` (the best adapter wgpu finds),
/// `wgpu-cpu` (wgpu's CPU adapter, named explicitly because wgpu never
/// picks a software adapter by itself), `cuda` or `cuda:N`, or `ndarray`
/// (burn's ndarray CPU backend, with OpenBLAS in a build with `openblas`).
pub fn parse_device(spec: &str) -> Result<Device> {
    let unknown = || CovnoiseError::InvalidSetting {
        name: "device",
        value: spec.to_string(),
        reason: "is not a device name (cpu, ndarray, libtorch, wgpu, wgpu-cpu, cuda, cuda:N)",
    };
    let (kind, index) = match spec.split_once(':') {
        Some((k, i)) => (k, Some(i.parse::<usize>().map_err(|_| unknown())?)),
        None => (spec, None),
    };
    match (kind, index) {
        ("cpu", None) => Ok(Device::flex()),
        ("ndarray", None) => ndarray(),
        ("libtorch", None) => libtorch(),
        ("wgpu", None) | ("wgpu-cpu", None) => wgpu(kind == "wgpu-cpu"),
        ("cuda", i) => cuda(i.unwrap_or(0)),
        _ => Err(unknown()),
    }
}

#[cfg(feature = "wgpu")]
fn wgpu(software: bool) -> Result<Device> {
    use burn::tensor::DeviceKind;
    Ok(Device::wgpu(if software {
        DeviceKind::Cpu
    } else {
        DeviceKind::DefaultDevice
    }))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu(_software: bool) -> Result<Device> {
    Err(not_built("wgpu"))
}

#[cfg(feature = "cuda")]
fn cuda(index: usize) -> Result<Device> {
    Ok(Device::cuda(index))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_index: usize) -> Result<Device> {
    Err(not_built("cuda"))
}

// burn 0.22 deprecates its ndarray backend in favour of flex; it stays here
// as the BLAS-backed alternative the bench compares against (RESULTS 5).
#[cfg(feature = "ndarray")]
#[allow(deprecated)]
fn ndarray() -> Result<Device> {
    Ok(Device::ndarray())
}

#[cfg(not(feature = "ndarray"))]
fn ndarray() -> Result<Device> {
    Err(not_built("ndarray"))
}

// burn 0.22 deprecates its LibTorch backend; it stays here because it runs
// conv nets 1.4-2.7x faster than flex on the CPU (RESULTS.md section 5).
#[cfg(feature = "tch")]
#[allow(deprecated)]
fn libtorch() -> Result<Device> {
    Ok(Device::libtorch())
}

#[cfg(not(feature = "tch"))]
fn libtorch() -> Result<Device> {
    Err(not_built("tch"))
}

#[cfg(any(
    not(feature = "wgpu"),
    not(feature = "cuda"),
    not(feature = "ndarray"),
    not(feature = "tch")
))]
fn not_built(feature: &str) -> CovnoiseError {
    CovnoiseError::Unsupported(format!(
        "this covnoise was built without the {feature} device: build it with `cargo build --release -p covnoise-lab --features {feature}`"
    ))
}

/// Total memory of this machine in bytes (`MemTotal` of /proc/meminfo; None
/// where that cannot be read).
pub fn host_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_or_are_refused() {
        assert!(parse_device("cpu").is_ok());
        for bad in ["gpu", "cpu:1", "cuda:x", ""] {
            assert!(
                matches!(parse_device(bad), Err(CovnoiseError::InvalidSetting { .. })),
                "{bad}"
            );
        }
        #[cfg(not(feature = "cuda"))]
        assert!(
            matches!(parse_device("cuda:1"), Err(CovnoiseError::Unsupported(m)) if m.contains("--features cuda"))
        );
    }
}
