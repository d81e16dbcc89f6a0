//! Loading an archive's model: a TorchScript module, or a `.pt2` package (see [`crate::aoti`]).

use std::path::{Path, PathBuf};

use tch::IValue;

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

/// A loaded model, whichever its format.
#[derive(Debug)]
pub enum Model {
    /// A TorchScript module.
    Script(tch::CModule),
    /// An AOTInductor package.
    Package(crate::aoti::Package),
}

impl Model {
    /// Whether this is an AOTInductor package.
    pub fn is_package(&self) -> bool {
        matches!(self, Model::Package(_))
    }

    /// The numbers of examples one forward takes, for a package; a TorchScript module takes any.
    pub fn batch_range(&self) -> Option<crate::aoti::BatchRange> {
        match self {
            Model::Script(_) => None,
            Model::Package(p) => Some(p.batch_range()),
        }
    }

    /// How many examples one forward of a package exported as `forward(images: list[Tensor])`
    /// takes; `None` for a TorchScript module, which takes lists of any length, and for a
    /// package that takes tensors.
    pub fn list_len(&self) -> Option<usize> {
        match self {
            Model::Script(_) => None,
            Model::Package(p) => p.list_len(),
        }
    }

    /// `forward(args)`. A package takes tensors, or one list of them, and answers what its
    /// `forward` returned.
    pub fn forward_is(&self, args: &[IValue]) -> Result<IValue, tch::TchError> {
        match self {
            Model::Script(m) => m.forward_is(args),
            Model::Package(p) => {
                if let [IValue::TensorList(items)] = args {
                    return Ok(p.shape_outputs(p.run_list(items)?));
                }
                let tensors = args
                    .iter()
                    .map(|a| match a {
                        IValue::Tensor(t) => Ok(t),
                        _ => Err(tch::TchError::Kind(
                            "a .pt2 model takes tensors, or one list of them".into(),
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(p.shape_outputs(p.run(&tensors)?))
            }
        }
    }
}

/// Loads the model in `file` of an unpacked archive onto `device`, in inference mode: a `.pt2`
/// package by its extension, anything else as TorchScript.
pub fn load_module(
    model_dir: &Path,
    file: &str,
    device: tch::Device,
) -> Result<Model, RuntimeError> {
    let path: PathBuf = model_dir.join(file);
    let is_package = Path::new(file)
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case(crate::aoti::EXTENSION));
    if is_package {
        // A runner per core: the workers that share the package can all run it at once.
        let runners = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        return crate::aoti::Package::load(&path, device, runners)
            .map(Model::Package)
            .map_err(|message| RuntimeError::Package {
                file: file.to_string(),
                message,
            });
    }
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
    Ok(Model::Script(module))
}
