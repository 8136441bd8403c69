"""The reward-data loop on a tiny SD pipeline: ``zr sample`` -> ``zr annotate`` page -> answers ->
``zr annotate --import`` -> ``zr validate-data`` / ``zr train-reward``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from zr_diffusion import data as data_module
from zr_diffusion.annotate.answers import import_answers
from zr_diffusion.annotate.page import PAGE_JS, display_width
from zr_diffusion.cli import main
from zr_diffusion.data import DataError, load_image, load_records
from zr_diffusion.pipelines.adapters import load_adapter
from zr_diffusion.pipelines.tiny import make_tiny_t2i
from zr_diffusion.rubric import DIMENSIONS
from zr_diffusion.sample import parse_seeds, plan_items

PROMPTS = ["a red cube", "a blue sky"]
SIZE = ["--steps", "2", "--height", "32", "--width", "32", "--no-progress"]


def _sample_args(pipeline: Path, prompts: Path, out: Path, seeds: str = "0,1", *extra: str) -> list[str]:
    return [
        "sample",
        "--pipeline",
        str(pipeline),
        "--prompts",
        str(prompts),
        "--seeds",
        seeds,
        "--out",
        str(out),
        *SIZE,
        *extra,
    ]


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SD pipeline, a prompt file, and a sampled folder of 2 prompts x 2 seeds."""
    root = tmp_path_factory.mktemp("loop")
    pipeline = make_tiny_t2i(root / "sd", "sd")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    folder = root / "samples"
    assert main([*_sample_args(pipeline, prompts, folder), "--tag", "sd-base"]) == 0
    return {"root": root, "pipeline": pipeline, "prompts": prompts, "folder": folder}


# ---- zr sample ----------------------------------------------------------------------------------


def test_seeds_and_item_ids():
    assert parse_seeds("0,1, 2,3") == (0, 1, 2, 3)
    for bad in ("0,x", "1,1", ""):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)
    assert [i.id for i in plan_items(["a", "b"], (3, 7))] == [
        "p00000-s3",
        "p00000-s7",
        "p00001-s3",
        "p00001-s7",
    ]


def test_sample_writes_images_and_unscored_records(world):
    records = _records(world["folder"])
    assert records == [
        {
            "id": f"p{p:05d}-s{s}",
            "prompt": PROMPTS[p],
            "image": f"images/p{p:05d}-s{s}.png",
            "model": "sd-base",
            "seed": s,
        }
        for p in (0, 1)
        for s in (0, 1)
    ]
    images = [load_image(world["folder"] / r["image"]) for r in records]
    assert all(im.shape == (3, 32, 32) for im in images)
    assert (images[0] - images[1]).abs().max() > 0.05  # another seed, another image


