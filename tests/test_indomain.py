"""Issue 12 §1 preconditions: reading descriptions back (perception gates) and the in-domain reward
data (base-generator samples annotated by the world's annotators). The end-to-end structure is in
tests/test_demo.py."""

from __future__ import annotations

import numpy as np
import pytest

from zr_diffusion.rubric import DIMENSIONS
from zr_diffusion.synthetic.annotators import make_annotators
from zr_diffusion.synthetic.dataset import world_annotators
from zr_diffusion.synthetic.gates import VLMGate, perception_checks
from zr_diffusion.synthetic.indomain import (
    ANNOTATION_STREAM,
    InDomainSettings,
    annotate_samples,
    annotation_rng,
    measured_rationale,
)
from zr_diffusion.synthetic.oracle import oracle_scores
from zr_diffusion.synthetic.pretrain import PERCEPTION_ATTRIBUTES
from zr_diffusion.synthetic.text import Contents, contents, parse_contents, rendered_color, rendered_position
from zr_diffusion.synthetic.world import (
    COUNT_WORDS,
    Defects,
    Scene,
    WorldConfig,
    render,
    sample_defects,
    sample_scene,
)

# ------------------------------------------------------------------------------ parsing descriptions


@pytest.mark.parametrize(
    ("sentence", "expected"),
    [
        (
            "four orange triangles on the left on a grey background",
            Contents("four", "orange", "triangle", "on the left", "grey"),
        ),
        (
            "one red cross in the center on a dark background",
            Contents("one", "red", "cross", "in the center", "dark"),
        ),
        (
            "two blue crosses towards the bottom on a light background",
            Contents("two", "blue", "cross", "towards the bottom", "light"),
        ),
        (
            "three green shapes halfway between a circle and a star near the middle on a grey background",
            Contents(
                "three", "green", "shape halfway between a circle and a star", "near the middle", "grey"
            ),
        ),
        # an unknown position phrase: no position, the noun is the first word; no "on a X background"
        ("two red circles on the lft on a grey background", Contents("two", "red", "circle", None, "grey")),
        ("two red stars at the top", Contents("two", "red", "star", "at the top", None)),
        ("two red", Contents("two", "red", None, None, None)),
        ("", Contents(None, None, None, None, None)),
    ],
)
def test_parse_contents_reads_each_attribute(sentence, expected):
    assert parse_contents(sentence) == expected


def test_parse_contents_inverts_the_renderers_contents_sentence():
    world = WorldConfig(defect_prob=0.9)
    rng = np.random.default_rng(0)
    positions = set()
    for _ in range(300):
        scene = sample_scene(rng)
        defects = sample_defects(scene, world, rng)
        got = parse_contents(contents(scene, defects))
        assert got.count == COUNT_WORDS[scene.count + defects.count_delta]
        assert got.colour == rendered_color(scene, defects)
        assert got.position == rendered_position(scene, defects)
        assert got.background == scene.background
        if defects.shape < 1 / 3:
            assert got.shape == scene.shape  # singular, whatever the count
        positions.add(got.position)
    assert {"towards the top", "near the middle", "on the left"} <= positions


def test_perception_checks_and_the_vlm_gate():
    perception = {"count_accuracy": 0.95, "colour_accuracy": 0.9, "shape_accuracy": 0.5}
    checks = perception_checks(perception, 0.9, ("count", "colour", "shape"))
    assert [(c["value"], c["threshold"], c["passed"]) for c in checks.values()] == [
        (0.95, 0.9, True),
        (0.9, 0.9, True),
        (0.5, 0.9, False),
    ]
    gate = VLMGate()
    assert (gate.threshold("teacher"), gate.threshold("student")) == (0.9, 0.8)
    assert PERCEPTION_ATTRIBUTES == ("count", "colour", "shape", "position", "background")
    with pytest.raises(ValueError, match="vlm.gate"):
        VLMGate(teacher_min=90)


# ------------------------------------------------------------------------------ in-domain annotations

SCENE = Scene("triangle", "red", "left", 2, "dark")


def test_annotations_of_a_render_scatter_around_its_oracle_score_within_the_annotators_noise():
    world = WorldConfig(seed=3)
    image = render(SCENE, Defects(color=0.6), 48, np.random.default_rng(0))
    true = oracle_scores(image, SCENE)
    n = 400
    notes = annotate_samples([true] * n, world, 5, "test", [(p, 0) for p in range(n)])
    assert all(set(x) == set(DIMENSIONS) and all(len(v) == 5 for v in x.values()) for x in notes)
    pool = world_annotators(world)
    mean_bias = float(np.mean([a.bias for a in pool]))
    for d in DIMENSIONS:
        values = np.array([v for x in notes for v in x[d]])  # [n * 5]
        assert set(values) <= {1.0 + 0.5 * i for i in range(9)}
        lo, hi = max(1.0, true[d] - 1.0), min(5.0, true[d] + 1.0)
        if 1.5 < true[d] < 4.5:  # unclipped: the mean is the score plus the pool's mean bias
            assert abs(values.mean() - (true[d] + mean_bias)) < 0.08, d
        assert np.mean((values >= lo - 1e-9) & (values <= hi + 1e-9)) > 0.95, d
    assert true["alignment"] < 4.0  # the colour defect is seen, so the check above is not only at 5


def test_annotation_stream_and_pool_are_apart_from_the_gsb_raters():
    from zr_diffusion.synthetic.oracle_gsb import _RATER_STREAM

    world = WorldConfig(seed=0)
    assert ANNOTATION_STREAM != _RATER_STREAM and ANNOTATION_STREAM not in range(5)  # dataset: 0-4
    ours = annotation_rng(0, "train", 0, 0).random(4)
    assert not np.allclose(ours, np.random.default_rng([0, _RATER_STREAM]).random(4))
    assert not np.allclose(ours, annotation_rng(0, "test", 0, 0).random(4))  # train and test differ
    raters = make_annotators(world, np.random.default_rng([0, _RATER_STREAM]))
    assert [a.bias for a in world_annotators(world)] != [a.bias for a in raters]
    # one image's annotations do not depend on which other images were annotated with it
    true = {d: 3.0 for d in DIMENSIONS}
    alone = annotate_samples([true], world, 1, "train", [(7, 101)])
    among = annotate_samples([true, true], world, 1, "train", [(0, 100), (7, 101)])
    assert alone[0] == among[1]


def test_indomain_settings_seeds_and_rationale():
    s = InDomainSettings(train_per_prompt=2, test_per_prompt=3, seed_start=100)
    assert s.seeds("train") == (100, 101) and s.seeds("test") == (100, 101, 102)
    with pytest.raises(ValueError, match="test_per_prompt"):
        InDomainSettings(test_per_prompt=1)
    sev = dict.fromkeys(("color", "count", "position", "shape"), 0.0) | {"color": 0.5, "shape": 0.9}
    assert (
        measured_rationale(sev, "alignment")
        == "For text-image alignment: clear color defect; severe shape defect."
    )
    clean = dict.fromkeys(("noise", "blotch", "smear"), 0.0)
    assert measured_rationale(clean, "realism") == "For realism: no visible defect."
