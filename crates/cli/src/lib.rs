//! Pieces of the `tchserve` binary: background start/stop and the archive check.

pub mod control;
pub mod log_writer;
pub mod startup_check;

/// An error with its causes, as one line. A cause whose text the message already contains is
/// left out: tchserve's error types name their cause in their own message.
pub fn describe(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_already_named_are_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(io).context("config.properties: no such file");
        assert_eq!(describe(&e), "config.properties: no such file");
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(io).context("reading the config");
        assert_eq!(describe(&e), "reading the config: no such file");
    }
}
