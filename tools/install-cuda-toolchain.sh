#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler toolchain from PyPI into .cuda-toolchain/ (git-ignored),
# so that `cargo build --features cuda` can compile cuda/*.cu on a machine without a CUDA install.
# build.rs looks for nvcc at .cuda-toolchain/nvidia/cu13/bin/nvcc when NVCC, CUDA_HOME/CUDA_PATH
# and the PATH have none.
#
# All five pins matter: nvcc alone cannot preprocess (crt headers, cccl), and an nvvm/ptxas from
# another release emits PTX that this nvcc's ptxas rejects.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${CUDA_TOOLCHAIN_DIR:-.cuda-toolchain}"
PY="${PYTHON:-python3}"
NVCC="$DEST/nvidia/cu13/bin/nvcc"
if [ -x "$NVCC" ] && "$NVCC" --version | grep -q "V13.0.88"; then
    echo "cuda toolchain already installed: $NVCC"
    exit 0
fi
mkdir -p "$DEST"
"$PY" -m pip install --quiet --disable-pip-version-check --no-warn-script-location --upgrade --target "$DEST" \
    nvidia-cuda-nvcc==13.0.88 \
    nvidia-nvvm==13.0.88 \
    nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 \
    nvidia-cuda-cccl==13.0.85
# The wheels ship the binaries without their execute bits on some pip versions.
chmod +x "$DEST"/nvidia/cu13/bin/* 2>/dev/null || true
find "$DEST"/nvidia/cu13 -path '*nvvm/bin/*' -type f -exec chmod +x {} + 2>/dev/null || true
"$NVCC" --version | tail -2
echo "nvcc: $NVCC"
