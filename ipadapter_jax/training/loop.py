"""``train(config)``: the whole adapter training run, top to bottom (big_vision style).

distributed -> mesh -> model (frozen base placed at load, adapter created sharded) -> input -> optimizer
state (eval_shape, then jit(init, out_shardings)) -> step (jit with in/out shardings and donation) ->
restore (from the workdir's latest checkpoint) -> loop (log, evaluate, checkpoint, samples, exports) -> final
export.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from ipadapter_jax import sharding as sharding_lib
from ipadapter_jax.checkpoint import Checkpointer, abstract_like
from ipadapter_jax.config import to_dict
from ipadapter_jax.data import pipeline, reader
from ipadapter_jax.errors import CheckpointError, ConfigError, DoesNotFit, UserError, hbm_refusal
from ipadapter_jax.host_memory import retain_freed_memory
from ipadapter_jax.models.adapter_spec import AdapterSpec
from ipadapter_jax.outputs import check_outputs
from ipadapter_jax.training import encoder_cache, inputs
from ipadapter_jax.training import loss as loss_lib
from ipadapter_jax.training import model as model_lib
from ipadapter_jax.training import step as step_lib
from ipadapter_jax.training.config import TRAIN_MEMORY_ADVICE, TrainConfig
from ipadapter_jax.training.evaluator import EvalLog, Evaluator, summary_line
from ipadapter_jax.training.monitoring import Monitor
from ipadapter_jax.training.samples import SampleGrid, write_grid
from ipadapter_jax.weights.checkpoint_files import weights_fingerprint
from ipadapter_jax.weights.ip_adapter_files import export_ip_adapter, load_ip_adapter, save_ip_adapter

_log = logging.getLogger("ipadapter_jax.train")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; nothing computed from that step is saved or exported."""


class _Refused(Exception):
    """The compiler refused the step `mesh: auto` / `remat: auto` chose, for the devices' memory."""


RECORD_FORMAT = "ipadapter_jax.train"
EXPORT_NAME = "ip_adapter.safetensors"  # the official layout, under <workdir>/export/
# Changing these between a run and its resume would change which records and draws each step sees.
_RESUME_KEYS = ("seed", "global_batch_size", "data.source", "data.split", "data.cache", "data.resolution",
                "data.crop", "data.p_drop_image", "data.p_drop_text", "data.p_drop_both", "data.shuffle")


@dataclasses.dataclass
class TrainResult:
    workdir: Path
    step: int  # the last step trained (the train state's step)
    history: list[dict[str, float]]  # metrics of every step run by this call, in order ("step" included)
    resumed_from: int | None
    exported: Path | None  # the official-layout .safetensors written at the end
    checkpoint_dir: Path
    num_skipped: int  # broken records this process skipped

    @property
    def losses(self) -> list[float]:
        return [m["loss"] for m in self.history]

    def summary(self) -> str:
        resumed = f" (resumed from step {self.resumed_from})" if self.resumed_from is not None else ""
        last = f", last loss {self.losses[-1]:.5f}" if self.history else ""
        skipped = f", {self.num_skipped} broken records skipped" if self.num_skipped else ""
        return (f"Trained to step {self.step}{resumed}{last}{skipped}.\n"
                f"  checkpoints: {self.checkpoint_dir}\n  adapter (official layout): {self.exported}\n"
                f"  adapter (ipadapter-jax folder): {self.exported.parent / 'ip_adapter' if self.exported else None}")


AutoChooser = Callable[..., tuple[TrainConfig, str]]  # (config, devices, *, refused) -> (config, why)


