"""Toy world: rendering, split, codec, text encoder and evaluator behave as specified."""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from fastlightgen.toy import codec, text
from fastlightgen.toy.evaluate import COLUMNS, GATES, evaluate_batch, evaluate_video
from fastlightgen.toy.world import (
    BACKGROUNDS,
    COLOR_NAMES,
    DIRECTIONS,
    SHAPES,
    SPEEDS,
    TOY_WORLD,
    Factors,
    all_combinations,
    caption,
    color_rgb,
    dataset,
    frame_colors,
    heldout_combinations,
    make_batch,
    render,
    render_at,
    render_background,
    sample_factors,
    shape_alpha,
    train_combinations,
    trajectory,
)


@pytest.fixture(scope="module")
def sample() -> list[tuple[torch.Tensor, str, Factors]]:
    items = list(dataset("train", 18, seed=7)) + list(dataset("heldout", 6, seed=7))
    seen = {(f.shape, f.background) for _, _, f in items}
    assert seen == set(itertools.product(SHAPES, BACKGROUNDS)), "sample must cover every shape on both backgrounds"
    assert {(f.speed, f.end_color is None) for _, _, f in items} == set(itertools.product(SPEEDS, (False, True))), \
        "sample must cover both speeds, with and without a color change"
    return items


def _stack(items) -> tuple[torch.Tensor, list[Factors]]:
    return torch.stack([v for v, _, _ in items]), [f for _, _, f in items]


# ---------------------------------------------------------------- world

def test_factors_render_and_caption_are_deterministic_from_the_seed():
    a, b = sample_factors(123), sample_factors(123)
    assert a == b
    assert torch.equal(render(a), render(b))
    assert caption(a) == caption(b)
    assert len({sample_factors(s) for s in range(20)}) == 20


def test_render_shape_range_and_backgrounds():
    factors = sample_factors(5)
    video = render(factors)
    assert video.shape == (3, TOY_WORLD.frames, TOY_WORLD.height, TOY_WORLD.width)
    assert video.min() >= -1 and video.max() <= 1
    plain = render_background(dataclasses.replace(factors, background="plain", texture=None))
    textured_seed = next(s for s in range(50) if sample_factors(s).background == "textured")
    textured = render_background(sample_factors(textured_seed))
    assert torch.all(plain == TOY_WORLD.background_level)
    assert textured.std() > 0.02
    assert (textured - TOY_WORLD.background_level).abs().max() <= TOY_WORLD.texture_amplitude + 1e-6


def test_object_moves_at_its_stated_speed_and_stays_inside_the_frame():
    for seed in range(200):
        f = sample_factors(seed)
        steps = trajectory(f).diff(dim=0)
        expected = torch.tensor(DIRECTIONS[f.direction]) * SPEEDS[f.speed]
        assert f.pixels_per_frame == SPEEDS[f.speed]
        assert torch.allclose(steps, expected.expand_as(steps))
        # Fully inside: no coverage is clipped, so the coverage mass equals that of the same
        # sub-pixel phase rendered around the frame centre.
        centres = trajectory(f)
        mass = shape_alpha(f.shape, centres).sum(dim=(1, 2))
        centred = shape_alpha(f.shape, centres - torch.round(centres - TOY_WORLD.width / 2)).sum(dim=(1, 2))
        assert torch.allclose(mass, centred, atol=1e-3), f"{caption(f)} leaves the frame"


def test_caption_states_every_factor():
    f = Factors("red", "square", "left", "plain", (16.0, 16.0))
    assert caption(f) == "a red square moving left quickly on a plain background"
    f = Factors("red", "circle", "right", "plain", (16.0, 16.0), speed="slowly", end_color="blue")
    assert caption(f) == "a red circle moving right slowly and turning blue on a plain background"
    f = dataclasses.replace(f, speed="quickly")
    assert caption(f) == "a red circle moving right quickly and turning blue on a plain background"


def test_speeds_and_color_changes_are_sampled_per_video():
    drawn = [sample_factors(seed) for seed in range(400)]
    assert {f.speed for f in drawn} == set(SPEEDS)
    changes = [f for f in drawn if f.end_color is not None]
    assert 0.4 < len(changes) / len(drawn) < 0.6
    assert all(f.end_color in COLOR_NAMES and f.end_color != f.color for f in changes)
    assert {f.background for f in (sample_factors(s, backgrounds=("plain",)) for s in range(50))} == {"plain"}


def test_the_object_shows_its_end_color_from_the_change_frame_on():
    change = TOY_WORLD.change_frame
    assert torch.equal(frame_colors("red", None), color_rgb("red").expand(TOY_WORLD.frames, 3))
    colors = frame_colors("red", "blue")
    assert torch.equal(colors[:change], color_rgb("red").expand(change, 3))
    assert torch.equal(colors[change:], color_rgb("blue").expand(TOY_WORLD.frames - change, 3))
    texture = next(t for t in (sample_factors(s).texture for s in range(50)) if t is not None)
    f = Factors("red", "square", "down", "textured", (16.0, 8.0), texture, speed="slowly", end_color="blue")
    video = render(f)
    for frame, (x, y) in enumerate(trajectory(f).tolist()):
        # The square's centre pixel is fully covered: exactly the frame's color.
        assert torch.equal(video[:, frame, int(y), int(x)], colors[frame])
    unchanged = render(dataclasses.replace(f, end_color=None))
    assert torch.equal(video[:, :change], unchanged[:, :change]) and not torch.equal(video, unchanged)


