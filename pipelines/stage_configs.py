"""Each stage's section of a recipe: typed, a docstring per field (`python jobs/<stage>.py --help`
lists them with their defaults). pipelines/config.py gathers them into a Recipe."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SynthConfig:
    """The synthetic LLaVA mixture the tiny recipe generates (real format and folder layout)."""

    num_samples: int = 240
    """Rows of the mixture JSON."""
    num_images: int = 80
    """Distinct image files (shared by several samples, as COCO images are in the real mixture)."""
    num_eval_questions: int = 24
    """Questions of the synthetic evaluation split."""
    seed: int = 0
    """Seed of the generator: same seed, same files."""


@dataclass
class ShardConfig:
    """Mixture JSON + image folders into Parquet shards."""

    rows_per_shard: int = 5000
    """Samples per Parquet file of the samples table."""
    images_per_shard: int = 500
    """Images (with their bytes) per Parquet file of the images table."""
    read_batch_size: int = 256
    """Records per Ray Data batch while reading images."""
    concurrency: int = 2
    """Parallel tasks that read and hash images."""
    keep_versions: int = 2
    """Complete versions of the shards kept under paths.shards (at least 1): each changed input (mixture,
    images, every field of this section but read_batch_size, concurrency and this one) is written into a
    new version folder; once it is current the oldest complete ones beyond this many are removed.
    Unfinished versions are kept."""
    max_image_pixels: int = 4096 * 4096
    """Images with more pixels (width x height, read from the file's header before any decoding) are set
    aside as "image too large": a guard against decompression bombs. 4096 x 4096 is far above the photos of
    LLaVA's sources (CLIP sees 336 x 336 anyway); PIL's own limit (2 x Image.MAX_IMAGE_PIXELS, about 179
    Mpixel) still bounds a larger cap."""
    max_aspect_ratio: float = 20.0
    """Images whose long side is more than this many times their short side are set aside as "extreme
    aspect ratio": LLaVA pads each image to a square of its long side before resizing, so a 1 x 30000
    strip would become 900 Mpixel in precompute. With max_image_pixels this bounds the padded square at
    max_image_pixels x max_aspect_ratio pixels."""
    max_image_bytes: int = 256 * 2**20
    """The per-image memory budget: an image whose decoded size would exceed it (width x height x the bytes
    PIL holds per pixel of its mode, plus its RGB copy: pipelines.images.decoded_bytes; read from the header,
    before decoding) is set aside as "image too large". Every stage holds one decoded image at full
    resolution per task at a time (precompute pads and resizes it in strips, pictures draw at display
    resolution), so this bounds an image's share of a worker's memory whatever max_image_pixels allows.
    256 MiB holds any image within the default max_image_pixels (4096 x 4096 x 8 bytes = 128 MiB)."""


@dataclass
class PrecomputeConfig:
    """Shards into the TRIM cache with the frozen CLIP towers."""

    batch_size: int = 16
    """Images per encoder forward."""
    concurrency: int = 1
    """Encoder actors (each loads the towers once)."""
    num_gpus_per_actor: float = 0.0
    """GPUs per encoder actor (0 on CPU)."""
    num_cpus_per_actor: int = 1
    """CPUs per encoder actor; on CPU the encoder runs this many torch threads."""
    layer: int = -2
    """Vision tower layer whose patch features are cached (LLaVA-1.5: the penultimate)."""
    rows_per_file: int = 2000
    """Samples per cache Parquet file (the unit of resumption)."""
    dtype: str = "float32"
    """Encoder compute dtype: float32 on CPU, float16/bfloat16 on GPU."""
    encoder_threads: int = 0
    """Torch threads of each encoder actor on CPU (0: num_cpus_per_actor). More than the actor asks Ray
    for lets a CPU-only node's encoder use the cores its decode tasks leave idle."""
    keep_versions: int = 2
    """Complete versions of the cache kept under paths.cache (at least 1): each new identity (shards
    version, CLIP weights, layer, dtype, TRIM config, rows_per_file) is written into a new version
    folder; once it is current the oldest complete ones beyond this many are removed. Unfinished
    versions are kept (a rerun with their identity resumes them)."""


@dataclass
class TrainConfig:
    """Ray Train + DeepSpeed fine-tuning on the cache."""

    run_name: str = "tiny"
    """Ray Train run name and MLflow run name; the same name resumes (on another cache, recipe or number
    of workers it is refused unless start_fresh). It may hold "{cache_version}", which the jobs replace
    with the version folder of the current cache (cache/CURRENT.json, e.g. "v-3f2a9c0d1b2e"): the
    scheduled retraining uses "<name>-{cache_version}", so new data starts a new run, a rerun on the same
    cache resumes its run, and a run already complete on it is not run again. Such runs are kept while
    their cache version is (precompute.keep_versions); once a run has exported its model, those whose
    cache version is gone are removed, checkpoints and model (MLflow keeps their runs and registered
    models). A name without it is never removed."""
    num_workers: int = 2
    """Ray Train workers (one per GPU on a GPU cluster)."""
    use_gpu: bool = False
    """Workers on GPUs (NCCL, bf16) or CPUs (gloo, fp32)."""
    deepspeed_config: str = "infra/deepspeed/zero2.json"
    """DeepSpeed config file (ZeRO stage and offload); batch sizes are filled in from this config."""
    micro_batch_size: int = 4
    """Samples per worker per step."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.03
    """Share of the steps with linear warmup, then cosine decay to 0."""
    epochs: float = 1.0
    """Passes over the cache."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: as many as the epochs give)."""
    max_length: int = 2048
    """Longest sequence in tokens, visual tokens included."""
    train_llm: bool = True
    """Train projector + LLM (True) or the projector alone (False)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (LLaVA's recipes turn it on)."""
    attn_implementation: str = "sdpa_packed"
    """The LLM's attention: "sdpa_packed" (sdpa once per packed sample: no mask, no attention across
    samples computed; trim/attention.py), "sdpa", "eager", "flash_attention_2" or "flex_attention" (GPU;
    packed rows then run without padding or a materialized mask)."""
    packing: bool = True
    """Pack each micro-batch's samples into rows of up to max_length tokens (attention confined to each
    sample) instead of padding every sample to the longest: no compute on padding."""
    group_by_length: bool = True
    """LLaVA's group_by_modality_length: each optimizer step a random draw of one modality, its samples
    dealt to the micro-batches by length (packed: even token totals; padded: sorted, least padding);
    False: a plain shuffle."""
    checkpoint_every: int = 20
    """Save a checkpoint every this many optimizer steps (and at the end)."""
    seed: int = 0
    """Seed of the data order and the projector's initialisation."""
    registered_model: str = ""
    """Name of the exported model in MLflow's model registry ("" = the experiment's: trim-llava-<recipe>)."""
    start_fresh: bool = False
    """Ignore this run's checkpoints and train from step 0 (a resume is otherwise refused when the
    cache, the training settings or the number of workers differ from the checkpoint's)."""
    max_failures: int = 3
    """Times Ray Train replaces a lost worker and resumes from the newest complete checkpoint within
    the same job before the job fails."""
    preload: bool = False
    """Read each worker's whole shard into memory before the first step (benchmarks: isolates the
    input pipeline's cost; leave off for real runs)."""


@dataclass
class EvalConfig:
    """Inference and scoring on an evaluation split."""

    kind: str = "vqa"
    """Scorer: "vqa" (open-ended, VQAv2/TextVQA accuracy), "exact" (GQA: exact match), "yesno" (POPE),
    "choice" (option letter)."""
    max_new_tokens: int = 16
    """Tokens generated per answer (greedy)."""
    batch_size: int = 8
    """Questions per generation batch."""
    sort_window: int = 8
    """Generation batches whose questions are ordered by prompt length together: an inference actor
    takes sort_window x batch_size questions, encodes them batch_size at a time, then generates
    batch_size at a time, shortest prompts first. TRIM keeps a different count per image and a batch
    runs every row at its longest prompt: with the 7B's counts (61-183) in batches of 16, padding is
    23% of the prompt positions in batches as drawn, 8% ordered within 4 batches, 5% within 8
    (computed, low-latency buckets of 8). 1: batches as read."""
    generation: str = "auto"
    """"low_latency": generate through trim.low_latency (static KV cache, CUDA graphs: a decode step is
    one graph replay instead of a launch-bound eager forward; the same tokens); "eager": transformers'
    generate; "auto": low_latency on CUDA, eager elsewhere (on a CPU it is as fast)."""
    concurrency: int = 1
    """Inference actors."""
    num_pictures: int = 4
    """TRIM pictures logged as artifacts."""
