//! Entry-name safety: the one gate every archive entry passes before it can touch the disk.

/// Checks a raw entry name and returns it normalised (`/`-separated, no `.` or empty parts).
///
/// Refused: names that are not UTF-8, absolute paths, Windows drive or UNC prefixes, any `..`
/// component, backslashes and NUL bytes. A name that normalises to nothing is refused too.
pub(crate) fn normalize(raw: &[u8]) -> Result<String, &'static str> {
    let name = std::str::from_utf8(raw).map_err(|_| "the name is not valid UTF-8")?;
    if name.contains('\0') {
        return Err("the name contains a NUL byte");
    }
    if name.contains('\\') {
        return Err("the name contains a backslash");
    }
    if name.starts_with('/') {
        return Err("absolute paths are not allowed");
    }
    let bytes = name.as_bytes();
    if bytes.len() >= 2 && bytes[1] == b':' && bytes[0].is_ascii_alphabetic() {
        return Err("drive-letter paths are not allowed");
    }
    let mut parts = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err("`..` would leave the extraction directory"),
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return Err("the name is empty");
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn accepts_and_normalises_ordinary_names() {
        assert_eq!(normalize(b"a/b.pt").unwrap(), "a/b.pt");
        assert_eq!(normalize(b"./a//b/").unwrap(), "a/b");
        assert_eq!(
            normalize("caf\u{e9}.txt".as_bytes()).unwrap(),
            "caf\u{e9}.txt"
        );
        assert_eq!(normalize(b"a..b").unwrap(), "a..b");
    }

    #[test]
    fn refuses_escapes_and_oddities() {
        for bad in [
            &b"../x"[..],
            b"a/../../x",
            b"/etc/passwd",
            b"C:/x",
            b"..\\x",
            b"a\0b",
            b"\xff\xfe.pt",
            b"./",
            b"",
        ] {
            assert!(
                normalize(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
