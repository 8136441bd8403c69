"""Which shipped real-scale configs (``configs/t2i/*_zreward.yaml``) fit one 80 GB and one 141 GB GPU.

Reads the ``--json`` lines of ``reward_step.py`` runs labelled ``fit:<config stem>`` at micro-batches 1 and 2
(K=1, the config's dtype, the 9B-size student) and extrapolates the peak linearly to the config's micro-batch
per GPU, ``batch_size / run.grad_accum`` (one process): peak(b) = peak(1) + (b - 1) (peak(2) - peak(1)).
A config fits when that peak stays below 95 % of the card (the rest: allocator fragmentation, CUDA context).

    python benchmarks/gpu_verdict.py runs/bench-gpu/results.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "t2i"
CARDS_GB = (80, 141)
HEADROOM = 0.95


def micro_batch(config: Path) -> int:
    raw = yaml.safe_load(config.read_text())
    return int(raw["batch_size"]) // int(raw.get("run", {}).get("grad_accum", 1))


def predicted_peak(peak_by_batch: dict[int, float], batch: int) -> float:
    """Linear extrapolation from the peaks at micro-batches 1 and 2 (bytes)."""
    one, two = peak_by_batch[1], peak_by_batch[2]
    return one + (batch - 1) * (two - one)


def verdict(lines: list[dict], tiny: bool = False) -> str:
    rows = [
        f"{'config':>16} {'setting':>8} {'micro':>5} {'peak@1 GB':>10} {'peak@2 GB':>10} {'predicted GB':>12} "
        + " ".join(f"{'fits ' + str(c):>8}" for c in CARDS_GB)
    ]
    for config in sorted(CONFIG_DIR.glob("*_zreward.yaml")):
        label = "fit:tiny" if tiny else f"fit:{config.stem}"
        mine = [r for r in lines if r["label"] == label and r["grad"] == "K=1"]
        micro = micro_batch(config)
        for setting in sorted({r["setting"] for r in mine}):
            runs = [r for r in mine if r["setting"] == setting]
            errors = {r["batch"]: r["error"] for r in runs if r.get("error")}
            peaks = {r["batch"]: r["peak_bytes"] / 1e9 for r in runs if not r.get("error")}
            if errors:
                b = min(errors)
                rows.append(
                    f"{config.stem:>16} {setting:>8} {micro:>5} failed at micro-batch {b}: {errors[b][:60]}"
                )
                continue
            if set(peaks) < {1, 2}:
                rows.append(f"{config.stem:>16} {setting:>8} {micro:>5} (no measurement at batches 1 and 2)")
                continue
            need = predicted_peak(peaks, micro)
            fits = " ".join(f"{'yes' if need <= HEADROOM * c else 'no':>8}" for c in CARDS_GB)
            rows.append(
                f"{config.stem:>16} {setting:>8} {micro:>5} {peaks[1]:10.1f} {peaks[2]:10.1f} {need:12.1f} {fits}"
            )
        if not mine:
            rows.append(
                f"{config.stem:>16} {'-':>8} {micro:>5} (not measured: did not build or ran out of memory)"
            )
    if tiny:
        rows.insert(0, "TINY MODE (CPU, tiny models): the numbers below test the script, they are no verdict")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="JSON lines written by reward_step.py --json")
    parser.add_argument("--tiny", action="store_true", help="read the tiny-mode rows (labelled fit:tiny)")
    args = parser.parse_args()
    lines = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
    print(verdict(lines, args.tiny))


if __name__ == "__main__":
    main()
