import random

import torch
import torch.nn.functional as F
from transformers import CLIPModel

from pipelines.clip_training import ClipTrainConfig, match_matrix, multi_positive_loss, preprocess, train
from pipelines.scene_texts import caption
from pipelines.scenes import random_scene, render
from trim.tiny import build_clip_tokenizer, tiny_clip_config


def test_one_positive_per_row_is_clips_loss():
    logits = torch.randn(5, 5)
    expected = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.t(), torch.arange(5))) / 2
    assert torch.allclose(multi_positive_loss(logits, torch.eye(5, dtype=torch.bool)), expected)


def test_a_text_that_fits_two_scenes_spreads_its_target():
    logits = torch.zeros(2, 2)
    logits[0, 1] = logits[1, 1] = 5.0  # text 1 scores both images high: right, it fits both
    both = torch.tensor([[True, True], [False, True]])
    assert multi_positive_loss(logits, both) < multi_positive_loss(logits, torch.eye(2, dtype=torch.bool))


def test_captions_match_their_own_scene():
    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(6)]
    fits = match_matrix(scenes, [caption(s) for s in scenes])
    assert fits.diagonal().all()


def test_preprocess_pads_to_a_square_at_clip_geometry():
    scene = random_scene(random.Random(1), size=(448, 336))
    pixels = preprocess([render(scene)])
    assert pixels.shape == (1, 3, 336, 336)
    # The padding rows (top 21 in CLIP's frame) hold LLaVA's pad colour, normalised: the same value.
    assert torch.allclose(pixels[0, :, 0, 0], pixels[0, :, 5, 100], atol=1e-5)


def test_training_steps_change_the_weights_and_report_retrieval():
    tokenizer = build_clip_tokenizer()
    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config(tokenizer, width=32, depth=2, projection_dim=16))
    before = model.visual_projection.weight.clone()
    figures = train(model, tokenizer, ClipTrainConfig(steps=2, batch_size=4, warmup=1))
    assert not torch.equal(before, model.visual_projection.weight)
    assert 0.0 <= figures["retrieval_top1"] <= 1.0 and figures["retrieval_chance"] == 0.01
