"""Sensitivity tables: interpolation, storage, the authors' .npz format, and corrupt input."""

import json

import numpy as np
import pytest

from conftest import reseal
from sencache.runtime.errors import BadInput
from sencache.runtime.sensitivity import SensitivityTable


def table():
    return SensitivityTable(
        np.array([900.0, 100.0, 500.0]),
        np.array([3.0, 1.0, 2.0]),
        np.array([0.3, 0.1, 0.2]),
        counts=np.array([8.0, 8.0, 8.0]),
        meta={"model": "tiny-wan"},
    )


def test_lookup_interpolates_linearly_and_clamps():
    t = table()
    assert t.lookup(300.0) == pytest.approx((1.5, 0.15, True))
    assert t.lookup(900.0) == pytest.approx((3.0, 0.3, True))
    assert t.lookup(1000.0) == pytest.approx((3.0, 0.3, False))
    assert t.lookup(0.0) == pytest.approx((1.0, 0.1, False))


def test_json_round_trip(tmp_path):
    t = table()
    back = SensitivityTable.parse(t.to_bytes(), "s.json")
    np.testing.assert_array_equal(back.timesteps, [100.0, 500.0, 900.0])
    np.testing.assert_array_equal(back.jx, t.jx)
    assert back.meta == {"model": "tiny-wan"}


def test_npz_round_trip(tmp_path):
    t = table()
    t.to_npz(tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as raw:
        assert set(raw.files) == {"timesteps", "J_x_norm", "J_t_norm", "sample_counts"}
    back = SensitivityTable.from_npz(tmp_path / "s.npz")
    for a, b in ((back.timesteps, t.timesteps), (back.jx, t.jx), (back.jt, t.jt), (back.counts, t.counts)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        json.dumps({"format": "other"}),
        json.dumps({"format": "sencache-sensitivity/1", "timesteps": [1, 2], "Jx": [1, 2]}),
        json.dumps({"format": "sencache-sensitivity/1", "timesteps": [1, 2], "Jx": [1, "NaN"], "Jt": [1, 1]}),
        json.dumps({"format": "sencache-sensitivity/1", "timesteps": [1, 2], "Jx": [1], "Jt": [1, 1]}),
        json.dumps({"format": "sencache-sensitivity/1", "timesteps": [1, 1], "Jx": [1, 1], "Jt": [1, 1]}),
        json.dumps({"format": "sencache-sensitivity/1", "timesteps": [1, 2], "Jx": [-1, 1], "Jt": [1, 1]}),
    ],
)
def test_corrupt_tables_are_bad_input(content):
    with pytest.raises(BadInput, match="corrupt sensitivity table s.json"):
        SensitivityTable.parse(content.encode(), "s.json")


def test_npz_without_the_authors_keys_is_bad_input(tmp_path):
    np.savez(tmp_path / "x.npz", something=np.zeros(3))
    with pytest.raises(BadInput, match="J_x_norm"):
        SensitivityTable.from_npz(tmp_path / "x.npz")
    (tmp_path / "y.npz").write_bytes(b"garbage")
    with pytest.raises(BadInput):
        SensitivityTable.from_npz(tmp_path / "y.npz")


def test_a_bundle_adopts_the_tables_of_another_build_of_its_model(calibrated_bundle, ort_bundle, tmp_path):
    import shutil

    from sencache.runtime.bundle import Bundle

    target = tmp_path / "other"
    shutil.copytree(ort_bundle, target)
    table = Bundle.load(target).adopt_tables(Bundle.load(calibrated_bundle))
    adopted = Bundle.load(target).sensitivity()
    np.testing.assert_array_equal(adopted.jx, Bundle.load(calibrated_bundle).sensitivity().jx)
    assert adopted.meta["adopted_from"] == str(calibrated_bundle) and len(table.timesteps) == len(adopted.timesteps)
    assert Bundle.load(target).baselines_path.is_file()
    reseal(target, lambda manifest: manifest["scheduler"].update(flow_shift=5.0))
    with pytest.raises(BadInput, match="scheduler"):
        Bundle.load(target).adopt_tables(Bundle.load(calibrated_bundle))
