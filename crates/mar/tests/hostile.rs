//! Hostile archives: each must be refused with a clear error, writing nothing outside the
//! directory it was to be extracted into.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;
use tchserve_mar::{Archive, Limits, MarError};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

const MANIFEST: &str = r#"{"runtime": "python", "model": {"modelName": "m", "handler": "tensor", "modelVersion": "1.0"}}"#;

/// A scratch folder holding one archive and the would-be extraction target.
struct Scene {
    dir: tempfile::TempDir,
}

impl Scene {
    fn new() -> Self {
        Scene {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn zip(&self, entries: &[(&str, &[u8])], method: CompressionMethod) -> PathBuf {
        let path = self.path("m.mar");
        let mut zip = ZipWriter::new(File::create(&path).unwrap());
        for (name, data) in entries {
            let opts = SimpleFileOptions::default().compression_method(method);
            zip.start_file(*name, opts).unwrap();
            zip.write_all(data).unwrap();
        }
        zip.finish().unwrap();
        path
    }

    /// Opens the archive and, should that succeed, extracts it; returns the error.
    fn refuse(&self, archive: &Path, limits: Limits) -> MarError {
        let target = self.path("target").join("unpacked");
        let err = match Archive::open_with_limits(archive, limits) {
            Err(e) => e,
            Ok(a) => a
                .unpack(&target)
                .expect_err("hostile archive was extracted"),
        };
        // Nothing may exist beside the archive except the (now empty) target folder.
        let mut found: Vec<String> = walkdir::WalkDir::new(self.dir.path())
            .min_depth(1)
            .into_iter()
            .map(|e| e.unwrap())
            .filter(|e| !e.file_type().is_dir())
            .map(|e| {
                e.path()
                    .strip_prefix(self.dir.path())
                    .unwrap()
                    .display()
                    .to_string()
            })
            .collect();
        found.sort();
        let archive_name = archive
            .strip_prefix(self.dir.path())
            .unwrap()
            .display()
            .to_string();
        assert_eq!(
            found,
            vec![archive_name],
            "files written while refusing: {err}"
        );
        assert!(!target.exists(), "extraction target left behind");
        err
    }
}

fn manifest_entry() -> (&'static str, &'static [u8]) {
    ("MAR-INF/MANIFEST.json", MANIFEST.as_bytes())
}

fn assert_message(err: &MarError, needles: &[&str]) {
    let msg = err.to_string();
    for n in needles {
        assert!(msg.contains(n), "`{msg}` lacks `{n}`");
    }
}

#[test]
fn zip_slip_through_dot_dot() {
    let s = Scene::new();
    let a = s.zip(
        &[
            manifest_entry(),
            ("../evil.txt", b"pwned"),
            ("a/../../evil2.txt", b"x"),
        ],
        CompressionMethod::Deflated,
    );
    let e = s.refuse(&a, Limits::default());
    assert!(matches!(e, MarError::UnsafeEntry { .. }), "{e:?}");
    assert_message(&e, &["m.mar", "../evil.txt", "`..`"]);
    assert!(!s.dir.path().parent().unwrap().join("evil.txt").exists());
}

#[test]
fn zip_absolute_path() {
    let s = Scene::new();
    let target = s.path("abs-evil.txt");
    let name = target.to_str().unwrap().to_string();
    let a = s.zip(
        &[manifest_entry(), (&name, b"pwned")],
        CompressionMethod::Deflated,
    );
    let e = s.refuse(&a, Limits::default());
    assert_message(&e, &["absolute paths are not allowed"]);
    assert!(!target.exists());
}

#[test]
fn zip_symlink_entry() {
    let s = Scene::new();
    let path = s.path("m.mar");
    let mut zip = ZipWriter::new(File::create(&path).unwrap());
    zip.start_file("MAR-INF/MANIFEST.json", SimpleFileOptions::default())
        .unwrap();
    zip.write_all(MANIFEST.as_bytes()).unwrap();
    zip.add_symlink("link", "/etc/passwd", SimpleFileOptions::default())
        .unwrap();
    zip.finish().unwrap();
    let e = s.refuse(&path, Limits::default());
    assert_message(&e, &["`link`", "symbolic links are not allowed"]);
}

/// Rewrites every occurrence of `from` with `to` (same length) in a file.
fn patch(path: &Path, from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let mut bytes = fs::read(path).unwrap();
    let mut hits = 0;
    let mut i = 0;
    while i + from.len() <= bytes.len() {
        if &bytes[i..i + from.len()] == from {
            bytes[i..i + from.len()].copy_from_slice(to);
            hits += 1;
            i += from.len();
        } else {
            i += 1;
        }
    }
    assert!(hits > 0, "pattern not found");
    fs::write(path, bytes).unwrap();
}

#[test]
fn zip_with_one_name_twice() {
    // Two manifests: a reader that keeps the last copy would serve whatever the second says.
    let s = Scene::new();
    let evil = MANIFEST.replace("\"m\"", "\"x\"");
    let a = s.zip(
        &[manifest_entry(), ("MAR-INF/MANIFESX.json", evil.as_bytes())],
        CompressionMethod::Deflated,
    );
    patch(&a, b"MAR-INF/MANIFESX.json", b"MAR-INF/MANIFEST.json");
    let e = s.refuse(&a, Limits::default());
    assert_message(&e, &["m.mar", "the same entry name twice"]);
}

#[test]
fn zip_bomb_declaring_gigabytes_of_zeros() {
    let s = Scene::new();
    let zeros = vec![0u8; 1 << 20];
    let a = s.zip(
        &[manifest_entry(), ("weights.pt", &zeros)],
        CompressionMethod::Deflated,
    );
    // Declare 3.75 GiB uncompressed in both the local header and the central directory.
    patch(
        &a,
        &(1u32 << 20).to_le_bytes(),
        &0xF000_0000u32.to_le_bytes(),
    );
    let e = s.refuse(&a, Limits::default());
    assert!(matches!(e, MarError::LimitExceeded { .. }), "{e:?}");
    assert_message(&e, &["weights.pt", "4026531840", "zip bomb"]);

    let e = s.refuse(
        &a,
        Limits {
            max_ratio: u64::MAX,
            ..Limits::default()
        },
    );
    assert!(matches!(e, MarError::LimitExceeded { .. }), "{e:?}");
    let e = s.refuse(
        &a,
        Limits {
            max_total_size: 1 << 30,
            max_ratio: u64::MAX,
            ..Limits::default()
        },
    );
    assert_message(&e, &["exceed the 1073741824 byte limit"]);
}

#[test]
fn zip_entry_inflating_past_its_declared_size() {
    let s = Scene::new();
    let zeros = vec![0u8; 8 << 20];
    let a = s.zip(
        &[manifest_entry(), ("weights.pt", &zeros)],
        CompressionMethod::Deflated,
    );
    patch(&a, &(8u32 << 20).to_le_bytes(), &100u32.to_le_bytes());
    let e = s.refuse(&a, Limits::default());
    assert_message(&e, &["weights.pt"]);
}

#[test]
fn zip_entry_count_limit() {
    let s = Scene::new();
    let names: Vec<String> = (0..20).map(|i| format!("f{i}")).collect();
    let mut entries: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b"x"[..])).collect();
    entries.push(manifest_entry());
    let a = s.zip(&entries, CompressionMethod::Stored);
    let e = s.refuse(
        &a,
        Limits {
            max_entries: 10,
            ..Limits::default()
        },
    );
    assert_message(&e, &["more than 10 entries"]);
    assert!(
        Archive::open_with_limits(
            &a,
            Limits {
                max_entries: 21,
                ..Limits::default()
            }
        )
        .is_ok()
    );
}