def test_split_is_disjoint_and_training_covers_every_factor_value_and_pair():
    train, heldout = set(train_combinations()), set(heldout_combinations())
    assert not train & heldout
    assert train | heldout == set(all_combinations()) and len(heldout) == 12
    for axis, values in enumerate((COLOR_NAMES, SHAPES, tuple(DIRECTIONS))):
        assert {k[axis] for k in train} == set(values)
    for i, j in itertools.combinations(range(3), 2):
        assert {(k[i], k[j]) for k in train} == {(k[i], k[j]) for k in all_combinations()}


def test_datasets_draw_only_from_their_split_and_are_deterministic():
    train_items = list(dataset("train", 40, seed=3))
    assert all(f.combination in set(train_combinations()) for _, _, f in train_items)
    assert all(f.combination in set(heldout_combinations()) for _, _, f in dataset("heldout", 40, seed=3))
    again = list(dataset("train", 40, seed=3))
    assert all(torch.equal(a[0], b[0]) and a[1:] == b[1:] for a, b in zip(train_items, again))
    batch = make_batch("train", 4, seed=3)
    assert batch.videos.shape == (4, 3, 6, 32, 32)
    assert batch.captions == [c for _, c, _ in train_items[:4]]
    assert not torch.equal(make_batch("train", 4, seed=4).videos, batch.videos)
    with pytest.raises(ValueError):
        list(dataset("test", 1, seed=0))


# ---------------------------------------------------------------- codec

def test_codec_round_trip_is_exact_and_model_space_has_unit_scale():
    videos = make_batch("train", 32, seed=11).videos
    latent = codec.encode_video(videos)
    assert latent.shape == (32, 48, 6, 8, 8)
    assert (codec.decode_video(latent) - videos).abs().max() < 1e-5
    assert abs(latent.mean().item()) < 0.1
    assert 0.8 < latent.std().item() < 1.25


def test_latent_layout_is_a_per_frame_4x4_pixel_unshuffle():
    video = torch.zeros(1, 3, 6, 32, 32)
    video[0, 2, 4, 9, 6] = 1.0  # blue, frame 4, row 9 = 2*4 + 1, column 6 = 1*4 + 2
    packed = codec.pixel_unshuffle_video(video)
    assert packed[0, 2 * 16 + 1 * 4 + 2, 4, 2, 1] == 1.0 and packed.sum() == 1.0


def test_stored_channel_stats_match_the_training_distribution():
    mean, std = codec.measure_channel_stats(n=192, seed=1)
    assert max(abs(a - b) for a, b in zip(mean, codec.CHANNEL_MEAN)) < 0.03
    assert max(abs(a - b) / b for a, b in zip(std, codec.CHANNEL_STD)) < 0.1


def test_comfy_latent_round_trip_matches_comfyui_wan22_normalization():
    model = torch.randn(2, 48, 6, 8, 8)
    comfy = codec.to_comfy_latent(model)
    assert torch.allclose(codec.from_comfy_latent(comfy), model, atol=1e-5)
    # ComfyUI's Wan22.process_in on our LATENT must give the model-space tensor back.
    mean = torch.tensor(codec.WAN22_LATENTS_MEAN).view(1, 48, 1, 1, 1)
    std = torch.tensor(codec.WAN22_LATENTS_STD).view(1, 48, 1, 1, 1)
    assert torch.allclose((comfy - mean) * codec.WAN22_SCALE_FACTOR / std, model, atol=1e-5)
    assert codec.WAN22_LATENTS_MEAN[0] == -0.2289 and codec.WAN22_LATENTS_STD[-1] == 0.7744
    assert len(codec.WAN22_LATENTS_MEAN) == len(codec.WAN22_LATENTS_STD) == 48


# ---------------------------------------------------------------- text

def test_text_encoder_shape_determinism_null_and_order():
    captions = ["a red square moving left on a plain background", "", "a blue circle moving up on a plain background"]
    ctx = text.encode(captions)
    assert ctx.shape == (3, text.TEXT_LEN, 4096) and ctx.dtype == torch.float32
    assert torch.equal(ctx, text.encode(captions))
    assert torch.all(ctx[1] == 0)
    assert torch.all(ctx[0, 9:] == 0) and torch.all(ctx[0, :9].abs().sum(1) > 0)
    assert (ctx[0] - ctx[2]).abs().max() > 1
    assert 0.9 < ctx[0, :9].std().item() < 1.1
    assert not torch.equal(text.encode_caption("red square"), text.encode_caption("square red"))
    assert torch.equal(text.encode_caption("A red square."), text.encode_caption("a red square"))


