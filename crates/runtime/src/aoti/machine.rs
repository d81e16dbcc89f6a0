//! Whether a package's machine code can run on this machine: its operating system,
//! architecture and vector instructions.

use std::collections::HashMap;

/// The CPU features a package's vector ISA (its `AOTI_CPU_ISA` metadata, as inductor names it)
/// needs, as `/proc/cpuinfo` names them.
fn isa_features(isa: &str) -> Option<&'static [&'static str]> {
    Some(match isa {
        "AVX2" => &["avx2", "fma", "f16c"],
        "AVX512" => &["avx512f", "avx512dq", "avx512vl", "avx512bw", "fma"],
        "AVX512_VNNI" => &["avx512_vnni"],
        "AMX_TILE" => &["amx_tile", "amx_bf16", "amx_int8"],
        "NEON" | "ASIMD" => &["asimd"],
        _ => return None,
    })
}

/// The features a package compiled for `isa` needs and `cpu_flags` lacks.
fn missing_features(isa: &str, cpu_flags: &[&str]) -> Vec<&'static str> {
    isa.split_whitespace()
        .filter_map(isa_features)
        .flatten()
        .filter(|f| !cpu_flags.contains(f))
        .copied()
        .collect()
}

/// This machine's CPU feature flags (x86's `flags`, Arm's `Features`); empty where unknown.
fn cpu_flags() -> Vec<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find(|l| l.starts_with("flags") || l.starts_with("Features"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, flags)| flags.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Refuses a package compiled for another kind of machine: its code would stop the whole
/// process with an illegal instruction at the first forward, not fail the one registration.
pub(super) fn check_machine(meta: &HashMap<String, String>) -> Result<(), String> {
    let (os, arch) = (std::env::consts::OS, std::env::consts::ARCH);
    let platform = meta.get("AOTI_PLATFORM").map_or(os, String::as_str);
    let machine = meta.get("AOTI_MACHINE").map_or(arch, String::as_str);
    if platform != os || machine != arch {
        return Err(format!(
            "the package was compiled for {platform} {machine} and this machine is {os} {arch}: \
             compile it again on this kind of machine"
        ));
    }
    let isa = meta.get("AOTI_CPU_ISA").map_or("", String::as_str);
    let flags = cpu_flags();
    if flags.is_empty() {
        return Ok(());
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let missing = missing_features(isa, &flags);
    if !missing.is_empty() {
        return Err(format!(
            "the package was compiled for a CPU with {isa} and this one lacks {}: compile it \
             again on this kind of machine",
            missing.join(", ")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_package_needs_the_cpu_features_of_its_vector_isa() {
        let epyc = [
            "fma",
            "avx",
            "f16c",
            "avx2",
            "avx512f",
            "avx512dq",
            "avx512bw",
            "avx512vl",
            "avx512_vnni",
        ];
        assert!(missing_features("AVX512 AVX512_VNNI", &epyc).is_empty());
        assert!(missing_features("AVX2", &epyc).is_empty());
        assert_eq!(
            missing_features("AVX512 AVX512_VNNI AMX_TILE", &epyc),
            ["amx_tile", "amx_bf16", "amx_int8"]
        );
        let older = ["fma", "avx", "f16c", "avx2"];
        assert_eq!(
            missing_features("AVX512", &older),
            ["avx512f", "avx512dq", "avx512vl", "avx512bw"]
        );
        // A name this side does not know asks for nothing: the package's own loader decides.
        assert!(missing_features("ZVECTOR", &older).is_empty());
        assert!(missing_features("", &older).is_empty());
    }
}
