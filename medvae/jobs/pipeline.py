"""The pipeline's own steps: score the store's real rows, stage rows, and commit everything as one version.

Each stage of a pipeline run stages its rows in a Parquet file beside the model directory; the flow
passes the paths on, and the last step commits them all as exactly one new store version.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from medvae.config import PipelineConfig, ScreenConfig
from medvae.data.store import SCHEMA, SCORE_COLUMNS, Store, images_from, to_arrow
from medvae.jobs.results import AugmentResult, IngestSummary, PipelineResult, ScoredRows, TrainedModel


def stage(table: pa.Table, path: Path) -> str:
    """Write rows to a staging Parquet file atomically; flows pass its path, never the rows."""
    from medvae._io import atomic_write_bytes

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return str(atomic_write_bytes(path, sink.getvalue().to_pybytes()))


def score_store_rows(
    model_dir: Path, store_uri: str, version: int | None, staging: Path, cfg: ScreenConfig | None = None
) -> ScoredRows:
    """Score every real row of a version and stage the rows with their score columns filled."""
    from medvae.jobs.screen import Screener

    table = Store(store_uri).read(version, where={"origin": "real"})
    screener = Screener.load(model_dir, cfg, key=Store(store_uri).key(create=False))
    res = screener.score(images_from(table))
    cols = table.to_pydict()
    cols["anomaly_score"] = res["score"].tolist()
    cols["anomaly_percentile"] = res["percentile"].tolist()
    cols["anomaly_flag"] = res["flag"].astype(bool).tolist()
    cols["score_recon"] = res["recon"].tolist()
    cols["score_kl"] = res["kl"].tolist()
    cols["score_model_hash"] = [screener.loaded.hash] * table.num_rows
    path = stage(pa.table(cols, schema=SCHEMA), staging / "scores.parquet")
    return ScoredRows(path=path, scored=table.num_rows, flagged=int(res["flag"].sum()))


def commit_pipeline(store_uri: str, parts: Sequence[str], meta: dict[str, Any]) -> int:
    """Commit staged synthetic rows and real-row scores as ONE new version (update scores, insert rows)."""
    tables = [pq.read_table(p).cast(SCHEMA) for p in parts if Path(p).exists()]
    rows = pa.concat_tables(tables) if tables else to_arrow({n: [] for n in SCHEMA.names})
    return Store(store_uri).upsert(rows, meta, SCORE_COLUMNS)


class Steps:
    """The pipeline's stages, each one call into medvae; the default runs them in this process.

    The Prefect flow (``flows/pipeline.py``) subclasses this and runs every stage as a task with retries
    and a timeout, so the order and the wiring of the stages are written once, in :func:`run_pipeline`.
    """

    def ingest(self, cfg: PipelineConfig) -> IngestSummary:
        """Ingest the configured sources into the store."""
        from medvae.data.ingest import ingest

        if cfg.runner.kind != "local":
            raise ValueError(
                f"runner.kind={cfg.runner.kind} runs file batches on a Prefect task runner: use "
                "`medvae serve` or a deployment (prefect.yaml), or runner.kind=local for `medvae run`"
            )
        return IngestSummary.of(ingest(list(cfg.sources), Store(cfg.store), cfg.ingest))

    def train(self, cfg: PipelineConfig) -> TrainedModel:
        """Retrain on the store's latest version."""
        from medvae.jobs.train import train_job

        return train_job(cfg.store, cfg.model_dir, cfg.train, where=cfg.train_where or None, progress=False)

    def synthesise(self, cfg: PipelineConfig, trained: TrainedModel, staging: Path) -> AugmentResult:
        """Sample and privacy-filter synthetic rows into a staging file."""
        from dataclasses import replace

        from medvae.jobs.augment import generate_synthetic

        rows, res = generate_synthetic(Path(trained.model_dir), cfg.store, cfg.augment)
        return replace(res, rows_path=stage(rows, staging / "synthetic.parquet"))

    def score(self, cfg: PipelineConfig, trained: TrainedModel, staging: Path) -> ScoredRows:
        """Score every real row of the trained-on version into a staging file."""
        return score_store_rows(
            Path(trained.model_dir), cfg.store, trained.dataset_version, staging, cfg.screen
        )

    def commit(self, cfg: PipelineConfig, parts: list[str], meta: dict[str, Any]) -> int:
        """Commit the staged rows as exactly one new version."""
        return commit_pipeline(cfg.store, parts, meta)

    def pictures(self, cfg: PipelineConfig, trained: TrainedModel) -> list[str]:
        """Synthetic sample grids of the run's model (never real scans)."""
        from medvae.jobs.augment import sample_pictures

        return sample_pictures(
            Path(trained.model_dir),
            Path(trained.model_dir) / "pictures",
            seed=cfg.augment.seed,
            how=cfg.augment,
        )


def run_pipeline(
    cfg: PipelineConfig, steps: Steps | None = None, echo: Callable[[str], None] = print
) -> PipelineResult:
    """Ingest new scans, retrain, synthesise, screen the store, and write it all back as one version.

    Args:
        cfg: the pipeline configuration.
        steps: how each stage runs (in this process by default; the Prefect flow passes tasks).
        echo: where the one line per stage goes.

    Returns:
        What the run wrote.
    """
    from medvae.config import to_jsonable
    from medvae.data.store import lineage

    steps = steps or Steps()
    ing = steps.ingest(cfg)
    echo(f"ingest: {ing.line()}")
    trained = steps.train(cfg)
    echo(f"train: model {trained.model_hash[:12]} on {trained.device}, best epoch {trained.best_epoch}")
    for warning in trained.warnings:
        echo(f"warning: {warning}")
    staging = cfg.model_dir.parent / "staging" / trained.model_hash[:16]
    syn = steps.synthesise(cfg, trained, staging)
    echo(
        f"augment: kept {syn.kept} of {syn.requested} from {syn.drawn} samples "
        f"(privacy rejection rate {syn.rejection_rate:.1%})"
    )
    scored = steps.score(cfg, trained, staging)
    echo(f"screen: scored {scored.scored} real scans, flagged {scored.flagged}")
    meta = lineage(
        "pipeline",
        to_jsonable(cfg),
        model_hash=trained.model_hash,
        ingest=ing.to_dict(),
        train={k: v for k, v in trained.to_dict().items() if k != "model_dir"},
        privacy={k: v for k, v in syn.to_dict().items() if k != "rows_path"},
        screen={k: v for k, v in scored.to_dict().items() if k != "path"},
    )
    version = steps.commit(cfg, [p for p in (syn.rows_path, scored.path) if p], meta)
    pictures = steps.pictures(cfg, trained)
    echo(f"pipeline: wrote version {version} of {cfg.store}")
    return PipelineResult(
        version,
        trained.model_hash,
        ing.ingested,
        ing.rejected,
        syn.kept,
        syn.rejection_rate,
        scored.scored,
        scored.flagged,
        trained.val_loss,
        trained.threshold,
        tuple(pictures),
    )
