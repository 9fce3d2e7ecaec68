"""LLaVA-1.5's design on reduced visual tokens: an mlp2x_gelu projector in front of any causal LM.

Each sample's visual tokens (a different count per sample, already reduced by TRIM) are projected
and spliced in at its IMAGE_TOKEN_INDEX placeholder; text-only samples have no placeholder and need
no dummy image. No vision tower here: it ran offline (training) or runs beside (inference).

A micro-batch is either padded (one sample per row, `pad_batch`) or packed (several samples back to
back in a row, `pack_batch`): a packed batch carries position ids that restart at 0 for each sample,
and no 2D attention mask goes to the LLM, so transformers confines attention to each sample (checked
in 5.17 and 5.23: `create_causal_mask` derives the block-diagonal causal mask from the position ids
for eager, sdpa and flex attention; flash attention reads them as varlen boundaries in a single row).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from trim import attention  # noqa: F401  (registers "sdpa_packed")
from trim.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from trim.llm_tokenizer import keep_legacy_setting, load_llm_tokenizer
from trim.model_files import PROJECTOR_FILE, SETTINGS_FILE

logger = logging.getLogger(__name__)



def build_projector(feature_dim: int, hidden_size: int) -> nn.Sequential:
    """LLaVA-1.5's `mlp2x_gelu`: Linear(D -> H), GELU, Linear(H -> H)."""
    return nn.Sequential(nn.Linear(feature_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))


@dataclass
class Batch:
    """A micro-batch, as the collator makes it: padded (one sample per row) or packed (several)."""

    input_ids: torch.Tensor
    """[R, T] token ids with at most one IMAGE_TOKEN_INDEX per sample, right-padded."""
    labels: torch.Tensor
    """[R, T] IGNORE_INDEX where no loss is taken (prompt, padding)."""
    attention_mask: torch.Tensor
    """[R, T] 1 on real tokens (each row's real tokens first, then its padding)."""
    visual: list[torch.Tensor]
    """One tensor [k_i, D] per sample, in the order the samples appear (row by row): its reduced
    visual tokens (k_i = 0 for text-only samples). In a padded batch sample i is row i."""
    position_ids: torch.Tensor | None = None
    """[R, T] packed batches only: each token's position within its own sample, 0 at each sample's
    first token (that is where a sample starts); None for a padded batch."""


@dataclass
class Spliced:
    """The LLM's input for a Batch: placeholders replaced by projected visual tokens."""

    embeds: torch.Tensor
    """[R, W, H] inputs_embeds; zeros on padding."""
    attention_mask: torch.Tensor
    """[R, W] 1 on real positions."""
    labels: torch.Tensor
    """[R, W] IGNORE_INDEX on visual tokens, padding and each sample's first position."""
    position_ids: torch.Tensor | None
    """[R, W] restarting at 0 per sample (padding counts as one more sequence); None if padded."""


def spliced_length(sample: dict) -> int:
    """Positions a sample takes after splicing: its ids, with the placeholder replaced by k visual tokens."""
    n = len(sample["input_ids"])
    return n - 1 + int(sample["visual"].shape[0]) if IMAGE_TOKEN_INDEX in sample["input_ids"] else n


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
        layout = _layout(batch)
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


@dataclass
class _Layout:
    """Where each spliced position comes from, worked out on the CPU."""

    index: torch.Tensor
    """[R, W] row of cat([text embeddings flattened, projected visual tokens, one zero row])."""
    labels: torch.Tensor
    """[R, W]"""
    mask: torch.Tensor
    """[R, W]"""
    position_ids: torch.Tensor
    """[R, W] restarting at 0 per sample; the padding of a row counts as one more sequence."""


def _segments(batch: Batch, lengths: list[int]) -> list[list[tuple[int, int]]]:
    """Per row, the [start, end) spans of its samples in input-id space."""
    if batch.position_ids is None:
        return [[(0, n)] for n in lengths]
    spans = []
    for row, n in zip(batch.position_ids.cpu().tolist(), lengths):
        starts = [t for t in range(n) if row[t] == 0]
        spans.append(list(zip(starts, starts[1:] + [n])))
    return spans


