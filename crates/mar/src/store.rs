//! The model store: the folder `--model-store` names, whose entries are archives.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, MarError, Result};

/// A model named by `--models` or `load_models`: an optional model name and the archive's url.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRef {
    /// The name given with `name=url`, if any.
    pub name: Option<String>,
    /// The archive, as a model-store entry name or a path.
    pub url: String,
}

/// A model store directory.
#[derive(Debug, Clone)]
pub struct ModelStore {
    root: PathBuf,
}

impl ModelStore {
    /// A store rooted at `root`, which must be a directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        if !root.is_dir() {
            return Err(MarError::Store(format!(
                "Model store is not a directory: {}",
                root.display()
            )));
        }
        Ok(ModelStore { root })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolves a local `url` to an archive of the store, as TorchServe's documentation
    /// describes it: the name of a file or folder directly inside the store (optionally after
    /// `file://`), or an absolute path to one. Only regular files and folders qualify (a FIFO
    /// or device would block or never end). Anything else is refused with the same message
    /// whether or not it exists, so the answer tells nothing about the rest of the file system.
    /// A url containing `..` is refused before anything is looked up.
    pub fn resolve(&self, url: &str) -> Result<PathBuf> {
        if url.is_empty() {
            return Err(MarError::Store("empty url".into()));
        }
        if url.contains("..") {
            return Err(MarError::Store(format!(
                "Relative path is not allowed in url: {url}"
            )));
        }
        let not_found = || MarError::Store(format!("Model not found at: {url}"));
        let path = self.root.join(self.entry_name(url).ok_or_else(not_found)?);
        // The store's owner may link archives in from elsewhere; what the link names must still
        // be a plain file or folder.
        match fs::metadata(&path) {
            Ok(meta) if meta.is_file() || meta.is_dir() => Ok(path),
            _ => Err(not_found()),
        }
    }

    /// The name of the store entry a local `url` names, whether or not it exists: a name
    /// directly inside the store (optionally after `file://`), or an absolute path to one.
    /// None for anything else.
    pub fn entry_name(&self, url: &str) -> Option<String> {
        let name = url.strip_prefix("file://").unwrap_or(url);
        let direct = Path::new(name);
        if direct.is_absolute() {
            if !direct.parent().is_some_and(|parent| self.is_root(parent)) {
                return None;
            }
            direct.file_name().map(|f| f.to_string_lossy().into_owned())
        } else if name.contains(['/', '\\']) || name.is_empty() || name == "." {
            // `.` (or `file://` with nothing after it) would name the store itself.
            None
        } else {
            Some(name.to_string())
        }
    }

    fn is_root(&self, dir: &Path) -> bool {
        match (dir.canonicalize(), self.root.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    }

    /// Expands one `--models` item: `all` (every archive of `store`, by file name),
    /// `name=url`, or `url`.
    pub fn expand(store: Option<&ModelStore>, item: &str) -> Result<Vec<ModelRef>> {
        if item.eq_ignore_ascii_case("all") {
            let store =
                store.ok_or_else(|| MarError::Store("models=all needs a model store".into()))?;
            return Ok(store
                .all()?
                .iter()
                .filter_map(|p| p.file_name())
                .map(|n| ModelRef {
                    name: None,
                    url: n.to_string_lossy().into_owned(),
                })
                .collect());
        }
        // `name=archive`, unless what comes before the `=` cannot be a name: then the item is
        // one URL whose query holds the `=` (a presigned `...?X-Amz-Signature=...`).
        let (name, url) = match item.split_once('=') {
            Some((n, u)) if !n.contains(['/', ':', '?', '&']) => (Some(n.to_string()), u),
            _ => (None, item),
        };
        Ok(vec![ModelRef {
            name,
            url: url.to_string(),
        }])
    }

    /// Every archive in the store, as `load_models=all` picks them: `.mar`, `.model` and
    /// `.tar.gz` files and every directory, sorted by name. Hidden entries are skipped.
    pub fn all(&self) -> Result<Vec<PathBuf>> {
        let mut found = Vec::new();
        for entry in fs::read_dir(&self.root).at(&self.root)? {
            let entry = entry.at(&self.root)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            let is_archive = [".mar", ".model", ".tar.gz", ".tgz"]
                .iter()
                .any(|e| name.ends_with(e));
            if path.is_dir() || (is_archive && path.is_file()) {
                found.push(path);
            }
        }
        found.sort();
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_and_lists() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["b.mar", "a.tar.gz", "notes.txt", ".hidden.mar"] {
            fs::write(dir.path().join(f), b"x").unwrap();
        }
        fs::create_dir(dir.path().join("c")).unwrap();
        let store = ModelStore::open(dir.path()).unwrap();
        let names: Vec<_> = store
            .all()
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a.tar.gz", "b.mar", "c"]);
        assert_eq!(store.resolve("b.mar").unwrap(), dir.path().join("b.mar"));
        assert!(
            store
                .resolve("../b.mar")
                .unwrap_err()
                .to_string()
                .starts_with("Relative path is not allowed")
        );
        assert_eq!(
            store.resolve("zz.mar").unwrap_err().to_string(),
            "Model not found at: zz.mar"
        );
        // Nothing names the store itself.
        for url in [".", "file://", "file://."] {
            assert_eq!(
                store.resolve(url).unwrap_err().to_string(),
                format!("Model not found at: {url}")
            );
        }
        let abs = dir.path().join("b.mar");
        assert_eq!(store.resolve(abs.to_str().unwrap()).unwrap(), abs);
        assert_eq!(
            store.resolve(&format!("file://{}", abs.display())).unwrap(),
            abs
        );
        assert_eq!(store.resolve("c").unwrap(), dir.path().join("c"));
        // Outside the store, in a subfolder, or not a plain file: one answer, found or not.
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("real.mar"), b"x").unwrap();
        fs::create_dir(dir.path().join("c/sub.mar")).unwrap();
        let fifo = dir.path().join("pipe.mar");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        for url in [
            format!("{}/real.mar", outside.path().display()),
            format!("{}/missing.mar", outside.path().display()),
            "/etc/passwd".to_string(),
            "/etc/nonexistent".to_string(),
            "c/sub.mar".to_string(),
            "pipe.mar".to_string(),
            fifo.display().to_string(),
        ] {
            assert_eq!(
                store.resolve(&url).unwrap_err().to_string(),
                format!("Model not found at: {url}")
            );
        }
        assert!(ModelStore::open(dir.path().join("b.mar")).is_err());
        let all = ModelStore::expand(Some(&store), "ALL").unwrap();
        assert_eq!(
            all.iter().map(|m| m.url.as_str()).collect::<Vec<_>>(),
            ["a.tar.gz", "b.mar", "c"]
        );
        assert_eq!(
            ModelStore::expand(None, "n=b.mar").unwrap(),
            [ModelRef {
                name: Some("n".into()),
                url: "b.mar".into()
            }]
        );
        assert_eq!(ModelStore::expand(None, "b.mar").unwrap()[0].name, None);
        // A URL whose query holds `=` is one archive, named or not.
        let signed = "https://h.example/m.mar?X-Amz-Signature=abc&X-Amz-Date=1";
        let r = &ModelStore::expand(None, signed).unwrap()[0];
        assert_eq!((r.name.as_deref(), r.url.as_str()), (None, signed));
        let r = &ModelStore::expand(None, &format!("m={signed}")).unwrap()[0];
        assert_eq!((r.name.as_deref(), r.url.as_str()), (Some("m"), signed));
        assert!(ModelStore::expand(None, "all").is_err());
    }
}
