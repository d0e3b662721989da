#!/usr/bin/env bash
# `make test`: the static checks, the S3 rerun beside them, then the whole suite.
#
# The S3 rerun (the tests that move images, inputs and control maps, with moto's S3 server in
# place of Redis) spends most of its minute starting its own stack. It runs while ruff, mypy,
# lint-imports and mkdocs check the code, which hardly share a core with it, and its output is
# printed once it ends, before the suite starts. Any failure fails `make test`, after the suite
# has run anyway (more to read in one go).
#
# Usage: tests/run.sh S3_TEST_PATH...
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
mkdir -p .run
S3_LOG=.run/s3-tests.log

TESTS_STORAGE=s3 "$BIN/pytest" -p no:cacheprovider "$@" >"$S3_LOG" 2>&1 &
s3=$!
trap 'kill "$s3" 2>/dev/null' EXIT

static=0
"$BIN/ruff" check . \
    && "$BIN/ruff" format --check . \
    && "$BIN/mypy" \
    && "$BIN/lint-imports" \
    && NO_MKDOCS_2_WARNING=1 "$BIN/mkdocs" build --strict --quiet \
    || static=$?

wait "$s3"
s3_status=$?
trap - EXIT
echo "---- the S3 rerun (TESTS_STORAGE=s3 pytest $*) ----"
cat "$S3_LOG"

"$BIN/pytest"
suite=$?

if [ "$static" -ne 0 ]; then echo "static checks failed (status $static)" >&2; fi
if [ "$s3_status" -ne 0 ]; then echo "the S3 rerun failed (status $s3_status)" >&2; fi
if [ "$suite" -ne 0 ]; then echo "the suite failed (status $suite)" >&2; fi
[ "$static" -eq 0 ] && [ "$s3_status" -eq 0 ] && [ "$suite" -eq 0 ]
