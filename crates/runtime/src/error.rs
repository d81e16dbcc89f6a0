//! Errors of the runtime crate.

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The archive itself is unusable.
    #[error(transparent)]
    Archive(#[from] tchserve_mar::MarError),
    /// The archive's handler cannot run in tchserve.
    #[error("{0}")]
    UnsupportedHandler(String),
    /// The archive has no TorchScript file tchserve can load.
    #[error("{0}")]
    NoModel(String),
    /// libtorch refused the model.
    #[error("loading {file}: {}", concise(&error.to_string()))]
    Torch {
        /// The serialized file.
        file: String,
        /// libtorch's error, whole. Not the error's `source`: a report of the chain would repeat
        /// it after the concise message, C++ stack frames and all.
        error: tch::TchError,
    },
    /// A `.pt2` package could not be loaded.
    #[error("loading {file}: {message}")]
    Package {
        /// The package file.
        file: String,
        /// Why.
        message: String,
    },
    /// The handler cannot answer a request with what the model gives: found at load by
    /// answering a made-up request (zeros, a grey photo, a short sentence).
    #[error("{file}: a made-up request, answered at load, failed: {message}")]
    Handler {
        /// The serialized file.
        file: String,
        /// Why.
        message: String,
    },
    /// The thread that runs a GPU model's forwards could not be started.
    #[error("starting the forward thread for {file}: {source}")]
    Thread {
        /// The serialized file.
        file: String,
        /// Why the thread did not start.
        source: std::io::Error,
    },
}

/// A message of several lines (libtorch's, with its C++ frames and TorchScript traceback) as
/// one log line, its lines joined by ` | `: a log shipper that reads a record per line would
/// otherwise take each frame for a record of its own, without time or level.
pub fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// libtorch's message as a client should read it: without the C++ stack frames that follow
/// "Exception raised from" (kilobytes of symbols and the server's library paths), and of a
/// TorchScript interpreter's failure only the error it ends with, not the traceback through
/// generated code and the paths the model was exported from. The log keeps the whole message.
pub fn concise(text: &str) -> String {
    let text = text
        .find("\nException raised from")
        .map_or(text, |at| &text[..at])
        .trim_end();
    const INTERPRETER: &str = "The following operation failed in the TorchScript interpreter.";
    if let Some(start) = text.find(INTERPRETER) {
        let lines: Vec<&str> = text[start..].lines().collect();
        // The traceback's lines are indented; the error it ends with starts its line.
        if let Some(i) = lines
            .iter()
            .rposition(|l| !l.starts_with(char::is_whitespace) && l.contains("Error"))
        {
            return format!("{}{}", &text[..start], lines[i..].join("\n"));
        }
    }
    text.to_string()
}

#[cfg(test)]
mod tests {
    use super::{concise, one_line};

    #[test]
    fn a_message_of_several_lines_is_logged_as_one() {
        assert_eq!(
            one_line("failed\nException raised from x\n\nframe #0: y  \n"),
            "failed | Exception raised from x | frame #0: y"
        );
        assert_eq!(one_line("one"), "one");
    }

    #[test]
    fn libtorch_messages_lose_their_stack_frames_and_tracebacks() {
        let load = "Internal torch error: PytorchStreamReader failed reading zip archive: failed \
            finding central directory.\nException raised from valid at inline_container.cc:242 \
            (most recent call first):\nframe #0: c10::Error::Error() + 0x9d (0x7f in /x/libc10.so)\n";
        assert_eq!(
            concise(load),
            "Internal torch error: PytorchStreamReader failed reading zip archive: failed \
            finding central directory."
        );
        let forward = "Internal torch error: The following operation failed in the TorchScript \
            interpreter.\nTraceback of TorchScript, serialized code (most recent call last):\n  \
            File \"code/__torch__/linear.py\", line 14, in forward\n    return torch.linear(input)\n\n\
            Traceback of TorchScript, original code (most recent call last):\n  File \
            \"/home/me/.venv/torch/nn/modules/linear.py\", line 134, in forward\n        return \
            F.linear(input, self.weight, self.bias)\n               ~~~~~~~~ <--- HERE\n\
            RuntimeError: mat1 and mat2 shapes cannot be multiplied (1x3 and 4x2)\n";
        assert_eq!(
            concise(forward),
            "Internal torch error: RuntimeError: mat1 and mat2 shapes cannot be multiplied (1x3 and 4x2)"
        );
        // Anything else is left as it is.
        assert_eq!(concise("shape mismatch\n"), "shape mismatch");
    }
}

/// Remembers which messages were said lately, so that one repeated on every request or retry is
/// logged in full once in a while rather than every time.
#[derive(Debug)]
pub struct Recently {
    /// Each message's last saying, and how many times it was held back since.
    said: std::sync::Mutex<Option<std::collections::HashMap<String, (std::time::Instant, u64)>>>,
}

impl Recently {
    /// How long a message said is not said again.
    const QUIET: std::time::Duration = std::time::Duration::from_secs(60);
    /// The most messages remembered; past it the memory starts afresh.
    const MOST: usize = 256;

    /// Nothing said yet.
    pub const fn new() -> Self {
        Recently {
            said: std::sync::Mutex::new(None),
        }
    }

    /// True when `key` was not said in the last minute, and notes it as said now.
    pub fn first_in_a_while(&self, key: &str) -> bool {
        self.say(key).is_some()
    }

    /// When `key` was not said in the last minute: how many times it was held back since it was
    /// last said (0 the first time), noting it as said now. `None` while it is held back.
    pub fn say(&self, key: &str) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut said = self.said.lock().unwrap_or_else(|p| p.into_inner());
        let said = said.get_or_insert_with(Default::default);
        let held = match said.get_mut(key) {
            Some((at, held)) if now.duration_since(*at) < Self::QUIET => {
                *held += 1;
                return None;
            }
            Some((_, held)) => *held,
            None => 0,
        };
        if said.len() >= Self::MOST {
            said.clear();
        }
        said.insert(key.to_string(), (now, 0));
        Some(held)
    }
}

#[cfg(test)]
mod recently_tests {
    use super::*;

    #[test]
    fn a_message_is_said_once_a_minute() {
        let r = Recently::new();
        assert!(r.first_in_a_while("shape"));
        assert!(!r.first_in_a_while("shape"));
        assert!(r.first_in_a_while("dtype"));
        for i in 0..Recently::MOST {
            r.first_in_a_while(&i.to_string());
        }
        // Memory full: it starts afresh rather than growing.
        assert!(r.first_in_a_while("shape"));
        // What was held back is counted, and told with the next saying.
        let r = Recently::new();
        assert_eq!(r.say("shape"), Some(0));
        assert_eq!((r.say("shape"), r.say("shape")), (None, None));
        r.said
            .lock()
            .unwrap()
            .as_mut()
            .unwrap()
            .get_mut("shape")
            .unwrap()
            .0 -= Recently::QUIET;
        assert_eq!(r.say("shape"), Some(2));
        assert_eq!(r.say("shape"), None);
    }
}