#[test]
fn truncated_zip() {
    let s = Scene::new();
    let a = s.zip(
        &[manifest_entry(), ("weights.pt", &[7u8; 4096])],
        CompressionMethod::Stored,
    );
    let bytes = fs::read(&a).unwrap();
    fs::write(&a, &bytes[..bytes.len() / 2]).unwrap();
    let e = s.refuse(&a, Limits::default());
    assert!(matches!(e, MarError::Corrupt { .. }), "{e:?}");
    assert_message(&e, &["m.mar", "damaged or truncated zip"]);
}

#[test]
fn not_an_archive_at_all() {
    let s = Scene::new();
    let a = s.path("m.mar");
    fs::write(&a, b"this is text").unwrap();
    let e = s.refuse(&a, Limits::default());
    assert_message(&e, &["not a model archive"]);
}

#[test]
fn non_utf8_entry_name_in_zip() {
    let s = Scene::new();
    let a = s.zip(
        &[manifest_entry(), ("QQQQQQ.bin", b"x")],
        CompressionMethod::Stored,
    );
    patch(&a, b"QQQQQQ", b"\xff\xfe\xfd\xfc\xfb\xfa");
    let e = s.refuse(&a, Limits::default());
    assert_message(&e, &["not valid UTF-8"]);
}

