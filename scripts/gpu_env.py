"""What ran the GPU run: device, versions, commit, and the measured copy bandwidth (the roofline).

    python scripts/gpu_env.py --device cuda --json results/<slug>/env.json [--quick]

Prints the facts as JSON, then one line for people. Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--json", required=True)
    parser.add_argument("--quick", action="store_true", help="a shorter bandwidth measurement (the dry run)")
    args = parser.parse_args(argv)

    import triton

    import fusedvae
    from bench.device import copy_bandwidth_gbps, device_name, git_commit

    facts = {"device": device_name(args.device), "torch": torch.__version__, "cuda": torch.version.cuda,
             "triton": triton.__version__, "fusedvae": fusedvae.__version__, "commit": git_commit()}
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        facts.update(sm_count=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                     l2_mb=round(getattr(props, "L2_cache_size", 0) / 2**20, 1))
    facts["copy_gbps"] = round(copy_bandwidth_gbps(args.device, min_run_time=0.05 if args.quick else 0.3), 1)
    with open(args.json, "w") as handle:
        json.dump(facts, handle, indent=1)
    print(json.dumps(facts))
    print(f"{facts['device']}, torch {facts['torch']}, triton {facts['triton']}, copy {facts['copy_gbps']} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
