#!/usr/bin/env bash
# Put what the device machine lacks into .device/ (ignored by git), to carry with `run`:
# the pinned transformers and peft wheels (../shared/wheels-h200) and pytest's wheels, all
# pure Python. The device machine has no network: run this here, then carry [".device"].
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .device
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
cp ../shared/wheels-h200/*.whl .device/
PIP=${PIP:-.venv/bin/pip}
"$PIP" download -q --no-deps -d .device pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 \
  packaging==26.4 pygments==2.21.0 pytest-timeout==2.4.0
ls -1 .device
