"""Loading a checkpoint's causal LM, through one function every layout uses, with a pluggable loader.

transformers' `from_pretrained` is the default. A trainer can put another loader in place for a block
of code (`using_llm_loader`): under ZeRO-3, pipelines/train/zero3_load.py builds the model already partitioned
and streams the weights in one file at a time, where `from_pretrained` holds the whole checkpoint in
rank 0's memory. This module stays free of DeepSpeed: it only knows the loader's signature.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as transformers_logging

from trim import attention  # noqa: F401  (registers the "sdpa_packed" attention every loader may be asked for)

LlmLoader = Callable[..., tuple[PreTrainedModel, list[str], list[str]]]
"""(path, config or None, dtype, key_mapping or None, **from_pretrained kwargs) -> (model, missing keys,
unexpected keys). key_mapping: {regex: replacement} from checkpoint names to the model's (the first
pattern that matches renames a key)."""

_LOADER: ContextVar[LlmLoader | None] = ContextVar("llm_loader", default=None)


def from_pretrained(path: str | Path, config: Any, dtype: torch.dtype, key_mapping: dict[str, str] | None = None,
                    **kwargs: Any) -> tuple[PreTrainedModel, list[str], list[str]]:
    """transformers' loader; its load report is silenced (the caller checks and words it)."""
    extra = {"config": config} if config is not None else {}
    if key_mapping:
        extra["key_mapping"] = key_mapping
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, output_loading_info=True,
                                                           **extra, **kwargs)
    finally:
        transformers_logging.set_verbosity(verbosity)
    llm, info = loaded
    return llm, sorted(info["missing_keys"]), sorted(info["unexpected_keys"])


def load_causal_lm(path: str | Path, config: Any, dtype: torch.dtype, key_mapping: dict[str, str] | None = None,
                   **kwargs: Any) -> tuple[PreTrainedModel, list[str], list[str]]:
    """The causal LM at `path` (built from `config` where given) with the loader in force."""
    loader = _LOADER.get() or from_pretrained
    return loader(path, config, dtype, key_mapping, **kwargs)


@contextlib.contextmanager
def using_llm_loader(loader: LlmLoader | None) -> Iterator[None]:
    """Within the block, every checkpoint's LLM is loaded by `loader` (None: from_pretrained)."""
    token = _LOADER.set(loader)
    try:
        yield
    finally:
        _LOADER.reset(token)
