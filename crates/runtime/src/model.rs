//! Loading an archive's model: a TorchScript module, or a `.pt2` package (see [`crate::aoti`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tch::IValue;

use crate::error::RuntimeError;
use crate::forward_thread::{ForwardThread, Pending};

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

/// A loaded model, whichever its format; on a GPU, with the thread that runs its forwards (see
/// [`crate::forward_thread`]).
#[derive(Debug)]
pub struct Model {
    format: Arc<Format>,
    thread: Option<ForwardThread>,
}

/// What a model file holds.
#[derive(Debug)]
enum Format {
    /// A TorchScript module.
    Script(tch::CModule),
    /// An AOTInductor package.
    Package(crate::aoti::Package),
}

impl Model {
    /// A model whose forwards run on the calling thread.
    fn here(format: Format) -> Self {
        Model {
            format: Arc::new(format),
            thread: None,
        }
    }

    /// A model whose forwards run on `threads` threads of its own, named after `name`.
    fn on_own_thread(format: Format, name: String, threads: usize) -> std::io::Result<Self> {
        let format = Arc::new(format);
        let there = Arc::clone(&format);
        let thread = ForwardThread::spawn(name, threads, move |args| there.forward(args))?;
        Ok(Model {
            format,
            thread: Some(thread),
        })
    }

    /// Whether this is an AOTInductor package.
    pub fn is_package(&self) -> bool {
        matches!(*self.format, Format::Package(_))
    }

    /// How long a package's first input's second dimension may be; None for TorchScript.
    pub fn length(&self) -> Option<crate::aoti::Length> {
        match &*self.format {
            Format::Script(_) => None,
            Format::Package(p) => Some(p.length()),
        }
    }

    /// The numbers of examples one forward takes, for a package; a TorchScript module takes any.
    pub fn batch_range(&self) -> Option<crate::aoti::BatchRange> {
        match &*self.format {
            Format::Script(_) => None,
            Format::Package(p) => Some(p.batch_range()),
        }
    }

    /// How many examples one forward of a package exported as `forward(images: list[Tensor])`
    /// takes; `None` for a TorchScript module, which takes lists of any length, and for a
    /// package that takes tensors.
    pub fn list_len(&self) -> Option<usize> {
        match &*self.format {
            Format::Script(_) => None,
            Format::Package(p) => p.list_len(),
        }
    }

    /// How many tensors a package's `forward` takes, where it says; `None` for TorchScript.
    pub fn input_count(&self) -> Option<usize> {
        match &*self.format {
            Format::Script(_) => None,
            Format::Package(p) => p.input_count(),
        }
    }

    /// `forward(args)`, on the model's forward thread where it has one. A package takes
    /// tensors, or one list of them, and answers what its `forward` returned.
    pub fn forward_is(&self, args: &[IValue]) -> Result<IValue, tch::TchError> {
        match &self.thread {
            Some(thread) => thread.forward(args),
            None => self.format.forward(args),
        }
    }

    /// Starts `forward(args)` on the model's forward thread and returns without waiting for it;
    /// a model without one runs it here first. The forward thread moves the tensors of `args`
    /// that are not on `device` there first; a model without one takes them where they are.
    pub(crate) fn submit(&self, args: Vec<IValue>, device: tch::Device) -> Pending {
        match &self.thread {
            Some(thread) => thread.submit(args, device),
            None => Pending::ready(self.format.forward(&args)),
        }
    }

    /// Whether a batch handed to [`Model::submit`] may stay on the host: the model's forward
    /// thread moves it to the device.
    pub(crate) fn uploads_its_inputs(&self) -> bool {
        self.thread.is_some()
    }

    /// `forward(args)` on the calling thread, whatever the model's device: the in-process
    /// ceiling measures the device without the hop to the forward thread.
    pub fn forward_on_this_thread(&self, args: &[IValue]) -> Result<IValue, tch::TchError> {
        self.format.forward(args)
    }
}

