//! Loading an archive's TorchScript module.

use std::path::{Path, PathBuf};

use crate::error::RuntimeError;

unsafe extern "C" {
    /// Defined next to the torchvision operators in `csrc/vision_ops.cpp`.
    fn tchserve_vision_ops_version() -> libc::c_int;
}

/// Version of the built-in torchvision operators (`torchvision::nms`). Calling it also keeps
/// their registration linked into every binary that loads models.
pub fn vision_ops_version() -> i32 {
    // SAFETY: a plain C function with no arguments and no side effects.
    unsafe { tchserve_vision_ops_version() }
}

/// Loads a TorchScript module from an unpacked archive onto `device`, in inference mode.
pub fn load_module(
    model_dir: &Path,
    file: &str,
    device: tch::Device,
) -> Result<tch::CModule, RuntimeError> {
    let path: PathBuf = model_dir.join(file);
    // Scripted torchvision detectors call torchvision's operators, registered by this object.
    std::hint::black_box(vision_ops_version());
    let mut module =
        tch::CModule::load_on_device(&path, device).map_err(|source| RuntimeError::Torch {
            file: file.to_string(),
            source,
        })?;
    module.f_set_eval().map_err(|source| RuntimeError::Torch {
        file: file.to_string(),
        source,
    })?;
    Ok(module)
}
