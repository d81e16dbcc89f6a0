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
    Ok(tchserve_runtime::model::load_module(dir, file, device)?)
}
