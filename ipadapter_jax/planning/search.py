"""`mesh: auto` and `model.remat: auto`: the (data, fsdp) split, remat policy and per-chip microbatch with the
best estimated throughput that fits the chips' memory. `ipadapter-jax plan` and `train` choose the same way.

Compiling a whole step takes minutes to half an hour on a small host, so candidates are ranked by a model and
only the pick is compiled; when the compiler refuses it for the chips' memory, `plan` and `train` both go on to
the next-ranked (COMPILER_TRIES in all):

- memory per chip = the step's arguments per chip, exact from their shardings (weights, optimizer state, batch)
  + the gradients and the optimizer's update (twice the trainable weights) + the frozen weights whole (the
  compiled SDXL step on v5e at fsdp 4 held what unsplit weights would: XLA gathers them ahead of use and keeps
  them for the backward pass, so fsdp saves memory only where the rules split the adapter and its optimizer
  state) + microbatch x the activations one image keeps for the backward pass under the remat policy, counted
  from the traced backward (its saved residuals, at the real shapes, no compile). XLA fuses away part of them (the
  compiled SD1.5 step keeps 0.6x what the trace counts), so the count errs towards fitting less. Without a memory
  limit (CPU) nothing is counted;
- speed per chip ~ b / (b + 0.7) / recompute: per-chip microbatch b, with 0.7 the half-efficiency batch that fits
  the compiled SD1.5 training step on v5p within a point (estimated MFU 36.7% at 2 images per chip, 45.9% at 8,
  47.1% at 16, 48.0% at 32), and recompute the extra forward work of the policy (full: one more forward on top of
  forward + backward's three, 4/3; dots_no_batch keeps every matmul and recomputes elementwise work, counted
  1.1). Ties go to the smaller fsdp and the lighter policy.

The recipe's global batch is kept; where it does not split over the chips (32 images on 256 chips), it rises
to the next multiple of the chip count and total_steps falls so that the run sees the same number of images.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from ipadapter_jax import sharding as sharding_lib
from ipadapter_jax.errors import ConfigError, UserError
from ipadapter_jax.training.config import TrainConfig

REMAT_CHOICES = ("none", "dots_no_batch", "full")
RECOMPUTE = {"none": 1.0, "dots": 1.1, "dots_no_batch": 1.1, "offload_dots": 1.1, "full": 4 / 3}
HALF_EFFICIENCY_BATCH = 0.7
USABLE = 0.9  # of the chip's memory: room for the compiler's own buffers and fragmentation
MAX_FSDP = 64
COMPILER_TRIES = 3  # best-ranked candidates compiled, in order, before giving up (`plan` and `train` alike)


@dataclasses.dataclass(frozen=True)
class Candidate:
    fsdp: int
    remat: str
    batch_per_chip: int  # microbatch per chip
    grad_accum_steps: int
    argument_bytes: int | None = None  # per chip; None: not counted (no memory limit)
    activation_bytes: int | None = None  # per chip, the microbatch's

    @property
    def bytes(self) -> int | None:
        return None if self.argument_bytes is None else self.argument_bytes + self.activation_bytes

    @property
    def speed(self) -> float:
        b = self.batch_per_chip
        return b / (b + HALF_EFFICIENCY_BATCH) / RECOMPUTE[self.remat]

    def describe(self) -> str:
        memory = "" if self.bytes is None else f", ~{self.bytes / 2**30:.1f} GiB per chip by the model"
        return (f"fsdp={self.fsdp}, remat={self.remat}, {self.batch_per_chip} per chip x "
                f"{self.grad_accum_steps} accumulation step(s){memory}")


@dataclasses.dataclass
class Search:
    config: TrainConfig  # the recipe with its global batch (and total_steps) fitted to the chip count
    num_devices: int
    capacity_bytes: int | None  # per chip; None: not limited (CPU)
    ranked: list[Candidate]  # fitting candidates, best first
    rejected: int  # candidates over the memory budget
    notes: list[str]

    def resolved(self, c: Candidate) -> TrainConfig:
        """The recipe with the candidate's choices written in (what `train` runs)."""
        cfg = self.config
        mesh = dataclasses.replace(cfg.mesh, data=self.num_devices // c.fsdp, fsdp=c.fsdp, auto=False)
        return dataclasses.replace(
            cfg, mesh=mesh, model=dataclasses.replace(cfg.model, remat=c.remat),
            optimizer=dataclasses.replace(cfg.optimizer, grad_accum_steps=c.grad_accum_steps))

    def summary(self, c: Candidate) -> str:
        what = " and ".join(w for w, on in (("mesh: auto", self.config.mesh.auto),
                                            ("remat: auto", self.config.model.remat == "auto")) if on)
        return (f"{what} chose {c.describe()}; {len(self.ranked)} candidate(s) fit the model's memory budget "
                f"({self.rejected} did not), ranked by the model in planning/search.py")

    def tries(self) -> list[Candidate]:
        """The candidates to compile, best first, until the compiler accepts one."""
        return self.ranked[:COMPILER_TRIES]

    def why(self, c: Candidate, refused: int) -> list[str]:
        """The notes for choosing `c` after the compiler refused the `refused` better-ranked candidates."""
        return [*self.notes, self.summary(c),
                *(f"the compiler refused the better-ranked {r.describe()}" for r in self.ranked[:refused])]

    def all_refused(self, where: str) -> UserError:
        tried = self.tries()
        return UserError(f"The compiler refused the {len(tried)} best-ranked choices for "
                         f"{self.config.global_batch_size} images on {where} "
                         f"({'; '.join(c.describe() for c in tried)}). Use a bigger slice or lower "
                         "global_batch_size.")


def is_auto(config: TrainConfig) -> bool:
    return config.mesh.auto or config.model.remat == "auto"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def fit_global_batch(config: TrainConfig, num_devices: int) -> tuple[TrainConfig, list[str]]:
    """The recipe with its global batch raised to a multiple of the chip count when it is not one."""
    gbs = config.global_batch_size
    if gbs % num_devices == 0:
        return config, []
    new = num_devices * math.ceil(gbs / num_devices)
    steps = math.ceil(config.total_steps * gbs / new)
    note = (f"global_batch_size {gbs} does not split over {num_devices} chips: raised to {new}, and total_steps "
            f"{config.total_steps} -> {steps} to see the same number of images (learning rate unchanged)")
    return dataclasses.replace(config, global_batch_size=new, total_steps=steps), [note]


def activation_bytes(loss, loss_args, mesh) -> int:
    """Bytes the backward pass of `loss` keeps: the residuals of its VJP with respect to the trainable
    parameters (the first argument), leaving out what are arguments themselves. Traced, not compiled."""

    def residuals(params, *rest):  # differentiated in the parameters alone, as the step does
        return jax.tree.leaves(jax.vjp(lambda p: loss(p, *rest)[0], params)[1])

    with jax.set_mesh(mesh):
        closed = jax.make_jaxpr(residuals)(*loss_args)
    inputs = {id(v) for v in closed.jaxpr.invars}
    total = sum(math.prod(v.aval.shape) * v.aval.dtype.itemsize for v in closed.jaxpr.outvars
                if id(v) not in inputs and hasattr(v.aval, "shape"))
    return total


def _bytes(tree, per_chip: bool = True) -> int:
    """Bytes of abstract arrays: on one chip (from their shardings), or whole."""
    return sum(math.prod(x.sharding.shard_shape(x.shape) if per_chip else x.shape) * jax.numpy.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def _variant(config: TrainConfig, fsdp: int, remat: str, gbs: int) -> TrainConfig:
    """`config` with one concrete choice and no accumulation (what `_memory` builds to count)."""
    return dataclasses.replace(config, global_batch_size=gbs,
                               mesh=dataclasses.replace(config.mesh, data=-1, fsdp=fsdp, auto=False),
                               model=dataclasses.replace(config.model, remat=remat),
                               optimizer=dataclasses.replace(config.optimizer, grad_accum_steps=1))


def _memory(config: TrainConfig, base, encoder, devices: list, fsdps: list[int], remats) -> tuple[dict, dict]:
    """({fsdp: argument bytes per chip}, {remat: (activation bytes whatever the batch, per image)})."""
    from ipadapter_jax.planning import steps  # planning builds models; keep `import search` light

    per_chip = config.global_batch_size // len(devices)
    one = steps.slice_mesh(devices[:1], 1, 1)  # activations per image do not depend on the split: one device
    activations = {}
    for remat in remats:
        kept = [activation_bytes(*steps.train_program(_variant(config, 1, remat, b), base, encoder, one).loss, one)
                for b in (1, 2)]
        activations[remat] = (2 * kept[0] - kept[1], kept[1] - kept[0])
    arguments = {}
    for fsdp in fsdps:  # built with one image per chip: the step's batch argument holds per_chip of them
        mesh = steps.slice_mesh(devices, -1, fsdp)
        state, frozen, consts, batch = steps.train_program(_variant(config, fsdp, remats[0], len(devices)), base,
                                                           encoder, mesh).args
        # the step's arguments on one chip + the gradients and the optimizer's update, each the size of the
        # trainable weights, + the frozen weights gathered whole for use (module doc)
        arguments[fsdp] = (_bytes((state, frozen, consts)) + per_chip * _bytes(batch) + 2 * _bytes(state["params"])
                           + _bytes(frozen, per_chip=False) - _bytes(frozen))
    return arguments, activations


def search(config: TrainConfig, base, encoder, devices: list, capacity_bytes: int | None) -> Search:
    """Rank every (fsdp, remat, microbatch) for `config` on `devices` by the model (module doc); with
    `capacity_bytes` None (no memory limit) by speed alone, counting no memory."""
    n = len(devices)
    config, notes = fit_global_batch(config, n) if config.mesh.auto else (config, [])
    if config.global_batch_size % n:
        raise ConfigError(f"global_batch_size {config.global_batch_size} must be a multiple of the {n} devices; "
                          f"set it to {n * math.ceil(config.global_batch_size / n)} or use mesh: auto.")
    if config.mesh.auto:
        fsdps = [d for d in _divisors(n) if d & (d - 1) == 0 and d <= MAX_FSDP]
    else:
        fsdps = [sharding_lib.axis_sizes(config.mesh, n)[1]]
    remats = REMAT_CHOICES if config.model.remat == "auto" else (config.model.remat,)
    per_chip = config.global_batch_size // n

    memory = None if capacity_bytes is None else _memory(config, base, encoder, devices, fsdps, remats)
    candidates = []
    for fsdp in fsdps:
        for remat in remats:
            for b in (per_chip // a for a in _divisors(per_chip)):
                counted = () if memory is None else (memory[0][fsdp], memory[1][remat][0] + b * memory[1][remat][1])
                candidates.append(Candidate(fsdp, remat, b, per_chip // b, *counted))
    fitting = [c for c in candidates if capacity_bytes is None or c.bytes <= USABLE * capacity_bytes]
    fitting.sort(key=lambda c: (-c.speed, c.fsdp, REMAT_CHOICES.index(c.remat) if c.remat in REMAT_CHOICES else 0))
    result = Search(config=config, num_devices=n, capacity_bytes=capacity_bytes, ranked=fitting,
                    rejected=len(candidates) - len(fitting), notes=notes)
    if not fitting:
        smallest = min(candidates, key=lambda c: c.bytes)
        raise ConfigError(f"No split of {config.global_batch_size} images over {n} chips fits in "
                          f"{capacity_bytes / 2**30:.1f} GiB per chip by the memory model; the smallest is "
                          f"{smallest.describe()}. Use more chips, or lower global_batch_size.")
    return result


def device_memory_bytes(devices: list) -> int | None:
    """Memory per device as its runtime reports it (TPU and GPU); None on CPU, where every device shares the
    host's memory and XLA:CPU's scheduler does not plan to a limit."""
    from ipadapter_jax.models.target import platform_of
    from ipadapter_jax.pipelines.settings import device_memory_bytes as one_device

    return None if platform_of(devices) == "cpu" else one_device(devices[0])


def choose(config: TrainConfig, devices: list, *, refused: int = 0) -> tuple[TrainConfig, str]:
    """`train`'s choice for `mesh: auto` / `remat: auto` on the devices it runs on: the best-ranked candidate after
    the `refused` ones the compiler turned down there (`plan` compiles the same ranking for a TPU slice the same
    way). Returns the resolved config and one line saying why."""
    from ipadapter_jax.models.target import platform_of
    from ipadapter_jax.planning import bases

    base = bases.base_architecture(config.model.base)
    encoder = bases.image_encoder_config(config.model.image_encoder, base)
    found = search(config, base, encoder, list(devices), device_memory_bytes(list(devices)))
    tries = found.tries()
    if refused >= len(tries):
        raise found.all_refused(f"{len(devices)} {platform_of(list(devices))} device(s)")
    best = tries[refused]
    return found.resolved(best), "; ".join(found.why(best, refused))
