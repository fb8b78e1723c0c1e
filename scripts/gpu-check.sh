#!/usr/bin/env bash
# The GPU check, prepared on a CPU machine (docs/benchmarks.md, "GPU"):
#
#   scripts/gpu-check.sh pack [OUT]     # CUDA release binaries + fixtures + scripts → OUT
#                                       # (default target/gpu-check), ≤ 64 MiB
#   OUT/run.sh RESULTS_DIR              # on the GPU machine: no toolchain, no network, < 8 min
#
# `pack` installs the CUDA toolchain from PyPI (scripts/cuda-toolchain.sh), builds the parity
# harness and the benchmarks of the engine with `--features cuda` in the gpu-check profile
# (release, no debug info), strips them and packs them into one bin.tar.xz, copies the fixtures named by GPU_CHECK_FIXTURES
# (default: one directory of each kind) and the wheels diffusers needs beside an installed torch,
# writes MANIFEST.json (commit, compute capability, every file's size and sha256) and fails when
# the folder exceeds the 64 MiB a device run can carry.
# Environment: CUDA_COMPUTE_CAP (default 90), DEFECTFORGE_FIXTURES (default ../shared/fixtures),
# GPU_CHECK_FIXTURES (comma-separated directory names), GPU_CHECK_PROFILE (default gpu-check),
# GPU_CHECK_WHEELS=0 (no wheels: the torch step then needs diffusers installed there).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
LIMIT_MIB=64
# diffusers and what it imports that a PyTorch install does not bring (torch brings filelock,
# fsspec, typing-extensions, jinja2, sympy, networkx; numpy is assumed there). Pure-Python wheels
# except safetensors (abi3). diffusers 0.42 needs Python >= 3.11 on the GPU machine. Tested in a torch-only environment
# (docs/benchmarks.md, "GPU"): Pillow and PyYAML, binary and never used by the check, are
# replaced by import-only stand-ins (scripts/gpu/stubs) when missing there.
WHEELS=(
  "diffusers==0.42.1" "huggingface-hub==2.5.0" "httpx2==2.17.0" "httpcore2==2.17.0" "h11==0.16.0"
  "anyio==4.16.0" "idna==3.21" "certifi==2026.10.19.post1" "requests==2.34.2" "urllib3==2.8.0"
  "charset-normalizer==3.5.3" "tqdm==4.70.1" "packaging==26.4" "truststore==0.10.5"
  "click==8.5.1" "lazy-importer==0.1.0"
)
ABI3_WHEELS=("safetensors==0.8.0")

