//! The `text` input decoder: UTF-8 text to token ids with a Hugging Face `tokenizer.json`.

use std::path::Path;

use tch::Tensor;
use tokenizers::{Tokenizer, TruncationParams};

use super::{Decoded, Wrap};
use crate::error::RuntimeError;
use crate::job::{Payload, PredictError};

fn bad(msg: impl Into<String>) -> PredictError {
    PredictError::BadInput(msg.into())
}

/// A loaded tokenizer, truncating to a maximum length; padding is done per batch.
#[derive(Debug)]
pub struct TextInput {
    tokenizer: Tokenizer,
    max_length: usize,
    /// Id used to pad a batch to its longest example.
    pub pad_id: i64,
}

impl TextInput {
    /// The most tokens a text is cut to.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Loads `file` from the unpacked archive.
    pub fn load(model_dir: &Path, file: &str, max_length: u32) -> Result<Self, RuntimeError> {
        let path = model_dir.join(file);
        if !path.exists() {
            let why = if model_dir.join("source_vocab.pt").exists() {
                format!(
                    "this archive is for TorchServe's text_classifier (a torchtext vocabulary, source_vocab.pt), \
                     which tchserve does not support: add a Hugging Face {file} to the archive (--extra-files)"
                )
            } else {
                format!("the handler needs the tokenizer {file} in the archive (--extra-files)")
            };
            return Err(RuntimeError::UnsupportedHandler(why));
        }
        let mut tokenizer = Tokenizer::from_file(&path).map_err(|e| {
            RuntimeError::UnsupportedHandler(format!("{file}: not a usable tokenizer: {e}"))
        })?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_length as usize,
                ..TruncationParams::default()
            }))
            .map_err(|e| RuntimeError::UnsupportedHandler(format!("{file}: {e}")))?;
        tokenizer.with_padding(None);
        let vocab = tokenizer.get_vocab(true);
        let pad_id = ["[PAD]", "<pad>"]
            .iter()
            .find_map(|t| vocab.get(*t))
            .map_or(0, |&i| i64::from(i));
        Ok(TextInput {
            tokenizer,
            max_length: max_length as usize,
            pad_id,
        })
    }

    /// Tokenizes the request's text into a `[1, tokens]` tensor of ids.
    pub fn decode(&self, payload: &Payload) -> Result<Decoded, PredictError> {
        let part = payload
            .main_part()
            .ok_or_else(|| bad("the request has no body"))?;
        if part.shape.is_some() || payload.dtype.is_some() {
            return Err(bad(
                "the model takes text, and a tensor of numbers was sent (send the text as a \
                 string: a BYTES element in KServe v2)",
            ));
        }
        let text =
            std::str::from_utf8(&part.data).map_err(|_| bad("the text is not valid UTF-8"))?;
        // JSON when the client says so; text when it says `text/...` (a review may well start
        // with a quotation mark); else, as curl labels everything a form, by the first character.
        let ct = part
            .content_type
            .as_deref()
            .unwrap_or("")
            .to_ascii_lowercase();
        let json = ct.contains("json")
            || (!ct.starts_with("text/")
                && matches!(text.trim_start().chars().next(), Some('{' | '"')));
        let text = if json {
            let v: serde_json::Value = serde_json::from_str(text)
                .map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
            match v {
                serde_json::Value::String(s) => s,
                serde_json::Value::Object(o) => ["data", "text", "body"]
                    .iter()
                    .find_map(|k| o.get(*k).and_then(|v| v.as_str()).map(str::to_owned))
                    .ok_or_else(|| {
                        bad("expected the text as a JSON string or under \"data\" or \"text\"")
                    })?,
                _ => {
                    return Err(bad(
                        "expected the text as a JSON string or under \"data\" or \"text\"",
                    ));
                }
            }
        } else {
            text.to_string()
        };
        let encoding = self
            .tokenizer
            .encode(enough_of(&text, self.max_length), true)
            .map_err(|e| bad(format!("cannot tokenize the text: {e}")))?;
        let ids: Vec<i64> = encoding.get_ids().iter().map(|&i| i64::from(i)).collect();
        if ids.is_empty() {
            return Err(bad("the text has no tokens"));
        }
        let n = ids.len() as i64;
        let tensor = Tensor::from_slice(&ids)
            .f_reshape([1, n])
            .map_err(|e| PredictError::ModelFailed(e.to_string()))?;
        Ok(Decoded::owned(tensor, 1, Wrap::Single))
    }
}

