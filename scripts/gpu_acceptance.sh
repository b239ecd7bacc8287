#!/usr/bin/env bash
# The CUDA acceptance run: the one command to run on a GPU machine, from the repository root.
#
#   bash scripts/gpu_acceptance.sh [REPORT_DIR]     # default: $OUT if set, else runs/gpu_acceptance
#
# Sized for one H100 lent for ~15 minutes in all (start-up included), on an image with torch, CUDA,
# transformers, lightning and peft but no network and none of: bitsandbytes, math-verify, jsonargparse,
# pytest. Those travel as wheels in wheels/ (at most 64 MiB per run; bitsandbytes' manylinux wheel is
# ~43 MB). Download them beforehand, on a machine with the package index, for the image's Python
# (here 3.12; change --python-version to match `python -V` on the image):
#
#   pip download --only-binary=:all: --no-deps --python-version 3.12 --platform manylinux_2_24_x86_64 -d wheels \
#     bitsandbytes==0.50.2 math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 \
#     jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 \
#     pytest==9.2.0 pluggy==1.6.0 iniconfig==2.1.0
#
# and carry wheels/ with the working tree. What it does, each step under a timeout that leaves time
# for a rerun within the 15 minutes:
#   1. installs the carried wheels (pip --no-index --no-deps), names every import still missing;
#   2. pytest -m "gpu and not slow" tests/test_gpu.py (CUDA steps, log-probs, update memory, QLoRA,
#      async sampler on cuda:0, FSDP2 on one GPU): 240 s;
#   3. the true-size test: benchmarks.true_size for configs/recipes/qlora_gsm8k_grpo_8gb.yaml on CUDA at
#      the recipe's own sizes: 330 s;
#   4. writes REPORT_DIR/report.md (device, versions, every check passed/failed/skipped with its reason,
#      the measurements) and REPORT_DIR/junit-*.xml, to bring back.
# Without a GPU every check is skipped and the report says so (the tests run it that way).
set -u
cd "$(dirname "$0")/.."
REPORT_DIR="${1:-${OUT:-runs/gpu_acceptance}}"
mkdir -p "$REPORT_DIR"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
export RLOOP_GPU_REPORT_DIR="$REPORT_DIR/measurements" RLOOP_CACHE="${RLOOP_CACHE:-$REPORT_DIR/.cache}"
PYTHON="${PYTHON:-python}"

log() { echo "[gpu_acceptance $(date +%H:%M:%S)] $*" | tee -a "$REPORT_DIR/steps.log"; }

if compgen -G "wheels/*.whl" > /dev/null; then
  log "installing $(ls wheels/*.whl | wc -l) carried wheels"
  timeout 120 "$PYTHON" -m pip install --no-index --no-deps --quiet wheels/*.whl >> "$REPORT_DIR/steps.log" 2>&1 \
    || log "pip install of the carried wheels failed (see steps.log)"
else
  log "no wheels/ directory: using the packages installed"
fi
"$PYTHON" - > "$REPORT_DIR/imports.txt" 2>> "$REPORT_DIR/steps.log" <<'EOF'
import importlib
for name in ("torch", "transformers", "lightning", "peft", "bitsandbytes", "math_verify", "jsonargparse", "pytest"):
    try:
        module = importlib.import_module(name)
        print(f"{name}: {getattr(module, '__version__', 'ok')}")
    except Exception as error:
        print(f"{name}: MISSING ({type(error).__name__}: {error})")
EOF
log "imports: $(tr '\n' ';' < "$REPORT_DIR/imports.txt")"

log "gpu tests (240 s at most)"
timeout 240 "$PYTHON" -m pytest tests/test_gpu.py -m "gpu and not slow" -q -p no:cacheprovider -rs \
  --junitxml="$REPORT_DIR/junit-gpu.xml" > "$REPORT_DIR/pytest-gpu.log" 2>&1
log "gpu tests: exit $?"
log "true-size benchmark test (330 s at most)"
timeout 330 "$PYTHON" -m pytest tests/test_gpu.py -m "gpu and slow" -q -p no:cacheprovider -rs \
  --junitxml="$REPORT_DIR/junit-true-size.xml" > "$REPORT_DIR/pytest-true-size.log" 2>&1
log "true-size test: exit $?"

"$PYTHON" - "$REPORT_DIR" <<'EOF'
"""report.md from the junit files, the imports, the device and the measurement files."""
import glob
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

directory = sys.argv[1]
try:
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
except Exception as error:
    device = f"torch does not load: {error}"
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
rows, counts = [], {"passed": 0, "failed": 0, "skipped": 0}
for path in sorted(glob.glob(os.path.join(directory, "junit-*.xml"))):
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = "skipped" if tag == "skipped" else "failed"
                detail = (node.get("message") or node.text or "").strip().splitlines()[0][:300]
        counts[outcome] += 1
        properties = ", ".join(f"{p.get('name')} = {p.get('value')}" for p in case.iter("property"))
        rows.append(f"| {case.get('name')} | {outcome} | {float(case.get('time', 0)):.1f} | "
                     f"{(detail + ' ' + properties).strip().replace('|', '/')} |")
total = sum(counts.values())
if total == 0:
    verdict = "NO GPU CHECK RAN (pytest did not report: see pytest-*.log)"
elif counts["skipped"] == total:
    verdict = f"every GPU check was skipped ({total} of {total}): {device}"
else:
    verdict = f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped of {total} on {device}"
lines = ["# CUDA acceptance run", "", f"- commit {commit}; device: {device}", f"- **{verdict}**",
         "- packages: " + "; ".join(open(os.path.join(directory, "imports.txt")).read().split("\n")).strip("; "), "",
         "| check | outcome | s | reason / measurements |", "|---|---|---:|---|", *rows]
for path in sorted(glob.glob(os.path.join(directory, "measurements", "*"))):
    lines += ["", f"## {os.path.basename(path)}", "", "```", open(path).read().strip(), "```"]
open(os.path.join(directory, "report.md"), "w").write("\n".join(lines) + "\n")
print(verdict)
EOF
log "report: $REPORT_DIR/report.md"
