#!/usr/bin/env bash
# Install mmcv 2.1.0 with ops (no Linux wheel on PyPI), mmdet 3.3.0 (the teacher) and
# mmsegmentation 1.2.2 (Protocol II's segmenter; it imports ftfy) into the venv.
# The wheel is built from source once per torch/python version and CUDA build (cuXYZ when torch
# sees a GPU, cpu otherwise) and cached in ${IOSD_WHEEL_CACHE:-~/.cache/iosd/wheels}; later
# machines and CI runs reuse it. A CPU-only mmcv is never used on a CUDA machine: neither one
# cached under the old key (no CUDA part) nor one already installed without CUDA ops.
# Only the papers' Mask R-CNN teacher (--teacher mmdet) needs this; the text-prompted teachers
# (--teacher sam3, ...) need transformers alone.
set -euo pipefail
PY=${1:-.venv/bin/python}
PIP="$PY -m pip"
SEG="mmsegmentation==1.2.2 ftfy"
# "cuXYZ" where torch has CUDA and sees a GPU (mmcv then compiles its CUDA ops), else "cpu"
CUDA=$($PY -c "import torch; print('cu' + torch.version.cuda.replace('.', '') if torch.version.cuda and torch.cuda.is_available() else 'cpu')")
# an installed mmcv whose ops were compiled without CUDA does not count on a CUDA machine
FITS="import mmcv, mmcv.ops, mmdet; from mmcv.ops import get_compiling_cuda_version as v; assert '$CUDA' == 'cpu' or v() not in ('', 'not available')"
if $PY -c "$FITS" 2>/dev/null; then
  $PY -c "import mmseg, ftfy" 2>/dev/null || $PIP install -q $SEG
  echo "mmcv with ops, mmdet and mmseg installed"; exit 0
fi
TAG=$($PY -c "import sys, torch; print(f'torch{torch.__version__.split(\"+\")[0]}-py{sys.version_info[0]}{sys.version_info[1]}')")-$CUDA
CACHE=${IOSD_WHEEL_CACHE:-$HOME/.cache/iosd/wheels}/$TAG
mkdir -p "$CACHE"
WHEEL=$(ls "$CACHE"/mmcv-2.1.0-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$WHEEL" ]; then
  echo "building mmcv 2.1.0 with ops ($CUDA) from source (about 9 minutes on 2 cores, cached in $CACHE)"
  [ "$CUDA" = cpu ] || export FORCE_CUDA=1  # CUDA ops, even where the build cannot see the GPU
  # mmcv's setup.py imports pkg_resources: build with an old setuptools, then restore.
  $PIP install -q "setuptools<70" wheel ninja
  # -g0: no debug info (Python's CFLAGS carry -g); halves the compile (14.5 vs ~29 CPU-minutes
  # on 2 cores, 8.5 min wall) and the wheel (1.4 MB vs 32 MB).
  CFLAGS="${CFLAGS:-} -g0" MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    $PIP wheel --no-cache-dir --no-build-isolation --no-deps -w "$CACHE.tmp.$$" mmcv==2.1.0
  mv "$CACHE.tmp.$$"/mmcv-2.1.0-*.whl "$CACHE"/ && rm -rf "$CACHE.tmp.$$"
  $PIP install -q "setuptools>=77"
  WHEEL=$(ls "$CACHE"/mmcv-2.1.0-*.whl | head -n1)
fi
$PIP install -q --force-reinstall --no-deps "$WHEEL"  # replaces an mmcv built for another CUDA
$PIP install -q "$WHEEL" mmengine==0.10.7 mmdet==3.3.0 $SEG
$PY -c "import mmcv.ops, mmdet, mmseg; print('mmcv', mmcv.__version__, 'mmdet', mmdet.__version__, 'mmseg', mmseg.__version__)"
