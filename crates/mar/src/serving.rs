//! What an archive asks a server to run: its handler, resolved to a manifest, and its model file.

use std::io::Read;
use std::path::Path;

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
    if let Some(twin) = handler::twin_manifest_name(name)
        && archive.contains(&twin)
    {
        let bytes = archive.read_file(&twin)?;
        return HandlerManifest::parse(&twin, &bytes);
    }
    // A name with no file behind it is a misspelt built-in more often than Python code.
    let code = name.ends_with(".py") || name.contains(':') || archive.read_file(name).is_ok();
    let what = if code {
        format!("handler {name} is Python code, which tchserve cannot run.")
    } else {
        format!("handler {name} is neither a built-in handler nor a file in the archive.")
    };
    let twin = handler::twin_manifest_name(name)
        .filter(|_| code)
        .map(|t| format!(", or pack a handler manifest {t} beside it (--extra-files {t})"))
        .unwrap_or_default();
    Err(MarError::Unservable(format!(
        "{what} Use a built-in handler ({}) or a handler manifest (.json){twin}; see \
         docs/handlers.md",
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
            "{file} is an eager-mode state_dict; {EXPORT_IT}"
        )));
    }
    if !archive.contains(file) {
        return Err(MarError::Unservable(format!(
            "the serialized file {file} is not in the archive"
        )));
    }
    Ok(file.to_string())
}

/// What to tell a user whose serialized file is not TorchScript.
const EXPORT_IT: &str = "tchserve serves TorchScript: save the model with \
    torch.jit.script(model).save(\"model.pt\") or torch.jit.trace(model, example).save(\"model.pt\") \
    and archive that (see docs/migrating.md)";

/// Checks that `path`, an archive's serialized file as unpacked, is TorchScript, and says what it
/// is when it is plainly something else: a file of `torch.save` (a state_dict or a pickled
/// module; what an eager-mode archive, one with a model file, holds), which libtorch would
/// refuse as a "corrupted checkpoint". Only the zip's directory is read. A `.pt2` package, a
/// file that cannot be read and anything not recognised pass, for the loader to judge.
pub fn check_torchscript(path: &Path, eager: bool) -> Result<()> {
    let is_package = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("pt2"));
    if is_package {
        return Ok(());
    }
    let Ok(mut file) = std::fs::File::open(path) else {
        return Ok(());
    };
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    // TorchServe loads the weights of an archive with a model file into that Python class.
    let what = if eager {
        "the weights of an eager-mode archive, for its Python model file"
    } else {
        "a state_dict or a pickled module"
    };
    let mut head = [0u8; 2];
    let is_zip = file.read_exact(&mut head).is_ok() && head == *b"PK";
    if !is_zip {
        // torch.save before PyTorch 1.6, or with _use_new_zipfile_serialization=False, writes a
        // pickle: protocol 2 or later starts with 0x80 and the protocol's number.
        if head[0] == 0x80 && (2..=5).contains(&head[1]) {
            return Err(MarError::Unservable(format!(
                "{name} is a pickle written by torch.save ({what}), not TorchScript; {EXPORT_IT}"
            )));
        }
        return Ok(());
    }
    let Ok(zip) = zip::ZipArchive::new(std::io::BufReader::new(file)) else {
        return Ok(());
    };
    // Both formats are zips of one folder; TorchScript's alone holds the module's constants.
    let holds = |leaf: &[u8]| {
        zip.file_names_raw()
            .any(|n| n.rsplit(|b| *b == b'/').next() == Some(leaf))
    };
    if holds(b"data.pkl") && !holds(b"constants.pkl") {
        return Err(MarError::Unservable(format!(
            "{name} was written by torch.save ({what}), not as TorchScript; {EXPORT_IT}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// A zip of one folder holding `entries`, as torch.save and torch.jit.save write them.
    fn zip_of(dir: &Path, file: &str, entries: &[&str]) -> std::path::PathBuf {
        let path = dir.join(file);
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        for e in entries {
            zip.start_file(
                format!("model/{e}"),
                zip::write::SimpleFileOptions::default(),
            )
            .unwrap();
            zip.write_all(b"x").unwrap();
        }
        zip.finish().unwrap();
        path
    }

    #[test]
    fn files_of_torch_save_are_told_apart_from_torchscript() {
        let dir = tempfile::tempdir().unwrap();
        let script = zip_of(
            dir.path(),
            "script.pt",
            &["data.pkl", "constants.pkl", "code/__torch__.py", "data/0"],
        );
        assert!(check_torchscript(&script, false).is_ok());
        let saved = zip_of(
            dir.path(),
            "weights.pt",
            &["data.pkl", "byteorder", "data/0"],
        );
        let e = check_torchscript(&saved, true).unwrap_err().to_string();
        assert!(e.contains("weights.pt was written by torch.save"), "{e}");
        assert!(e.contains("eager-mode archive"), "{e}");
        assert!(e.contains("torch.jit.script(model)"), "{e}");
        let e = check_torchscript(&saved, false).unwrap_err().to_string();
        assert!(e.contains("a state_dict or a pickled module"), "{e}");

        let legacy = dir.path().join("legacy.pt");
        std::fs::write(&legacy, [0x80, 0x02, 0x8a, 0x0a]).unwrap();
        let e = check_torchscript(&legacy, false).unwrap_err().to_string();
        assert!(
            e.contains("legacy.pt is a pickle written by torch.save"),
            "{e}"
        );

        // What it does not recognise is left to the loader.
        let other = dir.path().join("other.pt");
        std::fs::write(&other, b"not a model").unwrap();
        assert!(check_torchscript(&other, false).is_ok());
        let package = zip_of(dir.path(), "model.pt2", &["data.pkl"]);
        assert!(check_torchscript(&package, false).is_ok());
        assert!(check_torchscript(&dir.path().join("missing.pt"), false).is_ok());
    }
}
