"""The papers' targets as tests, through the real runtime with the results table's settings.

Each test runs a method and its reference (bench/settings.py: the same seeds, clients,
partition, learning rates and method settings as the README table, at fewer rounds) and
asserts the target as stated, on test accuracy (the mean over the last 10% of the rounds,
at least 3, as the table reports it) and on uplink wire bytes:

* QRR (p = 0.3, b = 8): within 3 points of sgd at <= 10% of its uplink bytes;
* LQ-SGD: within 2 points of PowerSGD at the same rank with <= 30% of its uplink bytes;
* FeDLRT: within 2 points of FedAvg with >= 5x fewer client upload bytes;
* FedLoRU: within 2 points of FedAvg with >= 4x fewer client upload bytes.

On Fashion-MNIST (MLP 784-200-10; skipped when the data set is not installed, CI installs
it) every target is a test; one that the method does not meet yet is marked ``xfail``
(strict, so meeting it turns the test red until the mark goes) with what was measured. On
digits (MLP 64-64-10, always present) a target is a test where it can hold on a model that
small: LQ-SGD's, in its paper's bit count; ``DIGITS_NOT_APPLICABLE`` says why the others are
not.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest

from bench import settings as S
from fedsim.data import FASHION_MNIST_DIR

FASHION = Path(FASHION_MNIST_DIR)
HAVE_FASHION = FASHION.is_dir() and any(FASHION.glob("*idx*"))
needs_fashion = pytest.mark.skipif(
    not HAVE_FASHION, reason=f"Fashion-MNIST is not installed under {FASHION} "
                             "(apt-get install dataset-fashion-mnist; CI installs it)")

MIN_REFERENCE_ACCURACY = 0.6
"""A reference that did not learn would make "within 2 points" meaningless (chance is 0.1)."""

DIGITS_NOT_APPLICABLE = {
    "qrr": "rank 0.3 * 64 of a 64x64 gradient at 8 bits is 16% of its 32-bit size by QRR's own formula "
           "(README table: -0.6 points at 16.7% of sgd's wire bytes)",
    "fedlrt": "one 64x64 layer is factorised (the head stays dense) and a rank-16 basis of it is not small: "
              "README table: -0.6 points at 70.4% of FedAvg's bytes (1.4x fewer, not 5x)",
    "fedloru": "rank-16 modules of a 64x64 layer are half its size and the head stays dense: "
               "README table: -0.0 points at 58.2% of FedAvg's bytes (1.7x fewer, not 4x)",
}
"""Targets that cannot hold on a digits MLP, with why (the table's settings, bench/settings.py).
FeDLRT's and FedLoRU's cannot on 64-64-10 either (its one hidden layer is too narrow for low
rank to pay: 1.4x and 1.7x fewer bytes in the README table) and are tested on the 64-512-512-10
MLP (``digits_wide``).
LQ-SGD's holds in its paper's bit count (25.7% of PowerSGD's) but not in wire bytes (33.0%):
on tensors this small the per-frame framing and per-tensor scales weigh more, so on digits it
is tested in paper bits (``test_digits_mlp_lqsgd_target_in_paper_bits``)."""


@functools.lru_cache(maxsize=None)
def measured(row_key: str, label: str) -> S.Measured:
    """One run of the table's settings at the tests' rounds (cached: a reference serves two tests)."""
    row = S.ROWS[row_key]
    spec = S.find_run(row, label)
    return S.measure(row, spec, S.rounds_of(row, spec.method, test=True))


def check_target(row_key: str, method: str, unit: str = "wire bytes") -> None:
    """Assert ``method``'s target on ``row_key``; sizes compared in ``unit`` (wire bytes or paper bits)."""
    target = S.TARGETS[method]
    reference = S.reference_label(target, S.ROWS[row_key])
    got, ref = measured(row_key, method), measured(row_key, reference)
    acc, ref_acc = got.accuracy, ref.accuracy
    size, ref_size = ((got.uplink_bytes, ref.uplink_bytes) if unit == "wire bytes"
                      else (got.uplink_payload_bits, ref.uplink_payload_bits))
    gap, ratio, _ = target.check(acc, ref_acc, size, ref_size)
    print(f"{row_key}: {method} {acc:.4f} vs {reference} {ref_acc:.4f} ({-gap:+.1f} points), "
          f"{size:,} vs {ref_size:,} uplink {unit} ({100 * ratio:.1f}%)")
    assert ref_acc >= MIN_REFERENCE_ACCURACY, f"{reference} reached only {ref_acc:.3f}: the comparison means nothing"
    assert gap <= 100 * target.max_gap, (
        f"{method} {acc:.4f} is {gap:.1f} points below {reference} {ref_acc:.4f} "
        f"(target: within {100 * target.max_gap:g})")
    assert ratio <= target.max_ratio, (
        f"{method} uploads {100 * ratio:.1f}% of {reference}'s {unit} (target: <= {100 * target.max_ratio:.3g}%)")


FASHION_NOT_MET: dict[str, str] = {}
"""Targets not met yet (method -> what was measured): each becomes a strict ``xfail``. Empty
since FeDLRT's and FedLoRU's defaults took 188 local steps per round (with 10 they were 5.9
and 8.4 points below FedAvg after 30 rounds)."""


def _fashion_params():
    for m in S.TARGETS:
        not_met = FASHION_NOT_MET.get(m)
        marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=not_met)] if not_met else []
        yield pytest.param(m, marks=marks)


@needs_fashion
@pytest.mark.parametrize("method", list(_fashion_params()))
def test_fashion_mnist_mlp_target(method):
    check_target("mlp", method)


def test_digits_mlp_lqsgd_target_in_paper_bits():
    check_target("digits", "lqsgd", unit="paper bits")


DIGITS_WIDE_NOT_MET: dict[str, str] = {
    "fedloru": "FedLoRU with the official code's semantics (zero base, Kaiming factors, SGD momentum 0.9, "
               "weight decay 1e-4, clipping at 0.1; lr 0.2, 24 steps, rank 16, tau 5): 0.9304 against FedAvg's "
               "0.9777 (-4.7 points) at 10.6% of its uplink bytes after 30 rounds (measured 2026-12-01); the "
               "project's preconditioned variant met it before (algorithm.init=subspace, local_step=preconditioned)",
}
"""Low-rank targets on ``digits_wide`` not met (strict ``xfail``: meeting one turns the test red)."""


@pytest.mark.parametrize("method", [pytest.param(m, marks=[pytest.mark.xfail(strict=True, raises=AssertionError,
                                                                              reason=DIGITS_WIDE_NOT_MET[m])]
                                                 if m in DIGITS_WIDE_NOT_MET else [])
                                    for m in ("fedlrt", "fedloru")])
def test_digits_wide_mlp_low_rank_target(method):
    """The low-rank targets on a digits MLP wide enough for low rank to pay (64-512-512-10)."""
    check_target("digits_wide", method)


def test_every_target_is_tested_on_digits_or_explained():
    tested_on_digits = {"lqsgd", "fedlrt", "fedloru"}
    assert set(S.TARGETS) == tested_on_digits | set(DIGITS_NOT_APPLICABLE), (
        "a target in bench/settings.py is neither tested on digits nor explained in DIGITS_NOT_APPLICABLE")
