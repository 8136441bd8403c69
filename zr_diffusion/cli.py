"""``zr <command>``: parse arguments and dispatch through one explicit table.

Recipe commands take ``--config FILE`` followed by ``key.sub=value`` overrides; the recipe modules
are imported only when their command runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


def _import(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument(
        "--resume", action="store_true", help="resume from the last checkpoint in the output folder"
    )
    p.add_argument(
        "--skip-bad", action="store_true", help="report bad data records and skip them instead of stopping"
    )
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def _skip_bad_key(cls: type) -> str:
    """The config key that turns on skipping bad records: ``skip_bad`` or ``<section>.skip_bad``."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    if "skip_bad" in hints:
        return "skip_bad"
    for f in dataclasses.fields(cls):
        sub = hints[f.name]
        if dataclasses.is_dataclass(sub) and "skip_bad" in typing.get_type_hints(sub):
            return f"{f.name}.skip_bad"
    raise ValueError(f"--skip-bad: {cls.__name__} reads no scored records, so there is nothing to skip")


def recipe(config_cls: str, function: str) -> Callable[[argparse.Namespace], int | None]:
    """A command that builds ``config_cls`` from --config + overrides and calls ``function(cfg)``."""

    def run(args: argparse.Namespace) -> int | None:
        from zr_diffusion.config import load_config

        cls = _import(config_cls)
        overrides = list(args.overrides)
        if getattr(args, "resume", False):
            overrides.append("resume=true")
        if getattr(args, "skip_bad", False):
            overrides.append(f"{_skip_bad_key(cls)}=true")
        cfg = load_config(cls, args.config, overrides)
        _import(function)(cfg)
        return 0

    return run


# ---- zr score ------------------------------------------------------------------------------------


