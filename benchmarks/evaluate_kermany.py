"""Run medvae.eval.study.evaluate on a labelled folder or store; print the headline figures and wall time."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from medvae.config import EvaluateConfig, load_config
from medvae.eval.study import evaluate, summary_lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("source", help="ImageFolder directory or store URI")
    p.add_argument("out", type=Path, help="output folder (metrics.json, report.html, pictures/)")
    p.add_argument("--normal-label", default="normal")
    p.add_argument("--config", type=Path, default=Path("configs/evaluate.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], help="key=value override")
    p.add_argument("--quiet", action="store_true", help="no per-stage log lines or progress bars")
    a = p.parse_args()
    cfg = load_config(EvaluateConfig, a.config, a.overrides)
    load = os.getloadavg()
    t0 = time.perf_counter()
    m = evaluate(a.source, a.out, normal_label=a.normal_label, cfg=cfg, progress=not a.quiet)
    wall = time.perf_counter() - t0
    print(f"\n== {a.source}: device {m['device']}, {os.cpu_count()} cores ==")
    print("\n".join(summary_lines(m)))
    print(f"wall time {wall:.0f} s ({wall / 60:.1f} min); load average at start {load[0]:.2f}")


if __name__ == "__main__":
    main()