/// A tar member with a raw name, bypassing the tar crate's own path checks.
fn raw_member(name: &[u8], kind: tar::EntryType, data: &[u8]) -> (tar::Header, Vec<u8>) {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(kind);
    if kind == tar::EntryType::Symlink || kind == tar::EntryType::Link {
        h.set_link_name("/etc/passwd").unwrap();
    }
    h.set_cksum();
    (h, data.to_vec())
}

fn tgz(s: &Scene, members: &[(&[u8], tar::EntryType, &[u8])]) -> PathBuf {
    let path = s.path("m.tar.gz");
    let mut tar = tar::Builder::new(GzEncoder::new(
        File::create(&path).unwrap(),
        Compression::default(),
    ));
    let (h, d) = raw_member(
        b"m/MAR-INF/MANIFEST.json",
        tar::EntryType::Regular,
        MANIFEST.as_bytes(),
    );
    tar.append(&h, d.as_slice()).unwrap();
    for (name, kind, data) in members {
        let (h, d) = raw_member(name, *kind, data);
        tar.append(&h, d.as_slice()).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
    path
}

#[test]
fn tgz_with_dot_dot() {
    let s = Scene::new();
    let a = tgz(
        &s,
        &[(b"m/../../evil.txt", tar::EntryType::Regular, b"pwned")],
    );
    let e = s.refuse(&a, Limits::default());
    assert_message(&e, &["m.tar.gz", "m/../../evil.txt", "`..`"]);
}

#[test]
fn tgz_links_devices_and_odd_names() {
    let cases: [(&[u8], tar::EntryType, &str); 5] = [
        (b"m/link", tar::EntryType::Symlink, "links are not allowed"),
        (b"m/hard", tar::EntryType::Link, "links are not allowed"),
        (b"m/tty", tar::EntryType::Char, "device files"),
        (b"/m/abs.txt", tar::EntryType::Regular, "absolute paths"),
        (
            b"m/\xff\xfe.bin",
            tar::EntryType::Regular,
            "not valid UTF-8",
        ),
    ];
    for (name, kind, needle) in cases {
        let s = Scene::new();
        let a = tgz(&s, &[(name, kind, b"")]);
        let e = s.refuse(&a, Limits::default());
        assert_message(&e, &[needle]);
    }
}

#[test]
fn tgz_bomb() {
    let s = Scene::new();
    let zeros = vec![0u8; 4 << 20];
    let a = tgz(&s, &[(b"m/weights.pt", tar::EntryType::Regular, &zeros)]);
    let e = s.refuse(&a, Limits::default());
    assert_message(&e, &["the archive expands", "zip bomb"]);
}

#[test]
fn zip_bomb_of_many_entries_each_under_the_ratio_floor() {
    // 64 entries of 1 MiB of zeros: none passes the floor above which an entry's own ratio is
    // checked, and together they expand about a thousand times.
    let s = Scene::new();
    let zeros = vec![0u8; 1 << 20];
    let names: Vec<String> = (0..64).map(|i| format!("blob{i}.bin")).collect();
    let mut entries: Vec<(&str, &[u8])> = vec![("MAR-INF/MANIFEST.json", MANIFEST.as_bytes())];
    entries.extend(names.iter().map(|n| (n.as_str(), zeros.as_slice())));
    let a = s.zip(&entries, CompressionMethod::Deflated);
    let e = s.refuse(&a, Limits::default());
    assert_message(&e, &["the archive expands", "possible zip bomb"]);
}

#[test]
fn tgz_metadata_members_are_measured_before_they_are_read() {
    // The tar library reads a long name or pax header whole before the entry it names: 8 MiB
    // of zeros gzip to a few kilobytes, and a few hundred megabytes to a few hundred.
    let zeros = vec![0u8; 8 << 20];
    for kind in [
        tar::EntryType::GNULongName,
        tar::EntryType::XHeader,
        tar::EntryType::XGlobalHeader,
    ] {
        let s = Scene::new();
        let a = tgz(&s, &[(b"././@LongLink", kind, &zeros)]);
        let e = s.refuse(&a, Limits::default());
        assert!(
            matches!(e, MarError::LimitExceeded { .. }),
            "{kind:?}: {e:?}"
        );
        assert_message(&e, &["tar metadata member", "8388608 bytes"]);
    }
}

#[test]
fn tgz_long_names_by_gnu_and_pax_headers_are_read() {
    let long = format!("m/{}/weights.pt", "deep".repeat(40));
    let s = Scene::new();
    let path = s.path("m.tar.gz");
    let mut tar = tar::Builder::new(GzEncoder::new(
        File::create(&path).unwrap(),
        Compression::default(),
    ));
    let (h, d) = raw_member(
        b"m/MAR-INF/MANIFEST.json",
        tar::EntryType::Regular,
        MANIFEST.as_bytes(),
    );
    tar.append(&h, d.as_slice()).unwrap();
    // A name past the header's 100 bytes: the builder writes a GNU long-name member first.
    let mut h = tar::Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, &long, &b"abc"[..]).unwrap();
    // A pax header naming the next member, whose own header holds a short stand-in.
    let pax_name = format!("m/{}/labels.json", "pax".repeat(50));
    tar.append_pax_extensions([("path", pax_name.as_bytes())])
        .unwrap();
    let (h, d) = raw_member(b"m/stand-in", tar::EntryType::Regular, b"{}");
    tar.append(&h, d.as_slice()).unwrap();
    tar.into_inner().unwrap().finish().unwrap();

    let a = Archive::open(&path).unwrap();
    let want = [&long["m/".len()..], &pax_name["m/".len()..]];
    for name in want {
        assert!(a.contains(name), "{name} missing from {:?}", a.entries());
    }
    assert!(!a.contains("stand-in"));
    let out = s.path("out");
    let root = a.unpack(&out).unwrap();
    assert_eq!(fs::read(root.join(want[0])).unwrap(), b"abc");
    assert_eq!(fs::read(root.join(want[1])).unwrap(), b"{}");
}

