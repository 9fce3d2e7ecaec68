"""The precompute encoder stage and image preprocessing."""

from __future__ import annotations

import io
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPConfig, CLIPModel

from gpu_sections.run import Run
from trim import TrimConfig, trim_tokens

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_RGB = tuple(int(x * 255) for x in CLIP_MEAN)  # LLaVA's expand2square colour: (122, 116, 104)
IMAGE_SIDE = 336


def build_clip(run: Run) -> CLIPModel:
    if run.tiny:
        vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2)
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
        projection = 32
    else:  # ViT-L/14-336
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
        text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        projection = 768
    config = CLIPConfig(text_config=text, vision_config={**vision, "image_size": IMAGE_SIDE, "patch_size": 14},
                        projection_dim=projection)
    with torch.device(run.device):
        return CLIPModel._from_config(config, attn_implementation="sdpa", dtype=run.dtype).eval()


def vision_until(clip: CLIPModel, pixels: torch.Tensor, layer: int) -> torch.Tensor:
    """hidden_states[layer] of the vision tower (CLS dropped), running only the encoder layers it
    needs: the project's own function (trim.encoders.vision_features), as precompute runs it."""
    from trim.encoders import vision_features

    return vision_features(clip, pixels, layer).features


def encoder_stage(towers, unit) -> list[int]:
    """8-bit pixels on the host to cache rows' arrays on the host: precompute's encoder-actor code
    (pipelines.precompute.encode.encode_unit: normalize on the device, vision tower to layer -2,
    projection, text tower, TRIM on the device, one pinned copy back). Returns tokens per image."""
    from pipelines.precompute.encode import encode_unit

    reduced = encode_unit(towers, unit, TrimConfig(), batch_size=len(unit.image_of_sample))
    return reduced.num_tokens.tolist()


def encoder_section(run: Run) -> None:
    from pipelines.precompute.encode import UnitArrays
    from trim.encoders import ClipTowers

    clip = build_clip(run)
    towers = ClipTowers(clip, -2, CLIP_MEAN, CLIP_STD)
    batch = run.sizes.encoder_batch
    generator = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 256, (batch, 3, IMAGE_SIDE, IMAGE_SIDE), dtype=torch.uint8, generator=generator)
    vocab = clip.config.text_config.vocab_size
    text_ids = torch.randint(0, vocab - 1, (batch, 77), generator=generator)
    text_ids[:, -1] = clip.config.text_config.eos_token_id
    # What the CPU stage hands the encoder actor: host arrays, one image per sample here.
    unit = UnitArrays(pixels=levels.numpy(), image_of_sample=np.arange(batch), input_ids=text_ids.numpy(),
                      attention_mask=np.ones((batch, 77), dtype=np.int64), seeds=np.arange(batch))
    with torch.inference_mode():
        pixels = towers.normalize(levels)
        full = clip.vision_model(pixel_values=pixels, output_hidden_states=True)
        layer_diff = float((vision_until(clip, pixels, -2) - full.hidden_states[-2][:, 1:]).abs().max())
        del full
        raw = run.timed(lambda: clip.vision_model(pixel_values=pixels).last_hidden_state)
        counts = encoder_stage(towers, unit)
        stage = run.timed(lambda: encoder_stage(towers, unit))
        # The same tokens as trim_tokens called directly on the towers' outputs.
        encoded = towers.encode_levels(levels)
        direct = trim_tokens(encoded.features, encoded.patch_embeds, towers.encode_tokens(text_ids), TrimConfig())
    run.put(encoder_batch=batch, encoder_raw_images_per_s=batch / raw, encoder_stage_images_per_s=batch / stage,
            encoder_stage_over_raw=raw / stage, encoder_stage_tokens_per_image=float(np.mean(counts)),
            encoder_trim_device=run.device.type, encoder_truncated_vs_hidden_states_max_diff=layer_diff,
            encoder_stage_matches_trim_tokens=counts == direct.num_tokens)


def make_jpeg(seed: int = 0) -> bytes:
    """A 640x480 JPEG with smooth content (upsampled noise), quality 90."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (15, 20, 3), dtype=np.uint8))
    image = small.resize((640, 480), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def pil_preprocess(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """LLaVA's CPU path: decode, pad to square with the mean colour, resize 336 bicubic, normalize.
    Returns (uint8 HWC after resize, normalized float32 CHW)."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), PAD_RGB)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    resized = np.array(canvas.resize((IMAGE_SIDE, IMAGE_SIDE), Image.BICUBIC))
    pixels = (resized.astype(np.float32) / 255.0 - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return resized, pixels.transpose(2, 0, 1)


def tensor_preprocess(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same on decoded uint8 [B, 3, H, W] tensors (one size) on any device: (uint8, normalized)."""
    batch, _, height, width = images.shape
    side = max(height, width)
    fill = torch.tensor(PAD_RGB, dtype=torch.uint8, device=images.device).view(1, 3, 1, 1)
    canvas = fill.expand(batch, 3, side, side).clone()
    top, left = (side - height) // 2, (side - width) // 2
    canvas[:, :, top:top + height, left:left + width] = images
    resized = F.interpolate(canvas.float(), size=(IMAGE_SIDE, IMAGE_SIDE), mode="bicubic", antialias=True,
                            align_corners=False).round_().clamp_(0, 255)
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return resized.to(torch.uint8), (resized / 255.0 - mean) / std


def preprocess_section(run: Run) -> None:
    data = make_jpeg()
    count = run.sizes.preprocess_images
    pil_preprocess(data)
    start = time.perf_counter()
    for _ in range(count):
        pil_preprocess(data)
    run.put(cpu_preprocess_images_per_s_per_core=count / (time.perf_counter() - start))
    # The tensor path on PIL-decoded pixels, on the CPU: checks pad + resize + normalize alone.
    reference, _ = pil_preprocess(data)
    decoded = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
    resized, _ = tensor_preprocess(decoded[None])
    diff = (resized[0].permute(1, 2, 0).int() - torch.from_numpy(reference).int()).abs()
    run.put(tensor_resize_max_abs_diff=int(diff.max()), tensor_resize_mean_abs_diff=float(diff.float().mean()))


def gpu_decode_section(run: Run) -> None:
    if run.device.type != "cuda":
        run.skip("gpu_decode", "needs a CUDA device")
        return
    try:
        from torchvision.io import decode_jpeg
    except ImportError as error:
        run.skip("gpu_decode", f"torchvision not importable: {error}")
        return
    data = make_jpeg()
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for _ in range(run.sizes.encoder_batch)]

    def decode_batch() -> torch.Tensor:
        images = torch.stack(decode_jpeg(encoded, device="cuda"))
        return tensor_preprocess(images)[1]

    seconds = run.timed(decode_batch)
    reference, _ = pil_preprocess(data)
    resized, _ = tensor_preprocess(decode_jpeg(encoded[0], device="cuda")[None])
    diff = (resized[0].permute(1, 2, 0).int().cpu() - torch.from_numpy(reference).int()).abs()
    run.put(gpu_decode_images_per_s=len(encoded) / seconds, gpu_decode_max_abs_diff=int(diff.max()),
            gpu_decode_mean_abs_diff=float(diff.float().mean()))
