//! `tch-model-archiver` as a user meets it: help, errors that name the flag, no overwriting
//! without --force, no partial output after a failure, and handler manifests checked first.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use common::{files_below, run, run_ok};

fn archiver(dir: &Path, args: &[&str]) -> Output {
    run(Command::new(env!("CARGO_BIN_EXE_tch-model-archiver"))
        .current_dir(dir)
        .args(args))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("m.pt"), vec![1u8; 1000]).unwrap();
    fs::create_dir(dir.path().join("out")).unwrap();
    dir
}

const BASE: [&str; 9] = [
    "--model-name",
    "m",
    "-v",
    "1.0",
    "--serialized-file",
    "m.pt",
    "--export-path",
    "out",
    "--handler",
];

fn args<'a>(handler: &'a str, more: &[&'a str]) -> Vec<&'a str> {
    BASE.iter()
        .copied()
        .chain([handler])
        .chain(more.iter().copied())
        .collect()
}

#[test]
fn help_lists_every_flag_of_the_real_archiver() {
    let out = run_ok(Command::new(env!("CARGO_BIN_EXE_tch-model-archiver")).arg("--help"));
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--model-name",
        "--serialized-file",
        "--model-file",
        "--handler",
        "--extra-files",
        "--runtime",
        "--export-path",
        "--archive-format",
        "-f, --force",
        "-v, --version",
        "-r, --requirements-file",
        "-c, --config-file",
        "tgz",
        "no-archive",
        "zip-store",
        "python3",
        "LSP",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

#[test]
fn missing_required_flag_is_named() {
    let dir = setup();
    let out = archiver(dir.path(), &["--model-name", "m", "--handler", "tensor"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--version"), "{}", stderr(&out));
}

#[test]
fn bad_values_name_their_flag() {
    let dir = setup();
    let cases: [(Vec<&str>, &str); 6] = [
        (
            args("tensor", &["--archive-format", "zip"]),
            "--archive-format",
        ),
        (args("tensor", &["--runtime", "python4"]), "--runtime"),
        (
            args("tensor", &["--extra-files", "nope.txt"]),
            "--extra-files: File does not exist: nope.txt",
        ),
        (
            args("tensor", &["--config-file", "nope.yaml"]),
            "--config-file",
        ),
        (
            args("missing_handler", &[]),
            "--handler: missing_handler is not a built-in handler",
        ),
        (
            args("base_handler", &["--runtime", "LSP"]),
            "--handler: with --runtime LSP, --handler is BaseHandler, TorchScriptHandler or a \
             compiled handler library, and there is no base_handler.so",
        ),
    ];
    for (a, needle) in cases {
        let out = archiver(dir.path(), &a);
        assert!(!out.status.success());
        assert!(stderr(&out).contains(needle), "{a:?}: {}", stderr(&out));
    }
    let out = archiver(
        dir.path(),
        &[
            "--model-name",
            "m",
            "-v",
            "1",
            "--serialized-file",
            "gone.pt",
            "--handler",
            "tensor",
            "--export-path",
            "out",
        ],
    );
    assert!(
        stderr(&out).contains("--serialized-file: file does not exist: gone.pt"),
        "{}",
        stderr(&out)
    );
    assert!(files_below(&dir.path().join("out")).is_empty());
}

#[test]
fn model_name_rule_and_message() {
    let dir = setup();
    let out = archiver(
        dir.path(),
        &["--model-name", "bad name", "-v", "1", "--handler", "tensor"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("Model name contains special characters."),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("^[A-Za-z0-9][A-Za-z0-9_\\-.]*$"));
}

#[test]
fn existing_output_needs_force_and_is_left_alone() {
    let dir = setup();
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_tch-model-archiver"))
            .current_dir(dir.path())
            .args(args("tensor", &[])),
    );
    let mar = dir.path().join("out/m.mar");
    let before = fs::read(&mar).unwrap();
    fs::write(dir.path().join("m.pt"), vec![2u8; 10]).unwrap();
    let out = archiver(dir.path(), &args("tensor", &[]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("already exists") && stderr(&out).contains("--force"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        fs::read(&mar).unwrap(),
        before,
        "overwritten without --force"
    );
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_tch-model-archiver"))
            .current_dir(dir.path())
            .args(args("tensor", &["-f"])),
    );
    assert_ne!(fs::read(&mar).unwrap(), before);
    // Same for a folder output, which --force replaces whole.
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_tch-model-archiver"))
            .current_dir(dir.path())
            .args(args("tensor", &["--archive-format", "no-archive"])),
    );
    fs::write(dir.path().join("out/m/stale.txt"), b"old").unwrap();
    assert!(
        !archiver(
            dir.path(),
            &args("tensor", &["--archive-format", "no-archive"])
        )
        .status
        .success()
    );
    assert!(dir.path().join("out/m/stale.txt").exists());
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_tch-model-archiver"))
            .current_dir(dir.path())
            .args(args(
                "tensor",
                &["--archive-format", "no-archive", "--force"],
            )),
    );
    assert_eq!(
        files_below(&dir.path().join("out/m")),
        ["MAR-INF/MANIFEST.json", "m.pt"]
    );
}

#[test]
fn failed_runs_leave_nothing_behind() {
    let dir = setup();
    // A missing input is caught before writing starts; /proc/self/mem passes every check but
    // fails to read, so that failure strikes halfway through writing.
    for extra in ["m.pt,absent/*.txt,gone.txt", "m.pt,/proc/self/mem"] {
        for format in ["default", "zip-store", "tgz", "no-archive"] {
            let out = archiver(
                dir.path(),
                &args(
                    "tensor",
                    &["--archive-format", format, "--extra-files", extra],
                ),
            );
            assert!(!out.status.success(), "{format} {extra}");
            assert_eq!(
                fs::read_dir(dir.path().join("out")).unwrap().count(),
                0,
                "{format} {extra}: left {:?}",
                files_below(&dir.path().join("out"))
            );
        }
    }
}

#[test]
fn handler_manifests_are_validated_before_writing() {
    let dir = setup();
    let bad = r#"{"schema": 1, "name": "h", "input": {"image": {}},
        "preprocess": [{"resize": {"size": 256}}, {"center_crop": {"size": "big"}}, {"to_tensor": {}}],
        "model": {"feed": "stacked"}, "output": {"tensor": {}}}"#;
    fs::write(dir.path().join("h.json"), bad).unwrap();
    let out = archiver(dir.path(), &args("h.json", &[]));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("h.json: preprocess[1].center_crop.size"),
        "{}",
        stderr(&out)
    );
    assert!(files_below(&dir.path().join("out")).is_empty());

    fs::write(dir.path().join("h.json"), bad.replace("\"big\"", "224")).unwrap();
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_tch-model-archiver"))
            .current_dir(dir.path())
            .args(args("h.json", &[])),
    );
    let archive = tchserve_mar::Archive::open(dir.path().join("out/m.mar")).unwrap();
    assert_eq!(archive.manifest().model.handler.as_deref(), Some("h.json"));
    assert!(archive.contains("h.json"));
}

