"""The experiment config of an adapter training run (``train/*.yaml``): typed sections with the official
recipe's defaults (tutorial_train.py: AdamW lr 1e-4, weight decay 1e-2, batch 8, drops 0.05/0.05/0.05)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from ipadapter_jax.config import load_config
from ipadapter_jax.errors import ConfigError
from ipadapter_jax.sharding import MeshConfig

Variant = Literal["base", "plus", "full"]
Remat = Literal["none", "full", "dots", "dots_no_batch", "offload_dots", "auto"]  # auto: planning/search.py
# What to change when a training step does not fit the devices' memory (`train` and `plan` say it).
TRAIN_MEMORY_ADVICE = ("lower global_batch_size, set model.remat=full (or dots_no_batch), "
                       "optimizer.grad_accum_steps=N, or mesh.fsdp=N to split the weights")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The frozen base (a diffusers pipeline folder) and the adapter to train on it."""

    base: str = ""  # diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/, SDXL *_2/) or a hub id
    image_encoder: str = ""  # transformers CLIPVisionModelWithProjection folder
    variant: Variant = "base"  # base: ImageProjModel; plus: Resampler; full: MLPProjModel (full-face)
    num_tokens: int = 4  # image tokens (plus: resampler queries; full: ignored, the encoder's sequence)
    resampler_dim: int | None = None  # plus only; None: the UNet's cross-attention width (tutorial_train_plus.py)
    resampler_depth: int = 4
    resampler_heads: int | None = None  # None: official (12; SDXL 20); head width is always 64, as upstream
    init_adapter: str | None = None  # start from this adapter (our folder or official .bin/.safetensors)
    dtype: str = "float32"  # the frozen UNet and encoders
    vae_dtype: str | None = None  # None: as dtype (SDXL recipes keep the VAE in float32)
    adapter_dtype: str = "float32"  # trainable weights and optimizer state
    weights_variant: str | None = None  # e.g. "fp16" for *.fp16.safetensors
    attention: Literal["auto", "xla", "chunked", "cudnn", "pallas"] = "auto"  # auto: by platform and shape
    # jax.checkpoint policy for every UNet ResNet and transformer block (models/remat.py): recompute activations
    # in the backward pass to trade compute for memory; auto: the fastest that fits the devices (planning/search.py).
    remat: Remat = "none"

    def __post_init__(self):
        if self.num_tokens < 1:
            raise ConfigError(f"model.num_tokens must be positive, got {self.num_tokens}.")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """A TFDS dataset with image + caption features (``prepare-data`` output or a TFDS name)."""

    source: str = ""  # prepared dataset folder, TFDS name, or an official JSON list / caption folder (see inputs)
    image_root: str | None = None  # images of a JSON list are relative to this (default: the list's folder)
    split: str = "train"
    data_dir: str | None = None  # TFDS data dir for a dataset given by name
    image_key: str = "image"
    text_key: str = "text"
    resolution: int = 512
    crop: Literal["center", "center_floor", "random"] = "center"
    p_drop_image: float = 0.05
    p_drop_text: float = 0.05
    p_drop_both: float = 0.05
    cache: str | None = None  # an encoder cache (build_encoder_cache writes it here); training then reads only it
    worker_count: int = 0  # Grain worker processes (0: threads in this process)
    read_threads: int = 8
    shuffle: bool = True


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-2
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    schedule: Literal["constant", "cosine", "linear"] = "constant"  # after warmup
    warmup_steps: int = 0
    end_lr_fraction: float = 0.0  # cosine/linear decay ends at lr * this
    grad_clip_norm: float | None = None  # clip by global norm (the official script does not clip)
    grad_accum_steps: int = 1  # microbatches per step; global_batch_size must divide by it

    def __post_init__(self):
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_accum_steps < 1:
            raise ConfigError("optimizer.lr must be positive, warmup_steps >= 0 and grad_accum_steps >= 1.")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ConfigError(f"optimizer.grad_clip_norm must be positive or null, got {self.grad_clip_norm}.")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    prediction_type: Literal["epsilon", "v_prediction"] | None = None  # None: the scheduler config's
    noise_offset: float = 0.0  # tutorial_train_sdxl.py --noise_offset
    min_snr_gamma: float | None = None  # min-SNR weighting (Hang et al. 2023), e.g. 5.0
    # Timesteps drawn uniformly from [min_timestep, max_timestep) (kohya's sd-scripts options); null: the schedule's
    # count. Raising min_timestep trains where the image prompt decides layout and colour rather than detail.
    min_timestep: int = 0
    max_timestep: int | None = None

    def __post_init__(self):
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ConfigError(f"loss.min_snr_gamma must be positive or null, got {self.min_snr_gamma}.")
        if self.min_timestep < 0 or (self.max_timestep is not None and self.max_timestep <= self.min_timestep):
            raise ConfigError(f"loss.min_timestep ({self.min_timestep}) and loss.max_timestep ({self.max_timestep}) "
                              "must satisfy 0 <= min_timestep < max_timestep.")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 1000
    keep: int = 3
    async_save: bool = True
    export_every_steps: int = 0  # also write the official .safetensors every N steps (0: only at the end)

    def __post_init__(self):
        if self.every_steps < 1:
            raise ConfigError(f"checkpoint.every_steps must be >= 1, got {self.every_steps} (the final step and "
                              "preemptions are always saved; a large value saves only those).")


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
    log_every_steps: int = 50
    progress_bar: bool = True
    tensorboard: bool = True
    sample_every_steps: int = 0  # sample grids (0: never)
    sample_prompts: tuple[str, ...] = ()
    sample_images: tuple[str, ...] = ()  # image prompts (files); grid = prompts x images

    def __post_init__(self):
        if self.log_every_steps < 1:
            raise ConfigError(f"monitor.log_every_steps must be >= 1, got {self.log_every_steps}.")
    sample_num_steps: int = 30
    sample_guidance: float = 7.5
    sample_resolution: int | None = None  # None: data.resolution
    sample_seed: int = 0


