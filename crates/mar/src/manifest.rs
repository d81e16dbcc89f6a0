//! `MAR-INF/MANIFEST.json`: TorchServe's archive manifest, read leniently and written exactly.

use std::fmt::Write as _;

use serde_json::{Map, Value};

/// Path of the manifest inside an archive.
pub const MANIFEST_PATH: &str = "MAR-INF/MANIFEST.json";

/// The archive-format level written into `archiverVersion`: the torch-model-archiver
/// release whose layout and manifest this crate reproduces.
pub const ARCHIVER_FORMAT_VERSION: &str = "0.12.0";

/// Version given to a model whose manifest names none, as TorchServe does.
pub const DEFAULT_MODEL_VERSION: &str = "1.0";

/// The `runtime` field: which backend TorchServe would start for the handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RuntimeType {
    /// `python`, the default.
    #[default]
    Python,
    /// `python3`, a synonym kept by TorchServe.
    Python3,
    /// `LSP`, TorchServe's C++ backend.
    Lsp,
}

impl RuntimeType {
    /// Every accepted spelling, in the order the real archiver lists them.
    pub const ALL: [RuntimeType; 3] = [RuntimeType::Python, RuntimeType::Python3, RuntimeType::Lsp];

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeType::Python => "python",
            RuntimeType::Python3 => "python3",
            RuntimeType::Lsp => "LSP",
        }
    }

    /// Parses the wire spelling (case-sensitive, as TorchServe).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// The `model` section of the manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelInfo {
    /// `modelName`; absent in some hand-made archives, then taken from the file name.
    pub model_name: Option<String>,
    /// `serializedFile`: the TorchScript file, relative to the archive root.
    pub serialized_file: Option<String>,
    /// `handler`: a built-in handler name or a file inside the archive.
    pub handler: Option<String>,
    /// `modelFile`: the Python model definition of an eager-mode archive.
    pub model_file: Option<String>,
    /// `modelVersion`; see [`ModelInfo::version`].
    pub model_version: Option<String>,
    /// `requirementsFile`.
    pub requirements_file: Option<String>,
    /// `configFile`: the model-config.yaml inside the archive.
    pub config_file: Option<String>,
    /// `description`, read but never written by the archiver.
    pub description: Option<String>,
}

impl ModelInfo {
    /// The model version, `"1.0"` when the manifest names none.
    pub fn version(&self) -> &str {
        self.model_version
            .as_deref()
            .filter(|v| !v.is_empty())
            .unwrap_or(DEFAULT_MODEL_VERSION)
    }
}

/// A whole `MANIFEST.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// `createdOn`, `dd/mm/YYYY HH:MM:SS` in the archiver's local time.
    pub created_on: Option<String>,
    /// `runtime`.
    pub runtime: RuntimeType,
    /// `model`.
    pub model: ModelInfo,
    /// `archiverVersion`.
    pub archiver_version: Option<String>,
    /// Top-level `description`, read only.
    pub description: Option<String>,
}

impl Manifest {
    /// A manifest as the archiver writes it now: stamped with the local time and format version.
    pub fn new(runtime: RuntimeType, model: ModelInfo) -> Self {
        Manifest {
            created_on: Some(chrono::Local::now().format("%d/%m/%Y %H:%M:%S").to_string()),
            runtime,
            model,
            archiver_version: Some(ARCHIVER_FORMAT_VERSION.to_string()),
            description: None,
        }
    }

