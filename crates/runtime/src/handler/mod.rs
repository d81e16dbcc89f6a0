//! Handler manifests turned into running stages.
//!
//! A [`Pipeline`] is built once per worker from the archive's handler manifest. Per request it
//! decodes the payload and runs the preprocess stages ([`Pipeline::decode`]); per batch it runs
//! the model and the postprocess operations on all requests at once ([`Pipeline::launch`]) and
//! writes each request's answer ([`Pipeline::answer`]); [`Pipeline::run_batch`] does both. The
//! launch itself splits in two ([`Pipeline::submit`], [`Pipeline::land`]). On a GPU a worker
//! submits a batch and takes its next one, while a thread of its own lands the batch, waits for
//! the device and answers.

mod image_input;
mod jpeg;
mod json_numbers;
mod output;
mod resample;
pub(crate) mod tensor_input;
mod text_input;

use std::path::Path;

use tch::{Device, IValue, Kind, Tensor};

use crate::device::{cat_batch, upload};
use crate::forward_thread::Pending;
use crate::model::Model;
use tchserve_mar::handler::{
    DType, Feed, HandlerManifest, ImageMode, Input, Output, Postprocess, Preprocess, Select,
};

pub use image_input::{Rgb, decode as decode_image, preprocess as preprocess_image};
pub use tensor_input::{
    Decoded, Wrap, check_json_reading, decode as decode_tensor, decode_named as decode_tensors,
};

use crate::error::RuntimeError;
use crate::job::{Part, Payload, PredictError, Prediction, RawTensor};
use output::{Values, write_nested, write_str};

/// A handler ready to run.
#[derive(Debug)]
pub struct Pipeline {
    input: Input,
    preprocess: Vec<Preprocess>,
    feed: Feed,
    select: Option<Select>,
    post: Vec<Postprocess>,
    output: Output,
    labels: Option<Vec<String>>,
    text: Option<text_input::TextInput>,
    /// Where images stop at their bytes when decoded, `ToTensor` and `Normalize`, run on the
    /// batch once it is on the device (see [`Pipeline::finish_images_on`]). Only the worker's
    /// thread uses it; the lock makes the pipeline shareable with its answer thread.
    finishing: Option<std::sync::Mutex<image_input::Finishing>>,
    /// The length token batches are padded to at least: a package's static token count.
    pad_tokens_to: i64,
    /// What an image handler's preprocessing makes of one picture, `[C, H, W]` with -1 for a
    /// size that follows the picture's: the shape of the numbers a request may send instead.
    image_example: Vec<i64>,
}

/// A batch handed to the model, between [`Pipeline::submit`] and [`Pipeline::land`].
#[derive(Debug)]
pub struct InFlight(Flight);

impl InFlight {
    /// A batch that failed before it reached the model: it lands as that error.
    pub fn failed(e: PredictError) -> Self {
        InFlight(Flight::Failed(e))
    }
}

#[derive(Debug)]
enum Flight {
    Failed(PredictError),
    /// Already run to its answers (a model fed a list).
    Done(Launched),
    /// Its forward queued, or run where the model has no forward thread.
    Forward {
        pending: Pending,
        /// A text batch's attention mask, which the postprocessing may need.
        mask: Option<Tensor>,
        /// Examples in the batch: the first axis of every output.
        total: usize,
    },
}

/// A batch whose model run has been started, between [`Pipeline::launch`] and
/// [`Pipeline::answer`].
#[derive(Debug)]
pub enum Launched {
    /// Answers already written: a model fed a list answers as it runs.
    Answered(Vec<Prediction>),
    /// The batch's output after postprocessing, `[examples, ...]`, on the model's device and
    /// perhaps still being computed there.
    Output(Tensor),
    /// The batch's named outputs (an `output` of several tensors), in the handler's order,
    /// `[examples, ...]` each, as [`Launched::Output`].
    Outputs(Vec<Tensor>),
}

/// One input of a batch's requests as one tensor for `device`: `pick` chooses the input of each.
/// For a GPU it is in pinned host memory, and put on the device only if `upload_it`.
fn stack(
    inputs: &[&Decoded],
    device: Device,
    upload_it: bool,
    pick: impl Fn(&Decoded) -> &Decoded,
) -> Result<Tensor, PredictError> {
    let batch = if inputs.len() == 1 && !device.is_cuda() {
        pick(inputs[0])
            .owned_tensor()
            .map_err(|e| failed("copying the input", e))?
    } else {
        let parts: Vec<&Tensor> = inputs.iter().map(|d| &pick(d).tensor).collect();
        // One copy of the requests' bytes; for a GPU, straight into memory it copies from.
        cat_batch(&parts, device.is_cuda())
            .map_err(|e| PredictError::BadInput(format!("cannot batch inputs: {e}")))?
    };
    if !upload_it {
        return Ok(batch);
    }
    upload(&batch, device).map_err(|e| failed("moving input to the device", e))
}

