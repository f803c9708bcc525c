"""Adapter training: typed configs, the frozen-base + adapter model, the loss and jitted step, the encoder
cache, checkpoints and the ``train`` loop.

    from ipadapter_jax.training import load_train_config, train
    result = train(load_train_config("train/sd15_base.yaml", ["workdir=/runs/a", "optimizer.lr=1e-4"]))
"""

from ipadapter_jax.training.config import TrainConfig, load_train_config
from ipadapter_jax.training.encoder_cache import CacheReport, build_encoder_cache
from ipadapter_jax.training.loop import TrainResult, export_checkpoint, train

__all__ = ["CacheReport", "TrainConfig", "TrainResult", "build_encoder_cache", "export_checkpoint",
           "load_train_config", "train"]
