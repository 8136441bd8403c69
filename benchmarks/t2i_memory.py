"""Graph memory and step time of the differentiable sampler against the number of denoising steps T.

One reward-gradient step (sample, stand-in reward = mean brightness, backward) on a tiny SD pipeline of
the real classes, for T in {10, 20, 40} and four gradient settings:

- ``K=1``        DRaFT-1: no-grad to the last step, one step with a graph
- ``full``       backprop through all T steps
- ``+ckpt``      the same with every denoiser call and the VAE decode gradient-checkpointed

Measured, all in one run, as ratios to T=10 K=1 (no checkpointing):

- ``graph``: bytes of the distinct non-parameter tensors autograd saves for backward during the forward
  (``SavedTensorMeter``, via ``torch.autograd.graph.saved_tensors_hooks``; checkpointed calls count
  only the inputs they keep): what the graph holds between forward and backward, on every device.
  With checkpointing, backward also recomputes one call at a time, a transient of about one call's
  activations that this count does not see; ``peak`` does.
- ``peak``: ``torch.cuda.max_memory_allocated`` over forward + backward (CUDA only).
- ``time``: seconds of forward + backward, best of ``--repeats``: wall clock on CUDA (synchronised);
  on CPU the process's CPU time with ``--threads`` (default 1) torch threads, which other processes
  on a shared machine disturb far less than wall clock does.

    python benchmarks/t2i_memory.py                 # CPU, about a minute
    python benchmarks/t2i_memory.py --device cuda --size 128 --channels 64
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass

import diffusers
import torch
import transformers

from zr_diffusion.pipelines.adapters import load_adapter
from zr_diffusion.pipelines.memory import SavedTensorMeter
from zr_diffusion.pipelines.sampler import SamplerConfig, sample
from zr_diffusion.pipelines.tiny import make_tiny_t2i

PROMPTS = ["a red cube"]
SETTINGS = ("K=1", "K=1+ckpt", "full", "full+ckpt")


@dataclass
class Measurement:
    steps: int
    setting: str
    graph_bytes: int
    peak_bytes: int | None
    seconds: float


def _config(setting: str, steps: int, size: int) -> SamplerConfig:
    ckpt = setting.endswith("+ckpt")
    k = 1 if setting.startswith("K=1") else steps
    return SamplerConfig(
        num_steps=steps,
        guidance_scale=7.5,
        height=size,
        width=size,
        mode="draft",
        draft_k=k,
        denoiser_checkpoint="call" if ckpt else "none",
        checkpoint_decoder=ckpt,
    )


def _measure_once(
    adapter, config: SamplerConfig, params: list[torch.Tensor]
) -> tuple[int, int | None, float]:
    device = adapter.device
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    start = clock()
    with SavedTensorMeter(exclude=params) as meter:
        images = sample(adapter, PROMPTS, config, seed=0).images  # [B, 3, H, W]
    (-images.mean()).backward()
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    return meter.bytes, peak, clock() - start


def run(
    device: str, size: int, channels: int, steps: list[int], repeats: int
) -> tuple[list[Measurement], int]:
    """Measure every setting and T on one tiny SD pipeline; also return its parameter bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        adapter = load_adapter(make_tiny_t2i(tmp, "sd", sample_size=size, channels=channels), device=device)
    adapter.add_lora(rank=4)
    params = [
        p for m in adapter.pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters()
    ]
    _measure_once(adapter, _config("K=1", 2, size), params)  # warm-up (allocator, kernels)
    results = []
    for setting in SETTINGS:
        for T in steps:
            runs = [_measure_once(adapter, _config(setting, T, size), params) for _ in range(repeats)]
            graph, peak, _ = runs[0]
            results.append(Measurement(T, setting, graph, peak, min(r[2] for r in runs)))
            adapter.denoiser.zero_grad(set_to_none=True)
    return results, sum(p.numel() * p.element_size() for p in params)


def report(results: list[Measurement]) -> str:
    base = next(r for r in results if r.setting == "K=1" and r.steps == min(x.steps for x in results))
    mb = 2**20
    lines = [
        f"{'T':>4} {'grad':>9} {'graph MiB':>10} {'x':>6} {'peak MiB':>9} {'x':>6} {'time s':>7} {'x':>6}"
    ]
    for r in results:
        peak = (
            f"{r.peak_bytes / mb:9.1f} {r.peak_bytes / base.peak_bytes:6.3g}"
            if r.peak_bytes
            else f"{'-':>9} {'-':>6}"
        )
        lines.append(
            f"{r.steps:>4} {r.setting:>9} {r.graph_bytes / mb:10.2f} {r.graph_bytes / base.graph_bytes:6.3g} "
            f"{peak} {r.seconds:7.2f} {r.seconds / base.seconds:6.3g}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (latents are size / 2)")
    parser.add_argument("--channels", type=int, default=32, help="tiny UNet / VAE width")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs only)")
    parser.add_argument("--repeats", type=int, default=2, help="time is the best of this many runs")
    args = parser.parse_args()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results, param_bytes = run(args.device, args.size, args.channels, sorted(args.steps), args.repeats)
    print(
        f"tiny SD {args.size}px, channels {args.channels}, device {args.device}, batch {len(PROMPTS)}, CFG on, "
        f"parameters {param_bytes / 2**20:.1f} MiB"
    )
    clock = "wall clock" if args.device.startswith("cuda") else "process CPU time"
    print(f"ratios (x) relative to the smallest T with K=1 (no checkpointing); time = {clock}")
    print(report(results))


if __name__ == "__main__":
    main()
