//! The `image` input decoder and the image preprocess stages, run on worker threads.
//!
//! Stages follow torchvision's transforms on PIL images: `Resize` sets the shorter side (the
//! longer one truncated), resampling is PIL's convolution with an antialiasing support when
//! shrinking, `CenterCrop` rounds its offsets half to even and pads with zeros when the crop is
//! larger than the image, `ToTensor` scales to [0, 1] in CHW order.

use std::io::Cursor;

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, ImageDecoder, ImageReader};
use tch::{Kind, Tensor};
use tchserve_mar::handler::{ImageMode, Interpolation, Preprocess, Size};

use super::{jpeg, resample};
use crate::job::{Part, Payload, PredictError};

fn bad(msg: impl Into<String>) -> PredictError {
    PredictError::BadInput(msg.into())
}

/// An 8-bit RGB image, row-major HWC.
#[derive(Debug, Clone, PartialEq)]
pub struct Rgb {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width * height * 3` bytes.
    pub data: Vec<u8>,
}

/// The encoded image bytes of a request: raw, or base64 (alone, or as a JSON string, or under
/// `data` / `b64` in a JSON object).
fn image_bytes(part: &Part) -> Result<std::borrow::Cow<'_, [u8]>, PredictError> {
    let data: &[u8] = &part.data;
    let ct = part.content_type.as_deref().unwrap_or("");
    let first = data.iter().find(|b| !b.is_ascii_whitespace()).copied();
    let b64 = |text: &str| {
        tchserve_backend::base64::decode_lenient(text)
            .map(std::borrow::Cow::Owned)
            .map_err(|e| {
                bad(format!(
                    "the image is neither an encoded image nor valid base64: {e}"
                ))
            })
    };
    if ct.contains("json") || matches!(first, Some(b'{' | b'"')) {
        let v: serde_json::Value = serde_json::from_slice(data)
            .map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
        let text = match &v {
            serde_json::Value::String(s) => Some(s.as_str()),
            serde_json::Value::Object(o) => {
                ["data", "b64", "body"]
                    .iter()
                    .find_map(|k| match o.get(*k) {
                        Some(serde_json::Value::String(s)) => Some(s.as_str()),
                        Some(serde_json::Value::Object(inner)) => {
                            inner.get("b64").and_then(|b| b.as_str())
                        }
                        _ => None,
                    })
            }
            _ => None,
        };
        return match text {
            Some(t) => b64(t),
            None => Err(bad(
                "expected a base64 image as a JSON string or under \"data\" or \"b64\" (one \
                 image per request; several go to KServe v1's /v1/models/<model>:predict, one \
                 instance each)",
            )),
        };
    }
    let known = image::guess_format(data).is_ok();
    if !known
        && (ct.starts_with("text/")
            || data
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"+/=\r\n ".contains(b)))
    {
        let text =
            std::str::from_utf8(data).map_err(|_| bad("the image is not valid base64 text"))?;
        return b64(text);
    }
    Ok(std::borrow::Cow::Borrowed(data))
}

impl Rgb {
    /// A mid-grey picture, for made-up requests and for finding the shape preprocessing makes.
    pub fn grey(width: u32, height: u32) -> Self {
        Rgb {
            width,
            height,
            data: vec![128; (width * height * 3) as usize],
        }
    }
}

/// Whether a request to an image model sends the model's input itself rather than a picture:
/// numbers as JSON (a nested list, alone or under `data` or `instances`), or raw values with
/// their shape (`X-Tensor-Shape`, a typed protocol's tensor). TorchServe's vision handlers take
/// such a list as the preprocessed image, and its KServe samples send an MNIST digit that way.
pub fn sends_numbers(payload: &Payload) -> bool {
    let Some(part) = payload.main_part() else {
        return false;
    };
    if part.shape.is_some() || payload.shape.is_some() {
        return true;
    }
    let text = part.data.as_ref();
    let rest = skip_ws(text);
    let json = part
        .content_type
        .as_deref()
        .is_some_and(|ct| ct.contains("json"));
    match rest.first() {
        Some(b'[') => starts_numbers(rest),
        // A lone number, said to be JSON: the wrong shape, told so.
        Some(b'0'..=b'9' | b'-') => json,
        // Only the first key is looked at: reading the whole object would parse a base64
        // photo twice.
        Some(b'{') => {
            let rest = skip_ws(&rest[1..]);
            ["\"data\"", "\"instances\""].iter().any(|key| {
                rest.strip_prefix(key.as_bytes())
                    .map(skip_ws)
                    .and_then(|r| r.strip_prefix(b":"))
                    .map(skip_ws)
                    .is_some_and(|r| r.first() == Some(&b'[') && starts_numbers(r))
            })
        }
        _ => false,
    }
}

fn skip_ws(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(s.len());
    &s[start..]
}

/// Whether a JSON list's first element, past any nested opening brackets, is a number (or the
/// list is empty): a list of base64 strings or of `{"data": ...}` objects is not the model's
/// input.
fn starts_numbers(list: &[u8]) -> bool {
    list.iter()
        .find(|b| !(b.is_ascii_whitespace() || **b == b'['))
        .is_some_and(|b| b.is_ascii_digit() || matches!(b, b'-' | b']'))
}

/// Decodes the request's image to RGB, refusing images over `max_pixels` before decoding.
pub fn decode(payload: &Payload, max_pixels: u64) -> Result<Rgb, PredictError> {
    let part = payload
        .main_part()
        .ok_or_else(|| bad("the request has no body"))?;
    let bytes = image_bytes(part)?;
    let reader = ImageReader::new(Cursor::new(&bytes[..]))
        .with_guessed_format()
        .map_err(|e| bad(format!("cannot read the image: {e}")))?;
    let format = reader.format();
    match format {
        None => {
            return Err(bad(
                "the body is not an image tchserve can decode (JPEG, PNG, WebP, BMP, GIF or TIFF)",
            ));
        }
        // The JPEG decoder fills a cut-off scan with grey rather than fail; PIL refuses it.
        Some(image::ImageFormat::Jpeg) if !jpeg_is_complete(&bytes) => {
            return Err(bad(
                "cannot decode the image: the JPEG is truncated (its last scan has no end marker)",
            ));
        }
        Some(image::ImageFormat::Jpeg) => {
            if let Some(rgb) = decode_jpeg(&bytes, max_pixels)? {
                return Ok(rgb);
            }
        }
        Some(_) => {}
    }
    let img = match decode_whole(reader, max_pixels) {
        // A PNG cut off after its image data, before the final (empty) IEND chunk: PIL reads
        // it, the png crate wants the chunk. Given it, the same bytes decode as PIL reads them;
        // image data that is itself cut off still fails.
        Err(e) if format == Some(image::ImageFormat::Png) && lacks_iend(&bytes) => {
            let mut whole = Vec::with_capacity(bytes.len() + PNG_IEND.len());
            whole.extend_from_slice(&bytes);
            whole.extend_from_slice(&PNG_IEND);
            decode_whole(
                ImageReader::with_format(Cursor::new(&whole[..]), image::ImageFormat::Png),
                max_pixels,
            )
            .map_err(|_| e)?
        }
        other => other?,
    };
    // PIL reads a 16-bit colour image as 8-bit by keeping each sample's high byte, where the
    // image crate's conversion rounds (v / 257): a seventh of the values would differ by 1/255.
    // (16-bit grey is scaled, unlike PIL, whose conversion clips it to white above 255.)
    let (width, height) = (img.width(), img.height());
    let mut data = match &img {
        DynamicImage::ImageRgb16(b) => high_bytes(b.as_raw(), 3),
        DynamicImage::ImageRgba16(b) => high_bytes(b.as_raw(), 4),
        _ => img.to_rgb8().into_raw(),
    };
    if format == Some(image::ImageFormat::Gif) {
        fill_gif_canvas(&bytes, &mut data, width as usize);
    }
    Ok(Rgb {
        width,
        height,
        data,
    })
}

/// A PNG's final chunk: no data, its type, and its CRC.
const PNG_IEND: [u8; 12] = [0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82];

fn lacks_iend(png: &[u8]) -> bool {
    !png.windows(4).any(|w| w == b"IEND")
}

/// Decodes the whole image, refusing one over `max_pixels` before its pixels are read.
fn decode_whole(
    reader: ImageReader<Cursor<&[u8]>>,
    max_pixels: u64,
) -> Result<DynamicImage, PredictError> {
    // The format's decoder reads only the header until asked for pixels.
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| bad(format!("cannot decode the image: {e}")))?;
    let (w, h) = decoder.dimensions();
    check_pixels(w, h, max_pixels)?;
    let pixels = u64::from(w) * u64::from(h);
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(pixels.saturating_mul(16).max(1 << 20));
    decoder
        .set_limits(limits)
        .map_err(|e| bad(format!("cannot decode the image: {e}")))?;
    DynamicImage::from_decoder(decoder).map_err(|e| bad(format!("cannot decode the image: {e}")))
}

/// Paints the part of a GIF's canvas that its first frame leaves uncovered as PIL does: with the
/// palette colour of the frame's transparent index, or of index 0 when it has none (not the
/// header's background colour). The image crate leaves it black.
fn fill_gif_canvas(bytes: &[u8], rgb: &mut [u8], width: usize) {
    let mut options = gif::DecodeOptions::new();
    options.set_color_output(gif::ColorOutput::Indexed);
    // Only the headers are read here; the pixels were decoded already.
    let Ok(mut decoder) = options.read_info(Cursor::new(bytes)) else {
        return;
    };
    let global = decoder.global_palette().map(<[u8]>::to_vec);
    let Ok(Some(frame)) = decoder.next_frame_info() else {
        return;
    };
    let (left, top) = (usize::from(frame.left), usize::from(frame.top));
    let (right, bottom) = (
        left + usize::from(frame.width),
        top + usize::from(frame.height),
    );
    let index = usize::from(frame.transparent.unwrap_or(0));
    let palette = frame.palette.as_deref().or(global.as_deref());
    let Some(colour) = palette.and_then(|p| p.get(3 * index..3 * index + 3)) else {
        return;
    };
    if width == 0 {
        return;
    }
    for (i, px) in rgb.chunks_exact_mut(3).enumerate() {
        let (x, y) = (i % width, i / width);
        if x < left || x >= right || y < top || y >= bottom {
            px.copy_from_slice(colour);
        }
    }
}

/// The high byte of each pixel's first three samples, of pixels of `channels` 16-bit samples.
fn high_bytes(samples: &[u16], channels: usize) -> Vec<u8> {
    samples
        .chunks_exact(channels)
        .flat_map(|px| px[..3].iter().map(|v| (v >> 8) as u8))
        .collect()
}

/// Decodes a JPEG as PIL does (see [`jpeg`]); `None` for CMYK data, which the other decoder
/// takes.
fn decode_jpeg(bytes: &[u8], max_pixels: u64) -> Result<Option<Rgb>, PredictError> {
    let header = jpeg::header(bytes).map_err(|e| bad(format!("cannot decode the image: {e}")))?;
    if header.cmyk {
        return Ok(None);
    }
    check_pixels(header.width, header.height, max_pixels)?;
    let data = jpeg::decode_rgb(bytes, header)
        .map_err(|e| bad(format!("cannot decode the image: {e}")))?;
    Ok(Some(Rgb {
        width: header.width,
        height: header.height,
        data,
    }))
}

fn check_pixels(w: u32, h: u32, max_pixels: u64) -> Result<(), PredictError> {
    let pixels = u64::from(w) * u64::from(h);
    if pixels > max_pixels {
        return Err(bad(format!(
            "the image is {w}x{h} = {pixels} pixels, more than the {max_pixels} allowed (decompression bomb protection)"
        )));
    }
    Ok(())
}

/// Whether a JPEG's last scan is followed by the end-of-image marker. Neither marker can occur
/// inside entropy-coded data (a 0xFF byte there is followed by 0x00 or a restart marker), so a
/// file cut off anywhere in or before its last scan has no end marker after that scan's start.
fn jpeg_is_complete(data: &[u8]) -> bool {
    let last = |marker: u8| data.windows(2).rposition(|w| w == [0xFF, marker]);
    match (last(0xDA), last(0xD9)) {
        (Some(sos), Some(eoi)) => eoi > sos,
        _ => false,
    }
}

/// An example between stages: pixels until `to_tensor`, then floats.
enum Stage {
    Pixels(Rgb),
    /// CHW floats with their height and width.
    Floats(Vec<f32>, u32, u32),
}

/// Python's `round()`: halves go to the even neighbour.
fn round_half_even(x: f64) -> i64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && (r as i64) % 2 != 0 {
        (r - x.signum()) as i64
    } else {
        r as i64
    }
}

/// torchvision's output size for `Resize(size)`, as (width, height). Wide enough for any
/// aspect ratio: a 1 x 1,000,000 image resized to a shorter side of 256 is 256 x 256,000,000.
pub fn resized_size(w: u32, h: u32, size: Size) -> (u64, u64) {
    match size {
        Size::Pair([th, tw]) => (u64::from(tw), u64::from(th)),
        Size::Scalar(s) => {
            let (short, long) = if w <= h { (w, h) } else { (h, w) };
            let new_long = (f64::from(s) * f64::from(long) / f64::from(short.max(1))) as u64;
            let s = u64::from(s);
            if w <= h { (s, new_long) } else { (new_long, s) }
        }
    }
}

/// `CenterCrop`'s output size, as (width, height).
fn crop_size(size: Size) -> (u64, u64) {
    match size {
        Size::Scalar(s) => (u64::from(s), u64::from(s)),
        Size::Pair([h, w]) => (u64::from(w), u64::from(h)),
    }
}

/// Checks, before any pixel is touched, that no stage makes an image of more than `max_pixels`
/// pixels: the decoded size is checked by [`decode`], but a resize can multiply it (a 2 KB PNG of
/// 1 x 1,000,000 pixels asks for 65 billion), so every intermediate size is held to the same
/// limit and an image's memory stays within a few tens of bytes per allowed pixel.
pub fn check_sizes(
    width: u32,
    height: u32,
    stages: &[Preprocess],
    max_pixels: u64,
) -> Result<(), PredictError> {
    let (mut w, mut h) = (u64::from(width), u64::from(height));
    for op in stages {
        let (nw, nh, what) = match op {
            Preprocess::Resize { size, .. } => {
                if w == 0 || h == 0 || w > u64::from(u32::MAX) || h > u64::from(u32::MAX) {
                    return Err(bad(format!("the image is {w}x{h}: nothing to resize")));
                }
                let (nw, nh) = resized_size(w as u32, h as u32, *size);
                (nw, nh, "resizing")
            }
            Preprocess::CenterCrop { size } => {
                let (nw, nh) = crop_size(*size);
                (nw, nh, "cropping")
            }
            Preprocess::ToTensor {} | Preprocess::Normalize { .. } => continue,
        };
        let pixels = nw.saturating_mul(nh);
        if pixels > max_pixels || nw > u64::from(u32::MAX) || nh > u64::from(u32::MAX) {
            return Err(bad(format!(
                "the image is {width}x{height}; {what} it as the handler does makes it {nw}x{nh} = {pixels} pixels, more than the {max_pixels} allowed"
            )));
        }
        (w, h) = (nw, nh);
    }
    Ok(())
}

fn resize(
    img: &Rgb,
    size: Size,
    interpolation: Interpolation,
    antialias: bool,
) -> Result<Rgb, PredictError> {
    // `check_sizes` has held both sides to u32 and their product to the pixel limit.
    let (w, h) = resized_size(img.width, img.height, size);
    let (w, h) = (w as u32, h as u32);
    if (w, h) == (img.width, img.height) {
        return Ok(img.clone());
    }
    // What torchvision runs on a PIL image, and so what TorchServe's handlers feed their models.
    let pil = match interpolation {
        Interpolation::Bilinear if antialias => Some(resample::BILINEAR),
        Interpolation::Bicubic if antialias => Some(resample::BICUBIC),
        _ => None,
    };
    if let Some(filter) = pil {
        let data = resample::resize_rgb(
            &img.data,
            img.width as usize,
            img.height as usize,
            w.max(1) as usize,
            h.max(1) as usize,
            filter,
        );
        return Ok(Rgb {
            width: w.max(1),
            height: h.max(1),
            data,
        });
    }
    let failed = |e: &dyn std::fmt::Display| PredictError::ModelFailed(format!("resizing: {e}"));
    let src = Image::from_vec_u8(img.width, img.height, img.data.clone(), PixelType::U8x3)
        .map_err(|e| failed(&e))?;
    let mut dst = Image::new(w.max(1), h.max(1), PixelType::U8x3);
    let filter = match interpolation {
        Interpolation::Nearest => None,
        Interpolation::Bilinear => Some(FilterType::Bilinear),
        Interpolation::Bicubic => Some(FilterType::CatmullRom),
    };
    let alg = match filter {
        None => ResizeAlg::Nearest,
        Some(f) if antialias => ResizeAlg::Convolution(f),
        Some(f) => ResizeAlg::Interpolation(f),
    };
    Resizer::new()
        .resize(&src, &mut dst, &ResizeOptions::new().resize_alg(alg))
        .map_err(|e| failed(&e))?;
    Ok(Rgb {
        width: w.max(1),
        height: h.max(1),
        data: dst.into_vec(),
    })
}

fn center_crop(img: &Rgb, size: Size) -> Rgb {
    let (cw, ch) = crop_size(size);
    let (w, h) = (img.width as i64, img.height as i64);
    let (cw, ch) = (cw as i64, ch as i64);
    // Offsets into the source; negative when the crop is larger (then zero padding shows).
    let top = if ch > h {
        -((ch - h) / 2)
    } else {
        round_half_even((h - ch) as f64 / 2.0)
    };
    let left = if cw > w {
        -((cw - w) / 2)
    } else {
        round_half_even((w - cw) as f64 / 2.0)
    };
    let mut data = vec![0u8; (cw * ch * 3) as usize];
    for y in 0..ch {
        let sy = y + top;
        if sy < 0 || sy >= h {
            continue;
        }
        for x in 0..cw {
            let sx = x + left;
            if sx < 0 || sx >= w {
                continue;
            }
            let s = ((sy * w + sx) * 3) as usize;
            let d = ((y * cw + x) * 3) as usize;
            data[d..d + 3].copy_from_slice(&img.data[s..s + 3]);
        }
    }
    Rgb {
        width: cw as u32,
        height: ch as u32,
        data,
    }
}

fn to_floats(img: &Rgb, mode: ImageMode) -> Vec<f32> {
    let plane = (img.width * img.height) as usize;
    let mut out = vec![0f32; plane * mode.channels()];
    for (i, px) in img.data.chunks_exact(3).enumerate() {
        match mode {
            ImageMode::Rgb => {
                for c in 0..3 {
                    out[c * plane + i] = f32::from(px[c]) / 255.0;
                }
            }
            ImageMode::L => out[i] = f32::from(luma(px)) / 255.0,
        }
    }
    out
}

/// PIL's `convert("L")` of one RGB pixel: ITU-R 601-2 luma in 16-bit fixed point, rounded. A
/// grey pixel (r = g = b) keeps its value, so a grey image is read exactly as PIL opens it.
fn luma(px: &[u8]) -> u8 {
    let l = u32::from(px[0]) * 19595 + u32::from(px[1]) * 38470 + u32::from(px[2]) * 7471;
    ((l + 0x8000) >> 16) as u8
}

/// Runs the preprocess stages on one decoded image and returns a `[1, C, H, W]` tensor; no
/// stage may make an image of more than `max_pixels` pixels. With `pixels_only` the stages from
/// `ToTensor` on are left to [`finish`], and the answer is the image's `[1, H, W, 3]` bytes
/// (RGB mode only). In mode L the grey channel is taken at `ToTensor`, after resizing and
/// cropping: for a grey image that is PIL's answer exactly, and for a colour one resized on the
/// way it may differ from converting first by one level of 255.
pub fn preprocess(
    img: Rgb,
    stages: &[Preprocess],
    max_pixels: u64,
    pixels_only: bool,
    mode: ImageMode,
) -> Result<Tensor, PredictError> {
    check_sizes(img.width, img.height, stages, max_pixels)?;
    let on_host = match stages
        .iter()
        .position(|s| matches!(s, Preprocess::ToTensor {}))
    {
        Some(i) if pixels_only => &stages[..i],
        _ => stages,
    };
    let mut stage = Stage::Pixels(img);
    for op in on_host {
        stage = match (stage, op) {
            (
                Stage::Pixels(img),
                Preprocess::Resize {
                    size,
                    interpolation,
                    antialias,
                },
            ) => Stage::Pixels(resize(&img, *size, *interpolation, *antialias)?),
            (Stage::Pixels(img), Preprocess::CenterCrop { size }) => {
                Stage::Pixels(center_crop(&img, *size))
            }
            (Stage::Pixels(img), Preprocess::ToTensor {}) => {
                Stage::Floats(to_floats(&img, mode), img.height, img.width)
            }
            (Stage::Floats(mut v, h, w), Preprocess::Normalize { mean, std }) => {
                let plane = (h * w) as usize;
                for (c, chunk) in v.chunks_mut(plane).enumerate() {
                    let (m, s) = (mean[c % mean.len()] as f32, std[c % std.len()] as f32);
                    chunk.iter_mut().for_each(|x| *x = (*x - m) / s);
                }
                Stage::Floats(v, h, w)
            }
            _ => {
                return Err(PredictError::ModelFailed(
                    "preprocess stages out of order".into(),
                ));
            }
        };
    }
    match stage {
        Stage::Floats(v, h, w) => Tensor::from_slice(&v)
            .f_reshape([1, mode.channels() as i64, i64::from(h), i64::from(w)])
            .map_err(|e| PredictError::ModelFailed(e.to_string())),
        Stage::Pixels(img) => {
            let bytes = Tensor::from_slice(&img.data).f_reshape([
                1,
                i64::from(img.height),
                i64::from(img.width),
                3,
            ]);
            if pixels_only {
                return bytes.map_err(|e| PredictError::ModelFailed(e.to_string()));
            }
            bytes
                .and_then(|t| t.f_permute([0, 3, 1, 2]))
                .and_then(|t| t.f_to_kind(Kind::Float))
                .map_err(|e| PredictError::ModelFailed(e.to_string()))
        }
    }
}

/// The stages from `ToTensor` on, for batches of `[N, H, W, 3]` bytes that [`preprocess`] left
/// as pixels, with their constants already on the batches' device.
///
/// Each step is the host path's own arithmetic in float32 (a division by 255, then
/// `(x - mean) / std`), so the answers are the same. The constants are tensors on the device: a
/// CUDA kernel would multiply by the reciprocal of a host scalar, which rounds differently. They
/// are copied there once, when a worker starts: a copy from pageable host memory to a GPU waits
/// for everything queued on the device before it, so copying them for every batch held the
/// worker until the forwards before its batch had run, and nothing overlapped them.
#[derive(Debug)]
pub struct Finishing {
    steps: Vec<Step>,
}

#[derive(Debug)]
enum Step {
    /// `ToTensor`: `x / 255`.
    Div(Tensor),
    /// `Normalize`: `(x - mean) / std`, per channel.
    Normalize { mean: Tensor, std: Tensor },
}

impl Finishing {
    /// The stages of `stages` from `ToTensor` on, their constants on `device`.
    pub fn on(stages: &[Preprocess], device: tch::Device) -> Result<Self, tch::TchError> {
        let constant = |values: &[f32]| {
            Tensor::from_slice(values)
                .f_reshape([1, values.len() as i64, 1, 1])?
                .f_to_device(device)
        };
        let per_channel =
            |v: &[f64]| -> Vec<f32> { (0..3).map(|c| v[c % v.len()] as f32).collect() };
        let start = stages
            .iter()
            .position(|s| matches!(s, Preprocess::ToTensor {}))
            .unwrap_or(stages.len());
        let steps = stages[start..]
            .iter()
            .map(|op| match op {
                Preprocess::ToTensor {} => Ok(Step::Div(constant(&[255.0])?)),
                Preprocess::Normalize { mean, std } => Ok(Step::Normalize {
                    mean: constant(&per_channel(mean))?,
                    std: constant(&per_channel(std))?,
                }),
                other => Err(tch::TchError::Convert(format!(
                    "{other:?} cannot follow ToTensor"
                ))),
            })
            .collect::<Result<_, _>>()?;
        Ok(Finishing { steps })
    }

    /// Runs the stages on `pixels`, a batch on the constants' device.
    pub fn apply(&self, pixels: &Tensor) -> Result<Tensor, tch::TchError> {
        let mut x = pixels.f_permute([0, 3, 1, 2])?.f_to_kind(Kind::Float)?;
        for step in &self.steps {
            x = match step {
                Step::Div(by) => x.f_div(by)?,
                Step::Normalize { mean, std } => x.f_sub(mean)?.f_div(std)?,
            };
        }
        x.f_contiguous()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(data: Vec<u8>) -> Payload {
        Payload {
            parts: vec![Part {
                name: "body".into(),
                content_type: None,
                data: data.into(),
                shape: None,
            }],
            ..Payload::default()
        }
    }

    #[test]
    fn a_png_without_its_iend_chunk_is_read_as_pil_reads_it() {
        let pixels: Vec<u8> = (0..5 * 4 * 3).map(|i| (i * 37 % 251) as u8).collect();
        let mut png = Vec::new();
        image::RgbImage::from_raw(5, 4, pixels.clone())
            .unwrap()
            .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        assert!(png.ends_with(&PNG_IEND));
        let cut = png[..png.len() - PNG_IEND.len()].to_vec();
        let img = decode(&body(cut.clone()), u64::MAX).unwrap();
        assert_eq!((img.width, img.height, img.data), (5, 4, pixels));
        // Image data cut off is still refused, as PIL refuses it.
        let err = decode(&body(cut[..cut.len() - 8].to_vec()), u64::MAX).unwrap_err();
        assert!(matches!(err, PredictError::BadInput(_)), "{err:?}");
    }

    #[test]
    fn a_gif_canvas_outside_its_frame_is_palette_index_0_as_in_pil() {
        // An 8x6 canvas, background index 3 (yellow), palette red/green/blue/yellow, one 4x3
        // frame at (2, 1) of pixels 0, 1, 2, 0, ... with no transparency. PIL's
        // convert("RGB") paints the rest with index 0 (red), not the background colour.
        static GIF: [u8; 49] = [
            0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x08, 0x00, 0x06, 0x00, 0x81, 0x03, 0x00, 0xc8,
            0x0a, 0x0a, 0x0a, 0xc8, 0x0a, 0x0a, 0x0a, 0xc8, 0xfa, 0xfa, 0x00, 0x2c, 0x02, 0x00,
            0x01, 0x00, 0x04, 0x00, 0x03, 0x00, 0x00, 0x02, 0x0a, 0x04, 0x43, 0x11, 0x0c, 0x45,
            0x30, 0x14, 0xc1, 0x50, 0x05, 0x00, 0x3b,
        ];
        let payload = Payload {
            parts: vec![Part {
                name: "body".into(),
                content_type: None,
                data: bytes::Bytes::from_static(&GIF),
                shape: None,
            }],
            ..Payload::default()
        };
        let img = decode(&payload, u64::MAX).unwrap();
        assert_eq!((img.width, img.height), (8, 6));
        let px = |x: usize, y: usize| &img.data[3 * (y * 8 + x)..3 * (y * 8 + x) + 3];
        let (red, green, blue) = ([200, 10, 10], [10, 200, 10], [10, 10, 200]);
        assert_eq!(px(0, 0), red);
        assert_eq!(px(7, 5), red);
        assert_eq!(px(1, 1), red);
        // Inside the frame: its own pixels.
        assert_eq!(px(2, 1), red);
        assert_eq!(px(3, 1), green);
        assert_eq!(px(4, 1), blue);
        assert_eq!(px(2, 2), green);
    }

    #[test]
    fn luma_is_pils_and_keeps_grey_exact() {
        // PIL: Image.new("RGB", (1, 1), c).convert("L").getpixel((0, 0)).
        for (px, want) in [
            ([255, 0, 0], 76),
            ([0, 255, 0], 150),
            ([0, 0, 255], 29),
            ([12, 200, 99], 132),
        ] {
            assert_eq!(luma(&px), want, "{px:?}");
        }
        for v in 0..=255u8 {
            assert_eq!(luma(&[v, v, v]), v);
        }
    }

    #[test]
    fn wrapped_base64_is_read_as_the_tools_write_it() {
        use base64::Engine as _;
        let png: &[u8] = b"\x89PNG\r\n\x1a\n and the rest of an image";
        let plain = base64::engine::general_purpose::STANDARD.encode(png);
        // `base64` and MIME wrap at 76 columns (LF or CRLF), openssl at 64.
        let wrap = |width: usize, eol: &str| {
            plain
                .as_bytes()
                .chunks(width)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect::<Vec<_>>()
                .join(eol)
        };
        for (text, ct) in [
            (wrap(16, "\n"), "text/plain"),
            (wrap(16, "\r\n"), "text/plain"),
            (
                format!("data:image/png;base64,{}", wrap(20, "\n")),
                "text/plain",
            ),
            (
                serde_json::json!({"data": wrap(16, "\n")}).to_string(),
                "application/json",
            ),
        ] {
            let part = Part {
                name: "body".into(),
                content_type: Some(ct.into()),
                data: text.clone().into(),
                shape: None,
            };
            assert_eq!(image_bytes(&part).unwrap().as_ref(), png, "{text:?}");
        }
    }

    #[test]
    fn sixteen_bit_colour_keeps_the_high_byte_as_pil_reads_it() {
        // 0x80FF rounds to 0x81 but PIL keeps 0x80.
        for channels in [3u8, 4] {
            let samples: Vec<u16> = vec![0x80FF, 0x0180, 0xFFFF, 0x1234][..channels as usize]
                .iter()
                .copied()
                .cycle()
                .take(2 * channels as usize)
                .collect();
            let img = if channels == 3 {
                DynamicImage::ImageRgb16(image::ImageBuffer::from_raw(2, 1, samples).unwrap())
            } else {
                DynamicImage::ImageRgba16(image::ImageBuffer::from_raw(2, 1, samples).unwrap())
            };
            let mut png = Vec::new();
            img.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
                .unwrap();
            let payload = Payload {
                parts: vec![Part {
                    name: "body".into(),
                    content_type: None,
                    data: png.into(),
                    shape: None,
                }],
                ..Payload::default()
            };
            let rgb = decode(&payload, u64::MAX).unwrap();
            assert_eq!(rgb.data, [0x80, 0x01, 0xFF, 0x80, 0x01, 0xFF], "{channels}");
        }
    }

    #[test]
    fn output_sizes_follow_torchvision() {
        assert_eq!(resized_size(640, 480, Size::Scalar(256)), (341, 256));
        assert_eq!(resized_size(480, 640, Size::Scalar(256)), (256, 341));
        assert_eq!(resized_size(300, 300, Size::Scalar(256)), (256, 256));
        assert_eq!(resized_size(640, 480, Size::Pair([100, 200])), (200, 100));
        assert_eq!(
            resized_size(1, 1_000_000, Size::Scalar(256)),
            (256, 256_000_000)
        );
    }

    /// The device path (bytes batched, then [`Finishing`]) gives the host path's floats exactly, on
    /// the CPU and, where there is one, on a GPU.
    #[test]
    fn finishing_on_the_device_matches_the_host() {
        let classifier = tchserve_mar::handler::builtin("image_classifier").unwrap();
        let image = |seed: u32| Rgb {
            width: 300,
            height: 260,
            data: (0..300 * 260 * 3)
                .map(|i: u32| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 24) as u8)
                .collect(),
        };
        let stages = &classifier.preprocess;
        let host: Vec<Tensor> = (0..2)
            .map(|k| preprocess(image(k), stages, u64::MAX, false, ImageMode::Rgb).unwrap())
            .collect();
        let host = Tensor::cat(&host, 0);
        let bytes: Vec<Tensor> = (0..2)
            .map(|k| preprocess(image(k), stages, u64::MAX, true, ImageMode::Rgb).unwrap())
            .collect();
        let bytes = Tensor::cat(&bytes, 0);
        assert_eq!(bytes.kind(), Kind::Uint8);
        assert_eq!(bytes.size(), [2, 224, 224, 3]);
        let status = crate::device::cuda(crate::device::DevicePolicy::Auto);
        let mut devices = vec![tch::Device::Cpu];
        if status.devices > 0 {
            devices.push(tch::Device::Cuda(0));
        }
        for device in devices {
            let pinned = crate::device::pinned_cat(&[&bytes]).unwrap();
            let there = crate::device::upload(&pinned, device).unwrap();
            let done = Finishing::on(stages, device)
                .unwrap()
                .apply(&there)
                .unwrap()
                .to_device(tch::Device::Cpu);
            assert_eq!(done.size(), host.size());
            let differ = done.ne_tensor(&host).sum(Kind::Int64).int64_value(&[]);
            assert_eq!(differ, 0, "{differ} floats differ on {device:?}");
        }
    }

    #[test]
    fn every_intermediate_size_is_bounded() {
        let classifier = tchserve_mar::handler::builtin("image_classifier").unwrap();
        let limit = 89_478_485;
        check_sizes(640, 480, &classifier.preprocess, limit).unwrap();
        // A thin strip is small when decoded and enormous once its short side is 256.
        for (w, h) in [(1, 1_000_000), (1_000_000, 1), (1, 20_000)] {
            let e = check_sizes(w, h, &classifier.preprocess, limit).unwrap_err();
            assert!(
                matches!(&e, PredictError::BadInput(m) if m.contains("more than the 89478485 allowed")),
                "{e:?}"
            );
        }
        // A crop larger than the limit is refused too.
        let crop = [Preprocess::CenterCrop {
            size: Size::Scalar(100_000),
        }];
        assert!(check_sizes(10, 10, &crop, limit).is_err());
    }

    #[test]
    fn truncated_jpegs_are_told_apart() {
        let mut jpeg = Vec::new();
        image::DynamicImage::new_rgb8(64, 48)
            .write_to(&mut Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
            .unwrap();
        assert!(jpeg_is_complete(&jpeg));
        let mut trailing = jpeg.clone();
        trailing.extend_from_slice(b"trailing bytes some encoders leave");
        assert!(jpeg_is_complete(&trailing));
        for cut in [jpeg.len() - 2, jpeg.len() / 2, 20] {
            assert!(!jpeg_is_complete(&jpeg[..cut]), "cut at {cut}");
        }
    }

    #[test]
    fn python_rounding() {
        assert_eq!(round_half_even(0.5), 0);
        assert_eq!(round_half_even(1.5), 2);
        assert_eq!(round_half_even(2.5), 2);
        assert_eq!(round_half_even(58.5), 58);
        assert_eq!(round_half_even(1.2), 1);
    }

    #[test]
    fn crop_centres_and_pads() {
        let img = Rgb {
            width: 4,
            height: 3,
            data: (0..36).collect(),
        };
        let c = center_crop(&img, Size::Pair([1, 2]));
        // top = round(1.0) = 1, left = round(1.0) = 1 -> pixels (1,1) and (2,1).
        assert_eq!(c.data, [15, 16, 17, 18, 19, 20]);
        let p = center_crop(&img, Size::Scalar(5));
        assert_eq!((p.width, p.height), (5, 5));
        assert_eq!(&p.data[0..3], [0, 0, 0]);
    }
}
