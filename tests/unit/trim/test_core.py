"""The TRIM method: presets, a hand-worked example of the released formula, golden indices,
invariants (hypothesis) and edge cases; the batched implementation against the per-sample loop it
replaced (reference_trim.py), and the released code at the encoder's dtype."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trim.core as core
from tests.unit.trim.reference_trim import reference_count_kept, reference_trim_tokens
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


# The batched implementation against the per-sample loop it replaced ----------------------------

def _assert_same_as_reference(features, patch_embeds, text, cfg, seeds=None):
    """Mask, scores, counts, aggregate flags and kept tokens equal bit for bit; the aggregate (an
    fp32 mean summed in another order) equal to fp32 rounding, then cast to the features' dtype."""
    new = trim_tokens(features, patch_embeds, text, cfg, seeds=seeds)
    ref = reference_trim_tokens(features, patch_embeds, text, cfg, seeds=seeds)
    assert torch.equal(new.keep_mask, ref.keep_mask)
    assert new.scores.dtype == ref.scores.dtype and torch.equal(new.scores, ref.scores)
    assert new.num_kept.dtype == ref.num_kept.dtype and torch.equal(new.num_kept, ref.num_kept)
    assert torch.equal(new.has_aggregate, ref.has_aggregate)
    assert len(new.tokens) == len(ref.tokens)
    for a, b, has in zip(new.tokens, ref.tokens, ref.has_aggregate.tolist()):
        assert a.shape == b.shape and a.dtype == b.dtype
        k = a.shape[0] - int(has)
        assert torch.equal(a[:k], b[:k])
        if has:
            torch.testing.assert_close(a[k:], b[k:])
    return new


def _compatible(cfg):
    """The reference has no score_dtype: compare a preset with its scores in fp32."""
    return dataclasses.replace(cfg, score_dtype="float32")


_PRESETS = {"default": TrimConfig(), "paper": TrimConfig.paper(), "official": _compatible(TrimConfig.official()),
            "official:0.05": _compatible(TrimConfig.official(0.05)), "ratio:0.1": TrimConfig.fixed_ratio(0.1),
            "ratio:1": TrimConfig.fixed_ratio(1.0), "all": TrimConfig(selection="all"),
            "uniform": TrimConfig(selection="uniform"), "random": TrimConfig(selection="random"),
            "pool": TrimConfig(selection="pool"), "no aggregate": TrimConfig(aggregate=False),
            "k=0": TrimConfig(iqr_multiplier=0.0), "batch k=0.7": _compatible(TrimConfig.official())}
_PRESETS["batch k=0.7"] = dataclasses.replace(_PRESETS["batch k=0.7"], iqr_multiplier=0.7)


