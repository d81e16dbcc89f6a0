//! `.pt2` packages: models exported with `torch.export` and compiled ahead of time by
//! AOTInductor (`torch._inductor.aoti_compile_and_package`), run through libtorch's
//! `AOTIModelPackageLoader` by the C functions of `csrc/aoti.cpp`.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::Path;
use std::ptr::NonNull;

use tch::Tensor;

unsafe extern "C" {
    fn tchserve_aoti_metadata(
        path: *const c_char,
        key: *const c_char,
        err: *mut *mut c_char,
    ) -> *mut c_char;
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

/// A package's metadata value for `key`: `Ok(None)` when it has none.
pub fn metadata(path: &Path, key: &str) -> Result<Option<String>, String> {
    let path = c_path(path)?;
    let key = CString::new(key).map_err(|_| "a key with a NUL byte".to_string())?;
    let mut err = std::ptr::null_mut();
    // SAFETY: both strings outlive the call; err receives a message or stays null.
    let value = unsafe { tchserve_aoti_metadata(path.as_ptr(), key.as_ptr(), &mut err) };
    if value.is_null() {
        return if err.is_null() {
            Ok(None)
        } else {
            Err(take_message(err))
        };
    }
    Ok(Some(take_message(value)))
}

/// The most examples one forward of a package may hold, read from the input checks that
/// AOTInductor writes into the package's generated source (`*.wrapper.cpp`): the upper bound of
/// a dynamic first dimension, or the size of a fixed one. `None` when the source states neither.
///
/// The compiled model only runs those checks when `AOTI_RUNTIME_CHECK_INPUTS` is set, and then
/// also refuses a batch of 1 for a dimension exported with `min=1` (its lower bound reads 2), so
/// the server reads the bound and holds to it itself.
pub fn max_batch(path: &Path) -> Result<Option<i64>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| format!("not a .pt2 package: {e}"))?;
    let wrapper = zip
        .file_names()
        .filter_map(Result::ok)
        .find(|n| n.ends_with(".wrapper.cpp"))
        .map(|n| n.into_owned());
    let Some(name) = wrapper else {
        return Ok(None);
    };
    let mut source = String::new();
    std::io::Read::read_to_string(
        &mut zip.by_name(&name).map_err(|e| format!("{name}: {e}"))?,
        &mut source,
    )
    .map_err(|e| format!("{name}: {e}"))?;
    Ok(bound_in_source(&source))
}

/// The first input's batch bound in generated source: see [`max_batch`].
fn bound_in_source(source: &str) -> Option<i64> {
    let number_after = |marker: &str, lead: &str| {
        let rest = &source[source.find(marker)? + marker.len()..];
        let rest = &rest[rest.find(lead)? + lead.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    number_after(
        "input_handles[0]: dim value is too large at 0, ",
        "expected to be <= ",
    )
    .or_else(|| number_after("input_handles[0]: unmatched dim value at 0, ", "expected: "))
}

/// A loaded package.
#[derive(Debug)]
pub struct Package {
    handle: NonNull<c_void>,
    /// The most examples one forward may hold (see [`max_batch`]).
    max_batch: Option<i64>,
}

// SAFETY: the loader's runners are taken from a pool under its own lock, so `run` may be called
// from several threads at once; nothing else mutates it after loading.
unsafe impl Send for Package {}
// SAFETY: as above.
unsafe impl Sync for Package {}

impl Package {
    /// Loads the package at `path` for `device`. A package is compiled for one kind of device,
    /// written in its metadata: one for the other kind is refused before any of its code loads.
    /// `runners` model instances let that many threads run it at once.
    pub fn load(path: &Path, device: tch::Device, runners: usize) -> Result<Self, String> {
        let kind = metadata(path, "AOTI_DEVICE_KEY")?.ok_or_else(|| {
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
        let max_batch = max_batch(path)?;
        let path = c_path(path)?;
        let mut err = std::ptr::null_mut();
        // SAFETY: the path outlives the call; err receives a message or stays null.
        let handle =
            unsafe { tchserve_aoti_load(path.as_ptr(), index, runners.max(1) as c_int, &mut err) };
        NonNull::new(handle)
            .map(|handle| Package { handle, max_batch })
            .ok_or_else(|| take_message(err))
    }

    /// Runs the model on `inputs`, giving its outputs. A first input with more examples than the
    /// package was compiled for is refused before it reaches the compiled code, as a shape error:
    /// the request's doing, not the model's, which the handler answers as bad input.
    pub fn run(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, tch::TchError> {
        if let (Some(max), Some(first)) = (self.max_batch, inputs.first()) {
            let rows = first.size().first().copied().unwrap_or(1);
            if rows > max {
                return Err(tch::TchError::Shape(format!(
                    "the model takes at most {max} examples per forward (its package was \
                     exported so); got {rows}"
                )));
            }
        }
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
            return Err(tch::TchError::Torch(take_message(err)));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_batch_bound_is_read_from_the_generated_checks() {
        let dynamic = r#"
            if (arg4_1_size[0] > 64) {
                ss << "input_handles[0]: dim value is too large at 0, "
                   << "expected to be <= 64, " << "but got: "
            if (784 != arg4_1_size[1]) {
                ss << "input_handles[0]: unmatched dim value at 1, "
                   << "expected: 784, " << "but got: " << arg4_1_size[1]"#;
        assert_eq!(bound_in_source(dynamic), Some(64));
        let fixed = r#"
                ss << "input_handles[0]: unmatched dim value at 0, "
                   << "expected: 1, " << "but got: " << arg0_1_size[0]
                ss << "input_handles[0]: unmatched dim value at 1, "
                   << "expected: 784, " << "but got: " << arg0_1_size[1]"#;
        assert_eq!(bound_in_source(fixed), Some(1));
        assert_eq!(bound_in_source("no checks at all"), None);
    }
}
