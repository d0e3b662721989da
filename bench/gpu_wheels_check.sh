#!/usr/bin/env bash
# Before a device call: does the wheel set of bench/gpu_wheels.sh (in .whl/) build the gateway
# on the device's Python (3.12), beside the packages the device image holds? A clean 3.12 venv
# gets the wheels (no dependencies resolved, as on the device) and, from the registry, the
# device's own packages the gateway imports; then app.main builds its app.
#   PYTHON312=~/.pyenv/versions/3.12.1/bin/python bash bench/gpu_wheels_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/v312"
"${PYTHON312:-python3.12}" -m venv "$venv"
"$venv/bin/pip" install -q --no-index --no-deps .whl/*.whl
# On the device already (../.library/device/KINDS.md): what the gateway imports of them.
"$venv/bin/pip" install -q anyio h11 httpx httpcore typer click idna certifi \
    prometheus-client pyyaml typing-extensions packaging pillow numpy 2>/dev/null
"$venv/bin/python" -c "
import sys; sys.path.insert(0, '.')
from app.main import create_app
print('gateway built on Python', sys.version.split()[0], 'with', len(create_app().routes), 'routes')
"
rm -rf "$(dirname "$venv")"
