//! Handler manifests: a handler described as data, stage by stage.
//!
//! A manifest says how a request is decoded (`input`), which transforms run on each example
//! (`preprocess`), how the batch is fed to the model and which of its outputs is used (`model`),
//! which tensor operations follow (`postprocess`), and how each example's result is written
//! (`output`). Every stage is a one-key object naming the operation, so a manifest reads like the
//! pipeline it describes. See `docs/handlers.md` for the schema with examples.

use serde::{Deserialize, Serialize};

use crate::error::{MarError, Result};

/// Schema version written in and required of every manifest.
pub const SCHEMA_VERSION: u32 = 1;

/// A whole handler manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerManifest {
    /// Must be [`SCHEMA_VERSION`].
    pub schema: u32,
    /// Short name, shown in logs and describe output.
    pub name: String,
    /// What the handler is for.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// How a request's payload becomes one example.
    pub input: Input,
    /// Per-example transforms, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preprocess: Vec<Preprocess>,
    /// How examples are batched into the model and which output is kept.
    pub model: ModelCall,
    /// Tensor operations on the selected output, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub postprocess: Vec<Postprocess>,
    /// How each example's result is written as JSON.
    pub output: Output,
}

/// Element types a tensor input may declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// 32-bit float.
    Float32,
    /// 64-bit float.
    Float64,
    /// 16-bit float.
    Float16,
    /// bfloat16.
    Bfloat16,
    /// 64-bit signed integer.
    Int64,
    /// 32-bit signed integer.
    Int32,
    /// 16-bit signed integer.
    Int16,
    /// 8-bit signed integer.
    Int8,
    /// 8-bit unsigned integer.
    Uint8,
    /// Boolean, one byte each.
    Bool,
}

impl DType {
    /// Bytes per element in the raw little-endian input format.
    pub fn size(self) -> usize {
        match self {
            DType::Float64 | DType::Int64 => 8,
            DType::Float32 | DType::Int32 => 4,
            DType::Float16 | DType::Bfloat16 | DType::Int16 => 2,
            DType::Int8 | DType::Uint8 | DType::Bool => 1,
        }
    }
}

/// The input decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Input {
    /// Numbers: JSON (`{"data": ...}`, a bare nested list, `{"instances": [...]}`) or raw
    /// little-endian bytes.
    Tensor {
        /// Element type the model expects.
        dtype: DType,
        /// Shape of one example; `-1` accepts any size on that axis; absent accepts any shape.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        shape: Option<Vec<i64>>,
    },
    /// Several named tensors, each stacked into its own batch and passed to `forward` in this
    /// order: `forward(a, b, ...)`. A request names each one (`{"a": ..., "b": ...}`).
    Tensors(Vec<NamedTensor>),
    /// An encoded image (JPEG, PNG, WebP, BMP, GIF, TIFF), raw or base64, decoded to 8-bit RGB
    /// (or grey).
    Image {
        /// Images with more pixels than this are refused before decoding.
        #[serde(default = "default_max_pixels")]
        max_pixels: u64,
        /// The channels the model takes, named as PIL names image modes.
        #[serde(default, skip_serializing_if = "ImageMode::is_rgb")]
        mode: ImageMode,
    },
    /// UTF-8 text, tokenized with a Hugging Face `tokenizer.json` from the archive.
    Text {
        /// The tokenizer file inside the archive.
        tokenizer: String,
        /// Longer inputs are truncated to this many tokens.
        max_length: u32,
    },
}

/// One input of a model that takes several.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedTensor {
    /// The name requests give it.
    pub name: String,
    /// Element type the model expects.
    pub dtype: DType,
    /// Shape of one example; `-1` accepts any size on that axis; absent accepts any shape.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<Vec<i64>>,
}

/// Names a `tensors` input may not take: requests use them for other things (a body's forms,
/// the model `/invocations` names).
pub const RESERVED_INPUT_NAMES: [&str; 4] = ["data", "body", "instances", "model_name"];

/// PIL's default decompression-bomb threshold, which TorchServe inherits.
fn default_max_pixels() -> u64 {
    89_478_485
}

/// A size given as one number (the shorter side, or a square) or as `[height, width]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Size {
    /// One number.
    Scalar(u32),
    /// `[height, width]`.
    Pair([u32; 2]),
}

// By hand, so a wrong value says what a size is instead of serde's "did not match any variant".
impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        let side = |v: &serde_json::Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
        match &v {
            serde_json::Value::Number(_) => side(&v).map(Size::Scalar),
            serde_json::Value::Array(a) if a.len() == 2 => side(&a[0])
                .zip(side(&a[1]))
                .map(|(h, w)| Size::Pair([h, w])),
            _ => None,
        }
        .ok_or_else(|| {
            // Arrays are shown as they are short; a size of -1 (torchvision's "keep") or 0.5
            // reads better than "an array".
            let found = match &v {
                serde_json::Value::Object(_) => String::new(),
                serde_json::Value::Array(a) if a.len() > 4 => String::new(),
                shown => format!(" {shown}"),
            };
            serde::de::Error::custom(format!(
                "expected a size, a whole number or [height, width], found {}{found}",
                crate::manifest::json_type(&v)
            ))
        })
    }
}

