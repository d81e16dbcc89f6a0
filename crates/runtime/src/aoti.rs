//! `.pt2` packages: models exported with `torch.export` and compiled ahead of time by
//! AOTInductor (`torch._inductor.aoti_compile_and_package`), run through libtorch's
//! `AOTIModelPackageLoader` by the C functions of `csrc/aoti.cpp`.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::Path;
use std::ptr::NonNull;

use tch::{IValue, Tensor};

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
    fn tchserve_aoti_out_spec(handle: *mut c_void, err: *mut *mut c_char) -> *mut c_char;
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

/// The CPU features a package's vector ISA (its `AOTI_CPU_ISA` metadata, as inductor names it)
/// needs, as `/proc/cpuinfo` names them.
fn isa_features(isa: &str) -> Option<&'static [&'static str]> {
    Some(match isa {
        "AVX2" => &["avx2", "fma", "f16c"],
        "AVX512" => &["avx512f", "avx512dq", "avx512vl", "avx512bw", "fma"],
        "AVX512_VNNI" => &["avx512_vnni"],
        "AMX_TILE" => &["amx_tile", "amx_bf16", "amx_int8"],
        "NEON" | "ASIMD" => &["asimd"],
        _ => return None,
    })
}

/// The features a package compiled for `isa` needs and `cpu_flags` lacks.
fn missing_features(isa: &str, cpu_flags: &[&str]) -> Vec<&'static str> {
    isa.split_whitespace()
        .filter_map(isa_features)
        .flatten()
        .filter(|f| !cpu_flags.contains(f))
        .copied()
        .collect()
}

/// This machine's CPU feature flags (x86's `flags`, Arm's `Features`); empty where unknown.
fn cpu_flags() -> Vec<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find(|l| l.starts_with("flags") || l.starts_with("Features"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, flags)| flags.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Refuses a package compiled for another kind of machine: its code would stop the whole
/// process with an illegal instruction at the first forward, not fail the one registration.
fn check_machine(path: &Path) -> Result<(), String> {
    let (os, arch) = (std::env::consts::OS, std::env::consts::ARCH);
    let platform = metadata(path, "AOTI_PLATFORM")?.unwrap_or_else(|| os.to_string());
    let machine = metadata(path, "AOTI_MACHINE")?.unwrap_or_else(|| arch.to_string());
    if platform != os || machine != arch {
        return Err(format!(
            "the package was compiled for {platform} {machine} and this machine is {os} {arch}: \
             compile it again on this kind of machine"
        ));
    }
    let isa = metadata(path, "AOTI_CPU_ISA")?.unwrap_or_default();
    let flags = cpu_flags();
    if flags.is_empty() {
        return Ok(());
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let missing = missing_features(&isa, &flags);
    if !missing.is_empty() {
        return Err(format!(
            "the package was compiled for a CPU with {isa} and this one lacks {}: compile it \
             again on this kind of machine",
            missing.join(", ")
        ));
    }
    Ok(())
}

/// The numbers of examples one forward of a package takes, as its first input's first
/// dimension was exported: a range, or one fixed size when `min == max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchRange {
    /// Fewest examples.
    pub min: i64,
    /// Most examples; `None` when the dimension was exported without an upper bound.
    pub max: Option<i64>,
}

impl BatchRange {
    /// Any number of examples: what a package whose source states no bound takes.
    const ANY: BatchRange = BatchRange { min: 1, max: None };

    /// The one batch size of a package exported with a static first dimension.
    pub fn fixed(&self) -> Option<i64> {
        self.max.filter(|&max| max == self.min)
    }
}

/// The batch range of a package, read from the input checks that AOTInductor writes into its
/// generated source (`*.wrapper.cpp`), the only place a package states it.
///
/// A dimension exported as `Dim(min=1)` usually reads `>= 2` there, since export assumes a
/// size of 1 is special; exporting under `torch.fx.experimental._config.patch(
/// backed_size_oblivious=True)` keeps the 1. [`Package::run`] pads a smaller batch up to the
/// lower bound.
pub fn batch_range(path: &Path) -> Result<BatchRange, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| format!("not a .pt2 package: {e}"))?;
    let wrapper = zip
        .file_names()
        .filter_map(Result::ok)
        .find(|n| n.ends_with(".wrapper.cpp"))
        .map(|n| n.into_owned());
    let Some(name) = wrapper else {
        return Ok(BatchRange::ANY);
    };
    let mut source = String::new();
    std::io::Read::read_to_string(
        &mut zip.by_name(&name).map_err(|e| format!("{name}: {e}"))?,
        &mut source,
    )
    .map_err(|e| format!("{name}: {e}"))?;
    Ok(range_in_source(&source))
}

