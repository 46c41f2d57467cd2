#!/usr/bin/env python3
"""Fuzz campaign for the readers: mutated DICOM, PNG and JPEG bytes through
``medvae.data.readers.decode_bytes``.

Usage: python benchmarks/fuzz_readers.py [--cases 10000] [--seed 0] [--show 5]

Each case starts from a valid seed file and stacks one to three mutations (bit flips, truncations,
splices, DICOM attributes set to odd values under right or wrong VRs, PNG chunks rewritten with valid
CRCs, lying file names), drawn from ``tests/fuzzgen.py``, the generators ``tests/data/test_fuzz.py`` uses for
its bounded run. The only allowed outcomes are decoded images (2-D float in ``[0, 1]``, finite) or
``RejectedInput``. The campaign counts the cases where an exception other than ``RejectedInput``
escaped, and the cases where a decoded image broke an invariant, prints the first few distinct failures
with a command that reproduces each, and ends with ``fuzz cases: N, unhandled exceptions: K``.

Exit status: 0 when every case ended in an allowed outcome, 1 otherwise (including generator bugs).

Corrupt RLE data makes the Rust decoder (pylibjpeg-rle) print "thread '<unnamed>' panicked at ..." to
stderr before medvae turns the panic into a RejectedInput; those lines are expected, the summary on stdout
is what counts.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The generators live with the tests that also use them; a benchmark is a script, so the repository root
# goes on the path for ``tests`` (a package) to import.
sys.path.insert(0, str(REPO))

from tests.fuzzgen import Plan, Violation, build, check_outcome, random_plan  # noqa: E402


def _signature(v: Violation) -> str:
    """What makes two failures the same bug: the kind and message, with numbers and offsets blanked."""
    message = re.sub(r"0x[0-9a-f]+|\d+", "N", v.message)
    return f"{v.kind}: {message[:120]}"


def _reproducer(plan: Plan) -> str:
    return (
        'uv run python -c "from tests.fuzzgen import *; from medvae.data.readers import decode_bytes; '
        "from medvae.config import IngestConfig; "
        f'name, data = build({plan!r}); print(decode_bytes(data, name, IngestConfig()))"'
    )


def main(argv: list[str] | None = None) -> int:
    """Run the campaign and print its summary.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        The exit status: 0 when no case broke the contract, else 1.
    """
    ap = argparse.ArgumentParser(description="Fuzz medvae.data.readers.decode_bytes with mutated files.")
    ap.add_argument("--cases", type=int, default=10_000, help="how many cases to run (default 10000)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the case generator (default 0)")
    ap.add_argument("--show", type=int, default=5, help="how many distinct failures to print (default 5)")
    args = ap.parse_args(argv)

    # pydicom and Pillow warn about nearly every broken file; the outcome, not the warning, is judged.
    warnings.simplefilter("ignore")
    rng = random.Random(args.seed)
    outcomes: Counter[str] = Counter()
    failures: dict[str, tuple[Violation, Plan, int]] = {}
    generator_errors: list[tuple[Plan, str]] = []
    slowest = (0.0, Plan(0))
    start = time.perf_counter()
    for i in range(1, args.cases + 1):
        plan = random_plan(rng)
        try:
            name, data = build(plan)
        except Exception as exc:  # a bug in the fuzzer itself, reported apart from the reader's
            generator_errors.append((plan, f"{type(exc).__name__}: {exc}"))
            continue
        t0 = time.perf_counter()
        violation = check_outcome(data, name)
        elapsed = time.perf_counter() - t0
        slowest = max(slowest, (elapsed, plan), key=lambda s: s[0])
        if violation is None:
            outcomes["allowed"] += 1
        else:
            outcomes[violation.kind] += 1
            key = _signature(violation)
            first, first_plan, count = failures.get(key, (violation, plan, 0))
            failures[key] = (first, first_plan, count + 1)
        if i % 1000 == 0:
            print(f"  {i} cases, {len(failures)} distinct failures", file=sys.stderr, flush=True)

    wall = time.perf_counter() - start
    for n, (violation, plan, count) in enumerate(failures.values()):
        if n >= args.show:
            print(f"... and {len(failures) - args.show} more distinct failures")
            break
        print(f"[{count}x] {violation}\n    reproduce: {_reproducer(plan)}")
    for plan, error in generator_errors[: args.show]:
        print(f"generator error (a bug in tests/fuzzgen.py): {error}\n    plan: {plan!r}")
    ran = args.cases - len(generator_errors)
    print(
        f"seed {args.seed}: {ran} cases in {wall:.1f} s ({ran / max(wall, 1e-9):.0f}/s), slowest "
        f"{slowest[0] * 1000:.0f} ms ({slowest[1]!r}); allowed outcomes {outcomes['allowed']}, "
        f"images breaking the contract {outcomes['image']}, generator errors {len(generator_errors)}"
    )
    print(f"fuzz cases: {ran}, unhandled exceptions: {outcomes['exception']}")
    return 0 if ran == outcomes["allowed"] and not generator_errors else 1


if __name__ == "__main__":
    sys.exit(main())
