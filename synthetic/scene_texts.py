"""Texts about synthetic scenes, each with the spec of what it says, so a batch's image-text pairs
can be labelled (a text "matches" every scene that has what it names, not only its own).

Three kinds, as CLIP meets them and as TRIM embeds them: phrases naming one object ("a red
triangle"), questions naming one object ("What is the colour of the triangle?"), and captions naming
every object of the scene.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from synthetic.scenes import Scene, SceneObject


@dataclass(frozen=True)
class Spec:
    """One object a text names; None is "any"."""

    shape: str | None = None
    colour: str | None = None
    position: str | None = None

    def fits(self, obj: SceneObject) -> bool:
        return ((self.shape is None or obj.shape == self.shape) and (self.colour is None or obj.colour == self.colour)
                and (self.position is None or obj.position == self.position))


@dataclass(frozen=True)
class SceneText:
    """A text and the objects it names (all must be in a scene for the text to match it)."""

    text: str
    specs: tuple[Spec, ...]

    def matches(self, scene: Scene) -> bool:
        return all(any(spec.fits(o) for o in scene.objects) for spec in self.specs)


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def caption(scene: Scene) -> SceneText:
    """Every object, in grid order: "a red triangle at the top left, a blue circle in the middle"."""
    parts = [f"a {o.colour} {o.shape} at the {o.position}" for o in scene.objects]
    return SceneText(", ".join(parts), tuple(Spec(o.shape, o.colour, o.position) for o in scene.objects))


def object_phrase(obj: SceneObject, rng: random.Random) -> SceneText:
    kind = rng.randrange(5)
    if kind == 0:
        return SceneText(f"a {obj.colour} {obj.shape}", (Spec(obj.shape, obj.colour),))
    if kind == 1:
        return SceneText(f"the {obj.shape}", (Spec(obj.shape),))
    if kind == 2:
        return SceneText(f"a {obj.size} {obj.colour} {obj.shape} at the {obj.position}",
                         (Spec(obj.shape, obj.colour, obj.position),))
    if kind == 3:
        return SceneText(f"something {obj.colour}", (Spec(colour=obj.colour),))
    return SceneText(f"something at the {obj.position}", (Spec(position=obj.position),))


def object_question(obj: SceneObject, rng: random.Random) -> SceneText:
    """A question about one object, worded as the ablation's questions are."""
    kind = rng.randrange(3)
    if kind == 0:
        return SceneText(f"What is the colour of the {obj.shape}?", (Spec(obj.shape),))
    if kind == 1:
        return SceneText(f"Where is the {obj.colour} {obj.shape}?", (Spec(obj.shape, obj.colour),))
    return SceneText(f"How many {plural(obj.shape)} are there?", (Spec(obj.shape),))


def random_text(scene: Scene, rng: random.Random) -> SceneText:
    """One training text for a scene: a caption, a phrase or a question, about a random object."""
    kind = rng.random()
    if kind < 0.3:
        return caption(scene)
    obj = rng.choice(scene.objects)
    return object_phrase(obj, rng) if kind < 0.65 else object_question(obj, rng)
