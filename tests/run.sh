#!/usr/bin/env bash
# `make test`: the static checks and the S3 rerun beside the whole suite.
#
# The suite keeps about one of this machine's two cores busy (it waits on processes, sockets
# and Redis much of the time), so ruff, mypy, lint-imports and mkdocs, and the S3 rerun (the
# tests that move images, inputs and control maps, with moto's S3 server in place of Redis),
# run beside it instead of before it. Their output is printed when the suite ends. Any failure
# fails `make test`, after everything has run (more to read in one go).
#
# Usage: tests/run.sh S3_TEST_PATH...
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
mkdir -p .run
S3_LOG=.run/s3-tests.log
STATIC_LOG=.run/static-checks.log

TESTS_STORAGE=s3 "$BIN/pytest" -p no:cacheprovider "$@" >"$S3_LOG" 2>&1 &
s3=$!
{
    "$BIN/ruff" check . \
        && "$BIN/ruff" format --check . \
        && "$BIN/mypy" \
        && "$BIN/lint-imports" \
        && NO_MKDOCS_2_WARNING=1 "$BIN/mkdocs" build --strict --quiet
} >"$STATIC_LOG" 2>&1 &
static_checks=$!
trap 'kill "$s3" "$static_checks" 2>/dev/null' EXIT

"$BIN/pytest"
suite=$?

wait "$static_checks"
static=$?
wait "$s3"
s3_status=$?
trap - EXIT
echo "---- the static checks (ruff, mypy, lint-imports, mkdocs) ----"
cat "$STATIC_LOG"
echo "---- the S3 rerun (TESTS_STORAGE=s3 pytest $*) ----"
cat "$S3_LOG"

if [ "$static" -ne 0 ]; then echo "static checks failed (status $static)" >&2; fi
if [ "$s3_status" -ne 0 ]; then echo "the S3 rerun failed (status $s3_status)" >&2; fi
if [ "$suite" -ne 0 ]; then echo "the suite failed (status $suite)" >&2; fi
[ "$static" -eq 0 ] && [ "$s3_status" -eq 0 ] && [ "$suite" -eq 0 ]
