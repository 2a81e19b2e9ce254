//! The one place a command's `--device` becomes a candle [`Device`]: `cpu`, `cuda` (GPU 0) or
//! `cuda:N`. Every stage receives the device from here; none chooses its own.

use anyhow::{Context, Result, bail};
use candle_core::Device;

/// Parses a `--device` value.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    let ordinal = match spec {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        s => match s.strip_prefix("cuda:") {
            Some(n) => n
                .parse::<usize>()
                .with_context(|| format!("--device {s}: the GPU index after cuda: must be a number"))?,
            None => bail!("--device {s}: expected cpu, cuda or cuda:N"),
        },
    };
    cuda(ordinal)
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).with_context(|| format!("--device cuda:{ordinal}: no usable GPU {ordinal}"))
}

#[cfg(not(feature = "cuda"))]
fn cuda(ordinal: usize) -> Result<Device> {
    bail!(
        "--device cuda:{ordinal}: this binary was built without CUDA; build it with `cargo build --release \
         --features cuda` (README, \"GPUs\")"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_names_the_flag_on_bad_values() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device(" cpu ").unwrap().is_cpu());
        let e = format!("{:#}", parse_device("gpu").unwrap_err());
        assert!(e.contains("--device gpu") && e.contains("cpu, cuda or cuda:N"), "{e}");
        let e = format!("{:#}", parse_device("cuda:x").unwrap_err());
        assert!(e.contains("must be a number"), "{e}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_build_it() {
        for spec in ["cuda", "cuda:1"] {
            let e = format!("{:#}", parse_device(spec).unwrap_err());
            assert!(e.contains("built without CUDA") && e.contains("--features cuda"), "{e}");
        }
    }
}
