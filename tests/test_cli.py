"""The CLI: table dispatch, data validation with --skip-bad, and clear errors instead of tracebacks."""

import json

import numpy as np
from PIL import Image

from zr_diffusion.cli import COMMANDS, main


def _data(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    rows = [
        {"id": "1", "prompt": "p", "image": "a.png", "dimension": "realism", "score": 2.0},
        {"id": "2", "prompt": "p", "image": "a.png", "dimension": "realism", "scores": [4.0, 4.5, 5.0]},
        {"id": "3", "prompt": "p", "image": "gone.png", "dimension": "realism", "score": 2.0},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_every_command_is_in_the_table():
    expected = {
        "score",
        "make-tiny",
        "validate-data",
        "train-reward",
        "eval-reward",
        "gsb",
        "finetune-t2i",
        "train-t2i-sft",
        "eval-t2i",
        "make-tiny-t2i",
        "demo",
    }
    assert expected <= set(COMMANDS)


def test_validate_data_reports_file_and_line(tmp_path, capsys):
    path = _data(tmp_path)
    assert main(["validate-data", str(path)]) == 2
    err = capsys.readouterr().err
    assert "d.jsonl:3: image file" in err and "gone.png does not exist" in err
    assert main(["validate-data", str(path), "--skip-bad"]) == 0
    out = capsys.readouterr()
    assert "skipping bad record" in out.err
    assert "2 valid records (1 with several annotators), 1 same-prompt pairs (1 with |gap| > 0.5)" in out.out


def test_recipe_config_errors_are_messages(tmp_path, capsys):
    assert main(["train-reward", "model=x", "data.train=y", "optim.lr=fast"]) == 2
    assert "optim.lr: expected a number, got 'fast'" in capsys.readouterr().err
    assert main(["train-reward", "model=x", "data.train=y", "gdso.group_size=0"]) == 2
    assert "gdso.group_size (G) must be >= 1" in capsys.readouterr().err
    assert main(["gsb", "--answers", str(tmp_path / "none.json"), "--key", str(tmp_path / "k.json")]) == 2
    assert "k.json" in capsys.readouterr().err


def test_skip_bad_flag_maps_to_the_config_key(tmp_path, capsys):
    path = _data(tmp_path)
    # eval-reward reads records with `skip_bad`; the bad row is reported, then the (missing) model stops it.
    code = main(["eval-reward", "--skip-bad", f"data={path}", f"model={tmp_path / 'no-model'}"])
    err = capsys.readouterr().err
    assert code == 2 and "skipping bad record" in err and "d.jsonl:3" in err
    assert "no-model does not exist" in err
    assert main(["train-t2i-sft", "--skip-bad"]) == 2
    assert "reads no scored records" in capsys.readouterr().err


def test_missing_model_folders_are_named(tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    assert main(["score", "--model", str(tmp_path / "nope"), "--image", str(img), "--prompt", "x"]) == 2
    assert "nope does not exist" in capsys.readouterr().err
