"""Validated, frozen configuration for every pipeline stage, loaded from YAML and overridable from the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Intensity = Literal["none", "clahe", "equalize"]

# Default patient keys from file names, for files that carry no PatientID: Kermany's ``personN`` and
# ``IM-0115``/``NORMAL2-IM-1427`` stems, and ChestX-ray14's ``00000005_000`` naming. Only a keyed hash of
# the match is stored.
DEFAULT_PATIENT_REGEX = r"(person\d+)|^((?:NORMAL2-)?IM-\d+)-\d+|^(\d{8})_\d{3}\."


class _Frozen(BaseModel):
    # Frozen and strict about unknown keys: a typo in a YAML file must fail loudly, not be ignored.
    model_config = ConfigDict(frozen=True, extra="forbid")


class IngestConfig(_Frozen):
    """How scans are decoded, de-identified, normalised and split on the way into the store."""

    size: int = Field(64, ge=8, le=1024, description="Output side length in pixels.")
    aspect: Literal["pad", "crop"] = Field(
        "pad",
        description="pad: keep the whole field of view, pad the short side with black; crop: centre-crop.",
    )
    multiframe: Literal["middle", "all"] = Field(
        "middle", description="middle: one row per file from its middle frame; all: one row per frame."
    )
    percentile_window: tuple[float, float] = Field(
        (0.5, 99.5), description="Robust window (percentiles) used when a DICOM has no VOI window or LUT."
    )
    intensity: Intensity = Field(
        "clahe",
        description="Per-image intensity standardisation of the stored 64x64 image (CLAHE by default: it "
        "lifted the latent anomaly AUROC on Kermany, see docs/quality.md). One store holds one setting.",
    )
    clahe_clip_limit: float = Field(0.01, gt=0, le=1, description="CLAHE clip limit.")
    max_pixels: int = Field(
        64_000_000, ge=1, description="Refuse to decode any image with more pixels than this (memory bound)."
    )
    max_file_bytes: int = Field(2_000_000_000, ge=1, description="Refuse files larger than this.")
    reject_burned_in: bool = Field(
        True, description="Reject DICOMs marked BurnedInAnnotation YES: their pixels may carry PHI."
    )
    burned_in_unless_declared: tuple[str, ...] = Field(
        ("SC", "US", "OT", "XC", "ES"),
        description="DICOMs of these kinds are rejected unless BurnedInAnnotation is explicitly NO, because "
        "they often carry burned-in patient text: Modality codes (ultrasound, other, camera, endoscopy), "
        "and SC for every Secondary Capture SOP class (screen captures, scanned documents). () turns it off.",
    )
    burned_in_text: Literal["reject", "ingest", "off"] = Field(
        "reject",
        description="Screen the top and bottom bands of every image for lines of text-like marks: reject "
        "the file ('burned-in text suspected'), ingest it anyway (noted in the report), or off.",
    )
    burned_in_min_text_px: float = Field(
        3.0,
        gt=0,
        description="Smallest character height the text screen looks for, in pixels of the stored image: "
        "text smaller than this is illegible at the stored size.",
    )
    burned_in_ocr: bool = Field(
        False,
        description="Also run tesseract OCR (when installed) on the border bands of images the text screen "
        "passed; skipped silently when tesseract is absent.",
    )
    labels: Literal["folder", "none"] = Field(
        "folder", description="folder: the parent folder name is the label (ImageFolder); none: no label."
    )
    dicom_folder_labels: bool = Field(
        False,
        description="Take folder labels from DICOM files too. Off by default: a PACS export is "
        "PATIENT/STUDY/SERIES/IMG.dcm, whose folders name patients and series, not classes; PNG/JPEG "
        "ImageFolder trees keep their folder labels.",
    )
    vet_labels: bool = Field(
        True,
        description="Withhold (store no label for) a label that matches the file's PatientName, PatientID, "
        "AccessionNumber or a date in it, or that looks like a UID or an ID.",
    )
    follow_external_symlinks: bool = Field(
        False,
        description="Follow file symlinks whose target lies outside the source folder; by default they are "
        "rejected, so that a link cannot pull an unrelated file (a key, /etc/passwd) into an ingest.",
    )
    labels_csv: Path | None = Field(None, description="CSV with columns path,label; overrides folder labels.")
    patient_regex: str | None = Field(
        DEFAULT_PATIENT_REGEX,
        description="Regex on the file name whose first non-empty group identifies the patient when the file "
        "has no PatientID (defaults cover Kermany's personN/IM-NNNN and ChestX-ray14's NNNNNNNN_NNN). "
        "Only its keyed hash is stored.",
    )
    split_fractions: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train/val/test shares, assigned by a keyed hash of the patient."
    )
    workers: int = Field(0, ge=0, description="Decoder processes; 0 means one per core.")

    @field_validator("burned_in_text", mode="before")
    @classmethod
    def _off_word(cls, v: Any) -> Any:
        # YAML reads a bare off as False: `--set burned_in_text=off` must still mean "off".
        return "off" if v is False else v

    @field_validator("split_fractions")
    @classmethod
    def _fractions_sum_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f < 0 for f in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must be non-negative and sum to 1, got {v}")
        return v

    @field_validator("percentile_window")
    @classmethod
    def _window_ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= v[0] < v[1] <= 100.0:
            raise ValueError(f"percentile_window must satisfy 0 <= low < high <= 100, got {v}")
        return v


class ModelConfig(_Frozen):
    """Architecture of the convolutional BatchNorm VAE."""

    image_size: int = Field(64, ge=16)
    channels: tuple[int, ...] = Field((32, 64, 128, 256), min_length=1)
    latent_dim: int = Field(
        128,
        ge=1,
        description="Latent size. 128, not the tutorial's 32: the latent anomaly score separates far better "
        "with it (docs/quality.md).",
    )
    conditional: bool = False
    num_classes: int = Field(0, ge=0, description="Number of labels for a conditional VAE (set from data).")
    conditioning: Literal["cbn", "concat"] = Field(
        "cbn",
        description="How a conditional VAE's decoder sees the label. cbn: a per-class BatchNorm scale and "
        "shift in every decoder block (and the one-hot appended to z); concat: the one-hot appended to z "
        "only, which the decoder learned to ignore (label fidelity AUROC 0.72 vs 0.97, docs/quality.md).",
    )
    encoder_label_planes: bool = Field(
        True, description="A conditional VAE's encoder also sees the label as one constant plane per class."
    )

    @model_validator(mode="after")
    def _size_divides(self) -> ModelConfig:
        if self.image_size % (2 ** len(self.channels)) != 0:
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2**depth = {2 ** len(self.channels)}"
            )
        return self


class LossConfig(_Frozen):
    """The negative ELBO: reconstruction likelihood, β weight and KL warm-up."""

    reconstruction: Literal["bce", "mse"] = "bce"
    beta: float = Field(1.0, ge=0.0)
    kl_warmup_epochs: int = Field(5, ge=0, description="Linear ramp of the KL weight from 0 to beta.")
    ssim_weight: float | None = Field(
        None,
        ge=0.0,
        description="Weight of a structural term added to the reconstruction loss: (1 - SSIM) of each "
        "reconstruction (the SSIM of MONAI's SSIMMetric), times its pixel count so that it is on the "
        "scale of the per-image likelihood. None: GENERATOR_SSIM_WEIGHT for a conditional VAE (the "
        "generator, whose samples it makes more like the data; docs/quality.md), 0 (the plain negative "
        "ELBO) for the anomaly VAE, whose recipe was measured without it.",
    )


# About the steps of a 20-epoch generator on all of Kermany's training images (57 batches an epoch):
# at 10 % of the labels an epoch-defined budget gave 66 steps and grey images (docs/quality.md).
GENERATOR_MIN_STEPS = 1000
# The generator's structural-loss weight (LossConfig.ssim_weight), measured at 10 % of Kermany's labels.
GENERATOR_SSIM_WEIGHT = 0.1


class TrainConfig(_Frozen):
    """Optimisation, validation and device settings for training."""

    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    val_fraction: float = Field(
        0.1, gt=0, lt=1, description="Held-out share when the store has no val split."
    )
    patience: int = Field(8, ge=1, description="Early stopping: epochs without validation improvement.")
    min_steps: int | None = Field(
        None,
        ge=0,
        description="Fewest optimiser steps: the epoch budget grows to reach them and early stopping waits "
        "for them, because a small dataset's epochs are short (10 % of Kermany is 6 steps an epoch). "
        f"None: {GENERATOR_MIN_STEPS} for a conditional VAE (a generator, whose samples need the steps; "
        "docs/quality.md), 0 for the anomaly VAE, whose recipe is measured in epochs.",
    )
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = Field(False, description="torch.compile the model (measured; optional).")
    augment: bool = Field(
        False, description="Shift each training image by up to 4 px and scale its contrast by up to 10%."
    )
    false_positive_rate: float = Field(0.05, gt=0, lt=1, description="Anomaly threshold calibration FPR.")
    sync_batchnorm: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Multi-process (torchrun/DDP) training only: BatchNorm statistics over the global "
        "batch. auto: on for CUDA, off on the CPU (measured, docs/distributed_training.md).",
    )

    @property
    def step_floor(self) -> int:
        """:attr:`min_steps` with None resolved by the kind of model (see its description)."""
        if self.min_steps is not None:
            return self.min_steps
        return GENERATOR_MIN_STEPS if self.model.conditional else 0

    @property
    def resolved_loss(self) -> LossConfig:
        """:attr:`loss` with a None ``ssim_weight`` resolved by the kind of model (see its description)."""
        if self.loss.ssim_weight is not None:
            return self.loss
        weight = GENERATOR_SSIM_WEIGHT if self.model.conditional else 0.0
        return self.loss.model_copy(update={"ssim_weight": weight})

    @field_validator("sync_batchnorm", mode="before")
    @classmethod
    def _sync_bn_words(cls, v: Any) -> Any:
        # YAML reads a bare on/off as a boolean: `--set sync_batchnorm=on` must still mean "on".
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class AugmentConfig(_Frozen):
    """Synthetic image generation and its privacy filter."""

    count: int = Field(64, ge=0)
    label: str | None = None
    seed: int = 0
    privacy_quantile: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Reject samples closer to a training image than this quantile of train-to-train "
        "nearest-neighbour distances.",
    )
    write_dicom: Path | None = Field(
        None, description="Also write Secondary Capture DICOMs into this folder."
    )
    sampler: Literal["gmm", "prior"] = Field(
        "gmm",
        description="Where latent codes come from. gmm: the per-label Gaussian mixture fitted on the "
        "training posterior means (saved with the model); prior: N(0, I), whose samples are the grey mush "
        "between real images (docs/quality.md).",
    )
    temperature: float = Field(
        1.0, gt=0, le=4, description="Scale of the mixture components' covariances (gmm sampler only)."
    )
    restore_detail: bool = Field(
        True,
        description="Apply the model's fitted unsharp mask to decoded samples, so that their fine structure "
        "matches the training images' (medvae.synth.detail; docs/quality.md). Off: the decoder's blurry "
        "mean.",
    )
    max_draws: float = Field(
        8.0,
        ge=1,
        description="Sample in rounds until `count` images passed the privacy filter, from at most this "
        "many times `count` samples; a shortfall is reported. Blurry ones often fail (docs/quality.md).",
    )


class ScreenConfig(_Frozen):
    """Anomaly scoring of new scans."""

    score: Literal["lowpass_error", "mahalanobis", "recon", "kl", "elbo"] | None = Field(
        None,
        description="The score that flags; None: the one the model was calibrated for (lowpass_error for "
        "models trained since it shipped; older model directories keep mahalanobis).",
    )
    unlike_factor: float = Field(
        1.5,
        ge=0,
        description="Also flag scans whose latent Mahalanobis distance exceeds this multiple of the largest "
        "held-out normal's (blank frames, noise, other body parts the low-pass error can miss); 0: off.",
    )


class RunnerConfig(_Frozen):
    """Where the ingest and screen flows decode files: embedded, or file batches on a Prefect task runner.

    ``local`` is the single-machine default: one task that decodes on every core with medvae's own
    process pool (the fastest on one machine). The other kinds split the files into batches of
    ``batch_files``, run one task per batch on the named Prefect task runner, and commit once at the end.
    """

    kind: Literal["local", "thread", "process", "dask"] = Field(
        "local",
        description="local: embedded process pool; thread | process: Prefect's pools; dask: "
        "prefect_dask.DaskTaskRunner (an existing cluster at `address`, or a temporary local one).",
    )
    address: str | None = Field(
        None, description="Dask scheduler address, e.g. tcp://10.0.0.5:8786; None starts a local cluster."
    )
    workers: int = Field(0, ge=0, description="Pool or local-cluster size; 0 means one per core.")
    batch_files: int = Field(256, ge=1, description="Files per batch task.")

    @model_validator(mode="after")
    def _address_needs_dask(self) -> RunnerConfig:
        if self.address and self.kind != "dask":
            raise ValueError(f"runner.address is only used with kind=dask, not kind={self.kind}")
        return self


class PipelineConfig(_Frozen):
    """The scheduled ingest → train → augment → screen pipeline."""

    sources: list[Path] = Field(default_factory=lambda: [Path("data/sample")])
    store: str = "runs/store"
    model_dir: Path = Path("runs/model")
    train_where: dict[str, str | list[str]] = Field(
        default_factory=dict, description="Row filter, e.g. {label: normal}; a list allows several values."
    )
    schedule: str = Field("0 2 * * *", description="Cron schedule for `medvae serve`.")
    ingest: IngestConfig = IngestConfig()
    train: TrainConfig = TrainConfig()
    augment: AugmentConfig = AugmentConfig()
    screen: ScreenConfig = ScreenConfig()
    runner: RunnerConfig = RunnerConfig()


class Target(_Frozen):
    """A pass/fail criterion on one figure of ``metrics.json``, checked and reported by ``medvae evaluate``.

    ``metric`` is a dotted path into ``metrics.json``. Two placeholders name run-dependent keys:
    ``{primary_score}`` (the calibrated score) and ``{min_fraction}`` (the smallest label fraction); a ``*``
    segment expands to every key at that level (one check per key, e.g. per label fraction). The check is
    ``observed <op> value`` or, with ``relative_to`` (a path expanded the same way), ``observed <op> value *
    reference``. A target whose study did not run is left out; one whose figure is missing is "n/a".
    """

    metric: str = Field(description="Dotted path into metrics.json, anomaly.summary.scores.kl.auroc.mean")
    op: Literal[">=", ">", "<=", "<", "=="] = Field(">=", description="The comparison.")
    value: float = Field(description="The threshold (a factor of `relative_to` when that is given).")
    relative_to: str | None = Field(None, description="Optional path of a reference figure.")
    name: str | None = Field(
        None,
        description="A readable name; {primary_score}, {key} (the key a * matched) and {fraction} (that key "
        "as a percentage) are filled in.",
    )

    @field_validator("name")
    @classmethod
    def _known_placeholders(cls, v: str | None) -> str | None:
        import string

        fields = {f for _, f, _, _ in string.Formatter().parse(v or "") if f is not None}
        unknown = fields - {"primary_score", "key", "fraction"}
        if unknown:
            raise ValueError(f"target name {v!r}: unknown placeholder(s) {sorted(unknown)}")
        return v


_DEFAULT_TARGETS = (
    Target(
        name="primary score AUROC >= 0.85 ({primary_score})",
        metric="anomaly.summary.scores.{primary_score}.auroc.mean",
        value=0.85,
    ),
    Target(
        name="shift-aware split: {primary_score} AUROC >= 0.85",
        metric="shift.summary.scores.{primary_score}.auroc.mean",
        value=0.85,
    ),
    Target(
        # Within 2 points of a 5 % target: a factor, so that another configured FPR scales with it.
        name="stored threshold on the new cohort's normals: FPR <= 1.4 x target",
        metric="shift.cohort.new_cohort_fpr.mean",
        op="<=",
        value=1.4,
        relative_to="shift.summary.target_fpr",
    ),
    Target(
        name="threshold recalibrated on the new cohort's normals: FPR <= 1.4 x target",
        metric="shift.cohort.recalibrated_fpr.mean",
        op="<=",
        value=1.4,
        relative_to="shift.summary.target_fpr",
    ),
    Target(
        name="real+synthetic >= real + 0.01 at {fraction} labels (paired over seeds)",
        metric="utility.summary.{min_fraction}.real_synthetic_minus_real.mean",
        value=0.01,
    ),
    # The control a reader needs beside the last one: the same number of steps on repeated real images.
    Target(
        name="real+synthetic >= real repeated to the same size at {fraction} labels (paired)",
        metric="utility.summary.{min_fraction}.real_synthetic_minus_real_repeated.mean",
        value=0.0,
    ),
    Target(
        name="TSTR (synthetic only, headline share) >= 0.95 x real at {fraction} labels",
        metric="utility.summary.*.synthetic.mean",
        value=0.95,
        relative_to="utility.summary.*.real.mean",
    ),
    Target(
        name="label fidelity AUROC of the synthetic images >= 0.95 at {fraction} labels",
        metric="utility.summary.*.generation.drawn.label_fidelity.mean",
        value=0.95,
    ),
    Target(
        name="no kept synthetic image nearer than the test 1st percentile at {fraction} labels",
        metric="privacy.summary.*.near_copy_share_after.max",
        op="<=",
        value=0.0,
    ),
)


# Kermany names its second, separately exported batch of normals ``NORMAL2-IM-...``; the numbers in
# ``IM-0115``, ``person17_`` and ChestX-ray14's ``00000005_000`` were handed out in acquisition order.
DEFAULT_BATCH_REGEX = r"^(?P<batch>[^-_]+)-IM-"
DEFAULT_ORDER_REGEX = r"(?:(?:^|-)(?:IM-|person)|^)(?P<order>\d+)(?=[-_])"


class ShiftSplitConfig(_Frozen):
    """The shift-aware split ``medvae evaluate`` reports beside the patient split.

    A random patient split tests on the training cohort. This one tests on what a deployment meets: whole
    acquisition batches the model never saw, plus the earliest acquisitions of every other batch (as
    Kermany's official test split is an earlier block of patients). Batches and acquisition order come
    from the file names of an ImageFolder source, with the two regexes below; a store keeps no file
    names, so there the split is reported as unavailable.
    """

    enabled: bool = Field(True, description="Evaluate the anomaly study on the shift-aware split as well.")
    batch_regex: str | None = Field(
        DEFAULT_BATCH_REGEX,
        description="Searched in each file name; its `batch` group names the acquisition batch. Files "
        "without a match form the default batch. None: no batches.",
    )
    order_regex: str | None = Field(
        DEFAULT_ORDER_REGEX,
        description="Searched in each file name; its `order` group (digits) is the acquisition order, e.g. "
        "a patient number given out in time. None, or no match: order unknown (placed by hash).",
    )
    hold_out: tuple[str, ...] | None = Field(
        None, description="Batches that go wholly to test; None: every batch the batch regex names."
    )
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="Earliest share of every other batch's images that is test."
    )
    val_fraction: float = Field(
        0.1, gt=0, lt=1, description="Hashed share of every other batch's images that is val."
    )
    local_normals: int = Field(
        300,
        ge=0,
        description="Held-out-batch normals the evaluation recalibrates the threshold on, as a site would "
        "with `medvae recalibrate`; the rest of that batch's normals measure the recalibrated threshold.",
    )
    recalibration_draws: int = Field(
        20,
        ge=1,
        description="Patient-grouped draws of those local normals per seed: a site's FPR after "
        "recalibrating depends on which normals it happened to have, so the rate is averaged over draws.",
    )

    @field_validator("batch_regex", "order_regex")
    @classmethod
    def _one_named_group(cls, v: str | None, info: Any) -> str | None:
        import re

        if v is None:
            return v
        group = "batch" if info.field_name == "batch_regex" else "order"
        try:
            compiled = re.compile(v)
        except re.error as exc:
            raise ValueError(f"{info.field_name} is not a regular expression: {exc}") from exc
        if group not in compiled.groupindex:
            raise ValueError(f"{info.field_name} needs a named group (?P<{group}>...), got {v!r}")
        return v

    @model_validator(mode="after")
    def _fractions(self) -> ShiftSplitConfig:
        if self.test_fraction + self.val_fraction >= 1:
            raise ValueError("shift test_fraction + val_fraction must be below 1")
        return self


class EvaluateConfig(_Frozen):
    """Everything ``medvae evaluate`` does, fixed up front so that a run is reproducible from its config.

    The same patient-grouped split (``split_seed``) is used for every model seed in ``seeds``; only the
    model, generator and classifier seeds vary between repetitions.
    """

    seeds: tuple[int, ...] = Field((0, 1, 2), min_length=1, description="Model seeds; figures are mean ± sd.")
    split_seed: int = Field(0, description="Seed of the patient-grouped train/val/test split (fixed).")
    split_fractions: tuple[float, float, float] = Field(
        (0.7, 0.1, 0.2), description="train/val/test shares of the images, assigned per patient."
    )
    ingest: IngestConfig = Field(
        IngestConfig(),
        description="Decoding of ImageFolder sources (window, aspect, size). Its intensity is not used: "
        "`intensity` below decides, so that an ablation changes one knob.",
    )
    # The ingest defaults, read from IngestConfig so that they are written down once.
    intensity: Intensity = Field(
        IngestConfig.model_fields["intensity"].default,
        description="Per-image intensity standardisation of every loaded image (the ingest default). A store "
        "whose images were standardised at ingest is never standardised twice.",
    )
    clahe_clip_limit: float = Field(
        IngestConfig.model_fields["clahe_clip_limit"].default, gt=0, le=1, description="CLAHE clip limit."
    )
    anomaly: TrainConfig = Field(
        default_factory=TrainConfig, description="The anomaly VAE, trained on normals only (shipped default)."
    )
    generator: TrainConfig = Field(
        default_factory=lambda: TrainConfig(
            model=ModelConfig(conditional=True, num_classes=2), epochs=20, patience=6
        ),
        # Fewer epochs than the anomaly model: it sees every labelled image, ~4x more per epoch.
        description="The conditional VAE that makes synthetic labelled training data.",
    )
    primary_score: str = Field(
        "lowpass_error", description="The score whose calibrated threshold is reported (medvae train's own)."
    )
    false_positive_rate: float = Field(0.05, gt=0, lt=1, description="Calibration FPR on val normals.")
    label_fractions: tuple[float, ...] = Field(
        (1.0, 0.1), min_length=1, description="Shares of the labelled training images for the utility study."
    )
    synthetic_ratio: float = Field(
        2.0,
        gt=0,
        description="Synthetic images per real training image in the headline real + synthetic and "
        "synthetic-only sets: 2, the best share measured at 10 % of Kermany's labels (docs/quality.md).",
    )
    share_sweep: tuple[float, ...] = Field(
        (0.5, 1.0),
        description="Other synthetic shares tried at label fractions up to share_sweep_max_fraction: more "
        "synthetic data is not always better.",
    )
    share_sweep_max_fraction: float = Field(
        0.1, ge=0, le=1, description="The sweep runs only where labels are this scarce (CPU time at 100 %)."
    )
    synthetic_max_draws: float = Field(
        AugmentConfig.model_fields["max_draws"].default,
        ge=1,
        description="Draw in rounds until the privacy filter kept the synthetic images asked for, but at "
        "most this many times as many (the shortfall is reported; docs/quality.md).",
    )
    synthetic_sampler: Literal["gmm", "prior"] = Field(
        AugmentConfig.model_fields["sampler"].default,
        description="Where the synthetic images' latent codes come from, as `augment`'s sampler (fitted on "
        "the fraction's real training images).",
    )
    synthetic_restore_detail: bool = Field(
        AugmentConfig.model_fields["restore_detail"].default,
        description="Restore the synthetic images' detail as `augment` does (medvae.synth.detail).",
    )
    classifier_epochs: int = Field(12, ge=1, description="Fixed epochs of the small CNN (see classifier.py).")
    privacy_quantile: float = Field(0.01, ge=0, le=1, description="Near-copy quantile for the filter.")
    utility: bool = Field(True, description="Run the synthetic-data utility and privacy study.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Overrides the training configs' device."
    )
    workers: int = Field(0, ge=0, description="Decoder processes for an ImageFolder; 0: one per core.")
    pictures: int = Field(16, ge=2, description="Images per picture grid.")
    gallery: int = Field(
        8, ge=1, description="Tiles per report gallery (worst false positives, lowest-scoring abnormals)."
    )
    bootstrap: int = Field(
        1000, ge=0, description="Stratified bootstrap resamples for the 95% AUROC intervals; 0: none."
    )
    targets: tuple[Target, ...] = Field(
        _DEFAULT_TARGETS, description="Pass/fail criteria reported in metrics.json, the report and the CLI."
    )
    shift: ShiftSplitConfig = Field(
        default_factory=ShiftSplitConfig,
        description="The shift-aware split reported beside the patient split (the harder, honest figure).",
    )
    localisation_images: int = Field(
        32,
        ge=0,
        description="Abnormal and normal test images (each) whose heat maps are checked against "
        "a lung mask from the mean training normal; 0: no check.",
    )

    @field_validator("split_fractions")
    @classmethod
    def _fractions(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f <= 0 for f in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must be positive and sum to 1, got {v}")
        return v

    @field_validator("primary_score")
    @classmethod
    def _known_score(cls, v: str) -> str:
        from medvae.anomaly.stats import SCORES  # torch-free import of config itself

        if v not in SCORES:
            raise ValueError(f"primary_score must be one of {SCORES} (a calibrated score), got {v!r}")
        return v

    @field_validator("share_sweep")
    @classmethod
    def _shares(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(r <= 0 for r in v):
            raise ValueError(f"share_sweep must hold positive shares, got {v}")
        return v

    @field_validator("label_fractions")
    @classmethod
    def _label_fractions(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < f <= 1 for f in v):
            raise ValueError(f"label_fractions must lie in (0, 1], got {v}")
        return v


C = TypeVar("C", bound=BaseModel)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """Turn CLI overrides like ``train.epochs=3`` into a nested dict.

    Values are parsed as YAML scalars, so ``3`` is an int, ``true`` a bool and ``[1,2]`` a list; a value
    that is not YAML (``schedule=* * * * *``) is taken as the string it is.

    Args:
        pairs: strings of the form ``dotted.key=value``.

    Returns:
        A nested dict that can be merged over a loaded config.

    Raises:
        ValueError: when a pair has no ``=``.
    """
    tree: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"override {pair!r} must look like key=value (e.g. train.epochs=3)")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            # Not YAML (a cron "* * * * *", a regex with brackets): the text itself is the value, as a
            # shell user means it; validation then says, with the key, if a string does not fit.
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A one-line description of a YAML syntax error, with its line and column when known."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(
    cls: type[C],
    path: Path | str | None = None,
    overrides: list[str] | None = None,
    options: dict[str, Any] | None = None,
) -> C:
    """Load and validate a stage config: the model's defaults, then YAML, then ``--set``, then options.

    Args:
        cls: the config class, e.g. :class:`IngestConfig`.
        path: a YAML file, or None for the defaults.
        overrides: CLI overrides such as ``["epochs=3", "loss.beta=0.5"]``.
        options: values of dedicated CLI options as a nested dict of typed values (``{"epochs": 0}``);
            a None value means the option was not given. They win over ``--set``.

    Returns:
        The validated, frozen config.
    """
    data: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            # The bare errno text would not say that it is the config file that is missing.
            raise FileNotFoundError(
                f"config file {path} not found; pass an existing YAML file (see configs/)"
            )
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:  # one line for the operator, not a parser traceback
            raise ValueError(f"{path} is not valid YAML: {_yaml_problem(exc)}; fix the file") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
        data = loaded or {}
    data = _deep_merge(data, parse_overrides(overrides))
    data = _deep_merge(data, _given(options or {}))
    return cls.model_validate(data)


def _given(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` without the entries (at any depth) that are None: options the user did not give."""
    out: dict[str, Any] = {}
    for k, v in options.items():
        if isinstance(v, dict):
            v = _given(v)
            if not v:
                continue
        if v is not None:
            out[k] = v
    return out


def to_jsonable(cfg: BaseModel) -> dict[str, Any]:
    """The resolved config as plain JSON types, for lineage and model directories."""
    return cfg.model_dump(mode="json")
