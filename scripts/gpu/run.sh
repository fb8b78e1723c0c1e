#!/usr/bin/env bash
# The GPU check, on the GPU machine: one command, no toolchain, no network.
#
#   ./run.sh RESULTS_DIR        (from the folder `scripts/gpu-check.sh pack` made)
#
# Runs, in order of value, each step in its own process under its own time limit:
#   parity on CUDA in f32 and bf16 (the fixtures' harness), the full-size benchmarks with random
#   weights (UNet forward, AnomalyDiffusion sampling, learned masks, training steps) and
#   PyTorch side by side (torch_gpu.py), sampling the GPU's memory while each runs.
# Writes RESULTS_DIR/log.txt (everything every step printed) and RESULTS_DIR/results.json (the
# card, the driver, each step's status, seconds, peak GPU memory and its measurements).
# Exit status: 0 every step passed, 1 some step failed or timed out, 3 no usable GPU here
# (results.json says why), 2 usage.
# Environment: GPU_CHECK_BUDGET_S (default 450: steps that would start past it are skipped and
# recorded as such), GPU_CHECK_STEPS (comma-separated step names: run only these).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-}"
if [ -z "$out" ]; then
  echo "usage: $0 RESULTS_DIR" >&2
  exit 2
fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"
log="$out/log.txt"
steps_file="$out/steps.jsonl"
: >"$log"
: >"$steps_file"
budget="${GPU_CHECK_BUDGET_S:-450}"
only="${GPU_CHECK_STEPS:-}"
t_start=$SECONDS

say() { echo "gpu-check: $*" | tee -a "$log" >&2; }

py=""
for c in python3 python; do
  if command -v "$c" >/dev/null 2>&1; then py="$c"; break; fi
done