def _layout(batch: Batch) -> _Layout:
    ids, labels = batch.input_ids.cpu(), batch.labels.cpu()
    rows, width = ids.shape
    counts = [int(v.shape[0]) for v in batch.visual]
    offsets = [rows * width + sum(counts[:i]) for i in range(len(counts) + 1)]  # sample i's projected rows
    spans = _segments(batch, batch.attention_mask.sum(dim=1).cpu().tolist())
    if sum(len(s) for s in spans) != len(counts):
        raise ValueError(f"{len(counts)} visual entries for {sum(len(s) for s in spans)} samples")
    out: list[tuple[list[int], list[int], list[int]]] = []
    sample = 0
    for r, row_spans in enumerate(spans):
        row_ids, row_labels = ids[r].tolist(), labels[r].tolist()
        index: list[int] = []
        label: list[int] = []
        position: list[int] = []
        for start, end in row_spans:
            p = row_ids.index(IMAGE_TOKEN_INDEX, start, end) if IMAGE_TOKEN_INDEX in row_ids[start:end] else end
            visual = range(offsets[sample], offsets[sample + 1]) if p < end else range(0)
            first = len(index)
            index += [*range(r * width + start, r * width + p), *visual, *range(r * width + p + 1, r * width + end)]
            label += [*row_labels[start:p], *[IGNORE_INDEX] * len(visual), *row_labels[p + 1:end]]
            if len(index) > first:
                # The shifted loss predicts position j from j-1: a sample's first label would be
                # predicted from the previous sample's last token. Never a target.
                label[first] = IGNORE_INDEX
            position += range(len(index) - first)
            sample += 1
        out.append((index, label, position))
    spliced_width = max(len(index) for index, _, _ in out)
    layout = _Layout(index=torch.full((rows, spliced_width), offsets[-1], dtype=torch.long),  # the zero row
                     labels=torch.full((rows, spliced_width), IGNORE_INDEX, dtype=labels.dtype),
                     mask=torch.zeros((rows, spliced_width), dtype=torch.long),
                     position_ids=torch.zeros((rows, spliced_width), dtype=torch.long))
    for r, (index, label, position) in enumerate(out):
        n = len(index)
        layout.index[r, :n] = torch.tensor(index, dtype=torch.long)
        layout.labels[r, :n] = torch.tensor(label, dtype=labels.dtype)
        layout.mask[r, :n] = 1
        layout.position_ids[r, :n] = torch.tensor(position, dtype=torch.long)
        layout.position_ids[r, n:] = torch.arange(spliced_width - n)
    return layout


def pad_batch(samples: Sequence[dict], pad_token_id: int) -> Batch:
    """Right-pad tokenized samples ({input_ids, labels, visual}) into a Batch, one sample per row."""
    return _rows([[s] for s in samples], pad_token_id, packed=False)


def pack_batch(samples: Sequence[dict], max_length: int | None, pad_token_id: int) -> Batch:
    """Pack tokenized samples back to back into as few rows as hold them, each row at most
    `max_length` spliced positions (visual tokens count; None: one row), lengths balanced across rows
    to keep the padding small. A sample longer than max_length gets a row of its own."""
    lengths = [spliced_length(s) for s in samples]
    limit = max_length or sum(lengths)
    rows: list[list[int]] = [[] for _ in range(max(1, math.ceil(sum(lengths) / limit)))]
    filled = [0] * len(rows)
    for i in sorted(range(len(samples)), key=lambda i: -lengths[i]):
        fits = [r for r in range(len(rows)) if filled[r] + lengths[i] <= limit or not rows[r]]
        if not fits:
            rows.append([])
            filled.append(0)
            fits = [len(rows) - 1]
        r = min(fits, key=lambda r: filled[r])
        rows[r].append(i)
        filled[r] += lengths[i]
    groups = [[samples[i] for i in sorted(row)] for row in rows if row]
    return _rows(groups, pad_token_id, packed=True)


def _rows(groups: Sequence[Sequence[dict]], pad_token_id: int, packed: bool) -> Batch:
    width = max(sum(len(s["input_ids"]) for s in group) for group in groups)
    ids = torch.full((len(groups), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(groups), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(groups), width), dtype=torch.long)
    positions = torch.zeros((len(groups), width), dtype=torch.long)
    for r, group in enumerate(groups):
        t = 0
        for s in group:
            n = len(s["input_ids"])
            ids[r, t:t + n] = torch.tensor(s["input_ids"], dtype=torch.long)
            labels[r, t:t + n] = torch.tensor(s.get("labels", [IGNORE_INDEX] * n), dtype=torch.long)
            positions[r, t:t + n] = torch.arange(n)
            t += n
        mask[r, :t] = 1
        positions[r, t:] = torch.arange(width - t)
    visual = [s["visual"] for group in groups for s in group]
    return Batch(input_ids=ids, labels=labels, attention_mask=mask, visual=visual,
                 position_ids=positions if packed else None)
