"""GSB (METHOD.md Eq. 21) by hand-computed values; the review page, its key and answers files."""

import argparse
import json
import re
import shutil
import subprocess

import pytest
import torch

from zr_diffusion.data import load_image
from zr_diffusion.pipelines.gsb import (
    AnswersError,
    GSBResult,
    cli_run,
    gsb,
    gsb_from_answers,
    judge_pairs,
    render_gsb_markdown,
    write_review_page,
)

PROMPTS = [f"prompt {i}: a <b>cat</b> & a dog" if i == 0 else f"prompt {i}" for i in range(7)]


def test_gsb_by_hand():
    """G=3, S=1, B=1: (3 − 1) / 5 = 0.4."""
    assert gsb(["G", "S", "G", "B", "G"]) == GSBResult(good=3, same=1, bad=1, gsb=0.4)
    assert gsb(["B", "B"]).gsb == -1.0
    with pytest.raises(ValueError, match="at least one verdict"):
        gsb([])
    with pytest.raises(ValueError, match="'X'"):
        gsb(["G", "X"])


def test_judge_pairs_margin():
    """a − b = [2, −2, 0, 0.05]: margin 0.1 → G, B, S, S; margin 0 → G, B, S, G."""
    a, b = torch.tensor([3.0, 1.0, 2.0, 2.05]), torch.tensor([1.0, 3.0, 2.0, 2.0])
    assert judge_pairs(a, b, tie_margin=0.1) == ["G", "B", "S", "S"]
    assert judge_pairs(a.tolist(), b.tolist()) == ["G", "B", "S", "G"]
    with pytest.raises(ValueError, match="tie_margin"):
        judge_pairs(a, b, tie_margin=-1)
    with pytest.raises(ValueError, match="differ in shape"):
        judge_pairs(a, b[:3])


def test_judge_pairs_multi_dimension_uses_weighted_mean():
    """a = [1, 3], b = [2, 2]: mean 2 vs 2 → S; weights (1, 0): 1 vs 2 → B; (1, 3): 2.5 vs 2 → G."""
    a, b = torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 2.0]])
    assert judge_pairs(a, b) == ["S"]
    assert judge_pairs(a, b, weights=[1, 0]) == ["B"]
    assert judge_pairs(a, b, weights=[1, 3]) == ["G"]
    with pytest.raises(ValueError, match="weights"):
        judge_pairs(a, b, weights=[1, 2, 3])


def test_render_gsb_markdown():
    table = render_gsb_markdown(GSBResult(3, 1, 1, 0.4, unanswered=2), "lora", "sft")
    assert "| lora vs sft | 3 | 1 | 1 | 5 | +40.0% | 2 |" in table
    assert "unanswered" not in render_gsb_markdown(GSBResult(3, 1, 1, 0.4))


# ---------------------------------------------------------------- review page


@pytest.fixture()
def page(tmp_path):
    g = torch.Generator().manual_seed(0)
    images_a, images_b = torch.rand(7, 3, 8, 8, generator=g), torch.rand(7, 3, 8, 8, generator=g)
    html_path, key_path = write_review_page(tmp_path / "review", PROMPTS, images_a, images_b, seed=3)
    return html_path, key_path, images_a, images_b


def test_review_page_has_every_prompt_pair_and_no_external_resource(page):
    html_path, key_path, _, _ = page
    text = html_path.read_text()
    assert "prompt 0: a &lt;b&gt;cat&lt;/b&gt; &amp; a dog" in text  # escaped
    assert all(p in text for p in PROMPTS[1:])
    links = re.findall(r'src="([^"]+)"', text)
    assert len(links) == 14 and all((html_path.parent / s).is_file() for s in links)
    assert "http" not in text and "<script src" not in text
    assert key_path.parent == html_path.parent.parent  # key kept outside the folder for raters
    assert not list(html_path.parent.rglob("*key*"))


def test_key_maps_each_item_and_order_is_seeded(page, tmp_path):
    html_path, key_path, images_a, images_b = page
    key = json.loads(key_path.read_text())
    assert [it["id"] for it in key["items"]] == [f"item{i:04d}" for i in range(7)]
    assert [it["prompt"] for it in key["items"]] == PROMPTS
    sides = [it["left"] for it in key["items"]]
    assert set(sides) == {"A", "B"}  # randomised
    for i, it in enumerate(key["items"]):  # the left PNG is model A's image exactly when the key says so
        left = load_image(html_path.parent / "images" / f"item{i:04d}_L.png")
        a_png = (images_a[i] * 255).round() / 255
        assert torch.allclose(left, a_png, atol=1e-6) == (it["left"] == "A")
    _, key2 = write_review_page(tmp_path / "again", PROMPTS, images_a, images_b, seed=3)
    assert [it["left"] for it in json.loads(key2.read_text())["items"]] == sides


