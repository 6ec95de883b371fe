//! The default build needs no system library: the `peerless` binary links only glibc's own
//! libraries (and libgcc_s, the unwinder every Rust program on glibc links), so the README's
//! commands work on a machine that has nothing but the Rust toolchain.

use std::process::Command;

/// glibc's libraries, the kernel's vDSO and the dynamic loader, and GCC's unwinder.
const ALLOWED: [&str; 11] = [
    "linux-vdso.so.1",
    "libc.so.6",
    "libm.so.6",
    "libpthread.so.0",
    "libdl.so.2",
    "librt.so.1",
    "libutil.so.1",
    "libresolv.so.2",
    "ld-linux-x86-64.so.2",
    "ld-linux-aarch64.so.1",
    "libgcc_s.so.1",
];

#[test]
fn the_default_binary_links_no_library_outside_glibc() {
    if cfg!(feature = "openblas") {
        eprintln!("SKIPPED: built with --features openblas, which links OpenBLAS by design");
        return;
    }
    let bin = env!("CARGO_BIN_EXE_peerless");
    let out = match Command::new("ldd").arg(bin).output() {
        Ok(o) => o,
        Err(e) => {
            // ldd ships with glibc (libc-bin); without it there is nothing to check with.
            eprintln!("SKIPPED: ldd not runnable: {e}");
            return;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ldd {bin} failed: {}", String::from_utf8_lossy(&out.stderr));
    let libs: Vec<&str> = text.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(libs.contains(&"libc.so.6"), "ldd output not understood: {text}");
    let foreign: Vec<&str> = libs
        .iter()
        .copied()
        .filter(|lib| {
            let name = lib.rsplit('/').next().unwrap_or(lib);
            !ALLOWED.contains(&name)
        })
        .collect();
    assert!(foreign.is_empty(), "the default build links libraries outside glibc: {foreign:?}\n{text}");
}