/// Resampling filters for `resize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    /// Nearest neighbour.
    Nearest,
    /// Bilinear (torchvision's default).
    Bilinear,
    /// Bicubic.
    Bicubic,
}

/// A per-example transform.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Preprocess {
    /// Resizes an image: a scalar size sets the shorter side keeping the aspect ratio,
    /// `[h, w]` sets both.
    Resize {
        /// Target size.
        size: Size,
        /// Filter.
        #[serde(default = "default_interpolation")]
        interpolation: Interpolation,
        /// Low-pass filter when shrinking, as torchvision does on PIL images.
        #[serde(default = "default_true")]
        antialias: bool,
    },
    /// Cuts the central `size` region out of an image.
    CenterCrop {
        /// Crop size.
        size: Size,
    },
    /// Turns 8-bit HWC pixels into a float CHW tensor in [0, 1].
    ToTensor {},
    /// Subtracts `mean` and divides by `std`, per channel.
    Normalize {
        /// Per-channel mean.
        mean: Vec<f64>,
        /// Per-channel standard deviation.
        std: Vec<f64>,
    },
}

fn default_interpolation() -> Interpolation {
    Interpolation::Bilinear
}

fn default_true() -> bool {
    true
}

/// How the batch is passed to `forward`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Feed {
    /// Examples stacked into one tensor: `forward(batch)`.
    Stacked,
    /// A list of per-example tensors: `forward([x1, x2, ...])`, as torchvision detectors take.
    List,
    /// Token ids and attention mask, padded to the longest example: `forward(ids, mask)`.
    Tokens,
}

/// Which part of the model's output feeds postprocessing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Select {
    /// Element `n` of a tuple or list output.
    Index(usize),
    /// Entry `key` of a dict output.
    Key(String),
}

/// The model call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelCall {
    /// How examples are fed.
    pub feed: Feed,
    /// Which output to keep; absent keeps the whole output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Select>,
}

/// A tensor operation after the forward pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Postprocess {
    /// Softmax over `dim` of the batched output.
    Softmax {
        /// Axis of the batched tensor (1 = classes of a `[N, C, ...]` output).
        dim: i64,
    },
    /// Sigmoid, element-wise.
    Sigmoid {},
    /// Mean of token embeddings under the attention mask (`text` input only).
    MeanPool {},
    /// Divides each example's vector by its L2 norm.
    L2Normalize {},
}

/// How one example's result is written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Output {
    /// The example's tensor as a nested JSON list.
    Tensor {},
    /// `{"label": score, ...}` in descending score order.
    Classes {
        /// Keep the best `top_k`; absent keeps every class.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        top_k: Option<u32>,
        /// Label file in the archive, in any form TorchServe's `index_to_name.json` takes;
        /// without it, labels are class indices.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        labels: Option<String>,
    },
    /// The best class alone: its label, or its index (a JSON number) where there is no label
    /// for it, as the classic TorchServe examples answer (`argmax(1).tolist()`).
    Argmax {
        /// Label file, as for `classes`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        labels: Option<String>,
    },
    /// Per pixel `[class, score]` from a `[N, C, H, W]` score map.
    Segmentation {},
    /// `[{"<label>": [x1, y1, x2, y2], "score": s}, ...]` from a detector's boxes, labels, scores.
    Detections {
        /// Detections scoring below this are dropped.
        threshold: f64,
        /// Label file, as for `classes`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        labels: Option<String>,
    },
    /// `{"embedding": [...]}`.
    Embedding {},
    /// Several tensors the model returns, each named: a tuple's or list's elements in order,
    /// or a dict's entries by these keys. Each example is answered `{"<name>": [...], ...}`,
    /// and the typed protocols answer one output per name.
    Tensors(Vec<String>),
}

/// The channels of an image handler's tensor, named as PIL names image modes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageMode {
    /// Three channels, red, green and blue.
    #[default]
    #[serde(rename = "RGB")]
    Rgb,
    /// One grey channel, as PIL's `convert("L")` makes it (ITU-R 601-2 luma).
    L,
}

impl ImageMode {
    /// Whether this is the default, RGB.
    pub fn is_rgb(&self) -> bool {
        *self == ImageMode::Rgb
    }

    /// The number of channels.
    pub fn channels(self) -> usize {
        match self {
            ImageMode::Rgb => 3,
            ImageMode::L => 1,
        }
    }
}

/// Names of the handlers built into tchserve, each a manifest in `handlers/`.
pub const BUILTIN_HANDLERS: [(&str, &str); 6] = [
    ("tensor", include_str!("../../../handlers/tensor.json")),
    (
        "image_classifier",
        include_str!("../../../handlers/image_classifier.json"),
    ),
    (
        "image_segmenter",
        include_str!("../../../handlers/image_segmenter.json"),
    ),
    (
        "object_detector",
        include_str!("../../../handlers/object_detector.json"),
    ),
    (
        "text_classifier",
        include_str!("../../../handlers/text_classifier.json"),
    ),
    (
        "text_embedding",
        include_str!("../../../handlers/text_embedding.json"),
    ),
];

