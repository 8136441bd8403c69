"""Seconds and peak memory of one reward-gradient step (sample, decode, Z-Reward, backward) at real sizes.

Every setting is measured in one run, interleaved over ``--repeats`` rounds (best of), and given as a ratio
to the plain loop, so that a shared machine's load cancels out of the ratios:

- ``plain``   the baseline loop: the pipeline's own denoising (``pipe(...)``) under ``no_grad`` for T-1 steps,
              one step with grad in one checkpoint, a checkpointed decode, the reward, backward (SD family);
- ``call``    the sampler's defaults (whole-call checkpoint, checkpointed decode);
- ``blocks``  diffusers' per-block checkpointing in the window; ``none``: no denoiser recompute;
- ``img-dec`` decode (and checkpoint) one image at a time; ``vlm-ckpt``: the reward VLM's layers checkpointed;
- ``budget``  the reward reads images at ``--reward-pixels`` (changes what is scored, so no gradient check);
- ``ch-last`` denoiser and VAE in channels-last; ``compile``: ``torch.compile`` of the denoiser (``--compile``);
- ``fast``    K=1 without any recompute (``none``, decode not checkpointed): the speed setting;
- ``bf16-pre`` ``fast`` with the no-grad prefix under bfloat16 autocast (``prefix_dtype``): meant for GPUs; it
              changes the sample a little, so its ``grad Δ`` is a difference, not a check;
- ``lean``    every memory option at once (``blocks``, ``img-dec``, ``vlm-ckpt``).

``K=1`` is DRaFT-1; ``full`` backpropagates through all T steps. ``grad Δ`` is max |g - g_ref| / max |g_ref|
over the LoRA gradients, ref = ``plain`` (K=1) or ``call`` (full). Time: wall clock on CUDA; on CPU the process CPU time (less disturbed by other
processes). Peak: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak RSS (``VmHWM`` of
``/proc/self/status``, reset through ``/proc/self/clear_refs`` before each step). ``step`` is the peak
minus what was held before the step (weights and caches).

    python benchmarks/reward_step.py --size tiny|medium|sd15 [--device cuda]
    python benchmarks/reward_step.py --size sdxl --device cuda --reward qwen2_vl_2b
"""

from __future__ import annotations

import argparse
import ctypes
import json
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import diffusers
import torch
import transformers
from arch import build_reward, build_t2i, parameter_count
from torch.utils.checkpoint import checkpoint

from zr_diffusion.pipelines.sampler import SamplerConfig, sample

PROMPTS = ["a red cube on a blue table", "two cats under a tree"]


@dataclass(frozen=True)
class Size:
    t2i: str  # configs/arch name, or "tiny"
    reward: dict  # device type -> reward arch name, or "tiny"
    pixels: dict  # device type -> (image side, T)
    batch: dict  # device type -> prompts per step
    guidance: float
    dtype: str  # on CUDA: the shipped config's dtype


SIZES = {
    "tiny": Size(
        "tiny",
        {"cpu": "tiny", "cuda": "tiny"},
        {"cpu": (32, 4), "cuda": (32, 4)},
        {"cpu": 2, "cuda": 2},
        7.5,
        "float32",
    ),
    "medium": Size(
        "medium",
        {"cpu": "qwen2_vl_medium", "cuda": "qwen2_vl_medium"},
        {"cpu": (128, 10), "cuda": (128, 10)},
        {"cpu": 2, "cuda": 2},
        7.5,
        "float32",
    ),
    "sd15": Size(
        "sd15",
        {"cpu": "qwen2_vl_medium", "cuda": "qwen2_vl_2b"},
        {"cpu": (256, 4), "cuda": (512, 20)},
        {"cpu": 1, "cuda": 2},
        7.5,
        "float16",
    ),
    "sdxl": Size("sdxl", {"cuda": "qwen2_vl_2b"}, {"cuda": (1024, 10)}, {"cuda": 1}, 5.0, "bfloat16"),
    "flux": Size("flux1", {"cuda": "qwen2_vl_2b"}, {"cuda": (1024, 10)}, {"cuda": 1}, 3.5, "bfloat16"),
    "zimage": Size("zimage", {"cuda": "qwen2_vl_2b"}, {"cuda": (1024, 10)}, {"cuda": 1}, 4.0, "bfloat16"),
}
SETTINGS = (
    "plain",
    "call",
    "blocks",
    "none",
    "img-dec",
    "vlm-ckpt",
    "budget",
    "ch-last",
    "compile",
    "fast",
    "bf16-pre",
    "lean",
)


