//! Archive reading: any bytes as a `.mar` (zip, zip-store or tar.gz), opened, read and unpacked
//! into a scratch folder. Nothing may panic, and nothing may land outside the folder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tchserve_mar::Archive;

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    let file = dir.path().join("model.mar");
    if std::fs::write(&file, data).is_err() {
        return;
    }
    let Ok(archive) = Archive::open(&file) else {
        return;
    };
    let _ = archive.model_config();
    let _ = archive.model_name();
    for entry in archive.entries().iter().filter(|e| !e.is_dir) {
        let _ = archive.read_file(&entry.name);
    }
    let dest = dir.path().join("out");
    if let Ok(root) = archive.unpack(&dest) {
        assert!(
            root.starts_with(dir.path()),
            "unpacked outside the scratch folder: {}",
            root.display()
        );
    }
});
