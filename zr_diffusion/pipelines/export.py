"""``zr export``: LoRAs fused, in order, into a full diffusers pipeline folder (or merged into one LoRA).

A LoRA adds ``ΔW = s · B A`` to a frozen projection ``W`` (``s = alpha / rank``), so fusing LoRAs
L1..Ln in order gives ``W + Σ_i s_i B_i A_i``: what the base with all n LoRAs active computes.

- ``export_pipeline``: the fused pipeline, written with ``save_pretrained`` (safetensors only); it
  loads with ``DiffusionPipeline.from_pretrained(out)`` and needs nothing from this package.
- ``export_lora``: one LoRA in the diffusers format whose ``ΔW`` is the same sum: the factors are
  stacked along the rank, ``A = [A_1; …; A_n]`` ([Σr, in]) and ``B = [s_1 B_1, …, s_n B_n]``
  ([out, Σr]), with ``alpha = Σr`` (scale 1). The LoRAs must target the same modules.

Both write a model card (``README.md``, see ``model_card.py``). Every LoRA is checked before it is
loaded: the folder and its weights file exist, it belongs to the base's family, and each factor pair
has one rank that fits the base's module (a LoRA whose keys would be dropped silently is an error).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import NamedTuple

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open

from zr_diffusion.io import atomic_write_text, write_dir_atomically
from zr_diffusion.pipelines.base import LORA_FAMILY_FILE, LORA_WEIGHT_NAME, T2IAdapter
from zr_diffusion.pipelines.evaluate import check_lora_family, check_lora_folder
from zr_diffusion.pipelines.reward_finetune import load_t2i_adapter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Factors(NamedTuple):
    """One LoRA's factors on one module: ``ΔW = scale · B @ A``."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float


# ---------------------------------------------------------------- checks before loading


