//! The Kubernetes and KServe manifests under deploy/ pass yamllint, their schemas (Kubernetes'
//! and KServe's CRDs) and the facts the image relies on (tests/clients/deploy_check.py).

use std::path::Path;
use std::process::Command;

#[test]
fn manifests_pass_yamllint_and_schema_validation() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = root.join(".venv-clients/bin/python");
    let out = Command::new(&python)
        .arg("tests/clients/deploy_check.py")
        .current_dir(&root)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "deploy_check.py failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    eprintln!("{}", stdout.trim());
}
