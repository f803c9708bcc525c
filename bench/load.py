"""Loading an SD1.5-size IP-Adapter pipeline (base folder, ViT-H image encoder, adapter) from local files with
random weights in the real formats: this project without and with the converted-weights cache
(`weights/converted.py`), against diffusers (`from_pretrained` + `load_ip_adapter`), each load in its own fresh
process, alternating for a few rounds so that load from elsewhere falls on every side alike. The files are in the
page cache for every side after the first round.

    python bench/load.py [--rounds 3] [--models DIR]

Last line: RESULT name=load ours_s=<median, cached> reference_s=<median> speedup=<reference/ours>
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import alternate, configure_xla_for_cpu, emit, host_cpu, run_side
from generate import write_models


def side_ours(root: Path, cache: Path | None) -> None:
    configure_xla_for_cpu()
    from ipadapter_jax.pipelines.ip_adapter_pipeline import IPAdapterPipeline

    start = time.perf_counter()
    pipe = IPAdapterPipeline.from_pretrained(root / "sd15", image_encoder=root / "image_encoder",
                                             adapters=[root / "ip-adapter_sd15.safetensors"], weights_cache=cache)
    load_s = time.perf_counter() - start
    if pipe.weights_cache is not None:
        pipe.weights_cache.wait()  # a first (warming) load commits its entry before the process ends
    emit({"times": [load_s]})


def side_reference(root: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(root / "sd15", torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.load_ip_adapter(str(root), subfolder="", weight_name="ip-adapter_sd15.safetensors",
                         image_encoder_folder="image_encoder", torch_dtype=torch.float32)
    emit({"times": [time.perf_counter() - start], "torch": torch.__version__})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--models", type=Path, help="reuse (or create) the random model folder here")
    p.add_argument("--side", choices=["ours-cold", "ours-cached", "reference"], help=argparse.SUPPRESS)
    args = p.parse_args()
    root = args.models or Path(tempfile.mkdtemp(prefix="ipadapter-bench-"))
    cache = root / "weights-cache"
    if args.side == "ours-cold":
        return side_ours(root, None)
    if args.side == "ours-cached":
        return side_ours(root, cache)
    if args.side == "reference":
        return side_reference(root)

    if not (root / "sd15" / "model_index.json").exists():
        write_models(root)
    argv = ["--models", str(root)]
    warm = run_side(Path(__file__), argv, "ours-cached")["times"][0]  # writes the cache entry
    print(f"models in {root}; {host_cpu()}; the load that wrote the cache took {warm:.2f} s")
    reports = alternate(Path(__file__), argv, args.rounds, sides=("ours-cold", "ours-cached", "reference"))
    med = {side: statistics.median(t for r in rs for t in r["times"]) for side, rs in reports.items()}
    for side, rs in reports.items():
        print(f"{side}: median {med[side]:.2f} s over {[round(r['times'][0], 2) for r in rs]}")
    print(f"without the cache: {med['ours-cold']:.2f} s, {med['ours-cold'] / med['reference']:.2f}x diffusers' time")
    print(f"RESULT name=load ours_s={med['ours-cached']:.3f} reference_s={med['reference']:.3f} "
          f"speedup={med['reference'] / med['ours-cached']:.3f}")


if __name__ == "__main__":
    main()
