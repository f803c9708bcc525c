"""Training metrics to the console (with a progress bar) and TensorBoard, from the primary process only.

Per log interval: loss, gradient norm, learning rate, images/s and TFLOP/s per device (XLA's count of the
compiled step's FLOPs for one device's share, over the measured wall time), plus skipped records. Per
evaluation (`training.evaluator`): its metrics under ``eval/`` and on the console, the latest beside the loss in
the progress bar.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ipadapter_jax.training.config import MonitorConfig

_log = logging.getLogger("ipadapter_jax.train")


class Monitor:
    def __init__(self, workdir: Path, config: MonitorConfig, *, start_step: int, total_steps: int,
                 global_batch_size: int, num_devices: int, flops_per_device_step: float | None,
                 primary: bool = True):
        self.config = config
        self.primary = primary
        self.global_batch_size = global_batch_size
        self.num_devices = num_devices
        self.flops = flops_per_device_step
        self._last_time = time.perf_counter()
        self._last_step = start_step
        self._bar = None
        self._writer = None
        self._postfix: dict[str, str] = {}
        if not primary:
            return
        if config.progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        if config.tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                _log.warning("tensorboardX is not installed; TensorBoard logging is off (pip install tensorboardX).")
            else:
                self._writer = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, message: str) -> None:
        if not self.primary:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def log(self, step: int, metrics: dict[str, float], *, num_skipped: int = 0) -> dict[str, float]:
        """Log the metrics of ``step`` with the throughput since the previous call; returns what was logged."""
        now = time.perf_counter()
        steps = max(step - self._last_step, 1)
        seconds = max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        out = dict(metrics)
        out["images_per_second"] = self.global_batch_size * steps / seconds
        out["step_seconds"] = seconds / steps
        if self.flops:
            out["tflops_per_device"] = self.flops / (seconds / steps) / 1e12
        out["num_skipped"] = float(num_skipped)
        if not self.primary:
            return out
        if self._bar is not None:
            self._postfix.update(loss=f"{out['loss']:.4f}", img_s=f"{out['images_per_second']:.1f}")
            self._bar.set_postfix(self._postfix)
        parts = [f"step {step}", f"loss {out['loss']:.5f}", f"grad_norm {out['grad_norm']:.4f}",
                 f"lr {out['learning_rate']:.3g}", f"{out['images_per_second']:.2f} img/s"]
        if "tflops_per_device" in out:
            parts.append(f"{out['tflops_per_device']:.3f} TFLOP/s/device")
        if num_skipped:
            parts.append(f"{num_skipped} records skipped")
        self.write(" | ".join(parts))
        if self._writer is not None:
            for key in ("loss", "grad_norm", "learning_rate", "param_norm"):
                if key in out:
                    self._writer.add_scalar(f"train/{key}", out[key], step)
            for key in ("images_per_second", "tflops_per_device", "step_seconds"):
                if key in out:
                    self._writer.add_scalar(f"perf/{key}", out[key], step)
            self._writer.add_scalar("data/num_skipped", num_skipped, step)
            self._writer.flush()
        return out

    def log_eval(self, step: int, metrics: dict[str, float], line: str) -> None:
        """An evaluation's metrics: TensorBoard ``eval/<name>``, the console line, the progress bar's postfix."""
        if not self.primary:
            return
        self.write(line)
        if self._bar is not None:
            self._postfix.update({k: f"{v:.3f}" for k, v in metrics.items() if k in ("clip_i", "clip_t")})
            self._bar.set_postfix(self._postfix)
        if self._writer is not None:
            for key, value in metrics.items():
                self._writer.add_scalar(f"eval/{key}", value, step)
            self._writer.flush()

    def reset_clock(self, step: int) -> None:
        """Exclude time spent outside training steps (checkpoint, samples) from the next throughput."""
        self._last_time, self._last_step = time.perf_counter(), step

    def image(self, step: int, tag: str, image) -> None:
        if self.primary and self._writer is not None:
            self._writer.add_image(tag, np.asarray(image), step, dataformats="HWC")
            self._writer.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
