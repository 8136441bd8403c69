"""RISD: Reasoning-Internalized Score Distillation (METHOD.md §3, Eq. 15).

The trained teacher is frozen. For each record it generates ``distill.teacher_rollouts`` (R)
reasonings, reads ``q_T`` after each score marker and averages them; the student learns
``KL(q_T ‖ q_φ)`` at its score position right after the prompt (no reasoning tokens).

Teacher targets are computed once and cached on disk **(ours)**: ``<cache_dir>/<key>/`` holds
``index.json`` (teacher, teacher fingerprint, rollout settings, and which shard file holds each
record) and ``targets-*.safetensors`` shards (``probs [n, S]``, ``tokens [n]``), every file written
atomically. ``key`` hashes the teacher fingerprint (its config and weight files' names, sizes and
modification times, or the hub snapshot's commit) with the rollout settings; a record is keyed by
its id, prompt, dimension and image bytes. A rerun loads what is cached and computes only what is
missing (the teacher is not even loaded when nothing is). Under several processes each process
computes a contiguous share of the missing records and writes its own shard; the main process then
updates the index.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from zr_diffusion.data import ScoredRecord
from zr_diffusion.io import atomic_save_safetensors, atomic_write_json
from zr_diffusion.reward.loop import TrainResult, fingerprint, run_training
from zr_diffusion.reward.losses import risd_loss
from zr_diffusion.reward.policy import load_frozen, setup_policy
from zr_diffusion.reward.records import load_eval_records, load_train_records
from zr_diffusion.reward.scoring import hpa_eval_fn, student_score_logits
from zr_diffusion.scores import expected_score, score_distribution
from zr_diffusion.training import make_accelerator, seed_step

CACHE_VERSION = 2  # 2: q read after the marker's trailing space (where the digit is written)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def teacher_fingerprint(path_or_id: str) -> dict:
    """What identifies a teacher checkpoint without reading its weights.

    Local folder: hash of ``config.json`` plus each weight file's name, size and mtime. Hub id: the
    cached snapshot's commit (offline lookup); an id that is not cached is an error.
    """
    folder = Path(path_or_id)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(str(path_or_id), local_files_only=True))
        except Exception as e:  # not cached / offline: say what to do
            raise FileNotFoundError(
                f"distill.teacher {path_or_id!r} is neither a folder nor a cached hub model ({e})"
            ) from None
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"distill.teacher {folder} has no config.json")
    files = []
    for f in sorted(folder.iterdir()):
        if f.suffix in _WEIGHT_SUFFIXES or f.name.endswith(".index.json"):
            st = f.stat()
            files.append([f.name, st.st_size, st.st_mtime_ns])
    if not files:
        raise FileNotFoundError(f"distill.teacher {folder} has no weight files")
    return {
        "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest(),
        "weights": files,
        "snapshot": folder.name,
    }


def record_key(rec: ScoredRecord) -> str:
    """Cache key of one record: id, prompt, dimension and the image's bytes."""
    image = hashlib.sha1(Path(rec.image).read_bytes()).hexdigest()
    return fingerprint(rec.id, rec.prompt, rec.dimension, image)


class CachedTargets(NamedTuple):
    probs: torch.Tensor  # [N, S] teacher q_T per record, averaged over R rollouts
    tokens: torch.Tensor  # [N] mean generated tokens per rollout
    cached: int  # how many were found in the cache
    folder: Path


def _cache_folder(cfg, teacher_fp: dict) -> tuple[Path, dict]:
    settings = {
        "version": CACHE_VERSION,
        "teacher_rollouts": cfg.distill.teacher_rollouts,
        "max_new_tokens": cfg.rollout.max_new_tokens,
        "temperature": cfg.rollout.temperature,
        "top_p": cfg.rollout.top_p,
        "top_k": cfg.rollout.top_k,
        "enable_thinking": cfg.enable_thinking,
        "grid": [cfg.grid.s_min, cfg.grid.s_max, cfg.grid.step, list(cfg.grid.tokens)],
        "dtype": cfg.dtype,
        "seed": cfg.run.seed,
    }
    root = Path(cfg.distill.cache_dir or Path(cfg.run.output_dir) / "teacher_cache")
    return root / fingerprint(teacher_fp, settings), settings


def _read_index(folder: Path) -> dict:
    path = folder / "index.json"
    return json.loads(path.read_text()) if path.is_file() else {"shards": []}


def _load_entries(folder: Path, index: dict) -> dict[str, tuple[torch.Tensor, float]]:
    from safetensors.torch import load_file

    entries = {}
    for shard in index["shards"]:
        tensors = load_file(str(folder / shard["file"]))
        for k, key in enumerate(shard["keys"]):
            entries[key] = (tensors["probs"][k], float(tensors["tokens"][k]))
    return entries