/// TorchServe's name for its generic handler, served here by the `tensor` handler.
pub const BASE_HANDLER_ALIAS: &str = "base_handler";

/// Handler names TorchServe treats as built in (the archiver does not pack a file for them).
pub const TORCHSERVE_BUILTIN_NAMES: [&str; 8] = [
    "base_handler",
    "text_classifier",
    "image_classifier",
    "object_detector",
    "image_segmenter",
    "dali_image_classifier",
    "vllm_handler",
    "trt_llm_handler",
];

/// Whether `name` is a handler the archiver should not pack a file for.
pub fn is_builtin_name(name: &str) -> bool {
    TORCHSERVE_BUILTIN_NAMES.contains(&name) || BUILTIN_HANDLERS.iter().any(|(n, _)| *n == name)
}

/// The built-in handler that a reference to one of TorchServe's own handler modules means:
/// `serve/ts/torch_handler/image_classifier.py:handle`, `ts/torch_handler/image_classifier.py`
/// and `ts.torch_handler.image_classifier` all name `image_classifier`. `None` for anything
/// else, and for TorchServe modules tchserve has no built-in for.
pub fn torchserve_module(handler: &str) -> Option<&str> {
    let module = handler.split(':').next()?;
    let module = module.strip_suffix(".py").unwrap_or(module);
    let parts: Vec<&str> = module.split(['/', '.']).filter(|p| !p.is_empty()).collect();
    match parts.as_slice() {
        [.., "ts", "torch_handler", name] if builtin(name).is_some() => Some(name),
        _ => None,
    }
}

/// The labels of a label file in any form TorchServe's `index_to_name.json` takes: `{"0": "cat"}`,
/// `{"0": ["n02123045", "tabby"]}` (the last element is the label) or `{"object_type_names":
/// [...]}`. A class the file skips is labelled by its index. The error says what is wrong.
pub fn parse_labels(text: &str) -> std::result::Result<Vec<String>, String> {
    const FORMS: &str = "expected TorchServe's index_to_name.json: a JSON object of class \
        index to label ({\"0\": \"cat\"} or {\"0\": [\"n02123045\", \"tabby\"]}), or \
        {\"object_type_names\": [...]}";
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("{FORMS}; it is not JSON ({e})"))?;
    let label_of = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(a) => a.last().and_then(|l| l.as_str()).map(str::to_owned),
        _ => None,
    };
    let obj = value
        .as_object()
        .ok_or_else(|| format!("{FORMS}; found {}", crate::manifest::json_type(&value)))?;
    if let Some(names) = obj.get("object_type_names").and_then(|v| v.as_array()) {
        return Ok(names
            .iter()
            .map(|n| label_of(n).unwrap_or_default())
            .collect());
    }
    let mut labels = Vec::new();
    for (k, v) in obj {
        let i: usize = k
            .parse()
            .map_err(|_| format!("{FORMS}; key {k:?} is not a class index"))?;
        // A class index is a row of the model's output: one past any output's size is a typo.
        if i > 10_000_000 {
            return Err(format!(
                "class index {i} is larger than any model's classes"
            ));
        }
        if labels.len() <= i {
            labels.resize(i + 1, String::new());
        }
        labels[i] = label_of(v).ok_or_else(|| format!("the label of class {k} is not a string"))?;
    }
    for (i, l) in labels.iter_mut().enumerate() {
        if l.is_empty() {
            *l = i.to_string();
        }
    }
    Ok(labels)
}

/// The keys of the stage object at `at` (`input`, `output`, `preprocess[1]`, `postprocess[0]`),
/// where the manifest is JSON and holds an object there.
fn stage_keys(bytes: &[u8], at: &str) -> Option<Vec<String>> {
    let root: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let value = match at.split_once('[') {
        Some((list @ ("preprocess" | "postprocess"), index)) => {
            let i: usize = index.strip_suffix(']')?.parse().ok()?;
            root.get(list)?.get(i)?
        }
        None if at == "input" || at == "output" => root.get(at)?,
        _ => return None,
    };
    Some(value.as_object()?.keys().cloned().collect())
}

/// The manifest that stands in for a Python handler in tchserve: `my_handler.py` (or
/// `my_handler.py:handle`, `my_handler`) is served by `my_handler.json` packed beside it, so that
/// one archive serves in TorchServe, which runs the Python, and in tchserve. `None` for a name
/// that is a manifest already.
pub fn twin_manifest_name(handler: &str) -> Option<String> {
    let file = handler.split(':').next()?;
    let file = file.rsplit('/').next()?;
    let stem = file.strip_suffix(".py").unwrap_or(file);
    (!stem.is_empty() && !stem.ends_with(".json")).then(|| format!("{stem}.json"))
}

/// The built-in manifest called `name` (or TorchServe's alias for one), parsed.
pub fn builtin(name: &str) -> Option<HandlerManifest> {
    let name = if name == BASE_HANDLER_ALIAS {
        "tensor"
    } else {
        name
    };
    let (_, text) = BUILTIN_HANDLERS.iter().find(|(n, _)| *n == name)?;
    Some(
        HandlerManifest::parse(&format!("handlers/{name}.json"), text.as_bytes())
            .unwrap_or_else(|e| panic!("built-in handler {name} is invalid: {e}")),
    )
}