pack() {
  local out="${1:-$root/target/gpu-check}"
  local profile="${GPU_CHECK_PROFILE:-gpu-check}"
  local fixtures="${DEFECTFORGE_FIXTURES:-$root/../shared/fixtures}"
  local pick="${GPU_CHECK_FIXTURES:-anomalydiffusion-tiny,tiny-ldm,tiny-sd}"
  [ -d "$fixtures" ] || { echo "gpu-check: no fixtures at $fixtures (set DEFECTFORGE_FIXTURES)" >&2; return 1; }
  "$root/scripts/cuda-toolchain.sh" install
  eval "$("$root/scripts/cuda-toolchain.sh" env)"
  local cap="${CUDA_COMPUTE_CAP}"
  echo "gpu-check: building the CUDA checks (profile $profile, compute capability $cap)..." >&2
  local msgs
  msgs=$(mktemp)
  # the CI's CUDA build command (same targets, same feature unification), in $profile
  (cd "$root" && cargo build --profile "$profile" --workspace --bins --benches --test parity \
    --features defectforge-engine/cuda --message-format=json-render-diagnostics) >"$msgs"
  rm -rf "$out"
  mkdir -p "$out/bin" "$out/fixtures"
  python3 - "$msgs" "$out/bin" <<'PY'
import json, shutil, sys, os
msgs, dest = sys.argv[1], sys.argv[2]
want = {"parity", "unet_forward", "ldm_forward", "ad_sample", "train_step"}
found = {}
for line in open(msgs):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        name = m["target"]["name"]
        if name in want:
            found[name] = m["executable"]
missing = want - set(found)
if missing:
    sys.exit(f"gpu-check: cargo built no executable for {sorted(missing)}")
for name, exe in found.items():
    shutil.copy2(exe, os.path.join(dest, name))
PY
  rm -f "$msgs"
  strip "$out"/bin/* 2>/dev/null || true
  # one xz stream over all of them: they share candle and its PTX kernels (measured: five
  # stripped binaries, 267 MiB, pack into 10 MiB with a 192 MiB dictionary; ~2.5 min)
  echo "gpu-check: compressing the binaries..." >&2
  (cd "$out" && tar cf - bin | xz -9e -T1 --lzma2=dict=192MiB >bin.tar.xz && rm -rf bin)
  cp "$fixtures/README.md" "$out/fixtures/" 2>/dev/null || true
  local d
  IFS=, read -ra dirs <<<"$pick"
  for d in "${dirs[@]}"; do
    [ -d "$fixtures/$d" ] || { echo "gpu-check: no fixture directory $fixtures/$d" >&2; return 1; }
    cp -r "$fixtures/$d" "$out/fixtures/"
  done
  cp "$root/scripts/gpu/run.sh" "$root/scripts/gpu/torch_gpu.py" "$out/"
  chmod +x "$out/run.sh"
  if [ "${GPU_CHECK_WHEELS:-1}" != 0 ]; then
    mkdir -p "$out/wheels"
    local dl=(python3 -m pip download --quiet --no-deps --only-binary=:all: --disable-pip-version-check -d "$out/wheels")
    if ! "${dl[@]}" --platform any --implementation py --python-version 3.11 "${WHEELS[@]}" ||
      ! "${dl[@]}" --platform manylinux2014_x86_64 --implementation cp --abi abi3 --python-version 3.10 "${ABI3_WHEELS[@]}"; then
      echo "gpu-check: could not download the diffusers wheels (${WHEELS[*]} ${ABI3_WHEELS[*]}); set GPU_CHECK_WHEELS=0 to pack without them" >&2
      return 1
    fi
  fi
  cp -r "$root/scripts/gpu/stubs" "$out/"
  # the cuRAND stand-in (scripts/cuda-toolchain.sh), used by run.sh only where no real one is
  mkdir -p "$out/lib-fallback"
  cp "${DEFECTFORGE_CUDA_TOOLCHAIN:-$HOME/.cache/defectforge/cuda}/standin/libcurand.so.10" "$out/lib-fallback/"
  python3 - "$out" "$root" "$cap" "$profile" "${WHEELS[*]} ${ABI3_WHEELS[*]}" <<'PY'
import hashlib, json, os, subprocess, sys, datetime
out, root, cap, profile, wheels = sys.argv[1:6]
def commit():
    try:
        c = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
        return c + ("+uncommitted" if dirty else "")
    except OSError:
        return None
files = []
for d, _, names in os.walk(out):
    for n in sorted(names):
        p = os.path.join(d, n)
        files.append({"path": os.path.relpath(p, out), "bytes": os.path.getsize(p),
                      "sha256": hashlib.sha256(open(p, "rb").read()).hexdigest()})
toolchain = open(os.path.expanduser(os.environ.get("DEFECTFORGE_CUDA_TOOLCHAIN", "~/.cache/defectforge/cuda")) + "/installed").read().splitlines()
doc = {"commit": commit(), "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
       "cuda_compute_cap": cap, "profile": profile, "cuda_wheels": toolchain,
       "diffusers_wheels": wheels.split(), "files": sorted(files, key=lambda f: f["path"])}
json.dump(doc, open(os.path.join(out, "MANIFEST.json"), "w"), indent=2)
PY
  local bytes
  bytes=$(du -sb "$out" | cut -f1)
  local mib=$((bytes / 1024 / 1024))
  if [ "$mib" -gt "$LIMIT_MIB" ]; then
    echo "gpu-check: $out is $mib MiB, over the $LIMIT_MIB MiB a device run carries; the largest files:" >&2
    find "$out" -type f -printf '%s %p\n' | sort -rn | head -8 >&2
    echo "pick fewer fixtures (GPU_CHECK_FIXTURES) or pack without wheels (GPU_CHECK_WHEELS=0)" >&2
    return 1
  fi
  echo "gpu-check: packed $out ($mib MiB). On the GPU machine: $(basename "$out")/run.sh RESULTS_DIR" >&2
}

case "${1:-}" in
  pack) pack "${2:-}" ;;
  *)
    echo "usage: $0 pack [OUT]   (then OUT/run.sh RESULTS_DIR on the GPU machine)" >&2
    exit 2
    ;;
esac
