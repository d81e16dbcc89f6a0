//! Pieces the benchmark binaries share.

pub mod http;

/// Loads the model file at `path` as the server loads an archive's model, on `device`.
pub fn load_model_file(
    path: &std::path::Path,
    device: tch::Device,
) -> anyhow::Result<tchserve_runtime::model::Model> {
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let file = path
        .file_name()
        .and_then(|f| f.to_str())
        .ok_or_else(|| anyhow::anyhow!("--model names no file"))?;
    Ok(tchserve_runtime::model::load_module(dir, file, device, 1)?)
}

/// The device a `--device` flag names (`cpu`, `cuda` or `cuda:N`), refused when this machine
/// has no such GPU.
pub fn parse_device(name: &str) -> anyhow::Result<tch::Device> {
    use tch::Device;
    use tchserve_runtime::device::{self, DevicePolicy};
    let device = match name.split_once(':') {
        None if name == "cpu" => return Ok(Device::Cpu),
        None if name == "cuda" => Device::Cuda(0),
        Some(("cuda", n)) => Device::Cuda(n.parse()?),
        _ => anyhow::bail!("--device {name}: expected cpu, cuda or cuda:N"),
    };
    let status = device::cuda(DevicePolicy::Auto);
    if let Device::Cuda(n) = device
        && n >= status.devices
    {
        anyhow::bail!(
            "--device {name}: this machine has {} GPU(s) ({})",
            status.devices,
            status.reason.as_deref().unwrap_or("")
        );
    }
    Ok(device)
}
