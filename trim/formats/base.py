"""What every checkpoint layout shares: the settings a checkpoint records, its files read as stored,
the LLM built through the loader in force, and the check of its vision settings against a TRIM cache."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedModel

from trim.llm_loading import load_causal_lm
from trim.model_files import PROJECTOR_FILE, SETTINGS_FILE

logger = logging.getLogger(__name__)

Layout = Literal["llava", "hf-llava", "llm", "trim"]
PROJECTOR_KEYS = ("0.weight", "0.bias", "2.weight", "2.bias")
LLAVA_ARCHITECTURES = ("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json", ".pt", ".pth")


@dataclass
class VisionSettings:
    """The vision side a checkpoint was trained with, as far as it records it (None: not recorded)."""

    tower: str | None = None
    """CLIP tower name or path (LLaVA's `mm_vision_tower`; the checkpoint itself when bundled)."""
    layer: int | None = None
    """Hidden-state index the projector's features come from (LLaVA-1.5: -2, the penultimate)."""
    feature_dim: int | None = None
    """Width of those features: the projector's input (1024 for CLIP ViT-L)."""
    aspect_ratio: str | None = None
    """LLaVA's `image_aspect_ratio`: "pad" (pad to square with the mean colour, LLaVA-1.5), "square"
    (resize and centre-crop), "anyres" (tiles)."""
    select_feature: str = "patch"
    """"patch" (CLS dropped, LLaVA-1.5) or "cls_patch" (CLS kept)."""
    tower_bundled: bool = False
    """The vision tower's weights ship inside the checkpoint (hf-llava)."""
    image_size: int | None = None
    """Input side in pixels (336 for ViT-L/14-336), where the checkpoint records it."""
    patch_size: int | None = None
    """Patch side in pixels (14), where the checkpoint records it."""


@dataclass
class StartingPoint:
    """What training starts from, whatever the layout it was read from."""

    layout: str
    """One of "llava", "hf-llava", "llm", "trim"."""
    llm: PreTrainedModel
    """A plain Hugging Face causal LM (e.g. LlamaForCausalLM)."""
    projector: dict[str, torch.Tensor] = field(default_factory=dict)
    """The mlp2x_gelu projector's weights in our key names; empty: start a fresh one."""
    vision: VisionSettings = field(default_factory=VisionSettings)
    """The vision settings the checkpoint records."""
    tokenizer_path: str = ""
    """Where the LLM's tokenizer lives."""


# Reading a checkpoint's files -------------------------------------------------------------------

def read_config(path: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint directory, read as JSON (no transformers class chosen by model_type:
    LLaVA's "llava" is not transformers' "llava")."""
    config = Path(path) / "config.json"
    if not config.exists():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    return json.loads(config.read_text())


def detect_layout(path: str | Path) -> Layout:
    """Which layout a checkpoint directory holds (see the module docstring)."""
    path = Path(path)
    if (path / SETTINGS_FILE).exists() and (path / "llm").is_dir():
        return "trim"
    config = read_config(path)
    architectures = config.get("architectures") or []
    if "mm_vision_tower" in config or any(a in LLAVA_ARCHITECTURES for a in architectures):
        return "llava"
    if "LlavaForConditionalGeneration" in architectures or (config.get("model_type") == "llava"
                                                            and "text_config" in config):
        return "hf-llava"
    return "llm"


def weight_files(path: str | Path) -> list[Path]:
    """The weight files of a checkpoint directory: its safetensors (preferred) or PyTorch shards."""
    path = Path(path)
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (path / index).exists():
            weight_map = json.loads((path / index).read_text())["weight_map"]
            return [path / name for name in sorted(set(weight_map.values()))]
        if (path / single).exists():
            return [path / single]
    raise FileNotFoundError(f"{path} holds no model.safetensors or pytorch_model.bin (sharded or not)")


def read_state_dict(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint directory whose names start with `prefix`, as stored (dtype kept)."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)})
        else:
            shard = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            state.update({k: v for k, v in shard.items() if k.startswith(prefix)})
    return state


def stored_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in (its input embeddings')."""
    embeddings = [v for k, v in state.items() if k.endswith("embed_tokens.weight")]
    floating = embeddings or [v for v in state.values() if v.is_floating_point()]
    return floating[0].dtype if floating else torch.float32


def copy_side_files(llm_dir: Path, out: Path) -> None:
    """Copy an LLM directory's files other than its config and weights (tokenizer, generation config)."""
    for file in llm_dir.iterdir():
        if file.is_file() and file.name != "config.json" and not file.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(file, out / file.name)


def projector_from_llava_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The projector's weights in our key names ("0.weight"...): LLaVA names them
    `model.mm_projector.{0,2}.*` (in its weights and its stage-1 mm_projector.bin); a file of ours
    already uses ours. Other keys are left out."""
    return {k.split("mm_projector.")[-1]: v for k, v in state.items()
            if "mm_projector." in k or k.split(".", 1)[0] in ("0", "2")}


def load_llm(path: str | Path, config: Any, dtype: torch.dtype, leftovers: tuple[str, ...] = (),
             key_mapping: dict[str, str] | None = None, **kwargs: Any) -> PreTrainedModel:
    """The causal LM of a checkpoint (built from `config` where given: the LLM inside a multimodal one),
    through the loader in force (trim/llm_loading.py). The weights under `leftovers` (projector, vision
    tower) are expected unused; a missing weight is an error naming the checkpoint."""
    llm, missing, unexpected = load_causal_lm(path, config, dtype, key_mapping, **kwargs)
    if missing:
        raise ValueError(f"{path}: the LLM's weights lack {missing[:5]}")
    other = [k for k in unexpected if not k.startswith(leftovers)]
    if other:
        logger.warning("%s: weights not used: %s", path, other[:5])
    return llm


def read_model_dir(model_dir: str | Path) -> tuple[dict[str, Any], Path, dict[str, torch.Tensor]]:
    """(settings, LLM directory, projector state) of a directory LlavaTrim.save wrote."""
    model_dir = Path(model_dir)
    if detect_layout(model_dir) != "trim":
        raise ValueError(f"{model_dir} is not a model directory of this project (llm/, {PROJECTOR_FILE}, "
                         f"{SETTINGS_FILE})")
    settings = json.loads((model_dir / SETTINGS_FILE).read_text())
    # Cloned: a file written before model.save cloned may hold views of one shared buffer.
    projector = {k: v.clone() for k, v in torch.load(model_dir / PROJECTOR_FILE, map_location="cpu",
                                                     weights_only=True).items()}
    return settings, model_dir / "llm", projector


def trim_vision(settings: dict[str, Any]) -> VisionSettings:
    encoder = settings.get("encoder", {})
    return VisionSettings(tower=encoder.get("path"), layer=encoder.get("layer"),
                          feature_dim=settings.get("feature_dim", encoder.get("feature_dim")), aspect_ratio="pad",
                          image_size=encoder.get("image_size"), patch_size=encoder.get("patch_size"))


def stage1_projector(projector_path: str | Path | None) -> dict[str, torch.Tensor]:
    if not projector_path:
        return {}
    """The projector of a stage-1 file (LLaVA's mm_projector.bin or one of ours), in our key names."""
    return projector_from_llava_keys(torch.load(projector_path, map_location="cpu", weights_only=True))


def tokenizer_path(path: str | Path) -> str:
    """Where a checkpoint's tokenizer lives (llm/ inside this project's model directories)."""
    return str(Path(path) / "llm") if detect_layout(path) == "trim" else str(path)


def _same_tower(recorded: str, cache_path: str) -> bool:
    """Same CLIP by path, or by repository name (LLaVA records a hub id, a cache a local copy of it)."""
    def name(p: str) -> str:
        return p.rstrip("/").rsplit("/", 1)[-1].lower()
    return recorded == cache_path or name(recorded) == name(cache_path)


def check_vision_settings(settings: VisionSettings, encoder_info: dict[str, Any]) -> None:
    """Refuse a checkpoint whose vision settings differ from the cache's encoder (the cache manifest's
    encoder dict: path, layer, feature_dim, num_patches, image_size, patch_size), naming both values."""
    problems = []

    def differ(what: str, ours: Any, cache: Any) -> None:
        problems.append(f"{what}: the checkpoint has {ours!r}, the cache's encoder has {cache!r}")

    for what, ours, key in (("vision layer", settings.layer, "layer"), ("feature dim", settings.feature_dim,
                            "feature_dim"), ("image size", settings.image_size, "image_size"),
                            ("patch size", settings.patch_size, "patch_size")):
        if ours is not None and encoder_info.get(key) is not None and int(ours) != int(encoder_info[key]):
            differ(what, ours, encoder_info[key])
    if settings.select_feature != "patch":
        differ("selected features", settings.select_feature, "patch (CLS dropped)")
    padded = "pad to square" in str(encoder_info.get("preprocessing", "pad to square"))
    if settings.aspect_ratio not in (None, "pad") and padded:
        differ("aspect-ratio handling", settings.aspect_ratio, "pad")
    tower, cache_tower = settings.tower, encoder_info.get("path")
    if tower and cache_tower and not settings.tower_bundled and not _same_tower(tower, str(cache_tower)):
        differ("vision tower", tower, cache_tower)
    if problems:
        raise ValueError("the checkpoint's vision settings do not match the TRIM cache's encoder:\n  "
                         + "\n  ".join(problems))


