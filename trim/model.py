"""LLaVA-1.5's design on reduced visual tokens: an mlp2x_gelu projector in front of any causal LM.

Each sample's visual tokens (a different count per sample, already reduced by TRIM) are projected
and spliced in at its IMAGE_TOKEN_INDEX placeholder; text-only samples have no placeholder and need
no dummy image. No vision tower here: it ran offline (training) or runs beside (inference).
Micro-batches (padded or packed) and where each spliced position comes from: trim/batching.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from trim import attention  # noqa: F401  (registers "sdpa_packed")
from trim.batching import Batch, Spliced, splice_layout
from trim.llm_tokenizer import keep_legacy_setting, load_llm_tokenizer
from trim.model_files import PROJECTOR_FILE, SETTINGS_FILE

logger = logging.getLogger(__name__)


def build_projector(feature_dim: int, hidden_size: int) -> nn.Sequential:
    """LLaVA-1.5's `mlp2x_gelu`: Linear(D -> H), GELU, Linear(H -> H)."""
    return nn.Sequential(nn.Linear(feature_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))


class LlavaTrim(nn.Module):
    """Projector + causal LM, trained on sequences whose images are already TRIM-reduced tokens."""

    def __init__(self, llm: PreTrainedModel, projector: nn.Module, settings: dict | None = None):
        super().__init__()
        self.llm = llm
        self.projector = projector
        self.settings = dict(settings or {})

    def enable_gradient_checkpointing(self) -> None:
        """Recompute decoder layers in backward (non-reentrant: the inputs_embeds need no grad flag)."""
        kwargs = {"use_reentrant": False}
        if hasattr(self.llm, "activation_checkpointing_enable"):  # newer transformers: the old name warns
            self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.llm.config.use_cache = False

    def set_trainable(self, train_llm: bool) -> None:
        """Freezing options of LLaVA's stages: projector only (pretraining) or projector + LLM."""
        self.projector.requires_grad_(True)
        self.llm.requires_grad_(train_llm)

    def to_device(self, batch: Batch) -> Batch:
        """The batch on the LLM's device, visual tokens in the projector's dtype (a CPU-built batch
        then runs on a CUDA model)."""
        device = self.llm.device
        dtype = next(self.projector.parameters()).dtype

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        return Batch(input_ids=move(batch.input_ids), labels=move(batch.labels),
                     attention_mask=move(batch.attention_mask),
                     position_ids=None if batch.position_ids is None else move(batch.position_ids),
                     visual=[v.to(device=device, dtype=dtype, non_blocking=True) for v in batch.visual])

    def embed(self, batch: Batch) -> Spliced:
        """Projected visual tokens spliced in at each sample's placeholder: one projector call and one
        gather for the whole batch (the layout is worked out on the CPU, without device syncs)."""
        layout = splice_layout(batch)
        batch = self.to_device(batch)
        text = self.llm.get_input_embeddings()(batch.input_ids.clamp(min=0))  # placeholder/padding: any row
        hidden = text.shape[-1]
        visual = [v for v in batch.visual if v.shape[0]]
        projected = self.projector(torch.cat(visual)).to(text.dtype) if visual else text.new_zeros(0, hidden)
        source = torch.cat([text.reshape(-1, hidden), projected, text.new_zeros(1, hidden)])
        device = text.device
        positions = layout.position_ids.to(device) if batch.position_ids is not None else None
        return Spliced(embeds=source[layout.index.to(device)], attention_mask=layout.mask.to(device),
                       labels=layout.labels.to(device), position_ids=positions)

    def splice(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """inputs_embeds, attention_mask and labels (see `embed`), rows right-padded to the longest."""
        spliced = self.embed(batch)
        return spliced.embeds, spliced.attention_mask, spliced.labels

    def forward(self, batch: Batch) -> torch.Tensor:
        """Mean next-token cross-entropy over the supervised positions (padded or packed alike)."""
        s = self.embed(batch)
        if s.position_ids is None:
            out = self.llm(inputs_embeds=s.embeds, attention_mask=s.attention_mask, labels=s.labels, use_cache=False)
        elif (self.llm.config._attn_implementation or "").startswith("flash_attention"):
            # Flash reads packed boundaries from position ids only in a single row: flatten the rows.
            real = s.attention_mask.bool()
            out = self.llm(inputs_embeds=s.embeds[real][None], position_ids=s.position_ids[real][None],
                           labels=s.labels[real][None], use_cache=False)
        else:
            # No 2D mask: transformers builds the per-sample causal mask from the position ids.
            out = self.llm(inputs_embeds=s.embeds, position_ids=s.position_ids, labels=s.labels, use_cache=False)
        loss = out.loss
        if not any(v.shape[0] for v in batch.visual):
            # A text-only micro-batch still touches the projector (with weight 0): data-parallel
            # workers must all reduce gradients for the same parameters (LLaVA uses a dummy image).
            dummy = self.projector(s.embeds.new_zeros(1, self.settings["feature_dim"]))
            loss = loss + 0.0 * dummy.sum()
        return loss

    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int, eos_token_id: int, pad_token_id: int) -> list[list[int]]:
        """Greedy answers for prompts (left-padded internally so every row ends at the prompt's end)."""
        if batch.position_ids is not None:
            raise ValueError("generate takes a padded batch (pad_batch), not a packed one")
        embeds, mask, _ = self.splice(batch)
        lengths = mask.sum(dim=1)
        width = int(lengths.max())
        left = embeds.new_zeros(embeds.shape[0], width, embeds.shape[-1])
        left_mask = torch.zeros_like(mask[:, :width])
        for b, n in enumerate(lengths.tolist()):
            left[b, width - n:] = embeds[b, :n]
            left_mask[b, width - n:] = 1
        generate: Any = self.llm.generate  # typed as a tensor attribute by nn.Module
        out = generate(inputs_embeds=left, attention_mask=left_mask, max_new_tokens=max_new_tokens,
                                do_sample=False, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        answers = []
        for row in out.tolist():
            answer = []
            for token in row:
                if token == eos_token_id:
                    break
                answer.append(token)
            answers.append(answer)
        return answers

    # A model directory: the LLM (save_pretrained), the projector, the TRIM/encoder settings -------

    def save(self, directory: str | Path, tokenizer=None, state_dict: dict | None = None) -> Path:
        """Write the model directory. state_dict: a full (gathered) state dict of this module, when
        the parameters live sharded elsewhere (ZeRO-3)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = state_dict if state_dict is not None else self.state_dict()
        llm_state = {k[len("llm."):]: v for k, v in state.items() if k.startswith("llm.")}
        # Cloned: after DeepSpeed the parameters are views into flat buffers, and torch.save would
        # write each whole buffer (and the exports would find tensors sharing storage).
        projector_state = {k[len("projector."):]: v.detach().clone() for k, v in state.items()
                           if k.startswith("projector.")}
        self.llm.save_pretrained(directory / "llm", state_dict=llm_state)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory / "llm")
            keep_legacy_setting(tokenizer, directory / "llm")
        torch.save(projector_state, directory / PROJECTOR_FILE)
        (directory / SETTINGS_FILE).write_text(json.dumps(self.settings, indent=2, sort_keys=True))
        return directory

    @classmethod
    def load(cls, directory: str | Path, dtype: torch.dtype = torch.float32,
             attn_implementation: str | None = None) -> tuple[LlavaTrim, object]:
        """(model, tokenizer) from a directory written by save()."""
        directory = Path(directory)
        settings = json.loads((directory / SETTINGS_FILE).read_text())
        extra: dict[str, Any] = {"attn_implementation": attn_implementation} if attn_implementation else {}
        llm = AutoModelForCausalLM.from_pretrained(str(directory / "llm"), dtype=dtype, **extra)
        projector = build_projector(settings["feature_dim"], llm.config.hidden_size).to(dtype)
        projector.load_state_dict(torch.load(directory / PROJECTOR_FILE, map_location="cpu", weights_only=True))
        tokenizer = load_llm_tokenizer(directory / "llm")
        return cls(llm, projector, settings).eval(), tokenizer
