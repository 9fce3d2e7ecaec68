"""The project's trained tiny CLIP (models/tiny-clip): it loads the way a hub checkpoint does, retrieves
the right caption well above chance, and TRIM's kept patches land on the object a question names."""

import pytest
from transformers import CLIPModel

from studies.clip_training import retrieval_accuracy
from studies.feature_probe import probe
from studies.grounding import cases, measure, settings
from synthetic.tiny_models import shipped_clip
from trim.encoders import ClipEncoder


@pytest.fixture(scope="module")
def encoder():
    return ClipEncoder(shipped_clip())


def test_loads_through_from_pretrained_at_clip_geometry(encoder):
    model = CLIPModel.from_pretrained(str(shipped_clip()))
    assert model.config.vision_config.image_size == 336 and model.config.vision_config.patch_size == 14
    assert encoder.num_patches == 576


def test_retrieves_the_right_caption_well_above_chance(encoder):
    figures = retrieval_accuracy(encoder.model, encoder.tokenizer, num=100)
    assert figures["retrieval_top1"] >= 10 * figures["retrieval_chance"]


def test_kept_patches_lie_on_the_named_object_far_above_chance(encoder):
    items = cases(60)
    rows = {name: measure(encoder, items, cfg) for name, cfg in settings().items()}
    chance = rows.pop("random patches (paper's IQR counts)")["precision"]
    assert max(r["precision"] for r in rows.values()) >= 3 * chance


def test_patch_features_tell_an_objects_colour(encoder):
    figures = probe(encoder, num_scenes=300)
    assert figures["probe_colour"] >= 0.9  # chance 1/8
    assert set(figures) == {"probe_colour", "probe_shape", "probe_cell", "objects"} and figures["objects"] > 300


def test_too_few_probe_scenes_are_refused(encoder):
    with pytest.raises(ValueError, match="2 scenes"):
        probe(encoder, num_scenes=2)
