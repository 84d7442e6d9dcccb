#!/usr/bin/env bash
# Regenerate ci/test-constraints.txt: the exact versions the test suite passes with. .ci/run and the README's
# test command install the test extra under them, so a new release of a test tool or a library cannot break
# the suite unasked. The lock is the frozen result of the README's install in a fresh virtualenv, under the
# current pins except those named here:
#   ci/lock.sh                       # reproduce the current pins (a check that they still install)
#   ci/lock.sh pytest==9.2.0         # move one package deliberately, then run the suite
set -euo pipefail
cd "$(dirname "$0")/.."
out=ci/test-constraints.txt
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
grep -v '^#' "$out" > "$work/pins.txt"
for pin in "$@"; do
  grep -v -i "^${pin%%[=<>!~]*}==" "$work/pins.txt" > "$work/next.txt" || true
  echo "$pin" >> "$work/next.txt"
  mv "$work/next.txt" "$work/pins.txt"
done
python -m venv "$work/venv"
"$work/venv/bin/pip" install -q torch==2.13.0
"$work/venv/bin/pip" install -q -e ".[test]" -c "$work/pins.txt"
# .ci/run's TPU-on-JAX-CPU conformance run installs these too.
"$work/venv/bin/pip" install -q jax jaxlib -c "$work/pins.txt"
"$work/venv/bin/pip" install -q --no-deps torchax -c "$work/pins.txt"
{
  sed -n '1,/^[^#]/{/^#/p}' "$out"
  "$work/venv/bin/pip" freeze --exclude-editable | sed 's/+cpu$//' | grep -v '^paged'
} > "$work/lock.txt"
mv "$work/lock.txt" "$out"