def _compute(
    cfg, records: Sequence[ScoredRecord], device, rank: int, log
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher targets ``([n, S], [n])`` for ``records``: R rollouts each, q averaged."""
    from zr_diffusion.reward.scoring import group_images
    from zr_diffusion.vlm.reasoning import generate_reasoning

    teacher = load_frozen(cfg.distill.teacher, cfg, device)
    batch = cfg.distill.teacher_batch_size
    probs = torch.zeros(len(records), teacher.grid.num_bins)
    tokens = torch.zeros(len(records))
    tic = time.perf_counter()
    for b, start in enumerate(range(0, len(records), batch)):
        seed_step(cfg.run.seed, 1_000_000 + b, rank)  # rollouts reproducible per (seed, batch, rank)
        chunk = list(range(start, min(start + batch, len(records))))
        recs = [records[i] for i in chunk]
        for group in group_images(recs, teacher.device):
            features = teacher.encode_images(group.images)
            samples = generate_reasoning(
                teacher,
                features.select(group.image_index),
                [recs[p].prompt for p in group.positions],
                [recs[p].dimension for p in group.positions],
                num_samples=cfg.distill.teacher_rollouts,
                temperature=cfg.rollout.temperature,
                top_p=cfg.rollout.top_p,
                top_k=cfg.rollout.top_k,
                max_new_tokens=cfg.rollout.max_new_tokens,
            )  # [B][R]
            for p, outs in zip(group.positions, samples):
                probs[chunk[p]] = torch.stack([s.probs.float().cpu() for s in outs]).mean(0)
                tokens[chunk[p]] = sum(s.num_generated_tokens for s in outs) / len(outs)
        log(
            f"teacher targets: {min(start + batch, len(records))}/{len(records)} ({time.perf_counter() - tic:.0f}s)"
        )
    del teacher
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return probs, tokens


def teacher_targets(cfg, records: Sequence[ScoredRecord], accelerator) -> CachedTargets:
    """The teacher's q_T of every record, from the cache or computed (and cached) once."""
    teacher_fp = teacher_fingerprint(cfg.distill.teacher)
    folder, settings = _cache_folder(cfg, teacher_fp)
    keys = [record_key(r) for r in records]
    entries = _load_entries(folder, _read_index(folder))
    missing = [i for i, k in enumerate(keys) if k not in entries]
    cached = len(records) - len(missing)
    if not missing:
        accelerator.print(
            f"teacher cache: reusing {cached} cached teacher targets from {folder} (teacher not loaded)"
        )
    else:
        accelerator.print(
            f"teacher cache: {cached} of {len(records)} targets cached in {folder}; computing "
            f"{len(missing)} with {cfg.distill.teacher_rollouts} rollout(s) each"
        )
        world, rank = accelerator.num_processes, accelerator.process_index
        per = -(-len(missing) // world)
        mine = missing[rank * per : (rank + 1) * per]
        if mine:
            probs, tokens = _compute(
                cfg, [records[i] for i in mine], accelerator.device, rank, accelerator.print
            )
            name = f"targets-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-rank{rank}.safetensors"
            atomic_save_safetensors(
                {"probs": probs, "tokens": tokens},
                folder / name,
                {"keys": json.dumps([keys[i] for i in mine])},
            )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            from safetensors import safe_open

            index = _read_index(folder)
            listed = {s["file"] for s in index["shards"]}
            for f in sorted(folder.glob("targets-*.safetensors")):
                if f.name not in listed:
                    with safe_open(str(f), "pt") as h:
                        index["shards"].append({"file": f.name, "keys": json.loads(h.metadata()["keys"])})
            index.update(teacher=str(cfg.distill.teacher), teacher_fingerprint=teacher_fp, settings=settings)
            atomic_write_json(folder / "index.json", index)
        accelerator.wait_for_everyone()
        entries = _load_entries(folder, _read_index(folder))
        still = [records[i].source for i, k in enumerate(keys) if k not in entries]
        if still:
            raise RuntimeError(f"teacher cache {folder}: targets missing after the build for {still[:5]}")
    probs = torch.stack([entries[k][0] for k in keys]).float()  # [N, S]
    tokens = torch.tensor([entries[k][1] for k in keys])
    return CachedTargets(probs, tokens, cached, folder)


def train_risd(cfg) -> TrainResult:
    accelerator = make_accelerator(cfg.run)
    records = load_train_records(cfg)
    eval_records = load_eval_records(cfg)
    targets = teacher_targets(cfg, records, accelerator)  # before the student: the teacher is freed
    policy = setup_policy(cfg, accelerator)
    bins = cfg.grid.build().values()
    if targets.probs.shape[-1] != len(bins):
        raise ValueError(
            f"teacher targets have {targets.probs.shape[-1]} bins but the grid has {len(bins)}; "
            f"clear {targets.folder} or fix grid"
        )

    def step_fn(step: int, batch: list[int]) -> dict[str, torch.Tensor]:
        logits = student_score_logits(policy.scorer, [records[i] for i in batch])  # [B, S]
        q_t = targets.probs[batch].to(logits.device)  # [B, S]
        loss = risd_loss(q_t, logits)
        with torch.no_grad():
            mu_s = expected_score(score_distribution(logits), bins)  # [B]
            mu_t = expected_score(q_t, bins)
        return {"loss": loss, "mu_abs_diff": (mu_s - mu_t).abs().mean()}

    eval_fn = hpa_eval_fn(eval_records, cfg.data.dimensions, cfg.eval_batch_size)
    return run_training(cfg, accelerator, policy, step_fn, eval_fn, num_examples=len(records))


__all__ = ["CachedTargets", "record_key", "teacher_fingerprint", "teacher_targets", "train_risd"]