/// A batch of images finished on `device` (see [`Pipeline::finish_images_on`]). Pictures come
/// as bytes and are finished together; a request that sent numbers sent the model's input
/// itself, already finished, so a batch holding one is finished picture by picture.
fn finish_on_device(
    finishing: &image_input::Finishing,
    inputs: &[&Decoded],
    device: Device,
) -> Result<Tensor, PredictError> {
    let on_device = |e| failed("preprocessing on the device", e);
    if inputs.iter().all(|d| d.tensor.kind() == Kind::Uint8) {
        let pixels = stack(inputs, device, true, |d| d)?;
        return finishing.apply(&pixels).map_err(on_device);
    }
    let parts = inputs
        .iter()
        .map(|d| {
            let t = upload(&d.tensor, device)?;
            if t.kind() == Kind::Uint8 {
                finishing.apply(&t)
            } else {
                Ok(t)
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(on_device)?;
    Tensor::f_cat(&parts, 0)
        .map_err(|e| PredictError::BadInput(format!("cannot batch inputs: {e}")))
}

/// Which archives' missing label files were logged lately.
static MISSING_LABELS: crate::error::Recently = crate::error::Recently::new();

/// Which whole failure messages were logged lately.
static WHOLE_MESSAGES: crate::error::Recently = crate::error::Recently::new();

/// How a failure inside the model's forward begins, as told apart from the handler's stages.
pub(crate) const MODEL_FAILED: &str = "the model failed";

fn failed(what: &str, e: impl std::fmt::Display) -> PredictError {
    let whole = e.to_string();
    let brief = crate::error::concise(&whole);
    if brief.len() < whole.len() {
        let whole = crate::error::one_line(&whole);
        // The answer carries the brief message; the whole one (a TorchScript traceback, a
        // kilobyte and more) goes to the log once a minute for each brief one and worker, so
        // that a client sending bad input all day does not fill the disk with copies of it. The
        // worker's thread is named after its model and version, as TorchServe names them.
        let thread = std::thread::current();
        let worker = thread.name().unwrap_or("");
        match WHOLE_MESSAGES.say(&format!("{worker} {brief}")) {
            Some(0) => tracing::warn!(worker, "{what}: {whole}"),
            Some(held) => tracing::warn!(
                worker,
                "{what} ({held} more times since this was last logged): {whole}"
            ),
            None => tracing::debug!(worker, "{what}: {whole}"),
        }
    }
    if out_of_memory(&whole) {
        return PredictError::OutOfMemory(format!("{what}: {brief}"));
    }
    // A package exported from channels_last examples checks for that layout, which no handler
    // gives; its own words do not say so.
    let hint = if whole.contains("unmatched stride value") {
        " (the package was exported for inputs in another memory layout, such as \
         channels_last: export it from contiguous example inputs)"
    } else {
        ""
    };
    PredictError::ModelFailed(format!("{what}: {brief}{hint}"))
}

/// Whether libtorch's error is an allocation that failed: the host's (`DefaultCPUAllocator:
/// can't allocate memory`) or a GPU's (`CUDA out of memory`), which a client may retry
/// elsewhere or later.
fn out_of_memory(message: &str) -> bool {
    message.contains("can't allocate memory")
        || message.contains("out of memory")
        || message.contains("OutOfMemoryError")
}

/// A forward's error: a shape the model cannot take (more examples than a `.pt2` package was
/// exported for) is bad input, anything else the model's failure.
fn forward_failed(e: tch::TchError) -> PredictError {
    match e {
        tch::TchError::Shape(message) => PredictError::BadInput(crate::error::concise(&message)),
        other => failed(MODEL_FAILED, other),
    }
}

/// The shape of one picture after `manifest`'s preprocessing (see `Pipeline::image_example`):
/// found by preprocessing two small grey pictures, one wide and one tall, whose sizes agree
/// where the stages fix them. Empty for other inputs.
fn image_example(manifest: &HandlerManifest) -> Vec<i64> {
    let Input::Image { max_pixels, mode } = manifest.input else {
        return Vec::new();
    };
    let free = vec![mode.channels() as i64, -1, -1];
    if manifest.model.feed != Feed::Stacked {
        return free;
    }
    let shape = |width: u32, height: u32| {
        let grey = image_input::Rgb::grey(width, height);
        image_input::preprocess(grey, &manifest.preprocess, max_pixels, false, mode)
            .ok()
            .map(|t| t.size()[1..].to_vec())
    };
    match (shape(64, 48), shape(48, 64)) {
        (Some(wide), Some(tall)) if wide.len() == 3 => wide
            .iter()
            .zip(&tall)
            .map(|(w, t)| if w == t { *w } else { -1 })
            .collect(),
        _ => free,
    }
}

impl Pipeline {
    /// Builds the stages of `manifest` for a model unpacked in `model_dir`.
    pub fn new(manifest: &HandlerManifest, model_dir: &Path) -> Result<Self, RuntimeError> {
        let text = match &manifest.input {
            Input::Text {
                tokenizer,
                max_length,
            } => Some(text_input::TextInput::load(
                model_dir,
                tokenizer,
                *max_length,
            )?),
            _ => None,
        };
        let labels = match &manifest.output {
            Output::Classes {
                labels: Some(file), ..
            }
            | Output::Argmax { labels: Some(file) }
            | Output::Detections {
                labels: Some(file), ..
            } => load_labels(model_dir, file)?,
            _ => None,
        };
        Ok(Pipeline {
            input: manifest.input.clone(),
            preprocess: manifest.preprocess.clone(),
            feed: manifest.model.feed,
            select: manifest.model.output.clone(),
            post: manifest.postprocess.clone(),
            output: manifest.output.clone(),
            labels,
            text,
            finishing: None,
            pad_tokens_to: 0,
            image_example: image_example(manifest),
        })
    }

    /// Leaves an image handler's `ToTensor` and `Normalize` to the batch on `device` when that
    /// is a GPU: the upload then carries one byte per channel instead of four, and the GPU does
    /// the arithmetic. Resizing and cropping stay on the host, where they match PIL exactly.
    pub fn finish_images_on(&mut self, device: Device) {
        // Grey images are made on the host, where the luma matches PIL's.
        let on_device = device.is_cuda()
            && matches!(
                self.input,
                Input::Image {
                    mode: ImageMode::Rgb,
                    ..
                }
            )
            && self.feed == Feed::Stacked
            && self
                .preprocess
                .iter()
                .any(|s| matches!(s, Preprocess::ToTensor {}));
        self.finishing = None;
        if on_device {
            match image_input::Finishing::on(&self.preprocess, device) {
                Ok(f) => self.finishing = Some(std::sync::Mutex::new(f)),
                Err(e) => tracing::warn!(
                    "images are finished on the host: their constants could not be put on \
                     {device:?}: {e}"
                ),
            }
        }
    }

    /// Fits a text handler to a package's token dimension (see [`crate::aoti::Length`]): a
    /// package exported for one length, as a model padded to `max_length` is exported, gets
    /// every batch padded to it; one that takes at most some length refuses a handler that
    /// keeps more, since longer texts would be answered with errors. Other handlers are left as
    /// they are.
    pub fn fit_token_length(&mut self, length: crate::aoti::Length) -> Result<(), String> {
        let (Some(text), Feed::Tokens) = (&self.text, self.feed) else {
            return Ok(());
        };
        let keeps = text.max_length() as i64;
        let too_few = |takes: String, n: i64| {
            format!(
                "the package takes {takes} tokens per text and the handler keeps up to {keeps}: \
                 set the text input's max_length to {n} or less in a handler manifest, or \
                 export with a dynamic length (torch.export.Dim)"
            )
        };
        if let Some(n) = length.fixed {
            if keeps > n {
                return Err(too_few(format!("exactly {n}"), n));
            }
            self.pad_tokens_to = n;
        } else if let Some(m) = length.max
            && keeps > m
        {
            return Err(too_few(format!("at most {m}"), m));
        }
        Ok(())
    }

    /// How many tensors `forward` is given: one per input (two for `tokens`), or one list.
    pub fn argument_tensors(&self) -> Option<usize> {
        match (&self.input, self.feed) {
            (_, Feed::List) => None,
            (_, Feed::Tokens) => Some(2),
            (Input::Tensors(inputs), _) => Some(inputs.len()),
            _ => Some(1),
        }
    }

    /// The names of a `tensors` input's inputs, in order; none for other inputs.
    pub fn input_names(&self) -> Vec<&str> {
        match &self.input {
            Input::Tensors(inputs) => inputs.iter().map(|i| i.name.as_str()).collect(),
            _ => Vec::new(),
        }
    }

    /// Whether the model is fed token ids and an attention mask.
    pub fn feeds_tokens(&self) -> bool {
        self.feed == Feed::Tokens
    }

    /// Whether the model is fed a list of examples rather than one batched tensor.
    pub fn feeds_list(&self) -> bool {
        self.feed == Feed::List
    }

    /// Turns one request into model input. Errors here are the client's (400).
    pub fn decode(&self, payload: &Payload) -> Result<Decoded, PredictError> {
        let mut decoded = self.decode_input(payload)?;
        decoded.want_tensor = payload.want_tensor;
        Ok(decoded)
    }

    fn decode_input(&self, payload: &Payload) -> Result<Decoded, PredictError> {
        match &self.input {
            Input::Tensor { dtype, shape } => {
                tensor_input::decode(payload, *dtype, shape.as_deref())
            }
            Input::Tensors(inputs) => tensor_input::decode_named(payload, inputs),
            Input::Image { .. } if image_input::sends_numbers(payload) => {
                tensor_input::decode(payload, DType::Float32, Some(&self.image_example)).map_err(
                    |e| match e {
                        PredictError::BadInput(why) if !why.contains("per-example shape") => {
                            PredictError::BadInput(format!(
                                "{why} (numbers sent to an image model are its input after \
                                 preprocessing, {} per picture)",
                                tensor_input::shape_text(&self.image_example)
                            ))
                        }
                        other => other,
                    },
                )
            }
            Input::Image { max_pixels, mode } => {
                let img = image_input::decode(payload, *max_pixels)?;
                let tensor = image_input::preprocess(
                    img,
                    &self.preprocess,
                    *max_pixels,
                    self.finishing.is_some(),
                    *mode,
                )?;
                Ok(Decoded::owned(tensor, 1, Wrap::Single))
            }
            Input::Text { .. } => match &self.text {
                Some(t) => t.decode(payload),
                None => Err(PredictError::ModelFailed(
                    "the tokenizer is not loaded".into(),
                )),
            },
        }
    }

    /// `batch` examples of zeros on `device` for each input, where the input is one tensor or
    /// several, each of fixed shape.
    fn zeros(&self, batch: usize, device: Device) -> Option<Vec<Tensor>> {
        let zeros = |dtype: DType, shape: Option<&[i64]>| {
            let shape = shape.filter(|s| s.iter().all(|d| *d > 0))?;
            let dims: Vec<i64> = std::iter::once(batch as i64)
                .chain(shape.iter().copied())
                .collect();
            Some(Tensor::zeros(&dims, (tensor_input::kind_of(dtype), device)))
        };
        match &self.input {
            Input::Tensor { dtype, shape } => Some(vec![zeros(*dtype, shape.as_deref())?]),
            Input::Tensors(inputs) => inputs
                .iter()
                .map(|i| zeros(i.dtype, i.shape.as_deref()))
                .collect(),
            Input::Image { .. } | Input::Text { .. } => None,
        }
    }

    /// The model's arguments for `batch` zero examples, on `device`, for warming the model up
    /// (only when every input's shape is fixed).
    pub fn warmup_input(&self, batch: usize, device: Device) -> Option<Vec<IValue>> {
        let zeros = self.zeros(batch, device)?;
        Some(match self.feed {
            // A model fed a list takes one tensor per example.
            Feed::List => vec![IValue::TensorList(
                (0..batch as i64).map(|i| zeros[0].get(i)).collect(),
            )],
            Feed::Stacked | Feed::Tokens => zeros.into_iter().map(IValue::Tensor).collect(),
        })
    }

    /// A made-up request of one example: zeros for a tensor input of fixed shape, a grey photo
    /// for images fed stacked (which a manifest brings to a fixed size), a short sentence for
    /// text. Answering it at load runs the output's selection, the postprocess stages and the
    /// answer's writing, whose mistakes (an index past a tuple, a softmax axis the output lacks,
    /// a colour pipeline before a grey model) would otherwise fail every request. `None` for
    /// other handlers: tensors of free shape, and images fed as a list, whose detectors are
    /// too slow to run for nothing.
    pub fn probe_request(&self) -> Option<Decoded> {
        match (&self.input, self.feed) {
            (Input::Image { max_pixels, mode }, Feed::Stacked) => {
                let tensor = image_input::preprocess(
                    image_input::Rgb::grey(64, 48),
                    &self.preprocess,
                    *max_pixels,
                    self.finishing.is_some(),
                    *mode,
                )
                .ok()?;
                return Some(Decoded::owned(tensor, 1, Wrap::Single));
            }
            (Input::Text { .. }, Feed::Tokens) => {
                let sentence = Payload {
                    parts: vec![Part {
                        name: "body".into(),
                        content_type: Some("text/plain".into()),
                        data: bytes::Bytes::from_static(b"A short sentence to try the model."),
                        shape: None,
                    }],
                    ..Payload::default()
                };
                return self.decode(&sentence).ok();
            }
            (_, Feed::Stacked) => {}
            _ => return None,
        }
        let mut zeros = self
            .zeros(1, Device::Cpu)?
            .into_iter()
            .map(|t| Decoded::owned(t, 1, Wrap::Single));
        let mut probe = zeros.next()?;
        probe.more = zeros.collect();
        Some(probe)
    }

    /// Whether the answers are the output tensor itself, whose type the typed protocols'
    /// metadata describes (other handlers answer labels, boxes or masks as JSON).
    pub fn answers_tensor(&self) -> bool {
        matches!(self.output, Output::Tensor {})
    }

    /// A warm-up forward's outputs as a batch's outputs are answered, after the postprocessing
    /// steps: the one tensor, or a handler's several named ones; none where the handler answers
    /// with something else, or needs a request to postprocess (a text handler's attention mask).
    pub fn warmup_output(&self, out: IValue) -> Vec<Tensor> {
        if self.feed == Feed::Tokens {
            return Vec::new();
        }
        match (&self.output, out) {
            (Output::Tensors(names), out) => named_outputs(out, names).unwrap_or_default(),
            (Output::Tensor {}, IValue::Tensor(t)) => {
                self.postprocess(t, None).into_iter().collect()
            }
            _ => Vec::new(),
        }
    }

    /// The arguments a text handler gives the model, for one short example: int64 token ids
    /// and attention mask, `[1, 8]` each (or of the length a package takes). None for other
    /// handlers.
    pub fn probe_tokens(&self, device: Device) -> Option<Vec<IValue>> {
        (self.feed == Feed::Tokens).then(|| {
            let length = if self.pad_tokens_to > 0 {
                self.pad_tokens_to
            } else {
                8
            };
            let ids = Tensor::zeros([1, length], (Kind::Int64, device));
            let mask = Tensor::ones([1, length], (Kind::Int64, device));
            vec![IValue::Tensor(ids), IValue::Tensor(mask)]
        })
    }

    /// Runs the model on a batch of decoded requests and writes one answer per request.
    pub fn run_batch(
        &self,
        module: &Model,
        device: Device,
        inputs: &[&Decoded],
    ) -> Result<Vec<Prediction>, PredictError> {
        let launched = self.launch(module, device, inputs)?;
        self.answer(launched, inputs)
    }

    /// Runs the model on a batch of decoded requests, up to the output it leaves on `device`:
    /// on a GPU that queues the batch's work and returns while it runs. Whatever may fail one
    /// request and not its batch-mates fails here, so the caller can retry them one by one.
    pub fn launch(
        &self,
        module: &Model,
        device: Device,
        inputs: &[&Decoded],
    ) -> Result<Launched, PredictError> {
        let flight = self.submit(module, device, inputs)?;
        self.land(flight)
    }

    /// The first half of [`Pipeline::launch`]: puts the batch on `device` and hands it to the
    /// model's forward thread, without waiting for the forward where the model has one (a GPU
    /// model), so that the caller can prepare its next batch while this one is launched.
    pub fn submit(
        &self,
        module: &Model,
        device: Device,
        inputs: &[&Decoded],
    ) -> Result<InFlight, PredictError> {
        let _guard = tch::no_grad_guard();
        if self.feed == Feed::List {
            return self
                .run_list(module, device, inputs)
                .map(|answers| InFlight(Flight::Done(Launched::Answered(answers))));
        }
        let (args, mask) = if self.feed == Feed::Tokens {
            let pad_id = self.text.as_ref().map_or(0, |t| t.pad_id);
            let (ids, mask) = text_input::pad_batch(inputs, pad_id, self.pad_tokens_to)
                .and_then(|(i, m)| Ok((upload(&i, device)?, upload(&m, device)?)))
                .map_err(|e| failed("batching the tokens", e))?;
            (
                vec![IValue::Tensor(ids), IValue::Tensor(mask.shallow_clone())],
                Some(mask),
            )
        } else {
            // A GPU model's forward thread puts the batch on the device just before its forward
            // (see `Model::submit`), so that batches queued for it wait in host memory; images
            // finished on the device go there first.
            let upload_here = !module.uploads_its_inputs();
            let batch = match &self.finishing {
                None => stack(inputs, device, upload_here, |d| d)?,
                Some(finishing) => {
                    let finishing = finishing.lock().unwrap_or_else(|p| p.into_inner());
                    finish_on_device(&finishing, inputs, device)?
                }
            };
            let mut args = vec![IValue::Tensor(batch)];
            // A model of several inputs: each stacked on its own, in the manifest's order.
            for k in 0..inputs.first().map_or(0, |d| d.more.len()) {
                let more = stack(inputs, device, upload_here, |d| &d.more[k])?;
                args.push(IValue::Tensor(more));
            }
            (args, None)
        };
        Ok(InFlight(Flight::Forward {
            pending: module.submit(args, device),
            mask,
            total: inputs.iter().map(|d| d.examples).sum(),
        }))
    }

    /// The second half of [`Pipeline::launch`]: waits for the forward to return (on a GPU, for
    /// its kernels to be queued) and queues the postprocessing after it.
    pub fn land(&self, flight: InFlight) -> Result<Launched, PredictError> {
        let (pending, mask, total) = match flight.0 {
            Flight::Failed(e) => return Err(e),
            Flight::Done(launched) => return Ok(launched),
            Flight::Forward {
                pending,
                mask,
                total,
            } => (pending, mask, total),
        };
        let _guard = tch::no_grad_guard();
        let out = self.selected(pending.wait().map_err(forward_failed)?)?;
        if let Output::Tensors(names) = &self.output {
            let outs = named_outputs(out, names)?;
            for (name, t) in names.iter().zip(&outs) {
                let dims = t.size();
                if dims.first().copied() != Some(total as i64) {
                    return Err(PredictError::ModelFailed(format!(
                        "the model's output '{name}' has shape {dims:?} for a batch of {total}: \
                         its first axis must be the batch"
                    )));
                }
            }
            return Ok(Launched::Outputs(outs));
        }
        let out = match out {
            IValue::Tensor(t) => t,
            other => {
                return Err(PredictError::ModelFailed(format!(
                    "the model returned {} where a tensor was expected; set model.output in the handler manifest",
                    ivalue_kind(&other)
                )));
            }
        };
        let out = self.postprocess(out, mask.as_ref())?;
        let out = match self.output {
            Output::Segmentation {} => best_class_map(&out)?,
            _ => out,
        };
        let dims = out.size();
        if dims.first().copied() != Some(total as i64) {
            return Err(PredictError::ModelFailed(format!(
                "the model returned shape {dims:?} for a batch of {total}: its first axis must be the batch"
            )));
        }
        Ok(Launched::Output(out))
    }

    /// Reads a launched batch's output back to the host, waiting for the device if it is still
    /// running, and writes one answer per request of `inputs`.
    pub fn answer(
        &self,
        launched: Launched,
        inputs: &[&Decoded],
    ) -> Result<Vec<Prediction>, PredictError> {
        let out = match launched {
            Launched::Answered(answers) => return Ok(answers),
            Launched::Outputs(outs) => return self.answer_named(&outs, inputs),
            Launched::Output(out) => out,
        };
        let _guard = tch::no_grad_guard();
        let dims = out.size();
        // argmax(1) of TorchServe's handlers needs an axis of classes after the batch's.
        if matches!(self.output, Output::Argmax { .. }) && dims.len() < 2 {
            return Err(PredictError::ModelFailed(format!(
                "an argmax output needs the model's output to be [batch, classes, ...], and it \
                 is {dims:?}"
            )));
        }
        // Typed protocols take a tensor output as it is; everything else is written as JSON.
        let raw = if self.answers_tensor() && inputs.iter().any(|d| d.want_tensor) {
            raw_output(&out)?
        } else {
            None
        };
        let values = if inputs.iter().any(|d| !d.want_tensor || raw.is_none()) {
            Some(Values::of(&out)?)
        } else {
            None
        };
        let row_dims = &dims[1..];
        let row_len: usize = row_dims.iter().map(|&d| d as usize).product();
        let mut answers = Vec::with_capacity(inputs.len());
        let mut row = 0;
        for d in inputs {
            let rows = row..row + d.examples;
            row += d.examples;
            match (&raw, &values) {
                (Some((dtype, bytes)), _) if d.want_tensor => {
                    answers.push(Prediction::Tensor(rows_of(
                        *dtype, bytes, row_dims, row_len, rows,
                    )));
                }
                (_, Some(values)) => {
                    answers.push(Prediction::Json(self.write_rows(
                        d.wrap,
                        rows,
                        |body, r| self.write_row(body, values, row_dims, r * row_len),
                    )));
                }
                _ => unreachable!("values are read whenever a request takes JSON"),
            }
        }
        Ok(answers)
    }

    /// Writes one answer per request of `inputs` from a batch's named outputs: for a typed
    /// protocol each output's rows, else `{"<name>": <row>, ...}` per example.
    fn answer_named(
        &self,
        outs: &[Tensor],
        inputs: &[&Decoded],
    ) -> Result<Vec<Prediction>, PredictError> {
        let Output::Tensors(names) = &self.output else {
            return Err(PredictError::ModelFailed(
                "named outputs from a handler that names none".into(),
            ));
        };
        let _guard = tch::no_grad_guard();
        // Typed protocols take the tensors as they are when each has a protocol type; when one
        // has none (float8, complex), they get the JSON answer as one BYTES output, as for a
        // single output, rather than fail the batch's other requests.
        let raws = if inputs.iter().any(|d| d.want_tensor) {
            let raws = outs.iter().map(raw_output).collect::<Result<Vec<_>, _>>()?;
            raws.into_iter().collect::<Option<Vec<_>>>()
        } else {
            None
        };
        let values = if inputs.iter().any(|d| !d.want_tensor || raws.is_none()) {
            Some(outs.iter().map(Values::of).collect::<Result<Vec<_>, _>>()?)
        } else {
            None
        };
        let dims: Vec<Vec<i64>> = outs.iter().map(|t| t.size()[1..].to_vec()).collect();
        let row_lens: Vec<usize> = dims
            .iter()
            .map(|d| d.iter().map(|&n| n as usize).product())
            .collect();
        let mut answers = Vec::with_capacity(inputs.len());
        let mut row = 0;
        for d in inputs {
            let rows = row..row + d.examples;
            row += d.examples;
            match (&raws, &values) {
                (Some(raws), _) if d.want_tensor => {
                    let tensors = names
                        .iter()
                        .zip(raws)
                        .zip(dims.iter().zip(&row_lens))
                        .map(|((name, (dtype, bytes)), (row_dims, row_len))| {
                            let raw = rows_of(*dtype, bytes, row_dims, *row_len, rows.clone());
                            (name.clone(), raw)
                        })
                        .collect();
                    answers.push(Prediction::Tensors(tensors));
                }
                (_, Some(values)) => {
                    answers.push(Prediction::Json(self.write_rows(
                        d.wrap,
                        rows,
                        |body, r| {
                            body.push('{');
                            for (k, name) in names.iter().enumerate() {
                                if k > 0 {
                                    body.push(',');
                                }
                                write_str(body, name);
                                body.push(':');
                                write_nested(body, &values[k], &dims[k], r * row_lens[k]);
                            }
                            body.push('}');
                        },
                    )));
                }
                _ => unreachable!("values are read whenever a request takes JSON"),
            }
        }
        Ok(answers)
    }

    /// `forward([x1, x2, ...])` for models that take a list of examples (detectors).
    fn run_list(
        &self,
        module: &Model,
        device: Device,
        inputs: &[&Decoded],
    ) -> Result<Vec<Prediction>, PredictError> {
        let mut list = Vec::new();
        for d in inputs {
            let t = d
                .owned_tensor()
                .and_then(|t| upload(&t, device))
                .map_err(|e| failed("preparing the input", e))?;
            for i in 0..d.examples as i64 {
                list.push(t.f_get(i).map_err(|e| failed("preparing the input", e))?);
            }
        }
        let total = list.len();
        // A package exported for a list of n runs n at a time, its last forward padded; a
        // TorchScript module takes the whole list.
        let piece = module.list_len().unwrap_or(total).max(1);
        let mut items = Vec::with_capacity(total);
        for part in list.chunks(piece) {
            let part_list = part.iter().map(Tensor::shallow_clone).collect();
            let out = self.forward(module, vec![IValue::TensorList(part_list)])?;
            let got = match out {
                IValue::GenericList(got) | IValue::Tuple(got) => got,
                IValue::TensorList(got) => got.into_iter().map(IValue::Tensor).collect(),
                other => {
                    return Err(PredictError::ModelFailed(format!(
                        "the model returned {} where a list of {} results was expected",
                        ivalue_kind(&other),
                        part.len()
                    )));
                }
            };
            // A package's forward is padded to its full list, and answers the copies too.
            let expected = if module.list_len().is_some() {
                piece
            } else {
                part.len()
            };
            if got.len() != expected {
                return Err(PredictError::ModelFailed(format!(
                    "the model returned a list of {} results for {expected} inputs",
                    got.len()
                )));
            }
            items.extend(got.into_iter().take(part.len()));
        }
        let mut answers = Vec::with_capacity(inputs.len());
        let mut items = items.into_iter();
        for d in inputs {
            let mine: Vec<IValue> = items.by_ref().take(d.examples).collect();
            let mut written = Vec::with_capacity(mine.len());
            for item in &mine {
                let mut s = String::new();
                match &self.output {
                    Output::Detections { threshold, .. } => {
                        self.write_detections(&mut s, item, *threshold)?
                    }
                    _ => match item {
                        IValue::Tensor(t) => {
                            let v = Values::of(t)?;
                            write_nested(&mut s, &v, &t.size(), 0);
                        }
                        other => {
                            return Err(PredictError::ModelFailed(format!(
                                "cannot write {} as JSON",
                                ivalue_kind(other)
                            )));
                        }
                    },
                }
                written.push(s);
            }
            answers.push(Prediction::Json(self.write_rows(
                d.wrap,
                0..written.len(),
                |body, r| body.push_str(&written[r]),
            )));
        }
        Ok(answers)
    }

    /// Wraps a request's rows as its answer: bare, as a list, or as `{"predictions": [...]}`.
    fn write_rows(
        &self,
        wrap: Wrap,
        rows: std::ops::Range<usize>,
        mut row: impl FnMut(&mut String, usize),
    ) -> Vec<u8> {
        let mut body = String::new();
        match wrap {
            Wrap::Single => row(&mut body, rows.start),
            Wrap::List | Wrap::Predictions => {
                if wrap == Wrap::Predictions {
                    body.push_str("{\"predictions\":");
                }
                body.push('[');
                for (i, r) in rows.enumerate() {
                    if i > 0 {
                        body.push(',');
                    }
                    row(&mut body, r);
                }
                body.push(']');
                if wrap == Wrap::Predictions {
                    body.push('}');
                }
            }
        }
        body.into_bytes()
    }

    fn forward(&self, module: &Model, args: Vec<IValue>) -> Result<IValue, PredictError> {
        self.selected(module.forward_is(&args).map_err(forward_failed)?)
    }

    /// The part of the model's output the manifest's `select` names, or all of it.
    fn selected(&self, out: IValue) -> Result<IValue, PredictError> {
        match &self.select {
            None => Ok(out),
            Some(sel) => select(out, sel),
        }
    }

    fn postprocess(&self, mut t: Tensor, mask: Option<&Tensor>) -> Result<Tensor, PredictError> {
        for op in &self.post {
            t = match op {
                Postprocess::Softmax { dim } => {
                    // Over the first axis, the batch's requests would share one distribution.
                    let axis = if *dim < 0 { dim + t.dim() as i64 } else { *dim };
                    if axis == 0 {
                        return Err(PredictError::ModelFailed(format!(
                            "softmax over axis {dim} of the model's {}-dimensional output is \
                             over the batch, whose rows are different requests: use an axis \
                             past the first",
                            t.dim()
                        )));
                    }
                    t.f_softmax(*dim, Kind::Float)
                }
                Postprocess::Sigmoid {} => t.f_sigmoid(),
                Postprocess::L2Normalize {} => t
                    .f_norm_scalaropt_dim(2, [-1i64].as_slice(), true)
                    .and_then(|n| t.f_div(&n.clamp_min(1e-12))),
                Postprocess::MeanPool {} => match mask {
                    Some(mask) => mean_pool(&t, mask),
                    None => {
                        return Err(PredictError::ModelFailed(
                            "mean_pool needs text input".into(),
                        ));
                    }
                },
            }
            .map_err(|e| failed("postprocessing", e))?;
        }
        Ok(t)
    }

    fn label(&self, class: usize) -> String {
        self.labels
            .as_ref()
            .and_then(|l| l.get(class))
            .cloned()
            .unwrap_or_else(|| class.to_string())
    }

    fn write_row(&self, out: &mut String, values: &Values, dims: &[i64], offset: usize) {
        match &self.output {
            Output::Classes { top_k, .. } => {
                let n: usize = dims.iter().map(|&d| d as usize).product();
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by(|&a, &b| {
                    values
                        .get_f64(offset + b)
                        .total_cmp(&values.get_f64(offset + a))
                });
                order.truncate(top_k.map_or(n, |k| k as usize));
                out.push('{');
                for (i, class) in order.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_str(out, &self.label(class));
                    out.push(':');
                    values.write(out, offset + class);
                }
                out.push('}');
            }
            Output::Argmax { .. } => self.write_argmax(out, values, dims, offset),
            Output::Embedding {} => {
                out.push_str("{\"embedding\":");
                write_nested(out, values, dims, offset);
                out.push('}');
            }
            _ => write_nested(out, values, dims, offset),
        }
    }

    /// The best class of one example, `argmax` over its first axis as TorchServe's
    /// `argmax(1)` takes it over the batch's second: a label or index for `[classes]`, nested
    /// lists of them for `[classes, ...]` (a class per pixel, say). Of equal scores the first
    /// wins, and NaN beats any number, as in torch.argmax.
    fn write_argmax(&self, out: &mut String, values: &Values, dims: &[i64], offset: usize) {
        let Some((&classes, rest)) = dims.split_first() else {
            // Refused before any row is written: the output has a class axis.
            return;
        };
        let inner: usize = rest.iter().map(|&d| d as usize).product();
        let better = |a: f64, b: f64| (a.is_nan() && !b.is_nan()) || a > b;
        let best = |j: usize| {
            (1..classes as usize).fold(0, |best, c| {
                let (v, b) = (
                    values.get_f64(offset + c * inner + j),
                    values.get_f64(offset + best * inner + j),
                );
                if better(v, b) { c } else { best }
            })
        };
        let write_one = |out: &mut String, class: usize| match self
            .labels
            .as_ref()
            .and_then(|l| l.get(class))
        {
            Some(label) => write_str(out, label),
            None => out.push_str(&class.to_string()),
        };
        // Position j of the remaining axes, written as nested lists of their sizes.
        output::write_nested_with(out, rest, 0, &mut |out, j| write_one(out, best(j)));
    }

    /// `[{"<label>": [x1, y1, x2, y2], "score": s}, ...]` from one detector result dict.
    fn write_detections(
        &self,
        out: &mut String,
        item: &IValue,
        threshold: f64,
    ) -> Result<(), PredictError> {
        let field = |key: &str| -> Result<Tensor, PredictError> {
            match item {
                IValue::GenericDict(entries) => entries
                    .iter()
                    .find_map(|(k, v)| match (k, v) {
                        (IValue::String(s), IValue::Tensor(t)) if s == key => {
                            Some(t.shallow_clone())
                        }
                        _ => None,
                    })
                    .ok_or_else(|| {
                        PredictError::ModelFailed(format!("the detector's result has no {key:?}"))
                    }),
                other => Err(PredictError::ModelFailed(format!(
                    "expected a dict per image, found {}",
                    ivalue_kind(other)
                ))),
            }
        };
        let (boxes, labels, scores) = (
            Values::of(&field("boxes")?)?,
            Values::of(&field("labels")?)?,
            Values::of(&field("scores")?)?,
        );
        // A model's outputs are not to be trusted to agree: index only what is there.
        let n = scores.len();
        if boxes.len() != 4 * n || labels.len() != n {
            return Err(PredictError::ModelFailed(format!(
                "the detector returned {n} scores, {} labels and {} box coordinates; \
                 expected one label and 4 box coordinates per score",
                labels.len(),
                boxes.len()
            )));
        }
        out.push('[');
        let mut first = true;
        for i in 0..n {
            if scores.get_f64(i) < threshold {
                continue;
            }
            if !first {
                out.push(',');
            }
            first = false;
            out.push('{');
            write_str(out, &self.label(labels.get_f64(i) as usize));
            out.push_str(":[");
            for k in 0..4 {
                if k > 0 {
                    out.push(',');
                }
                boxes.write(out, i * 4 + k);
            }
            out.push_str("],\"score\":");
            scores.write(out, i);
            out.push('}');
        }
        out.push(']');
        Ok(())
    }
}

/// A tensor's elements as little-endian bytes with their dtype, or `None` for element types
/// the typed protocols have no name for.
/// One request's `rows` of a batch's output, read back as `bytes` of `dtype`, each row of
/// shape `row_dims` (`row_len` elements).
fn rows_of(
    dtype: DType,
    bytes: &[u8],
    row_dims: &[i64],
    row_len: usize,
    rows: std::ops::Range<usize>,
) -> RawTensor {
    let size = dtype.size() * row_len;
    RawTensor {
        dtype,
        shape: std::iter::once(rows.len() as i64)
            .chain(row_dims.iter().copied())
            .collect(),
        data: bytes[rows.start * size..rows.end * size].to_vec(),
    }
}

fn raw_output(t: &Tensor) -> Result<Option<(tchserve_mar::handler::DType, Vec<u8>)>, PredictError> {
    let Some(dtype) = tensor_input::dtype_of(t.kind()) else {
        return Ok(None);
    };
    let flat = t
        .f_to_device(Device::Cpu)
        .and_then(|t| t.f_contiguous())
        .map_err(|e| failed("reading the model output", e))?;
    let mut bytes = vec![0u8; flat.numel() * dtype.size()];
    flat.f_copy_data_u8(&mut bytes, flat.numel())
        .map_err(|e| failed("reading the model output", e))?;
    // libtorch stores elements in the machine's order; the protocols carry little-endian.
    if cfg!(target_endian = "big") {
        for chunk in bytes.chunks_mut(dtype.size()) {
            chunk.reverse();
        }
    }
    Ok(Some((dtype, bytes)))
}

/// Mean of `[N, L, H]` token embeddings over the tokens the mask marks, as sentence-transformers
/// pools.
fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor, tch::TchError> {
    let m = mask.f_unsqueeze(-1)?.f_to_kind(hidden.kind())?;
    let summed = hidden
        .f_mul(&m)?
        .f_sum_dim_intlist([1i64].as_slice(), false, hidden.kind())?;
    let counts = m
        .f_sum_dim_intlist([1i64].as_slice(), false, hidden.kind())?
        .f_clamp_min(1e-9)?;
    summed.f_div(&counts)
}

/// Per pixel `[class, score]` of the best class: `[N, C, H, W]` scores to `[N, H, W, 2]`.
fn best_class_map(out: &Tensor) -> Result<Tensor, PredictError> {
    let (values, indices) = out
        .f_max_dim(1, false)
        .map_err(|e| failed("postprocessing", e))?;
    let indices = indices
        .f_to_kind(values.kind())
        .map_err(|e| failed("postprocessing", e))?;
    Tensor::f_stack(&[indices, values], 3).map_err(|e| failed("postprocessing", e))
}

fn select(out: IValue, sel: &Select) -> Result<IValue, PredictError> {
    match (out, sel) {
        (IValue::Tuple(mut items) | IValue::GenericList(mut items), Select::Index(i))
            if *i < items.len() =>
        {
            Ok(items.swap_remove(*i))
        }
        (IValue::TensorList(mut items), Select::Index(i)) if *i < items.len() => {
            Ok(IValue::Tensor(items.swap_remove(*i)))
        }
        (IValue::GenericDict(items), Select::Key(k)) => items
            .into_iter()
            .find(|(key, _)| matches!(key, IValue::String(s) if s == k))
            .map(|(_, v)| v)
            .ok_or_else(|| {
                PredictError::ModelFailed(format!("the model's output has no key {k:?}"))
            }),
        (IValue::Tuple(items), Select::Index(i)) => Err(PredictError::ModelFailed(format!(
            "model.output index {i} is past the model's output, a tuple of {}",
            items.len()
        ))),
        (IValue::GenericList(items), Select::Index(i)) => Err(PredictError::ModelFailed(format!(
            "model.output index {i} is past the model's output, a list of {}",
            items.len()
        ))),
        (IValue::TensorList(items), Select::Index(i)) => Err(PredictError::ModelFailed(format!(
            "model.output index {i} is past the model's output, a list of {}",
            items.len()
        ))),
        (other, Select::Index(i)) => Err(PredictError::ModelFailed(format!(
            "model.output index {i} needs a tuple or list output; the model gave {}",
            ivalue_kind(&other)
        ))),
        (other, Select::Key(k)) => Err(PredictError::ModelFailed(format!(
            "model.output key {k:?} needs a dict output; the model gave {}",
            ivalue_kind(&other)
        ))),
    }
}

/// The tensors `names` name in a model's output: a tuple's or list's elements in order, a
/// dict's entries by key, or the output itself when it is one tensor and one is named.
fn named_outputs(out: IValue, names: &[String]) -> Result<Vec<Tensor>, PredictError> {
    let tensor = |name: &String, v: IValue| match v {
        IValue::Tensor(t) => Ok(t),
        other => Err(PredictError::ModelFailed(format!(
            "the model's output '{name}' is {}, not a tensor",
            ivalue_kind(&other)
        ))),
    };
    let items: Vec<IValue> = match out {
        IValue::Tuple(items) | IValue::GenericList(items) => items,
        IValue::TensorList(items) => items.into_iter().map(IValue::Tensor).collect(),
        IValue::GenericDict(entries) => {
            let keys = || {
                let keys: Vec<String> = entries
                    .iter()
                    .map(|(k, _)| match k {
                        IValue::String(s) => format!("'{s}'"),
                        other => ivalue_kind(other).to_string(),
                    })
                    .collect();
                keys.join(", ")
            };
            if let Some(name) = names.iter().find(|name| {
                !entries
                    .iter()
                    .any(|(k, _)| matches!(k, IValue::String(s) if s == *name))
            }) {
                return Err(PredictError::ModelFailed(format!(
                    "the model's output has no entry '{name}'; its entries are {}",
                    keys()
                )));
            }
            let mut entries = entries;
            return names
                .iter()
                .map(|name| {
                    let at = entries
                        .iter()
                        .position(|(k, _)| matches!(k, IValue::String(s) if s == name))
                        .expect("every name was found above");
                    tensor(name, entries.swap_remove(at).1)
                })
                .collect();
        }
        IValue::Tensor(t) if names.len() == 1 => vec![IValue::Tensor(t)],
        other => {
            return Err(PredictError::ModelFailed(format!(
                "the handler names {} outputs and the model returned {}",
                names.len(),
                ivalue_kind(&other)
            )));
        }
    };
    if items.len() != names.len() {
        return Err(PredictError::ModelFailed(format!(
            "the handler names {} outputs and the model returned {}",
            names.len(),
            items.len()
        )));
    }
    names
        .iter()
        .zip(items)
        .map(|(name, v)| tensor(name, v))
        .collect()
}

fn ivalue_kind(v: &IValue) -> &'static str {
    match v {
        IValue::Tensor(_) => "a tensor",
        IValue::Tuple(_) => "a tuple",
        IValue::GenericList(_) | IValue::TensorList(_) => "a list",
        IValue::GenericDict(_) => "a dict",
        _ => "a non-tensor value",
    }
}

/// Reads the archive's label file `file` (see [`tchserve_mar::handler::parse_labels`]); a
/// missing file means class indices are used as labels, as in TorchServe.
fn load_labels(model_dir: &Path, file: &str) -> Result<Option<Vec<String>>, RuntimeError> {
    let path = &model_dir.join(file);
    let Ok(text) = std::fs::read_to_string(path) else {
        // Said once for all the workers of a version, which each build their pipeline; the
        // path is the unpacked archive's, a folder the user never made.
        if MISSING_LABELS.first_in_a_while(&path.to_string_lossy()) {
            let file = path.file_name().unwrap_or_default().to_string_lossy();
            tracing::warn!(
                "the archive has no {file}, so classes are answered by their index; to answer \
                 them by name, archive the labels with --extra-files {file}"
            );
        }
        return Ok(None);
    };
    // Named as the archive names it: the unpacked folder is one the user never made.
    tchserve_mar::handler::parse_labels(&text)
        .map(Some)
        .map_err(|why| RuntimeError::NoModel(format!("the archive's label file {file}: {why}")))
}

#[cfg(test)]
mod tests {
    use super::tensor_input::tests::body as json_body;
    use super::*;

    /// A pipeline of two named outputs, and one request of one example wanting tensors and one
    /// wanting JSON, as a v2 and a TorchServe request batched together.
    fn two_outputs() -> (Pipeline, Decoded, Decoded) {
        let manifest = HandlerManifest::parse(
            "two.json",
            br#"{"schema": 1, "name": "two",
                "input": {"tensors": [{"name": "x", "dtype": "float32", "shape": [2]}]},
                "model": {"feed": "stacked"}, "output": {"tensors": ["a", "b"]}}"#,
        )
        .unwrap();
        let pipeline = Pipeline::new(&manifest, Path::new(".")).unwrap();
        let mut typed = Decoded::owned(
            Tensor::zeros([1, 2], (Kind::Float, Device::Cpu)),
            1,
            Wrap::Single,
        );
        typed.want_tensor = true;
        let json = Decoded::owned(
            Tensor::zeros([1, 2], (Kind::Float, Device::Cpu)),
            1,
            Wrap::Single,
        );
        (pipeline, typed, json)
    }

    #[test]
    fn argmax_answers_the_best_label_or_its_index() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("labels.json"),
            r#"{"0": "cat", "1": "dog"}"#,
        )
        .unwrap();
        let manifest = |labels: &str| {
            HandlerManifest::parse(
                "best.json",
                format!(
                    r#"{{"schema": 1, "name": "best",
                        "input": {{"tensor": {{"dtype": "float32", "shape": [3]}}}},
                        "model": {{"feed": "stacked"}}, "output": {{"argmax": {{{labels}}}}}}}"#
                )
                .as_bytes(),
            )
            .unwrap()
        };
        let one = |_| {
            Decoded::owned(
                Tensor::zeros([1, 3], (Kind::Float, Device::Cpu)),
                1,
                Wrap::Single,
            )
        };
        let requests: Vec<Decoded> = (0..3).map(one).collect();
        let batch: Vec<&Decoded> = requests.iter().collect();
        // Ties go to the first, as torch.argmax breaks them.
        let scores =
            Tensor::from_slice(&[0.1f32, 0.7, 0.2, 0.9, 0.0, 0.1, 0.3, 0.3, 0.5]).view([3, 3]);
        let bodies = |pipeline: &Pipeline| -> Vec<String> {
            pipeline
                .answer(Launched::Output(scores.shallow_clone()), &batch)
                .unwrap()
                .into_iter()
                .map(|p| match p {
                    Prediction::Json(b) => String::from_utf8(b.to_vec()).unwrap(),
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        let plain = Pipeline::new(&manifest(""), dir.path()).unwrap();
        assert_eq!(bodies(&plain), ["1", "0", "2"]);
        let labelled = Pipeline::new(&manifest(r#""labels": "labels.json""#), dir.path()).unwrap();
        // A class the label file does not name is answered by its index.
        assert_eq!(bodies(&labelled), ["\"dog\"", "\"cat\"", "2"]);
        let single = |out: Tensor| {
            plain
                .answer(Launched::Output(out), &batch[..1])
                .map(|answers| match &answers[0] {
                    Prediction::Json(b) => String::from_utf8(b.to_vec()).unwrap(),
                    other => panic!("{other:?}"),
                })
        };
        // Over the classes axis of a [batch, classes, ...] output, one answer per position,
        // as argmax(1) gives them; NaN wins, as in torch.argmax.
        let map = Tensor::from_slice(&[1.0f32, 9.0, 3.0, 4.0, 5.0, 6.0]).view([1, 2, 3]);
        assert_eq!(single(map).unwrap(), "[1,0,1]");
        let nan = Tensor::from_slice(&[1.0f32, f32::NAN, 0.0]).view([1, 3]);
        assert_eq!(single(nan).unwrap(), "1");
        // An output without a class axis has no argmax to answer.
        let e = single(Tensor::from_slice(&[0.5f32])).unwrap_err();
        assert!(e.to_string().contains("[batch, classes, ...]"), "{e}");
    }

    #[test]
    fn an_output_the_typed_protocols_cannot_carry_is_answered_as_json() {
        let (pipeline, typed, json) = two_outputs();
        let a = Tensor::from_slice(&[1.5f32, -2.0]).view([2, 1]);
        let answer = |b: &Tensor| {
            let outs = vec![a.shallow_clone(), b.shallow_clone()];
            pipeline
                .answer(Launched::Outputs(outs), &[&typed, &json])
                .unwrap()
        };
        // Both carried: the typed request gets tensors, the other JSON.
        let answers = answer(&Tensor::from_slice(&[3i64, 4]).view([2, 1]));
        assert!(matches!(&answers[0], Prediction::Tensors(t) if t.len() == 2));
        assert!(
            matches!(&answers[1], Prediction::Json(b) if b.as_slice() == br#"{"a":[-2.0],"b":[4]}"#.as_slice()),
            "{answers:?}"
        );
        // float8 has no protocol type: both get JSON, with the values as floats.
        let b = Tensor::from_slice(&[0.5f32, 2.0])
            .view([2, 1])
            .to_kind(Kind::Float8e4m3fn);
        let answers = answer(&b);
        assert!(
            matches!(&answers[0], Prediction::Json(body) if body.as_slice() == br#"{"a":[1.5],"b":[0.5]}"#.as_slice()),
            "{answers:?}"
        );
        assert!(
            matches!(&answers[1], Prediction::Json(body) if body.as_slice() == br#"{"a":[-2.0],"b":[2.0]}"#.as_slice()),
            "{answers:?}"
        );
    }

    #[test]
    fn labels_in_every_torchserve_form() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let load = |p: std::path::PathBuf| {
            load_labels(dir.path(), p.file_name().unwrap().to_str().unwrap())
        };
        let plain = write("a.json", r#"{"0": "cat", "2": "dog"}"#);
        assert_eq!(load(plain).unwrap().unwrap(), ["cat", "1", "dog"]);
        let pairs = write(
            "b.json",
            r#"{"1": ["n02", "tabby"], "0": ["n01", "tench"]}"#,
        );
        assert_eq!(load(pairs).unwrap().unwrap(), ["tench", "tabby"]);
        let names = write(
            "c.json",
            r#"{"object_type_names": ["__background__", "person"]}"#,
        );
        assert_eq!(load(names).unwrap().unwrap(), ["__background__", "person"]);
        assert_eq!(load(dir.path().join("missing.json")).unwrap(), None);
        for (text, says) in [
            (r#"{"zero": "cat"}"#, "key \"zero\" is not a class index"),
            (r#"["cat", "dog"]"#, "found an array"),
            ("cat\ndog\n", "it is not JSON"),
            (r#"{"0": 7}"#, "the label of class 0 is not a string"),
        ] {
            let e = load(write("d.json", text)).unwrap_err().to_string();
            assert!(
                e.contains("the archive's label file d.json: ") && e.contains(says),
                "{text}: {e}"
            );
        }
    }

    fn image_pipeline(stages: &str) -> Pipeline {
        image_pipeline_fed(stages, "stacked")
    }

    fn image_pipeline_fed(stages: &str, feed: &str) -> Pipeline {
        let manifest = HandlerManifest::parse(
            "img.json",
            format!(
                r#"{{"schema": 1, "name": "img", "input": {{"image": {{}}}},
                    "preprocess": [{stages}], "model": {{"feed": "{feed}"}},
                    "output": {{"tensor": {{}}}}}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        Pipeline::new(&manifest, Path::new(".")).unwrap()
    }

    const CROPPED: &str = r#"{"resize": {"size": 6}}, {"center_crop": {"size": 4}},
        {"to_tensor": {}}, {"normalize": {"mean": [0.5], "std": [0.25]}}"#;

    #[test]
    fn an_image_model_takes_numbers_of_the_preprocessed_shape() {
        let p = image_pipeline(CROPPED);
        assert_eq!(p.image_example, [3, 4, 4]);
        // Fed as a list, the sizes follow the picture's.
        let free = image_pipeline_fed(r#"{"resize": {"size": 6}}, {"to_tensor": {}}"#, "list");
        assert_eq!(free.image_example, [3, -1, -1]);
        let fixed = image_pipeline(r#"{"resize": {"size": [5, 7]}}, {"to_tensor": {}}"#);
        assert_eq!(fixed.image_example, [3, 5, 7]);

        let one: Vec<f32> = (0..48).map(|i| i as f32 / 8.0).collect();
        let nested = Tensor::from_slice(&one).view([3, 4, 4]);
        let text = |t: &Tensor| {
            let v: Vec<f32> = Vec::try_from(t.flatten(0, -1)).unwrap();
            let rows: Vec<String> = v
                .chunks(4)
                .map(|r| format!("{r:?}"))
                .collect::<Vec<_>>()
                .chunks(4)
                .map(|plane| format!("[{}]", plane.join(",")))
                .collect();
            rows.chunks(3)
                .map(|pic| format!("[{}]", pic.join(",")))
                .collect::<Vec<_>>()
                .join(",")
        };
        let picture = text(&nested);
        for (body, examples, wrap) in [
            (picture.clone(), 1, Wrap::Single),
            (format!("{{\"data\": {picture}}}"), 1, Wrap::Single),
            (format!("[{picture}, {picture}]"), 2, Wrap::List),
            (
                format!("{{\"instances\": [{picture}]}}"),
                1,
                Wrap::Predictions,
            ),
        ] {
            let d = p.decode(&json_body(&body)).unwrap();
            assert_eq!((d.examples, d.wrap), (examples, wrap), "{body}");
            assert_eq!(d.tensor.size(), [examples as i64, 3, 4, 4]);
            assert!(d.tensor.get(0).equal(&nested), "{body}");
        }
        let e = p
            .decode(&json_body("[[1.0, 2.0], [3.0, 4.0]]"))
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("its input after preprocessing, [3, 4, 4] per picture"),
            "{e}"
        );
    }

    #[test]
    fn numbers_are_told_from_pictures_by_their_first_bytes() {
        let says = |body: &str| image_input::sends_numbers(&json_body(body));
        for numbers in [
            "[[[0.5]]]",
            " [ [-1e3",
            r#"{"data": [[[1]]]}"#,
            r#"{ "instances" : [[[0.1]]]}"#,
            "[]",
            "[[], [], []]",
            "1.0",
        ] {
            assert!(says(numbers), "{numbers}");
        }
        for picture in [
            r#""iVBORw0KGgo=""#,
            r#"{"data": "iVBORw0KGgo="}"#,
            r#"{"data": {"b64": "iVBORw0KGgo="}}"#,
            r#"["iVBORw0KGgo="]"#,
            r#"{"instances": [{"data": "iVBORw0KGgo="}]}"#,
            r#"{"name": "x", "data": [1]}"#,
            "\u{ff}\u{d8}\u{ff}",
        ] {
            assert!(!says(picture), "{picture}");
        }
        let mut raw = json_body("\0\0\0\0");
        raw.parts[0].content_type = Some("application/octet-stream".into());
        assert!(!image_input::sends_numbers(&raw));
        raw.parts[0].shape = Some("1,1,1".into());
        assert!(image_input::sends_numbers(&raw));
    }

    #[test]
    fn numbers_and_pictures_finished_on_the_device_share_a_batch() {
        let mut p = image_pipeline(CROPPED);
        let finishing = image_input::Finishing::on(&p.preprocess, Device::Cpu).unwrap();
        p.finishing = Some(std::sync::Mutex::new(finishing));
        let grey = || image_input::Rgb {
            width: 8,
            height: 6,
            data: (0..8 * 6 * 3).map(|i| (i * 5 % 256) as u8).collect(),
        };
        let on_host =
            image_input::preprocess(grey(), &p.preprocess, 1 << 20, false, ImageMode::Rgb).unwrap();
        let pixels =
            image_input::preprocess(grey(), &p.preprocess, 1 << 20, true, ImageMode::Rgb).unwrap();
        assert_eq!(pixels.kind(), Kind::Uint8);
        let picture = Decoded::owned(pixels, 1, Wrap::Single);
        let numbers = Decoded::owned(on_host.shallow_clone() * 2.0, 1, Wrap::Single);
        let finishing = p.finishing.as_ref().unwrap().lock().unwrap();
        let both = finish_on_device(&finishing, &[&picture, &numbers], Device::Cpu).unwrap();
        assert_eq!(both.size(), [2, 3, 4, 4]);
        assert!(both.get(0).allclose(&on_host.get(0), 1e-6, 1e-6, false));
        assert!(both.get(1).equal(&(on_host.get(0) * 2.0)));
        let alone = finish_on_device(&finishing, &[&picture, &picture], Device::Cpu).unwrap();
        assert!(alone.get(1).allclose(&on_host.get(0), 1e-6, 1e-6, false));
    }
}
