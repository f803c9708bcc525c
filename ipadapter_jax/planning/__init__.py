"""Ahead-of-time planning for TPU slices: compile the real training step or denoising step for a named
topology on a CPU host (libtpu), with no weights, and report per-chip HBM, FLOPs and the TPU compiler's own
time estimate (MFU, images/s, hours for a run). `ipadapter-jax plan` is its command."""

from ipadapter_jax.planning.bases import BUILT_IN, BaseArchitecture, base_architecture
from ipadapter_jax.planning.plan import plan_from_args, plan_generate, plan_train, require_libtpu
from ipadapter_jax.planning.report import Estimate, analyse, kernel_costs, table
from ipadapter_jax.planning.steps import GenerateSettings, Program, generate_program, train_program
from ipadapter_jax.planning.topology import CHIPS, INSTALL_HINT, Chip, Topology, parse_topology

__all__ = ["BUILT_IN", "CHIPS", "INSTALL_HINT", "BaseArchitecture", "Chip", "Estimate", "GenerateSettings",
           "Program", "Topology", "analyse", "base_architecture", "generate_program", "kernel_costs",
           "parse_topology", "plan_from_args", "plan_generate", "plan_train", "require_libtpu", "table",
           "train_program"]
