import random

import torch
import torch.nn.functional as F
from transformers import CLIPModel

from studies.clip_training import (
    ClipTrainConfig,
    batches,
    init_positions,
    match_matrix,
    multi_positive_loss,
    preprocess,
    region_loss,
    region_targets,
    sincos_positions,
    train,
)
from synthetic.scene_texts import SceneText, Spec, caption
from synthetic.scenes import patch_masks, random_scene, render
from synthetic.tiny_models import build_clip_tokenizer, tiny_clip_config


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


def test_region_targets_label_each_patch_by_the_texts_that_fit_its_object():
    scene = random_scene(random.Random(3), min_objects=2, max_objects=2, repeat_shapes=0.0)
    first, second = scene.objects
    texts = [SceneText(f"the {first.shape}", (Spec(first.shape),)),
             SceneText(f"something {second.colour}", (Spec(colour=second.colour),)),
             SceneText("a grey moon", (Spec("moon"),))]
    targets, on_object = region_targets([scene], texts)
    masks = torch.from_numpy(patch_masks(scene))
    assert targets.shape == (1, 576, 4) and torch.equal(on_object[0], masks.any(0))
    assert targets[0, masks[0], 0].all() and not targets[0, masks[1], 0].any()
    assert targets[0, masks[1], 1].all()
    assert targets[0, masks[0], 1].all() == (first.colour == second.colour)  # a colour text fits any object of it
    assert not targets[0, :, 2].any()  # nothing in the scene is a moon
    assert torch.equal(targets[0, :, 3], ~on_object[0])  # the background text: every uncovered patch


def test_region_loss_is_low_when_each_patch_meets_its_own_text():
    texts = F.normalize(torch.eye(3, 8)[:3], dim=-1)  # two object texts and the background
    targets = torch.zeros(1, 4, 3, dtype=torch.bool)
    targets[0, 0, 0] = targets[0, 1, 1] = targets[0, 2, 2] = targets[0, 3, 2] = True
    on_object = torch.tensor([[True, True, False, False]])
    aligned = torch.stack([texts[0], texts[1], texts[2], texts[2]])[None]
    swapped = torch.stack([texts[1], texts[0], texts[0], texts[1]])[None]
    scale = torch.tensor(10.0)
    assert region_loss(aligned, texts, targets, on_object, scale) < 0.01 < region_loss(swapped, texts, targets, on_object,
                                                                                       scale)


def test_batches_are_deterministic_and_name_every_object():
    first, again = next(batches(5, 3)), next(batches(5, 3))
    assert [t.text for t in first.region_texts] == [t.text for t in again.region_texts]
    assert len(first.region_texts) == sum(len(s.objects) for s in first.scenes)
    objects = [o for s in first.scenes for o in s.objects]
    assert all(t.specs[0].fits(o) for t, o in zip(first.region_texts, objects))


def test_sincos_positions_code_row_and_column_apart():
    codes = sincos_positions(24, 64).reshape(24, 24, 64)
    rows, cols = codes[..., :32], codes[..., 32:]
    assert torch.equal(rows, rows[:, :1].expand_as(rows))  # the first half depends on the row only
    assert torch.equal(cols, cols[:1].expand_as(cols))  # the second on the column only
    flat = codes.reshape(576, 64)
    assert torch.cdist(flat, flat).fill_diagonal_(1.0).min() > 0.05  # every patch coded apart
    assert torch.allclose(sincos_positions(24, 64, 2.0), 2 * sincos_positions(24, 64))


def test_position_init_sets_the_patch_positions_and_leaves_the_class_token():
    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config(build_clip_tokenizer(), width=32, depth=1))
    weight = model.vision_model.embeddings.position_embedding.weight
    cls_before = weight[0].clone()
    init_positions(model, 1.5)
    assert torch.equal(weight[0], cls_before)
    assert torch.allclose(weight[1:], sincos_positions(24, 32, 1.5))