DEFAULT_EVAL_CLIP = "openai/clip-vit-large-patch14"  # evaluation.clip_scores.DEFAULT_CLIP, the paper's
WORLD_METRICS = "world"  # eval.clip: the shapes world's exact reader (toy CLIP-I / CLIP-T) instead of a CLIP model


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """CLIP-I / CLIP-T during training: every ``every_steps`` the adapter being trained generates one image per
    held-out image prompt (``images[i]`` with ``captions[i]``), scored against the image prompt (CLIP-I) and its
    caption (CLIP-T)."""

    every_steps: int = 0  # 0: never
    images: tuple[str, ...] = ()  # image prompt files (or `world` / `world:<n>`: the shapes world's held-out scenes)
    captions: tuple[str, ...] = ()  # one per image, or one for all; empty: the empty prompt, and no CLIP-T
    num_steps: int = 30  # DDIM steps
    guidance: float = 7.5
    scale: float = 1.0  # IP scale
    seed: int = 0  # image i's noise: fold_in(key(seed), i)
    resolution: int | None = None  # None: data.resolution
    batch_size: int = 32  # images per generation call (a multiple of the number of devices)
    at_start: bool = True  # also evaluate before the first step of a fresh run (the curve's origin)
    clip: str = DEFAULT_EVAL_CLIP  # a transformers CLIPModel folder or hub id, or `world` (the toy metrics)

    def __post_init__(self):
        if self.every_steps < 0:
            raise ConfigError(f"eval.every_steps must be >= 0 (0: never), got {self.every_steps}.")
        if self.every_steps and not self.images:
            raise ConfigError("eval.every_steps is set but eval.images is empty; list held-out image prompt files "
                              "(or set eval.every_steps=0).")
        if len(self.captions) not in (0, 1, len(self.images)):
            raise ConfigError(f"eval.captions has {len(self.captions)} entries for {len(self.images)} eval.images; "
                              "give one per image, one for all, or none.")
        if self.num_steps < 1 or self.batch_size < 1 or self.guidance < 0 or self.scale < 0:
            raise ConfigError("eval.num_steps and eval.batch_size must be >= 1, eval.guidance and eval.scale >= 0.")
        if self.resolution is not None and self.resolution < 8:
            raise ConfigError(f"eval.resolution must be at least 8 pixels or null, got {self.resolution}.")

    def caption_list(self) -> list[str]:
        """One caption per image."""
        if len(self.captions) == len(self.images):
            return list(self.captions)
        return [self.captions[0] if self.captions else ""] * len(self.images)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """``jax.distributed.initialize``; on TPU pods and SLURM/Open MPI its arguments are detected."""

    enabled: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    cpu_collectives: Literal["gloo", "mpi", "none"] = "gloo"  # multi-process CPU runs (tests, debugging)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    workdir: str = ""  # checkpoints/, export/, tensorboard/, samples/; a run resumes from it
    seed: int = 0
    total_steps: int = 1000
    global_batch_size: int = 8  # across all processes and microbatches
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    loss: LossConfig = LossConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    monitor: MonitorConfig = MonitorConfig()
    eval: EvalConfig = EvalConfig()
    distributed: DistributedConfig = DistributedConfig()

    def __post_init__(self):
        if self.total_steps < 0 or self.global_batch_size < 1:
            raise ConfigError("total_steps must be >= 0 and global_batch_size >= 1.")
        if self.global_batch_size % self.optimizer.grad_accum_steps:
            raise ConfigError(f"global_batch_size {self.global_batch_size} is not a multiple of "
                              f"optimizer.grad_accum_steps {self.optimizer.grad_accum_steps}.")

    def validate_for_training(self) -> None:
        """What a run needs beyond well-typed values: paths that must be set."""
        if not self.workdir:
            raise ConfigError("workdir is not set; pass workdir=DIR (checkpoints and exports go there).")
        if not self.model.base:
            raise ConfigError("model.base is not set; pass the diffusers pipeline folder of the base model.")
        if not self.data.cache and not self.data.source:
            raise ConfigError("Neither data.source nor data.cache is set; pass a prepared dataset folder.")
        if not self.model.image_encoder:
            raise ConfigError("model.image_encoder is not set; pass the CLIP image encoder folder (or hub path).")


def load_train_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A ``TrainConfig`` from a YAML recipe plus ``key=value`` overrides (unknown keys are errors)."""
    return load_config(TrainConfig, path, overrides)
