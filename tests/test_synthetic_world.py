"""The synthetic world: grammar, controlled defects and latent scores, renderer, oracle annotators,
the dataset files, and the pixel oracle's agreement with the latent scores."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from zr_diffusion.data import build_pairs, load_records
from zr_diffusion.rubric import DIMENSIONS
from zr_diffusion.scores import ScoreGrid, aggregate_annotators
from zr_diffusion.synthetic import (
    DEFECT_KINDS,
    Annotator,
    Defects,
    Scene,
    WorldConfig,
    annotate,
    build_reward_dataset,
    describe,
    judge,
    latent_scores,
    oracle_scores,
    rationale,
    render,
    sample_defects,
    sample_scene,
)
from zr_diffusion.synthetic.world import KIND_DIMENSION, only

GRID = ScoreGrid()
SCENE = Scene(shape="triangle", color="red", position="left", count=2, background="grey")
# one strong instance of every defect kind (count: two extra objects)
STRONG = {
    "color": {"color": 1.0},
    "count": {"count_delta": 2},
    "position": {"position": 1.0},
    "shape": {"shape": 1.0, "shape_to": "circle"},
    "noise": {"noise": 1.0},
    "blotch": {"blotch": 1.0},
    "smear": {"smear": 1.0},
    "contrast": {"contrast": 1.0},
    "clash": {"clash": 1.0},
    "cutoff": {"cutoff": 1.0},
    "split": {"split": 1.0},
    "fragments": {"fragments": 1.0},
}


# ------------------------------------------------------------------------------ grammar and scores


def test_prompt_grammar():
    assert SCENE.prompt == "two red triangles on the left"
    assert Scene("cross", "blue", "center", 3).prompt == "three blue crosses in the center"
    assert Scene("star", "green", "top", 1).prompt == "one green star at the top"
    with pytest.raises(ValueError, match="Scene.color='mauve' is not one of"):
        Scene("star", "mauve", "top", 1)


def test_latent_score_rule_by_hand():
    """realism: noise 0.5 and blotch 0.5 -> 1 − (1 − .5)(1 − .5) = .75 -> 5 − 4·.75 = 2.0;
    alignment: count off by one -> severity 1/2 -> 5 − 2 = 3.0; the other two dimensions stay 5."""
    scores = latent_scores(Defects(noise=0.5, blotch=0.5, count_delta=-1))
    assert scores == {"alignment": 3.0, "realism": 2.0, "aesthetics": 5.0, "plausibility": 5.0}
    assert latent_scores(Defects()) == dict.fromkeys(DIMENSIONS, 5.0)
    assert latent_scores(Defects(split=1.0))["plausibility"] == 1.0


@pytest.mark.parametrize("kind", list(KIND_DIMENSION))
def test_each_defect_moves_only_its_dimension(kind):
    scores = latent_scores(Defects(**STRONG[kind]))
    assert scores[KIND_DIMENSION[kind]] == 1.0
    assert all(v == 5.0 for d, v in scores.items() if d != KIND_DIMENSION[kind])


def test_sampled_defects_restricted_to_one_dimension_move_only_it():
    cfg, rng = WorldConfig(defect_prob=1.0, second_defect_prob=0.5), np.random.default_rng(0)
    for _ in range(20):
        defects = sample_defects(SCENE, cfg, rng)
        full = latent_scores(defects)
        for dim in DEFECT_KINDS:
            kept = latent_scores(only(defects, dim))
            assert kept[dim] == full[dim]
            assert all(kept[d] == 5.0 for d in DEFECT_KINDS if d != dim)


def test_bad_defects_and_config_are_errors():
    with pytest.raises(ValueError, match=r"Defects.noise=1.5 must be a severity in \[0, 1\]"):
        Defects(noise=1.5)
    with pytest.raises(ValueError, match="shape_to"):
        Defects(shape=0.5)
    with pytest.raises(ValueError, match="gives 0 objects"):
        render(Scene("circle", "red", "left", 1), Defects(count_delta=-1))
    with pytest.raises(ValueError, match="image_size must be 32, 48 or 64"):
        WorldConfig(image_size=40)


# ---------------------------------------------------------------------------------------- renderer


@pytest.mark.parametrize("size", [32, 48, 64])
def test_render_shape_range_and_determinism(size):
    rng = np.random.default_rng(1)
    for _ in range(5):
        scene = sample_scene(rng)
        defects = sample_defects(scene, WorldConfig(defect_prob=0.9), rng)
        a = render(scene, defects, size, np.random.default_rng(7))
        b = render(scene, defects, size, np.random.default_rng(7))
        assert a.shape == (3, size, size) and a.dtype == torch.float32
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
        assert torch.equal(a, b)


def test_every_defect_changes_pixels():
    clean = render(SCENE, Defects(), 32, np.random.default_rng(0))
    for kind, values in STRONG.items():
        img = render(SCENE, Defects(**values), 32, np.random.default_rng(0))
        assert (img - clean).abs().max() > 0.1, kind


def test_describe_and_rationale_name_the_defects():
    defects = Defects(color=1.0, color_sign=1, noise=0.9, fragments=0.5)
    text = describe(SCENE, defects)
    assert text.startswith("The image shows two cyan triangles on the left on a grey background.")
    assert "severe pixel noise" in text and "two loose fragments" in text
    assert rationale(SCENE, defects, "realism").endswith("For realism: severe pixel noise covers the image.")
    assert "nothing lowers the aesthetics" in rationale(SCENE, defects, "aesthetics")


# -------------------------------------------------------------------------------------- annotators


def test_annotator_rounds_to_the_grid_and_clips():
    rng = np.random.default_rng(0)
    exact = Annotator(0, bias=0.0, noise_std=0.0)
    assert annotate(exact, 3.2, rng, GRID) == 3.0
    assert annotate(exact, 3.3, rng, GRID) == 3.5
    assert annotate(Annotator(1, bias=1.0, noise_std=0.0), 4.6, rng, GRID) == 5.0
    assert annotate(Annotator(2, bias=-1.0, noise_std=0.0), 1.4, rng, GRID) == 1.0
    noisy = Annotator(3, bias=0.3, noise_std=0.8)
    for s in np.linspace(1, 5, 30):
        GRID.check(annotate(noisy, float(s), rng, GRID))  # on the grid, or raises


def test_judge_by_hand():
    """A = 4.0 everywhere, B = 3.5 everywhere: A − B = 0.5 > margin 0.25 -> "G"; the reverse "B";
    A − B = 0.2 <= 0.25 -> "S"."""
    a, b = dict.fromkeys(DIMENSIONS, 4.0), dict.fromkeys(DIMENSIONS, 3.5)
    assert judge(a, b, tie_margin=0.25) == "G"
    assert judge(b, a, tie_margin=0.25) == "B"
    assert judge(a, dict.fromkeys(DIMENSIONS, 3.8), tie_margin=0.25) == "S"
    weights = {"alignment": 1.0, "realism": 0.0, "aesthetics": 0.0, "plausibility": 0.0}
    assert judge({**b, "alignment": 5.0}, a, tie_margin=0.25, weights=weights) == "G"


# ----------------------------------------------------------------------------------------- dataset


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    cfg = WorldConfig(seed=3, num_prompts=10, images_per_prompt=3, annotators_per_test_item=5)
    return cfg, build_reward_dataset(cfg, tmp_path_factory.mktemp("world") / "data")


def test_dataset_files_load_and_have_pairs(world):
    cfg, ds = world
    splits = {
        name: load_records(path, require_rationale=True)
        for name, path in (("train", ds.train), ("val", ds.val), ("test", ds.test))
    }
    for name, recs in splits.items():
        assert recs and len(recs) % (cfg.images_per_prompt * len(cfg.dimensions)) == 0
        assert {r.dimension for r in recs} == set(cfg.dimensions)
        assert build_pairs(recs), f"{name} has no same-prompt pairs"
    assert all(len(r.scores) == 1 for r in splits["train"])
    for name in ("val", "test"):
        assert all(len(r.scores) == cfg.annotators_per_test_item for r in splits[name])
        assert all(r.score == aggregate_annotators(r.scores) for r in splits[name])
    prompts = {name: {r.prompt for r in recs} for name, recs in splits.items()}
    assert not (prompts["train"] & prompts["test"]) and not (prompts["train"] & prompts["val"])
    rows = [json.loads(line) for line in ds.images.read_text().splitlines()]
    assert len(rows) == cfg.num_prompts * cfg.images_per_prompt
    assert all(row["description"].startswith("The image shows") for row in rows)


def test_dataset_is_deterministic_per_seed(world, tmp_path):
    cfg, ds = world
    again = build_reward_dataset(cfg, tmp_path / "again")
    for a, b in ((ds.train, again.train), (ds.test, again.test), (ds.images, again.images)):
        assert a.read_bytes() == b.read_bytes()
    pngs = sorted(p.relative_to(ds.root) for p in ds.root.rglob("*.png"))
    assert all((ds.root / p).read_bytes() == (again.root / p).read_bytes() for p in pngs)
    other = build_reward_dataset(dataclasses.replace(cfg, seed=4), tmp_path / "other")
    prompts = lambda path: [json.loads(line)["prompt"] for line in path.read_text().splitlines()]  # noqa: E731
    assert prompts(ds.images) != prompts(other.images)


# ------------------------------------------------------------------------------------------ oracle


def _pearson(x, y) -> float:
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(x) -> np.ndarray:
    """Ranks 0..n-1 with ties sharing their average rank (many scores are exactly 5.0)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, inv = np.unique(x, return_inverse=True)
    return np.bincount(inv, ranks)[inv] / np.bincount(inv)[inv]


