"""Typed results of the stage jobs: what the CLI prints and the flows pass on (paths, versions, hashes).

They are plain frozen dataclasses of JSON types, so a Prefect task can return them, a flow can read
them by attribute, and mypy catches a renamed field before a run does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Result:
    """Base of every stage result: a JSON view for artifacts, lineage and ``--json`` output."""

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON types."""
        return asdict(self)


@dataclass(frozen=True)
class IngestSummary(Result):
    """The counts of one ingest (the per-file account is the operator's ``--report``).

    Attributes:
        version: the store version committed, or None when nothing new was written.
        rows_added: rows this call committed.
        seen: input files found.
        ingested: files whose rows this call committed.
        rejected: files that could not or must not be ingested.
        skipped: files whose content the store already held.
    """

    version: int | None
    rows_added: int
    seen: int
    ingested: int
    rejected: int
    skipped: int

    @classmethod
    def of(cls, report: Any) -> IngestSummary:
        """The summary of a :class:`medvae.data.ingest.IngestReport`."""
        c = report.counts
        return cls(report.version, report.rows_added, c["seen"], c["ingested"], c["rejected"], c["skipped"])

    def line(self) -> str:
        """``ingested N, rejected M, skipped K``."""
        return f"ingested {self.ingested}, rejected {self.rejected}, skipped {self.skipped}"


@dataclass(frozen=True)
class TrainedModel(Result):
    """A trained and calibrated model directory.

    Attributes:
        model_dir: where it was written.
        model_hash: its content hash (``hash.txt``).
        dataset_version: the store version it was trained on.
        best_epoch: the selected epoch (0-based).
        val_loss: the validation loss of that epoch.
        threshold: the calibrated anomaly threshold.
        device: what it trained on (``cpu`` or ``cuda``).
        n_val_normals: how many held-out normals calibrated the threshold.
        warnings: what the operator should know (e.g. a threshold calibrated on few normals).
    """

    model_dir: str
    model_hash: str
    dataset_version: int
    best_epoch: int
    val_loss: float | None
    threshold: float
    device: str
    n_val_normals: int
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class AugmentResult(Result):
    """Synthetic images sampled, privacy-filtered and (for ``augment``) committed.

    Attributes:
        requested: images asked for.
        kept: images that passed the privacy filter (up to ``requested``).
        rejected: samples the filter dropped (near copies of training images).
        drawn: samples drawn to find them (the filter is applied in rounds until ``requested`` passed, or
            ``AugmentConfig.max_draws`` times as many were drawn).
        privacy_threshold: the distance below which samples were rejected.
        model_hash: the generating model.
        per_label: kept images per label (``""`` for unlabelled rows).
        version: the store version committed, or None when nothing new was written.
        rows_added: rows this call added to the store.
        already_present: kept rows whose ids were already in the store (an identical earlier augment).
        rows_path: the staged Parquet file of the rows (pipeline runs), else None.
        dicom_dir: the folder holding this call's synthetic DICOM set, if written.
        dicom_files: how many DICOM files it holds.
    """

    requested: int
    kept: int
    rejected: int
    drawn: int
    privacy_threshold: float
    model_hash: str
    per_label: dict[str, int] = field(default_factory=dict)
    version: int | None = None
    rows_added: int = 0
    already_present: int = 0
    rows_path: str | None = None
    dicom_dir: str | None = None
    dicom_files: int = 0

    @property
    def rejection_rate(self) -> float:
        """The share of the samples drawn that the privacy filter rejected."""
        return self.rejected / self.drawn if self.drawn else 0.0


