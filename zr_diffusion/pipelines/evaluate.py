"""``zr eval-t2i``: GSB (METHOD.md Eq. 21) of generator A against generator B, with a judge.

A and B are one pipeline with LoRA ``lora_a`` / ``lora_b`` (null = the base). Every item is a
(prompt, seed) pair; both models start from the same noise (the same batches, from generators
seeded by ``(seed, batch index)``). The judge scores every image; per item
``judge_pairs`` says Good / Same / Bad for A with the tie margin, and ``gsb`` counts them.

Writes to ``output_dir``: ``gsb.json`` (counts, GSB, mean reward per dimension, every item),
``gsb.md`` (tables), ``review/index.html`` (side-by-side page for people, A/B order hidden) and
``review.key.json`` (which side is A; keep it away from raters; ``zr gsb --answers ... --key ...``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from zr_diffusion.io import atomic_write_json, atomic_write_text
from zr_diffusion.pipelines.base import LORA_WEIGHT_NAME, T2IAdapter, lora_family
from zr_diffusion.pipelines.gsb import gsb, judge_pairs, render_gsb_markdown, write_review_page
from zr_diffusion.pipelines.prompts import load_prompts
from zr_diffusion.pipelines.reward_finetune import load_t2i_adapter
from zr_diffusion.pipelines.sampler import SamplerConfig, sample
from zr_diffusion.training import step_generator

if TYPE_CHECKING:
    from zr_diffusion.pipelines.config import EvalT2IConfig


class Scores(NamedTuple):
    mu: torch.Tensor  # [N, D] per-dimension judge scores
    reward: torch.Tensor  # [N] aggregate


def check_lora_folder(path: str, name: str) -> None:
    """A LoRA folder must exist and hold the diffusers weights file ``save_lora`` writes."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{name}: LoRA folder {folder} does not exist")
    if not (folder / LORA_WEIGHT_NAME).is_file():
        raise FileNotFoundError(
            f"{name}: {folder} has no {LORA_WEIGHT_NAME} (expected a folder written by save_lora)"
        )


def check_lora_family(path: str, name: str, adapter: T2IAdapter, pipeline: str) -> None:
    family = lora_family(path)
    if family is not None and family != adapter.family:
        raise ValueError(
            f"{name}: the LoRA at {path} was trained on a {family!r} pipeline, but {pipeline} is "
            f"{adapter.family!r}; use a LoRA of this pipeline's family"
        )


def use_lora(adapter: T2IAdapter, lora: str | None) -> None:
    """Make ``adapter`` the base (lora None) or the base plus the LoRA at ``lora``."""
    if getattr(adapter.denoiser, "peft_config", None):
        adapter.pipe.unload_lora_weights()
    if lora is not None:
        adapter.load_lora(lora)


@torch.no_grad()
def generate(
    adapter: T2IAdapter,
    prompts: list[str],
    seeds: tuple[int, ...],
    sampler: SamplerConfig,
    batch_size: int,
    negative_prompt: str | None = None,
) -> torch.Tensor:
    """Images [len(seeds) · P, 3, H, W] in [0, 1], seed-major (the order of ``items``).

    The noise of batch c of seed s comes from ``step_generator(s, c)``, so an item's noise depends
    only on its seed, its position and the batch size, never on the model.
    """
    images = []
    for seed in seeds:
        for c, start in enumerate(range(0, len(prompts), batch_size)):
            batch = prompts[start : start + batch_size]
            negative = [negative_prompt] * len(batch) if negative_prompt is not None else None
            generator = step_generator(seed, c)
            out = sample(adapter, batch, sampler, generator=generator, negative_prompts=negative, grad=False)
            images.append(out.images.float().cpu())
    return torch.cat(images)


@torch.no_grad()
def score(judge, images: torch.Tensor, prompts: list[str], batch_size: int, device) -> Scores:
    """Judge every image: images [N, 3, H, W], N prompts -> Scores(mu [N, D], reward [N])."""
    mu, reward = [], []
    for start in range(0, len(prompts), batch_size):
        out = judge(images[start : start + batch_size].to(device), prompts[start : start + batch_size])
        mu.append(out.mu.float().cpu())
        reward.append(out.reward.float().cpu())
    return Scores(torch.cat(mu), torch.cat(reward))


def items(prompts: list[str], seeds: tuple[int, ...]) -> list[tuple[str, int]]:
    """The (prompt, seed) items, seed-major: the order ``generate`` produces images in."""
    return [(p, s) for s in seeds for p in prompts]


