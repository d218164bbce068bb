#!/usr/bin/env bash
# Install robuq and its dependencies on a fresh machine (CPU). torch is pinned first, from the
# local CPU wheel, and everything else is resolved under constraints.txt so nothing replaces it.
# torchvision / torch-fidelity are deliberately not installed (they replace torch or break torchmetrics).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -c constraints.txt -e ".[dev]"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null
  else
    echo "install Debian's dataset-fashion-mnist, or pass --data.init_args.root DIR" >&2
  fi
fi
