"""ProfileStore: CSV format and validation, interpolation over batch and share."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.profiles import (
    COLUMNS,
    ProfileError,
    ProfileRow,
    ProfileStore,
    SYNTHETIC_H100,
    read_csv,
    store_from_function,
    synthetic_store,
    write_csv,
)

HEADER = ",".join(COLUMNS)


def _row(model="m", share=100, batch=1, p50=1.0, p99=1.2, mem="100"):
    return f"dev,{model},{share},{batch},{p50},{p99},1.1,50,{mem},fp32,0.1,2025-01-01"


def _write(tmp_path, lines, sub="h100"):
    p = tmp_path / sub / "latency.csv"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(lines) + "\n")
    return p


def test_columns_are_the_agreed_format():
    assert COLUMNS == ["device", "model", "share", "batch", "p50_ms", "p99_ms", "mean_ms", "runs",
                       "memory_mb", "precision", "tool_version", "date"]


def test_roundtrip_and_directory_load(tmp_path):
    store = synthetic_store()
    store.save(tmp_path / "h100" / "latency.csv")
    again = ProfileStore.load(tmp_path)
    assert again.models() == sorted(SYNTHETIC_H100)
    assert again.latency("resnet50", 50, 8) == pytest.approx(store.latency("resnet50", 50, 8), rel=1e-4)
    assert again.memory_mb("vgg16") == 2920


@pytest.mark.parametrize(
    "bad, what",
    [
        (_row(share=0), "share"),
        (_row(share=120), "share"),
        (_row(batch=0), "batch"),
        (_row(p50="x"), "p50_ms"),
        (_row(p50=2.0, p99=1.0), "below"),
        (_row(p99="nan"), "p99_ms"),
        (_row(model=""), "model"),
        ("dev,m,100,1,1.0", "columns"),
        (_row().replace("fp32", "int3"), "precision"),
    ],
)
def test_bad_row_names_file_and_line(tmp_path, bad, what):
    p = _write(tmp_path, [HEADER, _row(batch=1), _row(batch=2), bad])
    with pytest.raises(ProfileError) as e:
        read_csv(p)
    assert f"{p}:4" in str(e.value)
    assert what in str(e.value)


def test_bad_header_is_line_1(tmp_path):
    p = _write(tmp_path, ["device,model,share", _row()])
    with pytest.raises(ProfileError, match=rf"{p}:1"):
        read_csv(p)


def test_empty_memory_is_allowed(tmp_path):
    p = _write(tmp_path, [HEADER, _row(mem="")])
    (r,) = read_csv(p)
    assert r.memory_mb is None


def test_several_devices_need_a_choice():
    rows = [ProfileRow("a", "m", 100, 1, 1, 1), ProfileRow("b", "m", 100, 1, 2, 2)]
    with pytest.raises(ProfileError, match="several devices"):
        ProfileStore(rows)
    assert ProfileStore(rows, device="b").latency("m", 100, 1) == 2


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ProfileError, match="no profile for model 'nope'"):
        synthetic_store().latency("nope", 50, 1)


def test_batch_interpolation_is_linear_and_extrapolates_up():
    s = store_from_function(lambda m, sh, b: 1.0 + b, ["m"], shares=[100], batches=[1, 4, 8])
    assert s.latency("m", 100, 2) == pytest.approx(3.0)
    assert s.latency("m", 100, 6) == pytest.approx(7.0)
    assert s.latency("m", 100, 16) == pytest.approx(17.0)  # along the last segment
    assert s.latency("m", 100, 0.5) == pytest.approx(2.0)  # clamped below


def test_share_interpolation_is_exact_for_a_plus_b_over_share():
    # latency = a + b/s is what MPS shares give; interpolation in 1/share reproduces it
    f = lambda m, sh, b: 2.0 + 300.0 * b / sh  # noqa: E731
    s = store_from_function(f, ["m"], shares=[20, 50, 100], batches=[1, 2, 4])
    for share in (30, 40, 60, 75):
        assert s.latency("m", share, 2) == pytest.approx(f("m", share, 2))


def test_share_clamps_above_and_scales_below():
    s = store_from_function(lambda m, sh, b: 100.0 / sh, ["m"], shares=[40, 80], batches=[1])
    assert s.latency("m", 100, 1) == pytest.approx(1.25)  # no faster than the largest profiled share
    assert s.latency("m", 20, 1) == pytest.approx(5.0)  # pessimistic 1/share scaling below


def test_p50_and_p99_are_distinct():
    s = synthetic_store()
    assert s.latency("bert", 50, 4, "p99") > s.latency("bert", 50, 4, "p50")
    with pytest.raises(ValueError):
        s.latency("bert", 50, 4, "p90")


def test_alias_uses_the_other_profile():
    s = synthetic_store().alias("lenet3", "lenet")
    assert s.latency("lenet3", 20, 4) == s.latency("lenet", 20, 4)
    assert "lenet3" in s.models()


@settings(max_examples=60, deadline=None)
@given(model=st.sampled_from(sorted(SYNTHETIC_H100)), s1=st.integers(5, 100), s2=st.integers(5, 100),
       b1=st.integers(1, 48), b2=st.integers(1, 48))
def test_synthetic_latency_monotone(model, s1, s2, b1, b2):
    """More share never slower, bigger batch never faster: the scheduler's search relies on it."""
    store = synthetic_store()
    lo_s, hi_s = sorted((s1, s2))
    lo_b, hi_b = sorted((b1, b2))
    assert store.latency(model, hi_s, lo_b) <= store.latency(model, lo_s, lo_b) + 1e-9
    assert store.latency(model, lo_s, hi_b) >= store.latency(model, lo_s, lo_b) - 1e-9
    assert math.isfinite(store.latency(model, lo_s, hi_b))


def test_write_csv_header(tmp_path):
    p = tmp_path / "x" / "latency.csv"
    write_csv(p, [ProfileRow("d", "m", 50, 2, 1.0, 1.5)])
    assert p.read_text().splitlines()[0] == HEADER
    assert read_csv(p)[0].share == 50


def test_fitted_interference_beside_the_profile_is_loaded(tmp_path):
    from controlplane.scheduler import FittedInterference

    synthetic_store().save(tmp_path / "h100" / "latency.csv")
    assert ProfileStore.load(tmp_path).interference is None
    FittedInterference({"k0": 0.2, "k_share_a": 0, "k_share_b": 0, "k_log2batch_a": 0, "k_log2batch_b": 0},
                       {}, {}).save(tmp_path / "h100" / "interference.json")
    im = ProfileStore.load(tmp_path).interference
    assert im.slowdown("resnet50", 50, 4, [("vgg16", 50, 4)]) == pytest.approx(1.2)

