"""`plan_train` / `plan_generate`: compile the real step for a TPU slice on this (CPU) host with libtpu and
report whether it fits and how fast the TPU compiler estimates it runs. No TPU and no weights are needed."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time

from ipadapter_jax.errors import DoesNotFit, UserError, hbm_refusal
from ipadapter_jax.planning import bases, report, steps
from ipadapter_jax.planning import flops as flops_lib
from ipadapter_jax.planning import search as search_lib
from ipadapter_jax.planning.topology import INSTALL_HINT, Topology, parse_topology
from ipadapter_jax.training.config import TRAIN_MEMORY_ADVICE, TrainConfig, load_train_config


def require_libtpu() -> None:
    if importlib.util.find_spec("libtpu") is None:
        raise UserError(f"compiling for a TPU slice needs libtpu, the TPU compiler, which is not installed: "
                        f"{INSTALL_HINT}.")


GENERATE_ADVICE = "lower --batch-per-chip or split the weights with --fsdp N"


def _compile(program: steps.Program, topology: Topology, advice: str):
    """Compile for the slice; the compiler refusing a program over the chip's HBM is a plan that does not fit."""
    start = time.perf_counter()
    try:
        compiled = program.lower().compile()
    except Exception as e:  # noqa: BLE001 - jax raises JaxRuntimeError; only the out-of-HBM refusal is ours
        reason = hbm_refusal(e)
        if reason is None:
            raise
        raise DoesNotFit(f"{program.name} does not fit on {topology.accelerator_type} ({topology.name}), "
                         f"{program.items_per_step / program.mesh.size:g} per chip: {reason} "
                         f"(after {time.perf_counter() - start:.0f} s of compiling). To fit: {advice}.") from None
    return compiled, time.perf_counter() - start


def plan_train(config: TrainConfig, topology: Topology | str) -> report.Estimate:
    """The training step of `config` (a `train/*.yaml` recipe) compiled for `topology`. With `mesh: auto` or
    `model.remat: auto`, the best candidate of planning/search.py's ranking that the compiler accepts."""
    require_libtpu()
    topology = parse_topology(topology) if isinstance(topology, str) else topology
    base = bases.base_architecture(config.model.base or "sd15")
    encoder = bases.image_encoder_config(config.model.image_encoder, base)
    devices = topology.devices()
    if not search_lib.is_auto(config):
        return _plan_train(config, base, encoder, topology, devices)
    found = search_lib.search(config, base, encoder, devices, topology.chip.hbm_bytes)
    return first_accepted(found, lambda cfg: _plan_train(cfg, base, encoder, topology, devices),
                          topology.accelerator_type)


def first_accepted(found: search_lib.Search, plan_one, where: str) -> report.Estimate:
    """The plan of the best-ranked candidate that the compiler accepts (at most search.COMPILER_TRIES tried), as
    `train` retries on the devices it runs on."""
    for refused, candidate in enumerate(found.tries()):
        try:
            estimate = plan_one(found.resolved(candidate))
        except DoesNotFit:
            continue
        estimate.notes[:0] = found.why(candidate, refused)
        return estimate
    raise found.all_refused(where)


def _plan_train(config: TrainConfig, base, encoder, topology: Topology, devices: list) -> report.Estimate:
    notes = []
    accum = config.optimizer.grad_accum_steps
    if accum > 1:  # the compiler counts a loop body once: plan one microbatch, scale by the count
        config = dataclasses.replace(config, global_batch_size=config.global_batch_size // accum,
                                     optimizer=dataclasses.replace(config.optimizer, grad_accum_steps=1))
        notes.append(f"one of {accum} accumulated microbatches compiled; time and FLOPs scaled by {accum}")
    if not config.data.cache:
        notes.append("the cached-encoder step (data.cache); a raw-image step also runs the VAE and CLIP encoders")
    mesh = steps.slice_mesh(devices, config.mesh.data, config.mesh.fsdp)
    program = steps.train_program(config, base, encoder, mesh)
    compiled, seconds = _compile(program, topology, TRAIN_MEMORY_ADVICE)
    estimate = report.analyse(program, compiled, topology, seconds, total_steps=config.total_steps, notes=notes)
    estimate.remat = config.model.remat
    if config.model.remat != "none":
        leave_out_recomputation(estimate, config, program, base, encoder, mesh)
    if accum > 1:
        estimate.est_step_s *= accum
        estimate.flops_per_chip_step *= accum
        estimate.model_flops_per_chip_step *= accum
        estimate.items_per_step *= accum
        estimate.batch_per_chip *= accum
    if not estimate.fits:
        estimate.notes.append(f"does not fit ({estimate.batch_per_chip:g} per chip now): {TRAIN_MEMORY_ADVICE}")
    return estimate