    /// Parses manifest bytes the way TorchServe's frontend does: unknown keys are ignored and
    /// a missing `runtime` means `python`, but every known key must have the right type.
    /// On failure the `Err` is a sentence naming the field at fault.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
        let Value::Object(top) = value else {
            return Err(format!(
                "expected a JSON object, found {}",
                json_type(&value)
            ));
        };
        let runtime = match opt_str(&top, "runtime", "")? {
            None => RuntimeType::Python,
            Some(s) => RuntimeType::parse(&s).ok_or_else(|| {
                format!(
                    "field `runtime` has unknown value \"{s}\" (expected python, python3 or LSP)"
                )
            })?,
        };
        let model = match top.get("model") {
            None | Some(Value::Null) => return Err("missing field `model`".to_string()),
            Some(Value::Object(m)) => ModelInfo {
                model_name: opt_str(m, "modelName", "model.")?,
                serialized_file: opt_str(m, "serializedFile", "model.")?,
                handler: opt_str(m, "handler", "model.")?,
                model_file: opt_str(m, "modelFile", "model.")?,
                model_version: opt_str(m, "modelVersion", "model.")?,
                requirements_file: opt_str(m, "requirementsFile", "model.")?,
                config_file: opt_str(m, "configFile", "model.")?,
                description: opt_str(m, "description", "model.")?,
            },
            Some(other) => {
                return Err(format!(
                    "field `model` must be an object, found {}",
                    json_type(other)
                ));
            }
        };
        Ok(Manifest {
            created_on: opt_str(&top, "createdOn", "")?,
            runtime,
            model,
            archiver_version: opt_str(&top, "archiverVersion", "")?,
            description: opt_str(&top, "description", "")?,
        })
    }

    /// Serialises the manifest byte for byte as torch-model-archiver does
    /// (`json.dumps(indent=2)`: its key order, optional keys left out, non-ASCII escaped).
    pub fn to_json(&self) -> String {
        let mut top: Vec<(&str, Field)> = Vec::new();
        if let Some(c) = &self.created_on {
            top.push(("createdOn", Field::Str(c)));
        }
        top.push(("runtime", Field::Str(self.runtime.as_str())));
        let m = &self.model;
        let mut model: Vec<(&str, Field)> = Vec::new();
        // The archiver always writes modelName and handler, even when empty.
        model.push((
            "modelName",
            Field::Str(m.model_name.as_deref().unwrap_or("")),
        ));
        push_nonempty(&mut model, "serializedFile", &m.serialized_file);
        model.push(("handler", Field::Str(m.handler.as_deref().unwrap_or(""))));
        push_nonempty(&mut model, "modelFile", &m.model_file);
        push_nonempty(&mut model, "modelVersion", &m.model_version);
        push_nonempty(&mut model, "requirementsFile", &m.requirements_file);
        push_nonempty(&mut model, "configFile", &m.config_file);
        top.push(("model", Field::Object(model)));
        if let Some(v) = &self.archiver_version {
            top.push(("archiverVersion", Field::Str(v)));
        }
        let mut out = String::new();
        write_object(&mut out, &top, 0);
        out
    }
}

fn push_nonempty<'a>(fields: &mut Vec<(&'a str, Field<'a>)>, key: &'a str, v: &'a Option<String>) {
    if let Some(s) = v.as_deref().filter(|s| !s.is_empty()) {
        fields.push((key, Field::Str(s)));
    }
}

enum Field<'a> {
    Str(&'a str),
    Object(Vec<(&'a str, Field<'a>)>),
}

fn write_object(out: &mut String, fields: &[(&str, Field)], depth: usize) {
    if fields.is_empty() {
        out.push_str("{}");
        return;
    }
    out.push('{');
    for (i, (key, value)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('\n');
        out.push_str(&"  ".repeat(depth + 1));
        write_py_string(out, key);
        out.push_str(": ");
        match value {
            Field::Str(s) => write_py_string(out, s),
            Field::Object(inner) => write_object(out, inner, depth + 1),
        }
    }
    out.push('\n');
    out.push_str(&"  ".repeat(depth));
    out.push('}');
}

/// Python's `json.dumps` string escaping with `ensure_ascii=True`.
fn write_py_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
}

fn opt_str(obj: &Map<String, Value>, key: &str, prefix: &str) -> Result<Option<String>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!(
            "field `{prefix}{key}` must be a string, found {}",
            json_type(other)
        )),
    }
}