def render_report(summary: dict) -> str:
    """gsb.md: the GSB table, then the mean judge score per dimension of A and B."""
    a, b = summary["label_a"], summary["label_b"]
    lines = [
        f"# GSB: {a} vs {b}",
        "",
        f"Judge: {summary['judge']['kind']} ({summary['judge']['path']}); tie margin {summary['tie_margin']}; "
        f"{summary['n_items']} items ({summary['n_prompts']} prompts x {len(summary['seeds'])} seeds).",
        "",
        summary["gsb_table"].rstrip("\n"),
        "",
        f"| judge score | {a} | {b} | {a} − {b} |",
        "|---|---|---|---|",
    ]
    rows = {"reward (aggregate)": summary["mean_reward"], **summary["per_dimension"]}
    for name, v in rows.items():
        lines.append(f"| {name} | {v['a']:.4f} | {v['b']:.4f} | {v['a'] - v['b']:+.4f} |")
    return "\n".join(lines) + "\n"


def evaluate_t2i(cfg: EvalT2IConfig) -> dict:
    """Generate with A and B from identical noise, judge, write GSB, report and review page."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = Path(cfg.output_dir)
    prompts = load_prompts(cfg.prompts)[: cfg.max_prompts]
    loras = {"lora_a": cfg.lora_a, "lora_b": cfg.lora_b}
    for name, path in loras.items():
        if path is not None:
            check_lora_folder(path, name)
    adapter = load_t2i_adapter(cfg.pipeline, cfg.family, cfg.dtype, device, cfg.enable_xformers)
    for name, path in loras.items():
        if path is not None:
            check_lora_family(path, name, adapter, cfg.pipeline)
    label_a = cfg.label_a or (cfg.lora_a or "base")
    label_b = cfg.label_b or (cfg.lora_b or "base")
    judge = cfg.judge.build(device)
    sampler = SamplerConfig(
        num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale, height=cfg.height, width=cfg.width
    )
    pairs = items(prompts, cfg.seeds)
    item_prompts = [p for p, _ in pairs]
    print(f"eval-t2i: {len(pairs)} items, {label_a} vs {label_b}, {adapter.family} pipeline {cfg.pipeline}")

    images, scores = {}, {}
    for side, lora in (("a", cfg.lora_a), ("b", cfg.lora_b)):
        use_lora(adapter, lora)
        images[side] = generate(adapter, prompts, cfg.seeds, sampler, cfg.batch_size, cfg.negative_prompt)
        scores[side] = score(judge, images[side], item_prompts, cfg.batch_size, device)
    use_lora(adapter, None)

    verdicts = judge_pairs(scores["a"].reward, scores["b"].reward, cfg.tie_margin)
    result = gsb(verdicts)
    page, key = write_review_page(
        out_dir / "review",
        item_prompts,
        images["a"],
        images["b"],
        seed=cfg.review_seed,
        key_path=out_dir / "review.key.json",
    )
    dims = list(judge.dimensions)
    summary = {
        "label_a": label_a,
        "label_b": label_b,
        "lora_a": cfg.lora_a,
        "lora_b": cfg.lora_b,
        "pipeline": cfg.pipeline,
        "family": adapter.family,
        "judge": {"kind": cfg.judge.kind, "path": cfg.judge.path, "dimensions": dims},
        "tie_margin": cfg.tie_margin,
        "seeds": list(cfg.seeds),
        "n_prompts": len(prompts),
        "n_items": len(pairs),
        "good": result.good,
        "same": result.same,
        "bad": result.bad,
        "gsb": result.gsb,
        "mean_reward": {"a": float(scores["a"].reward.mean()), "b": float(scores["b"].reward.mean())},
        "per_dimension": {
            d: {"a": float(scores["a"].mu[:, i].mean()), "b": float(scores["b"].mu[:, i].mean())}
            for i, d in enumerate(dims)
        },
        "gsb_table": render_gsb_markdown(result, label_a, label_b),
        "review_page": str(page),
        "review_key": str(key),
        "items": [
            {
                "id": f"item{i:04d}",
                "prompt": p,
                "seed": s,
                "reward_a": float(scores["a"].reward[i]),
                "reward_b": float(scores["b"].reward[i]),
                "verdict": v,
            }
            for i, ((p, s), v) in enumerate(zip(pairs, verdicts))
        ],
    }
    atomic_write_json(out_dir / "gsb.json", summary)
    atomic_write_text(out_dir / "gsb.md", render_report(summary))
    print(summary["gsb_table"], end="")
    print(
        f"eval-t2i: GSB {result.gsb:+.1%} for {label_a} against {label_b}\n"
        f"  results:     {out_dir / 'gsb.json'}\n"
        f"  report:      {out_dir / 'gsb.md'}\n"
        f"  review page: {page} (hand the folder {page.parent} to raters)\n"
        f"  key:         {key} (keep it away from raters; then: zr gsb --answers FILE --key {key})"
    )
    return summary
