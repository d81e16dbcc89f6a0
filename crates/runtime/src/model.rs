//! Loading an archive's TorchScript module and handler.

use std::path::{Path, PathBuf};

use tchserve_mar::handler::{self, HandlerManifest};
use tchserve_mar::{Archive, RuntimeType};

use crate::error::RuntimeError;

/// The handler an archive asks for, resolved: a built-in or a manifest inside the archive.
pub fn resolve_handler(
    archive: &Archive,
    override_name: Option<&str>,
) -> Result<HandlerManifest, RuntimeError> {
    let manifest = archive.manifest();
    let name = override_name
        .or(manifest.model.handler.as_deref())
        .filter(|h| !h.is_empty())
        .ok_or_else(|| RuntimeError::UnsupportedHandler("the archive names no handler".into()))?;
    if manifest.runtime == RuntimeType::Lsp {
        return Err(RuntimeError::UnsupportedHandler(format!(
            "handler {name} is for TorchServe's C++ backend (runtime LSP); tchserve runs built-in \
             handlers and handler manifests (.json)"
        )));
    }
    // TorchServe's own handler modules (`ts/torch_handler/image_classifier.py:handle`) are the
    // built-ins of the same name.
    let builtin = handler::builtin(name)
        .or_else(|| handler::torchserve_module(name).and_then(handler::builtin));
    if let Some(builtin) = builtin {
        return Ok(builtin);
    }
    if name.ends_with(".json") {
        let bytes = archive.read_file(name)?;
        return Ok(HandlerManifest::parse(name, &bytes)?);
    }
    Err(RuntimeError::UnsupportedHandler(format!(
        "handler {name} is Python code, which tchserve cannot run. Use a built-in handler ({}) or \
         a handler manifest (.json); see docs/handlers.md",
        handler::BUILTIN_HANDLERS.map(|(n, _)| n).join(", ")
    )))
}

/// The archive's TorchScript file, checked to be present.
pub fn serialized_file(archive: &Archive) -> Result<String, RuntimeError> {
    let model = &archive.manifest().model;
    let Some(file) = model.serialized_file.as_deref().filter(|f| !f.is_empty()) else {
        return Err(RuntimeError::NoModel(
            "the archive names no serialized file".into(),
        ));
    };
    if model.model_file.is_some() && !file.ends_with(".pt") {
        return Err(RuntimeError::NoModel(format!(
            "{file} is an eager-mode state_dict; tchserve serves TorchScript: save the model with \
             torch.jit.script(model).save(\"model.pt\") or torch.jit.trace and archive that"
        )));
    }
    if !archive.contains(file) {
        return Err(RuntimeError::NoModel(format!(
            "the serialized file {file} is not in the archive"
        )));
    }
    Ok(file.to_string())
}

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
