#!/usr/bin/env bash
# A CPU-only libtorch 2.9 (the version tch 0.22, under burn's LibTorch
# backend, binds) built from PyPI's torch wheel, for
# `cargo build --release -p covnoise-lab --features tch` on a machine that can reach PyPI but
# not download.pytorch.org (whose CPU libtorch zip would do without steps 3-4).
#
#   bench/libtorch_cpu.sh DIR      then:
#   LIBTORCH=DIR/torch cargo build --release -p covnoise-lab --features tch
#   LD_LIBRARY_PATH=DIR/torch/lib target/release/covnoise bench --device libtorch ...
#
# Needs python3 with pip, unzip and patchelf (Debian: python3-pip unzip patchelf);
# downloads about 900 MB.
set -euo pipefail
DIR=${1:?usage: bench/libtorch_cpu.sh DIR}
PIP=${PIP:-pip}
mkdir -p "$DIR/wheels"
# 1. The wheel (its CUDA dependencies are not needed for the CPU).
"$PIP" download torch==2.9.0 nvidia-cuda-runtime-cu12 nvidia-cuda-cupti-cu12 \
  --no-deps --python-version 3.11 --only-binary=:all: -d "$DIR/wheels"
# 2. Its headers and libraries.
unzip -q -o "$DIR"/wheels/torch-2.9.0-*.whl 'torch/lib/*' 'torch/include/*' -d "$DIR"
lib="$DIR/torch/lib"
# 3. CPU only: drop the CUDA libraries and libtorch.so's link to them.
rm -f "$lib"/libtorch_cuda*.so "$lib"/libc10_cuda.so "$lib"/libcaffe2_nvrtc.so \
  "$lib"/libtorch_nvshmem.so "$lib"/libtorch_python.so
patchelf --remove-needed libtorch_cuda.so "$lib/libtorch.so"
# 4. libtorch_cpu.so still links the CUDA runtime and CUPTI (for its
#    profiler); PyPI's small nvidia wheels provide them.
for w in "$DIR"/wheels/nvidia_cuda_runtime_cu12-*.whl "$DIR"/wheels/nvidia_cuda_cupti_cu12-*.whl; do
  unzip -q -o "$w" 'nvidia/*/lib/*' -d "$DIR/nvidia-wheels"
done
cp "$DIR"/nvidia-wheels/nvidia/cuda_runtime/lib/libcudart.so.12 \
   "$DIR"/nvidia-wheels/nvidia/cuda_cupti/lib/libcupti.so.12 "$lib/"
echo "libtorch 2.9 (CPU) in $DIR/torch: LIBTORCH=$DIR/torch, LD_LIBRARY_PATH=$lib"
