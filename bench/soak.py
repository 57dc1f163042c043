"""Soak test of vllama under eviction pressure (fake engines, one simulated GPU): many concurrent clients, four
models that do not all fit, mixed streaming; every answer checked, nothing may be lost. See
vllama/testing/soak.py for what is measured.

    python bench/soak.py                                   # 10 000 requests, concurrency 64, 4 models
    python bench/soak.py --requests 2000 --out /tmp/soak.md
    python bench/soak.py --out bench/results/soak-$(date +%F).md

Exits 1 unless every request was answered completely and correctly and nothing was left in flight or running.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllama.testing.soak import SoakConfig, markdown, run_soak  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--models", type=int, default=4)
    p.add_argument("--model-gib", type=float, default=3.0)
    p.add_argument("--gpu-gib", type=float, default=8.0)
    p.add_argument("--stream-fraction", type=float, default=0.4)
    p.add_argument("--seed", type=int, default=6)
    p.add_argument("--out", type=Path, help="write the report (markdown) here")
    args = p.parse_args()
    cfg = SoakConfig(
        requests=args.requests,
        concurrency=args.concurrency,
        models=args.models,
        model_gib=args.model_gib,
        gpu_gib=args.gpu_gib,
        stream_fraction=args.stream_fraction,
        seed=args.seed,
    )
    result = run_soak(cfg)
    print(json.dumps(result.summary(), indent=2))
    for failure in result.failure_examples:
        print(failure, file=sys.stderr)
    if args.out:
        command = "python " + shlex.join(["bench/soak.py", *sys.argv[1:]])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(result, command))
        print(f"report: {args.out}")
    return 0 if result.passed() else 1


if __name__ == "__main__":
    sys.exit(main())
