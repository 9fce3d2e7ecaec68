"""Inference with online TRIM: CLIP + TRIM + LLaVA on images and questions, batched.

Pure PyTorch + transformers (no Ray, no MLflow). A batch of questions takes one CLIP image forward,
one CLIP text forward, one `trim_tokens` call and one `LlavaTrim.generate` call. Each row keeps its own
k_i visual tokens: nothing is padded to 576; the rows are left-padded only to the longest spliced
prompt of the batch (as any batched generation is).

    answerer = Answerer.load("checkpoints/tiny/model")          # CLIP path and TRIM config from the dir
    answers = answerer.answer([image], ["What is the colour of the cat?"], max_new_tokens=16)
    answers[0].text, answers[0].num_visual_tokens, answers[0].kept_indices

Every row gets the tokens it would get alone, whatever the batch size used for speed: with the
released `official` config (IQR over the whole batch, one count for all images) TRIM runs on each
image by itself at inference, as the released evaluation, which answers one question at a time.

On CUDA the weights are bf16 (fp16 where bf16 is not supported), on the CPU fp32. `low_latency=True`
answers a batch through `trim.low_latency` (static KV cache, bucketed prompt shapes, CUDA graphs on
CUDA: one graph replay per decode step instead of a launch-bound eager one), with the same tokens.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trim.batching import Batch, pad_batch
from trim.config import TrimConfig
from trim.core import TrimOutput
from trim.encoders import ClipEncoder, checkpoint_hash
from trim.low_latency import LowLatencyGenerator
from trim.model import LlavaTrim
from trim.model_files import SETTINGS_FILE
from trim.questions import QuestionInputs, clip_batch, inference_text, prompt_ids, question_inputs
from trim.reduction import concat_outputs, reduce_images, reduce_pixels

logger = logging.getLogger(__name__)

DEFAULT_MAX_PROMPT_TOKENS = 1024
"""Longest prompt (visual tokens included) the low-latency path pads to a bucket by default: 576
patches, the template and a long question."""


@dataclass
class Answer:
    """One generated answer and what TRIM did to its image."""

    text: str
    """The decoded reply, stripped (LLaVA's answer-file `text`)."""
    token_ids: list[int]
    """Generated token ids, the eos not included."""
    num_visual_tokens: int
    """Visual tokens the LLM saw: kept patches + the aggregate (576 without TRIM)."""
    num_kept: int
    """Patches kept, the aggregate not counted."""
    kept_indices: list[int]
    """Raster indices (0..N-1) of the kept patches, ascending."""
    scores: np.ndarray
    """[N] float32: the softmax scores TRIM thresholded (for pictures)."""
    prompt_tokens: int
    """Length of the LLM's prompt, visual tokens included."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on CUDA (fp16 where the GPU has no bf16), fp32 elsewhere."""
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class Answerer:
    """A LLaVA model on TRIM-reduced tokens with its CLIP towers: images + questions -> answers."""

    def __init__(self, model: LlavaTrim, tokenizer, encoder: ClipEncoder, trim_cfg: TrimConfig | None = None,
                 generators: dict[str, LowLatencyGenerator] | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.encoder = encoder
        settings = model.settings
        if trim_cfg is None:
            trim_cfg = TrimConfig.from_dict(settings["trim"]) if "trim" in settings else TrimConfig()
        self.trim_cfg = trim_cfg
        expected = settings.get("feature_dim")
        if expected is not None and expected != encoder.feature_dim:
            raise ValueError(f"the model's projector takes {expected}-wide features, the CLIP checkpoint at "
                             f"{encoder.path} gives {encoder.feature_dim}")
        if tokenizer.eos_token_id is None:
            raise ValueError("the LLM tokenizer has no eos token")
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else tokenizer.eos_token_id
        # The low-latency generator (static cache, graphs), shared with the with_trim copies.
        self._generators = generators if generators is not None else {}

    @classmethod
    def load(cls, model_dir: str | Path, clip_path: str | Path | None = None, trim_cfg: TrimConfig | None = None,
             device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Answerer:
        """From an exported model directory (LlavaTrim.save) and a CLIP checkpoint. clip_path None:
        the encoder path recorded in the directory's settings; trim_cfg None: the TRIM config the
        model was trained with (its settings["trim"]); device None: CUDA if there is one; dtype
        None: bf16 on CUDA (fp16 without bf16 support), fp32 on the CPU (LLM and CLIP alike)."""
        settings = json.loads((Path(model_dir) / SETTINGS_FILE).read_text())
        encoder_info = settings.get("encoder", {})
        clip_path = clip_path or encoder_info.get("path")
        if not clip_path:
            raise ValueError(f"{model_dir} does not record a CLIP path; pass clip_path")
        recorded = encoder_info.get("config_hash")
        if recorded and recorded != checkpoint_hash(clip_path):
            warnings.warn(f"the CLIP checkpoint at {clip_path} (encoder checkpoint hash {checkpoint_hash(clip_path)}) "
                          f"is not the one {model_dir} was trained with ({recorded})", stacklevel=2)
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        model, tokenizer = LlavaTrim.load(model_dir, dtype=dtype)
        encoder = ClipEncoder(clip_path, layer=int(encoder_info.get("layer", -2)), device=str(device), dtype=dtype)
        logger.info("answerer for %s on %s, %s", model_dir, device, dtype)
        return cls(model.to(device), tokenizer, encoder, trim_cfg)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def with_trim(self, trim_cfg: TrimConfig) -> Answerer:
        """The same model, encoder and low-latency generator (shared, not copied), another TRIM config."""
        return Answerer(self.model, self.tokenizer, self.encoder, trim_cfg, self._generators)

    def scoring_texts(self, questions: Sequence[str]) -> list[str]:
        return [inference_text(q, self.trim_cfg.text_at_inference) for q in questions]

    def reduce(self, images: Sequence[Image.Image], questions: Sequence[str]) -> TrimOutput:
        """CLIP + TRIM for a batch: each image's visual tokens, scores and kept patches, as it would
        get them alone (a batch-wide IQR is taken per image: see reduce_images)."""
        return reduce_images(self.encoder, images, self.scoring_texts(questions), self.trim_cfg, alone=True)

    def prompt_ids(self, question: str) -> list[int]:
        """BOS + the vicuna_v1 generation prompt with the image placeholder."""
        return prompt_ids(question, self.tokenizer)

    def _batch(self, questions: Sequence[str], visual: Sequence[torch.Tensor],
               prompt_ids: Sequence[list[int]] | None = None) -> Batch:
        prompt_ids = prompt_ids or [self.prompt_ids(q) for q in questions]
        samples = [{"input_ids": ids, "visual": v} for ids, v in zip(prompt_ids, visual)]
        batch = pad_batch(samples, self.pad_token_id)
        device = self.device
        return Batch(input_ids=batch.input_ids.to(device), labels=batch.labels.to(device),
                     attention_mask=batch.attention_mask.to(device), visual=[v.to(device) for v in batch.visual])

    def low_latency_generator(self, max_new_tokens: int, max_prompt_tokens: int | None = None,
                              batch_size: int = 1) -> LowLatencyGenerator:
        """The low-latency path's generator, made on first use and kept (its cache and captured
        graphs) while it holds max_new_tokens, prompts of max_prompt_tokens (None: the kept
        generator's, or DEFAULT_MAX_PROMPT_TOKENS for a new one) and batch_size rows (a kept larger
        one answers smaller batches: a batch-1 question then runs its spare rows too). Longer
        prompts are answered eagerly."""
        current = self._generators.get("low_latency")
        if max_prompt_tokens is None:
            max_prompt_tokens = current.buckets[-1] if current is not None else DEFAULT_MAX_PROMPT_TOKENS
        if (current is None or current.max_new_tokens < max_new_tokens or current.buckets[-1] < max_prompt_tokens
                or current.batch_size < batch_size):
            if current is not None:
                max_new_tokens = max(max_new_tokens, current.max_new_tokens)
                batch_size = max(batch_size, current.batch_size)
                del self._generators["low_latency"], current  # its cache and graphs go before the new ones come
            current = LowLatencyGenerator(self.model.llm, max_new_tokens=max_new_tokens,
                                          max_prompt_tokens=max_prompt_tokens, batch_size=batch_size)
            self._generators["low_latency"] = current
        return current

    def _generate_low_latency(self, batch: Batch, max_new_tokens: int) -> list[list[int]]:
        """The batch's rows together through the low-latency generator (static cache, graphs on CUDA);
        a prompt longer than its largest bucket goes through the eager generate."""
        generator = self.low_latency_generator(max_new_tokens, batch_size=len(batch.visual))
        embeds, mask, _ = self.model.splice(batch)
        lengths = mask.sum(dim=1).tolist()
        fits = [b for b, n in enumerate(lengths) if generator.bucket_for(n) is not None]
        out: list[list[int]] = [[] for _ in lengths]
        if fits:
            rows = generator.generate_batch([embeds[b, :lengths[b]] for b in fits], max_new_tokens,
                                            self.tokenizer.eos_token_id)
            for b, tokens in zip(fits, rows):
                out[b] = tokens
        for b in sorted(set(range(len(lengths))) - set(fits)):
            logger.warning("a prompt of %d tokens is longer than the low-latency buckets; answered eagerly", lengths[b])
            row = Batch(input_ids=batch.input_ids[b:b + 1], labels=batch.labels[b:b + 1],
                        attention_mask=batch.attention_mask[b:b + 1], visual=batch.visual[b:b + 1])
            out[b] = self.model.generate(row, max_new_tokens=max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
                                         pad_token_id=self.pad_token_id)[0]
        return out

    def answer(self, images: Sequence[Image.Image], questions: Sequence[str], max_new_tokens: int = 16,
               low_latency: bool = False) -> list[Answer]:
        """Greedy answers for (image, question) pairs: one CLIP + TRIM pass, then one batched generate
        (transformers' eager one, or with low_latency the low-latency path's: the same tokens)."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        if not questions:
            return []
        return self.answer_prepared(self.encoder.host.prepare(list(images)), questions, max_new_tokens, low_latency)

    @torch.no_grad()
    def question_inputs(self, questions: Sequence[str]) -> list[QuestionInputs]:
        """The questions' token ids for this answerer's tokenizers and TRIM text mode."""
        return question_inputs(self.encoder.host, self.tokenizer, questions, self.trim_cfg.text_at_inference)

    @torch.no_grad()
    def answer_prepared(self, pixels: torch.Tensor | np.ndarray, questions: Sequence[str], max_new_tokens: int = 16,
                        low_latency: bool = False, inputs: Sequence[QuestionInputs] | None = None,
                        batch_size: int | None = None) -> list[Answer]:
        """`answer` for images already prepared on the host (uint8 [B, 3, H, W], ClipHost.prepare's)
        and, if given, the questions' token ids (question_inputs): what evaluation's CPU tasks hand
        the answering actors, which then run the device's work only. batch_size: encode batch_size
        images at a time (in the order given) and generate batch_size answers at a time, those
        batches formed in order of prompt length: TRIM's visual counts vary by image, and a batched
        generation runs every row at its longest prompt. The answers come in the questions' order.
        None: one batch, as given."""
        pixels = torch.as_tensor(pixels)
        if len(pixels) != len(questions) or (inputs is not None and len(inputs) != len(questions)):
            raise ValueError(f"{len(pixels)} images but {len(questions)} questions"
                             + ("" if inputs is None else f" and {len(inputs)} token inputs"))
        if not questions:
            return []
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        inputs = list(inputs) if inputs is not None else self.question_inputs(questions)
        size = min(batch_size or len(questions), len(questions))
        reduced = concat_outputs([self._reduce_prepared(pixels[s:s + size], inputs[s:s + size])
                                  for s in range(0, len(questions), size)])
        # what the LLM is prompted with: the text, its image token replaced by the visual tokens
        lengths = [len(q.prompt_ids) - 1 + int(t.shape[0]) for q, t in zip(inputs, reduced.tokens)]
        order = sorted(range(len(questions)), key=lengths.__getitem__) if size < len(questions) else range(size)
        generated: list[list[int]] = [[] for _ in questions]
        for s in range(0, len(questions), size):
            rows = order[s:s + size]
            batch = self._batch([questions[i] for i in rows], [reduced.tokens[i] for i in rows],
                                [inputs[i].prompt_ids for i in rows])
            for i, ids in zip(rows, self._generate(batch, max_new_tokens, low_latency)):
                generated[i] = ids
        keep_mask, scores = reduced.keep_mask.cpu(), reduced.scores.float().cpu().numpy()  # one copy each
        return [Answer(text=self.tokenizer.decode(ids, skip_special_tokens=True).strip(), token_ids=list(ids),
                       num_visual_tokens=int(reduced.tokens[b].shape[0]), num_kept=int(reduced.num_kept[b]),
                       kept_indices=torch.nonzero(keep_mask[b]).flatten().tolist(), scores=scores[b],
                       prompt_tokens=lengths[b])
                for b, ids in enumerate(generated)]

    def _reduce_prepared(self, pixels: torch.Tensor, inputs: Sequence[QuestionInputs]) -> TrimOutput:
        """CLIP and TRIM over one batch of prepared images, each image alone (reduce_pixels)."""
        pad = self.encoder.tokenizer.pad_token_id
        text_embeds = self.encoder.towers.encode_tokens(*clip_batch(inputs, 0 if pad is None else pad))
        return reduce_pixels(self.encoder, pixels, text_embeds, self.trim_cfg, alone=True)

    def _generate(self, batch: Batch, max_new_tokens: int, low_latency: bool) -> list[list[int]]:
        if low_latency:
            return self._generate_low_latency(batch, max_new_tokens)
        return self.model.generate(batch, max_new_tokens=max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
                                   pad_token_id=self.pad_token_id)
