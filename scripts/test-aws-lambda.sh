#!/usr/bin/env bash
# The AWS Lambda backend's tests (feature `aws-lambda`): the AWS SDK against the local Invoke API
# and against cargo-lambda's emulator running the peerless binary as a Lambda function.
#
# Installs cargo-lambda (PyPI) when missing, then runs the tests with it required. The feature
# build goes to its own target directory ($AWS_TARGET_DIR, default /tmp/aws-target), never to
# ./target: tests elsewhere run target/debug/peerless, which must stay a default-feature build.
# Extra arguments go to the test binary, e.g. `scripts/test-aws-lambda.sh --nocapture`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo lambda --version >/dev/null 2>&1; then
  echo "--- installing cargo-lambda"
  python3 -m pip install --quiet cargo-lambda
  # pip may put its scripts where this shell does not look yet.
  hash -r
  if ! cargo lambda --version >/dev/null 2>&1; then
    PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$HOME/.local/bin:$PATH"
    export PATH
  fi
fi
cargo lambda --version

export CARGO_TARGET_DIR="${AWS_TARGET_DIR:-/tmp/aws-target}"
export PEERLESS_REQUIRE_CARGO_LAMBDA=1
echo "--- aws-lambda tests (target dir $CARGO_TARGET_DIR)"
cargo test --locked -p peerless-runtime --features aws-lambda --lib function::aws
cargo test --locked -p peerless --features aws-lambda --test it aws_lambda -- --test-threads 1 "$@"