def _spearman(x, y) -> float:
    return _pearson(_ranks(x), _ranks(y))


def test_spearman_helper_by_hand():
    """x = [1, 2, 2, 3] -> ranks [0, 1.5, 1.5, 3]; against y = x the correlation is 1."""
    assert _ranks([1, 2, 2, 3]).tolist() == [0.0, 1.5, 1.5, 3.0]
    assert _spearman([1, 2, 2, 3], [10, 20, 20, 30]) == pytest.approx(1.0)


# (Pearson, Spearman) bounds, about 0.03 under what these exact seeds and sample sizes measure:
#   32 px, 200 images: alignment .874/.861, realism .910/.865, aesthetics .946/.932, plausibility .929/.936
#   48 px, 120 images: alignment .933/.920, realism .976/.898, aesthetics .963/.934, plausibility .935/.939
BOUNDS = {
    32: {
        "alignment": (0.84, 0.83),
        "realism": (0.88, 0.83),
        "aesthetics": (0.91, 0.90),
        "plausibility": (0.90, 0.90),
    },
    48: {
        "alignment": (0.90, 0.89),
        "realism": (0.94, 0.86),
        "aesthetics": (0.93, 0.90),
        "plausibility": (0.90, 0.90),
    },
}


@pytest.mark.parametrize(("size", "n"), [(32, 200), (48, 120)])
def test_oracle_tracks_latent_scores(size, n):
    cfg, rng = WorldConfig(image_size=size), np.random.default_rng(100 + size)
    latent, measured = [], []
    for _ in range(n):
        scene = sample_scene(rng)
        defects = sample_defects(scene, cfg, rng)
        latent.append(latent_scores(defects))
        measured.append(oracle_scores(render(scene, defects, size, rng), scene))
    for dim, (pearson, spearman) in BOUNDS[size].items():
        x, y = [s[dim] for s in latent], [s[dim] for s in measured]
        assert _pearson(x, y) > pearson, (dim, _pearson(x, y))
        assert _spearman(x, y) > spearman, (dim, _spearman(x, y))


