"""Record schema: every bad-input path is reported with file and line; pairs are same-prompt."""

import json

import numpy as np
import pytest
from PIL import Image

from zr_diffusion.data import DataError, build_pairs, load_image, load_records, write_records


def _write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def images(tmp_path):
    for name, value in (("a.png", 10), ("b.png", 200)):
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    return tmp_path


def _rec(i, **kw):
    base = {"id": f"r{i}", "prompt": "a red cube", "image": "a.png", "dimension": "realism", "score": 3.0}
    base.update(kw)
    return base


def test_load_good_records_and_aggregate(images):
    path = _write(images, [_rec(0), _rec(1, image="b.png", scores=[1.0, 4.0, 4.5, 5.0], score=None)])
    recs = load_records(path)
    assert [r.id for r in recs] == ["r0", "r1"]
    assert recs[0].image == images / "a.png"
    assert recs[1].score == pytest.approx(4.25)


@pytest.mark.parametrize(
    "row, message",
    [
        (_rec(0, image="missing.png"), "missing.png does not exist"),
        (_rec(0, image="broken.png"), "not a readable image"),
        (_rec(0, dimension="beauty"), "unknown dimension 'beauty'"),
        (_rec(0, score=3.2), r"score 3.2 is not on the score grid"),
        (_rec(0, scores=[3.0]), "exactly one of 'score'"),
        ({"id": "x", "prompt": "p", "dimension": "realism", "score": 3.0}, "missing field 'image'"),
        (_rec(0, colour="red"), r"unknown field\(s\) \['colour'\]"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_records_name_file_and_line(images, row, message):
    path = _write(images, [_rec(9), row])
    with pytest.raises(DataError, match=rf"data.jsonl:2: .*{message}"):
        load_records(path)


def test_duplicate_id_and_skip_bad(images):
    path = _write(images, [_rec(0), _rec(0, image="b.png"), _rec(1, score=9.0), _rec(2)])
    with pytest.raises(DataError, match=r"data.jsonl:2: duplicate id 'r0' \(first seen at .*data.jsonl:1\)"):
        load_records(path)
    logged = []
    recs = load_records(path, skip_bad=True, log=logged.append)
    assert [r.id for r in recs] == ["r0", "r2"]
    assert len(logged) == 2 and "data.jsonl:3" in logged[1]


def test_require_rationale(images):
    path = _write(images, [_rec(0)])
    with pytest.raises(DataError, match="missing field 'rationale'"):
        load_records(path, require_rationale=True)


def test_parquet_roundtrip(images):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [_rec(0), _rec(1, image="b.png", score=4.5)]
    pq.write_table(pa.Table.from_pylist(rows), images / "data.parquet")
    recs = load_records(images / "data.parquet")
    assert [r.score for r in recs] == [3.0, 4.5]
    write_records(recs, images / "out.jsonl")
    assert [r.score for r in load_records(images / "out.jsonl")] == [3.0, 4.5]


def test_build_pairs_same_prompt_same_dimension(images):
    rows = [
        _rec(0, score=2.0),
        _rec(1, score=4.0),
        _rec(2, score=4.0),  # one prompt: 2 pairs (4 vs 4 is a tie)
        _rec(3, score=5.0, dimension="aesthetics"),  # other dimension: no partner
        _rec(4, score=1.0, prompt="a blue ball"),  # other prompt: no partner
    ]
    pairs = build_pairs(load_records(_write(images, rows)))
    assert sorted((p.w.id, p.l.id) for p in pairs) == [("r1", "r0"), ("r2", "r0")]
    assert all(p.gap == 2.0 for p in pairs)


def test_load_image_range(images):
    x = load_image(images / "b.png")
    assert x.shape == (3, 8, 8) and abs(x.max().item() - 200 / 255) < 1e-6