/// The first input's batch range in generated source: see [`batch_range`].
fn range_in_source(source: &str) -> BatchRange {
    let number_after = |marker: &str, lead: &str| {
        let rest = &source[source.find(marker)? + marker.len()..];
        let rest = &rest[rest.find(lead)? + lead.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<i64>().ok()
    };
    if let Some(n) = number_after("input_handles[0]: unmatched dim value at 0, ", "expected: ") {
        return BatchRange {
            min: n,
            max: Some(n),
        };
    }
    BatchRange {
        min: number_after(
            "input_handles[0]: dim value is too small at 0, ",
            "expected it to be >= ",
        )
        .unwrap_or(1)
        .max(1),
        max: number_after(
            "input_handles[0]: dim value is too large at 0, ",
            "expected to be <= ",
        ),
    }
}

/// How a forward of `rows` examples is run on a package of `range`: as it is, or as `pieces`
/// forwards of `piece` examples each, the last padded by repeating its last example, whose
/// outputs are joined and cut back to `rows`.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    Whole,
    Pieces { piece: i64, pieces: i64 },
    TooMany { max: i64 },
}

fn plan(range: BatchRange, rows: i64) -> Plan {
    if let Some(n) = range.fixed() {
        if rows == n {
            return Plan::Whole;
        }
        return Plan::Pieces {
            piece: n,
            pieces: ((rows + n - 1) / n).max(1),
        };
    }
    match range.max {
        Some(max) if rows > max => Plan::TooMany { max },
        _ if rows < range.min => Plan::Pieces {
            piece: range.min,
            pieces: 1,
        },
        _ => Plan::Whole,
    }
}

/// Runs `forward` on `inputs` in `pieces` forwards of `piece` examples (see [`Plan`]).
fn run_in_pieces(
    inputs: &[&Tensor],
    piece: i64,
    pieces: i64,
    mut forward: impl FnMut(&[&Tensor]) -> Result<Vec<Tensor>, tch::TchError>,
) -> Result<Vec<Tensor>, tch::TchError> {
    let rows = inputs
        .first()
        .map_or(0, |t| t.size().first().copied().unwrap_or(0));
    if rows == 0 || inputs.iter().any(|t| t.size().first() != Some(&rows)) {
        return Err(tch::TchError::Shape(format!(
            "the package runs {piece} examples per forward, and the inputs do not all hold the \
             same number of examples to divide"
        )));
    }
    let mut joined: Vec<Vec<Tensor>> = Vec::new();
    for p in 0..pieces {
        let start = p * piece;
        let take = piece.min(rows - start);
        let part: Vec<Tensor> = inputs
            .iter()
            .map(|t| {
                let part = t.narrow(0, start, take);
                if take == piece {
                    return part;
                }
                // A copy of a real example, not zeros, which some models divide by.
                let last = part.narrow(0, take - 1, 1);
                let mut size = last.size();
                size[0] = piece - take;
                Tensor::cat(&[part, last.expand(&size, false)], 0)
            })
            .collect();
        let part_refs: Vec<&Tensor> = part.iter().collect();
        let outputs = forward(&part_refs)?;
        for (i, out) in outputs.into_iter().enumerate() {
            if out.size().first() != Some(&piece) {
                return Err(tch::TchError::Shape(format!(
                    "the package runs {piece} examples per forward and its output {i} is not \
                     one row per example, so {rows} examples cannot be run in pieces"
                )));
            }
            if joined.len() <= i {
                joined.push(Vec::new());
            }
            joined[i].push(out.narrow(0, 0, take));
        }
    }
    Ok(joined
        .into_iter()
        .map(|mut parts| match parts.len() {
            1 => parts.remove(0),
            _ => Tensor::cat(&parts, 0),
        })
        .collect())
}

