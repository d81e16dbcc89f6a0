//! `.pt2` packages: models exported with `torch.export` and compiled ahead of time by
//! AOTInductor (`torch._inductor.aoti_compile_and_package`), run through libtorch's
//! `AOTIModelPackageLoader` by the C functions of `csrc/aoti.cpp`.

use std::collections::HashMap;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::Path;
use std::ptr::NonNull;

use tch::{IValue, Tensor};

mod batch_range;
mod machine;
mod tree;

pub use batch_range::{BatchRange, Length, batch_range, second_dim};
pub use tree::{IValueKey, Tree};

use batch_range::{Plan, plan, run_in_pieces};
use machine::check_machine;

unsafe extern "C" {
    fn tchserve_aoti_metadata(path: *const c_char, err: *mut *mut c_char) -> *mut c_char;
    fn tchserve_aoti_load(
        path: *const c_char,
        device_index: c_int,
        num_runners: c_int,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn tchserve_aoti_run(
        handle: *mut c_void,
        inputs: *const *mut c_void,
        n_inputs: c_int,
        outputs: *mut *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> c_int;
    fn tchserve_aoti_call_spec(
        handle: *mut c_void,
        which: c_int,
        err: *mut *mut c_char,
    ) -> *mut c_char;
    fn tchserve_aoti_free(handle: *mut c_void);
    fn tchserve_aoti_free_outputs(outputs: *mut *mut c_void);
    fn tchserve_aoti_free_message(message: *mut c_char);
}

/// The file extension of a package.
pub const EXTENSION: &str = "pt2";

/// A message returned by the C side, freed here.
fn take_message(err: *mut c_char) -> String {
    if err.is_null() {
        return "unknown error".into();
    }
    // SAFETY: a non-null message is a NUL-terminated string malloc'd by csrc/aoti.cpp.
    let mut text = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    // libtorch appends where it raised the error and a stack of addresses: noise for a user.
    if let Some(cut) = text.find("\nException raised from") {
        text.truncate(cut);
    }
    // SAFETY: freed once, by the allocator that made it.
    unsafe { tchserve_aoti_free_message(err) };
    text
}

fn c_path(path: &Path) -> Result<CString, String> {
    CString::new(path.to_string_lossy().as_bytes())
        .map_err(|_| format!("{}: a path with a NUL byte", path.display()))
}

/// A package's metadata (`AOTI_DEVICE_KEY`, `AOTI_CPU_ISA`, ... and the exporter's own keys),
/// read without loading any of its code.
pub fn metadata(path: &Path) -> Result<HashMap<String, String>, String> {
    if is_exported_program(path) {
        return Err(
            "this .pt2 holds an exported program (torch.export.save), not a compiled \
             package: compile it with torch._inductor.aoti_compile_and_package(program, \
             package_path=...) and archive that"
                .into(),
        );
    }
    let path = c_path(path)?;
    let mut err = std::ptr::null_mut();
    // SAFETY: the path outlives the call; err receives a message or stays null.
    let lines = unsafe { tchserve_aoti_metadata(path.as_ptr(), &mut err) };
    if lines.is_null() {
        return Err(take_message(err));
    }
    Ok(take_message(lines)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// Whether the `.pt2` at `path` is an exported program (`torch.export.save`), which shares the
/// suffix and the zip layout: a serialized graph (`models/*.json`) and no compiled model
/// (`data/aotinductor/`).
fn is_exported_program(path: &Path) -> bool {
    let Ok(zip) = std::fs::File::open(path).map(zip::ZipArchive::new) else {
        return false;
    };
    let Ok(zip) = zip else {
        return false;
    };
    let names: Vec<String> = zip
        .file_names()
        .filter_map(Result::ok)
        .map(|n| n.into_owned())
        .collect();
    let graph = names
        .iter()
        .any(|n| n.contains("/models/") && n.ends_with(".json"));
    let compiled = names.iter().any(|n| n.contains("/data/aotinductor/"));
    graph && !compiled
}

/// A loaded package.
#[derive(Debug)]
pub struct Package {
    handle: NonNull<c_void>,
    /// The numbers of examples one forward takes.
    range: BatchRange,
    /// How long the first input's second dimension may be.
    length: Length,
    /// The structure of the outputs, where the package states one this side reads.
    outputs: Option<Tree>,
    /// How many tensors `forward` takes as its one list argument, for a model exported as
    /// `forward(images: list[Tensor])`; `None` for one that takes tensors.
    list_len: Option<usize>,
    /// How many tensors `forward` takes in all, where the input spec says.
    input_count: Option<usize>,
}

// SAFETY: the loader's runners are taken from a pool under its own lock, so `run` may be called
// from several threads at once; nothing else mutates it after loading.
unsafe impl Send for Package {}
// SAFETY: as above.
unsafe impl Sync for Package {}

/// A package's compiled model is a shared library unpacked under the temporary folder, which
/// the loader cannot map from a folder mounted `noexec` (Docker's `--tmpfs` by default): said
/// where the loader's words alone do not.
fn with_noexec_hint(message: String) -> String {
    if message.contains("failed to map segment from shared object") {
        format!(
            "{message} (the temporary folder the package is unpacked into, TMPDIR or /tmp, is \
             probably mounted noexec: give it one that allows running code, such as Docker's \
             --tmpfs /tmp:exec)"
        )
    } else {
        message
    }
}

impl Package {
    /// Loads the package at `path` for `device`. A package is compiled for one kind of device,
    /// written in its metadata: one for the other kind is refused before any of its code loads.
    /// `runners` model instances let that many threads run it at once.
    pub fn load(path: &Path, device: tch::Device, runners: usize) -> Result<Self, String> {
        let meta = metadata(path)?;
        let kind = meta.get("AOTI_DEVICE_KEY").ok_or_else(|| {
            "the package does not say which device it was compiled for".to_string()
        })?;
        let (wanted, index) = match device {
            tch::Device::Cpu => ("cpu", -1),
            tch::Device::Cuda(i) => ("cuda", i as c_int),
            other => return Err(format!("{other:?} is not a device .pt2 packages run on")),
        };
        if kind != wanted {
            return Err(format!(
                "the package was compiled for {kind} and this worker runs on {wanted}: \
                 export and compile it again for {wanted}"
            ));
        }
        check_machine(&meta)?;
        let range = batch_range(path)?;
        let length = second_dim(path)?;
        let path = c_path(path)?;
        let mut err = std::ptr::null_mut();
        // SAFETY: the path outlives the call; err receives a message or stays null.
        let handle =
            unsafe { tchserve_aoti_load(path.as_ptr(), index, runners.max(1) as c_int, &mut err) };
        let handle = NonNull::new(handle).ok_or_else(|| with_noexec_hint(take_message(err)))?;
        let spec = |which: c_int| {
            let mut err = std::ptr::null_mut();
            // SAFETY: the handle is live; the spec is a new string this side frees.
            let spec = unsafe { tchserve_aoti_call_spec(handle.as_ptr(), which, &mut err) };
            if spec.is_null() {
                tracing::warn!(
                    "{}: no call spec {which}: {}",
                    path.to_string_lossy(),
                    take_message(err)
                );
                None
            } else {
                Tree::parse(&take_message(spec))
            }
        };
        let inputs = spec(0);
        let list_len = inputs.as_ref().and_then(Tree::first_argument_list);
        let input_count = inputs.as_ref().map(Tree::leaves);
        let outputs = spec(1);
        Ok(Package {
            handle,
            // A list's tensors are examples, whatever their sizes; the generated checks speak
            // of the first one's channels.
            range: list_len.map_or(range, |n| BatchRange {
                min: n as i64,
                max: Some(n as i64),
            }),
            outputs,
            list_len,
            input_count,
            length,
        })
    }

    /// How many tensors `forward` takes, where the package's input spec says.
    pub fn input_count(&self) -> Option<usize> {
        self.input_count
    }

    /// How long the first input's second dimension may be (a text model's token count).
    pub fn length(&self) -> Length {
        self.length
    }

    /// How many tensors `forward` takes as one list, for a package exported as
    /// `forward(images: list[Tensor])`; `None` for one that takes tensors.
    pub fn list_len(&self) -> Option<usize> {
        self.list_len
    }

    /// Runs a package that takes a list (see [`Package::list_len`]) on `items`: a shorter list is
    /// padded with copies of its last item, whose answers stay in the output for the caller to
    /// drop, and a longer one is refused.
    pub fn run_list(&self, items: &[Tensor]) -> Result<Vec<Tensor>, tch::TchError> {
        let Some(n) = self.list_len else {
            return Err(tch::TchError::Kind(
                "this .pt2 model takes tensors, and the handler feeds it a list".into(),
            ));
        };
        let Some(last) = items.last() else {
            return Err(tch::TchError::Shape("an empty list of inputs".into()));
        };
        if items.len() > n {
            return Err(tch::TchError::Shape(format!(
                "the model takes a list of {n} per forward (its package was exported so); got {}",
                items.len()
            )));
        }
        let padded: Vec<&Tensor> = items
            .iter()
            .chain(std::iter::repeat_n(last, n - items.len()))
            .collect();
        self.run_as_is(&padded)
    }

    /// The package's outputs as the model's `forward` returned them: one tensor, or a tuple or
    /// dict of them. Without a spec it knows, one tensor stays one and several make a tuple.
    pub fn shape_outputs(&self, mut outputs: Vec<Tensor>) -> IValue {
        match &self.outputs {
            Some(tree) if tree.leaves() == outputs.len() => tree.rebuild(&mut outputs.into_iter()),
            _ if outputs.len() == 1 => IValue::Tensor(outputs.remove(0)),
            _ => IValue::Tuple(outputs.into_iter().map(IValue::Tensor).collect()),
        }
    }

    /// The numbers of examples one forward takes.
    pub fn batch_range(&self) -> BatchRange {
        self.range
    }

    /// Runs the model on `inputs`, giving its outputs. A batch the package was not exported for
    /// is fitted to it: padded up to its lower bound, or run in pieces of its fixed size. One
    /// with more examples than its upper bound is refused before it reaches the compiled code.
    /// Either that, or an input whose sizes the package's own checks refuse, is a shape error:
    /// the request's doing, not the model's, which the handler answers as bad input.
    pub fn run(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, tch::TchError> {
        if let Some(n) = self.list_len {
            return Err(tch::TchError::Kind(format!(
                "this .pt2 model takes a list of {n} tensors, and the handler feeds it tensors: \
                 use a handler with \"feed\": \"list\""
            )));
        }
        // Without inputs there is nothing to fit: the package's own count check answers.
        let Some(rows) = inputs.first().and_then(|t| t.size().first().copied()) else {
            return self.run_as_is(inputs);
        };
        match plan(self.range, rows) {
            Plan::Whole => self.run_as_is(inputs),
            Plan::Pieces { piece, pieces } => {
                run_in_pieces(inputs, piece, pieces, |part| self.run_as_is(part))
            }
            Plan::TooMany { max } => Err(tch::TchError::Shape(format!(
                "the model takes at most {max} examples per forward (its package was exported \
                 so); got {rows}"
            ))),
        }
    }

    fn run_as_is(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, tch::TchError> {
        // The package checks strides as exported, which is contiguous for the tensors handlers
        // make; a copy is only made for one that is not.
        let inputs: Vec<Tensor> = inputs.iter().map(|t| t.contiguous()).collect();
        // Tensors cross as `at::Tensor*`, tch's own representation.
        let ptrs: Vec<*mut c_void> = inputs.iter().map(|t| t.as_ptr() as *mut c_void).collect();
        let mut outputs = std::ptr::null_mut();
        let mut err = std::ptr::null_mut();
        // SAFETY: the handle is live; the inputs are borrowed for the call and only read; on
        // success `outputs` holds `n` new tensors that this side now owns.
        let n = unsafe {
            tchserve_aoti_run(
                self.handle.as_ptr(),
                ptrs.as_ptr(),
                ptrs.len() as c_int,
                &mut outputs,
                &mut err,
            )
        };
        if n < 0 {
            let message = take_message(err);
            // The package's own input checks name the input as `input_handles[i]`. Sizes come
            // from the request; a dtype, stride or device the package refuses comes from the
            // handler, which is the server's doing.
            return Err(match message.strip_prefix("input_handles[") {
                Some(rest) => {
                    let what = format!(
                        "the input does not fit the model's package: input {}",
                        rest.replacen(']', "", 1).trim_end()
                    );
                    if rest.contains("dim value") {
                        tch::TchError::Shape(what)
                    } else {
                        tch::TchError::Torch(what)
                    }
                }
                None => tch::TchError::Torch(message),
            });
        }
        let tensors = (0..n as usize)
            // SAFETY: each pointer is an `at::Tensor*` from `new`, taken over once.
            .map(|i| unsafe { Tensor::from_ptr((*outputs.add(i)).cast()) })
            .collect();
        // SAFETY: the array itself, malloc'd by the C side; its tensors are owned above.
        unsafe { tchserve_aoti_free_outputs(outputs) };
        Ok(tensors)
    }
}

impl Drop for Package {
    fn drop(&mut self) {
        // SAFETY: the handle came from tchserve_aoti_load and is freed once.
        unsafe { tchserve_aoti_free(self.handle.as_ptr()) };
    }
}
