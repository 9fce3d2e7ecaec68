import random

import numpy as np

from synthetic.scene_texts import Spec, caption, object_question, random_text
from synthetic.scenes import COLOURS, GRID, POSITIONS, Scene, SceneObject, patch_masks, random_scene, render


def test_same_seed_same_scene_and_pixels():
    a, b = random_scene(random.Random(3)), random_scene(random.Random(3))
    assert a == b
    assert np.array_equal(np.asarray(render(a)), np.asarray(render(b)))


def test_objects_sit_in_distinct_cells_inside_the_image():
    rng = random.Random(0)
    for _ in range(50):
        scene = random_scene(rng)
        assert 1 <= len(scene.objects) <= 4
        assert len({o.position for o in scene.objects}) == len(scene.objects)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            assert obj.position in POSITIONS
            assert -2 <= x0 < x1 <= scene.width + 2 and -2 <= y0 < y1 <= scene.height + 2


def test_a_square_is_drawn_in_its_colour_where_its_box_says():
    obj = SceneObject("square", "red", "large", "middle", (100, 100, 200, 200))
    image = render(Scene(336, 336, (120, 120, 120), 1, (obj,)))
    assert image.getpixel((150, 150)) == COLOURS["red"]
    assert image.getpixel((20, 20)) != COLOURS["red"]


def test_patch_masks_cover_the_object_in_the_padded_square_frame():
    # 672x336: padded to 672x672 (168 rows on top), then halved to 336: the object's pixel rows
    # 0..112 land on rows 84..140 of CLIP's frame, columns 0..56: patch rows 6..9, columns 0..3.
    obj = SceneObject("square", "blue", "large", "left", (0, 0, 112, 112))
    mask = patch_masks(Scene(672, 336, (120, 120, 120), 1, (obj,)))[0].reshape(GRID, GRID)
    assert mask[6:10, 0:4].all()
    assert mask.sum() == 16


def test_texts_match_the_scenes_that_have_what_they_name():
    scene = Scene(336, 336, (120, 120, 120), 1, (
        SceneObject("triangle", "red", "small", "top", (150, 10, 190, 50)),
        SceneObject("circle", "blue", "small", "bottom", (150, 280, 190, 320))))
    other = Scene(336, 336, (120, 120, 120), 1, (SceneObject("star", "red", "small", "top", (150, 10, 190, 50)),))
    assert caption(scene).matches(scene) and not caption(scene).matches(other)
    assert Spec(colour="red").fits(other.objects[0])
    question = object_question(scene.objects[0], random.Random(0))
    assert "triangle" in question.text and question.matches(scene) and not question.matches(other)
    rng = random.Random(1)
    for _ in range(20):
        assert random_text(scene, rng).matches(scene)