def _score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="reward model folder or hub id (a Qwen-VL family checkpoint)"
    )
    p.add_argument("--image", required=True, nargs="+", help="image file(s)")
    p.add_argument("--prompt", required=True, help="the text prompt the image(s) were generated for")
    p.add_argument("--dimensions", nargs="+", default=None, help="rubric dimensions (default: all four)")
    p.add_argument(
        "--weights", nargs="+", type=float, default=None, help="dimension weights for the aggregate"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the folder")


def _score(args: argparse.Namespace) -> int:
    import torch

    from zr_diffusion.data import load_image
    from zr_diffusion.reward.model import ZRewardModel

    for f in args.image:
        if not os.path.isfile(f):
            raise SystemExit(f"zr score: image file {f} does not exist")
    model = ZRewardModel.from_pretrained(
        args.model, dimensions=args.dimensions, weights=args.weights, trust_remote_code=args.trust_remote_code
    )
    results = []
    for f in args.image:
        image = load_image(f).unsqueeze(0)  # [1, 3, H, W]
        with torch.no_grad():
            out = model(image, [args.prompt])
        dims = {}
        for d, name in enumerate(model.dimensions):
            dims[name] = {
                "expected_score": round(float(out.mu[0, d]), 4),
                "distribution": {
                    f"{b:g}": round(float(p), 4) for b, p in zip(model.grid.bins, out.probs[0, d])
                },
            }
        results.append(
            {"image": f, "prompt": args.prompt, "reward": round(float(out.reward[0]), 4), "dimensions": dims}
        )
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
        return 0
    for r in results:
        print(f"{r['image']}  prompt: {r['prompt']!r}  reward: {r['reward']:.3f}")
        bins = list(next(iter(r["dimensions"].values()))["distribution"])
        print(f"  {'dimension':<14} {'μ':>6}  " + " ".join(f"{b:>5}" for b in bins))
        for name, d in r["dimensions"].items():
            probs = " ".join(f"{p:5.3f}" for p in d["distribution"].values())
            print(f"  {name:<14} {d['expected_score']:6.3f}  {probs}")
    return 0


# ---- zr make-tiny --------------------------------------------------------------------------------


def _make_tiny_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", help="folder to write the tiny model and processor to")
    p.add_argument("--family", default="qwen3_5", help="qwen2_vl | qwen2_5_vl | qwen3_vl | qwen3_5")
    p.add_argument("--seed", type=int, default=0)


def _make_tiny(args: argparse.Namespace) -> int:
    from zr_diffusion.vlm.tiny import make_tiny_vlm

    path = make_tiny_vlm(args.out_dir, family=args.family, seed=args.seed)
    print(f"wrote a tiny {args.family} reward model (random weights) to {path}")
    return 0


def _make_tiny_t2i_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", help="folder to write the tiny pipeline to")
    p.add_argument(
        "--family", required=True, choices=("sd", "sdxl", "flux", "zimage"), help="pipeline family"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-size", type=int, default=32, help="image side in pixels (a multiple of 16)")


def _make_tiny_t2i(args: argparse.Namespace) -> int:
    from zr_diffusion.pipelines.tiny import make_tiny_t2i

    path = make_tiny_t2i(args.out_dir, args.family, seed=args.seed, sample_size=args.sample_size)
    print(f"wrote a tiny {args.family} pipeline (random weights, {args.sample_size} px) to {path}")
    return 0


def _validate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="+", help="record files (.jsonl or .parquet)")
    p.add_argument(
        "--dimensions", nargs="+", default=None, help="valid dimensions (default: the four of the rubric)"
    )
    p.add_argument(
        "--require-rationale", action="store_true", help="every record needs a rationale (RewardDance)"
    )
    p.add_argument("--skip-bad", action="store_true", help="report bad records and count the rest")


def _validate(args: argparse.Namespace) -> int:
    from collections import Counter

    from zr_diffusion.data import build_pairs, load_records

    for path in args.data:
        records = load_records(
            path, dimensions=args.dimensions, skip_bad=args.skip_bad, require_rationale=args.require_rationale
        )
        pairs = build_pairs(records)
        per_dim = Counter(r.dimension for r in records)
        multi = sum(len(r.scores) > 1 for r in records)
        print(
            f"{path}: {len(records)} valid records ({multi} with several annotators), "
            f"{len(pairs)} same-prompt pairs ({sum(p.gap > 0.5 for p in pairs)} with |gap| > 0.5); "
            + ", ".join(f"{d}: {n}" for d, n in sorted(per_dim.items()))
        )
    return 0


def _gsb_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--answers", required=True, help="answers JSON downloaded from the review page")
    p.add_argument("--key", required=True, help="key JSON written beside the review page's folder")
    p.add_argument("--label-a", default="tuned", help="name of model A in the table")
    p.add_argument("--label-b", default="baseline", help="name of model B in the table")


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pipeline", required=True, help="base diffusers pipeline folder or hub id")
    p.add_argument(
        "--lora", action="append", required=True, help="LoRA folder; repeat to fuse several, in order"
    )
    p.add_argument("--out", required=True, help="output folder (replaced whole)")
    p.add_argument(
        "--lora-only", action="store_true", help="write one merged LoRA folder instead of a full pipeline"
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="dtype of the saved weights",
    )
    p.add_argument("--device", default="cpu", help="device to fuse on (cpu | cuda)")


def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pipeline", required=True, help="diffusers pipeline folder or hub id")
    p.add_argument(
        "--lora", action="append", default=[], help="LoRA folder; repeat to stack several, in order"
    )
    p.add_argument(
        "--prompts", required=True, help='prompt file: .txt (one per line) or .jsonl ({"prompt": ...})'
    )
    p.add_argument("--seeds", default="0", help="comma-separated seeds, one image per prompt and seed")
    p.add_argument("--out", required=True, help="output folder; a rerun continues in it")
    p.add_argument("--tag", default="", help="model tag written into the records (default: pipeline+LoRAs)")
    p.add_argument("--steps", type=int, default=28, help="denoising steps")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="in the family's convention")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--negative-prompt", default=None, help="CFG families only (not Flux.1)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _annotate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="folder written by `zr sample` (its records.jsonl and images/)")
    p.add_argument("--dimensions", nargs="+", default=None, help="rubric dimensions (default: all four)")
    p.add_argument(
        "--import",
        dest="answers",
        nargs="+",
        metavar="ANSWERS.jsonl",
        help="merge these downloaded files (one per annotator) into scored records instead",
    )
    p.add_argument(
        "--out",
        default=None,
        help="page (default DIR/annotate.html) or, with --import, records file "
        "(default DIR/annotations.jsonl)",
    )
    p.add_argument(
        "--link-images",
        action="store_true",
        help="link the images instead of embedding them (page stays in DIR)",
    )


def lazy(target: str) -> Callable[[argparse.Namespace], int | None]:
    """A command whose implementation lives in ``module:function`` and is imported when it runs."""
    return lambda args: _import(target)(args)


