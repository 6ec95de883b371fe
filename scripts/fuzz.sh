#!/usr/bin/env bash
# Fuzz every decoder (the targets in fuzz/fuzz_targets/) for SECONDS each.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     # default: 60 s, every target
#   scripts/fuzz.sh 10                        # what CI runs
#   scripts/fuzz.sh 3600 wire checkpoint      # a longer run of two targets
#
# Installs cargo-fuzz if it is missing (a debug build: it only drives cargo and libFuzzer).
# The toolchain is stable, so RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its -Z flags, and the
# targets are built without a sanitizer (`--sanitizer none`: address sanitizer needs nightly);
# Rust's own checks (bounds, overflow, debug assertions) and the targets' assertions remain.
# The build goes to fuzz/target (never ./target); the corpus grows in fuzz/corpus/<target>/,
# seeded by each target from the code (and scenarios/ for the scenario target); a crash stops
# the script with its input in fuzz/artifacts/<target>/. Extra libFuzzer flags:
# FUZZ_FLAGS="-jobs=2 -workers=2" scripts/fuzz.sh 600 config
#
# fuzz/seeds/<target>/ is committed: every run starts from it too, so CI's short runs re-check
# what long runs found (and the regression inputs of fixed failures). After a long run,
# FUZZ_KEEP=1 merges the inputs that add coverage into it (libFuzzer -merge=1).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
shift || true
CARGO_FUZZ_VERSION=0.13.2

if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  echo "--- installing cargo-fuzz $CARGO_FUZZ_VERSION"
  nice -n 10 cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --debug
fi

export RUSTC_BOOTSTRAP=1
fuzz=(cargo fuzz run --sanitizer none)
if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi

echo "--- building ${#targets[@]} fuzz targets"
start=$(date +%s)
nice -n 10 cargo fuzz build --sanitizer none
echo "built in $(($(date +%s) - start)) s"

for t in "${targets[@]}"; do
  corpus="fuzz/corpus/$t"
  mkdir -p "$corpus"
  if [ "$t" = scenario ]; then
    find scenarios -name '*.toml' -exec cp {} "$corpus/" \;
  fi
  echo "--- fuzz $t for ${seconds} s"
  log="$(mktemp)"
  # -timeout: one input taking 10 s is a hang; -rss_limit_mb: 2 GB is an unbounded allocation.
  status=0
  # shellcheck disable=SC2086
  mkdir -p "fuzz/seeds/$t"
  PEERLESS_FUZZ_SEED_DIR="$corpus" "${fuzz[@]}" "$t" "$corpus" "fuzz/seeds/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 ${FUZZ_FLAGS:-} \
    >"$log" 2>&1 || status=$?
  grep -E '^#[0-9]+ +DONE|^stat::(number_of_executed_units|peak_rss_mb)' "$log" || true
  if [ "$status" != 0 ]; then
    tail -n 60 "$log" >&2
    echo "fuzz target $t failed; reproduce: RUSTC_BOOTSTRAP=1 ${fuzz[*]} $t fuzz/artifacts/$t/<file>" >&2
    rm -f "$log"
    exit 1
  fi
  rm -f "$log"
  if [ "${FUZZ_KEEP:-0}" = 1 ]; then
    before=$(find "fuzz/seeds/$t" -type f | wc -l)
    "${fuzz[@]}" "$t" "fuzz/seeds/$t" "$corpus" -- -merge=1 >/dev/null 2>&1
    echo "kept $(($(find "fuzz/seeds/$t" -type f | wc -l) - before)) new inputs in fuzz/seeds/$t"
  fi
done
echo "--- fuzzed ${#targets[@]} targets for ${seconds} s each"
