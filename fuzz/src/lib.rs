//! What the fuzz targets share: seed inputs written from the code itself.
//!
//! A target's `init` calls [`seeds`] with inputs built by the crate under test (the default
//! config, every fault kind, encoded messages...). When `PEERLESS_FUZZ_SEED_DIR` is set
//! (scripts/fuzz.sh sets it to the target's corpus directory) they are written there before
//! libFuzzer reads the corpus, so that the seeds follow the formats as they change.

use std::path::PathBuf;

/// Writes each `(name, bytes)` as `seed-<name>` into `$PEERLESS_FUZZ_SEED_DIR`, if it is set.
pub fn seeds(make: impl FnOnce() -> Vec<(String, Vec<u8>)>) {
    let Some(dir) = std::env::var_os("PEERLESS_FUZZ_SEED_DIR").map(PathBuf::from) else { return };
    std::fs::create_dir_all(&dir).expect("seed directory");
    for (name, bytes) in make() {
        std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("seed file");
    }
}