# results.json from what is known so far (python if there is one, else a minimal hand-written
# file): status, reason, the card and every step's record.
finish() {
  local status="$1" reason="$2"
  if [ -n "$py" ]; then
    "$py" - "$out" "$status" "$reason" "$here/MANIFEST.json" <<'PY'
import json, sys, pathlib
out, status, reason, manifest = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
steps = [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines() if l.strip()]
def read(name):
    p = out / name
    return p.read_text().strip() if p.exists() else None
try:
    pack = json.loads(pathlib.Path(manifest).read_text())
except Exception as e:  # a pack without its manifest still reports
    pack = {"error": str(e)}
doc = {
    "status": status,
    "reason": reason,
    "gpu": read("gpu.txt"),
    "driver": read("driver.txt"),
    "curand": read("curand.txt") or "real",
    "pack": {k: pack.get(k) for k in ("commit", "built_at", "cuda_compute_cap", "cuda_wheels")},
    "steps": steps,
}
(out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
PY
  else
    printf '{"status": "%s", "reason": "%s", "steps_file": "steps.jsonl"}\n' "$status" "$reason" >"$out/results.json"
  fi
}

no_gpu() {
  say "$1"
  finish "no-gpu" "$1"
  exit 3
}

# --- the card ------------------------------------------------------------------------------
if ! command -v nvidia-smi >/dev/null 2>&1; then
  no_gpu "no nvidia-smi on PATH: this machine has no NVIDIA driver; run this on a GPU machine (the binaries in bin/ are CUDA builds and need libcuda.so.1 from the driver)"
fi
if ! nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv,noheader >"$out/gpu.txt" 2>>"$log" || [ ! -s "$out/gpu.txt" ]; then
  no_gpu "nvidia-smi found no GPU (see log.txt): is the driver loaded and a device visible (CUDA_VISIBLE_DEVICES)?"
fi
nvidia-smi --query-gpu=driver_version --format=csv,noheader >"$out/driver.txt" 2>/dev/null
say "GPU: $(head -1 "$out/gpu.txt"); driver $(head -1 "$out/driver.txt")"
cap=$(head -1 "$out/gpu.txt" | awk -F', ' '{print $3}' | tr -d '.')
want_cap=$(sed -n 's/.*"cuda_compute_cap": *"\{0,1\}\([0-9]*\).*/\1/p' "$here/MANIFEST.json" 2>/dev/null | head -1)
if [ -n "$want_cap" ] && [ -n "$cap" ] && [ "$cap" -lt "$want_cap" ]; then
  no_gpu "this GPU has compute capability $cap; the pack was built for $want_cap (CUDA_COMPUTE_CAP at pack time): rebuild with CUDA_COMPUTE_CAP=$cap"
fi

# --- the libraries: the driver's libcuda, cuBLAS/cuRAND/NVRTC/cuDNN from PyTorch's wheels -----
libdirs=()
if [ -n "$py" ]; then
  while IFS= read -r d; do [ -n "$d" ] && libdirs+=("$d"); done < <("$py" - <<'PY' 2>/dev/null
import glob, os, site, sys
roots = set(site.getsitepackages() + [site.getusersitepackages()])
try:
    import torch
    roots.add(os.path.dirname(os.path.dirname(torch.__file__)))
except Exception:
    pass
seen = []
for r in sorted(roots):
    for d in sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib")) + glob.glob(os.path.join(r, "torch", "lib"))):
        if d not in seen:
            seen.append(d)
print("\n".join(seen))
PY
  )
fi
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64 /usr/lib/x86_64-linux-gnu; do
  [ -d "$d" ] && libdirs+=("$d")
done
LD_LIBRARY_PATH="$(IFS=:; echo "${libdirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
# the binaries travel as one xz-compressed tar (they share candle and its kernels: 267 MiB
# of stripped executables pack into about 10 MiB); unpacked beside the pack, or into the
# results folder where the pack is read-only
bindir="$here/bin"
if [ ! -d "$bindir" ] && [ -f "$here/bin.tar.xz" ]; then
  dest="$here"
  [ -w "$dest" ] || dest="$out"
  say "unpacking bin.tar.xz into $dest"
  if command -v xz >/dev/null 2>&1; then
    tar -xJf "$here/bin.tar.xz" -C "$dest" 2>>"$log"
  elif [ -n "$py" ]; then
    "$py" -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' "$here/bin.tar.xz" "$dest" 2>>"$log"
  fi
  bindir="$dest/bin"
fi
probe="$bindir/parity"
if [ ! -x "$probe" ]; then
  finish "broken-pack" "bin/parity is missing: rebuild the pack with scripts/gpu-check.sh pack"
  say "bin/parity is missing from the pack: rebuild it with scripts/gpu-check.sh pack"
  exit 1
fi
missing=$(ldd "$probe" 2>/dev/null | awk '/not found/ {print $1}' | tr '\n' ' ')
# torch's CUDA 13 wheels bring no cuRAND: the pack's stand-in (generators can be created, any
# generate call fails loudly; the engine draws its noise on the CPU) fills in, said so
if [[ " $missing " == *" libcurand.so.10 "* ]] && [ -f "$here/lib-fallback/libcurand.so.10" ]; then
  LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$here/lib-fallback"
  say "no libcurand.so.10 here: using the pack's stand-in (lib-fallback/; the engine never generates random numbers on the GPU)"
  echo "stand-in" >"$out/curand.txt"
  missing=$(ldd "$probe" 2>/dev/null | awk '/not found/ {print $1}' | tr '\n' ' ')
fi
if [ -n "$missing" ]; then
  hint="libcuda.so.1 comes with the NVIDIA driver; libcudart/libcublas/libcublasLt/libnvrtc/libcurand (CUDA 13) and libcudnn.so.9 come with PyTorch's CUDA wheels (pip install nvidia-cuda-runtime nvidia-cublas nvidia-cuda-nvrtc nvidia-curand nvidia-cudnn-cu13) or a CUDA 13 toolkit; searched: $LD_LIBRARY_PATH"
  no_gpu "the CUDA binaries cannot load: missing $missing— $hint"
fi

# --- the steps -------------------------------------------------------------------------------
failed=0
# step NAME LIMIT_S ENV... -- CMD...: runs CMD with ENV under LIMIT_S, samples GPU memory every
# 100 ms, appends its record (status, rc, seconds, peak MiB over the idle baseline, the
# BENCH_JSON measurements it printed) to steps.jsonl.
step() {
  local name="$1" limit="$2"
  shift 2
  local envs=()
  while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  if [ -n "$only" ] && [[ ",$only," != *",$name,"* ]]; then return 0; fi
  local elapsed=$((SECONDS - t_start))
  if [ $((elapsed + limit)) -gt "$budget" ] && [ "$elapsed" -gt 0 ]; then
    limit=$((budget - elapsed))
    if [ "$limit" -lt 20 ]; then
      say "step $name skipped: the budget of $budget s is spent (GPU_CHECK_BUDGET_S)"
      record "$name" skipped 0 0 0 ""
      return 0
    fi
  fi
  say "step $name (limit $limit s): ${envs[*]} $*"
  local base
  base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1)
  local mem="$out/mem-$name.txt" slog="$out/step-$name.txt"
  (while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1; sleep 0.1; done) >"$mem" &
  local sampler=$!
  local t0=$EPOCHREALTIME
  (cd "$here" && env "${envs[@]}" timeout --kill-after=10 "$limit" "$@") >"$slog" 2>&1
  local rc=$?
  local secs
  secs=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }')
  kill "$sampler" 2>/dev/null
  wait "$sampler" 2>/dev/null
  cat "$slog" >>"$log"
  local peak
  peak=$(sort -n "$mem" | tail -1)
  local status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=timeout; elif [ "$rc" -ne 0 ]; then status=failed; fi
  [ "$status" = ok ] || failed=1
  say "step $name: $status (rc $rc) in $secs s, peak GPU memory ${peak:-?} MiB (idle ${base:-?} MiB)"
  record "$name" "$status" "$rc" "$secs" "$((${peak:-0} - ${base:-0}))" "$slog"
}

