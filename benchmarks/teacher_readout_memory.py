"""Memory of the teacher readout at the real vocabulary size: full logits vs chunked LM head.

The readout needs, at each of K output positions of N sequences, one token's log-prob (and at the
score position the S score-token logits). Two paths, forward + backward of ``sum(log-probs)``
through a random-init LM head ``[V, H]`` (V = 151,657, Qwen2/2.5/3-VL's vocabulary):

- ``full``:    ``lm_head(hidden)`` over all positions, fp32 logits ``[N, K, V]``, logsumexp, gather
               (the readout before issue 11);
- ``chunked``: :func:`zr_diffusion.vlm.logprobs.selected_logits`, ``--chunk`` positions per LM-head
               call, each chunk checkpointed (what ``VLMScorer.suffix_readout`` does now).

Measured in one run (chunked first, so the full path's freed pages cannot lower its own peak):

- ``saved``: bytes autograd keeps for backward (``SavedTensorMeter``, the LM head weight excluded);
- ``peak``:  the rise of the process's resident memory over forward + backward above what it held
             before (RSS sampled every millisecond on CPU; ``torch.cuda.max_memory_allocated`` on CUDA);
- ``time``:  wall-clock seconds of forward + backward.

The log-probs and the gradients of both paths are compared, and the full path's logits bytes are
extrapolated to the configuration ``configs/reward/gdso.yaml`` describes (16 sequences, 769 positions).

    python benchmarks/teacher_readout_memory.py                # CPU, N=2, about half a minute
    python benchmarks/teacher_readout_memory.py --sequences 16 --device cuda
"""

from __future__ import annotations

import argparse
import gc
import os
import threading
import time

import torch

from zr_diffusion.pipelines.memory import SavedTensorMeter
from zr_diffusion.vlm.logprobs import selected_logits

QWEN_VOCAB = 151_657


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Highest resident set size while active, sampled by a background thread."""

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def rise(self) -> int:
        return self.peak - self.base


def full_path(head, hidden, ids):
    logits = head(hidden).float()  # [N, K, V]
    return logits.gather(-1, ids).squeeze(-1) - torch.logsumexp(logits, -1)  # [N, K]


def chunked_path(chunk: int):
    def run(head, hidden, ids):
        z, lse = selected_logits(head, hidden, ids, chunk_size=chunk)
        return z.squeeze(-1) - lse  # [N, K]

    return run


def measure(fn, head, hidden, ids, device: str) -> dict:
    head.zero_grad(set_to_none=True)
    hidden.grad = None
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with PeakRSS() as rss:
        with SavedTensorMeter(head.parameters()) as saved:
            logprobs = fn(head, hidden, ids)
        logprobs.sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else rss.rise
    out = {"saved": saved.bytes, "peak": peak, "time": seconds, "logprobs": logprobs.detach()}
    out["grads"] = (hidden.grad.clone(), head.weight.grad.clone())
    del logprobs
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=2, help="N sequences (gdso.yaml: 16)")
    parser.add_argument("--positions", type=int, default=769, help="K output positions (gdso.yaml: 769)")
    parser.add_argument("--vocab", type=int, default=QWEN_VOCAB)
    parser.add_argument("--hidden", type=int, default=256, help="H; the logits' size does not depend on it")
    parser.add_argument("--chunk", type=int, default=256, help="positions per LM-head call")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, k, v = args.sequences, args.positions, args.vocab
    head = torch.nn.Linear(args.hidden, v, bias=False).to(args.device)
    hidden = torch.randn(n, k, args.hidden, device=args.device, requires_grad=True)
    ids = torch.randint(0, v, (n, k, 1), device=args.device)

    chunked = measure(chunked_path(args.chunk), head, hidden, ids, args.device)
    full = measure(full_path, head, hidden, ids, args.device)

    mib = 2**20
    print(f"teacher readout, N={n} sequences x K={k} positions, V={v:,}, H={args.hidden}, {args.device}")
    print(f"{'path':<10}{'saved MiB':>12}{'peak MiB':>12}{'seconds':>10}")
    for name, r in (("full", full), ("chunked", chunked)):
        print(f"{name:<10}{r['saved'] / mib:>12.1f}{r['peak'] / mib:>12.1f}{r['time']:>10.2f}")
    print(
        f"ratio full/chunked: saved {full['saved'] / max(chunked['saved'], 1):.0f}x, "
        f"peak {full['peak'] / max(chunked['peak'], 1):.1f}x, time {full['time'] / chunked['time']:.2f}x"
    )
    diff = (full["logprobs"] - chunked["logprobs"]).abs().max().item()
    gdiff = max((a - b).abs().max().item() for a, b in zip(full["grads"], chunked["grads"]))
    print(f"max |difference|: log-probs {diff:.2e}, gradients {gdiff:.2e}")
    logits_16 = 16 * 769 * v * 4
    print(
        f"full fp32 logits at gdso.yaml's 16 x 769 positions: {logits_16 / 2**30:.2f} GiB (twice that with "
        f"their gradient); chunked: {args.chunk} x {v:,} x 4 = {args.chunk * v * 4 / mib:.0f} MiB per chunk"
    )


if __name__ == "__main__":
    main()
