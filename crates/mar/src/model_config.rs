//! `model-config.yaml`: per-model serving settings in TorchServe's keys.

use serde_json::Value as Json;
use serde_yaml_ng::Value;

/// The keys TorchServe's frontend reads from a model's YAML config, plus the free-form rest.
///
/// As in TorchServe, a key with a value of the wrong type is ignored with a warning rather than
/// failing the model; the warnings are kept in [`ModelConfig::warnings`] for the caller to log.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelConfig {
    /// `minWorkers`.
    pub min_workers: Option<i64>,
    /// `maxWorkers`.
    pub max_workers: Option<i64>,
    /// `batchSize`.
    pub batch_size: Option<i64>,
    /// `maxBatchDelay`, milliseconds.
    pub max_batch_delay: Option<i64>,
    /// `responseTimeout`, seconds.
    pub response_timeout: Option<i64>,
    /// `startupTimeout`, seconds.
    pub startup_timeout: Option<i64>,
    /// `deviceType`: `cpu` or `gpu`.
    pub device_type: Option<String>,
    /// `deviceIds`: GPUs to assign round-robin.
    pub device_ids: Option<Vec<i64>>,
    /// `jobQueueSize`.
    pub job_queue_size: Option<i64>,
    /// `clientTimeoutInMills`: the longest a request may wait in the queue.
    pub client_timeout_ms: Option<i64>,
    /// `useJobTicket`: refuse a request unless a worker can start on it at once.
    pub use_job_ticket: Option<bool>,
    /// `handler:`, the handler's own settings, free-form.
    pub handler: Option<Json>,
    /// Every other top-level key, untouched.
    pub extra: serde_json::Map<String, Json>,
    /// One line per key that was ignored because of its type.
    pub warnings: Vec<String>,
}

/// The most flow collections (`[...]`, `{...}`) a `model-config.yaml` may open, and the most
/// block collections one line may open (`- - x`); real ones hold a handful.
const MAX_COLLECTIONS: usize = 4096;
const MAX_NESTED_ON_ONE_LINE: usize = 64;

/// Refuses text that could nest deeply before the YAML parser sees it: the parser takes time
/// quadratic in the depth of unclosed collections (`x: [[[[...`, `- - - - ...`), so a small
/// archive could hold a worker thread for hours before the parser's own recursion limit
/// answers. Brackets are counted wherever they are, in quotes and comments too: what a count
/// that follows the grammar would skip, a crafted file could use to hide its depth. Nesting
/// over several lines needs an indentation that grows with it, so its depth stays small.
fn check_nesting(text: &str) -> Result<(), String> {
    let opened = text.bytes().filter(|b| matches!(b, b'[' | b'{')).count();
    if opened > MAX_COLLECTIONS {
        return Err(format!(
            "invalid YAML: {opened} `[` and `{{` characters, more than the {MAX_COLLECTIONS} a \
             model config may hold"
        ));
    }
    for line in text.lines() {
        let opened = line
            .trim_start()
            .split(' ')
            .filter(|w| !w.is_empty())
            .take_while(|w| matches!(*w, "-" | "?"))
            .count();
        if opened > MAX_NESTED_ON_ONE_LINE {
            return Err(format!(
                "invalid YAML: a line opens {opened} nested collections, more than \
                 {MAX_NESTED_ON_ONE_LINE}"
            ));
        }
    }
    Ok(())
}

