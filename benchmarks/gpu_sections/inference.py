"""Prefill, decode, KV cache, the low-latency path and evaluation throughput."""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from transformers import LlamaForCausalLM

from gpu_sections.encoder import CLIP_MEAN, CLIP_STD, IMAGE_SIDE, build_clip
from gpu_sections.run import Run, build_llm, free_memory
from pipelines.config import EvalConfig
from trim import TrimConfig, trim_tokens

SORT_WINDOW = EvalConfig.sort_window
"""Generation batches the evaluation job orders by prompt length together (eval.sort_window)."""


def cache_bytes(cache) -> int:
    """Bytes held by a transformers cache's key and value tensors (5.x `layers`, or older lists)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        tensors = [t for layer in layers for t in (layer.keys, layer.values) if t is not None]
    else:
        tensors = list(cache.key_cache) + list(cache.value_cache)
    return sum(t.numel() * t.element_size() for t in tensors)


def prefill_case(run: Run, llm: LlamaForCausalLM, tokens: int, decode: bool) -> dict:
    hidden = llm.config.hidden_size
    with torch.no_grad():
        out = {}
        for key, rows in (("b1", 1), ("b16", run.sizes.prefill_batch)):
            embeds = torch.randn(rows, tokens, hidden, device=run.device, dtype=run.dtype) * 0.02
            repeats = run.sizes.quick_repeats if rows == 1 else None
            out[key] = run.timed(lambda: llm(inputs_embeds=embeds, use_cache=False, logits_to_keep=1),  # noqa: B023
                                 repeats=repeats)
        one = embeds[:1]
        config = llm.config
        head_dim = config.hidden_size // config.num_attention_heads
        element = torch.finfo(run.dtype).bits // 8
        out["kv_analytic"] = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * tokens * element
        if decode:
            first = llm(inputs_embeds=one, use_cache=True, logits_to_keep=1)
            cache = first.past_key_values
            out["kv_measured"] = cache_bytes(cache)
            token = first.logits[:, -1].argmax(dim=-1, keepdim=True)
            steps = []
            for _ in range(run.sizes.decode_steps + 1):
                run.sync()
                start = time.perf_counter()
                token = llm(input_ids=token, past_key_values=cache, use_cache=True,
                            logits_to_keep=1).logits[:, -1].argmax(dim=-1, keepdim=True)
                run.sync()
                steps.append(time.perf_counter() - start)
            out["decode_ms"] = 1000 * statistics.median(steps[1:])
    return out


def prefill_section(run: Run, geometry: str) -> None:
    llm = run.models.get(geometry) or build_llm(run, geometry)
    run.models[geometry] = llm.eval()
    llm.zero_grad(set_to_none=True)  # whatever a failed training step left
    suffix = "" if geometry == "7b" else f"_{geometry}"
    decode = geometry == "7b"
    sizes = run.sizes
    full = prefill_case(run, llm, sizes.full_k + sizes.prompt, decode)
    trim = prefill_case(run, llm, sizes.trim_k + sizes.prompt, decode)
    values = {f"ttft_b1_eager_full_s{suffix}": full["b1"], f"ttft_b1_eager_trim_s{suffix}": trim["b1"],
              f"ttft_b1_eager_ratio{suffix}": full["b1"] / trim["b1"],
              f"prefill_b16_full_s{suffix}": full["b16"], f"prefill_b16_trim_s{suffix}": trim["b16"],
              f"prefill_b16_ratio{suffix}": full["b16"] / trim["b16"], f"prefill_batch{suffix}": sizes.prefill_batch,
              f"kv_bytes_full{suffix}": full["kv_analytic"], f"kv_bytes_trim{suffix}": trim["kv_analytic"]}
    if decode:
        values.update(decode_ms_per_token_full=full["decode_ms"], decode_ms_per_token_trim=trim["decode_ms"],
                      kv_bytes_measured_full=full["kv_measured"], kv_bytes_measured_trim=trim["kv_measured"])
    run.put(**values)


def plain_prefill(llm: LlamaForCausalLM, embeds: torch.Tensor) -> torch.Tensor:
    """Last-position logits of the Llama forward with no mask at all (sdpa's is_causal path), as a CUDA
    graph can capture it: under stream capture transformers' mask builder cannot read tensor values,
    so it would materialize a causal mask and sdpa would leave its flash kernel."""
    model = llm.model
    positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
    rotary = model.rotary_emb(embeds, positions)
    hidden = embeds
    for layer in model.layers:
        hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary)
    return llm.lm_head(model.norm(hidden[:, -1:]))


def eager_greedy(llm: LlamaForCausalLM, embeds: torch.Tensor, tokens: int) -> list[int]:
    """Greedy tokens after a prompt, eager, DynamicCache (what the low-latency path must reproduce)."""
    out = llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
    generated = [out.logits[:, -1].argmax(dim=-1, keepdim=True)]
    for _ in range(tokens - 1):
        out = llm(input_ids=generated[-1], past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
        generated.append(out.logits[:, -1].argmax(dim=-1, keepdim=True))
    return torch.cat(generated).flatten().tolist()


def lowlatency_case(run: Run, llm: LlamaForCausalLM, suffix: str) -> None:
    """Batch 1 on the project's low-latency path (trim.low_latency: static KV cache, prompt left-padded
    to its bucket, prefill and decode replayed from CUDA graphs on CUDA; the same code without graphs
    on the CPU): time to first token (embeddings in, first token on the host), decode ms/token, and
    whether its greedy tokens are the eager ones (bf16 noise can flip a near tie of random weights)."""
    from trim.low_latency import LowLatencyGenerator

    sizes = run.sizes
    lengths = {"full": sizes.full_k + sizes.prompt, "trim": sizes.trim_k + sizes.prompt}
    generator = LowLatencyGenerator(llm, max_new_tokens=sizes.decode_steps + 1,
                                    max_prompt_tokens=max(lengths.values()))
    values: dict = {f"lowlatency_graphs{suffix}": generator.use_graphs}
    with torch.no_grad():
        for name, tokens in lengths.items():
            embeds = torch.randn(1, tokens, llm.config.hidden_size, device=run.device, dtype=run.dtype) * 0.02
            generator.prefill(embeds)  # captures this bucket's graph (and the decode graph) on CUDA
            ttft = run.timed(lambda: generator.prefill(embeds), repeats=sizes.quick_repeats)  # noqa: B023
            generated = [generator.prefill(embeds)]
            steps = []
            for _ in range(sizes.decode_steps):
                start = time.perf_counter()
                generated.append(generator.step())  # reads the token back: synchronised
                steps.append(time.perf_counter() - start)
            values.update({f"ttft_b1_lowlatency_{name}_s{suffix}": ttft,
                           f"decode_ms_per_token_lowlatency_{name}{suffix}": 1000 * statistics.median(steps),
                           f"lowlatency_bucket_{name}{suffix}": generator.bucket_for(tokens),
                           f"lowlatency_tokens_match_eager_{name}{suffix}":
                               generated == eager_greedy(llm, embeds, len(generated))})
    values[f"ttft_b1_lowlatency_ratio{suffix}"] = (values[f"ttft_b1_lowlatency_full_s{suffix}"]
                                                  / values[f"ttft_b1_lowlatency_trim_s{suffix}"])
    run.put(**values)


def graph_section(run: Run, geometry: str) -> None:
    """Batch-1 prefill on the low-latency path (any device), then replayed from a captured CUDA graph
    (static input buffer, no cache)."""
    suffix = "" if geometry == "7b" else f"_{geometry}"
    llm = run.models.get(geometry) or build_llm(run, geometry)
    run.models[geometry] = llm.eval()
    with torch.no_grad():
        check = torch.randn(1, 9, llm.config.hidden_size, device=run.device, dtype=run.dtype) * 0.02
        expected = llm(inputs_embeds=check, use_cache=False, logits_to_keep=1).logits
        diff = float((plain_prefill(llm, check).float() - expected.float()).abs().max())
    run.put(**{f"graph_plain_forward_max_diff{suffix}": diff})
    lowlatency_case(run, llm, suffix)
    if run.device.type != "cuda":
        run.skip(f"graph_{geometry}", "CUDA graphs need a CUDA device")
        return
    times = {}
    for name, k in (("full", run.sizes.full_k), ("trim", run.sizes.trim_k)):
        with torch.no_grad():
            static = torch.randn(1, k + run.sizes.prompt, llm.config.hidden_size, device=run.device,
                                 dtype=run.dtype) * 0.02
            eager = llm(inputs_embeds=static, use_cache=False, logits_to_keep=1).logits
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    plain_prefill(llm, static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = plain_prefill(llm, static)
            graph.replay()
            torch.cuda.synchronize()
            diff = float((captured.float() - eager.float()).abs().max())
            times[name] = run.timed(graph.replay, repeats=run.sizes.quick_repeats)
            run.put(**{f"ttft_b1_graph_{name}_s{suffix}": times[name], f"graph_vs_eager_max_diff_{name}{suffix}": diff})
            del graph, captured, eager, static
    run.put(**{f"ttft_b1_graph_ratio{suffix}": times["full"] / times["trim"]})


def eval_section(run: Run) -> None:
    """Evaluation throughput: one batch of prefill_batch questions as the evaluation actor
    runs it on the device, full vs TRIM. Encode, as the answerer's reduce (trim.inference): 8-bit
    pixels normalized on the device, the vision tower to layer -2, the text tower, trim_tokens with
    fp32 scoring (full: selection "all", as the evaluation's full-token rows). Answer: answer_tokens
    greedy tokens per question, through transformers' eager generate and through the batched
    low-latency path (trim.low_latency, what evaluation uses on CUDA). Not in it, as not in the
    evaluation actor's time: the image decoding, resizing and tokenizing, which the evaluation job
    runs in CPU tasks beside the actors (pipelines/evaluate/inputs.py); nor the projector (a 2-layer MLP)."""
    from trim.encoders import ClipTowers
    from trim.low_latency import LowLatencyGenerator

    free_memory(run)  # the batch-1 generator's cache and graphs
    sizes, batch, answer = run.sizes, run.sizes.prefill_batch, run.sizes.answer_tokens
    llm = run.models.get("7b") or build_llm(run, "7b")
    run.models["7b"] = llm.eval()
    clip = build_clip(run)
    towers = ClipTowers(clip, -2, CLIP_MEAN, CLIP_STD)
    generator = torch.Generator().manual_seed(1)
    levels = torch.randint(0, 256, (batch, 3, IMAGE_SIDE, IMAGE_SIDE), dtype=torch.uint8, generator=generator)
    text_ids = torch.randint(0, clip.config.text_config.vocab_size - 1, (batch, 77), generator=generator)
    text_ids[:, -1] = clip.config.text_config.eos_token_id
    configs = {"full": TrimConfig(selection="all", score_dtype="float32"), "trim": TrimConfig(score_dtype="float32")}

    def reduce(cfg: TrimConfig) -> int:
        encoded = towers.encode_levels(levels)
        return sum(t.shape[0] for t in trim_tokens(encoded.features, encoded.patch_embeds,
                                                   towers.encode_tokens(text_ids), cfg).tokens)

    lengths = {"full": sizes.full_k + sizes.prompt, "trim": sizes.trim_k + sizes.prompt}
    fast = LowLatencyGenerator(llm, max_new_tokens=answer, max_prompt_tokens=max(lengths.values()), batch_size=batch)
    values: dict = {"eval_batch": batch, "eval_answer_tokens": answer}
    with torch.no_grad():
        for name, tokens in lengths.items():
            encode_s = run.timed(lambda: reduce(configs[name]))  # noqa: B023 (the count syncs)
            prompts = [torch.randn(tokens, llm.config.hidden_size, device=run.device, dtype=run.dtype) * 0.02
                       for _ in range(batch)]
            stacked = torch.stack(prompts)
            ones = torch.ones(stacked.shape[:2], dtype=torch.long, device=run.device)
            eager_s = run.timed(lambda: llm.generate(inputs_embeds=stacked, attention_mask=ones,  # noqa: B023
                                                     max_new_tokens=answer, min_new_tokens=answer, do_sample=False,
                                                     pad_token_id=0))
            fast_s = run.timed(lambda: fast.generate_batch(prompts, answer, eos_token_id=-1))  # noqa: B023
            first_s = run.timed(lambda: fast.prefill_batch(prompts))  # noqa: B023
            values.update({f"eval_b{batch}_encode_{name}_s": encode_s, f"eval_b{batch}_answer_eager_{name}_s": eager_s,
                           f"eval_b{batch}_answer_lowlatency_{name}_s": fast_s,
                           f"eval_b{batch}_first_token_lowlatency_{name}_s": first_s,
                           f"eval_questions_per_s_eager_{name}": batch / (encode_s + eager_s),
                           f"eval_questions_per_s_{name}": batch / (encode_s + fast_s)})
        # As evaluation meets them: TRIM's counts vary by image (drawn in [k/2, 3k/2] as in training), and
        # a batch runs at its longest prompt's bucket.
        rng = np.random.default_rng(1)
        varied = [int(k) + sizes.prompt for k in rng.integers(sizes.trim_k // 2, sizes.trim_k * 3 // 2 + 1, batch)]
        prompts = [torch.randn(n, llm.config.hidden_size, device=run.device, dtype=run.dtype) * 0.02 for n in varied]
        varied_s = run.timed(lambda: fast.generate_batch(prompts, answer, eos_token_id=-1))
        bucket = fast.bucket_for(max(varied))
        values.update({f"eval_b{batch}_answer_lowlatency_trim_varied_s": varied_s,
                       "eval_varied_padding_share": 1 - sum(varied) / (bucket * batch),
                       "eval_questions_per_s_trim_varied": batch / (values[f"eval_b{batch}_encode_trim_s"] + varied_s)})
        # As the evaluation job batches them: eval.sort_window batches' questions ordered by prompt
        # length, then cut into batches (pipelines/evaluate/stage.py); counts from the same spread.
        window = sorted(int(k) + sizes.prompt for k in rng.integers(sizes.trim_k // 2, sizes.trim_k * 3 // 2 + 1,
                                                                    batch * SORT_WINDOW))
        groups = [window[i:i + batch] for i in range(0, len(window), batch)]
        sorted_s = statistics.mean(run.timed(lambda p=p: fast.generate_batch(p, answer, eos_token_id=-1))  # type: ignore[misc]
                                   for p in [[torch.randn(n, llm.config.hidden_size, device=run.device,
                                                          dtype=run.dtype) * 0.02 for n in g] for g in groups])
        slots = sum(fast.bucket_for(max(g)) * len(g) for g in groups)
        values.update({f"eval_b{batch}_answer_lowlatency_trim_sorted_s": sorted_s,
                       "eval_sorted_padding_share": 1 - sum(window) / slots, "eval_sort_window": SORT_WINDOW,
                       "eval_questions_per_s_trim_sorted": batch / (values[f"eval_b{batch}_encode_trim_s"] + sorted_s)})
    values["eval_questions_per_s_ratio"] = values["eval_questions_per_s_trim"] / values["eval_questions_per_s_full"]
    values["eval_questions_per_s_ratio_varied"] = (values["eval_questions_per_s_trim_varied"]
                                                   / values["eval_questions_per_s_full"])
    values["eval_questions_per_s_ratio_sorted"] = (values["eval_questions_per_s_trim_sorted"]
                                                   / values["eval_questions_per_s_full"])
    values["eval_questions_per_s_ratio_eager"] = (values["eval_questions_per_s_eager_trim"]
                                                  / values["eval_questions_per_s_eager_full"])
    values["eval_lowlatency_graphs"] = fast.use_graphs
    run.put(**values)
