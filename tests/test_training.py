"""Shared training helpers: exact resume, checkpoint atomicity and pruning, guards, schedules."""

import pytest
import torch

from zr_diffusion.training import (
    NonFiniteLossError,
    OptimConfig,
    RunConfig,
    batch_indices,
    build_optimizer,
    build_scheduler,
    ensure_finite,
    latest_checkpoint,
    make_accelerator,
    resume_from_checkpoint,
    save_checkpoint,
    step_generator,
)


def _train(out, steps, resume=False, save_every=0):
    run = RunConfig(output_dir=str(out), seed=3, max_steps=steps, tensorboard=False, device="cpu")
    acc = make_accelerator(run)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = build_optimizer(model.parameters(), OptimConfig(lr=0.1, schedule="cosine", warmup_steps=2))
    sched = build_scheduler(opt, OptimConfig(lr=0.1, schedule="cosine", warmup_steps=2), total_steps=6)
    model, opt, sched = acc.prepare(model, opt, sched)
    data = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
    start = resume_from_checkpoint(acc, out)[0] if resume else 0
    for step in range(start, steps):
        idx = batch_indices(len(data), 3, run.seed, step)
        noise = torch.randn(3, 1, generator=step_generator(run.seed, step))
        loss = ((model(data[idx]) - noise) ** 2).mean()
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        if save_every and (step + 1) % save_every == 0:
            save_checkpoint(acc, out, step + 1, keep=2)
    return acc.unwrap_model(model).weight.detach().clone()


def test_resume_matches_uninterrupted_run(tmp_path):
    full = _train(tmp_path / "a", 6)
    _train(tmp_path / "b", 3, save_every=3)  # "interrupted" after step 3
    resumed = _train(tmp_path / "b", 6, resume=True)
    torch.testing.assert_close(resumed, full)


def test_checkpoints_are_pruned_and_complete(tmp_path):
    _train(tmp_path, 6, save_every=1)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-0000005", "step-0000006"]  # keep=2, no temporary folders left
    assert (latest_checkpoint(tmp_path) / "trainer_state.json").is_file()


def test_resume_without_checkpoint_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no checkpoint"):
        _train(tmp_path, 2, resume=True)


def test_nonfinite_loss_guard():
    ensure_finite(torch.tensor(1.0), "ok", 0)
    with pytest.raises(NonFiniteLossError, match=r"step 4: loss term 'ce'"):
        ensure_finite(torch.tensor(float("nan")), "ce", 4)


def test_batch_indices_cover_each_epoch():
    seen = sorted(i for step in range(3) for i in batch_indices(9, 3, seed=0, step=step))
    assert seen == list(range(9))
    assert batch_indices(9, 3, 0, 4) == batch_indices(9, 3, 0, 4)


def test_config_validation():
    with pytest.raises(ValueError, match="run.grad_accum must be >= 1"):
        RunConfig(grad_accum=0)
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        make_accelerator(RunConfig(mixed_precision="fp16", device="cpu", tensorboard=False))