impl ModelConfig {
    /// Parses YAML text. Only invalid YAML or a top level that is not a mapping is an error.
    pub fn parse(text: &str) -> Result<Self, String> {
        check_nesting(text)?;
        let value: Value =
            serde_yaml_ng::from_str(text).map_err(|e| format!("invalid YAML: {e}"))?;
        let map = match value {
            Value::Mapping(m) => m,
            Value::Null => return Ok(ModelConfig::default()),
            _ => return Err("the top level must be a mapping of keys to values".into()),
        };
        let mut cfg = ModelConfig::default();
        for (key, value) in map {
            let Some(key) = key.as_str().map(str::to_owned) else {
                cfg.warnings
                    .push(format!("ignoring non-string key {key:?}"));
                continue;
            };
            let ints = [
                ("minWorkers", &mut cfg.min_workers),
                ("maxWorkers", &mut cfg.max_workers),
                ("batchSize", &mut cfg.batch_size),
                ("maxBatchDelay", &mut cfg.max_batch_delay),
                ("responseTimeout", &mut cfg.response_timeout),
                ("startupTimeout", &mut cfg.startup_timeout),
                ("jobQueueSize", &mut cfg.job_queue_size),
                ("clientTimeoutInMills", &mut cfg.client_timeout_ms),
            ];
            if let Some((_, slot)) = ints.into_iter().find(|(k, _)| *k == key) {
                match value.as_i64() {
                    Some(v) => *slot = Some(v),
                    None => cfg.warnings.push(wrong_type(&key, "an integer", &value)),
                }
                continue;
            }
            if UNSUPPORTED.contains(&key.as_str()) {
                // Turning a feature off asks for nothing missing.
                if value.as_bool() != Some(false) {
                    cfg.warnings.push(format!(
                        "ignoring `{key}`: tchserve does not support it (see docs/migrating.md)"
                    ));
                }
                continue;
            }
            match key.as_str() {
                "deviceType" => match value.as_str() {
                    Some(s) => cfg.device_type = Some(s.to_owned()),
                    None => cfg.warnings.push(wrong_type(&key, "a string", &value)),
                },
                "deviceIds" => match value
                    .as_sequence()
                    .map(|s| s.iter().map(Value::as_i64).collect())
                {
                    Some(Some(ids)) => cfg.device_ids = Some(ids),
                    _ => cfg
                        .warnings
                        .push(wrong_type(&key, "a list of integers", &value)),
                },
                "useJobTicket" => match value.as_bool() {
                    Some(b) => cfg.use_job_ticket = Some(b),
                    None => cfg.warnings.push(wrong_type(&key, "a boolean", &value)),
                },
                "handler" => cfg.handler = Some(to_json(&value)),
                _ => {
                    // A known key in another case (`BatchSize`) is read by neither server: say
                    // so, where the model would otherwise quietly run unbatched.
                    if let Some(meant) = KNOWN
                        .iter()
                        .find(|k| k.eq_ignore_ascii_case(&key) && **k != key)
                    {
                        cfg.warnings.push(format!(
                            "ignoring `{key}`: keys are case-sensitive; did you mean `{meant}`?"
                        ));
                    }
                    cfg.extra.insert(key, to_json(&value));
                }
            }
        }
        Ok(cfg)
    }
}

/// The keys read here, for telling a key in the wrong case.
const KNOWN: &[&str] = &[
    "minWorkers",
    "maxWorkers",
    "batchSize",
    "maxBatchDelay",
    "responseTimeout",
    "startupTimeout",
    "jobQueueSize",
    "clientTimeoutInMills",
    "deviceType",
    "deviceIds",
    "useJobTicket",
    "handler",
];

/// Keys of TorchServe's frontend that tchserve does not act on: its multi-process parallelism,
/// stateful (sequence) and continuous batching, the Python handler's environment, and the limit
/// on worker restarts (tchserve's workers retry for as long as the model is registered).
const UNSUPPORTED: &[&str] = &[
    "parallelType",
    "parallelLevel",
    "torchrun",
    "nnodes",
    "maxRetryTimeoutInSec",
    "sequenceMaxIdleMSec",
    "sequenceTimeoutMSec",
    "maxSequenceJobQueueSize",
    "maxNumSequence",
    "sequenceBatching",
    "continuousBatching",
    "asyncCommunication",
    "useVenv",
];

fn wrong_type(key: &str, expected: &str, got: &Value) -> String {
    format!(
        "ignoring `{key}`: expected {expected}, found {}",
        to_json(got)
    )
}

