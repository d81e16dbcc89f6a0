//! Compatibility with the real torch-model-archiver 0.12.0: for every archive format, its
//! archives read back with the same values, and ours have the same entries and manifest.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{files_below, run_ok, venv_bin};
use tchserve_mar::{Archive, Layout};

const FORMATS: [&str; 4] = ["default", "zip-store", "tgz", "no-archive"];

/// Inputs exercising every flag: flat files, a merged folder with filtered subfolders, a
/// wildcard, a config and a requirements file.
fn make_inputs(dir: &Path) {
    let w = |rel: &str, data: &[u8]| {
        let p = dir.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, data).unwrap();
    };
    w(
        "model.pt",
        &(0..50_000u32)
            .flat_map(|i| (i * 7919).to_le_bytes())
            .collect::<Vec<_>>(),
    );
    w(
        "net.py",
        b"import torch\nclass Net(torch.nn.Module):\n    pass\n",
    );
    w("index_to_name.json", br#"{"0": "cat", "1": "dog"}"#);
    w("extra/vocab.txt", b"a\nb\n");
    w("extra/.dotfile", b"kept");
    w("extra/sub/deep.txt", b"deep");
    w("extra/__pycache__/x.pyc", b"skipped");
    w("extra/.git/HEAD", b"skipped");
    w("assets/one.txt", b"1");
    w("assets/two.txt", b"2");
    w("assets/skip.bin", b"0");
    w(
        "model-config.yaml",
        b"minWorkers: 1\nmaxWorkers: 2\nbatchSize: 4\nmaxBatchDelay: 20\nhandler:\n  topk: 2\n",
    );
    w("requirements.txt", b"numpy\n");
    // A script shipped with the model keeps its executable bit.
    w("extra/bin/run.sh", b"#!/bin/sh\necho hi\n");
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(
        dir.join("extra/bin/run.sh"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    w(
        "my_handler.py",
        b"def handle(data, context):\n    return data\n",
    );
}

/// The same flags for both archivers, written as scripts write them for argparse: a flag
/// shortened, a flag given twice (the last wins), empty items in a list.
fn archiver_args(format: &str, export: &Path, handler: &str) -> Vec<String> {
    [
        "--model-name",
        "compat",
        "--version",
        "0.1",
        "--version",
        "2.5",
        "--serialized",
        "model.pt",
        "--model-file",
        "net.py",
        "--handler",
        handler,
        "--extra-files",
        "index_to_name.json,,extra,assets/*.txt,",
        "--config-file",
        "model-config.yaml",
        "--requirements-file",
        "requirements.txt",
        "--archive-format",
        format,
        "--export-path",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([export.to_string_lossy().into_owned()])
    .collect()
}

/// The entries that may be executed, by their stored names.
fn executables(path: &Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut names: Vec<String> = if path.is_dir() {
        files_below(path)
            .into_iter()
            .filter(|n| fs::metadata(path.join(n)).unwrap().permissions().mode() & 0o111 != 0)
            .collect()
    } else if path.to_string_lossy().ends_with(".tar.gz") {
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(File::open(path).unwrap()));
        tar.entries()
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.header().mode().unwrap() & 0o111 != 0)
            .filter(|e| e.header().entry_type().is_file())
            .map(|e| e.path().unwrap().to_string_lossy().into_owned())
            .collect()
    } else {
        let mut zip = zip::ZipArchive::new(File::open(path).unwrap()).unwrap();
        let mut exec = Vec::new();
        for i in 0..zip.len() {
            let f = zip.by_index(i).unwrap();
            if f.unix_mode().unwrap_or(0) & 0o111 != 0 && !f.is_dir() {
                exec.push(f.name().unwrap().to_string());
            }
        }
        exec
    };
    names.sort();
    names
}

/// Raw entry names as stored (tar names keep their `<model>/` prefix).
fn raw_entries(path: &Path) -> Vec<String> {
    let mut names: Vec<String> = if path.is_dir() {
        files_below(path)
    } else if path.to_string_lossy().ends_with(".tar.gz") {
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(File::open(path).unwrap()));
        tar.entries()
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.header().entry_type().is_file())
            .map(|e| e.path().unwrap().to_string_lossy().into_owned())
            .collect()
    } else {
        let zip = zip::ZipArchive::new(File::open(path).unwrap()).unwrap();
        zip.file_names().map(|n| n.unwrap().into_owned()).collect()
    };
    names.sort();
    names
}

fn output_path(export: &Path, format: &str) -> PathBuf {
    match format {
        "tgz" => export.join("compat.tar.gz"),
        "no-archive" => export.join("compat"),
        _ => export.join("compat.mar"),
    }
}

fn manifest_text(archive: &Archive, path: &Path) -> String {
    if path.is_dir() {
        fs::read_to_string(path.join("MAR-INF/MANIFEST.json")).unwrap()
    } else {
        String::from_utf8(archive.read_file("MAR-INF/MANIFEST.json").unwrap()).unwrap()
    }
}

