"""``zr sample``: images of a pipeline (plus LoRAs) for people to annotate, resumable.

One item per (prompt, seed), prompt-major, id ``p{prompt index:05d}-s{seed}``. An item's image comes
from its own noise generator seeded with its seed (a list of generators, one per image of a batch),
so it does not depend on the batch it was drawn in. Writes to ``DIR``:

- ``images/<id>.png``, each written atomically (an image file that exists is complete);
- ``records.jsonl``, one line per finished image, ready for ``zr annotate``::

      {"id": "p00000-s1", "prompt": "a red cube", "image": "images/p00000-s1.png", "model": "base", "seed": 1}

- ``sample.json``, the settings that decide the images. A rerun with the same settings skips the
  images that exist and generates the rest (an interrupted run continues where it stopped; more
  prompts or seeds extend the folder); other settings are an error naming what changed.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from zr_diffusion.io import atomic_write_json, atomic_write_text

RECORDS = "records.jsonl"
SETTINGS = "sample.json"


@dataclass(frozen=True)
class SampleSettings:
    """Everything that decides an item's image besides its prompt and seed."""

    pipeline: str
    loras: tuple[str, ...] = ()
    model: str = ""  # the model tag written into every record; "" = pipeline + LoRAs
    num_steps: int = 28
    guidance_scale: float = 5.0
    height: int = 512
    width: int = 512
    negative_prompt: str | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("num_steps", "height", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.model:
            object.__setattr__(self, "model", "+".join((self.pipeline, *self.loras)))


class Item(NamedTuple):
    id: str
    prompt: str
    seed: int

    def record(self, model: str) -> dict:
        return {
            "id": self.id,
            "prompt": self.prompt,
            "image": f"images/{self.id}.png",
            "model": model,
            "seed": self.seed,
        }


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0,1,2,3' -> (0, 1, 2, 3); repeated or non-integer seeds are an error."""
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers like 0,1,2,3, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must list at least one seed, none twice; got {text!r}")
    return seeds


def plan_items(prompts: list[str], seeds: tuple[int, ...]) -> list[Item]:
    """One item per (prompt, seed), prompt-major, so that a prompt's images sit together."""
    return [Item(f"p{i:05d}-s{s}", p, s) for i, p in enumerate(prompts) for s in seeds]


def _check_settings(out_dir: Path, settings: SampleSettings) -> None:
    path = out_dir / SETTINGS
    if not path.is_file():
        return
    old, new = json.loads(path.read_text()), json.loads(json.dumps(asdict(settings)))
    changed = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
    if changed:
        raise ValueError(
            f"{out_dir} was sampled with other settings ({path}): "
            + "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in changed.items())
            + ". Use another --out, or the same settings to continue."
        )


def _old_records(out_dir: Path) -> dict[str, dict]:
    """Records of earlier runs whose image exists (a line cut by an interruption is dropped)."""
    path, records = out_dir / RECORDS, {}
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being appended when the run stopped; its image is redone or re-recorded
        if (out_dir / record["image"]).is_file():
            records[record["id"]] = record
    return records


def _write_records(out_dir: Path, records: list[dict]) -> None:
    atomic_write_text(out_dir / RECORDS, "".join(json.dumps(r) + "\n" for r in records))


def sample_images(
    settings: SampleSettings,
    prompts: list[str],
    seeds: tuple[int, ...],
    out_dir: str | Path,
    batch_size: int = 4,
    device: str | None = None,
    show_progress: bool = True,
) -> dict:
    """Generate the missing images of ``plan_items(prompts, seeds)`` into ``out_dir``; returns counts."""
    from tqdm.auto import tqdm

    from zr_diffusion.data import save_image
    from zr_diffusion.pipelines.export import fuse_loras
    from zr_diffusion.pipelines.reward_finetune import load_t2i_adapter
    from zr_diffusion.pipelines.sampler import SamplerConfig, sample

    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    out_dir = Path(out_dir)
    _check_settings(out_dir, settings)
    items = plan_items(prompts, seeds)
    old = _old_records(out_dir)
    for item in items:
        if item.id in old and old[item.id]["prompt"] != item.prompt:
            raise ValueError(
                f"{out_dir / RECORDS}: {item.id} is for prompt {old[item.id]['prompt']!r}, but the prompt "
                f"file now has {item.prompt!r} there; use another --out for another prompt file"
            )
    done = {i.id for i in items if (out_dir / "images" / f"{i.id}.png").is_file()}
    todo = [i for i in items if i.id not in done]
    extra = [r for k, r in old.items() if k not in {i.id for i in items}]  # earlier prompts / seeds
    records = extra + [i.record(settings.model) for i in items if i.id in done]
    atomic_write_json(out_dir / SETTINGS, asdict(settings))
    _write_records(out_dir, records)
    print(f"sample: {len(items)} items, {len(done)} already in {out_dir}, {len(todo)} to generate")
    if todo:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        adapter = load_t2i_adapter(settings.pipeline, None, settings.dtype, device)
        fuse_loras(adapter, list(settings.loras))
        config = SamplerConfig(
            num_steps=settings.num_steps,
            guidance_scale=settings.guidance_scale,
            height=settings.height,
            width=settings.width,
        )
        bar = tqdm(total=len(items), initial=len(done), desc="sample", disable=not show_progress)
        with (out_dir / RECORDS).open("a") as log:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                negative = [settings.negative_prompt] * len(batch) if settings.negative_prompt else None
                generators = [torch.Generator().manual_seed(i.seed) for i in batch]  # one per image
                with torch.no_grad():
                    out = sample(adapter, [i.prompt for i in batch], config, generator=generators,
                                 negative_prompts=negative, grad=False)  # fmt: skip
                for item, image in zip(batch, out.images.float().cpu()):
                    save_image(image, out_dir / "images" / f"{item.id}.png")
                    log.write(json.dumps(item.record(settings.model)) + "\n")
                    records.append(item.record(settings.model))
                log.flush()
                bar.update(len(batch))
        bar.close()
    order = {r["id"]: n for n, r in enumerate(extra + [i.record(settings.model) for i in items])}
    _write_records(out_dir, sorted(records, key=lambda r: order[r["id"]]))
    return {"items": len(items), "skipped": len(done), "generated": len(todo), "records": len(records)}


# ---------------------------------------------------------------- `zr sample` (wired in cli.py's table)


def cli_run(args: argparse.Namespace) -> int:
    from zr_diffusion.pipelines.prompts import load_prompts

    settings = SampleSettings(
        pipeline=args.pipeline,
        loras=tuple(args.lora),
        model=args.tag,
        num_steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        negative_prompt=args.negative_prompt,
        dtype=args.dtype,
    )
    seeds = parse_seeds(args.seeds)
    counts = sample_images(
        settings,
        load_prompts(args.prompts),
        seeds,
        args.out,
        args.batch_size,
        args.device,
        not args.no_progress,
    )
    print(
        f"sample: {counts['generated']} generated, {counts['skipped']} skipped (already there); "
        f"{counts['records']} records in {Path(args.out) / RECORDS}\n  next: zr annotate {args.out}"
    )
    return 0
