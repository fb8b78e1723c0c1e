#!/usr/bin/env bash
# The CUDA build toolchain from the package registry (no CUDA install, no GPU, no driver needed):
#
#   scripts/cuda-toolchain.sh install [DIR]   # once: pinned PyPI wheels into DIR (~1.7 GB, ~1 min)
#   eval "$(scripts/cuda-toolchain.sh env [DIR])"
#   cargo build -p defectforge-worker --features cuda
#
# DIR defaults to $DEFECTFORGE_CUDA_TOOLCHAIN, else ~/.cache/defectforge/cuda (kept between CI runs
# on one machine). The wheels are pinned to CUDA 13.0, which driver 580 runs; left unpinned, pip
# brings nvidia-nvvm 13.5, whose PTX (.version 9.5) the 13.0 ptxas rejects.
#
# What `install` lays out under DIR/root (the CUDA_ROOT the build sees):
#   bin/      nvcc, ptxas, … (nvidia-cuda-nvcc), include/ (CUDA, cuBLAS, cuRAND, NVRTC, cuDNN
#   headers), nvvm/, lib64/ the unversioned link names of cuBLAS/cuBLASLt/cuRAND/NVRTC/cuDNN
#   pointing at the wheels' real libraries, and lib64/stubs/libcuda.so.
# The driver library (libcuda.so.1) is part of the GPU driver and comes in no wheel; like the
# toolkit's own stubs/libcuda.so, a link-only stub (every entry point cuda.h declares, soname
# libcuda.so.1) lets the linker record the dependency. At run time the driver's real
# libcuda.so.1 is loaded; the stub is never shipped.
set -euo pipefail

CUDA_COMPUTE_CAP_DEFAULT=90 # Hopper (H100/H200)
WHEELS=(
  "nvidia-cuda-nvcc==13.0.88"
  "nvidia-nvvm==13.0.88"
  "nvidia-cuda-crt==13.0.88"
  "nvidia-cuda-cccl==13.0.85"
  "nvidia-cuda-runtime==13.0.96"
  "nvidia-cuda-nvrtc==13.0.88"
  "nvidia-cublas==13.0.2.14"
  "nvidia-curand==10.4.0.35"
  "nvidia-cudnn-cu13==9.13.0.50"
)

dir() { echo "${1:-${DEFECTFORGE_CUDA_TOOLCHAIN:-$HOME/.cache/defectforge/cuda}}"; }

site() { "$1/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }

install() {
  local d
  d=$(dir "${1:-}")
  local stamp="$d/installed"
  local want
  want=$(printf '%s\n' "${WHEELS[@]}")
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "cuda toolchain: already in $d" >&2
    return 0
  fi
  mkdir -p "$d"
  rm -rf "$d/venv" "$d/root"
  python3 -m venv "$d/venv"
  "$d/venv/bin/pip" install --quiet --no-deps "${WHEELS[@]}" || {
    echo "cuda toolchain: pip could not install the pinned CUDA wheels (${WHEELS[*]}); is PyPI reachable?" >&2
    return 1
  }
  local nv
  nv="$(site "$d")/nvidia"
  local r="$d/root"
  mkdir -p "$r/include" "$r/lib64/stubs"
  ln -s "$nv/cu13/bin" "$r/bin"
  ln -s "$nv/cu13/nvvm" "$r/nvvm"
  # nvcc finds its headers next to itself (bin/../include): one include dir holding them all
  for h in "$nv/cu13/include"/* "$nv/cudnn/include"/*; do ln -sf "$h" "$r/include/"; done
  # every library under its own and its unversioned name in one folder: the linker follows
  # their $ORIGIN run paths (libcublas.so.13 needs libcublasLt.so.13) from there
  local lib base
  for lib in "$nv/cu13/lib"/lib*.so.* "$nv/cudnn/lib"/lib*.so.*; do
    base=$(basename "$lib")
    ln -sf "$lib" "$r/lib64/$base"
    ln -sf "$lib" "$r/lib64/${base%%.so.*}.so"
  done
  # the link-only driver stub: every cu* entry point of cuda.h, also the per-thread-stream names
  local names
  names=$( (gcc -E -I"$r/include" "$r/include/cuda.h"
    gcc -E -DCUDA_API_PER_THREAD_DEFAULT_STREAM -I"$r/include" "$r/include/cuda.h") |
    grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d ' (' | sort -u)
  # shellcheck disable=SC2001
  sed 's/.*/void &(void) {}/' <<<"$names" >"$d/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$r/lib64/stubs/libcuda.so" "$d/libcuda_stub.c"
  "$r/bin/nvcc" --version | tail -2 >&2
  echo "$want" >"$stamp"
  echo "cuda toolchain: installed in $d ($(du -sh "$d" | cut -f1))" >&2
}

env_() {
  local d
  d=$(dir "${1:-}")
  if [ ! -f "$d/installed" ]; then
    echo "cuda toolchain: not installed in $d; run scripts/cuda-toolchain.sh install first" >&2
    return 1
  fi
  local r="$d/root"
  echo "export CUDA_ROOT='$r'"
  echo "export CUDA_PATH='$r'"
  echo "export CUDNN_LIB='$r'"
  echo "export PATH='$r/bin':\"\$PATH\""
  echo "export CUDA_COMPUTE_CAP=\"\${CUDA_COMPUTE_CAP:-$CUDA_COMPUTE_CAP_DEFAULT}\""
}

case "${1:-}" in
  install) install "${2:-}" ;;
  env) env_ "${2:-}" ;;
  *)
    echo "usage: $0 install|env [DIR]" >&2
    exit 2
    ;;
esac
