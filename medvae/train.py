"""torchrun entry point: ``torchrun --nproc_per_node N -m medvae.train --store URI --out DIR [...]``.

It takes exactly the options of ``medvae train`` (without ``--nproc``) and runs the same command, so
every rank parses, validates and trains through the same job code as the CLI
(:func:`medvae.jobs.train.train_job`), which joins torchrun's process group. ``--debug`` may appear
anywhere among the options. ``medvae train --nproc N`` launches it as ``-m medvae.train --job FILE``
instead: the launcher resolves the config once and every rank reads the same job file.
See ``docs/distributed_training.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> Any:
    """Run ``medvae train`` with ``argv`` (default: this process's command-line arguments).

    Args:
        argv: the ``medvae train`` options, or ``--job FILE``.

    Returns:
        Whatever the command returns (it exits the process when run from the command line).
    """
    from medvae.cli import app, train_from_job_file

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 2 and args[0] == "--job":
        return train_from_job_file(Path(args[1]))
    # --debug is an option of the `medvae` group, not of `train`: move it in front of the command.
    debug = ["--debug"] if "--debug" in args else []
    args = [a for a in args if a != "--debug"]
    return app(args=[*debug, "train", *args], prog_name="python -m medvae.train")


if __name__ == "__main__":
    main()
