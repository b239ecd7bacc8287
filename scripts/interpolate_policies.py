"""Interpolate two full-weight policies of one architecture: alpha * A + (1 - alpha) * B (WiSE-FT).

    python scripts/interpolate_policies.py runs/tiny_cpu/iter_01/rft/policy runs/base/tiny_countdown/policy \
        --alpha 0.7 --out runs/interpolated/a0.7
    rloop eval --config configs/eval/tiny_countdown.yaml --policy.model_name_or_path runs/interpolated/a0.7 --seed 0

The output directory is A's (config, tokenizer, policy settings) with interpolated safetensors
weights. Used for the weight-interpolation study in docs/results.md ("Weight interpolation").
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

WEIGHTS = "model.safetensors"


def load(directory: Path) -> dict:
    from safetensors.torch import load_file

    path = directory / WEIGHTS
    if not path.exists():
        hint = " (a LoRA adapter: export it merged first)" if (directory / "adapter_config.json").exists() else ""
        raise SystemExit(f"{path}: no full-weight safetensors file{hint}")
    return load_file(str(path))


def interpolate(a: Path, b: Path, alpha: float, out: Path) -> Path:
    from safetensors.torch import save_file

    if not 0.0 <= alpha <= 1.0:
        raise SystemExit(f"--alpha must be in [0, 1], got {alpha}")
    weights_a, weights_b = load(a), load(b)
    if weights_a.keys() != weights_b.keys():
        raise SystemExit(f"{a} and {b} hold different tensors: {sorted(weights_a.keys() ^ weights_b.keys())[:5]}")
    mismatched = [key for key in weights_a if weights_a[key].shape != weights_b[key].shape]
    if mismatched:
        raise SystemExit(f"{a} and {b} differ in shape at {mismatched[:5]}")
    out.mkdir(parents=True, exist_ok=True)
    for path in a.iterdir():
        if path.is_file() and path.name != WEIGHTS:
            shutil.copy(path, out / path.name)
    merged = {key: (alpha * weights_a[key].float() + (1 - alpha) * weights_b[key].float()).to(weights_a[key].dtype)
              for key in weights_a}
    save_file(merged, str(out / WEIGHTS), metadata={"format": "pt"})
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="policy directory weighted by alpha (e.g. theta_K)")
    parser.add_argument("b", type=Path, help="policy directory weighted by 1 - alpha (e.g. theta_0)")
    parser.add_argument("--alpha", type=float, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    print(interpolate(args.a, args.b, args.alpha, args.out))


if __name__ == "__main__":
    main()
