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

    /// Resolves a `url` as TorchServe does for local models: an entry of the store by name, or
    /// an existing path. A url containing `..` is refused before anything is looked up.
    pub fn resolve(&self, url: &str) -> Result<PathBuf> {
        if url.is_empty() {
            return Err(MarError::Store("empty url".into()));
        }
        if url.contains("..") {
            return Err(MarError::Store(format!(
                "Relative path is not allowed in url: {url}"
            )));
        }
        let url = url.strip_prefix("file://").unwrap_or(url);
        let in_store = self.root.join(url);
        if in_store.exists() {
            return Ok(in_store);
        }
        let direct = Path::new(url);
        if direct.is_absolute() && direct.exists() {
            return Ok(direct.to_path_buf());
        }
        Err(MarError::Store(format!("Model not found at: {url}")))
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
        let (name, url) = match item.split_once('=') {
            Some((n, u)) => (Some(n.to_string()), u),
            None => (None, item),
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
        assert!(ModelStore::expand(None, "all").is_err());
    }
}