def test_review_seed_is_drawn_at_random_by_default_and_recorded_in_the_key(tmp_path):
    """A fixed default seed would make the left/right order predictable to raters."""
    g = torch.Generator().manual_seed(0)
    images_a, images_b = torch.rand(7, 3, 8, 8, generator=g), torch.rand(7, 3, 8, 8, generator=g)
    keys = [
        json.loads(write_review_page(tmp_path / f"page{i}", PROMPTS, images_a, images_b)[1].read_text())
        for i in range(2)
    ]
    seeds = [k["seed"] for k in keys]
    assert all(isinstance(s, int) for s in seeds) and seeds[0] != seeds[1]
    assert keys[0]["page_id"] != keys[1]["page_id"]
    for i, key in enumerate(keys):  # the recorded seed reproduces the page's order
        _, again = write_review_page(tmp_path / f"again{i}", PROMPTS, images_a, images_b, seed=key["seed"])
        assert json.loads(again.read_text())["items"] == key["items"]
    from zr_diffusion.pipelines.config import EvalT2IConfig, JudgeConfig

    assert (
        EvalT2IConfig(pipeline="p", prompts="x", judge=JudgeConfig(path="j"), lora_a="a").review_seed is None
    )


def _answers_for(key_path, picks, drop=()):
    """Answers as the page writes them; picks[i] in {"A", "B", "same", None} → left/right via the key."""
    key = json.loads(key_path.read_text())
    answers = {}
    for it, pick in zip(key["items"], picks):
        if it["id"] in drop:
            continue
        if pick in ("A", "B"):
            answers[it["id"]] = "left" if it["left"] == pick else "right"
        else:
            answers[it["id"]] = pick
    return {
        "format": "zr-gsb-answers/1",
        "page_id": key["page_id"],
        "rater": "r1",
        "n_items": 7,
        "answers": answers,
    }


def test_answers_map_back_to_gsb_with_unanswered_counted(page, tmp_path, capsys):
    """A better on 3, same on 1, B better on 1 → G=3, S=1, B=1, GSB 0.4; one null + one missing → 2."""
    _, key_path, _, _ = page
    answers = _answers_for(key_path, ["A", "A", "same", "B", "A", None, "A"], drop={"item0006"})
    path = tmp_path / "answers.json"
    path.write_text(json.dumps(answers))
    assert gsb_from_answers(path, key_path) == GSBResult(3, 1, 1, 0.4, unanswered=2)
    assert cli_run(argparse.Namespace(answers=path, key=key_path, label_a="tuned", label_b="sft")) == 0
    out = capsys.readouterr().out
    assert "+40.0%" in out and "unanswered: 2 of 7" in out


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda a: a["answers"].update(item0001="better"), r"item 'item0001': choice 'better'"),
        (lambda a: a["answers"].update(item0099="left"), r"item 'item0099' is not in the key"),
        (lambda a: a.update(page_id="0" * 16), "does not match the key"),
        (lambda a: a.update(format="other"), "format"),
        (lambda a: a.update(answers=["left"]), "'answers' must be an object"),
        (lambda a: a["answers"].update(dict.fromkeys(a["answers"])), "no item answered"),
    ],
)
def test_malformed_answers_name_file_and_item(page, tmp_path, edit, match):
    _, key_path, _, _ = page
    answers = _answers_for(key_path, ["A"] * 7)
    edit(answers)
    path = tmp_path / "answers.json"
    path.write_text(json.dumps(answers))
    with pytest.raises(AnswersError, match=match) as err:
        gsb_from_answers(path, key_path)
    assert str(path) in str(err.value)


def test_answers_not_json(page, tmp_path):
    path = tmp_path / "answers.json"
    path.write_text('{"format": "zr-gsb-answers/1", ')
    with pytest.raises(AnswersError, match=r"answers\.json: not valid JSON"):
        gsb_from_answers(path, page[1])


# Runs the page's own script in node with a minimal stand-in for the DOM, clicks "download".
_NODE_DRIVER = """
const fs = require("fs"), vm = require("vm");
const html = fs.readFileSync(process.argv[2], "utf8");
const checked = JSON.parse(process.argv[3]);
const script = html.match(/<script>([\\s\\S]*?)<\\/script>/)[1];
const elements = {};
globalThis.document = {
  querySelector(sel) {
    const m = sel.match(/name="([^"]+)"\\]:checked/);
    return m && checked[m[1]] ? {value: checked[m[1]]} : null;
  },
  getElementById(id) { return elements[id] ||= {value: "", textContent: "", addEventListener() {}}; },
  addEventListener() {},
  createElement() { return {click() { process.stdout.write(this.href.text); }, remove() {}}; },
  body: {appendChild() {}},
};
globalThis.localStorage = {getItem() { return null; }, setItem() {}};
globalThis.Blob = class { constructor(parts) { this.text = parts.join(""); } };
globalThis.URL = {createObjectURL(blob) { return blob; }};
vm.runInThisContext(script + "\\ndownload();");
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_page_script_downloads_answers_that_gsb_reads(page, tmp_path):
    html_path, key_path, _, _ = page
    picks = _answers_for(key_path, ["A", "A", "same", "B", "A", None, "A"])["answers"]
    driver = tmp_path / "driver.js"
    driver.write_text(_NODE_DRIVER)
    run = subprocess.run(
        ["node", str(driver), str(html_path), json.dumps(picks)], capture_output=True, text=True, timeout=20
    )
    assert run.returncode == 0, run.stderr
    path = tmp_path / "downloaded.json"
    path.write_text(run.stdout)
    assert json.loads(run.stdout)["answers"]["item0005"] is None
    assert gsb_from_answers(path, key_path) == GSBResult(4, 1, 1, 0.5, unanswered=1)