def test_text_vectors_are_pinned_not_salted():
    # Python's hash() is salted per process; these values must be the same on every run and host.
    vec = text.encode_caption("red")[0]
    assert vec[:3].tolist() == pytest.approx([1.1463, 0.0412, -1.4221], abs=1e-4)


# ---------------------------------------------------------------- evaluator

def test_clean_renders_score_high(sample):
    # The sample holds both speeds and stated color changes: neither costs a clean render anything.
    table = evaluate_batch(*_stack(sample))
    for row in table.rows:
        for column in ("color", "shape", "direction", "imaging_quality"):
            assert row[column] >= 0.9, (column, row)
        assert row["dynamic_degree"] >= 0.9 and row["temporal_flicker"] >= 0.9
        assert row["i2v_subject"] >= 0.95 and row["subject_consistency"] >= 0.95, row
        assert all(row[gate] == 1.0 for gate in GATES) and row["fidelity"] == 1.0, row


def test_pure_noise_scores_low(sample):
    videos, factors = _stack(sample)
    noise = torch.rand(videos.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean = evaluate_batch(noise, factors).mean()
    for column in ("color", "shape", "direction", "imaging_quality", "temporal_flicker"):
        assert mean[column] < 0.2, (column, mean)


def test_frozen_first_frame_has_no_motion(sample):
    videos, factors = _stack(sample)
    frozen = videos[:, :, :1].expand_as(videos)
    for row, f in zip(evaluate_batch(frozen, factors).rows, factors):
        assert row["dynamic_degree"] < 0.05 and row["direction"] < 0.05
        assert row["gate_direction"] == row["gate_speed"] == 0.0
        assert row["i2v_subject"] >= 0.9
        if f.end_color is None:
            assert row["color"] >= 0.9 and row["gate_color"] == 1.0
        else:  # the stated change is missing: half the color credit, and the color gate fails
            assert 0.45 <= row["color"] <= 0.55 and row["gate_color"] == 0.0


@pytest.mark.parametrize("end_color", [None, "cyan"])
def test_wrong_color_shape_or_direction_scores_zero_on_that_factor_only(end_color):
    f = dataclasses.replace(sample_factors(21, train_combinations()), end_color=end_color)
    assert f.color != end_color
    # Neither the stated color nor the stated end color, held throughout: both segments wrong.
    wrong_color = next(c for c in COLOR_NAMES if c not in (f.color, end_color))
    wrong_shape = SHAPES[(SHAPES.index(f.shape) + 1) % len(SHAPES)]
    cases = {
        "color": render_at(f, f.shape, wrong_color, trajectory(f)),
        "shape": render_at(f, wrong_shape, f.color, trajectory(f), end_color),
        "direction": render_at(f, f.shape, f.color, trajectory(f).flip(0), end_color),
    }
    for broken, video in cases.items():
        scores = evaluate_video(video, f)
        assert scores[broken] == 0.0, (broken, scores)
        for other in {"color", "shape", "direction"} - {broken}:
            assert scores[other] >= 0.9, (broken, other, scores)


@pytest.mark.parametrize("visible", [1, 3])
def test_a_vanishing_object_loses_motion_and_subject_credit(sample, visible):
    videos, factors = _stack(sample[:6])
    vanished = torch.stack([render_background(f)[:, None].expand(-1, TOY_WORLD.frames, -1, -1) for f in factors])
    vanished[:, :, :visible] = videos[:, :, :visible]
    frames = TOY_WORLD.frames
    for row in evaluate_batch(vanished, factors).rows:
        for column in ("direction", "dynamic_degree", "motion_smoothness"):
            assert row[column] <= visible / frames + 0.05, (column, row)
        for column in ("i2v_subject", "subject_consistency"):
            assert row[column] <= (visible - 1) / (frames - 1) + 0.05, (column, row)


def test_scores_degrade_with_pixel_noise(sample):
    videos, factors = _stack(sample[:6])
    noisy = videos + 0.15 * torch.randn(videos.shape, generator=torch.Generator().manual_seed(1))
    clean_mean, noisy_mean = evaluate_batch(videos, factors).mean(), evaluate_batch(noisy, factors).mean()
    assert noisy_mean["imaging_quality"] < clean_mean["imaging_quality"] - 0.3
    assert noisy_mean["temporal_flicker"] < clean_mean["temporal_flicker"] - 0.3


def test_eval_table_summaries_and_markdown(sample):
    videos, factors = _stack(sample[:3])
    table = evaluate_batch(videos, factors)
    assert len(table.rows) == 3 and set(table.rows[0]) == set(COLUMNS)
    assert all(0.0 <= v <= 1.0 for row in table.rows for v in row.values())
    assert all(row[gate] in (0.0, 1.0) for row in table.rows for gate in GATES)
    overall = [row["overall"] for row in table.rows]
    assert table.mean()["overall"] == pytest.approx(sum(overall) / 3)
    assert table.std()["overall"] == pytest.approx(torch.tensor(overall, dtype=torch.float64).std(correction=0).item())
    markdown = table.to_markdown(per_video=True)
    assert markdown.count("\n") == 2 + 3 + 1 and caption(factors[0]) in markdown
    with pytest.raises(ValueError):
        evaluate_batch(videos, factors[:2])