impl Format {
    fn forward(&self, args: &[IValue]) -> Result<IValue, tch::TchError> {
        match self {
            Format::Script(m) => m.forward_is(args),
            Format::Package(p) => {
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
/// package by its extension, anything else as TorchScript. On a GPU its forwards run on
/// `forward_threads` threads of its own (see [`crate::forward_thread`]).
pub fn load_module(
    model_dir: &Path,
    file: &str,
    device: tch::Device,
    forward_threads: usize,
) -> Result<Model, RuntimeError> {
    let path: PathBuf = model_dir.join(file);
    let is_package = Path::new(file)
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case(crate::aoti::EXTENSION));
    let format = if is_package {
        // On the CPU a runner per core, so that the workers sharing the package can all run it
        // at once; on a GPU one per forward thread, its only callers.
        let runners = match device {
            tch::Device::Cpu => std::thread::available_parallelism().map_or(1, |n| n.get().min(8)),
            _ => forward_threads.max(1),
        };
        crate::aoti::Package::load(&path, device, runners)
            .map(Format::Package)
            .map_err(|message| RuntimeError::Package {
                file: file.to_string(),
                message,
            })?
    } else {
        Format::Script(load_script(&path, file, device)?)
    };
    match device {
        tch::Device::Cuda(i) => {
            Model::on_own_thread(format, format!("forward-cuda{i}"), forward_threads).map_err(
                |source| RuntimeError::Thread {
                    file: file.to_string(),
                    source,
                },
            )
        }
        _ => Ok(Model::here(format)),
    }
}

fn load_script(path: &Path, file: &str, device: tch::Device) -> Result<tch::CModule, RuntimeError> {
    // Scripted torchvision detectors call torchvision's operators, registered by this object.
    std::hint::black_box(vision_ops_version());
    let mut module =
        tch::CModule::load_on_device(path, device).map_err(|error| RuntimeError::Torch {
            file: file.to_string(),
            error,
        })?;
    module.f_set_eval().map_err(|error| RuntimeError::Torch {
        file: file.to_string(),
        error,
    })?;
    Ok(module)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The TorchScript module in `path`, on the CPU, with its forwards on a thread of their
    /// own named "forward-worker" (the worker tests count them), as a GPU model's are.
    pub(crate) fn on_own_thread(path: &Path) -> Result<Model, RuntimeError> {
        let format = Format::Script(load_script(path, "model.pt", tch::Device::Cpu)?);
        Ok(Model::on_own_thread(format, "forward-worker".into(), 1).expect("a thread"))
    }

    /// A TorchScript module made here by tracing `x @ w + 1`, with `w` a constant (3x2).
    pub(crate) fn traced() -> tch::CModule {
        let w = tch::Tensor::from_slice(&[1.0f32, -2.0, 0.5, 3.0, 4.0, -1.0]).view([3, 2]);
        let x = tch::Tensor::ones([1, 3], (tch::Kind::Float, tch::Device::Cpu));
        tch::CModule::create_by_tracing("Affine", "forward", &[x], &mut |xs| {
            vec![xs[0].matmul(&w) + 1.0]
        })
        .unwrap()
    }

    #[test]
    fn a_model_on_its_own_thread_answers_as_one_run_here() {
        let here = Model::here(Format::Script(traced()));
        let there =
            Model::on_own_thread(Format::Script(traced()), "forward-test".into(), 1).unwrap();
        let x = tch::Tensor::from_slice(&[0.5f32, 1.0, -1.5, 2.0, 0.0, 1.0]).view([2, 3]);
        let out = |m: &Model| match m.forward_is(&[IValue::Tensor(x.shallow_clone())]) {
            Ok(IValue::Tensor(t)) => Vec::<f32>::try_from(t.flatten(0, -1)).unwrap(),
            other => panic!("{other:?}"),
        };
        assert_eq!(out(&here), [-4.0, 4.5, 7.0, -4.0]);
        assert_eq!(out(&there), out(&here));
        match there.forward_on_this_thread(&[IValue::Tensor(x.shallow_clone())]) {
            Ok(IValue::Tensor(t)) => assert_eq!(t.size(), [2, 2]),
            other => panic!("{other:?}"),
        }
        // libtorch's errors come back as errors, and the thread serves on.
        let wrong = tch::Tensor::ones([2, 5], (tch::Kind::Float, tch::Device::Cpu));
        assert!(there.forward_is(&[IValue::Tensor(wrong)]).is_err());
        assert_eq!(out(&there), [-4.0, 4.5, 7.0, -4.0]);
    }
}