def _factor_shapes(weights: Path, prefix: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """{module name in the denoiser: {"A": shape, "B": shape}} from the safetensors header."""
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    with safe_open(str(weights), framework="pt") as f:
        for key in list(f.keys()):
            if not key.startswith(prefix) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
                raise ValueError(
                    f"LoRA {weights.parent}: key {key!r} is not '{prefix}<module>.lora_A.weight' / "
                    f"'.lora_B.weight' (a LoRA of another family or format?)"
                )
            module, side = key[len(prefix) : -len(".lora_A.weight")], key[-8]
            modules.setdefault(module, {})[side] = tuple(f.get_slice(key).get_shape())
    return modules


def check_lora(adapter: T2IAdapter, lora_dir: str | Path) -> int:
    """Check that the LoRA at ``lora_dir`` fits ``adapter``'s denoiser; returns its rank.

    Raises FileNotFoundError for a missing folder or weights file, ValueError naming the LoRA and the
    module for another family, a missing factor, A and B of different ranks, a rank other than the
    one recorded, a module the base does not have, or a width the base's module does not have.
    """
    check_lora_folder(str(lora_dir), "--lora")
    check_lora_family(str(lora_dir), "--lora", adapter, adapter.pipe.name_or_path)
    lora_dir = Path(lora_dir)
    weights = lora_dir / LORA_WEIGHT_NAME
    shapes = _factor_shapes(weights, adapter.denoiser_name + ".")
    if not shapes:
        raise ValueError(f"LoRA {lora_dir}: {weights.name} holds no LoRA factors")
    record = lora_dir / LORA_FAMILY_FILE
    recorded = json.loads(record.read_text()).get("rank") if record.is_file() else None
    modules = dict(adapter.denoiser.named_modules())
    ranks = set()
    for name, pair in sorted(shapes.items()):
        if set(pair) != {"A", "B"}:
            raise ValueError(f"LoRA {lora_dir}: module {name} has lora_{''.join(pair)} but not both A and B")
        (r, fan_in), (fan_out, r_b) = pair["A"], pair["B"]
        if r != r_b:
            raise ValueError(
                f"LoRA {lora_dir}: module {name} has incompatible ranks, A {list(pair['A'])} vs B {list(pair['B'])}"
            )
        if recorded is not None and r != recorded:
            raise ValueError(
                f"LoRA {lora_dir}: module {name} has rank {r}, but {LORA_FAMILY_FILE} records rank {recorded}"
            )
        base = modules.get(name)
        if base is None:
            raise ValueError(
                f"LoRA {lora_dir} targets {name}, which the base {adapter.family} denoiser does not have "
                f"(incompatible targets: trained on another model?)"
            )
        base = getattr(base, "base_layer", base)
        if isinstance(base, torch.nn.Linear) and (base.in_features, base.out_features) != (fan_in, fan_out):
            raise ValueError(
                f"LoRA {lora_dir}: module {name} maps {fan_in} -> {fan_out} features, the base's maps "
                f"{base.in_features} -> {base.out_features} (trained on a model of another size?)"
            )
        ranks.add(r)
    return max(ranks)


# ---------------------------------------------------------------- loading, fusing, merging


def load_loras(adapter: T2IAdapter, loras: list[str | Path]) -> list[str]:
    """Load every LoRA (checked first) as its own adapter ``lora{i}``, all active; returns the names."""
    names = []
    for i, lora in enumerate(loras):
        check_lora(adapter, lora)
        name = f"lora{i}"
        adapter.pipe.load_lora_weights(str(lora), weight_name=LORA_WEIGHT_NAME, adapter_name=name)
        names.append(name)
    if names:
        adapter.pipe.set_adapters(names, adapter_weights=[1.0] * len(names))
    return names


def fuse_loras(adapter: T2IAdapter, loras: list[str | Path]) -> None:
    """Fuse the LoRAs, in order, into the denoiser's weights and remove the LoRA layers (in place)."""
    for name in load_loras(adapter, loras):
        adapter.pipe.fuse_lora(components=[adapter.denoiser_name], lora_scale=1.0, adapter_names=[name])
    if loras:
        adapter.pipe.unload_lora_weights()


def lora_factors(adapter: T2IAdapter, name: str) -> dict[str, Factors]:
    """{module name: Factors} of the loaded LoRA adapter ``name``."""
    return {
        module_name: Factors(
            A=module.lora_A[name].weight.detach().float(),
            B=module.lora_B[name].weight.detach().float(),
            scale=float(module.scaling[name]),
        )
        for module_name, module in adapter.denoiser.named_modules()
        if isinstance(module, BaseTunerLayer) and name in getattr(module, "lora_A", {})
    }


def stack_factors(loras: list[dict[str, Factors]], labels: list[str]) -> dict[str, Factors]:
    """One LoRA with ``ΔW = Σ_i s_i B_i A_i`` per module: A stacked to [Σr, in], s_i B_i to [out, Σr], scale 1."""
    targets = set(loras[0])
    for factors, label in zip(loras[1:], labels[1:]):
        if set(factors) != targets:
            only_first, only_this = sorted(targets - set(factors)), sorted(set(factors) - targets)
            raise ValueError(
                f"--lora-only needs LoRAs with the same targets; {labels[0]} and {label} differ "
                f"(only in the first: {only_first[:3]}, only in {label}: {only_this[:3]})"
            )
    merged = {
        m: Factors(
            A=torch.cat([f[m].A for f in loras]),  # [Σr, in]
            B=torch.cat([f[m].scale * f[m].B for f in loras], dim=1),  # [out, Σr]
            scale=1.0,
        )
        for m in sorted(targets)
    }
    ranks = {m: f.A.shape[0] for m, f in merged.items()}
    if len(set(ranks.values())) > 1:
        raise ValueError(
            f"--lora-only needs one rank per LoRA on every module; the stacked ranks differ: "
            f"{dict(list(ranks.items())[:3])} ... (incompatible ranks: a LoRA with a per-module rank pattern?)"
        )
    return merged


# ---------------------------------------------------------------- the two exports


def _load_base(pipeline: str, device: str) -> T2IAdapter:
    return load_t2i_adapter(pipeline, None, "float32", device)  # fused in float32, cast on save


def export_pipeline(
    pipeline: str, loras: list[str], out: str | Path, dtype: str = "float32", device: str = "cpu"
) -> Path:
    """The base at ``pipeline`` with the LoRAs fused in, in order, saved as a full pipeline folder with
    its model card. Weights are float32 while fusing, saved in ``dtype``; safetensors only."""
    from zr_diffusion.pipelines.model_card import render_card

    adapter = _load_base(pipeline, device)
    fuse_loras(adapter, loras)
    if dtype != "float32":
        adapter.pipe.to(DTYPES[dtype])
    card = render_card(pipeline, adapter.family, loras, lora_only=False, dtype=dtype)

    def write(tmp: Path) -> None:
        adapter.pipe.save_pretrained(tmp, safe_serialization=True)
        atomic_write_text(tmp / "README.md", card)

    return write_dir_atomically(out, write)


def export_lora(pipeline: str, loras: list[str], out: str | Path, device: str = "cpu") -> Path:
    """One diffusers-format LoRA for ``pipeline`` equal to the LoRAs together (see module docstring),
    with its model card; ``pipe.load_lora_weights(out)`` reads it."""
    from zr_diffusion.pipelines.model_card import render_card

    adapter = _load_base(pipeline, device)
    names = load_loras(adapter, loras)
    merged = stack_factors([lora_factors(adapter, n) for n in names], [str(p) for p in loras])
    adapter.pipe.unload_lora_weights()
    rank = next(iter(merged.values())).A.shape[0]
    adapter.add_lora(rank=rank, alpha=float(rank), targets=tuple(merged))
    modules = dict(adapter.denoiser.named_modules())
    with torch.no_grad():
        for name, f in merged.items():
            modules[name].lora_A["default"].weight.copy_(f.A)
            modules[name].lora_B["default"].weight.copy_(f.B)
    card = render_card(pipeline, adapter.family, loras, lora_only=True, dtype="float32")

    def write(tmp: Path) -> None:
        adapter.save_lora(tmp)
        atomic_write_text(tmp / "README.md", card)

    return write_dir_atomically(out, write)


# ---------------------------------------------------------------- `zr export` (wired in cli.py's table)


def cli_run(args: argparse.Namespace) -> int:
    if args.lora_only:
        if args.dtype != "float32":
            raise ValueError("--lora-only writes float32 LoRA weights; drop --dtype")
        out = export_lora(args.pipeline, args.lora, args.out, device=args.device)
        print(f"export: one LoRA for {args.pipeline} merging {len(args.lora)} LoRA(s) in {out}")
        print(f"  load it with: pipe.load_lora_weights({str(out)!r}); model card: {out / 'README.md'}")
        return 0
    out = export_pipeline(args.pipeline, args.lora, args.out, dtype=args.dtype, device=args.device)
    print(f"export: {args.pipeline} with {len(args.lora)} LoRA(s) fused in, saved to {out} ({args.dtype})")
    print(f"  load it with: DiffusionPipeline.from_pretrained({str(out)!r}); model card: {out / 'README.md'}")
    return 0