def test_oracle_clean_and_single_defects():
    """Clean renders score near 5; one strong defect drops its own dimension, not the others much."""
    clean = oracle_scores(render(SCENE, Defects(), 48, np.random.default_rng(0)), SCENE)
    assert all(v >= 4.5 for v in clean.values()), clean
    for kind, values in STRONG.items():
        scores = oracle_scores(render(SCENE, Defects(**values), 48, np.random.default_rng(0)), SCENE)
        dim = KIND_DIMENSION[kind]
        assert scores[dim] <= 2.5, (kind, scores)
        assert all(v >= 4.0 for d, v in scores.items() if d != dim), (kind, scores)
    blank = oracle_scores(torch.full((3, 32, 32), 0.5), SCENE)
    assert blank["alignment"] == 1.0


# ------------------------------------------------------------------------------- the generator


def test_learn_merges_makes_each_word_one_token_most_frequent_pair_first():
    from zr_diffusion.synthetic.generator import learn_merges

    # ("a","b</w>") and ("a","b","c</w>"): every pair occurs once, so ties go by text: (a, b) first;
    # then (a, b</w>) < (ab, c</w>)
    assert learn_merges(["ab", "abc"]) == [("a", "b"), ("a", "b</w>"), ("ab", "c</w>")]


def test_world_tokenizer_gives_one_token_per_world_word_and_falls_back_to_bytes():
    from zr_diffusion.synthetic.generator import world_tokenizer

    tok = world_tokenizer(16)
    assert tok.tokenize(SCENE.prompt) == [
        "two</w>",
        "red</w>",
        "triangles</w>",
        "on</w>",
        "the</w>",
        "left</w>",
    ]
    assert tok.tokenize("a dog") == ["a</w>", "d", "o", "g</w>"]  # outside the grammar: characters
    ids = tok([SCENE.prompt], padding="max_length", max_length=16).input_ids[0]
    assert len(ids) == 16 and ids[0] == tok.bos_token_id and ids[7] == tok.eos_token_id