/// The manifest with its `createdOn` value blanked.
fn without_created_on(text: &str) -> String {
    let start = text.find("\"createdOn\": \"").expect("createdOn present") + 14;
    let end = start + text[start..].find('"').unwrap();
    format!("{}<date>{}", &text[..start], &text[end..])
}

fn compare_format(format: &str, handler: &str) {
    let work = tempfile::tempdir().unwrap();
    make_inputs(work.path());
    let (real_out, our_out) = (work.path().join("real"), work.path().join("ours"));
    fs::create_dir_all(&real_out).unwrap();
    // The real archiver stages files in $TMPDIR/<model-name>: give each run its own.
    let tmp = work.path().join("tmp");
    fs::create_dir_all(&tmp).unwrap();
    run_ok(
        Command::new(venv_bin("torch-model-archiver"))
            .current_dir(work.path())
            .env("TMPDIR", &tmp)
            .args(archiver_args(format, &real_out, handler)),
    );
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_tch-model-archiver"))
            .current_dir(work.path())
            .args(archiver_args(format, &our_out, handler)),
    );

    let real_path = output_path(&real_out, format);
    let our_path = output_path(&our_out, format);
    let ctx = format!("format {format}, handler {handler}");
    assert_eq!(
        raw_entries(&our_path),
        raw_entries(&real_path),
        "{ctx}: entry names"
    );

    let exec = executables(&our_path);
    assert_eq!(exec, executables(&real_path), "{ctx}: executable entries");
    assert!(
        exec.iter().any(|n| n.ends_with("bin/run.sh")),
        "{ctx}: {exec:?}"
    );

    let real = Archive::open(&real_path)
        .unwrap_or_else(|e| panic!("{ctx}: reading the real archive: {e}"));
    let ours = Archive::open(&our_path).unwrap();
    let real_manifest = manifest_text(&real, &real_path);
    assert_eq!(
        without_created_on(&manifest_text(&ours, &our_path)),
        without_created_on(&real_manifest),
        "{ctx}: MANIFEST.json"
    );

    // The real archive reads back with the values it was made with.
    let m = real.manifest();
    assert_eq!(real.model_name(), "compat");
    assert_eq!(m.model.version(), "2.5");
    assert_eq!(m.model.handler.as_deref(), Some(handler));
    assert_eq!(m.model.serialized_file.as_deref(), Some("model.pt"));
    assert_eq!(m.model.model_file.as_deref(), Some("net.py"));
    assert_eq!(m.model.config_file.as_deref(), Some("model-config.yaml"));
    assert_eq!(
        m.model.requirements_file.as_deref(),
        Some("requirements.txt")
    );
    assert_eq!(m.archiver_version.as_deref(), Some("0.12.0"));
    let created = m.created_on.as_deref().unwrap();
    assert!(
        chrono::NaiveDateTime::parse_from_str(created, "%d/%m/%Y %H:%M:%S").is_ok(),
        "{created}"
    );
    let cfg = real.model_config().unwrap().unwrap();
    assert_eq!(
        (
            cfg.min_workers,
            cfg.max_workers,
            cfg.batch_size,
            cfg.max_batch_delay
        ),
        (Some(1), Some(2), Some(4), Some(20))
    );
    assert_eq!(cfg.handler, Some(serde_json::json!({"topk": 2})));
    assert_eq!(real.read_file("sub/deep.txt").unwrap(), b"deep");
    assert_eq!(
        real.read_file("model.pt").unwrap(),
        fs::read(work.path().join("model.pt")).unwrap()
    );

    let expected_layout = match format {
        "tgz" => Layout::TarGz,
        "no-archive" => Layout::Directory,
        _ => Layout::Zip,
    };
    assert_eq!(real.layout(), expected_layout, "{ctx}");
    let names = |a: &Archive| {
        let mut v: Vec<(String, u64)> = a
            .entries()
            .iter()
            .filter(|e| !e.is_dir)
            .map(|e| (e.name.clone(), e.size))
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&ours), names(&real), "{ctx}: normalised entries");
    if expected_layout == Layout::Zip {
        let deflated = format == "default";
        for a in [&real, &ours] {
            assert!(
                a.entries().iter().all(|e| e.deflated == deflated),
                "{ctx}: compression"
            );
        }
    }

    // And both unpack to the same files.
    let (ru, ou) = (
        real.unpack(&work.path().join("ru")).unwrap(),
        ours.unpack(&work.path().join("ou")).unwrap(),
    );
    assert_eq!(files_below(&ru), files_below(&ou), "{ctx}: unpacked");
}

#[test]
fn default_zip_matches_the_real_archiver() {
    compare_format(FORMATS[0], "image_classifier");
}

#[test]
fn zip_store_matches_the_real_archiver() {
    compare_format(FORMATS[1], "image_classifier");
}

#[test]
fn tgz_matches_the_real_archiver() {
    compare_format(FORMATS[2], "object_detector");
}

#[test]
fn no_archive_matches_the_real_archiver() {
    compare_format(FORMATS[3], "image_segmenter");
}

#[test]
fn python_handler_file_is_packed_like_the_real_archiver() {
    compare_format("default", "my_handler.py");
}