def _edge_inputs(kind, batch, patches, dtype, seed, scale):
    """Inputs whose scores have the shapes that break naive implementations."""
    features, patch_embeds, text = _inputs(batch, patches, dim=8, embed=6, seed=seed, scale=scale)
    if kind == "all equal":  # every score equal: Q1 = Q3, nothing strictly above, n = 0 for IQR
        patch_embeds = torch.ones_like(patch_embeds)
    elif kind == "ties":  # a few distinct score values: ties at the quartiles and at the top-n cut
        patch_embeds = torch.round(patch_embeds / scale)
        text = torch.round(text / scale)
    elif kind == "one outlier":  # one patch per image far above a flat rest
        patch_embeds = torch.zeros_like(patch_embeds)
        patch_embeds[:, patches // 2] = -scale * text
    elif kind == "equal features":
        features = torch.ones_like(features)
    return features.to(dtype), patch_embeds.to(dtype), text.to(dtype)


@settings(max_examples=150, deadline=None)
@given(preset=st.sampled_from(sorted(_PRESETS)), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       batch=st.integers(1, 6), patches=st.sampled_from([1, 2, 3, 4, 5, 7, 16, 33, 576]),
       kind=st.sampled_from(["gaussian", "gaussian", "all equal", "ties", "one outlier",
                             "equal features"]),
       seed=st.integers(0, 10_000), scale=st.sampled_from([0.05, 1.0, 3.0, 10.0]))
def test_batched_matches_the_per_sample_reference(preset, dtype, batch, patches, kind, seed, scale):
    inputs = _edge_inputs(kind, batch, patches, dtype, seed, scale)
    _assert_same_as_reference(*inputs, _PRESETS[preset], seeds=[seed + i for i in range(batch)])


@pytest.mark.parametrize("preset", sorted(_PRESETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_matches_the_reference_on_a_realistic_batch(preset, dtype):
    """N = 576, E = 64, norms where the released scoring keeps ~20% (B = 6)."""
    g = torch.Generator().manual_seed(5)
    features = torch.randn(6, 576, 16, generator=g).to(dtype)
    patch_embeds = (torch.randn(6, 576, 64, generator=g) * 2.5).to(dtype)
    text = (torch.randn(6, 64, generator=g) * 2.5).to(dtype)
    out = _assert_same_as_reference(features, patch_embeds, text, _PRESETS[preset])
    if preset == "default":
        assert 0.1 < out.num_kept.float().mean() / 576 < 0.4


@pytest.mark.parametrize("case", ["n=0", "everything kept"])
def test_batched_matches_the_reference_at_the_extremes(case):
    features, patch_embeds, text = _inputs(3, 40)
    cfg = TrimConfig.fixed_ratio(0.0 if case == "n=0" else 1.0)
    out = _assert_same_as_reference(features, patch_embeds, text, cfg)
    assert out.num_kept.tolist() == ([0] * 3 if case == "n=0" else [40] * 3)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 700), q=st.sampled_from([25, 75]), levels=st.sampled_from([2, 5, 1000]),
       seed=st.integers(0, 10_000))
def test_quartiles_are_numpys_bit_for_bit(n, q, levels, seed):
    g = torch.Generator().manual_seed(seed)
    values = (torch.randint(0, levels, (n,), generator=g).float() + torch.rand(n, generator=g)) / 577
    ours = core._percentile(values.sort().values.unsqueeze(0), q)[0]
    theirs = np.percentile(values.numpy(), q)
    assert float(ours) == float(theirs) and ours.dtype == (torch.float64 if theirs.dtype == np.float64 else torch.float32)


def test_iqr_bound_rounds_as_the_installed_numpy():
    """A patch exactly at the fp32-computed bound: numpy >= 2 computes Q3 + 1.5 IQR in fp32 and does
    not keep it; numpy < 2 computes it in float64, compares in fp32, and keeps it. Follow numpy."""
    q1, q3 = np.float32(0.000283196714008227), np.float32(0.0015260294312611222)
    edge = np.float32(0.0033902786672115326)  # fp32(Q3 + 1.5 IQR) one ulp above the float64 bound
    row = torch.tensor([[q1 / 2, q1 / 2, q1, q1, q1, q3, q3, q3, edge]])  # Q1 = row[2], Q3 = row[6]
    expected = 1 if np.lib.NumpyVersion(np.__version__) < "2.0.0" else 0
    assert reference_count_kept(row, TrimConfig()).tolist() == [expected]
    assert core.count_kept(row, TrimConfig()).tolist() == [expected]
    assert core.count_kept(row, TrimConfig(iqr_scope="batch")).tolist() == [expected]


# The released code at the encoder's dtype (score_dtype="encoder") --------------------------------


def _released_steps(features, patch_embeds, text, ratio=-1.0):
    """CLIPVisionTower.token_reduction's own steps, written out: product, negation and softmax in
    the inputs' dtype; np.percentile over those values cast to fp32; top-n of the encoder-dtype
    scores. Returns the scores, n and the keep mask."""
    sims = torch.matmul(patch_embeds, text.unsqueeze(2)).squeeze(2)
    sims = torch.softmax(-sims, dim=-1)
    n_patches = sims.shape[1]
    if ratio == -1.0:
        flat = sims.to(torch.float32).numpy().flatten()
        q1, q3 = np.percentile(flat, 25), np.percentile(flat, 75)
        ratio = len(np.where(flat > q3 + 1.5 * (q3 - q1))[0]) / len(flat)
    n = int(n_patches * ratio)
    mask = torch.zeros(sims.shape, dtype=torch.bool)
    if n:
        mask[torch.arange(sims.shape[0]).unsqueeze(1), torch.topk(sims, n, dim=1, largest=True, sorted=False).indices] = True
    return sims, n, mask


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("ratio", [None, 0.05, 0.3])
def test_official_reproduces_the_released_steps_at_the_encoder_dtype(dtype, ratio):
    for seed in range(4):
        features, patch_embeds, text = _inputs(4, 576, dim=8, embed=32, seed=seed, scale=1.5)
        features, patch_embeds, text = features.to(dtype), patch_embeds.to(dtype), text.to(dtype)
        out = trim_tokens(features, patch_embeds, text, TrimConfig.official(ratio))
        sims, n, mask = _released_steps(features, patch_embeds, text, -1.0 if ratio is None else ratio)
        assert torch.equal(out.scores, sims.float())
        assert out.num_kept.tolist() == [n] * 4
        assert torch.equal(out.keep_mask, mask)
        for b in range(4):
            torch.testing.assert_close(out.tokens[b][:n], features[b][mask[b]])


def test_encoder_scores_keep_the_bf16_ties_that_fp32_scores_break():
    """bf16 rounding of the products and of the softmax makes ties fp32 does not have: the two
    score dtypes differ on bf16 inputs and agree on fp32 ones."""
    features, patch_embeds, text = _inputs(4, 576, dim=8, embed=32, seed=1, scale=1.5)
    fp32 = dataclasses.replace(TrimConfig.official(), score_dtype="float32")
    bf16 = [t.to(torch.bfloat16) for t in (features, patch_embeds, text)]
    encoder, upcast = trim_tokens(*bf16, TrimConfig.official()), trim_tokens(*bf16, fp32)
    assert torch.unique(encoder.scores).numel() < torch.unique(upcast.scores).numel()
    assert torch.equal(encoder.scores, encoder.scores.to(torch.bfloat16).float())
    same_fp32 = trim_tokens(features, patch_embeds, text, TrimConfig.official())
    reference = trim_tokens(features, patch_embeds, text, fp32)
    assert torch.equal(same_fp32.keep_mask, reference.keep_mask) and torch.equal(same_fp32.scores, reference.scores)


def test_official_ratio_and_score_dtype_in_the_config():
    official = TrimConfig.official()
    assert official.score_dtype == "encoder" and TrimConfig().score_dtype == "float32"
    released_ratio = TrimConfig.official(0.05)
    assert (released_ratio.similarity, released_ratio.keep, released_ratio.threshold, released_ratio.ratio,
            released_ratio.score_dtype) == ("dot", "least_similar", "ratio", 0.05, "encoder")
    assert TrimConfig.preset("official:0.05") == released_ratio
    assert TrimConfig.fixed_ratio(0.05).similarity == "cosine"  # the paper's scoring, unchanged
    assert TrimConfig().batch_group_size == 4
    for cfg in (official, released_ratio, TrimConfig(score_dtype="encoder")):
        assert TrimConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="score_dtype"):
        TrimConfig(score_dtype="bfloat16")


def test_config_written_before_score_dtype_still_loads():
    old = TrimConfig.official().to_dict()
    del old["score_dtype"]
    old["batch_group_size"] = 16
    loaded = TrimConfig.from_dict(old)
    assert loaded.score_dtype == "float32" and loaded.batch_group_size == 16 and loaded.iqr_scope == "batch"


def test_keep_mask_and_tokens_stay_on_the_inputs_device_and_counts_on_the_host():
    features, patch_embeds, text = _inputs(2, 32)
    out = trim_tokens(features, patch_embeds, text, TrimConfig())
    assert out.keep_mask.device == features.device and out.tokens[0].device == features.device
    assert out.num_kept.device.type == "cpu" and out.has_aggregate.device.type == "cpu"