/// YAML to JSON, so the handler section can be handed to code that speaks JSON only.
fn to_json(v: &Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Number(n) => n
            .as_i64()
            .map(Json::from)
            .or_else(|| n.as_u64().map(Json::from))
            .or_else(|| {
                n.as_f64()
                    .and_then(serde_json::Number::from_f64)
                    .map(Json::Number)
            })
            .unwrap_or(Json::Null),
        Value::String(s) => Json::String(s.clone()),
        Value::Sequence(s) => Json::Array(s.iter().map(to_json).collect()),
        Value::Mapping(m) => Json::Object(
            m.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Value::String(s) => s.clone(),
                        other => serde_yaml_ng::to_string(other)
                            .unwrap_or_default()
                            .trim()
                            .to_owned(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        Value::Tagged(t) => to_json(&t.value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let flow = format!("x: {}", "[".repeat(400_000));
        let err = ModelConfig::parse(&flow).unwrap_err();
        assert!(err.contains("more than the 4096"), "{err}");
        let block = format!("x:\n  {}1\n", "- ".repeat(100_000));
        let err = ModelConfig::parse(&block).unwrap_err();
        assert!(err.contains("nested collections"), "{err}");
        // The parser's own answer would be its recursion limit, after minutes.
        // What real configs hold still reads.
        let cfg =
            ModelConfig::parse("minWorkers: 1\ndeviceIds: [0, 1]\nhandler:\n  - - 1\n").unwrap();
        assert_eq!(cfg.min_workers, Some(1));
    }

    #[test]
    fn reads_torchserve_keys() {
        let cfg = ModelConfig::parse(
            "minWorkers: 1\nmaxWorkers: 4\nbatchSize: 8\nmaxBatchDelay: 50\nresponseTimeout: 30\n\
             deviceType: gpu\ndeviceIds: [0, 1]\njobQueueSize: 200\nuseJobTicket: true\n\
             handler:\n  topk: 3\n  labels: names.json\npt2: {compile: true}\n",
        )
        .unwrap();
        assert_eq!(cfg.min_workers, Some(1));
        assert_eq!(cfg.max_workers, Some(4));
        assert_eq!(cfg.batch_size, Some(8));
        assert_eq!(cfg.max_batch_delay, Some(50));
        assert_eq!(cfg.response_timeout, Some(30));
        assert_eq!(cfg.device_type.as_deref(), Some("gpu"));
        assert_eq!(cfg.device_ids, Some(vec![0, 1]));
        assert_eq!(cfg.job_queue_size, Some(200));
        assert_eq!(cfg.use_job_ticket, Some(true));
        assert_eq!(
            cfg.handler,
            Some(serde_json::json!({"topk": 3, "labels": "names.json"}))
        );
        assert_eq!(cfg.extra["pt2"], serde_json::json!({"compile": true}));
        assert!(cfg.warnings.is_empty());
    }

    #[test]
    fn keys_tchserve_does_not_act_on_are_ignored_with_a_warning() {
        let cfg = ModelConfig::parse(
            "parallelType: pp\ntorchrun:\n  nproc-per-node: 2\nsequenceBatching: true\n\
             continuousBatching: false\nuseVenv: false\nmaxRetryTimeoutInSec: 60\nminWorkers: 2\n",
        )
        .unwrap();
        assert_eq!(cfg.min_workers, Some(2));
        let warned: Vec<&str> = cfg
            .warnings
            .iter()
            .map(|w| w.split('`').nth(1).unwrap())
            .collect();
        assert_eq!(
            warned,
            [
                "parallelType",
                "torchrun",
                "sequenceBatching",
                "maxRetryTimeoutInSec"
            ]
        );
        assert!(cfg.extra.is_empty(), "{:?}", cfg.extra);
    }

    #[test]
    fn a_known_key_in_another_case_is_warned_about() {
        let cfg = ModelConfig::parse("BatchSize: 4\nminworkers: 2\ncustomKey: 1\n").unwrap();
        assert_eq!(cfg.batch_size, None);
        assert_eq!(cfg.warnings.len(), 2, "{:?}", cfg.warnings);
        assert!(
            cfg.warnings[0].contains("did you mean `batchSize`"),
            "{:?}",
            cfg.warnings
        );
        assert!(
            cfg.warnings[1].contains("did you mean `minWorkers`"),
            "{:?}",
            cfg.warnings
        );
    }

    #[test]
    fn wrong_types_are_ignored_with_a_warning() {
        let cfg = ModelConfig::parse("batchSize: eight\ndeviceIds: [a]\nminWorkers: 2\n").unwrap();
        assert_eq!(cfg.batch_size, None);
        assert_eq!(cfg.device_ids, None);
        assert_eq!(cfg.min_workers, Some(2));
        assert_eq!(cfg.warnings.len(), 2);
        assert!(cfg.warnings[0].contains("batchSize"));
    }

    #[test]
    fn rejects_non_mappings_and_bad_yaml() {
        assert!(ModelConfig::parse("- 1\n- 2\n").is_err());
        assert!(
            ModelConfig::parse("a: [1, 2\n")
                .unwrap_err()
                .starts_with("invalid YAML")
        );
        assert_eq!(ModelConfig::parse("").unwrap(), ModelConfig::default());
    }
}
