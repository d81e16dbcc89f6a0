//! `tch-model-archiver`: packs a model into a `.mar` archive, flag for flag like
//! torch-model-archiver.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use tchserve_mar::{ArchiveFormat, HandlerKind, PackRequest, RuntimeType};

/// Packs a TorchScript model, its handler and extra files into a model archive that
/// tchserve (and TorchServe) can serve.
#[derive(Debug, Parser)]
#[command(
    name = "tch-model-archiver",
    disable_version_flag = true,
    // As argparse: a long flag may be shortened while it stays unambiguous (--model-n), and a
    // flag given twice takes its last value, so wrapper scripts written for
    // torch-model-archiver run unchanged.
    infer_long_args = true,
    args_override_self = true,
    after_help = "Examples:\n  tch-model-archiver --model-name digits -v 1.0 --serialized-file digits.pt \\\n      --handler tensor --export-path model-store\n  tch-model-archiver --model-name resnet18 -v 2.0 --serialized-file resnet18.pt \\\n      --handler image_classifier --extra-files index_to_name.json"
)]
struct Args {
    /// Name of the model. The archive is written as <model-name>.mar (or .tar.gz, or a
    /// folder) under --export-path. Letters, digits, '_', '-' and '.', starting with a
    /// letter or digit.
    #[arg(long, value_name = "MODEL_NAME")]
    model_name: String,

    /// The model's weights: a TorchScript file (.pt) for tchserve; TorchServe also takes an
    /// eager-mode state_dict (.pth) with --model-file, or .onnx.
    #[arg(long, value_name = "SERIALIZED_FILE")]
    serialized_file: Option<OsString>,

    /// Python file defining the model class, for TorchServe's eager mode (tchserve serves
    /// TorchScript and ignores it).
    #[arg(long, value_name = "MODEL_FILE")]
    model_file: Option<OsString>,

    /// A built-in handler (tensor, image_classifier, image_segmenter, object_detector,
    /// text_classifier, text_embedding, or TorchServe's base_handler), a handler manifest
    /// (.json, checked before anything is written), or a Python handler file (packed for
    /// TorchServe; tchserve cannot run it).
    #[arg(long, value_name = "HANDLER")]
    handler: String,

    /// Comma-separated files or folders to add; wildcards allowed. A file lands at the
    /// archive root; a folder's contents are merged into the root. Empty items are skipped.
    #[arg(long, value_name = "EXTRA_FILES")]
    extra_files: Option<String>,

    /// The runtime recorded in the manifest.
    #[arg(long, default_value = "python", value_parser = ["python", "python3", "LSP"])]
    runtime: String,

    /// Folder the archive is written to (created when missing). Default: the current folder.
    #[arg(long, value_name = "EXPORT_PATH")]
    export_path: Option<OsString>,

    /// Output layout. default: <model-name>.mar, deflated zip. zip-store: .mar without
    /// compression (fastest to write and to load). tgz: <model-name>.tar.gz. no-archive: a
    /// folder <model-name>/ holding the files and MAR-INF/MANIFEST.json.
    #[arg(long, default_value = "default", value_parser = ArchiveFormat::NAMES)]
    archive_format: String,

    /// Replace an existing output of the same name.
    #[arg(short = 'f', long)]
    force: bool,

    /// The model's version, recorded in the manifest.
    #[arg(short = 'v', long, value_name = "VERSION")]
    version: String,

    /// A pip requirements file, packed for TorchServe (tchserve does not install Python packages).
    #[arg(short = 'r', long, value_name = "REQUIREMENTS_FILE")]
    requirements_file: Option<OsString>,

    /// A model-config.yaml with serving settings (batchSize, maxBatchDelay, minWorkers, ...) and
    /// a handler: section.
    #[arg(short = 'c', long, value_name = "CONFIG_FILE")]
    config_file: Option<OsString>,
}

/// Archives at least this large get a progress bar on a terminal.
const PROGRESS_THRESHOLD: u64 = 16 << 20;

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A path flag's value; an empty one counts as not given, as torch-model-archiver reads it
/// (scripts pass `-r "$REQUIREMENTS"` with the variable unset).
fn given(value: Option<OsString>) -> Option<PathBuf> {
    value.filter(|v| !v.is_empty()).map(PathBuf::from)
}

fn run(args: Args) -> anyhow::Result<()> {
    let request = PackRequest {
        model_name: args.model_name,
        version: args.version,
        serialized_file: given(args.serialized_file),
        model_file: given(args.model_file),
        handler: args.handler,
        extra_files: args.extra_files,
        runtime: RuntimeType::parse(&args.runtime).unwrap_or_default(),
        export_path: match given(args.export_path) {
            Some(p) => p,
            None => std::env::current_dir()?,
        },
        format: ArchiveFormat::parse(&args.archive_format).unwrap_or(ArchiveFormat::Default),
        force: args.force,
        requirements_file: given(args.requirements_file),
        config_file: given(args.config_file),
    };
    let plan = request.plan()?;
    for w in &plan.warnings {
        eprintln!("warning: {w}");
    }
    if let Some(twin) = &plan.twin_manifest {
        eprintln!(
            "note: handler {} is code, which TorchServe runs; tchserve serves the archive with \
             the manifest beside it, {twin}",
            request.handler
        );
    } else if plan.handler_kind == HandlerKind::Code {
        eprintln!(
            "warning: handler {} is code; the archive works in TorchServe, but tchserve cannot run \
             Python or C++ handlers. Use a built-in handler or a handler manifest (.json) to serve it \
             with tchserve, or pack a manifest of the handler's name beside it ({}); see \
             docs/handlers.md.",
            request.handler,
            tchserve_mar::handler::twin_manifest_name(&request.handler)
                .map_or_else(String::new, |t| format!("--extra-files {t}"))
        );
    }
    if plan.output.exists() {
        eprintln!("warning: overwriting {}", plan.output.display());
    }
    let total = plan.total_size();
    let bar = (std::io::stderr().is_terminal() && total >= PROGRESS_THRESHOLD).then(|| {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(format!("packing {}", plan.model_name));
        bar
    });
    let result = plan.write(&mut |n| {
        if let Some(bar) = &bar {
            bar.inc(n);
        }
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    // Silent on success, as torch-model-archiver is, so scripts can rely on the exit code.
    result?;
    Ok(())
}
