"""Property tests: whatever bytes reach :func:`medvae.data.readers.decode_bytes`, the only outcomes
are decoded images (2-D float in ``[0, 1]``, finite) or :class:`~medvae.data.readers.RejectedInput`.

Cases start from valid DICOM, PNG and JPEG seeds built in ``tests/fuzzgen.py`` and are mutated (bit flips,
truncations, splices, DICOM attributes set to odd values under right or wrong VRs, PNG chunks rewritten
with valid CRCs). The run is bounded and derandomized so CI is fast and reproducible; the long campaign is
``benchmarks/fuzz_readers.py``, which draws from the same generators.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from medvae.config import IngestConfig
from medvae.data.readers import decode_bytes
from tests.fuzzgen import NAMES, Plan, build, check_outcome, mutator_names, seed_indices, seeds

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),  # pydicom and Pillow warn about broken files
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),  # refused all the same
]

# Bounded for the default run (the whole file takes a few seconds), derandomized for reproducible CI, no
# example database written into the checkout.
FUZZ = settings(
    max_examples=800,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _plans(kind: str) -> st.SearchStrategy[Plan]:
    """Plans over the seeds of one kind, with one to three mutations suited to it; shrinks to fewer."""
    mutation = st.tuples(st.sampled_from(mutator_names(kind)), st.integers(0, 2**32 - 1))
    return st.builds(
        Plan,
        seed=st.sampled_from(seed_indices(kind)),
        name=st.sampled_from(NAMES),
        mutations=st.lists(mutation, min_size=1, max_size=3).map(tuple),
    )


def _assert_allowed(plan: Plan) -> None:
    name, data = build(plan)
    problem = check_outcome(data, name)
    assert problem is None, f"{problem}\nreproduce: name, data = tests.fuzzgen.build({plan!r})"


def test_seeds_are_valid_and_decode() -> None:
    # Mutations must start from files the reader accepts, or the fuzzing only ever tests the parsers.
    cfg = IngestConfig()
    for name, data in seeds():
        assert check_outcome(data, name, cfg) is None, name
        assert decode_bytes(data, name, cfg), name


def test_plans_are_deterministic() -> None:
    plan = Plan(0, "keep", (("dicom_set_attribute", 7), ("splice", 8), ("flip_bits", 9)))
    assert build(plan) == build(plan)


@FUZZ
@given(plan=_plans("dicom"))
# Regressions, each of which escaped or broke the contract before the fix in medvae:
@example(plan=Plan(12, "keep", (("set_bytes", 1799795104),)))  # RLE run overflow: Rust panic escaped
@example(plan=Plan(0, "keep", (("dicom_set_attribute", 205),)))  # WindowCenter 1e300: NaN pixels
@example(plan=Plan(10, "keep", (("dicom_set_attribute", 409),)))  # RescaleSlope -1e300: NaN pixels
def test_mutated_dicom_is_decoded_or_rejected(plan: Plan) -> None:
    _assert_allowed(plan)


@FUZZ
@given(plan=_plans("raster"))
def test_mutated_png_and_jpeg_are_decoded_or_rejected(plan: Plan) -> None:
    _assert_allowed(plan)


_MAGIC = (b"", b"\0" * 128 + b"DICM", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"\x08\x00\x05\x00CS")


@FUZZ
@given(
    magic=st.sampled_from(_MAGIC),
    body=st.binary(max_size=1024),
    name=st.sampled_from(["x.dcm", "x.png", "x.jpg", "IM0001", "x.bin"]),
)
def test_random_bytes_behind_any_magic_are_decoded_or_rejected(magic: bytes, body: bytes, name: str) -> None:
    problem = check_outcome(magic + body, name)
    assert problem is None, f"{problem}\nreproduce: check_outcome({(magic + body)!r}, {name!r})"
