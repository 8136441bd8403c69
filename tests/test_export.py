"""``zr export`` on tiny pipelines of every family: fused pipeline folder, merged LoRA, model card, errors.

The exported folders are loaded in a subprocess that imports diffusers only (never zr_diffusion), and
its images are compared with the base pipeline plus the LoRAs loaded unfused by diffusers itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save_file

from zr_diffusion.cli import main
from zr_diffusion.pipelines.adapters import load_adapter
from zr_diffusion.pipelines.base import LORA_FAMILY_FILE, LORA_WEIGHT_NAME
from zr_diffusion.pipelines.tiny import make_tiny_t2i

FAMILIES = ("sd", "sdxl", "flux", "zimage")
CALL = {
    "sd": {"guidance_scale": 7.5},
    "sdxl": {"guidance_scale": 5.0},
    "flux": {"guidance_scale": 3.5, "max_sequence_length": 77},
    "zimage": {"guidance_scale": 4.0, "max_sequence_length": 77},
}
PROMPTS = ["a red cube", "a blue sky"]

# Loads each exported folder with diffusers alone and samples; proves zr_diffusion was never imported.
_LOADER = """
import json, sys
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file
jobs = json.loads(sys.argv[1])
images = {}
for job in jobs:
    pipe = DiffusionPipeline.from_pretrained(job["path"])
    pipe.set_progress_bar_config(disable=True)
    if job.get("lora"):
        pipe.load_lora_weights(job["lora"])
    with torch.no_grad():  # one prompt per call: ZImagePipeline's batched call is not deterministic
        images[job["name"]] = torch.cat([pipe(p, num_inference_steps=3, height=32, width=32, output_type="pt",
            generator=torch.Generator().manual_seed(0), **job["call"]).images for p in job["prompts"]])