COMMANDS: dict[str, Command] = {
    "score": Command("score images with a reward model, per rubric dimension", _score_args, _score),
    "make-tiny": Command("write a tiny offline VLM to try the commands on", _make_tiny_args, _make_tiny),
    "validate-data": Command(
        "check record files and count their same-prompt pairs", _validate_args, _validate
    ),
    "train-reward": Command(
        "train a reward model: gdso | grpo (teacher), risd (student), sft | rewarddance | opd (baselines)",
        _recipe_args,
        recipe("zr_diffusion.reward.config:TrainRewardConfig", "zr_diffusion.reward.train:train_reward"),
    ),
    "eval-reward": Command(
        "evaluate a reward model: PLCC, SRCC, HPA, margin HPA, tokens per call, images/s",
        _recipe_args,
        recipe("zr_diffusion.reward.config:EvalRewardConfig", "zr_diffusion.reward.evaluate:evaluate_reward"),
    ),
    "gsb": Command(
        "turn a person's answers from the review page into GSB",
        _gsb_args,
        lazy("zr_diffusion.pipelines.gsb:cli_run"),
    ),
    "finetune-t2i": Command(
        "LoRA-tune a diffusers pipeline with the differentiable Z-Reward (reward gradients)",
        _recipe_args,
        recipe(
            "zr_diffusion.pipelines.config:FinetuneT2IConfig",
            "zr_diffusion.pipelines.reward_finetune:finetune_t2i",
        ),
    ),
    "train-t2i-sft": Command(
        "LoRA-tune a diffusers pipeline with the denoising loss on (prompt, image) records",
        _recipe_args,
        recipe("zr_diffusion.pipelines.config:SFTT2IConfig", "zr_diffusion.pipelines.sft:train_t2i_sft"),
    ),
    "eval-t2i": Command(
        "GSB of two generators (base or LoRA A vs LoRA B) with a judge; writes the review page",
        _recipe_args,
        recipe("zr_diffusion.pipelines.config:EvalT2IConfig", "zr_diffusion.pipelines.evaluate:evaluate_t2i"),
    ),
    "export": Command(
        "fuse LoRAs into a shippable diffusers pipeline folder (or one LoRA) with a model card",
        _export_args,
        lazy("zr_diffusion.pipelines.export:cli_run"),
    ),
    "sample": Command(
        "images of a pipeline (plus LoRAs) per prompt and seed, for annotation; resumable",
        _sample_args,
        lazy("zr_diffusion.sample:cli_run"),
    ),
    "annotate": Command(
        "write the HTML page where people score sampled images per rubric dimension, or import its answers",
        _annotate_args,
        lazy("zr_diffusion.annotate:cli_run"),
    ),
    "make-tiny-t2i": Command(
        "write a tiny offline diffusers pipeline to try the t2i commands on",
        _make_tiny_t2i_args,
        _make_tiny_t2i,
    ),
    "demo": Command(
        "run the whole method end to end on this CPU in the synthetic world (runs/demo/report.md)",
        lambda p: [
            p.add_argument("--preset", default="default", choices=("default", "smoke")),
            p.add_argument("--config", help="demo YAML file to use instead of configs/demo/<preset>.yaml"),
            p.add_argument("--fresh", action="store_true", help="rebuild every stage, cached or not"),
            p.add_argument(
                "--seeds",
                help="a study: comma-separated seeds (e.g. 0,1,2), one world each in <output_dir>/seed-<k>, "
                "then <output_dir>/study.md",
            ),
            p.add_argument(
                "--jobs",
                type=int,
                default=1,
                help="with --seeds: run this many seeds at once, each in its own process with "
                "threads // jobs torch threads (default 1: one after another)",
            ),
            p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="e.g. seed=1"),
        ],
        lazy("zr_diffusion.synthetic.demo:cli_run"),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zr", description="zr-diffusion: Z-Reward training and reward-gradient t2i tuning"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from zr_diffusion.config import ConfigError
    from zr_diffusion.data import DataError

    ok = False
    try:
        code = int(args._run(args) or 0)
        ok = True
        return code
    except (ConfigError, DataError, FileNotFoundError, ValueError, FloatingPointError) as e:
        if os.environ.get("ZR_DEBUG"):
            raise
        print(f"zr {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        _close_process_group(wait=ok)


def _close_process_group(wait: bool) -> None:
    """Under ``accelerate launch``, leave the process group cleanly: a gloo group still alive at
    interpreter exit can abort a rank ("terminate called without an active exception") after its
    work is done. ``wait``: all ranks finished, so meet at a barrier first."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    if wait:
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
