"""An LLM checkpoint into a ZeRO-3 model, one weight file at a time.

transformers' `from_pretrained` under ZeRO-3 creates the parameters partitioned (zero.Init), then has
rank 0 open every weight file of the checkpoint at once and copy from that merged state dict: rank 0
holds the whole checkpoint while it loads (2 x the fp32 weights of a 300M model in
benchmarks/bench_zero3_build.py; a 7B checkpoint per node besides the partitions). Here the model is
created partitioned by `from_config`, and each file is opened in turn: the parameters of one module at
a time are gathered (DeepSpeed's public GatheredParameters), filled by rank 0 from that file and
partitioned again. Rank 0's peak is its partition plus one module plus the pages of one open file.

Every rank reads the files' names and shapes (cheap: headers, memory-mapped) so that a bad checkpoint
fails the same way on every rank, naming the file and the weight, instead of hanging the collectives.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import re
import struct
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from trim.formats.base import weight_files

logger = logging.getLogger(__name__)


def load_partitioned(path: str | Path, config: Any, dtype: torch.dtype, key_mapping: dict[str, str] | None = None,
                     ds_config: dict | None = None, **kwargs: Any) -> tuple[PreTrainedModel, list[str], list[str]]:
    """trim.llm_loading's loader signature: (model, missing keys, unexpected keys), the model's
    parameters partitioned by ZeRO-3 as `ds_config` (the engine's DeepSpeed config) says. Call it where
    transformers' HfDeepSpeedConfig is alive (pipelines.train.engine.zero3_init)."""
    from transformers import AutoConfig

    path = Path(path)
    config = config if config is not None else AutoConfig.from_pretrained(str(path))
    if ds_config is None:
        from transformers.integrations import deepspeed_config

        ds_config = deepspeed_config()  # the one HfDeepSpeedConfig keeps alive
    if not ds_config:
        raise RuntimeError("load_partitioned needs the DeepSpeed config (ds_config, or HfDeepSpeedConfig alive)")
    with _heap_returned():
        return _load(path, config, dtype, key_mapping, ds_config, kwargs)


def _load(path: Path, config: Any, dtype: torch.dtype, key_mapping: dict[str, str] | None, ds_config: dict,
          kwargs: dict[str, Any]) -> tuple[PreTrainedModel, list[str], list[str]]:
    import deepspeed
    from transformers import GenerationConfig

    model = _build(config, dtype, ds_config, kwargs)
    _return_freed_memory()
    with contextlib.suppress(OSError):  # generation defaults travel with the model into the export
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    params = dict(model.named_parameters(remove_duplicate=False))
    filled: set[int] = set()
    unexpected: list[str] = []
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    for file in weight_files(path):
        weights = _WeightFile(file)
        by_module, extra = _place(weights, model, params, key_mapping)
        unexpected += extra
        for entries in by_module.values():
            targets = [params[name] for _, name in entries]
            with deepspeed.zero.GatheredParameters(targets, modifier_rank=0):
                if rank0:
                    for key, name in entries:
                        params[name].data.copy_(weights.get(key))
            filled.update(id(p) for p in targets)
            _return_freed_memory()
        del weights  # unmaps the file
        logger.info("loaded %s", file.name)
    missing = sorted(name for name, p in params.items() if id(p) not in filled)
    return model, missing, sorted(unexpected)


def _build(config: Any, dtype: torch.dtype, ds_config: dict, kwargs: dict[str, Any]) -> PreTrainedModel:
    """The model created partitioned (zero.Init) and left uninitialized, as transformers' from_config
    creates it under ZeRO-3 minus its weight initialization: that gathers every module once more, for
    values the checkpoint then overwrites (and on the CPU leaves the heap fragmented: 1.3 x the rank's
    share of extra peak memory at 300M). transformers versions without these helpers get from_config."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        from transformers.initialization import no_init_weights
        from transformers.integrations.deepspeed import prevent_arange_dtype_change
    except ImportError:
        return AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    config.dtype = dtype
    if "attn_implementation" in kwargs:
        config._attn_implementation = kwargs.pop("attn_implementation")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        # prevent_arange_dtype_change keeps RoPE's frequencies in fp32 (it must come before zero.Init);
        # zero.Init takes the dtype from the config's bf16/fp16 sections (its dtype argument is ignored
        # on accelerators without fp16, the CPU included).
        with no_init_weights(), prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=ds_config):
            model_class: Any = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
            model = model_class(config, **kwargs)
    finally:
        torch.set_default_dtype(previous)
    model.tie_weights()
    return model


M_MMAP_THRESHOLD = -3
"""mallopt's parameter: allocations from this size up are mapped on their own and unmapped when freed."""


@contextlib.contextmanager
def _heap_returned() -> Iterator[None]:
    """While loading, every gather allocates and frees whole modules. glibc serves allocations below
    its mmap threshold (which it raises to the largest block freed, up to 32 MB) from its heap and keeps
    what is freed there: on the CPU a rank's peak grew by 0.3-0.7 x its share over a 300M load. Multi-MB
    blocks are mapped on their own during the load; after it the threshold is left at 32 MB, where
    glibc's own adjustment ends up."""
    if _LIBC is not None:
        _LIBC.mallopt(M_MMAP_THRESHOLD, 4 << 20)
    try:
        yield
    finally:
        if _LIBC is not None:
            _LIBC.mallopt(M_MMAP_THRESHOLD, 32 << 20)


def _return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _place(weights: _WeightFile, model: PreTrainedModel, params: dict[str, torch.nn.Parameter],
           key_mapping: dict[str, str] | None) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    """A file's parameters grouped by module as (checkpoint key, parameter name), shapes checked; its
    buffers copied (not partitioned: every rank copies); the keys the model has no place for."""
    buffers = dict(model.named_buffers())
    prefix = f"{model.base_model_prefix}."
    by_module: dict[str, list[tuple[str, str]]] = defaultdict(list)
    unexpected = []
    for key in weights.keys():
        name = _rename(key, key_mapping)
        if name not in params and name not in buffers and prefix + name in params:
            name = prefix + name  # a checkpoint of the base model alone
        if name in params:
            _check_shape(weights.file, key, weights.shape(key), tuple(_full_shape(params[name])))
            by_module[name.rpartition(".")[0]].append((key, name))
        elif name in buffers:
            buffers[name].data.copy_(weights.get(key))
        else:
            unexpected.append(key)
    return by_module, unexpected


_LIBC = None
with contextlib.suppress(OSError, AttributeError):  # glibc only
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim  # noqa: B018 (an AttributeError here: not glibc)

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


class _WeightFile:
    """One weight file, memory-mapped: names and shapes from its header, each tensor a view of the
    mapping (its pages are read when it is copied into the model and unmapped with the file; no copy
    of it is allocated, which on the CPU would leave the allocator's heap fragmented)."""

    def __init__(self, file: Path) -> None:
        self.file = file
        if file.suffix == ".safetensors":
            with open(file, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                self._header = {k: v for k, v in json.loads(f.read(length)).items() if k != "__metadata__"}
            self._start = 8 + length
            self._storage: Any = torch.UntypedStorage.from_file(str(file), False, file.stat().st_size)
            self._tensors: dict[str, torch.Tensor] = {}
        else:
            self._tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=True)

    def keys(self) -> list[str]:
        return sorted(self._tensors or self._header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape) if self._tensors else tuple(self._header[key]["shape"])

    def get(self, key: str) -> torch.Tensor:
        if self._tensors:
            return self._tensors[key]
        info = self._header[key]
        begin, end = info["data_offsets"]
        raw = torch.empty(0, dtype=torch.uint8).set_(self._storage, self._start + begin, (end - begin,), (1,))
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        if (self._start + begin) % dtype.itemsize:  # a view needs aligned elements: copy this one
            raw = raw.clone()
        return raw.view(dtype).reshape(info["shape"])


def _rename(key: str, key_mapping: dict[str, str] | None) -> str:
    for pattern, replacement in (key_mapping or {}).items():
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    return key


def _full_shape(param: torch.Tensor) -> torch.Size:
    return getattr(param, "ds_shape", param.shape)  # a partitioned parameter's full shape


def _check_shape(file: Path, key: str, stored: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if stored != expected:
        raise ValueError(f"{file}: weight {key} has shape {list(stored)}, the model built from the "
                         f"checkpoint's config expects {list(expected)}")