def test_rerun_skips_existing_and_redoes_a_missing_image(world, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(world["folder"], folder)
    before = {p.name: p.stat().st_mtime_ns for p in (folder / "images").iterdir()}
    original = load_image(folder / "images" / "p00001-s0.png")
    (folder / "images" / "p00001-s0.png").unlink()
    capsys.readouterr()
    args = [*_sample_args(world["pipeline"], world["prompts"], folder), "--tag", "sd-base"]
    assert main([a for a in args if a != "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "1 generated, 3 skipped" in out.out
    assert (
        "sample:  75%" in out.err and "sample: 100%" in out.err and "4/4" in out.err
    )  # the bar starts at 3 done
    after = {p.name: p.stat().st_mtime_ns for p in (folder / "images").iterdir()}
    assert {k for k in after if after[k] != before[k]} == {"p00001-s0.png"}
    # its noise depends on its seed only (here drawn in a batch of 1, first in a batch of 4)
    assert (load_image(folder / "images" / "p00001-s0.png") - original).abs().max() <= 1 / 255
    assert _records(folder) == _records(world["folder"])


def test_an_interrupted_run_continues(world, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "interrupted"
    calls = []
    save = data_module.save_image

    def save_then_stop(image, path):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(path)
        save(image, path)

    monkeypatch.setattr(data_module, "save_image", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        main(
            [
                *_sample_args(world["pipeline"], world["prompts"], folder, "0,1", "--batch-size", "1"),
                "--tag",
                "sd-base",
            ]
        )
    monkeypatch.undo()
    assert len(_records(folder)) == 3 and len(list((folder / "images").iterdir())) == 3
    capsys.readouterr()
    assert (
        main([*_sample_args(world["pipeline"], world["prompts"], folder, "0,1,2"), "--tag", "sd-base"]) == 0
    )
    assert "3 generated, 3 skipped" in capsys.readouterr().out  # the missing one plus a new seed
    assert [r["id"] for r in _records(folder)] == [f"p{p:05d}-s{s}" for p in (0, 1) for s in (0, 1, 2)]


def test_other_settings_or_prompts_in_the_same_folder_are_errors(world, tmp_path, capsys):
    folder = tmp_path / "settings"
    shutil.copytree(world["folder"], folder)
    assert (
        main(
            [
                *_sample_args(world["pipeline"], world["prompts"], folder),
                "--tag",
                "sd-base",
                "--guidance-scale",
                "2",
            ]
        )
        == 2
    )
    assert "guidance_scale: was 5.0, now 2.0" in capsys.readouterr().err
    other = tmp_path / "other.txt"
    other.write_text("a green tree\na blue sky\n")
    assert main([*_sample_args(world["pipeline"], other, folder), "--tag", "sd-base"]) == 2
    assert "p00000-s0 is for prompt 'a red cube'" in capsys.readouterr().err


def test_sample_with_loras_equals_the_exported_pipeline(world, tmp_path):
    adapter = load_adapter(world["pipeline"])
    torch.manual_seed(0)
    adapter.add_lora(rank=4)
    with torch.no_grad():
        for p in adapter.lora_parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    lora = adapter.save_lora(tmp_path / "lora")
    exported = tmp_path / "exported"
    assert (
        main(["export", "--pipeline", str(world["pipeline"]), "--lora", str(lora), "--out", str(exported)])
        == 0
    )
    with_lora, fused = tmp_path / "with-lora", tmp_path / "fused"
    assert (
        main([*_sample_args(world["pipeline"], world["prompts"], with_lora, "0"), "--lora", str(lora)]) == 0
    )
    assert main(_sample_args(exported, world["prompts"], fused, "0")) == 0
    assert _records(with_lora)[0]["model"] == f"{world['pipeline']}+{lora}"
    for name in ("p00000-s0.png", "p00001-s0.png"):
        a, b = load_image(with_lora / "images" / name), load_image(fused / "images" / name)
        assert (a - b).abs().max() <= 1 / 255
        assert (a - load_image(world["folder"] / "images" / name)).abs().max() > 0.05  # the LoRA matters


# ---- zr annotate: the page ------------------------------------------------------------------------


def _page_data(html: str) -> dict:
    return json.loads(
        re.search(r'<script type="application/json" id="zr-page">(.*?)</script>', html, re.S)[1]
    )


def test_page_is_self_contained_with_rubric_bins_and_large_images(world, tmp_path):
    page = tmp_path / "page.html"
    assert (
        main(["annotate", str(world["folder"]), "--dimensions", "alignment", "realism", "--out", str(page)])
        == 0
    )
    html = page.read_text()
    data = _page_data(html)
    assert [d["name"] for d in data["dimensions"]] == ["alignment", "realism"]
    assert data["bins"] == [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]
    assert [i["id"] for i in data["items"]] == [r["id"] for r in _records(world["folder"])]
    assert all(i["src"].startswith("data:image/png;base64,") and i["display"] == 512 for i in data["items"])
    for name in ("alignment", "realism"):
        assert all(level in html for level in DIMENSIONS[name].levels)
    assert DIMENSIONS["aesthetics"].levels[0] not in html
    assert html.count('class="bin ') == 2 * 9 and "image-rendering:pixelated" in html
    assert PAGE_JS.read_text() in html
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing fetched from elsewhere
    assert display_width(32, 32) == 512 and display_width(48, 24) == 480 and display_width(1024, 768) == 1024
    linked = world["folder"] / "linked.html"
    main(["annotate", str(world["folder"]), "--link-images", "--out", str(linked)])
    assert _page_data(linked.read_text())["items"][0]["src"] == "images/p00000-s0.png"
    linked.unlink()


_NODE = """
const {exportJSONL, countScored} = require(process.argv[2]);
const page = JSON.parse(process.argv[3]), scores = JSON.parse(process.argv[4]);
process.stdout.write(JSON.stringify({jsonl: exportJSONL(page, scores), n: countScored(page, scores)}));
"""


def _node_export(page: dict, scores: dict, tmp_path: Path) -> dict:
    script = tmp_path / "export.js"
    script.write_text(_NODE)
    page_js = tmp_path / "page.js"  # the script exactly as embedded in the page
    html = (tmp_path / "page.html").read_text()
    page_js.write_text(re.search(r"<script>\n(.*)</script></body>", html, re.S)[1])
    run = subprocess.run(
        ["node", str(script), str(page_js), json.dumps(page), json.dumps(scores)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_page_export_writes_records_that_import_and_validate(world, tmp_path, capsys):
    page = tmp_path / "page.html"
    main(["annotate", str(world["folder"]), "--dimensions", "alignment", "realism", "--out", str(page)])
    data = _page_data(page.read_text())
    scores = {"p00000-s0": {"alignment": 4.5, "realism": 1}, "p00001-s1": {"realism": 3}, "p00000-s1": {}}
    out = _node_export(data, scores, tmp_path)
    assert out["n"] == 3
    lines = [json.loads(line) for line in out["jsonl"].splitlines()]
    assert lines == [
        {
            "id": "p00000-s0-alignment",
            "prompt": "a red cube",
            "image": "images/p00000-s0.png",
            "dimension": "alignment",
            "score": 4.5,
        },
        {
            "id": "p00000-s0-realism",
            "prompt": "a red cube",
            "image": "images/p00000-s0.png",
            "dimension": "realism",
            "score": 1,
        },
        {
            "id": "p00001-s1-realism",
            "prompt": "a blue sky",
            "image": "images/p00001-s1.png",
            "dimension": "realism",
            "score": 3,
        },
    ]
    answers = tmp_path / "downloaded.jsonl"
    answers.write_text(out["jsonl"])
    summary = import_answers(
        world["folder"], [answers], tmp_path / "annotations.jsonl", ("alignment", "realism")
    )
    assert (summary.records, summary.images_scored, summary.images) == (3, 2, 4)
    assert [r.score for r in load_records(summary.path)] == [4.5, 1.0, 3.0]
    with pytest.raises(Exception, match="is not a bin"):
        _node_export(data, {"p00000-s0": {"alignment": 4.2}}, tmp_path)


# ---- zr annotate --import -----------------------------------------------------------------------


def _answer(sample_id: str, prompt: str, dimension: str, score) -> dict:
    return {
        "id": f"{sample_id}-{dimension}",
        "prompt": prompt,
        "image": f"images/{sample_id}.png",
        "dimension": dimension,
        "score": score,
    }


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def imported(world, tmp_path_factory):
    """Two annotators' downloads (as the page writes them) merged into DIR/annotations.jsonl."""
    root = tmp_path_factory.mktemp("answers")
    first = _write(
        root / "ann1.jsonl",
        [
            _answer(f"p0000{p}-s{s}", PROMPTS[p], d, 1.0 + p + s + (d == "realism") * 0.5)
            for p in (0, 1)
            for s in (0, 1)
            for d in ("alignment", "realism")
        ],
    )
    second = _write(root / "ann2.jsonl", [_answer("p00000-s0", PROMPTS[0], "alignment", 2.5)])
    rc = main(
        [
            "annotate",
            str(world["folder"]),
            "--dimensions",
            "alignment",
            "realism",
            "--import",
            str(first),
            str(second),
        ]
    )
    assert rc == 0
    return world["folder"] / "annotations.jsonl"


def test_import_merges_annotators_into_valid_records(imported, capsys):
    rows = [json.loads(line) for line in imported.read_text().splitlines()]
    assert rows[0] == {
        "id": "p00000-s0-alignment",
        "prompt": "a red cube",
        "image": "images/p00000-s0.png",
        "dimension": "alignment",
        "scores": [1.0, 2.5],
    }
    assert rows[1] == {
        "id": "p00000-s0-realism",
        "prompt": "a red cube",
        "image": "images/p00000-s0.png",
        "dimension": "realism",
        "score": 1.5,
    }
    assert len(rows) == 8
    assert main(["validate-data", str(imported), "--dimensions", "alignment", "realism"]) == 0
    assert (
        "8 valid records (1 with several annotators), 4 same-prompt pairs (3 with |gap| > 0.5)"
        in capsys.readouterr().out
    )


def test_train_reward_trains_on_imported_annotations(imported, tmp_path):
    from tests._vlm_fixtures import tiny_vlm_dir

    config = Path(__file__).resolve().parents[1] / "configs" / "reward" / "sft_tiny.yaml"
    out = tmp_path / "sft"
    args = [
        "train-reward",
        "--config",
        str(config),
        f"model={tiny_vlm_dir('qwen2_vl')}",
        f"data.train={imported}",
    ]
    args += [f"data.eval={imported}", f"run.output_dir={out}", "run.max_steps=1", "run.eval_every=0"]
    assert main([*args, "run.save_every=0", "run.tensorboard=false", "run.progress=false"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"][0]["step"] == 1 and 0 < metrics["train"][0]["loss"] < float("inf")
    assert (metrics["eval"][0]["records"], metrics["eval"][0]["pairs"]) == (8, 4)  # every imported record


@pytest.mark.parametrize(
    ("row", "match"),
    [
        (
            _answer("p00009-s0", "a red cube", "alignment", 3.0),
            "is not '<image id>-alignment' for an image of this folder",
        ),
        (_answer("p00000-s0", "a green tree", "alignment", 3.0), "has prompt 'a green tree'"),
        (_answer("p00000-s0", "a red cube", "alignment", 3.2), "3.2"),
        (_answer("p00000-s0", "a red cube", "colour", 3.0), "unknown dimension 'colour'"),
    ],
)
def test_import_errors_name_file_and_line(world, tmp_path, row, match):
    bad = _write(tmp_path / "bad.jsonl", [_answer("p00000-s1", "a red cube", "alignment", 2.0), row])
    with pytest.raises(DataError, match=re.escape(f"{bad}:2")) as e:
        import_answers(world["folder"], [bad], tmp_path / "out.jsonl", ("alignment", "realism"))
    assert re.search(re.escape(match), str(e.value))
    assert not (tmp_path / "out.jsonl").exists()


def test_import_rejects_the_same_file_twice(world, tmp_path, capsys):
    answers = _write(tmp_path / "a.jsonl", [_answer("p00000-s1", "a red cube", "alignment", 2.0)])
    twin = tmp_path / "b.jsonl"
    shutil.copy(answers, twin)
    assert (
        main(
            [
                "annotate",
                str(world["folder"]),
                "--import",
                str(answers),
                str(twin),
                "--out",
                str(tmp_path / "o.jsonl"),
            ]
        )
        == 2
    )
    assert "is the same file as" in capsys.readouterr().err


def test_gsb_review_page_shows_small_images_large_and_pixelated(tmp_path):
    from zr_diffusion.pipelines.gsb import write_review_page

    page, _ = write_review_page(
        tmp_path / "review", ["a red cube"], torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    )
    css = re.search(r"<style>(.*)</style>", page.read_text(), re.S)[1]
    assert ".pair img{width:100%;image-rendering:pixelated}" in css and "max-width:512px" in css
