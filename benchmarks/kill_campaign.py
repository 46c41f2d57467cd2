"""Kill campaign: SIGKILL every medvae command at random moments, audit the store, re-run, repeat.

For each of ``ingest``, ``train`` and ``augment``, ``--trials`` runs are started as subprocesses and
killed (whole process group, SIGKILL) at a seeded random delay between the start and the command's
measured uninterrupted time. After each kill every store version is read back and checked (row counts
against add actions and lineage, unique ids, pixel sizes), the command is re-run (``train`` with
``--resume``) and its end state is compared with the uninterrupted run's.

Usage::

    uv run python benchmarks/kill_campaign.py --trials 10 --seed 0

Prints one line per command (trials, kills that landed mid-run, corrupted versions, failed re-runs, the
most epochs lost on resume) and a final ``kill trials: N, corrupted versions: K`` line; exits 1 if K > 0
(or a re-run failed).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the helpers live in tests/crashkit.py

from tests.crashkit import COMMANDS, Campaign, Trial, run_trials


def summarise(command: str, trials: list[Trial]) -> str:
    """One line of the campaign's per-command table."""
    lost = [t.epochs_lost for t in trials if t.epochs_lost is not None]
    return (
        f"{command:8s} trials: {len(trials):3d}  mid-run kills: {sum(t.mid_run for t in trials):3d}  "
        f"corrupted versions: {sum(len(t.corrupted) for t in trials)}  "
        f"failed reruns: {sum(t.rerun_error is not None for t in trials)}  "
        f"max epochs lost: {max(lost) if lost else '-'}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the campaign; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10, help="kill trials per command (default 10)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--epochs", type=int, default=30, help="training epochs of every train run")
    ap.add_argument("--images", type=int, default=40, help="generated PNGs to ingest")
    ap.add_argument(
        "--commands",
        default=",".join(COMMANDS),
        help="commands to kill, comma-separated: ingest,train,augment (default), run (the Prefect pipeline)",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="print every trial")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medvae-kill-") as tmp:
        root = Path(tmp)
        commands = args.commands.split(",")
        campaign = Campaign(root / "campaign", epochs=args.epochs).prepare(n_images=args.images)
        if "run" in commands:
            campaign.prepare_run()
        bounds = ", ".join(f"{k} {v:.1f}s" for k, v in campaign.bounds.items())
        first = campaign.first_checkpoint
        print(f"uninterrupted runs: {bounds}; first checkpoint at {first or float('nan'):.1f}s", flush=True)
        total = corrupted = failed = 0
        for command in commands:
            trials = run_trials(campaign, command, args.trials, args.seed, root / "trials")
            print(summarise(command, trials), flush=True)
            for t in trials:
                if args.verbose:
                    print(f"  kill at {t.delay:.2f}s, mid-run {t.mid_run}: {t.note}", flush=True)
                for problem in t.corrupted:
                    print(f"  CORRUPTED {command} (kill at {t.delay:.2f}s): {problem}", flush=True)
                if t.rerun_error:
                    print(f"  RERUN FAILED {command} (kill at {t.delay:.2f}s): {t.rerun_error}", flush=True)
            total += len(trials)
            corrupted += sum(len(t.corrupted) for t in trials)
            failed += sum(t.rerun_error is not None for t in trials)
    print(f"({time.perf_counter() - t0:.0f} s)")
    print(f"kill trials: {total}, corrupted versions: {corrupted}")
    return 1 if corrupted or failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