#[test]
fn truncated_tgz() {
    let s = Scene::new();
    let a = tgz(
        &s,
        &[(b"m/weights.pt", tar::EntryType::Regular, &[3u8; 100_000])],
    );
    let bytes = fs::read(&a).unwrap();
    fs::write(&a, &bytes[..bytes.len() / 2]).unwrap();
    let e = s.refuse(&a, Limits::default());
    assert!(matches!(e, MarError::Corrupt { .. }), "{e:?}");
}

#[test]
fn manifests_missing_or_mistyped() {
    let cases: [(Option<&str>, &str); 5] = [
        (None, "MAR-INF/MANIFEST.json: missing"),
        (Some(r#"{"runtime": "python"}"#), "missing field `model`"),
        (
            Some(r#"{"model": {"modelName": 7}}"#),
            "field `model.modelName` must be a string, found a number",
        ),
        (
            Some(r#"{"model": {"modelVersion": ["1"]}}"#),
            "field `model.modelVersion` must be a string, found an array",
        ),
        (
            Some(r#"{"runtime": 3, "model": {}}"#),
            "field `runtime` must be a string",
        ),
    ];
    for (manifest, needle) in cases {
        let s = Scene::new();
        let mut entries: Vec<(&str, &[u8])> = vec![("m.pt", b"x")];
        if let Some(m) = manifest {
            entries.push(("MAR-INF/MANIFEST.json", m.as_bytes()));
        }
        let a = s.zip(&entries, CompressionMethod::Deflated);
        let e = s.refuse(&a, Limits::default());
        assert!(matches!(e, MarError::Manifest { .. }), "{e:?}");
        assert_message(&e, &["m.mar", needle]);
    }
}

#[test]
fn a_sound_archive_extracts() {
    let s = Scene::new();
    let a = s.zip(
        &[
            ("m.pt", b"weights"),
            ("extra/labels.json", b"{}"),
            manifest_entry(),
        ],
        CompressionMethod::Deflated,
    );
    let archive = Archive::open(&a).unwrap();
    assert_eq!(archive.model_name(), "m");
    assert!(archive.contains("extra/labels.json"));
    let dir = archive.unpack(&s.path("out")).unwrap();
    assert_eq!(fs::read(dir.join("m.pt")).unwrap(), b"weights");
    assert_eq!(fs::read(dir.join("extra/labels.json")).unwrap(), b"{}");
}