#[test]
fn model_config_keys_it_will_not_act_on_are_said_when_packing() {
    let dir = setup();
    fs::write(
        dir.path().join("model-config.yaml"),
        b"batchSize: 4\nparallelType: pp\nminWorkers: many\n",
    )
    .unwrap();
    let out = run_ok(
        Command::new(env!("CARGO_BIN_EXE_tch-model-archiver"))
            .current_dir(dir.path())
            .args(args("tensor", &["--config-file", "model-config.yaml"])),
    );
    let said = stderr(&out);
    assert!(
        said.contains("model-config.yaml") && said.contains("`parallelType`"),
        "{said}"
    );
    assert!(said.contains("`minWorkers`"), "{said}");
}

#[test]
fn python_handlers_are_packed_with_a_warning() {
    let dir = setup();
    fs::write(
        dir.path().join("custom.py"),
        b"def handle(d, c): return d\n",
    )
    .unwrap();
    let out = run_ok(
        Command::new(env!("CARGO_BIN_EXE_tch-model-archiver"))
            .current_dir(dir.path())
            .args(args("custom.py", &[])),
    );
    assert!(
        stderr(&out).contains("tchserve cannot run Python"),
        "{}",
        stderr(&out)
    );
    let archive = tchserve_mar::Archive::open(dir.path().join("out/m.mar")).unwrap();
    assert!(archive.contains("custom.py"));
    // Built-in names pack no file, quietly.
    let out = run_ok(
        Command::new(env!("CARGO_BIN_EXE_tch-model-archiver"))
            .current_dir(dir.path())
            .args(args("image_classifier", &["-f"])),
    );
    assert!(
        stderr(&out).is_empty() || stderr(&out).contains("overwriting"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn export_path_is_created_and_success_is_silent() {
    let dir = setup();
    let out = run_ok(
        Command::new(env!("CARGO_BIN_EXE_tch-model-archiver"))
            .current_dir(dir.path())
            .args([
                "--model-name",
                "m",
                "-v",
                "1",
                "--serialized-file",
                "m.pt",
                "--handler",
                "tensor",
                "--export-path",
                "new/store",
            ]),
    );
    assert!(out.stdout.is_empty() && out.stderr.is_empty());
    assert!(dir.path().join("new/store/m.mar").is_file());
}

#[test]
fn a_mistyped_builtin_handler_lists_the_builtins() {
    let dir = setup();
    let out = archiver(dir.path(), &args("image_clasifier", &[]));
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("image_clasifier is not a built-in handler") && e.contains("image_classifier, "),
        "{e}"
    );
    assert!(files_below(&dir.path().join("out")).is_empty());
}

#[test]
fn validation_messages_are_the_ones_the_docs_quote() {
    let docs = fs::read_to_string(common::repo_root().join("docs/handlers.md")).unwrap();
    let block = docs
        .split("## Validation")
        .nth(1)
        .and_then(|rest| rest.split("```").nth(1))
        .unwrap();
    let quoted: Vec<&str> = block
        .lines()
        .filter(|l| l.starts_with("handler manifest"))
        .collect();
    // One manifest per quoted line, in the same order.
    let image = |preprocess: &str, feed: &str| {
        format!(
            r#"{{"schema": 1, "name": "h", "input": {{"image": {{}}}}, "preprocess": [{preprocess}],
                "model": {{"feed": "{feed}"}}, "output": {{"tensor": {{}}}}}}"#
        )
    };
    let manifests = [
        image(
            r#"{"resize": {"size": 256}}, {"center_crop": {"size": "big"}}, {"to_tensor": {}}"#,
            "stacked",
        ),
        image(r#"{"resize": {"sise": 256}}, {"to_tensor": {}}"#, "stacked"),
        image(
            r#"{"resize": {"size": 256}}, {"center_crop": {"size": 224}}, {"to_tensor": {}},
               {"normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0, 0.2]}}"#,
            "stacked",
        ),
        image(r#"{"resize": {"size": 256}}, {"to_tensor": {}}"#, "stacked"),
        image(
            r#"{"resize": {"size": 256}}, {"to_tensor": {}, "center_crop": {"size": 224}}"#,
            "stacked",
        ),
    ];
    assert_eq!(quoted.len(), manifests.len(), "{quoted:?}");
    let dir = setup();
    for (line, manifest) in quoted.iter().zip(manifests) {
        fs::write(dir.path().join("my_handler.json"), manifest).unwrap();
        let out = archiver(dir.path(), &args("my_handler.json", &[]));
        assert!(!out.status.success());
        // The docs may cut a long message short with "...".
        let expected = line.trim_end_matches("...").trim_end();
        assert!(
            stderr(&out).contains(expected),
            "docs say:\n{line}\nthe archiver says:\n{}",
            stderr(&out)
        );
    }
}

#[test]
fn empty_values_count_as_not_given() {
    // Scripts pass "$REQUIREMENTS" and the like with the variable unset; argparse reads an
    // empty value as no value, and an empty --export-path as the current folder.
    let dir = setup();
    let out = archiver(
        dir.path(),
        &[
            "--model-name",
            "m",
            "-v",
            "1.0",
            "--serialized-file",
            "m.pt",
            "--handler",
            "tensor",
            "-r",
            "",
            "-c",
            "",
            "--model-file",
            "",
            "--extra-files",
            "",
            "--export-path",
            "",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let mar = tchserve_mar::Archive::open(dir.path().join("m.mar")).unwrap();
    let model = &mar.manifest().model;
    assert_eq!(
        (
            &model.requirements_file,
            &model.config_file,
            &model.model_file
        ),
        (&None, &None, &None)
    );
}

#[test]
fn a_folder_given_as_a_file_is_named_as_one() {
    let dir = setup();
    let out = archiver(
        dir.path(),
        &[
            "--model-name",
            "m",
            "-v",
            "1.0",
            "--serialized-file",
            "out",
            "--handler",
            "tensor",
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--serialized-file: out is a folder, not a file"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn torchserve_handlers_tchserve_lacks_are_packed_with_a_warning() {
    let dir = setup();
    for (handler, more) in [
        ("dali_image_classifier", &[][..]),
        ("vllm_handler", &[][..]),
        ("TorchScriptHandler", &["--runtime", "LSP"][..]),
    ] {
        let mut a = args(handler, more);
        a.push("-f");
        let out = archiver(dir.path(), &a);
        assert!(out.status.success(), "{handler}: {}", stderr(&out));
        let e = stderr(&out);
        assert!(
            e.contains(&format!(
                "warning: handler {handler} is built into TorchServe"
            )) && e.contains("image_classifier, "),
            "{handler}: {e}"
        );
    }
    // The ones tchserve serves pack without that warning.
    for handler in ["image_classifier", "base_handler", "tensor"] {
        let out = archiver(dir.path(), &args(handler, &["-f"]));
        assert!(out.status.success(), "{handler}: {}", stderr(&out));
        assert!(
            !stderr(&out).contains("built into TorchServe"),
            "{handler}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn files_a_handler_manifest_names_are_expected_in_the_archive() {
    let dir = setup();
    fs::write(
        dir.path().join("cls.json"),
        r#"{"schema": 1, "name": "cls", "input": {"tensor": {"dtype": "float32", "shape": [4]}},
            "model": {"feed": "stacked"}, "postprocess": [{"softmax": {"dim": 1}}],
            "output": {"classes": {"top_k": 2, "labels": "index_to_name.json"}}}"#,
    )
    .unwrap();
    let out = archiver(dir.path(), &args("cls.json", &[]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "warning: the handler manifest names index_to_name.json, which is not in the archive"
        ),
        "{}",
        stderr(&out)
    );
    fs::write(dir.path().join("index_to_name.json"), r#"{"0": "a"}"#).unwrap();
    let out = archiver(
        dir.path(),
        &args("cls.json", &["-f", "--extra-files", "index_to_name.json"]),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !stderr(&out).contains("not in the archive"),
        "{}",
        stderr(&out)
    );
    // A label file in none of TorchServe's forms would fail every registration: refused here.
    fs::write(dir.path().join("index_to_name.json"), r#"["a", "b"]"#).unwrap();
    let out = archiver(
        dir.path(),
        &args("cls.json", &["-f", "--extra-files", "index_to_name.json"]),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("(the handler's label file index_to_name.json): expected TorchServe's index_to_name.json")
            && stderr(&out).contains("found an array"),
        "{}",
        stderr(&out)
    );
}
