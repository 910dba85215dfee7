"""`python -m asyncvid.bench`: the same benchmark as `asyncvid bench`, with argparse (no typer needed)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from asyncvid.bench import suite
from asyncvid.bench.config import BenchConfig


def main(argv=None) -> None:
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(prog="python -m asyncvid.bench", description=suite.__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(defaults.models))
    parser.add_argument("--size", type=int, default=defaults.size, help="frame height and width")
    parser.add_argument("--frames", type=int, default=defaults.frames)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--warmups", type=int, nargs="+", default=list(defaults.warmups))
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--out", type=Path, default=defaults.out)
    parser.add_argument("--adherence", action="store_true", help="also score prompt adherence on held-out prompts")
    parser.add_argument("--adherence-only", action="store_true",
                        help="refresh only the adherence section of an existing benchmarks.json")
    parser.add_argument("--adherence-prompts", type=int, default=defaults.adherence_prompts)
    parser.add_argument("--repredict", action="store_true",
                        help="re-measure the cost model's inputs and redo the predictions of an existing benchmarks.json")
    parser.add_argument("--no-parataa", action="store_true", help="leave ParaTAA out of the grid")
    parser.add_argument("--link-gbps", type=float, help="project with this link bandwidth instead of the measured")
    parser.add_argument("--link-latency-us", type=float, help="project with this link latency instead of the measured")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    config = BenchConfig(models=tuple(args.models), size=args.size, frames=args.frames, steps=args.steps,
                         warmups=tuple(args.warmups), repeats=args.repeats, device=args.device, out=args.out,
                         adherence=args.adherence, adherence_only=args.adherence_only,
                         adherence_prompts=args.adherence_prompts, parataa=not args.no_parataa,
                         repredict=args.repredict,
                         link_gbps=args.link_gbps, link_latency_us=args.link_latency_us,
                         command=" ".join(["python -m asyncvid.bench", *argv]))
    suite.run_bench(config)


if __name__ == "__main__":
    main()