/// What kind of JSON value `v` is, for messages ("a string", "an array", ...).
pub(crate) fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The model name TorchServe derives from an archive's file name when the manifest has none:
/// the base name without its archive extension, with non-word characters replaced by `_`.
pub fn model_name_from_file_name(file_name: &str) -> String {
    let base = file_name.rsplit('/').next().unwrap_or(file_name);
    let stem = [".tar.gz", ".tgz", ".mar", ".model"]
        .iter()
        .find_map(|ext| base.strip_suffix(ext))
        .unwrap_or(base);
    stem.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Checks a model name against torch-model-archiver's rule `^[A-Za-z0-9][A-Za-z0-9_\-.]*$`.
pub fn is_valid_model_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str) -> ModelInfo {
        ModelInfo {
            model_name: Some(name.into()),
            serialized_file: Some("m.pt".into()),
            handler: Some("image_classifier".into()),
            model_version: Some("1.0".into()),
            ..ModelInfo::default()
        }
    }

    #[test]
    fn writes_python_layout() {
        let mut m = Manifest::new(RuntimeType::Python, model("resnet"));
        m.created_on = Some("01/02/2026 03:04:05".into());
        let expected = "{\n  \"createdOn\": \"01/02/2026 03:04:05\",\n  \"runtime\": \"python\",\n  \"model\": {\n    \"modelName\": \"resnet\",\n    \"serializedFile\": \"m.pt\",\n    \"handler\": \"image_classifier\",\n    \"modelVersion\": \"1.0\"\n  },\n  \"archiverVersion\": \"0.12.0\"\n}";
        assert_eq!(m.to_json(), expected);
    }

    #[test]
    fn escapes_like_python() {
        let mut m = Manifest::new(RuntimeType::Python, model("x"));
        m.model.model_version = Some("v\u{e9}\"\u{1f600}".into());
        assert!(
            m.to_json()
                .contains(r#""modelVersion": "v\u00e9\"\ud83d\ude00""#)
        );
    }

    #[test]
    fn round_trips() {
        let m = Manifest::new(RuntimeType::Lsp, model("a"));
        assert_eq!(Manifest::parse(m.to_json().as_bytes()).unwrap(), m);
    }

    #[test]
    fn reads_leniently() {
        let m =
            Manifest::parse(br#"{"model": {"modelName": "a", "extra": [1]}, "other": 3}"#).unwrap();
        assert_eq!(m.runtime, RuntimeType::Python);
        assert_eq!(m.model.version(), "1.0");
        assert_eq!(m.model.handler, None);
    }

    #[test]
    fn names_the_field_at_fault() {
        let e = Manifest::parse(br#"{"runtime": "python"}"#).unwrap_err();
        assert_eq!(e, "missing field `model`");
        let e = Manifest::parse(br#"{"model": {"modelName": 5}}"#).unwrap_err();
        assert_eq!(
            e,
            "field `model.modelName` must be a string, found a number"
        );
        let e = Manifest::parse(br#"{"runtime": "java", "model": {}}"#).unwrap_err();
        assert!(e.contains("`runtime`"), "{e}");
        let e = Manifest::parse(br#"{"model": [1]}"#).unwrap_err();
        assert!(e.contains("`model` must be an object"), "{e}");
        assert!(
            Manifest::parse(b"{\"model\"")
                .unwrap_err()
                .starts_with("not valid JSON")
        );
    }

    #[test]
    fn derives_names_from_files() {
        assert_eq!(model_name_from_file_name("/s/resnet-18.mar"), "resnet_18");
        assert_eq!(model_name_from_file_name("bert.tar.gz"), "bert");
        assert_eq!(model_name_from_file_name("dir_model"), "dir_model");
    }

    #[test]
    fn checks_model_names() {
        for ok in ["a", "A9", "res-net_1.0"] {
            assert!(is_valid_model_name(ok), "{ok}");
        }
        for bad in ["", "-a", "_a", "a b", "a/b", "caf\u{e9}"] {
            assert!(!is_valid_model_name(bad), "{bad}");
        }
    }
}
