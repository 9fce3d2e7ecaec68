"""LLaVA-1.5's design on reduced visual tokens: an mlp2x_gelu projector in front of any causal LM.

Each sample's visual tokens (a different count per sample, already reduced by TRIM) are projected
and spliced in at its IMAGE_TOKEN_INDEX placeholder; text-only samples have no placeholder and need
no dummy image. No vision tower here: it ran offline (training) or runs beside (inference).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from trim.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX

PROJECTOR_FILE = "mm_projector.bin"
SETTINGS_FILE = "trim_llava.json"


def build_projector(feature_dim: int, hidden_size: int) -> nn.Sequential:
    """LLaVA-1.5's `mlp2x_gelu`: Linear(D -> H), GELU, Linear(H -> H)."""
    return nn.Sequential(nn.Linear(feature_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))


@dataclass
class Batch:
    """A padded micro-batch, as the collator makes it."""

    input_ids: torch.Tensor
    """[B, T] token ids with at most one IMAGE_TOKEN_INDEX per row, right-padded."""
    labels: torch.Tensor
    """[B, T] IGNORE_INDEX where no loss is taken (prompt, padding)."""
    attention_mask: torch.Tensor
    """[B, T] 1 on real tokens."""
    visual: list[torch.Tensor]
    """B tensors [k_i, D]: each sample's reduced visual tokens (k_i = 0 for text-only samples)."""


class LlavaTrim(nn.Module):
    """Projector + causal LM, trained on sequences whose images are already TRIM-reduced tokens."""

    def __init__(self, llm: PreTrainedModel, projector: nn.Module, settings: dict | None = None):
        super().__init__()
        self.llm = llm
        self.projector = projector
        self.settings = dict(settings or {})

    @classmethod
    def from_llm(cls, llm_path: str | Path, feature_dim: int, projector_path: str | Path | None = None,
                 dtype: torch.dtype = torch.float32, settings: dict | None = None) -> "LlavaTrim":
        """A new model: the LLM from its checkpoint, the projector from LLaVA's stage-1 weights or fresh."""
        llm = AutoModelForCausalLM.from_pretrained(str(llm_path), dtype=dtype)
        projector = build_projector(feature_dim, llm.config.hidden_size).to(dtype)
        if projector_path:
            state = torch.load(projector_path, map_location="cpu", weights_only=True)
            # LLaVA's file names its keys model.mm_projector.{0,2}.*; ours are {0,2}.*
            state = {k.split("mm_projector.")[-1]: v for k, v in state.items()}
            projector.load_state_dict(state)
        settings = {"feature_dim": feature_dim, **(settings or {})}
        return cls(llm, projector, settings)

    def set_trainable(self, train_llm: bool) -> None:
        """Freezing options of LLaVA's stages: projector only (pretraining) or projector + LLM."""
        self.projector.requires_grad_(True)
        self.llm.requires_grad_(train_llm)

    def splice(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """inputs_embeds, attention_mask and labels with each placeholder replaced by its projected
        visual tokens; rows right-padded to the longest result."""
        embed = self.llm.get_input_embeddings()
        ids = batch.input_ids.clamp(min=0)  # the placeholder (and padding) looks up any valid row
        text = embed(ids)
        rows, labels, lengths = [], [], []
        for b in range(ids.shape[0]):
            length = int(batch.attention_mask[b].sum())
            row_ids = batch.input_ids[b, :length]
            places = (row_ids == IMAGE_TOKEN_INDEX).nonzero().flatten()
            if len(places) == 0:
                rows.append(text[b, :length])
                labels.append(batch.labels[b, :length])
            else:
                p = int(places[0])
                visual = self.projector(batch.visual[b].to(text.dtype).to(text.device))
                rows.append(torch.cat([text[b, :p], visual, text[b, p + 1:length]]))
                ignore = torch.full((visual.shape[0],), IGNORE_INDEX, dtype=batch.labels.dtype, device=text.device)
                labels.append(torch.cat([batch.labels[b, :p], ignore, batch.labels[b, p + 1:length]]))
            lengths.append(rows[-1].shape[0])
        width = max(lengths)
        hidden = text.shape[-1]
        embeds = text.new_zeros(len(rows), width, hidden)
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=text.device)
        out_labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=batch.labels.dtype, device=text.device)
        for b, (row, label) in enumerate(zip(rows, labels)):
            embeds[b, : row.shape[0]] = row
            mask[b, : row.shape[0]] = 1
            out_labels[b, : row.shape[0]] = label
        return embeds, mask, out_labels

    def forward(self, batch: Batch) -> torch.Tensor:
        """Mean next-token cross-entropy over the supervised positions."""
        embeds, mask, labels = self.splice(batch)
        loss = self.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False).loss
        if not any(v.shape[0] for v in batch.visual):
            # A text-only micro-batch still touches the projector (with weight 0): data-parallel
            # workers must all reduce gradients for the same parameters (LLaVA uses a dummy image).
            dummy = self.projector(embeds.new_zeros(1, self.settings["feature_dim"]))
            loss = loss + 0.0 * dummy.sum()
        return loss

    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int, eos_token_id: int, pad_token_id: int) -> list[list[int]]:
        """Greedy answers for prompts (left-padded internally so every row ends at the prompt's end)."""
        embeds, mask, _ = self.splice(batch)
        lengths = mask.sum(dim=1)
        width = int(lengths.max())
        left = embeds.new_zeros(embeds.shape[0], width, embeds.shape[-1])
        left_mask = torch.zeros_like(mask[:, :width])
        for b, n in enumerate(lengths.tolist()):
            left[b, width - n:] = embeds[b, :n]
            left_mask[b, width - n:] = 1
        out = self.llm.generate(inputs_embeds=left, attention_mask=left_mask, max_new_tokens=max_new_tokens,
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
        projector_state = {k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")}
        self.llm.save_pretrained(directory / "llm", state_dict=llm_state)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory / "llm")
        torch.save(projector_state, directory / PROJECTOR_FILE)
        (directory / SETTINGS_FILE).write_text(json.dumps(self.settings, indent=2, sort_keys=True))
        return directory

    @classmethod
    def load(cls, directory: str | Path, dtype: torch.dtype = torch.float32) -> tuple["LlavaTrim", object]:
        """(model, tokenizer) from a directory written by save()."""
        directory = Path(directory)
        settings = json.loads((directory / SETTINGS_FILE).read_text())
        llm = AutoModelForCausalLM.from_pretrained(str(directory / "llm"), dtype=dtype)
        projector = build_projector(settings["feature_dim"], llm.config.hidden_size).to(dtype)
        projector.load_state_dict(torch.load(directory / PROJECTOR_FILE, map_location="cpu", weights_only=True))
        tokenizer = AutoTokenizer.from_pretrained(str(directory / "llm"))
        return cls(llm, projector, settings).eval(), tokenizer


def pad_batch(samples: Sequence[dict], pad_token_id: int) -> Batch:
    """Right-pad tokenized samples ({input_ids, labels, visual}) into a Batch."""
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[b, :n] = torch.tensor(s["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(s.get("labels", [IGNORE_INDEX] * n), dtype=torch.long)
        mask[b, :n] = 1
    return Batch(input_ids=ids, labels=labels, attention_mask=mask, visual=[s["visual"] for s in samples])