@dataclass(frozen=True)
class ScreenRecord(Result):
    """One screened input file.

    Attributes:
        file: the input path as given (the operator's own; it may name a patient).
        status: ``scored`` or ``rejected``.
        reason: why it was rejected (empty when scored).
        name: the row name of its heat map and CSV row (``scan_<digest>``; never the file name).
        scores: every anomaly score, plus ``score``, ``percentile``, ``unlike`` and ``flag`` (1 or 0).
    """

    file: str
    status: str
    reason: str = ""
    name: str = ""
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def flagged(self) -> bool:
        """Whether the scan scored above the calibrated threshold, or lies far outside the normals."""
        return bool(self.scores.get("flag"))


@dataclass(frozen=True)
class ScreenResult(Result):
    """A screening run over input files.

    Attributes:
        records: one per input file, scored ones first, in input order.
        csv: the CSV written, if any.
        heatmaps: the heat-map folder written, if any.
        warnings: what the operator should know (e.g. no image found).
    """

    records: tuple[ScreenRecord, ...]
    csv: str | None = None
    heatmaps: str | None = None
    warnings: tuple[str, ...] = ()

    @property
    def scored(self) -> int:
        """Files scored."""
        return sum(r.status == "scored" for r in self.records)

    @property
    def rejected(self) -> int:
        """Files that could not be scored."""
        return len(self.records) - self.scored

    @property
    def flagged(self) -> int:
        """Scored files above the threshold, or unlike the training images."""
        return sum(r.flagged for r in self.records)

    @property
    def unlike(self) -> int:
        """Of the flagged files, those far outside the training normals (see ``unlike_training``)."""
        return sum(bool(r.scores.get("unlike")) for r in self.records)

    def counts(self) -> dict[str, int]:
        """``{"scored", "rejected", "flagged", "unlike"}`` for artifacts and summaries."""
        return {
            "scored": self.scored,
            "rejected": self.rejected,
            "flagged": self.flagged,
            "unlike": self.unlike,
        }


@dataclass(frozen=True)
class RecalibrationResult(Result):
    """A model's thresholds set on a site's own normal scans.

    Attributes:
        records: one per input file (the scored ones calibrated the thresholds).
        threshold_before: the primary score's threshold before.
        threshold: after.
        fpr: the target false-positive rate.
        fpr_interval: the 95 % Clopper-Pearson interval of the rate such a threshold can promise.
        model_hash: the model directory's new hash (its calibration changed).
        flagged_before: the share of the local normals a screen flagged before (the replaced threshold
            or the latent guard): how far this site is from the training cohort, as the old
            calibration saw it.
        warnings: e.g. too few normals.
    """

    records: tuple[ScreenRecord, ...]
    threshold_before: float
    threshold: float
    fpr: float
    fpr_interval: tuple[float, float]
    model_hash: str
    flagged_before: float = 0.0
    warnings: tuple[str, ...] = ()

    @property
    def used(self) -> int:
        """Normal scans the thresholds were set on."""
        return sum(r.status == "scored" for r in self.records)


@dataclass(frozen=True)
class ScoredRows(Result):
    """Real rows of a store version with their scores, staged for the pipeline's one commit.

    Attributes:
        path: the staged Parquet file.
        scored: rows scored.
        flagged: rows above the threshold.
    """

    path: str
    scored: int
    flagged: int


@dataclass(frozen=True)
class PipelineResult(Result):
    """One pipeline run: ingest, train, augment and screen, written back as one version.

    Attributes:
        version: the store version the run wrote.
        model_hash: the model it trained.
        ingested: files ingested in this run.
        rejected: files rejected in this run.
        synthetic_rows: synthetic rows kept and committed.
        privacy_rejection_rate: the share of samples the privacy filter dropped.
        scored: real rows scored.
        flagged: real rows flagged.
        val_loss: the model's validation loss.
        threshold: its calibrated threshold.
        pictures: the synthetic sample grids written.
    """

    version: int
    model_hash: str
    ingested: int
    rejected: int
    synthetic_rows: int
    privacy_rejection_rate: float
    scored: int
    flagged: int
    val_loss: float | None
    threshold: float
    pictures: tuple[str, ...] = ()