def leave_out_recomputation(estimate: report.Estimate, config: TrainConfig, program: steps.Program, base, encoder,
                            mesh) -> None:
    """The compiler counts the forward work a remat policy recomputes; MFU must not. Scale the model FLOPs by the
    traced gradient's FLOPs without remat over those with the policy (planning/flops.py: matrix products,
    convolutions and kernels; within a point of the compiled ratio on the tiny UNet)."""
    plain = steps.train_program(dataclasses.replace(config, model=dataclasses.replace(config.model, remat="none")),
                                base, encoder, mesh)
    kept, done = flops_lib.gradient_flops(*plain.loss, mesh), flops_lib.gradient_flops(*program.loss, mesh)
    if done <= kept:
        return
    estimate.recompute_share = 1.0 - kept / done
    estimate.model_flops_per_chip_step *= kept / done
    estimate.notes.append(f"model FLOPs (and MFU) leave out the forward work remat {config.model.remat} recomputes: "
                          f"{100 * estimate.recompute_share:.0f}% of the gradient's FLOPs, counted in the traced step")


def plan_generate(base_name: str, settings: steps.GenerateSettings, topology: Topology | str,
                  image_encoder: str | None = None) -> report.Estimate:
    """One denoising step of batch generation (`run_denoise` with a one-step plan: the compiler counts a loop
    body once, and every step of the loop is this one) for `batch_per_chip` images on every chip."""
    require_libtpu()
    topology = parse_topology(topology) if isinstance(topology, str) else topology
    base = bases.base_architecture(base_name)
    encoder = bases.image_encoder_config(image_encoder, base)
    mesh = steps.slice_mesh(topology.devices(), -1, settings.fsdp)
    program = steps.generate_program(dataclasses.replace(settings, steps=1), base, encoder, mesh)
    compiled, seconds = _compile(program, topology, GENERATE_ADVICE)
    program.unet_calls = settings.steps
    notes = [f"one denoising step compiled; images/s counts {settings.steps} steps per image"]
    estimate = report.analyse(program, compiled, topology, seconds, notes=notes)
    if not estimate.fits:
        estimate.notes.append(f"does not fit ({settings.batch_per_chip} per chip now): {GENERATE_ADVICE}")
    return estimate


def plan_from_args(args) -> str:
    """The `ipadapter-jax plan` command's output (table, or JSON with `--json`) from its parsed arguments."""
    estimate = estimate_from_args(args)
    return report.dumps(estimate) if args.json else report.table(estimate)


def estimate_from_args(args):
    """The compiler's estimate for the `ipadapter-jax plan` arguments (also bench/tpu_plan.py's)."""
    require_libtpu()
    # No TPU is opened here, only its compiler: let plans run beside other libtpu processes (libtpu otherwise
    # takes a machine-wide lock meant for the chips). Read when libtpu starts, so before the first compile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    topology = parse_topology(args.topology, args.slices)
    if args.job == "train":
        if args.config is None:
            raise UserError("plan --job train needs --config train/<recipe>.yaml (and optional key=value overrides).")

        estimate = plan_train(load_train_config(args.config, args.overrides), topology)
    else:
        if args.overrides:
            raise UserError(f"key=value overrides apply to --job train only, not {' '.join(args.overrides)}.")
        base = bases.base_architecture(args.base)
        size = base.unet.sample_size * base.vae_scale_factor
        settings = steps.GenerateSettings(
            height=args.height or size, width=args.width or size, steps=args.steps, guidance=args.guidance,
            batch_per_chip=args.batch_per_chip, dtype=args.dtype,
            adapter=None if args.adapter == "none" else args.adapter, num_tokens=args.num_tokens,
            scheduler=args.scheduler, attention=args.attention, fsdp=args.fsdp)
        estimate = plan_generate(args.base, settings, topology, args.image_encoder)
    return estimate
