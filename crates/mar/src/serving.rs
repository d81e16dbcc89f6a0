//! What an archive asks a server to run: its handler, resolved to a manifest, and its model file.

use crate::error::{MarError, Result};
use crate::handler::{self, HandlerManifest};
use crate::{Archive, RuntimeType};

/// The handler an archive asks for (or `override_name`), resolved: a built-in, TorchServe's
/// module of the same name, or a manifest inside the archive.
pub fn resolve_handler(archive: &Archive, override_name: Option<&str>) -> Result<HandlerManifest> {
    let manifest = archive.manifest();
    let name = override_name
        .or(manifest.model.handler.as_deref())
        .filter(|h| !h.is_empty())
        .ok_or_else(|| MarError::Unservable("the archive names no handler".into()))?;
    if manifest.runtime == RuntimeType::Lsp {
        return Err(MarError::Unservable(format!(
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
        return HandlerManifest::parse(name, &bytes);
    }
    // A name with no file behind it is a misspelt built-in more often than Python code.
    let what = if name.ends_with(".py") || name.contains(':') || archive.read_file(name).is_ok() {
        format!("handler {name} is Python code, which tchserve cannot run.")
    } else {
        format!("handler {name} is neither a built-in handler nor a file in the archive.")
    };
    Err(MarError::Unservable(format!(
        "{what} Use a built-in handler ({}) or a handler manifest (.json); see docs/handlers.md",
        handler::BUILTIN_HANDLERS.map(|(n, _)| n).join(", ")
    )))
}

/// The archive's TorchScript file, checked to be present.
pub fn serialized_file(archive: &Archive) -> Result<String> {
    let model = &archive.manifest().model;
    let Some(file) = model.serialized_file.as_deref().filter(|f| !f.is_empty()) else {
        return Err(MarError::Unservable(
            "the archive names no serialized file".into(),
        ));
    };
    if model.model_file.is_some() && !file.ends_with(".pt") {
        return Err(MarError::Unservable(format!(
            "{file} is an eager-mode state_dict; tchserve serves TorchScript: save the model with \
             torch.jit.script(model).save(\"model.pt\") or torch.jit.trace and archive that"
        )));
    }
    if !archive.contains(file) {
        return Err(MarError::Unservable(format!(
            "the serialized file {file} is not in the archive"
        )));
    }
    Ok(file.to_string())
}
