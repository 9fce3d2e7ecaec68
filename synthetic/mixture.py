"""A synthetic LLaVA-1.5 mixture in the real format and folder layout, of any size.

Writes `llava_v1_5_mix665k.json` (a JSON array of {id, image?, conversations}) with the ten sources of
the 665K mixture in their real proportions and prompt styles, images under the real folders (shared
by several samples, as COCO images are), text-only ShareGPT-style rows, and optionally faulty records
(missing or corrupt files, malformed conversations) so the ingest code's rejects are exercised. Also
an evaluation split (questions JSONL, images, annotations). Images are drawn shapes whose colour,
kind, count and box are known (scenes of
synthetic/scenes.py, the ones the project's CLIP knows), so questions have true answers a model can learn.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synthetic.scenes import COLOURS, random_scene, render

# (source, share of the 665K, image folder or None for text-only): LLaVA-1.5 paper, Table 7.
SOURCES: tuple[tuple[str, int, str | None], ...] = (
    ("llava_instruct", 158, "coco/train2017"),
    ("sharegpt", 40, None),
    ("vqav2", 83, "coco/train2017"),
    ("gqa", 72, "gqa/images"),
    ("okvqa", 9, "coco/train2017"),
    ("ocrvqa", 80, "ocr_vqa/images"),
    ("aokvqa", 66, "coco/train2017"),
    ("textcaps", 22, "textvqa/train_images"),
    ("refcoco", 48, "coco/train2017"),
    ("vg", 86, "vg/VG_100K"),
)
IMAGE_FOLDERS = ("coco/train2017", "gqa/images", "ocr_vqa/images", "textvqa/train_images", "vg/VG_100K", "vg/VG_100K_2")
SHAPES = ("circle", "square", "triangle")
SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
WORDS = ("cat", "dog", "car", "bus", "tree", "house", "book", "table", "chair", "cup", "sky", "road", "river")


@dataclass(frozen=True)
class DrawnImage:
    """What an image shows: the ground truth its questions are asked about."""

    relpath: str
    colour: str
    shape: str
    count: int
    box: tuple[float, float, float, float]


SIZES = ((336, 336), (480, 320), (320, 480), (400, 240), (256, 384), (97, 61))


def _draw(path: Path, rng: random.Random, colour: str, shape: str, count: int,
          size: tuple[int, int] | None = None) -> tuple[float, float, float, float]:
    """`count` shapes of one kind and colour in distinct cells of a scene (synthetic/scenes.py: what the
    project's CLIP was trained on); returns the first one's box, normalised."""
    width, height = size or rng.choice(SIZES)
    scene = random_scene(rng, min_objects=count, max_objects=count, size=(width, height))
    objects = tuple(dataclasses.replace(o, shape=shape, colour=colour) for o in scene.objects)
    scene = dataclasses.replace(scene, objects=objects)
    path.parent.mkdir(parents=True, exist_ok=True)
    render(scene).save(path, quality=90)
    x0, y0, x1, y1 = objects[0].box
    return (round(max(0, x0) / width, 2), round(max(0, y0) / height, 2), round(min(width, x1) / width, 2),
            round(min(height, y1) / height, 2))


def _image_pool(image_root: Path, folder: str, count: int, rng: random.Random, prefix: str,
                size: tuple[int, int] | None = None) -> list[DrawnImage]:
    pool = []
    for i in range(count):
        # VG's images really are split over two folders.
        sub = "vg/VG_100K_2" if folder == "vg/VG_100K" and i % 2 else folder
        relpath = f"{sub}/{prefix}{i:012d}.jpg"
        colour, shape, n = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.randint(1, 4)
        box = _draw(image_root / relpath, rng, colour, shape, n, size)
        pool.append(DrawnImage(relpath, colour, shape, n, box))
    return pool


def _turns(pairs: list[tuple[str, str]]) -> list[dict]:
    conversations = []
    for question, answer in pairs:
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return conversations


def _conversation(source: str, img: DrawnImage | None, rng: random.Random) -> list[dict]:
    """One record's turns, in the prompt style of its source."""
    if source == "sharegpt":
        topic = rng.choice(WORDS)
        pairs = [(f"Please write a short story about a {topic}.",
                  f"Once there was a {topic} who lived by the {rng.choice(WORDS)}."),
                 ("Explain why briefly.", f"Because the {topic} liked the {rng.choice(WORDS)}.")]
        return _turns(pairs[: rng.randint(1, 2)])
    assert img is not None
    colour_q = (f"What is the colour of the {img.shape}?", img.colour)
    count_q = (f"How many {img.shape}s are there?", str(img.count))
    shape_q = ("What kind of shape is in the picture?", img.shape)
    if source == "llava_instruct":
        pairs = [(colour_q[0], f"The {img.shape} is {img.colour}."), (count_q[0], f"There are {img.count}."),
                 ("Describe the image briefly.", f"A picture of {img.count} {img.colour} {img.shape}s.")]
        pairs = pairs[: rng.randint(1, 3)]
    elif source in ("vqav2", "okvqa", "gqa"):
        pairs = [(f"{q}\n{SHORT}", a) for q, a in rng.sample([colour_q, count_q, shape_q], rng.randint(1, 3))]
    elif source == "ocrvqa":
        pairs = [("Who is the author of this book?", f"{img.colour.title()} {img.shape.title()}"),
                 ("What is the genre of this book?", rng.choice(["Travel", "Cooking", "History"])),
                 ("Is this a comic book?", rng.choice(["Yes", "No"]))][: rng.randint(1, 3)]
    elif source == "aokvqa":
        options = rng.sample([c for c in COLOURS if c != img.colour], 3) + [img.colour]
        rng.shuffle(options)
        letters = "ABCD"
        choices = "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(options))
        pairs = [(f"{colour_q[0]}\n{choices}\n{LETTER}", letters[options.index(img.colour)])]
    elif source == "textcaps":
        pairs = [("Provide a one-sentence caption for the provided image.\nReference OCR token: none",
                  f"A {img.colour} {img.shape} on a plain background.")]
    elif source == "refcoco":
        box = "[" + ", ".join(f"{v:.2f}" for v in img.box) + "]"
        pairs = [("Please provide the bounding box coordinate of the region this sentence describes: "
                  f"{img.colour} {img.shape}.", box)]
    else:  # vg
        box = "[" + ", ".join(f"{v:.2f}" for v in img.box) + "]"
        pairs = [(f"Please provide a short description for this region: {box}", f"{img.colour} {img.shape}")]
    # LLaVA puts the image tag at the start of the first human turn.
    pairs[0] = (f"<image>\n{pairs[0][0]}", pairs[0][1])
    return _turns(pairs)


def _faulty_records(image_root: Path, pool: list[DrawnImage]) -> list[dict]:
    """One record of every kind the ingest code must set aside, each with a telling id."""
    corrupt = "coco/train2017/corrupt_000000000001.jpg"
    (image_root / corrupt).write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    ok_turns = _turns([("<image>\nWhat is this?", "A shape.")])
    return [
        {"id": "bad-missing-file", "image": "coco/train2017/does_not_exist.jpg", "conversations": ok_turns},
        {"id": "bad-corrupt-image", "image": corrupt, "conversations": ok_turns},
        {"id": "bad-malformed", "image": pool[0].relpath, "conversations": [{"from": "robot", "value": "<image>\nhi"}]},
        {"id": "bad-tag-without-image", "conversations": ok_turns},
        {"id": "bad-image-without-tag", "image": pool[0].relpath,
         "conversations": _turns([("What is this?", "A shape.")])},
        {"id": "bad-empty-reply", "image": pool[0].relpath,  # merges its round with the next: labels astray
         "conversations": _turns([("<image>\nWhat is this?", ""), ("And its colour?", "Red.")])},
        {"id": "bad-no-conversations", "image": pool[0].relpath},
    ]


def write_mixture(root: str | Path, num_samples: int, num_images: int, seed: int = 0, faults: bool = False,
                  json_lines: bool = False, image_size: tuple[int, int] | None = None) -> Path:
    """Write the mixture JSON (or JSONL) and its images under root; return the JSON path.

    Images are spread over the sources' folders in proportion; samples draw from their folder's pool,
    so images are shared (at 665K rows a small pool stands in for the real image folders). One
    image_size for all images makes a pool cheap to decode. Same arguments, same bytes.
    """
    root = Path(root)
    rng = random.Random(seed)
    image_root = root / "images"
    total = sum(share for _, share, _ in SOURCES)
    folders = sorted({folder for _, _, folder in SOURCES if folder})
    folder_share = {f: sum(s for _, s, fo in SOURCES if fo == f) for f in folders}
    image_share = sum(folder_share.values())
    pools = {}
    for name in folders:
        count = max(1, round(num_images * folder_share[name] / image_share))
        pools[name] = _image_pool(image_root, name, count, rng, prefix=f"{name.split('/')[0]}_", size=image_size)
    records = []
    for source, share, folder in SOURCES:
        for i in range(max(1, round(num_samples * share / total))):
            img = rng.choice(pools[folder]) if folder else None
            record: dict[str, Any] = {"id": f"{source}-{i:07d}"}
            if source == "llava_instruct" and img:
                # As in the real file: LLaVA-Instruct's records of one COCO image all carry its id.
                record["id"] = img.relpath.rsplit("_", 1)[-1].split(".")[0]
            if img:
                record["image"] = img.relpath
            record["conversations"] = _conversation(source, img, rng)
            records.append(record)
    rng.shuffle(records)
    records = records[:num_samples]
    if faults:
        records += _faulty_records(image_root, pools["coco/train2017"])
    path = root / ("llava_v1_5_mix665k.jsonl" if json_lines else "llava_v1_5_mix665k.json")
    with path.open("w") as out:
        if json_lines:
            out.writelines(json.dumps(r) + "\n" for r in records)
        else:
            json.dump(records, out)
    return path


def write_eval_split(root: str | Path, num_questions: int, seed: int = 1) -> tuple[Path, Path, Path]:
    """LLaVA-style evaluation files: questions.jsonl, images/, annotations.jsonl (VQA, ten answers).
    Returns (questions, images folder, annotations)."""
    root = Path(root)
    rng = random.Random(seed)
    images = root / "images"
    pool = _image_pool(images, ".", num_questions, rng, prefix="eval_")
    questions, annotations = [], []
    for i, img in enumerate(pool):
        relpath = img.relpath.removeprefix("./")
        questions.append({"question_id": i, "image": relpath, "category": "colour",
                          "text": f"What is the colour of the {img.shape}?\n{SHORT}"})
        annotations.append({"question_id": i, "answers": [img.colour] * 10, "kind": "vqa"})
    q_path, a_path = root / "questions.jsonl", root / "annotations.jsonl"
    q_path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    a_path.write_text("".join(json.dumps(a) + "\n" for a in annotations))
    return q_path, images, a_path