def train(config: TrainConfig, *, devices: Sequence[jax.Device] | None = None,
          on_step: Callable[[int, dict[str, float]], None] | None = None,
          on_eval: Callable[[int, dict[str, float], list], None] | None = None,
          choose_auto: AutoChooser | None = None) -> TrainResult:
    """Train (or resume) the adapter described by ``config``; ``devices`` restricts the mesh (tests);
    ``on_step(step, metrics)`` gets every step's metrics as floats (a device sync per step);
    ``on_eval(step, metrics, images)`` every evaluation's metrics and generated PIL images;
    ``choose_auto(config, devices, refused=n) -> (config, why)`` resolves `mesh: auto` / `model.remat: auto`
    once the devices are known, passing over the n best-ranked choices the compiler refused for the devices'
    memory (`ipadapter_jax.planning.search.choose`, as `ipadapter-jax train` passes it; `plan` does the same)."""
    refused = 0
    while True:
        try:
            return _train(config, devices=devices, on_step=on_step, on_eval=on_eval, choose_auto=choose_auto,
                          refused=refused)
        except _Refused as e:  # nothing was trained or written yet: set up again with the next choice
            _log.warning("%s; compiling the next-ranked choice.", e)
            refused += 1


def _train(config: TrainConfig, *, devices, on_step, on_eval, choose_auto: AutoChooser | None,
           refused: int) -> TrainResult:
    config.validate_for_training()
    workdir = Path(config.workdir).absolute()

    # ---------------------------------------------------------------- distributed
    initialize_distributed(config)
    given = config
    config = inputs.materialize(config)
    primary = jax.process_index() == 0
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- mesh
    auto = config.mesh.auto or config.model.remat == "auto"
    if auto:  # what `ipadapter-jax plan` would choose
        if choose_auto is None:
            raise ConfigError("mesh: auto and model.remat: auto are chosen for the devices by "
                              "ipadapter_jax.planning.search.choose: pass train(..., choose_auto=choose), as "
                              "`ipadapter-jax train` does, or set mesh.data, mesh.fsdp and model.remat.")
        config, why = choose_auto(config, list(devices) if devices is not None else jax.devices(), refused=refused)
        _log.warning("%s", why)
    mesh = sharding_lib.make_mesh(config.mesh, devices)
    rules = config.mesh.rules
    replicated = sharding_lib.replicated(mesh)
    batch_sharding = sharding_lib.batch_sharding(mesh)
    if config.global_batch_size // config.optimizer.grad_accum_steps % mesh.size:
        raise ConfigError(f"The microbatch ({config.global_batch_size} / {config.optimizer.grad_accum_steps} "
                          f"accumulation steps) must split evenly over the {mesh.size} devices.")

    # ---------------------------------------------------------------- model
    cached = bool(config.data.cache)
    assembled = model_lib.build_model(config.model, mesh, rules, with_encoders=not cached, seed=config.seed)
    spec, info = assembled.spec, assembled.info
    params, frozen = assembled.trainable, assembled.frozen
    if config.model.init_adapter:
        adapter = load_ip_adapter(config.model.init_adapter, unet_config=info.folder / "unet")
        params = model_lib.from_ip_adapter(adapter, params)

    # ---------------------------------------------------------------- input
    d = config.data
    batches = pipeline.BatchOptions(global_batch_size=config.global_batch_size, seed=config.seed, shuffle=d.shuffle,
                                    worker_count=d.worker_count, read_threads=d.read_threads)
    if cached:
        encoder_cache.check_cache(d.cache, encoder_cache.cache_meta(config, spec, info))
        iterator = encoder_cache.make_cached_iterator(
            encoder_cache.CacheSource(d.cache),
            encoder_cache.CachedTransform(d.p_drop_image, d.p_drop_text, d.p_drop_both, config.seed), batches)
        uncond = encoder_cache.load_unconditional(d.cache)
    else:
        source = reader.open_source(d.source, d.split, d.image_key, d.text_key, data_dir=d.data_dir)
        iterator = pipeline.make_train_iterator(
            source, encoder_cache.transform_config(config, info, assembled.image_size), batches)
        uncond = jax.jit(lambda p, f, ids: loss_lib.unconditional(assembled.merge(p, f), spec, ids,
                                                                   assembled.image_size))(
            params, frozen, encoder_cache.empty_ids(info))
    consts = jax.device_put({"alphas_cumprod": jnp.asarray(info.alphas_cumprod), "uncond": uncond}, replicated)

    # ---------------------------------------------------------------- optimizer state
    tx, schedule = step_lib.make_optimizer(config.optimizer, config.total_steps)
    param_shardings = {k: v.sharding for k, v in params.items()}
    with jax.numpy_dtype_promotion("standard"):
        opt_shardings = sharding_lib.like_params(jax.eval_shape(tx.init, params), param_shardings, mesh)
    state = step_lib.init_state(params, tx, config.seed, opt_shardings, replicated)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)

    # ---------------------------------------------------------------- step
    loss_settings = loss_lib.loss_settings(config.loss, info.prediction_type, info.num_train_timesteps,
                                           info.vae_scaling.items())
    settings = step_lib.StepSettings(spec=spec, loss=loss_settings, cached=cached, remat=config.model.remat,
                                     grad_accum_steps=config.optimizer.grad_accum_steps)
    step_fn = step_lib.make_train_step(assembled.merge, tx, schedule, settings, batch_sharding)
    frozen_shardings = {k: v.sharding for k, v in frozen.items()}
    jitted = jax.jit(step_fn, in_shardings=(state_shardings, frozen_shardings, replicated, batch_sharding),
                     out_shardings=(state_shardings, replicated), donate_argnums=(0,))

    # ---------------------------------------------------------------- restore
    monitor = None
    checkpointer = Checkpointer(workdir / "checkpoints", every_steps=config.checkpoint.every_steps,
                                keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    try:
        record = {"format": RECORD_FORMAT, "config": to_dict(given), "resolved_config": to_dict(config),
                  "adapter_spec": spec.to_dict()}
        record["fingerprints"] = {"model.base": weights_fingerprint(config.model.base),
                                  "model.image_encoder": weights_fingerprint(config.model.image_encoder)}
        notes: list[str] = []

        saved_eval: dict = {}

        def load(step: int):
            saved = checkpointer.read_record(step)
            check_resumable(saved, record)
            saved_eval[step] = saved.get("eval")
            return checkpointer.restore(step, abstract_like(state), iterator)

        found = checkpointer.restore_newest(
            load, on_damaged=lambda s, why: notes.append(f"{why} It was moved aside; resuming from an earlier step."))
        resumed_from = None
        if found is not None:
            resumed_from, state = found
            notes.append(f"Resumed from step {resumed_from}.")
            if saved_eval.get(resumed_from) is not None:  # the latest evaluation stays in the record
                record["eval"] = saved_eval[resumed_from]
        step = int(jax.device_get(state["step"]))

        # ---------------------------------------------------------------- compile
        first = next(iterator) if step < config.total_steps else None
        compiled, flops = None, None
        if first is not None:
            batch = pipeline.to_global_batch(first, mesh, sharding_lib.BATCH_SPEC)
            compiled = _compile_step(jitted, (state, frozen, consts, batch), mesh, auto)
            flops = (compiled.cost_analysis() or {}).get("flops")
            if mesh.devices.flat[0].platform == "cpu":  # temporaries in host memory: reuse them step to step
                retain_freed_memory(compiled.memory_analysis().temp_size_in_bytes)
        encoders = _encoders(config, assembled, mesh, frozen, cached)
        sampler = SampleGrid(config, assembled, encoders, mesh) if config.monitor.sample_every_steps else None
        evaluator = Evaluator(config, assembled, encoders, mesh) if config.eval.every_steps else None
        monitor = Monitor(workdir, config.monitor, start_step=step, total_steps=config.total_steps,
                          global_batch_size=config.global_batch_size, num_devices=mesh.size,
                          flops_per_device_step=flops, primary=primary)
        for note in notes:
            monitor.write(note)
        eval_log = None
        if evaluator is not None:
            eval_log = EvalLog(workdir, keep_through=step if resumed_from is not None else -1, primary=primary)

        def evaluate(step: int) -> None:
            """Generate and score the held-out image prompts; the result also goes into later checkpoints."""
            nonlocal record
            metrics, images = evaluator(state["params"], frozen)
            row = {"step": step, **metrics}
            if history and history[-1]["step"] == step:
                row["loss"] = history[-1]["loss"]
            eval_log.append(row)
            record = {**record, "eval": row}
            monitor.log_eval(step, metrics, summary_line(step, metrics, evaluator.metrics.name, len(images)))
            monitor.image(step, "eval/images", evaluator.sheet(images))
            if on_eval is not None:
                on_eval(step, metrics, images)
            monitor.reset_clock(step)

        # ---------------------------------------------------------------- loop
        history: list[dict[str, float]] = []
        pending: list[tuple[int, dict[str, jax.Array]]] = []
        log_every, every_export = config.monitor.log_every_steps, config.checkpoint.export_every_steps
        preempted = False
        if evaluator is not None and config.eval.at_start and resumed_from is None and step == 0:
            evaluate(0)

        def settle() -> None:
            """Metrics to the host; a non-finite loss stops the run before anything is saved from it."""
            for s, m in pending:
                history.append({"step": float(s), **{k: float(v) for k, v in jax.device_get(m).items()}})
                if not np.isfinite(history[-1]["loss"]):
                    saved = checkpointer.latest_step()
                    raise TrainingDiverged(
                        f"Training diverged at step {s}: the loss is {history[-1]['loss']}; nothing from it was saved "
                        f"(last checkpoint: {'none' if saved is None else f'step {saved}'}). Lower optimizer.lr (now "
                        f"{config.optimizer.lr:g}) or set optimizer.grad_clip_norm, then rerun.")
            pending.clear()

        while step < config.total_steps:
            local = first if first is not None else next(iterator)
            first = None
            batch = pipeline.to_global_batch(local, mesh, sharding_lib.BATCH_SPEC)
            state, metrics = compiled(state, frozen, consts, batch)
            step += 1
            pending.append((step, metrics))
            monitor.advance()
            last = step == config.total_steps
            preempted = checkpointer.reached_preemption(step)
            export_now = bool(every_export) and step % every_export == 0 and not last
            sample_now = sampler is not None and step % config.monitor.sample_every_steps == 0
            logged = step % log_every == 0 or last
            eval_now = evaluator is not None and (step % config.eval.every_steps == 0 or last)
            if (on_step is not None or logged or preempted or export_now or sample_now or eval_now
                    or checkpointer.due(step)):
                settle()
                if logged:
                    history[-1].update(monitor.log(step, history[-1], num_skipped=iterator.num_skipped))
                if on_step is not None:
                    on_step(step, history[-1])
            if eval_now and not preempted:  # before the checkpoint, whose record then holds it
                evaluate(step)
            if preempted:
                checkpointer.save(step, state, iterator, record, force=True)
                monitor.write(f"Preemption notice at step {step}: checkpoint saved; rerun to resume.")
                break
            if not last:  # the final checkpoint is forced below
                checkpointer.save(step, state, iterator, record)
            if export_now:
                _export(state["params"], spec, workdir / "export" / f"step_{step:08d}", primary)
                monitor.reset_clock(step)
            if sample_now:
                _write_samples(sampler, state["params"], frozen, workdir, step, monitor)
        settle()
        if checkpointer.latest_step() != step:
            checkpointer.save(step, state, iterator, record, force=True)
        checkpointer.wait()
        checkpointer.close()
    except BaseException:
        # Let a save in flight end and close Orbax's threads (their own failure is secondary to this one).
        checkpointer.close_quietly()
        if monitor is not None:
            monitor.close()
        raise

    # ---------------------------------------------------------------- export
    if preempted:
        monitor.close()
        return TrainResult(workdir=workdir, step=step, history=history, resumed_from=resumed_from, exported=None,
                           checkpoint_dir=checkpointer.directory, num_skipped=iterator.num_skipped)
    exported = _export(state["params"], spec, workdir / "export", primary)
    monitor.write(f"Step {step}: adapter written to {exported} (official layout) and "
                  f"{exported.parent / 'ip_adapter'} (ipadapter-jax folder).")
    monitor.close()
    return TrainResult(workdir=workdir, step=step, history=history, resumed_from=resumed_from, exported=exported,
                       checkpoint_dir=checkpointer.directory, num_skipped=iterator.num_skipped)


def _compile_step(jitted, args: tuple, mesh, auto: bool):
    """The step compiled for the mesh; the compiler refusing it for the devices' memory is one sentence, or, when
    `mesh: auto` / `remat: auto` chose the step (`auto`), the signal to try the next-ranked choice."""
    try:
        with jax.set_mesh(mesh):  # the mesh that Pallas kernels deep in the UNet are split over
            return jitted.lower(*args).compile()
    except Exception as e:  # noqa: BLE001 - jax raises JaxRuntimeError; only the out-of-memory refusal is ours
        reason = hbm_refusal(e)
        if reason is None:
            raise
        reason = reason.rstrip(".")
        if auto:
            raise _Refused(f"The compiler refused the chosen step for the devices' memory: {reason}") from None
        raise DoesNotFit(f"The training step does not fit in the memory of the {mesh.size} "
                         f"{mesh.devices.flat[0].platform} device(s): {reason}. To fit: {TRAIN_MEMORY_ADVICE}, or "
                         "set mesh: auto to search for a split that fits.") from None


def initialize_distributed(config: TrainConfig) -> None:
    """``jax.distributed.initialize`` once, before anything touches a device (a no-op when disabled)."""
    d = config.distributed
    if not d.enabled or jax.distributed.is_initialized():
        return
    if d.cpu_collectives != "none":
        jax.config.update("jax_cpu_collectives_implementation", d.cpu_collectives)
    kwargs: dict[str, Any] = {}
    if d.coordinator_address is not None:
        kwargs.update(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                      process_id=d.process_id)
    if d.local_device_ids is not None:
        kwargs["local_device_ids"] = list(d.local_device_ids)
    jax.distributed.initialize(**kwargs)


def check_resumable(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """A config that would change the data order, the adapter or the frozen weights cannot resume a run; name
    what changed."""
    if saved.get("format") != RECORD_FORMAT:
        raise ConfigError("The workdir's checkpoints were not written by ipadapter-jax training; use a new workdir.")
    model_lib.check_adapter_compatible_dicts(now["adapter_spec"], saved.get("adapter_spec", {}))
    for dotted in _RESUME_KEYS:
        # The global batch as run: `mesh: auto` raises it to split over the chips (planning/search.py).
        which = "resolved_config" if dotted == "global_batch_size" else "config"
        a, b = _get(saved.get(which, saved["config"]), dotted), _get(now[which], dotted)
        if a != b:
            fix = "needs the same value (or use a new workdir)"
            if _get(saved["config"], dotted) == _get(now["config"], dotted):  # same recipe, other chip count
                steps = _get(saved.get(which, saved["config"]), "total_steps")
                fix = (f"needs the same global batch: mesh: auto fits it to the chip count, so resume on as many "
                       f"devices as the run started on, or set global_batch_size={a} total_steps={steps}")
            raise ConfigError(f"{dotted} was {a!r} when this workdir's run started and is {b!r} now; resuming "
                              f"{fix}.")
    for key, fingerprint in now.get("fingerprints", {}).items():
        before = saved.get("fingerprints", {}).get(key)
        if before is not None and before != fingerprint:
            raise ConfigError(f"{key} ({_get(now['config'], key)}) holds other weights than when this workdir's run "
                              f"started ({_get(saved['config'], key)}); resume with the same weights or use a new "
                              "workdir.")


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


def _host_params(params: dict[str, jax.Array]) -> dict[str, np.ndarray]:
    """Every process gets full host copies (params may be sharded across hosts)."""
    return {k: np.asarray(v) for k, v in multihost_utils.process_allgather(params, tiled=True).items()}


def _export(params, spec, out_dir: Path, primary: bool) -> Path:
    """Our adapter folder ``out_dir/ip_adapter`` and the official ``out_dir/ip_adapter.safetensors``."""
    host = _host_params(params)
    out_file = out_dir / EXPORT_NAME
    if primary:
        adapter = model_lib.to_ip_adapter(spec, host)
        save_ip_adapter(adapter, out_dir / "ip_adapter", overwrite=True)
        export_ip_adapter(adapter, out_file, overwrite=True)
    return out_file


def _encoders(config: TrainConfig, assembled, mesh, frozen, cached: bool):
    """The frozen VAE and encoders for sample grids and evaluation (None when neither is on)."""
    if not (config.monitor.sample_every_steps or config.eval.every_steps):
        return None
    if cached:  # the encoders are not part of a cached run's model
        return model_lib.load_encoders(config.model, assembled.info, mesh, config.mesh.rules)
    return assembled.merge(assembled.trainable, frozen)


def _write_samples(sampler, params, frozen, workdir: Path, step: int, monitor: Monitor) -> None:
    image = sampler(params, frozen)
    if jax.process_index() == 0:
        path = write_grid(image, workdir, step)
        monitor.image(step, "samples", image)
        monitor.write(f"Step {step}: samples in {path}.")
    monitor.reset_clock(step)


def export_checkpoint(workdir: str | Path, out_file: str | Path | None = None, *, step: int | None = None,
                      overwrite: bool = False, on_damaged: Callable[[int, str], None] | None = None) -> Path:
    """Export the adapter of a workdir's checkpoint (default: the newest readable one) to the official layout.

    Needs no base model: the checkpoint records the adapter spec. Writes ``out_file``, by default
    ``<workdir>/export/step_<N>/ip_adapter.safetensors`` with our Flax folder ``ip_adapter/`` beside it. An
    existing ``out_file`` is replaced only with ``overwrite``; the workdir's own export folder always is. Damaged
    newer checkpoints are reported to ``on_damaged(step, reason)`` and left as they are.
    """
    folder = Path(workdir) / "checkpoints"
    if not folder.is_dir():
        raise UserError(f"{folder} does not exist; point to a training workdir (the one given as workdir=...).")
    if out_file is not None:
        check_outputs([out_file], inputs=[folder], overwrite=overwrite)
    checkpointer = Checkpointer(folder, every_steps=1, keep=0, async_save=False, read_only=True)
    try:
        available = checkpointer.all_steps()
        if step is not None and step not in available:
            raise UserError(f"{folder} has no checkpoint for step {step}"
                            + (f" (available: {', '.join(map(str, available))})." if available else "."))

        def load(s: int):
            spec = AdapterSpec.from_dict(checkpointer.read_record(s)["adapter_spec"])
            return spec, checkpointer.restore_state_locally(s)

        if step is None:
            found = checkpointer.restore_newest(load, on_damaged=on_damaged)
        else:
            try:
                found = step, load(step)
            except CheckpointError as e:
                raise CheckpointError(f"{e} Pass another --step (available: {', '.join(map(str, available))}).")\
                    from None
        if found is None:
            raise UserError(f"{folder} has no checkpoint; train first.")
    finally:
        checkpointer.close_quietly()
    step, (spec, state) = found
    host = {k: np.asarray(v) for k, v in state["params"].items()}
    adapter = model_lib.to_ip_adapter(spec, host)
    if out_file is None:  # the workdir's own export folder: regenerated freely
        out_file = Path(workdir) / "export" / f"step_{step:08d}" / EXPORT_NAME
        save_ip_adapter(adapter, out_file.parent / "ip_adapter", overwrite=True)
        overwrite = True
    return export_ip_adapter(adapter, out_file, overwrite=overwrite)