/// The structure of what a package's `forward` returned, read from its pytree output spec: the
/// package itself answers a flat list of tensors, which [`OutTree::rebuild`] puts back in shape,
/// so that a handler selecting `{"key": "out"}` works as it does on TorchScript.
#[derive(Debug, Clone, PartialEq)]
pub enum OutTree {
    /// One tensor.
    Tensor,
    /// `None`.
    Nothing,
    /// A tuple, a list, or any other sequence.
    Sequence(Vec<OutTree>),
    /// A dict, or any mapping with string or integer keys.
    Mapping(Vec<(IValueKey, OutTree)>),
}

/// A key of an output mapping.
#[derive(Debug, Clone, PartialEq)]
pub enum IValueKey {
    /// A string key.
    Str(String),
    /// An integer key.
    Int(i64),
}

impl OutTree {
    /// Reads torch's serialized spec (`[1, {"type": ..., "context": ..., "children_spec": ...}]`);
    /// `None` for a form it does not know.
    pub fn parse(spec: &str) -> Option<OutTree> {
        let value: serde_json::Value = serde_json::from_str(spec).ok()?;
        Self::node(value.get(1)?)
    }

    fn node(node: &serde_json::Value) -> Option<OutTree> {
        let kind = node.get("type")?;
        if kind.is_null() {
            return Some(OutTree::Tensor);
        }
        let children = node
            .get("children_spec")?
            .as_array()?
            .iter()
            .map(Self::node)
            .collect::<Option<Vec<_>>>()?;
        if kind.as_str() == Some("builtins.NoneType") {
            return Some(OutTree::Nothing);
        }
        // A mapping's context is its keys, as JSON text.
        let keys = node
            .get("context")
            .and_then(|c| c.as_str())
            .and_then(|c| serde_json::from_str::<Vec<serde_json::Value>>(c).ok())
            .filter(|keys| keys.len() == children.len() && !keys.is_empty())
            .and_then(|keys| {
                keys.into_iter()
                    .map(|k| match k {
                        serde_json::Value::String(s) => Some(IValueKey::Str(s)),
                        serde_json::Value::Number(n) => n.as_i64().map(IValueKey::Int),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()
            });
        Some(match keys {
            Some(keys) => OutTree::Mapping(keys.into_iter().zip(children).collect()),
            None => OutTree::Sequence(children),
        })
    }

    /// How many tensors the structure holds.
    pub fn leaves(&self) -> usize {
        match self {
            OutTree::Tensor => 1,
            OutTree::Nothing => 0,
            OutTree::Sequence(items) => items.iter().map(OutTree::leaves).sum(),
            OutTree::Mapping(items) => items.iter().map(|(_, t)| t.leaves()).sum(),
        }
    }

    /// Puts `outputs`, in order, into this structure.
    pub fn rebuild(&self, outputs: &mut impl Iterator<Item = Tensor>) -> IValue {
        match self {
            OutTree::Tensor => outputs.next().map_or(IValue::None, IValue::Tensor),
            OutTree::Nothing => IValue::None,
            OutTree::Sequence(items) => {
                IValue::Tuple(items.iter().map(|t| t.rebuild(outputs)).collect())
            }
            OutTree::Mapping(items) => IValue::GenericDict(
                items
                    .iter()
                    .map(|(k, t)| {
                        let key = match k {
                            IValueKey::Str(s) => IValue::String(s.clone()),
                            IValueKey::Int(i) => IValue::Int(*i),
                        };
                        (key, t.rebuild(outputs))
                    })
                    .collect(),
            ),
        }
    }
}

/// A loaded package.
#[derive(Debug)]
pub struct Package {
    handle: NonNull<c_void>,
    /// The numbers of examples one forward takes.
    range: BatchRange,
    /// The structure of the outputs, where the package states one this side reads.
    outputs: Option<OutTree>,
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
        check_machine(path)?;
        let range = batch_range(path)?;
        let path = c_path(path)?;
        let mut err = std::ptr::null_mut();
        // SAFETY: the path outlives the call; err receives a message or stays null.
        let handle =
            unsafe { tchserve_aoti_load(path.as_ptr(), index, runners.max(1) as c_int, &mut err) };
        let handle = NonNull::new(handle).ok_or_else(|| take_message(err))?;
        let mut err = std::ptr::null_mut();
        // SAFETY: the handle is live; the spec is a new string this side frees.
        let spec = unsafe { tchserve_aoti_out_spec(handle.as_ptr(), &mut err) };
        let outputs = if spec.is_null() {
            tracing::warn!(
                "{}: no output spec: {}",
                path.to_string_lossy(),
                take_message(err)
            );
            None
        } else {
            OutTree::parse(&take_message(spec))
        };
        Ok(Package {
            handle,
            range,
            outputs,
        })
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
    /// Either that, or an input the package's own checks refuse (dtype, sizes), is a shape error:
    /// the request's doing, not the model's, which the handler answers as bad input.
    pub fn run(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, tch::TchError> {
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
            // The package's own input checks name the input as `input_handles[i]`.
            return Err(match message.strip_prefix("input_handles[") {
                Some(rest) => tch::TchError::Shape(format!(
                    "the input does not fit the model's package: input {}",
                    rest.replacen(']', "", 1).trim_end()
                )),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_batch_range_is_read_from_the_generated_checks() {
        let dynamic = r#"
            if (arg4_1_size[0] < 2) {
                ss << "input_handles[0]: dim value is too small at 0, "
                   << "expected it to be >= 2, " << "but got: "
            if (arg4_1_size[0] > 64) {
                ss << "input_handles[0]: dim value is too large at 0, "
                   << "expected to be <= 64, " << "but got: "
            if (784 != arg4_1_size[1]) {
                ss << "input_handles[0]: unmatched dim value at 1, "
                   << "expected: 784, " << "but got: " << arg4_1_size[1]"#;
        let range = range_in_source(dynamic);
        assert_eq!(
            range,
            BatchRange {
                min: 2,
                max: Some(64)
            }
        );
        assert_eq!(range.fixed(), None);
        let fixed = r#"
                ss << "input_handles[0]: unmatched dim value at 0, "
                   << "expected: 1, " << "but got: " << arg0_1_size[0]
                ss << "input_handles[0]: unmatched dim value at 1, "
                   << "expected: 784, " << "but got: " << arg0_1_size[1]"#;
        assert_eq!(range_in_source(fixed).fixed(), Some(1));
        assert_eq!(range_in_source("no checks at all"), BatchRange::ANY);
    }

    #[test]
    fn outputs_are_put_back_in_the_shape_forward_returned() {
        let leaf = r#"{"type": null, "context": null, "children_spec": []}"#;
        let dict = format!(
            r#"[1, {{"type": "builtins.dict", "context": "[\"out\", \"aux\"]", "children_spec": [{leaf}, {leaf}]}}]"#
        );
        let tree = OutTree::parse(&dict).unwrap();
        assert_eq!(tree.leaves(), 2);
        let t = |v: f32| Tensor::from_slice(&[v]);
        let IValue::GenericDict(items) = tree.rebuild(&mut vec![t(1.0), t(2.0)].into_iter()) else {
            panic!("not a dict");
        };
        assert!(
            matches!(&items[0], (IValue::String(k), IValue::Tensor(v)) if k == "out" && v.double_value(&[0]) == 1.0)
        );
        assert!(
            matches!(&items[1], (IValue::String(k), IValue::Tensor(v)) if k == "aux" && v.double_value(&[0]) == 2.0)
        );

        let nested = format!(
            r#"[1, {{"type": "builtins.tuple", "context": "null", "children_spec": [{leaf}, {{"type": "builtins.list", "context": "null", "children_spec": [{leaf}, {leaf}]}}]}}]"#
        );
        let tree = OutTree::parse(&nested).unwrap();
        assert_eq!(
            tree,
            OutTree::Sequence(vec![
                OutTree::Tensor,
                OutTree::Sequence(vec![OutTree::Tensor, OutTree::Tensor])
            ])
        );
        assert_eq!(
            OutTree::parse(&format!("[1, {leaf}]")),
            Some(OutTree::Tensor)
        );
        assert_eq!(OutTree::parse("not json"), None);
    }

    #[test]
    fn a_package_needs_the_cpu_features_of_its_vector_isa() {
        let epyc = [
            "fma",
            "avx",
            "f16c",
            "avx2",
            "avx512f",
            "avx512dq",
            "avx512bw",
            "avx512vl",
            "avx512_vnni",
        ];
        assert!(missing_features("AVX512 AVX512_VNNI", &epyc).is_empty());
        assert!(missing_features("AVX2", &epyc).is_empty());
        assert_eq!(
            missing_features("AVX512 AVX512_VNNI AMX_TILE", &epyc),
            ["amx_tile", "amx_bf16", "amx_int8"]
        );
        let older = ["fma", "avx", "f16c", "avx2"];
        assert_eq!(
            missing_features("AVX512", &older),
            ["avx512f", "avx512dq", "avx512vl", "avx512bw"]
        );
        // A name this side does not know asks for nothing: the package's own loader decides.
        assert!(missing_features("ZVECTOR", &older).is_empty());
        assert!(missing_features("", &older).is_empty());
    }

    #[test]
    fn batches_are_fitted_to_the_range() {
        let dynamic = BatchRange {
            min: 2,
            max: Some(64),
        };
        assert_eq!(
            plan(dynamic, 1),
            Plan::Pieces {
                piece: 2,
                pieces: 1
            }
        );
        assert_eq!(plan(dynamic, 2), Plan::Whole);
        assert_eq!(plan(dynamic, 64), Plan::Whole);
        assert_eq!(plan(dynamic, 65), Plan::TooMany { max: 64 });
        assert_eq!(plan(BatchRange::ANY, 1000), Plan::Whole);
        let four = BatchRange {
            min: 4,
            max: Some(4),
        };
        assert_eq!(plan(four, 4), Plan::Whole);
        assert_eq!(
            plan(four, 9),
            Plan::Pieces {
                piece: 4,
                pieces: 3
            }
        );
        assert_eq!(
            plan(four, 1),
            Plan::Pieces {
                piece: 4,
                pieces: 1
            }
        );
    }

    /// A stand-in forward that, like a fixed-size package, takes exactly `piece` rows: each
    /// output row is its input row times 10, plus a second output of the row sums.
    fn fixed_forward(
        piece: i64,
        calls: &mut Vec<Vec<f32>>,
    ) -> impl FnMut(&[&Tensor]) -> Result<Vec<Tensor>, tch::TchError> + '_ {
        move |inputs| {
            let x = inputs[0];
            assert_eq!(x.size()[0], piece, "a forward got another number of rows");
            calls.push(Vec::<f32>::try_from(x.select(1, 0)).unwrap());
            Ok(vec![
                x * 10.0,
                x.sum_dim_intlist(1, false, tch::Kind::Float),
            ])
        }
    }

    #[test]
    fn pieces_are_padded_with_the_last_example_and_joined_in_order() {
        let x = Tensor::arange(9 * 2, (tch::Kind::Float, tch::Device::Cpu)).reshape([9, 2]);
        let mut calls = Vec::new();
        let out = run_in_pieces(&[&x], 4, 3, fixed_forward(4, &mut calls)).unwrap();
        assert_eq!(out.len(), 2);
        assert!(out[0].equal(&(&x * 10.0)));
        assert!(
            out[1].equal(&x.sum_dim_intlist(1, false, tch::Kind::Float)),
            "the padding rows were cut off again"
        );
        // First column of each forward: the ninth example fills the last piece.
        assert_eq!(
            calls,
            vec![
                vec![0., 2., 4., 6.],
                vec![8., 10., 12., 14.],
                vec![16., 16., 16., 16.]
            ]
        );

        // One example padded up to a lower bound of 2.
        let one = Tensor::from_slice(&[3.0f32, 4.0]).reshape([1, 2]);
        let mut calls = Vec::new();
        let out = run_in_pieces(&[&one], 2, 1, fixed_forward(2, &mut calls)).unwrap();
        assert!(out[0].equal(&(&one * 10.0)));
        assert_eq!(calls, vec![vec![3., 3.]]);
    }

    #[test]
    fn an_output_without_a_row_per_example_cannot_be_joined() {
        let x = Tensor::ones([3, 2], (tch::Kind::Float, tch::Device::Cpu));
        let err = run_in_pieces(&[&x], 2, 2, |_| {
            Ok(vec![Tensor::ones(
                [5],
                (tch::Kind::Float, tch::Device::Cpu),
            )])
        })
        .unwrap_err();
        assert!(matches!(err, tch::TchError::Shape(m) if m.contains("not one row per example")));
        let y = Tensor::ones([2, 2], (tch::Kind::Float, tch::Device::Cpu));
        let err = run_in_pieces(&[&x, &y], 2, 2, |_| unreachable!()).unwrap_err();
        assert!(matches!(err, tch::TchError::Shape(m) if m.contains("same number of examples")));
    }
}