save_file(images, sys.argv[2])
assert "zr_diffusion" not in sys.modules, "the loader imported zr_diffusion"
print("zr_diffusion imported:", "zr_diffusion" in sys.modules)
"""


def _random_lora(base: Path, out: Path, rank: int, alpha: float, seed: int) -> Path:
    """A LoRA with random (non-zero) A and B, saved in the diffusers format by the adapter."""
    adapter = load_adapter(base)
    torch.manual_seed(seed)
    adapter.add_lora(rank=rank, alpha=alpha)
    with torch.no_grad():
        for p in adapter.lora_parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return adapter.save_lora(out)


def _reference(base: Path, family: str, loras: list[Path]) -> torch.Tensor:
    """Images of the base with every LoRA loaded unfused by diffusers and all active. [B, 3, H, W]"""
    pipe = DiffusionPipeline.from_pretrained(str(base))
    pipe.set_progress_bar_config(disable=True)
    names = []
    for i, lora in enumerate(loras):
        pipe.load_lora_weights(str(lora), adapter_name=f"ref{i}")
        names.append(f"ref{i}")
    if names:
        pipe.set_adapters(names)
    with torch.no_grad():  # one prompt per call, as in _LOADER
        return torch.cat(
            [
                pipe(
                    prompt,
                    num_inference_steps=3,
                    height=32,
                    width=32,
                    output_type="pt",
                    generator=torch.Generator().manual_seed(0),
                    **CALL[family],
                ).images
                for prompt in PROMPTS
            ]
        )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Per family: base, LoRAs A (rank 4, alpha 8) and B (rank 2, alpha 2), the fused pipeline and the
    merged LoRA; then the subprocess's images of both."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for family in FAMILIES:
        base = make_tiny_t2i(root / family / "base", family)
        a = _random_lora(base, root / family / "run-a" / "lora", rank=4, alpha=8.0, seed=1)
        b = _random_lora(base, root / family / "run-b" / "lora", rank=2, alpha=2.0, seed=2)
        full, merged = root / family / "full", root / family / "merged"
        args = ["export", "--pipeline", str(base), "--lora", str(a), "--lora", str(b)]
        assert main([*args, "--out", str(full)]) == 0
        assert main([*args, "--out", str(merged), "--lora-only"]) == 0
        out[family] = {"base": base, "a": a, "b": b, "full": full, "merged": merged}
    jobs = [
        {"name": f"{f}/full", "path": str(d["full"]), "prompts": PROMPTS, "call": CALL[f]}
        for f, d in out.items()
    ] + [
        {
            "name": f"{f}/merged",
            "path": str(d["base"]),
            "lora": str(d["merged"]),
            "prompts": PROMPTS,
            "call": CALL[f],
        }
        for f, d in out.items()
    ]
    result = root / "images.safetensors"
    run = subprocess.run(
        [sys.executable, "-c", _LOADER, json.dumps(jobs), str(result)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "zr_diffusion imported: False" in run.stdout
    return out, load_file(result)


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_pipeline_equals_base_plus_loras(exported, family):
    dirs, images = exported
    reference = _reference(dirs[family]["base"], family, [dirs[family]["a"], dirs[family]["b"]])
    plain = _reference(dirs[family]["base"], family, [])
    assert (reference - plain).abs().max() > 1e-3  # the LoRAs change the images, so equality means something
    torch.testing.assert_close(images[f"{family}/full"], reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(images[f"{family}/merged"], reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_writes_safetensors_only_and_no_lora_layers(exported, family):
    dirs, _ = exported
    files = [p for p in dirs[family]["full"].rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert not any("lora" in k for p in weights for k in load_file(p))
    merged = sorted(p.name for p in dirs[family]["merged"].iterdir())
    assert merged == ["README.md", LORA_WEIGHT_NAME, LORA_FAMILY_FILE]
    record = json.loads((dirs[family]["merged"] / LORA_FAMILY_FILE).read_text())
    assert record["family"] == family and record["rank"] == 6  # ranks 4 + 2 stacked


def test_model_card_front_matter_and_none_found(exported):
    dirs, _ = exported
    card = (dirs["sd"]["full"] / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == str(dirs["sd"]["base"])
    assert meta["library_name"] == "diffusers" and meta["base_model_relation"] == "finetune"
    assert {"text-to-image", "sd", "lora"} <= set(meta["tags"])
    assert card.index(str(dirs["sd"]["a"])) < card.index(str(dirs["sd"]["b"]))  # the fusing order
    assert card.count("training config: none found") == 2 and card.count("GSB: none found") == 2
    lora_card = (dirs["sd"]["merged"] / "README.md").read_text()
    assert yaml.safe_load(lora_card.split("---\n")[1])["base_model_relation"] == "adapter"
    assert "pipe.load_lora_weights" in lora_card


def test_model_card_reads_run_config_validation_and_gsb(exported, tmp_path):
    from zr_diffusion.pipelines.model_card import render_card

    dirs = exported[0]["sd"]
    run = dirs["a"].parent
    config = {
        "pipeline": "runs/base",
        "reward": {"model": "runs/student", "dimensions": ["alignment", "realism"], "weights": [2.0, 1.0]},
        "sampler": {"num_steps": 20, "mode": "draft", "draft_k": 1, "guidance_scale": 5.0},
        "reg_weight": 0.1,
        "batch_size": 4,
        "run": {"max_steps": 300},
        "optim": {"lr": 1e-4},
        "lora": {"rank": 4, "alpha": 8.0},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    metrics = {
        "train": [{"step": 1}],
        "validation": [
            {"step": 10, "reward": 3.25, "grid": "x.png"},
            {"step": 20, "reward": 3.5, "grid": "y.png"},
        ],
        "selection": {"step": 10, "by": "judge/clip"},
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "eval").mkdir()
    gsb = {
        "lora_a": str(dirs["a"]),
        "lora_b": None,
        "label_a": "tuned",
        "label_b": "base",
        "gsb": 0.25,
        "good": 2,
        "same": 1,
        "bad": 1,
        "n_items": 4,
        "judge": {"kind": "clipscore", "path": "clip"},
    }
    (run / "eval" / "gsb.json").write_text(json.dumps(gsb))
    beside = run.parent / "eval-beside"  # a folder beside the run: found when lora_a resolves to the LoRA
    beside.mkdir()
    (beside / "gsb.json").write_text(json.dumps({**gsb, "label_a": "tuned-beside", "gsb": 0.75}))
    loose = run.parent / "eval-loose"  # only the last two parts match: another run's LoRA, not found
    loose.mkdir()
    (loose / "gsb.json").write_text(json.dumps({**gsb, "lora_a": "elsewhere/run-a/lora", "gsb": -0.25}))
    (run / "other").mkdir()
    (run / "other" / "gsb.json").write_text(json.dumps({**gsb, "lora_a": str(dirs["b"]), "gsb": -0.5}))
    card = render_card(str(dirs["base"]), "sd", [str(dirs["a"])], lora_only=False, dtype="float32")
    assert "- reward model(s): `runs/student`" in card
    assert "- dimensions and weights: alignment 2, realism 1" in card
    assert "num_steps 20, mode draft, draft_k 1" in card and "weight 0.1" in card
    assert "- steps: 300 (batch size 4, lr 0.0001), LoRA rank 4, alpha 8" in card
    assert "| step | reward |" in card and "| 20 | 3.5 |" in card
    assert '- selection: {"step": 10, "by": "judge/clip"}' in card
    assert (
        "GSB tuned vs base: +25.0% (G 2, S 1, B 1; 4 items" in card
        and "GSB tuned-beside vs base: +75.0%" in card
    )
    assert "-50.0%" not in card and "-25.0%" not in card


def _args(base, out, *loras):
    return [
        "export",
        "--pipeline",
        str(base),
        *(x for lora in loras for x in ("--lora", str(lora))),
        "--out",
        str(out),
    ]


def test_export_errors_name_the_lora(exported, tmp_path, capsys):
    dirs = exported[0]
    sd, zimage = dirs["sd"], dirs["zimage"]
    assert main(_args(sd["base"], tmp_path / "x", tmp_path / "missing")) == 2
    assert "LoRA folder" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(_args(sd["base"], tmp_path / "x", zimage["a"])) == 2
    assert "was trained on a 'zimage' pipeline, but" in capsys.readouterr().err
    # another family without the family record: its keys name the transformer, not the unet
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / LORA_WEIGHT_NAME).write_bytes((zimage["a"] / LORA_WEIGHT_NAME).read_bytes())
    assert main(_args(sd["base"], tmp_path / "x", bare)) == 2
    assert "a LoRA of another family or format" in capsys.readouterr().err
    # A and B of different ranks in one module
    broken = tmp_path / "broken"
    broken.mkdir()
    state = load_file(sd["a"] / LORA_WEIGHT_NAME)
    key = next(k for k in state if k.endswith("lora_B.weight"))
    state[key] = state[key][:, :3].contiguous()
    save_file(state, broken / LORA_WEIGHT_NAME)
    assert main(_args(sd["base"], tmp_path / "x", broken)) == 2
    assert "incompatible ranks" in capsys.readouterr().err
    # a module the base does not have
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    state = load_file(sd["a"] / LORA_WEIGHT_NAME)
    state = {k.replace(".to_q.", ".to_qq.", 1) if ".attn1.to_q." in k else k: v for k, v in state.items()}
    save_file(state, renamed / LORA_WEIGHT_NAME)
    assert main(_args(sd["base"], tmp_path / "x", renamed)) == 2
    assert "which the base sd denoiser does not have (incompatible targets" in capsys.readouterr().err
    # a LoRA of the same family but a wider model
    wide = make_tiny_t2i(tmp_path / "wide", "sd", channels=16)
    wide_lora = _random_lora(wide, tmp_path / "wide-lora", rank=2, alpha=2.0, seed=3)
    assert main(_args(sd["base"], tmp_path / "x", wide_lora)) == 2
    assert "trained on a model of another size" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_lora_only_needs_the_same_targets(exported, tmp_path, capsys):
    sd = exported[0]["sd"]
    adapter = load_adapter(sd["base"])
    adapter.add_lora(rank=2, targets=("to_q",))
    other = adapter.save_lora(tmp_path / "q-only")
    assert main([*_args(sd["base"], tmp_path / "m", sd["a"], other), "--lora-only"]) == 2
    assert "--lora-only needs LoRAs with the same targets" in capsys.readouterr().err