/// Characters kept per token of `max_length`, beyond which the text is cut: enough for words
/// far longer than any tokenizer turns into more than one unknown token (WordPiece's limit is
/// 100 characters a word), few enough that a megabyte without spaces is not tokenized whole.
const MAX_CHARS_PER_TOKEN: usize = 400;

/// The start of `text` that is enough for the first `max_length` tokens: the tokenizer truncates
/// to those anyway, and tokenizing megabytes it will throw away takes seconds. A word (between
/// whitespace) with a character that can make a token makes at least one, so the first
/// `max_length + 1` such words give the same first tokens as the whole text. Whitespace,
/// control and format characters and combining marks, which tokenizers' normalizers drop or
/// fold into their neighbours, count toward neither limit: a text padded with a megabyte of
/// spaces or NULs still reaches its words.
fn enough_of(text: &str, max_length: usize) -> &str {
    let max_chars = max_length.saturating_mul(MAX_CHARS_PER_TOKEN);
    let (mut words, mut chars) = (0, 0);
    let mut counted = false;
    for (at, c) in text.char_indices() {
        if c.is_whitespace() {
            counted = false;
            continue;
        }
        if !makes_tokens(c) {
            continue;
        }
        chars += 1;
        if chars > max_chars {
            return &text[..at];
        }
        if !counted {
            counted = true;
            words += 1;
            if words > max_length + 1 {
                return &text[..at];
            }
        }
    }
    text
}

/// Whether `c` (not whitespace) can make a token on its own: not a control or format character
/// (soft hyphen, zero-width and bidi marks, BOM), a nonspacing mark (accents, Hebrew and Arabic
/// points, Thai vowel marks: BERT's normalizer strips them) or U+FFFD, which it drops.
fn makes_tokens(c: char) -> bool {
    use unicode_categories::UnicodeCategories as _;
    !(c.is_control()
        || c.is_mark_nonspacing()
        || matches!(c,
            '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}' | '\u{FFFD}'))
}

/// Pads a batch of `[1, len]` id tensors to the longest: `(ids, attention_mask)`, both `[N, L]`.
pub fn pad_batch(
    inputs: &[&Decoded],
    pad_id: i64,
    at_least: i64,
) -> Result<(Tensor, Tensor), tch::TchError> {
    let longest = inputs
        .iter()
        .map(|d| d.tensor.size()[1])
        .max()
        .unwrap_or(0)
        .max(at_least);
    let n = inputs.len() as i64;
    let ids = Tensor::f_full([n, longest], pad_id, (tch::Kind::Int64, tch::Device::Cpu))?;
    let mask = Tensor::f_zeros([n, longest], (tch::Kind::Int64, tch::Device::Cpu))?;
    for (i, d) in inputs.iter().enumerate() {
        let len = d.tensor.size()[1];
        ids.f_get(i as i64)?
            .f_narrow(0, 0, len)?
            .f_copy_(&d.tensor.f_get(0)?)?;
        let _ = mask.f_get(i as i64)?.f_narrow(0, 0, len)?.f_fill_(1)?;
    }
    Ok((ids, mask))
}

#[cfg(test)]
mod tests {
    use super::enough_of;

    #[test]
    fn only_as_much_text_as_the_tokens_need() {
        assert_eq!(enough_of("a b c", 8), "a b c");
        assert_eq!(enough_of("one two three four five", 2), "one two three ");
        assert_eq!(enough_of("  é ü ö ä", 1), "  é ü ");
        let long = "x".repeat(10_000);
        assert_eq!(enough_of(&long, 2).len(), 800);
        let huge = "word ".repeat(1_000_000);
        assert_eq!(enough_of(&huge, 128).split_whitespace().count(), 129);
    }

    #[test]
    fn what_makes_no_token_never_hides_the_words_after_it() {
        let sentence = "I love this movie";
        for padding in [
            " ",
            "\r\n",
            "\0",
            "\u{00AD} ",
            "\u{200B}",
            "\u{FFFD} ",
            "\u{05B0} ",
            "\u{0E31} ",
            "\u{064B} ",
        ] {
            let text = format!("{}{sentence}", padding.repeat(13_000));
            assert!(enough_of(&text, 128).ends_with(sentence), "{padding:?}");
        }
        // 128 words of 150 letters (one unknown token each, in WordPiece) are all kept.
        let words = vec!["y".repeat(150); 200].join(" ");
        assert_eq!(enough_of(&words, 128).split_whitespace().count(), 129);
    }
}