impl HandlerManifest {
    /// Parses and validates a manifest; errors name `file`, the stage and the field.
    pub fn parse(file: &str, bytes: &[u8]) -> Result<Self> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let manifest: HandlerManifest = serde_path_to_error::deserialize(de).map_err(|e| {
            let at = e.path().to_string();
            let mut reason = e.into_inner().to_string();
            // `"sigmoid"` for `{"sigmoid": {}}`: serde's words for it name its own types.
            if reason.contains("unit variant, expected struct variant") {
                let stage = at.rsplit('.').next().unwrap_or("stage");
                reason = format!("write it as an object: {{\"{stage}\": {{}}}}");
            } else if let Some(keys) = stage_keys(bytes, &at).filter(|k| k.len() != 1) {
                // serde reads an enum of two keys as a broken value, and says only where.
                reason = format!(
                    "a stage is an object of one key, its name, holding its parameters; this one \
                     has {}: {}",
                    keys.len(),
                    keys.join(", ")
                );
            }
            MarError::Handler {
                file: file.into(),
                at: match at.as_str() {
                    "." => "(top level)".into(),
                    // Where the text itself is broken (cut short, not JSON), serde knows no path.
                    "?" => "(the file)".into(),
                    _ => at,
                },
                reason,
            }
        })?;
        manifest
            .validate()
            .map_err(|(at, reason)| MarError::Handler {
                file: file.into(),
                at,
                reason,
            })?;
        Ok(manifest)
    }

    /// Applies the `handler:` section of a model's `model-config.yaml`: `top_k` (or TorchServe's
    /// `topk`) for a `classes` output, `threshold` for `detections`. A known key with a bad
    /// value is an error naming it. Any other key, and a known one this handler's output has no
    /// use for, changes nothing and comes back as a note to warn of: the section may hold
    /// settings for the Python handler an archive was first made for.
    pub fn apply_settings(
        &mut self,
        settings: &serde_json::Value,
    ) -> std::result::Result<Vec<String>, String> {
        let Some(map) = settings.as_object() else {
            return Err("the handler section must be a mapping".into());
        };
        let mut ignored = Vec::new();
        for (key, value) in map {
            match (key.as_str(), &mut self.output) {
                ("top_k" | "topk", Output::Classes { top_k, .. }) => {
                    let k = value
                        .as_u64()
                        .filter(|k| *k > 0 && *k <= u64::from(u32::MAX))
                        .ok_or_else(|| format!("handler.{key} must be a positive integer"))?;
                    *top_k = Some(k as u32);
                }
                ("threshold", Output::Detections { threshold, .. }) => {
                    *threshold = value
                        .as_f64()
                        .filter(|t| t.is_finite())
                        .ok_or_else(|| format!("handler.{key} must be a number"))?;
                }
                ("top_k" | "topk", _) => ignored.push(format!(
                    "handler.{key} is ignored: it sets how many classes a classes output answers, \
                     and handler {} has none",
                    self.name
                )),
                ("threshold", _) => ignored.push(format!(
                    "handler.{key} is ignored: it sets the score a detections output keeps, and \
                     handler {} has none",
                    self.name
                )),
                _ => ignored.push(format!(
                    "handler.{key} is ignored: handler {} takes top_k (or topk) for a classes \
                     output and threshold for detections",
                    self.name
                )),
            }
        }
        Ok(ignored)
    }

    /// The label file the output names, if any.
    pub fn label_file(&self) -> Option<&str> {
        match &self.output {
            Output::Classes { labels, .. }
            | Output::Argmax { labels }
            | Output::Detections { labels, .. } => labels.as_deref(),
            _ => None,
        }
    }

    /// Files inside the archive that this manifest refers to.
    pub fn referenced_files(&self) -> Vec<&str> {
        let mut files = Vec::new();
        if let Input::Text { tokenizer, .. } = &self.input {
            files.push(tokenizer.as_str());
        }
        match &self.output {
            Output::Classes {
                labels: Some(l), ..
            }
            | Output::Argmax { labels: Some(l) }
            | Output::Detections {
                labels: Some(l), ..
            } => files.push(l.as_str()),
            _ => {}
        }
        files
    }

    /// Checks what the types alone cannot: values in range and stages that fit together.
    fn validate(&self) -> Result<(), (String, String)> {
        let fail = |at: &str, reason: &str| Err((at.to_string(), reason.to_string()));
        if self.schema != SCHEMA_VERSION {
            return fail(
                "schema",
                &format!(
                    "unsupported schema version {} (this tchserve reads {SCHEMA_VERSION})",
                    self.schema
                ),
            );
        }
        if self.name.trim().is_empty() {
            return fail("name", "must not be empty");
        }
        match &self.input {
            Input::Tensor {
                shape: Some(shape), ..
            } => {
                if let Some(i) = shape.iter().position(|&d| d == 0 || d < -1) {
                    return fail(
                        &format!("input.tensor.shape[{i}]"),
                        "each axis must be positive or -1 (any size)",
                    );
                }
            }
            Input::Tensor { .. } => {}
            Input::Tensors(list) => {
                if list.is_empty() {
                    return fail("input.tensors", "must name at least one input");
                }
                for (i, t) in list.iter().enumerate() {
                    let at = |field: &str| format!("input.tensors[{i}].{field}");
                    if !tensor_name_ok(&t.name) {
                        return fail(&at("name"), TENSOR_NAME_RULE);
                    }
                    if RESERVED_INPUT_NAMES.contains(&t.name.as_str()) {
                        return fail(
                            &at("name"),
                            &format!(
                                "`{}` is reserved: a request body uses it for other things",
                                t.name
                            ),
                        );
                    }
                    if list[..i].iter().any(|o| o.name == t.name) {
                        return fail(&at("name"), &format!("`{}` appears twice", t.name));
                    }
                    if let Some(shape) = &t.shape
                        && let Some(j) = shape.iter().position(|&d| d == 0 || d < -1)
                    {
                        return fail(
                            &at(&format!("shape[{j}]")),
                            "each axis must be positive or -1 (any size)",
                        );
                    }
                }
            }
            Input::Image { max_pixels, .. } if *max_pixels == 0 => {
                return fail("input.image.max_pixels", "must be positive");
            }
            Input::Image { .. } => {}
            Input::Text {
                tokenizer,
                max_length,
            } => {
                check_file_name("input.text.tokenizer", tokenizer)?;
                if *max_length == 0 {
                    return fail("input.text.max_length", "must be positive");
                }
            }
        }
        let is_image = matches!(self.input, Input::Image { .. });
        let mut to_tensor_seen = false;
        let mut fixed_size = false;
        for (i, stage) in self.preprocess.iter().enumerate() {
            let at = |field: &str| format!("preprocess[{i}].{field}");
            if !is_image {
                return fail(
                    &format!("preprocess[{i}]"),
                    "preprocess stages apply to `image` input only",
                );
            }
            match stage {
                Preprocess::Resize { size, .. } | Preprocess::CenterCrop { size } => {
                    let op = if matches!(stage, Preprocess::Resize { .. }) {
                        "resize"
                    } else {
                        "center_crop"
                    };
                    if to_tensor_seen {
                        return fail(&at(op), "must come before to_tensor");
                    }
                    if matches!(size, Size::Scalar(0))
                        || matches!(size, Size::Pair([0, _] | [_, 0]))
                    {
                        return fail(&at(&format!("{op}.size")), "must be positive");
                    }
                    fixed_size |= op == "center_crop" || matches!(size, Size::Pair(_));
                }
                Preprocess::ToTensor {} => {
                    if to_tensor_seen {
                        return fail(&at("to_tensor"), "appears twice");
                    }
                    to_tensor_seen = true;
                }
                Preprocess::Normalize { mean, std } => {
                    if !to_tensor_seen {
                        return fail(&at("normalize"), "must come after to_tensor");
                    }
                    let grey = matches!(
                        self.input,
                        Input::Image {
                            mode: ImageMode::L,
                            ..
                        }
                    );
                    if grey && mean.len() != 1 {
                        return fail(
                            &at("normalize"),
                            "a grey (mode L) image has one channel: mean and std take one value",
                        );
                    }
                    if !matches!(mean.len(), 1 | 3) || mean.len() != std.len() {
                        return fail(
                            &at("normalize"),
                            "mean and std need one value for every channel or one per RGB \
                             channel (3), as many of each",
                        );
                    }
                    if let Some(j) = std.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
                        return fail(
                            &at(&format!("normalize.std[{j}]")),
                            "must be a positive number",
                        );
                    }
                }
            }
        }
        if is_image && !to_tensor_seen {
            return fail(
                "preprocess",
                "an image pipeline must end in to_tensor (optionally followed by normalize)",
            );
        }
        match (&self.input, self.model.feed) {
            (Input::Text { .. }, Feed::Tokens) => {}
            (Input::Text { .. }, _) => {
                return fail("model.feed", "`text` input is fed as `tokens`");
            }
            (_, Feed::Tokens) => return fail("model.feed", "`tokens` needs `text` input"),
            (Input::Tensors(_), Feed::List) => {
                return fail(
                    "model.feed",
                    "`tensors` input is fed `stacked`: one batch per input, `forward(a, b, ...)`",
                );
            }
            (Input::Image { .. }, Feed::Stacked) if !fixed_size => {
                return fail(
                    "model.feed",
                    "stacking images needs a fixed size: add center_crop or resize to [h, w], or feed a list",
                );
            }
            _ => {}
        }
        if let Some(Select::Key(k)) = &self.model.output
            && k.is_empty()
        {
            return fail("model.output.key", "must not be empty");
        }
        if self.model.feed == Feed::List {
            // Each example's result is answered as the model gives it.
            if !self.postprocess.is_empty() {
                return fail(
                    "postprocess",
                    "a model fed a list answers each example's result as it is; postprocess \
                     stages need model.feed `stacked`",
                );
            }
            if !matches!(self.output, Output::Tensor {} | Output::Detections { .. }) {
                return fail(
                    "output",
                    "a model fed a list answers `tensor` or `detections`; the other outputs \
                     need model.feed `stacked`",
                );
            }
        }
        for (i, stage) in self.postprocess.iter().enumerate() {
            if let Postprocess::Softmax { dim: 0 } = stage {
                return fail(
                    &format!("postprocess[{i}].softmax.dim"),
                    "0 is the batch axis, whose rows are different requests: use 1 for the \
                     classes of an [N, C] output, or -1 for the last axis",
                );
            }
            if matches!(stage, Postprocess::MeanPool {}) && self.model.feed != Feed::Tokens {
                return fail(
                    &format!("postprocess[{i}].mean_pool"),
                    "needs `text` input (it pools under the attention mask)",
                );
            }
            if matches!(self.output, Output::Detections { .. }) {
                return fail(
                    &format!("postprocess[{i}]"),
                    "detections are formatted from the model's output as is; remove postprocess stages",
                );
            }
        }
        match &self.output {
            Output::Tensors(names) => {
                if names.is_empty() {
                    return fail("output.tensors", "must name at least one output");
                }
                for (i, name) in names.iter().enumerate() {
                    if !tensor_name_ok(name) {
                        return fail(&format!("output.tensors[{i}]"), TENSOR_NAME_RULE);
                    }
                    if names[..i].contains(name) {
                        return fail(
                            &format!("output.tensors[{i}]"),
                            &format!("`{name}` appears twice"),
                        );
                    }
                }
                if self.model.output.is_some() {
                    return fail(
                        "model.output",
                        "an output of several tensors takes them all: remove model.output",
                    );
                }
                if !self.postprocess.is_empty() {
                    return fail(
                        "postprocess",
                        "postprocess stages work on one tensor; an output of several tensors \
                         answers them as the model gives them",
                    );
                }
            }
            Output::Classes { top_k, labels } => {
                if *top_k == Some(0) {
                    return fail("output.classes.top_k", "must be positive");
                }
                if let Some(l) = labels {
                    check_file_name("output.classes.labels", l)?;
                }
            }
            Output::Argmax { labels: Some(l) } => {
                check_file_name("output.argmax.labels", l)?;
            }
            Output::Detections { threshold, labels } => {
                if !threshold.is_finite() {
                    return fail("output.detections.threshold", "must be a number");
                }
                if self.model.feed != Feed::List {
                    return fail(
                        "output.detections",
                        "detectors take a list of images: set model.feed to `list`",
                    );
                }
                if let Some(l) = labels {
                    check_file_name("output.detections.labels", l)?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// What [`tensor_name_ok`] asks of a name.
const TENSOR_NAME_RULE: &str = "must be 1 to 64 letters, digits, `_`, `-` or `.`";

/// Whether `name` may name an input or output tensor: short, and safe in any protocol's field.
fn tensor_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
}

/// A file named by a manifest must be a plain relative path inside the archive.
fn check_file_name(at: &str, name: &str) -> Result<(), (String, String)> {
    match crate::archive::entry_name::normalize(name.as_bytes()) {
        Ok(_) => Ok(()),
        Err(why) => Err((
            at.to_string(),
            format!("`{name}` is not a file inside the archive: {why}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        HandlerManifest::parse("h.json", text.as_bytes())
            .unwrap_err()
            .to_string()
    }

    const CLASSIFIER: &str = r#"{"schema": 1, "name": "c",
        "input": {"image": {}},
        "preprocess": [{"resize": {"size": 256}}, {"center_crop": {"size": 224}}, {"to_tensor": {}},
                       {"normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}}],
        "model": {"feed": "stacked"},
        "postprocess": [{"softmax": {"dim": 1}}],
        "output": {"classes": {"top_k": 5, "labels": "index_to_name.json"}}}"#;

    #[test]
    fn every_builtin_parses() {
        for (name, _) in BUILTIN_HANDLERS {
            let m = builtin(name).unwrap();
            assert_eq!(m.name, name);
        }
        assert_eq!(builtin("base_handler").unwrap().name, "tensor");
        assert!(builtin("nope").is_none());
    }

    #[test]
    fn several_named_tensor_inputs() {
        let m = HandlerManifest::parse(
            "h.json",
            br#"{"schema": 1, "name": "two",
                "input": {"tensors": [{"name": "ids", "dtype": "int64", "shape": [4]},
                                      {"name": "dense", "dtype": "float32"}]},
                "model": {"feed": "stacked"}, "output": {"tensor": {}}}"#,
        )
        .unwrap();
        let Input::Tensors(list) = &m.input else {
            panic!("{:?}", m.input)
        };
        assert_eq!(
            (
                list[0].name.as_str(),
                list[0].dtype,
                list[0].shape.as_deref()
            ),
            ("ids", DType::Int64, Some(&[4i64][..]))
        );
        assert_eq!(
            (list[1].name.as_str(), list[1].shape.as_deref()),
            ("dense", None)
        );
        let with = |inputs: &str, feed: &str| {
            err(&format!(
                r#"{{"schema": 1, "name": "two", "input": {{"tensors": {inputs}}},
                    "model": {{"feed": "{feed}"}}, "output": {{"tensor": {{}}}}}}"#
            ))
        };
        let a = r#"{"name": "a", "dtype": "float32"}"#;
        for (inputs, feed, says) in [
            (
                "[]".to_string(),
                "stacked",
                "input.tensors: must name at least one input",
            ),
            (
                format!("[{a}, {a}]"),
                "stacked",
                "input.tensors[1].name: `a` appears twice",
            ),
            (
                r#"[{"name": "data", "dtype": "float32"}]"#.into(),
                "stacked",
                "input.tensors[0].name: `data` is reserved",
            ),
            (
                r#"[{"name": "a b", "dtype": "float32"}]"#.into(),
                "stacked",
                "input.tensors[0].name: must be 1 to 64",
            ),
            (
                r#"[{"name": "a", "dtype": "float32", "shape": [3, 0]}]"#.into(),
                "stacked",
                "input.tensors[0].shape[1]: each axis must be positive",
            ),
            (
                format!("[{a}]"),
                "list",
                "model.feed: `tensors` input is fed `stacked`",
            ),
            (
                format!("[{a}]"),
                "tokens",
                "model.feed: `tokens` needs `text` input",
            ),
        ] {
            let got = with(&inputs, feed);
            assert!(got.contains(says), "{inputs} {feed}: {got}");
        }
    }

    #[test]
    fn several_named_tensor_outputs() {
        let with = |model: &str, post: &str, output: &str| {
            HandlerManifest::parse(
                "h.json",
                format!(
                    r#"{{"schema": 1, "name": "two", "input": {{"tensor": {{"dtype": "float32"}}}},
                        "model": {model}, "postprocess": [{post}], "output": {{"tensors": {output}}}}}"#
                )
                .as_bytes(),
            )
        };
        let stacked = r#"{"feed": "stacked"}"#;
        let m = with(stacked, "", r#"["logits", "embedding"]"#).unwrap();
        assert_eq!(
            m.output,
            Output::Tensors(vec!["logits".into(), "embedding".into()])
        );
        for (model, post, output, says) in [
            (
                stacked,
                "",
                "[]",
                "output.tensors: must name at least one output",
            ),
            (
                stacked,
                "",
                r#"["a", "a"]"#,
                "output.tensors[1]: `a` appears twice",
            ),
            (
                stacked,
                "",
                r#"["a/b"]"#,
                "output.tensors[0]: must be 1 to 64",
            ),
            (
                r#"{"feed": "stacked", "output": {"index": 0}}"#,
                "",
                r#"["a"]"#,
                "model.output: an output of several tensors takes them all",
            ),
            (
                stacked,
                r#"{"sigmoid": {}}"#,
                r#"["a"]"#,
                "postprocess: postprocess stages work on one tensor",
            ),
            (
                r#"{"feed": "list"}"#,
                "",
                r#"["a"]"#,
                "a model fed a list answers `tensor`",
            ),
        ] {
            let e = with(model, post, output).unwrap_err().to_string();
            assert!(e.contains(says), "{model} {post} {output}: {e}");
        }
    }

    #[test]
    fn model_config_handler_settings() {
        let mut m = builtin("image_classifier").unwrap();
        let ignored = m
            .apply_settings(&serde_json::json!({"top_k": 3, "something_else": "kept for Python"}))
            .unwrap();
        assert!(matches!(m.output, Output::Classes { top_k: Some(3), .. }));
        assert_eq!(ignored.len(), 1, "{ignored:?}");
        assert!(
            ignored[0].starts_with("handler.something_else is ignored"),
            "{ignored:?}"
        );
        assert!(
            m.apply_settings(&serde_json::json!({"topk": 2}))
                .unwrap()
                .is_empty()
        );
        assert!(matches!(m.output, Output::Classes { top_k: Some(2), .. }));
        assert!(m.apply_settings(&serde_json::json!({"top_k": 0})).is_err());
        assert!(m.apply_settings(&serde_json::json!([1])).is_err());
        let mut d = builtin("object_detector").unwrap();
        d.apply_settings(&serde_json::json!({"threshold": 0.8}))
            .unwrap();
        assert!(matches!(d.output, Output::Detections { threshold, .. } if threshold == 0.8));
        let mut t = builtin("tensor").unwrap();
        let ignored = t.apply_settings(&serde_json::json!({"topk": 0})).unwrap();
        assert!(
            ignored[0].contains("handler tensor has none"),
            "{ignored:?}"
        );
    }

    #[test]
    fn a_python_handler_is_twinned_by_the_manifest_of_its_name() {
        for h in [
            "my_handler.py",
            "my_handler.py:handle",
            "my_handler",
            "src/my_handler.py",
        ] {
            assert_eq!(
                twin_manifest_name(h).as_deref(),
                Some("my_handler.json"),
                "{h}"
            );
        }
        assert_eq!(twin_manifest_name("my.json"), None);
        assert_eq!(twin_manifest_name(":handle"), None);
    }

    #[test]
    fn torchserve_handler_modules_name_builtins() {
        for h in [
            "serve/ts/torch_handler/image_classifier.py:handle",
            "ts/torch_handler/image_classifier.py",
            "/opt/serve/ts/torch_handler/image_classifier.py",
            "ts.torch_handler.image_classifier",
            "ts.torch_handler.image_classifier:handle",
        ] {
            assert_eq!(torchserve_module(h), Some("image_classifier"), "{h}");
        }
        assert_eq!(
            torchserve_module("ts/torch_handler/base_handler.py"),
            Some("base_handler")
        );
        for h in [
            "my_handler.py",
            "image_classifier.py",
            "ts/torch_handler/vllm_handler.py",
            "ts/torch_handler/unknown.py:handle",
            "other/torch_handler/image_classifier.py",
        ] {
            assert_eq!(torchserve_module(h), None, "{h}");
        }
    }

    #[test]
    fn parses_a_full_manifest() {
        let m = HandlerManifest::parse("h.json", CLASSIFIER.as_bytes()).unwrap();
        assert_eq!(m.preprocess.len(), 4);
        assert_eq!(
            m.preprocess[0],
            Preprocess::Resize {
                size: Size::Scalar(256),
                interpolation: Interpolation::Bilinear,
                antialias: true
            }
        );
        assert_eq!(m.referenced_files(), vec!["index_to_name.json"]);
    }

    #[test]
    fn type_errors_name_stage_and_field() {
        let e = err(&CLASSIFIER.replace(
            r#"{"center_crop": {"size": 224}}"#,
            r#"{"center_crop": {"size": "big"}}"#,
        ));
        assert!(
            e.starts_with("handler manifest h.json: preprocess[1].center_crop.size:"),
            "{e}"
        );
        let e =
            err(&CLASSIFIER.replace(r#""resize": {"size": 256}"#, r#""resize": {"sise": 256}"#));
        assert!(
            e.contains("preprocess[0].resize") && e.contains("unknown field `sise`"),
            "{e}"
        );
        let e = err(&CLASSIFIER.replace(r#"{"to_tensor": {}}"#, r#"{"to_tensr": {}}"#));
        assert!(
            e.contains("preprocess[2]") && e.contains("unknown variant `to_tensr`"),
            "{e}"
        );
        let e = err(&CLASSIFIER.replace(r#""feed": "stacked""#, r#""feed": 3"#));
        assert!(e.contains("model.feed"), "{e}");
        let e = err(&CLASSIFIER.replace(r#"{"softmax": {"dim": 1}}"#, r#""sigmoid""#));
        assert!(
            e.contains(r#"postprocess[0].sigmoid: write it as an object: {"sigmoid": {}}"#),
            "{e}"
        );
        let e = err(
            r#"{"schema": 1, "name": "x", "model": {"feed": "stacked"}, "output": {"tensor": {}}}"#,
        );
        assert!(e.contains("missing field `input`"), "{e}");
    }

    #[test]
    fn semantic_errors_name_stage_and_field() {
        let cases = [
            (
                r#"{"normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}}"#,
                r#"{"normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.0, 0.2]}}"#,
                "preprocess[3].normalize.std[1]",
            ),
            (
                r#"{"center_crop": {"size": 224}}"#,
                r#"{"center_crop": {"size": [0, 3]}}"#,
                "preprocess[1].center_crop.size",
            ),
            (r#""top_k": 5"#, r#""top_k": 0"#, "output.classes.top_k"),
            (
                r#""labels": "index_to_name.json""#,
                r#""labels": "../x.json""#,
                "output.classes.labels",
            ),
            (r#""schema": 1"#, r#""schema": 2"#, "schema"),
            // The batch axis would mix the requests of one batch.
            (r#""dim": 1"#, r#""dim": 0"#, "postprocess[0].softmax.dim"),
            // Two values for three channels would be cycled over them.
            (
                r#""mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]"#,
                r#""mean": [0.5, 0.5], "std": [0.2, 0.2]"#,
                "preprocess[3].normalize",
            ),
            // A model fed a list answers per example: no stacked postprocessing.
            (r#""feed": "stacked""#, r#""feed": "list""#, "postprocess"),
        ];
        for (from, to, at) in cases {
            let e = err(&CLASSIFIER.replace(from, to));
            assert!(e.contains(&format!(": {at}: ")), "{at}: {e}");
        }
        let grey_rgb_stats = CLASSIFIER.replace(r#""image": {}"#, r#""image": {"mode": "L"}"#);
        assert!(
            err(&grey_rgb_stats).contains("a grey (mode L) image has one channel"),
            "{}",
            err(&grey_rgb_stats)
        );
        let listed = CLASSIFIER
            .replace(r#""postprocess": [{"softmax": {"dim": 1}}],"#, "")
            .replace(r#""feed": "stacked""#, r#""feed": "list""#);
        assert!(err(&listed).contains(": output: a model fed a list answers `tensor`"));
        let no_fixed_size = CLASSIFIER.replace(r#"{"center_crop": {"size": 224}}, "#, "");
        assert!(err(&no_fixed_size).contains("model.feed: stacking images needs a fixed size"));
        let reordered = CLASSIFIER.replace(
            r#"{"to_tensor": {}},
                       {"normalize""#,
            r#"{"normalize""#,
        );
        assert!(
            err(&reordered).contains("must come after to_tensor"),
            "{}",
            err(&reordered)
        );
    }
}