def test_min_snr_weight_caps_the_signal_to_noise_ratio_at_gamma():
    from diffusers import DDIMScheduler

    from zr_diffusion.synthetic.generator import min_snr_weight

    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 999])
    abar = sched.alphas_cumprod[t]
    snr = abar / (1 - abar)  # t=0: SNR ≈ 1175 > 5; t=999: SNR ≈ 0.005 < 5
    w = min_snr_weight(sched, t, 5.0)
    assert torch.allclose(w, torch.stack([5.0 / snr[0], torch.tensor(1.0)]))
    assert torch.equal(min_snr_weight(sched, t, 0.0), torch.ones(2))


def test_generator_gate_config_refuses_a_bad_split_and_checks_at_the_threshold():
    from zr_diffusion.synthetic.gates import GeneratorGate, gate_check

    with pytest.raises(ValueError, match="generator.gate.split='train'"):
        GeneratorGate(split="train")
    assert gate_check(3.0, 3.0)["passed"] and not gate_check(2.99, 3.0)["passed"]


def test_trained_generator_is_a_diffusers_pipeline_with_the_world_tokenizer(tmp_path):
    from diffusers import DiffusionPipeline

    from zr_diffusion.synthetic.generator import GeneratorConfig, train_generator

    world = WorldConfig(seed=0, image_size=32, num_prompts=6, images_per_prompt=2)
    ds = build_reward_dataset(world, tmp_path / "world")
    cfg = GeneratorConfig(channels=8, text_width=16, num_images=8, batch_size=4, vae_steps=2, steps=2)
    metrics = train_generator(tmp_path / "gen", world, ds.images, cfg, seed=0)
    pipe = DiffusionPipeline.from_pretrained(metrics["pipeline"])
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert len(pipe.tokenizer.tokenize(SCENE.prompt)) == 6
    assert pipe.vae.config.scaling_factor == pytest.approx(metrics["latent_scaling_factor"])
    assert len(metrics["train"]) == 2 and metrics["cpu_seconds"] > 0


def test_grammar_corpus_is_every_prompt_but_the_held_out_ones(world):
    from zr_diffusion.synthetic.pretrain import PretrainConfig, corpus_scenes, split_scenes
    from zr_diffusion.synthetic.world import COLORS, COUNTS, POSITIONS, SHAPES

    _, ds = world
    splits = split_scenes(ds.images)
    held_out = {s.prompt for split in ("val", "test") for s in splits[split]}
    grammar = [s.prompt for s in corpus_scenes(ds.images, "grammar")]
    assert (
        len(grammar)
        == len(set(grammar))
        == len(SHAPES) * len(COLORS) * len(POSITIONS) * len(COUNTS) - len(held_out)
    )
    assert not held_out & set(grammar) and {s.prompt for s in splits["train"]} <= set(grammar)
    assert corpus_scenes(ds.images, "train") == splits["train"]
    with pytest.raises(ValueError, match="corpus='all'"):
        PretrainConfig(corpus="all")


def test_generator_corpus_is_checked():
    from zr_diffusion.synthetic.generator import GeneratorConfig

    with pytest.raises(ValueError, match="generator.corpus='all'"):
        GeneratorConfig(corpus="all")


def test_contents_weight_puts_its_weight_on_the_first_sentence_only():
    from zr_diffusion.synthetic.pretrain import (
        PerceptionItem,
        PretrainConfig,
        _token_weights,
        contents_token_count,
        suffix_ids,
    )
    from zr_diffusion.synthetic.world import Defects
    from zr_diffusion.vlm.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    clean, bad = describe(SCENE, Defects()), describe(SCENE, Defects(noise=0.8))
    items = [PerceptionItem(np.zeros((4, 4, 3)), SCENE.prompt, d, "") for d in (clean, bad)]
    n = [len(suffix_ids(tok, d)) for d in (clean, bad)]
    first = contents_token_count(tok, bad)
    assert first == len(tok.encode(bad.split(". ")[0] + ".", add_special_tokens=False)) < n[1]
    w = _token_weights(tok, items, max(n), 5.0)  # [2, T], suffixes right-aligned
    assert w.shape == (2, max(n)) and (w[0, : max(n) - n[0]] == 0).all()
    row = w[1, max(n) - n[1] :]
    assert (row[:first] == 5.0).all() and (row[first:] == 1.0).all()
    with pytest.raises(ValueError, match="contents_weight"):
        PretrainConfig(contents_weight=0.0)
