"""The TRIM method: presets, a hand-worked example of the released formula, golden indices,
invariants (hypothesis) and edge cases."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trim import TrimConfig, trim_tokens


def _inputs(batch, patches, dim=6, embed=5, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, patches, dim, generator=g)
    patch_embeds = torch.randn(batch, patches, embed, generator=g) * scale
    text = torch.randn(batch, embed, generator=g) * scale
    return features, patch_embeds, text


# Presets and config -----------------------------------------------------------------------------


def test_presets_are_what_the_design_says():
    default = TrimConfig()
    assert (default.similarity, default.keep, default.threshold, default.iqr_scope) == (
        "dot", "least_similar", "iqr", "sample")
    paper = TrimConfig.paper()
    assert (paper.similarity, paper.keep, paper.iqr_scope) == ("cosine", "most_similar", "sample")
    official = TrimConfig.official()
    assert (official.similarity, official.keep, official.iqr_scope) == ("dot", "least_similar", "batch")
    fixed = TrimConfig.fixed_ratio(0.05)
    assert (fixed.threshold, fixed.ratio, fixed.similarity) == ("ratio", 0.05, "cosine")
    assert TrimConfig.preset("ratio:0.1").ratio == 0.1
    assert TrimConfig.preset("official", text="questions").text == "questions"


def test_config_round_trips_through_json():
    for cfg in (TrimConfig(), TrimConfig.paper(), TrimConfig.official(), TrimConfig.fixed_ratio(0.25)):
        assert TrimConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("bad", [dict(similarity="l2"), dict(ratio=1.5), dict(iqr_scope="global"),
                                 dict(text="answers"), dict(batch_group_size=0)])
def test_config_rejects_bad_values_by_name(bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
        TrimConfig(**bad)


def test_config_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown fields"):
        TrimConfig.from_dict({"similarty": "dot"})


# The released formula, step by step -------------------------------------------------------------


def test_released_formula_hand_worked():
    """B=2, N=4, E=2, text [1, 0] for both: the dot products are the patch embeds' first coordinate.

    sample 0 dots [0, 0, 0, -4]: negated [0, 0, 0, 4]; softmax: e^4 = 54.598, Z = 57.598,
        values [0.017362, 0.017362, 0.017362, 0.947915]
    sample 1 dots [0, 0, 0, 0]: softmax [0.25] * 4
    batch-wide (official): the 8 values sorted: 3 x 0.017362, 4 x 0.25, 0.947915.
        np.percentile linear: Q1 at position 0.25*7 = 1.75 -> 0.017362; Q3 at 5.25 -> 0.25.
        upper = 0.25 + 1.5 * (0.25 - 0.017362) = 0.598957: one outlier of 8 -> ratio 1/8,
        n = int(4 * 1/8) = 0 for both: nothing kept (the released code crashes here; we return the
        aggregate alone).
    per sample (default): sample 0: Q1 = Q3 = 0.017362, upper = 0.017362: one outlier (index 3).
        sample 1: all equal, upper = 0.25: no outlier.
    """
    features = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    patch_embeds = torch.zeros(2, 4, 2)
    patch_embeds[0, 3, 0] = -4.0
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0]])

    z = 3 + math.exp(4)
    expected_scores = torch.tensor([[1 / z, 1 / z, 1 / z, math.exp(4) / z], [0.25] * 4])

    official = trim_tokens(features, patch_embeds, text, TrimConfig.official())
    torch.testing.assert_close(official.scores, expected_scores)
    assert official.num_kept.tolist() == [0, 0]
    assert not official.keep_mask.any()
    for b in range(2):
        assert official.tokens[b].shape == (1, 3)
        torch.testing.assert_close(official.tokens[b][0], features[b].mean(dim=0))

    default = trim_tokens(features, patch_embeds, text, TrimConfig())
    assert default.num_kept.tolist() == [1, 0]
    assert default.keep_mask[0].tolist() == [False, False, False, True]
    torch.testing.assert_close(default.tokens[0][0], features[0, 3])
    torch.testing.assert_close(default.tokens[0][1], features[0, :3].mean(dim=0))


def test_official_batch_iqr_matches_numpy_reference():
    """The released steps written out with numpy on a realistic batch (B=4, N=576)."""
    features, patch_embeds, text = _inputs(4, 576, dim=8, embed=16, seed=3, scale=2.0)
    out = trim_tokens(features, patch_embeds, text, TrimConfig.official())

    sims = -(patch_embeds.numpy() @ text.numpy()[:, :, None]).squeeze(-1)
    soft = np.exp(sims - sims.max(axis=1, keepdims=True))
    soft = (soft / soft.sum(axis=1, keepdims=True)).astype(np.float32).flatten()
    q1, q3 = np.percentile(soft, 25), np.percentile(soft, 75)
    ratio = (soft > q3 + 1.5 * (q3 - q1)).sum() / soft.size
    n = int(576 * ratio)
    assert n > 0
    assert out.num_kept.tolist() == [n] * 4
    top = np.argsort(-soft.reshape(4, 576), axis=1)[:, :n]
    for b in range(4):
        assert sorted(top[b].tolist()) == torch.nonzero(out.keep_mask[b]).flatten().tolist()


# Golden kept indices (regression: fixed inputs, one per preset) ----------------------------------

GOLDEN = {
    "default": [[2, 4, 7, 10, 15, 23, 30, 31], [1, 8, 11, 12, 13, 14, 17, 30]],
    "paper": [[3], []],
    "official": [[4, 7, 10, 15, 23, 30, 31], [1, 8, 11, 12, 13, 14, 17]],
    "ratio:0.25": [[3, 14, 16, 18, 19, 22, 24, 26], [2, 4, 18, 20, 21, 22, 24, 31]],
}


@pytest.mark.parametrize("preset", sorted(GOLDEN))
def test_golden_kept_indices(preset):
    features, patch_embeds, text = _inputs(2, 32, seed=7)
    out = trim_tokens(features, patch_embeds, text, TrimConfig.preset(preset))
    kept = [torch.nonzero(out.keep_mask[b]).flatten().tolist() for b in range(2)]
    assert kept == GOLDEN[preset]


# Invariants -------------------------------------------------------------------------------------

configs = st.sampled_from([TrimConfig(), TrimConfig.paper(), TrimConfig.official(), TrimConfig.fixed_ratio(0.1),
                           TrimConfig(selection="uniform"), TrimConfig(selection="random")])


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 3), patches=st.integers(1, 40), seed=st.integers(0, 10_000), cfg=configs,
       scale=st.sampled_from([0.1, 1.0, 5.0, 30.0]))
def test_invariants(batch, patches, seed, cfg, scale):
    features, patch_embeds, text = _inputs(batch, patches, seed=seed, scale=scale)
    out = trim_tokens(features, patch_embeds, text, cfg)
    assert out.keep_mask.shape == (batch, patches)
    assert out.num_kept.tolist() == out.keep_mask.sum(dim=1).tolist()
    for b in range(batch):
        kept_idx = torch.nonzero(out.keep_mask[b]).flatten()
        k = len(kept_idx)
        # Kept tokens are the kept features, in raster order (kept ⊆ all by construction of the mask).
        torch.testing.assert_close(out.tokens[b][:k], features[b, kept_idx])
        rest = features[b, ~out.keep_mask[b]]
        if len(rest):
            assert out.has_aggregate[b]
            torch.testing.assert_close(out.tokens[b][k], rest.mean(dim=0))
            assert out.tokens[b].shape[0] == k + 1
        else:
            assert not out.has_aggregate[b] and out.tokens[b].shape[0] == k
        assert torch.isfinite(out.tokens[b]).all()
    if cfg.iqr_scope == "batch" and cfg.threshold == "iqr":
        assert len(set(out.num_kept.tolist())) == 1


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(2, 4), patches=st.integers(2, 50), seed=st.integers(0, 10_000),
       cfg=st.sampled_from([TrimConfig(), TrimConfig.paper(), TrimConfig.fixed_ratio(0.2)]))
def test_per_sample_results_do_not_depend_on_the_batch(batch, patches, seed, cfg):
    features, patch_embeds, text = _inputs(batch, patches, seed=seed)
    together = trim_tokens(features, patch_embeds, text, cfg)
    for b in range(batch):
        alone = trim_tokens(features[b:b + 1], patch_embeds[b:b + 1], text[b:b + 1], cfg)
        assert torch.equal(alone.keep_mask[0], together.keep_mask[b])
        torch.testing.assert_close(alone.tokens[0], together.tokens[b])


# Edge cases -------------------------------------------------------------------------------------


def test_nothing_kept_gives_the_aggregate_alone():
    features, patch_embeds, text = _inputs(2, 10)
    out = trim_tokens(features, patch_embeds, text, TrimConfig.fixed_ratio(0.0))
    assert out.num_kept.tolist() == [0, 0]
    for b in range(2):
        assert out.tokens[b].shape == (1, features.shape[-1])
        torch.testing.assert_close(out.tokens[b][0], features[b].mean(dim=0))


def test_everything_kept_has_no_aggregate_and_no_nan():
    features, patch_embeds, text = _inputs(2, 10)
    for cfg in (TrimConfig.fixed_ratio(1.0), TrimConfig(selection="all")):
        out = trim_tokens(features, patch_embeds, text, cfg)
        assert out.num_kept.tolist() == [10, 10]
        assert not out.has_aggregate.any()
        for b in range(2):
            torch.testing.assert_close(out.tokens[b], features[b])


def test_single_patch_and_single_sample():
    features, patch_embeds, text = _inputs(1, 1)
    out = trim_tokens(features, patch_embeds, text, TrimConfig())
    # One value: Q1 = Q3 = upper, nothing is strictly above it: the aggregate is the patch itself.
    assert out.num_kept.tolist() == [0]
    torch.testing.assert_close(out.tokens[0][0], features[0, 0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_fp32(dtype):
    features, patch_embeds, text = _inputs(2, 64, seed=11)
    features, patch_embeds, text = features.to(dtype), patch_embeds.to(dtype), text.to(dtype)
    half = trim_tokens(features, patch_embeds, text, TrimConfig())
    full = trim_tokens(features.float(), patch_embeds.float(), text.float(), TrimConfig())
    assert half.scores.dtype == torch.float32
    assert torch.equal(half.keep_mask, full.keep_mask)
    assert all(t.dtype == dtype for t in half.tokens)


@pytest.mark.parametrize("name", ["features", "patch_embeds", "text_embeds"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_raise_naming_the_input_and_item(name, bad):
    inputs = dict(zip(("features", "patch_embeds", "text_embeds"), _inputs(3, 8)))
    inputs[name][1].view(-1)[0] = bad
    with pytest.raises(ValueError, match=rf"{name} holds NaN or inf in batch item\(s\) \[1\]"):
        trim_tokens(inputs["features"], inputs["patch_embeds"], inputs["text_embeds"], TrimConfig())


def test_shape_mismatch_raises():
    features, patch_embeds, text = _inputs(2, 8)
    with pytest.raises(ValueError, match="disagree"):
        trim_tokens(features, patch_embeds[:, :7], text)
    with pytest.raises(ValueError, match="expects"):
        trim_tokens(features[0], patch_embeds, text)


# Baselines behind the same interface ------------------------------------------------------------


def test_baselines_keep_the_same_count_as_trim():
    features, patch_embeds, text = _inputs(3, 576, dim=4, embed=8, seed=5, scale=4.0)
    trim = trim_tokens(features, patch_embeds, text, TrimConfig())
    for selection in ("uniform", "random"):
        out = trim_tokens(features, patch_embeds, text, TrimConfig(selection=selection))
        assert torch.equal(out.num_kept, trim.num_kept)
    pooled = trim_tokens(features, patch_embeds, text, TrimConfig(selection="pool"))
    assert pooled.num_tokens == [max(int(n), 1) for n in trim.num_kept]
    assert not pooled.keep_mask.any()


def test_uniform_is_evenly_spaced_and_random_is_seeded():
    features, patch_embeds, text = _inputs(1, 16)
    uniform = trim_tokens(features, patch_embeds, text, TrimConfig(selection="uniform", threshold="ratio", ratio=0.25))
    assert torch.nonzero(uniform.keep_mask[0]).flatten().tolist() == [2, 6, 10, 14]
    cfg = TrimConfig(selection="random", threshold="ratio", ratio=0.25)
    a = trim_tokens(features, patch_embeds, text, cfg, seeds=[42])
    b = trim_tokens(features, patch_embeds, text, cfg, seeds=[42])
    c = trim_tokens(features, patch_embeds, text, cfg, seeds=[43])
    assert torch.equal(a.keep_mask, b.keep_mask) and a.num_kept.item() == 4
    assert not torch.equal(a.keep_mask, c.keep_mask)