record() {
  local name="$1" status="$2" rc="$3" secs="$4" peak="$5" slog="$6"
  if [ -n "$py" ]; then
    "$py" - "$name" "$status" "$rc" "$secs" "$peak" "$slog" >>"$steps_file" <<'PY'
import json, sys
name, status, rc, secs, peak, slog = sys.argv[1:7]
ms, tail = [], []
if slog:
    lines = open(slog, errors="replace").read().splitlines()
    for l in lines:
        if l.startswith("BENCH_JSON "):
            try:
                ms.append(json.loads(l[len("BENCH_JSON "):]))
            except ValueError:
                pass
    tail = [l for l in lines if not l.startswith("BENCH_JSON ")][-15:]
print(json.dumps({"step": name, "status": status, "rc": int(rc), "seconds": float(secs),
                  "peak_gpu_mib_over_idle": int(peak), "measurements": ms, "tail": tail}))
PY
  else
    printf '{"step": "%s", "status": "%s", "rc": %s, "seconds": %s, "peak_gpu_mib_over_idle": %s}\n' \
      "$name" "$status" "$rc" "$secs" "$peak" >>"$steps_file"
  fi
}

fx="DEFECTFORGE_FIXTURES=$here/fixtures"
step parity-f32 100 "$fx" DEFECTFORGE_PARITY_DEVICE=cuda -- "$bindir/parity" parity_all_fixtures --test-threads 1 --nocapture
step parity-bf16 100 "$fx" DEFECTFORGE_PARITY_DEVICE=cuda DEFECTFORGE_PARITY_DTYPE=bf16 -- "$bindir/parity" parity_half_precision --test-threads 1 --nocapture
step ad-sample-bf16 150 BATCH=8 STEPS=50,200 DTYPE=bf16 -- "$bindir/ad_sample" --bench
step unet-sd15-bf16 60 BATCHES=1,8 ITERS=5 PROFILE=0 DTYPE=bf16 -- "$bindir/unet_forward" --bench
step unet-sd15-f32 60 BATCHES=1,8 ITERS=5 PROFILE=0 DTYPE=f32 -- "$bindir/unet_forward" --bench
step unet-ldm256-bf16 60 BATCHES=1,8 ITERS=5 PARTS=unet DTYPE=bf16 -- "$bindir/ldm_forward" --bench
step unet-ldm256-f32 60 BATCHES=1,8 ITERS=5 PARTS=unet DTYPE=f32 -- "$bindir/ldm_forward" --bench
step masks-bf16 60 MODE=masks BATCH=8 STEPS=10 DTYPE=bf16 -- "$bindir/ad_sample" --bench
step train-f32 120 BATCH=4,8 STEPS=3 DTYPE=f32 -- "$bindir/train_step" --bench
step train-masks-f32 60 MODE=mask BATCH=4,8 STEPS=3 DTYPE=f32 -- "$bindir/train_step" --bench
if [ -n "$py" ] && "$py" -c "import torch; assert torch.cuda.is_available()" 2>>"$log"; then
  step torch 150 -- "$py" torch_gpu.py --wheels "$here/wheels"
elif [ -z "$only" ] || [[ ",$only," == *",torch,"* ]]; then
  say "step torch skipped: no python with a CUDA-enabled torch here"
  record torch skipped 0 0 0 ""
fi

if [ "$failed" -ne 0 ]; then
  finish "failed" "some steps failed or timed out: see steps[].tail and log.txt"
  say "done with failures in $((SECONDS - t_start)) s: $out/results.json"
  exit 1
fi
finish "ok" ""
say "done in $((SECONDS - t_start)) s: $out/results.json"
