#!/usr/bin/env bash
# The comparison venv for bench/bergson_compare.py: bergson 2.5.1, the only open TrackStar, kept
# out of the project's requirements. A plain `pip install bergson` swaps torch for a CUDA 2.14 build
# plus torchvision/torchaudio, so torch and transformers are pinned to the project's versions first
# and bergson goes in with --no-deps, with the few packages it needs listed here.
set -euo pipefail
VENV="${BERGSON_VENV:-$(cd "$(dirname "$0")/.." && pwd)/.bergson-venv}"
if [ -e "$VENV/.installed" ]; then echo "bergson venv ready: $VENV"; exit 0; fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --progress-bar off torch==2.13.0 transformers==5.23.0
"$VENV/bin/pip" install --quiet --progress-bar off accelerate datasets 'jaxtyping>=0.3.3' ml_dtypes natsort \
  'peft>=0.17.0' petname simple-parsing torchopt scipy
"$VENV/bin/pip" install --quiet --progress-bar off --no-deps bergson==2.5.1
"$VENV/bin/python" -c "import bergson, torch; print('bergson', bergson.__version__ if hasattr(bergson, '__version__') else '2.5.1', 'torch', torch.__version__)"
touch "$VENV/.installed"
