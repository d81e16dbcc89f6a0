//! What a `.pt2` package (AOTInductor) says of the inputs it takes, read from the package
//! itself without loading it: how many examples one forward takes, and how long a text model's
//! token dimension may be. The server checks a registration against these before any worker
//! loads the package; the runtime fits its batches to them.

use std::path::Path;

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
    pub const ANY: BatchRange = BatchRange { min: 1, max: None };

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
/// backed_size_oblivious=True)` keeps the 1. The runtime pads a smaller batch up to the
/// lower bound.
pub fn batch_range(path: &Path) -> Result<BatchRange, String> {
    Ok(wrapper_source(path)?.map_or(BatchRange::ANY, |s| range_in_source(&s)))
}

/// How long the first input's second dimension may be, as exported: the token count of a text
/// model's ids, which the text handlers pad to the longest text of a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Length {
    /// The one length of a dimension exported static (a text model exported padded to
    /// `max_length`).
    pub fixed: Option<i64>,
    /// The upper bound of a dynamic one.
    pub max: Option<i64>,
}

/// The first input's [`Length`], read from the same generated checks as [`batch_range`].
pub fn second_dim(path: &Path) -> Result<Length, String> {
    Ok(wrapper_source(path)?.map_or(Length::default(), |s| length_in_source(&s)))
}

fn length_in_source(source: &str) -> Length {
    Length {
        fixed: number_after(
            source,
            "input_handles[0]: unmatched dim value at 1, ",
            "expected: ",
        ),
        max: number_after(
            source,
            "input_handles[0]: dim value is too large at 1, ",
            "expected to be <= ",
        ),
    }
}

/// The number that follows `lead` after `marker` in `source`.
fn number_after(source: &str, marker: &str, lead: &str) -> Option<i64> {
    let rest = &source[source.find(marker)? + marker.len()..];
    let rest = &rest[rest.find(lead)? + lead.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse::<i64>().ok()
}

/// The package's generated source, where its input checks are written; `None` when it has none.
fn wrapper_source(path: &Path) -> Result<Option<String>, String> {
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
    Ok(Some(source))
}

/// The first input's batch range in generated source: see [`batch_range`].
fn range_in_source(source: &str) -> BatchRange {
    let number_after = |marker: &str, lead: &str| number_after(source, marker, lead);
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

/// Why `batch_size` cannot be served by the package at `path`, when it cannot: more examples
/// than a package exported with an upper bound on its batch takes (a package of one fixed size
/// takes any batch, cut into forwards of that size). `None` for any other file, or one whose
/// range cannot be read (the loader then says why).
pub fn refuses_batch_size(path: &Path, batch_size: usize) -> Option<String> {
    let is_package = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("pt2"));
    if !is_package {
        return None;
    }
    let range = batch_range(path).ok()?;
    let max = range.max.filter(|_| range.fixed().is_none())?;
    ((batch_size as i64) > max).then(|| batch_size_too_large(batch_size, max))
}

/// What a batch size over a package's upper bound `max` is told.
pub fn batch_size_too_large(batch_size: usize, max: i64) -> String {
    format!(
        "batch_size {batch_size} is too large: the model takes at most {max} examples per \
         forward (its package was exported so)"
    )
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
        // The second dimension: fixed (784 here; a text model's padded length), or bounded.
        assert_eq!(
            length_in_source(dynamic),
            Length {
                fixed: Some(784),
                max: None
            }
        );
        let bounded = r#"
                ss << "input_handles[0]: dim value is too large at 1, "
                   << "expected to be <= 64, " << "but got: ""#;
        assert_eq!(
            length_in_source(bounded),
            Length {
                fixed: None,
                max: Some(64)
            }
        );
    }
}