@dataclass
class Result:
    label: str
    size: str
    setting: str
    grad: str  # "K=1" | "full"
    seconds: float
    peak_bytes: int
    step_bytes: int
    grad_delta: float | None
    batch: int
    pixels: int
    steps: int
    error: str | None = None  # why the setting did not run (out of memory, ...)


# ---------------------------------------------------------------- memory


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak(device: torch.device) -> int:
    """Reset the peak counter; return what is held now (bytes)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS is what is held
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    return _rss_kib("VmRSS") * 1024


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _rss_kib("VmHWM") * 1024


# ---------------------------------------------------------------- one step


def plain_images(adapter, prompts: list[str], config: SamplerConfig) -> torch.Tensor:
    """The baseline: ``pipe(...)`` for T-1 no-grad steps, then one checkpointed grad step and decode."""
    T = config.num_steps

    def stop_before_last(pipe, i, t, kwargs):
        if i == T - 2:
            pipe._interrupt = True  # the pipelines' own early stop: later steps are skipped
        return kwargs

    with torch.no_grad():
        x = adapter.pipe(
            prompts,
            num_inference_steps=T,
            guidance_scale=config.guidance_scale,
            height=config.height,
            width=config.width,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            callback_on_step_end=stop_before_last if T > 1 else None,
        ).images.float()  # [B, C, h, w] after T-1 steps
    cond = adapter.encode_prompts(prompts, guidance_scale=config.guidance_scale)
    adapter.set_timesteps(T, config.height, config.width)
    x = checkpoint(lambda z: adapter.denoise(z, T - 1, cond).prev_latents, x, use_reentrant=False)
    return checkpoint(adapter.decode, x, use_reentrant=False)


def reward_step(adapter, reward, prompts: list[str], config: SamplerConfig, plain: bool) -> None:
    images = (
        plain_images(adapter, prompts, config) if plain else sample(adapter, prompts, config, seed=0).images
    )
    loss = -reward(images, prompts).reward.mean()
    loss.backward()


def measure(adapter, reward, prompts, config, plain: bool) -> tuple[float, int, int, torch.Tensor]:
    device = adapter.device
    for p in adapter.lora_parameters():
        p.grad = None
    held = _reset_peak(device)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    start = clock()
    reward_step(adapter, reward, prompts, config, plain)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = clock() - start
    peak = _peak(device)
    grads = torch.cat([p.grad.detach().flatten().float().cpu() for p in adapter.lora_parameters()])
    return seconds, peak, peak - held, grads


# ---------------------------------------------------------------- models


def _measure_setting(adapter, reward, prompts, cfg: SamplerConfig, setting: str) -> list | str:
    """Measure one setting; a failure (out of memory, a compiler error) is returned as its message."""
    if setting == "ch-last":
        adapter.denoiser.to(memory_format=torch.channels_last)
        adapter.vae.to(memory_format=torch.channels_last)
    if setting == "compile":
        adapter.denoiser.compile()
    try:
        return list(measure(adapter, reward, prompts, cfg, setting == "plain"))
    except Exception as error:  # noqa: BLE001 - one setting's failure must not lose the others
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}"
    finally:
        if setting == "ch-last":
            adapter.denoiser.to(memory_format=torch.contiguous_format)
            adapter.vae.to(memory_format=torch.contiguous_format)
        if setting == "compile":
            adapter.denoiser._compiled_call_impl = None  # back to eager for the other settings
        if adapter.device.type == "cuda":
            torch.cuda.empty_cache()


def build(size: Size, device: str, dtype: torch.dtype, tmp: str, reward_name: str | None, **reward_kw):
    from zr_diffusion.pipelines.adapters import load_adapter
    from zr_diffusion.pipelines.tiny import make_tiny_t2i
    from zr_diffusion.reward.model import ZRewardModel
    from zr_diffusion.vlm.tiny import make_tiny_vlm

    kind = torch.device(device).type
    if size.t2i == "tiny":
        adapter = load_adapter(make_tiny_t2i(Path(tmp) / "t2i", "sd", sample_size=32), device=device)
    else:
        adapter = build_t2i(size.t2i, dtype=dtype, device=device)
    name = reward_name or size.reward[kind]
    if name == "tiny":
        path = Path(tmp) / "vlm"
        if not path.exists():
            make_tiny_vlm(path, "qwen2_vl")
        reward = ZRewardModel.from_pretrained(path, device=device, **reward_kw)
    else:
        reward = build_reward(name, dtype=dtype, device=device, **reward_kw)
    return adapter, reward


def _settings(requested: list[str], family: str, compile_: bool) -> list[str]:
    out = [s for s in requested if s in SETTINGS]
    if family != "sd":
        out = [s for s in out if s != "plain"]  # the baseline uses the SD pipeline's own loop
    if not compile_:
        out = [s for s in out if s != "compile"]
    return out


def _config(setting: str, base: SamplerConfig, full: bool) -> SamplerConfig:
    k = base.num_steps if full else 1
    c = replace(base, draft_k=k)
    if setting == "blocks":
        c = replace(c, denoiser_checkpoint="blocks")
    elif setting == "none":
        c = replace(c, denoiser_checkpoint="none")
    elif setting == "img-dec":
        c = replace(c, decode_per_image=True)
    elif setting == "lean":
        c = replace(c, denoiser_checkpoint="blocks", decode_per_image=True)
    elif setting in ("fast", "bf16-pre"):
        c = replace(c, denoiser_checkpoint="none", checkpoint_decoder=False)
        c = replace(c, prefix_dtype="bfloat16") if setting == "bf16-pre" else c
    return c


def _measure_jobs(adapter, reward, extra, prompts, base, jobs, repeats) -> tuple[dict, dict]:
    """Best-of-``repeats`` measurements of every (setting, grad) job, interleaved; and the failed jobs."""
    best: dict[tuple[str, str], list] = {}
    failed: dict[tuple[str, str], str] = {}
    for _ in range(repeats):
        for setting, g in jobs:
            if (setting, g) in failed:
                continue
            cfg = _config(setting, base, g == "full")
            out = _measure_setting(adapter, extra.get(setting, reward), prompts, cfg, setting)
            if isinstance(out, str):
                failed[(setting, g)] = out
            elif (setting, g) not in best or out[0] < best[(setting, g)][0]:
                best[(setting, g)] = out
    return best, failed


def _results(best: dict, failed: dict, common: dict) -> list[Result]:
    refs = {g: best.get(("plain", g)) or best.get(("call", g)) for g in ("K=1", "full")}
    out = []
    for (setting, g), (sec, peak, step, grad) in best.items():
        delta = None
        if setting != "budget" and refs[g] is not None:  # bf16-pre: a measured difference
            delta = float((grad - refs[g][3]).abs().max() / refs[g][3].abs().max())
        out.append(
            Result(
                setting=setting,
                grad=g,
                seconds=sec,
                peak_bytes=peak,
                step_bytes=step,
                grad_delta=delta,
                **common,
            )
        )
    for (setting, g), error in failed.items():
        out.append(
            Result(
                setting=setting,
                grad=g,
                seconds=0.0,
                peak_bytes=0,
                step_bytes=0,
                grad_delta=None,
                error=error,
                **common,
            )
        )
    return out


def run(args) -> tuple[list[Result], str]:
    size = SIZES[args.size]
    kind = torch.device(args.device).type
    if kind not in size.pixels:
        raise SystemExit(
            f"--size {args.size} is GPU-only (its sizes are set for {list(size.pixels)}); add --device cuda"
        )
    px, T = size.pixels[kind]
    px, T = args.pixels or px, args.steps or T
    if "plain" in args.settings and T < 2:
        raise SystemExit(f"the plain loop needs T >= 2 (T-1 no-grad steps before the grad step), got T={T}")
    batches = args.batch or [size.batch[kind]]
    dtype = getattr(torch, args.dtype or ("float32" if kind == "cpu" else size.dtype))
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        adapter, reward = build(size, args.device, dtype, tmp, args.reward)
        adapter.add_lora(rank=4)
        for p in adapter.lora_parameters():  # non-zero LoRA B so every LoRA weight gets a gradient
            torch.nn.init.normal_(p, std=0.02)
        extra = {}
        settings = _settings(args.settings, adapter.family, args.compile)
        if {"vlm-ckpt", "lean"} & set(settings):
            ckpt_reward = build(size, args.device, dtype, tmp, args.reward, checkpoint_layers=True)[1]
            extra["vlm-ckpt"] = extra["lean"] = ckpt_reward
        if "budget" in settings:
            extra["budget"] = build(
                size, args.device, dtype, tmp, args.reward, max_pixels=args.reward_pixels
            )[1]
        header = (
            f"{args.size}: {adapter.family} denoiser {parameter_count([adapter.denoiser]) / 1e6:.1f}M, "
            f"VAE {parameter_count([adapter.vae]) / 1e6:.1f}M, reward VLM {parameter_count([reward.vlm]) / 1e6:.1f}M "
            f"({args.reward or size.reward[kind]}); {px} px, T={T}, batch {' / '.join(map(str, batches))}, {args.dtype or dtype}, "
            f"device {args.device}, LoRA rank 4"
        )
        base = SamplerConfig(num_steps=T, guidance_scale=size.guidance, height=px, width=px)
        jobs = [(s, "K=1") for s in settings] + [(s, "full") for s in settings if s in args.full_settings]
        reward_step(adapter, reward, PROMPTS[:1], replace(base, num_steps=min(T, 2)), False)  # warm-up
        for batch in batches:
            prompts = (PROMPTS * batch)[:batch]
            best, failed = _measure_jobs(adapter, reward, extra, prompts, base, jobs, args.repeats)
            common = dict(label=args.label or args.size, size=args.size, batch=batch, pixels=px, steps=T)
            results += _results(best, failed, common)
    return results, header


def report(results: list[Result], device: str) -> str:
    """One table per batch size, ratios to its plain loop (or ``call``) with K=1."""
    return "\n".join(
        _table([r for r in results if r.batch == b], device) for b in sorted({r.batch for r in results})
    )


def _table(results: list[Result], device: str) -> str:
    ran = [r for r in results if r.error is None]
    failed = [f"{r.grad:>5} {r.setting:>9} failed: {r.error}" for r in results if r.error is not None]
    if not ran:
        return "\n".join(failed)
    ref = next((r for r in ran if r.setting == "plain"), None) or next(
        (r for r in ran if r.setting == "call"), ran[0]
    )
    gib = 2**30 if device.startswith("cuda") else 2**20
    unit = "GiB" if device.startswith("cuda") else "MiB"
    clock = "wall clock" if device.startswith("cuda") else "process CPU time"
    lines = [
        f"batch {ref.batch}: ratios (x) to {ref.setting} K=1; time = {clock}",
        f"{'grad':>5} {'setting':>9} {'s/step':>8} {'speed x':>8} {'peak ' + unit:>10} {'step ' + unit:>10} "
        f"{'x':>6} {'grad Δ':>8}",
    ]
    for r in ran:
        delta = "-" if r.grad_delta is None else f"{r.grad_delta:.1e}"
        lines.append(
            f"{r.grad:>5} {r.setting:>9} {r.seconds:8.3f} {ref.seconds / r.seconds:8.2f} {r.peak_bytes / gib:10.2f} "
            f"{r.step_bytes / gib:10.2f} {r.step_bytes / max(ref.step_bytes, 1):6.2f} {delta:>8}"
        )
    return "\n".join(lines + failed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), help=f"a subset of {SETTINGS}")
    parser.add_argument("--reward", default=None, help="reward arch (configs/arch) instead of the size's")
    parser.add_argument("--reward-pixels", type=int, default=None, help="the 'budget' setting's max_pixels")
    parser.add_argument("--pixels", type=int, default=None, help="image side instead of the size's")
    parser.add_argument("--steps", type=int, default=None, help="T instead of the size's")
    parser.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=None,
        help="prompts per step instead of the size's (several: each)",
    )
    parser.add_argument(
        "--dtype", default=None, help="float32 | bfloat16 | float16 (default: CPU float32, CUDA the config's)"
    )
    parser.add_argument(
        "--full-settings",
        nargs="*",
        default=["call", "blocks", "none"],
        help="settings also run with full backprop",
    )
    parser.add_argument("--label", default=None, help="name of this run in the --json lines")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile of the denoiser")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs)")
    parser.add_argument("--json", default=None, help="append one JSON line per result to this file")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.settings) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown settings {unknown}; valid: {list(SETTINGS)}")
    if "budget" in args.settings and args.reward_pixels is None:
        args.settings = [s for s in args.settings if s != "budget"]
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    results, header = run(args)
    print(header)
    print(report(results, args.device))
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps(asdict(r) | {"device": args.device}) + "\n")


if __name__ == "__main__":
    main()
