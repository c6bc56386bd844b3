"""The lookup table D (paper, section "Run Time", Algorithm 1): file round trip, ordering,
``select(budget)`` at its edges, every refusal of a bad file or a mismatched model, the
uniform builder with exact MACs, and the file size."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from flwr_distreal import LUT, BudgetError, LUTError, build_model, count_macs
from flwr_distreal.core.lut import LUT_FORMAT, LUT_VERSION

FEMNIST_FULL_MACS = 4_015_616
DENSENET40_FULL_MACS = 72_365_352


def _kept(rate: float, channels: int) -> int:
    """Filters kept, computed independently of the package (round half up, at least one)."""
    return max(1, channels - int(math.floor(rate * channels + 0.5)))


def _femnist_hand_macs(k1: int, k2: int) -> int:
    """Forward MACs of the FEMNIST CNN keeping k1 of 32 and k2 of 64 filters (by hand).

    conv 5x5 on 28x28x1 -> 24x24xk1, pool -> 12x12, conv 5x5 -> 8x8xk2, pool -> 4x4,
    FC (16 k2 -> 256), FC (256 -> 62).
    """
    return 24 * 24 * k1 * 25 + 8 * 8 * k2 * 25 * k1 + 16 * k2 * 256 + 256 * 62


@pytest.fixture(scope="module")
def femnist():
    return build_model("femnist_cnn")


@pytest.fixture(scope="module")
def densenet40():
    return build_model("densenet_bc_40")


@pytest.fixture(scope="module")
def femnist_lut(femnist) -> LUT:
    return LUT.uniform(femnist)


@pytest.fixture()
def saved(tmp_path, femnist_lut) -> tuple[Path, dict]:
    """A valid LUT file and its parsed content (tests mutate a copy and write it back)."""
    path = femnist_lut.save(tmp_path / "lut.json")
    return path, json.loads(path.read_text())


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


# -- round trip and ordering ---------------------------------------------------------------


def test_round_trip_keeps_everything(tmp_path, densenet40):
    rng = np.random.default_rng(1)
    vectors = rng.uniform(0.0, 0.5, size=(9, densenet40.num_dropout_layers))
    meta = {"kind": "dse", "generations": 50, "seeds": [0, 1, 2], "note": "round trip"}
    lut = LUT.from_vectors(densenet40, vectors, meta=meta)
    path = lut.save(tmp_path / "sub" / "lut.json")
    assert path.exists() and not path.with_name("lut.json.tmp").exists()

    loaded = LUT.load(path)
    assert loaded.model_name == "densenet_bc_40"
    assert loaded.layer_names == densenet40.dropout_layer_names
    assert loaded.num_classes == 10
    assert loaded.input_shape == (3, 32, 32)
    assert loaded.meta == meta
    assert len(loaded) == 9
    np.testing.assert_array_equal(loaded.vectors, lut.vectors)  # bit-exact floats
    np.testing.assert_array_equal(loaded.macs, lut.macs)
    assert loaded.macs.dtype == np.int64
    # The file is what the docstring promises.
    data = json.loads(path.read_text())
    assert data["format"] == LUT_FORMAT and data["version"] == LUT_VERSION
    assert [e["macs"] for e in data["entries"]] == sorted(e["macs"] for e in data["entries"])
    # And it matches the model it was made for.
    assert LUT.load(path, model=densenet40).macs.tolist() == lut.macs.tolist()


def test_sorted_by_macs_even_when_built_unsorted(densenet40):
    rng = np.random.default_rng(2)
    vectors = rng.uniform(0.0, 0.5, size=(12, densenet40.num_dropout_layers))
    macs = [count_macs(densenet40, v) for v in vectors]
    order = np.argsort(macs)
    assert not np.array_equal(order, np.arange(12)), "test needs an unsorted input"
    lut = LUT("densenet_bc_40", densenet40.dropout_layer_names, vectors, macs)
    assert np.all(np.diff(lut.macs) >= 0)
    # Each vector stays paired with its own MACs after sorting.
    for v, m in zip(lut.vectors, lut.macs):
        assert count_macs(densenet40, v) == m
    # Rates are stored at the LUT's 32-bit precision.
    np.testing.assert_array_equal(lut.vectors, vectors[order].astype(np.float32).astype(np.float64))
    # from_vectors sorts too, whatever the input order.
    rev = LUT.from_vectors(densenet40, vectors[order[::-1]])
    np.testing.assert_array_equal(rev.macs, lut.macs)
    np.testing.assert_array_equal(rev.vectors, lut.vectors)
    assert lut.min_macs == min(macs) and lut.max_macs == max(macs)


def test_tables_are_read_only(femnist_lut):
    with pytest.raises(ValueError):
        femnist_lut.vectors[0, 0] = 0.1
    vec, _ = femnist_lut.select(femnist_lut.max_macs)
    with pytest.raises(ValueError):
        vec[0] = 0.3


# -- select(budget) ----------------------------------------------------------------------


def test_select_at_every_edge(femnist_lut):
    macs = femnist_lut.macs.tolist()
    assert len(set(macs)) == len(macs) == 11, "test needs distinct MACs"
    for i, m in enumerate(macs):
        vec, got = femnist_lut.select(m)  # exactly an entry's MACs: that entry
        assert got == m and isinstance(got, int)
        np.testing.assert_array_equal(vec, femnist_lut.vectors[i])
        if i > 0:  # one MAC below: the previous entry
            vec, got = femnist_lut.select(m - 1)
            assert got == macs[i - 1]
            np.testing.assert_array_equal(vec, femnist_lut.vectors[i - 1])
        if i + 1 < len(macs):  # between two entries: the lower one
            assert femnist_lut.select((m + macs[i + 1]) / 2)[1] == m
    # Above the maximum: the full model.
    vec, got = femnist_lut.select(FEMNIST_FULL_MACS * 10)
    assert got == FEMNIST_FULL_MACS and not vec.any()
    assert femnist_lut.select(float("inf"))[1] == FEMNIST_FULL_MACS
    # numpy scalars work as budgets.
    assert femnist_lut.select(np.int64(macs[3]))[1] == macs[3]


def test_select_below_cheapest(femnist_lut):
    cheapest = femnist_lut.min_macs
    assert cheapest == _femnist_hand_macs(16, 32)
    with pytest.raises(BudgetError, match=rf"budget {cheapest - 1} MACs .*cheapest.*\({cheapest} MACs\)"):
        femnist_lut.select(cheapest - 1)
    with pytest.raises(BudgetError, match=r"budget 0 MACs"):
        femnist_lut.select(0)
    with pytest.raises(BudgetError):
        femnist_lut.select(-5.0)
    vec, got = femnist_lut.select(cheapest - 1, fallback_to_cheapest=True)
    assert got == cheapest
    np.testing.assert_array_equal(vec, np.full(2, 0.5))
    assert femnist_lut.select(0, fallback_to_cheapest=True)[1] == cheapest


def test_budget_error_message_does_not_round_the_budget_up(femnist_lut):
    cheapest = femnist_lut.min_macs
    with pytest.raises(BudgetError) as info:
        femnist_lut.select(cheapest - 0.4)
    assert f"budget {cheapest} " not in str(info.value)


def test_select_refuses_nan(femnist_lut):
    with pytest.raises(ValueError, match="NaN") as info:
        femnist_lut.select(float("nan"))
    assert not isinstance(info.value, BudgetError)
    with pytest.raises(ValueError, match="NaN"):
        femnist_lut.select(float("nan"), fallback_to_cheapest=True)


# -- refusals on load --------------------------------------------------------------------


def _mutations():
    """(id, mutate(data) -> data, message pattern) for files that are JSON but not valid LUTs."""

    def set_key(key, value):
        def f(d):
            d[key] = value
            return d

        return f

    def drop_key(key):
        def f(d):
            del d[key]
            return d

        return f

    def set_rate(value):
        def f(d):
            d["entries"][4]["vector"][1] = value
            return d

        return f

    def set_macs(value):
        def f(d):
            d["entries"][2]["macs"] = value
            return d

        return f

    def short_vector(d):
        d["entries"][3]["vector"] = d["entries"][3]["vector"][:1]
        return d

    def entry_without_vector(d):
        del d["entries"][5]["vector"]
        return d

    def entry_not_a_dict(d):
        d["entries"][0] = [0.5, 0.5]
        return d

    return [
        ("not-a-lut-dict", lambda d: {"a": 1}, r"is not a flwr-distreal LUT"),
        ("json-list", lambda d: [1, 2, 3], r"is not a flwr-distreal LUT"),
        ("wrong-format-name", set_key("format", "other-lut"), r"is not a flwr-distreal LUT"),
        ("version-2", set_key("version", 2), r"LUT version 2; this reader knows 1"),
        ("version-missing", drop_key("version"), r"LUT version None"),
        ("no-model", drop_key("model"), r"lacks the key 'model'"),
        ("no-layers", drop_key("layers"), r"lacks the key 'layers'"),
        ("no-entries", drop_key("entries"), r"lacks the key 'entries'"),
        ("empty-entries", set_key("entries", []), r"has no entries"),
        ("entries-not-list", set_key("entries", {"macs": 1}), r"has no entries"),
        ("wrong-rate-count", short_vector, r"entry 3 has 1 rates for 2 layers"),
        ("entry-without-vector", entry_without_vector, r"entry 5 needs 'vector' and 'macs'"),
        ("entry-not-dict", entry_not_a_dict, r"entry 0 needs 'vector' and 'macs'"),
        ("rate-0.6", set_rate(0.6), r"rate 0\.6 for layer 'conv2', outside \[0, 0\.5\]"),
        ("rate-neg", set_rate(-0.1), r"rate -0\.1 for layer 'conv2', outside \[0, 0\.5\]"),
        ("rate-nan", set_rate(float("nan")), r"non-finite dropout rate"),
        ("rate-string", set_rate("half"), r"must be numeric"),
        ("macs-negative", set_macs(-100), r"MAC counts must be non-negative integers"),
        ("macs-fraction", set_macs(1234.5), r"MAC counts must be non-negative integers"),
        ("macs-nan", set_macs(float("nan")), r"MAC counts must be non-negative integers"),
        ("macs-string", set_macs("many"), r"must be numeric"),
    ]


def test_load_refuses_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(LUTError, match=r"cannot read LUT file .*nope\.json"):
        LUT.load(path)
    with pytest.raises(LUTError, match=r"cannot read LUT file"):
        LUT.load(tmp_path)  # a directory


def test_load_refuses_truncated_file(saved):
    path, _ = saved
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(LUTError, match=r"lut\.json is truncated or not JSON"):
        LUT.load(path)
    path.write_text("")
    with pytest.raises(LUTError, match=r"truncated or not JSON"):
        LUT.load(path)


def test_load_refuses_text_that_is_not_json(tmp_path):
    path = tmp_path / "lut.yaml"
    path.write_text("model: densenet_bc_40\nentries:\n  - 0.5\n")
    with pytest.raises(LUTError, match=r"lut\.yaml is truncated or not JSON"):
        LUT.load(path)


def test_load_refuses_binary_file(tmp_path):
    path = tmp_path / "lut.npz"
    path.write_bytes(b"PK\x03\x04\x93NUMPY\xff\xfe\x00\x01")
    with pytest.raises(LUTError, match=r"lut\.npz"):
        LUT.load(path)


@pytest.mark.parametrize("name", ["lut.npy", "lut.npz", "lut.json"])
def test_load_refuses_an_npy_array_saying_what_it_is(tmp_path, name):
    path = tmp_path / name
    with path.open("wb") as fh:  # np.save appends .npy to a name without it
        np.save(fh, np.zeros((3, 2), np.float32))
    with pytest.raises(LUTError) as info:
        LUT.load(path)
    message = str(info.value)
    assert f"LUT file {path} is a .npy file" in message
    assert "expected a LUT written by LUT.save or the DSE: an .npz archive" in message


def test_load_refuses_non_zip_npz_and_binary_files_saying_what_was_expected(tmp_path):
    fake = tmp_path / "lut.npz"
    fake.write_text('{"format": "flwr-distreal-lut"}')
    with pytest.raises(LUTError, match=r"lut\.npz has the \.npz extension but is not an \.npz \(zip\) archive; expected"):
        LUT.load(fake)
    binary = tmp_path / "lut.bin"
    binary.write_bytes(bytes(range(128, 256)))
    with pytest.raises(LUTError, match=r"lut\.bin is binary, neither an \.npz LUT nor JSON text .*; expected"):
        LUT.load(binary)


@pytest.mark.parametrize("name, mutate, message", _mutations(), ids=[m[0] for m in _mutations()])
def test_load_refuses_invalid_content(saved, name, mutate, message):
    path, data = saved
    _write(path, mutate(data))
    with pytest.raises(LUTError, match=message) as info:
        LUT.load(path)
    assert str(path) in str(info.value), "the error names the file"


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
@pytest.mark.parametrize(
    "key, value",
    [("layers", 5), ("num_classes", "ten"), ("input_shape", "32x32"), ("macs", 1e30)],
)
def test_load_refuses_wrongly_typed_fields(saved, key, value):
    path, data = saved
    if key == "macs":
        data["entries"][-1]["macs"] = value
    else:
        data[key] = value
    _write(path, data)
    with pytest.raises(LUTError):
        LUT.load(path)


def test_constructor_refusals(femnist):
    names = femnist.dropout_layer_names
    with pytest.raises(LUTError, match=r"non-empty 2-D array of vectors, got shape \(0,\)"):
        LUT("femnist_cnn", names, [], [])
    with pytest.raises(LUTError, match=r"non-empty 2-D array"):
        LUT("femnist_cnn", names, [0.1, 0.2], [5])
    with pytest.raises(LUTError, match=r"vectors have 3 rates but 2 layer names"):
        LUT("femnist_cnn", names, [[0.1, 0.2, 0.3]], [5])
    with pytest.raises(LUTError, match=r"2 vectors but 1 MAC counts"):
        LUT("femnist_cnn", names, [[0.1, 0.2], [0.0, 0.0]], [5])
    with pytest.raises(LUTError, match=r"entry 1 has rate 0\.7 for layer 'conv1'"):
        LUT("femnist_cnn", names, [[0.1, 0.2], [0.7, 0.0]], [5, 6])


# -- refusals against a model ------------------------------------------------------------


def test_load_accepts_the_matching_model(saved, femnist):
    path, _ = saved
    lut = LUT.load(path, model=femnist)
    assert len(lut) == 11
    lut.check_model(femnist)


def test_load_refuses_another_model(saved, densenet40):
    path, _ = saved
    with pytest.raises(LUTError, match=r"lut\.json: LUT is for model 'femnist_cnn', not 'densenet_bc_40'"):
        LUT.load(path, model=densenet40)
    with pytest.raises(LUTError, match=r"not 'femnist_cnn_small'"):
        LUT.load(path, model=build_model("femnist_cnn_small"))


def test_load_refuses_another_layer_count(tmp_path, densenet40):
    data = LUT.uniform(densenet40, [0.0, 0.25, 0.5]).to_dict()
    data["layers"] = data["layers"][:-1]
    for e in data["entries"]:
        e["vector"] = e["vector"][:-1]
    path = _write(tmp_path / "lut.json", data)
    assert len(LUT.load(path).layer_names) == 38  # a valid LUT on its own
    with pytest.raises(LUTError, match=r"LUT has 38 dropout layers, model 'densenet_bc_40' has 39"):
        LUT.load(path, model=densenet40)


def test_load_refuses_different_layer_names(tmp_path, densenet40):
    data = LUT.uniform(densenet40, [0.0, 0.5]).to_dict()
    names = densenet40.dropout_layer_names
    data["layers"][7] = "block2.0.conv1"
    path = _write(tmp_path / "lut.json", data)
    with pytest.raises(LUTError, match=rf"LUT layer 7 is 'block2\.0\.conv1' but the model's is '{names[7]}'"):
        LUT.load(path, model=densenet40)


def test_load_refuses_different_num_classes(tmp_path, densenet40):
    path = LUT.uniform(densenet40, [0.0, 0.5]).save(tmp_path / "lut.json")
    with pytest.raises(LUTError, match=r"LUT was made for 10 classes, the model has 100"):
        LUT.load(path, model=build_model("densenet_bc_40", num_classes=100))
    femnist10 = build_model("femnist_cnn", num_classes=10)
    path = LUT.uniform(build_model("femnist_cnn")).save(tmp_path / "f.json")
    with pytest.raises(LUTError, match=r"made for 62 classes, the model has 10"):
        LUT.load(path, model=femnist10)


def test_load_refuses_different_input_shape(saved, femnist):
    path, data = saved
    data["input_shape"] = [3, 28, 28]
    _write(path, data)
    with pytest.raises(LUTError, match=r"made for input \(3, 28, 28\), the model takes \(1, 28, 28\)"):
        LUT.load(path, model=femnist)


def test_load_refuses_tampered_macs(tmp_path, densenet40):
    rng = np.random.default_rng(3)
    lut = LUT.from_vectors(densenet40, rng.uniform(0, 0.5, size=(5, 39)))
    data = lut.to_dict()
    true = data["entries"][2]["macs"]
    data["entries"][2]["macs"] = true + 1
    path = _write(tmp_path / "lut.json", data)
    assert LUT.load(path).macs[2] == true + 1  # without a model nothing can tell
    with pytest.raises(LUTError, match=rf"LUT entry 2 says {true + 1} MACs but the model needs {true}"):
        LUT.load(path, model=densenet40)


# -- builders ----------------------------------------------------------------------------


def test_uniform_femnist_exact_macs(femnist):
    lut = LUT.uniform(femnist)
    assert len(lut) == 11
    rates = [0.05 * i for i in range(11)]
    # Cheapest first: all 0.5 ... all 0.
    for row, rate in zip(lut.vectors, reversed(rates)):
        np.testing.assert_allclose(row, [rate, rate], atol=1e-12)
    np.testing.assert_array_equal(lut.vectors[0], [0.5, 0.5])
    np.testing.assert_array_equal(lut.vectors[-1], [0.0, 0.0])
    expected = sorted(_femnist_hand_macs(_kept(r, 32), _kept(r, 64)) for r in rates)
    assert lut.macs.tolist() == expected
    assert lut.max_macs == FEMNIST_FULL_MACS
    assert lut.meta == {"kind": "uniform"}
    assert np.all(np.diff(lut.macs) > 0)


def test_uniform_densenet40(densenet40):
    lut = LUT.uniform(densenet40)
    assert len(lut) == 11
    assert lut.layer_names == densenet40.dropout_layer_names and len(lut.layer_names) == 39
    np.testing.assert_array_equal(lut.vectors[0], np.full(39, 0.5))
    np.testing.assert_array_equal(lut.vectors[-1], np.zeros(39))
    assert np.all(np.diff(lut.macs) > 0)
    assert lut.max_macs == DENSENET40_FULL_MACS
    for v, m in zip(lut.vectors, lut.macs):
        assert np.ptp(v) == 0  # one rate in all layers
        assert count_macs(densenet40, v) == m
    # Half the filters in every layer (and so about half of every layer's input): ~1/4 MACs.
    assert 0.22 < lut.min_macs / lut.max_macs < 0.30


def test_uniform_with_given_rates(femnist):
    lut = LUT.uniform(femnist, [0.5, 0.0, 0.25])
    assert len(lut) == 3
    assert lut.macs.tolist() == [
        _femnist_hand_macs(16, 32),
        _femnist_hand_macs(24, 48),
        FEMNIST_FULL_MACS,
    ]
    with pytest.raises(ValueError, match=r"outside \[0, 0\.5\]"):
        LUT.uniform(femnist, [0.0, 0.6])
    with pytest.raises(LUTError, match=r"non-empty"):
        LUT.uniform(femnist, [])


def test_from_vectors(densenet40):
    rng = np.random.default_rng(4)
    vectors = rng.uniform(0.0, 0.5, size=(6, 39))
    lut = LUT.from_vectors(densenet40, vectors, meta={"kind": "dse"})
    assert lut.model_name == "densenet_bc_40" and lut.num_classes == 10
    assert sorted(lut.macs.tolist()) == sorted(count_macs(densenet40, v) for v in vectors)
    assert lut.meta == {"kind": "dse"}
    assert LUT.from_front(densenet40, [v.tolist() for v in vectors]).macs.tolist() == lut.macs.tolist()
    with pytest.raises(ValueError, match=r"has 38 rates but the model has 39"):
        LUT.from_vectors(densenet40, [np.zeros(38)])
    with pytest.raises(ValueError, match=r"non-finite"):
        LUT.from_vectors(densenet40, [np.full(39, np.nan)])
    with pytest.raises(LUTError, match=r"non-empty"):
        LUT.from_vectors(densenet40, [])


# -- file size ---------------------------------------------------------------------------


def test_uniform_lut_file_is_small(tmp_path):
    model = build_model("densenet_bc_100")
    rates = np.round(np.linspace(0, 0.5, 64), 2)
    path = LUT.from_vectors(model, [np.full(99, r) for r in rates]).save(tmp_path / "u.json")
    assert path.stat().st_size < 80_000


def test_dse_lut_file_is_small(tmp_path):
    model = build_model("densenet_bc_100")
    rng = np.random.default_rng(5)
    vectors = rng.uniform(0.0, 0.5, size=(64, 99))  # what NSGA-II returns: arbitrary floats
    lut = LUT.from_vectors(model, vectors)
    path = lut.save(tmp_path / "dse.json")
    assert path.stat().st_size < 80_000
    binary = lut.save(tmp_path / "dse.npz")
    assert binary.stat().st_size < 30_000  # the paper's ~25 kB
    again = LUT.load(binary, model)
    np.testing.assert_array_equal(again.vectors, lut.vectors)
    np.testing.assert_array_equal(again.macs, lut.macs)


# -- the binary .npz format --------------------------------------------------------------


def _npz_parts(lut: LUT, tmp_path: Path) -> dict[str, np.ndarray]:
    path = lut.save(tmp_path / "base.npz")
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def test_npz_round_trip(tmp_path, densenet40):
    rng = np.random.default_rng(6)
    lut = LUT.from_vectors(densenet40, rng.uniform(0, 0.5, size=(7, 39)), meta={"kind": "dse"})
    path = lut.save(tmp_path / "lut.npz")
    assert path.read_bytes()[:2] == b"PK"
    again = LUT.load(path, model=densenet40)
    np.testing.assert_array_equal(again.vectors, lut.vectors)
    np.testing.assert_array_equal(again.macs, lut.macs)
    assert (again.model_name, again.layer_names, again.num_classes, again.meta) == (
        lut.model_name, lut.layer_names, lut.num_classes, lut.meta,
    )
    with pytest.raises(LUTError, match=r"lut\.npz: LUT is for model 'densenet_bc_40', not 'femnist_cnn'"):
        LUT.load(path, model=build_model("femnist_cnn"))


def test_npz_refusals(tmp_path, femnist_lut):
    parts = _npz_parts(femnist_lut, tmp_path)
    raw = (tmp_path / "base.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(LUTError, match=r"cut\.npz is not a valid \.npz LUT"):
        LUT.load(tmp_path / "cut.npz")

    def refused(name: str, message: str, **arrays: np.ndarray) -> None:
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with pytest.raises(LUTError, match=message):
            LUT.load(path)

    head, vecs, macs = parts["header"], parts["vectors"], parts["macs"]
    refused("noheader", r"not a valid \.npz LUT", vectors=vecs, macs=macs)
    refused("header-list", r"no header mapping", header=np.array("[1, 2]"), vectors=vecs, macs=macs)
    refused("vec-1d", r"vectors of shape \(11,\)", header=head, vectors=vecs[:, 0], macs=macs)
    bad = vecs.copy()
    bad[3, 1] = 0.75
    refused("rate", r"rate 0\.75 for layer 'conv2'", header=head, vectors=bad, macs=macs)
    header = json.loads(str(head))
    header["version"] = 7
    refused("version", r"LUT version 7", header=np.array(json.dumps(header)), vectors=vecs, macs=macs)


@pytest.mark.parametrize("kind", ["nan", "fraction", "string"])
def test_npz_refuses_bad_macs(tmp_path, femnist_lut, kind):
    parts = _npz_parts(femnist_lut, tmp_path)
    macs = parts["macs"].astype(np.float64)
    if kind == "nan":
        macs[2] = np.nan
    elif kind == "fraction":
        macs = macs + 0.5
    else:
        macs = np.array(["many"] * macs.size)
    path = tmp_path / "bad.npz"
    np.savez(path, header=parts["header"], vectors=parts["vectors"], macs=macs)
    with pytest.raises(LUTError, match=r"bad\.npz"):
        LUT.load(path)


# -- the learned LUTs shipped with the package (lut=learned) --------------------------------------


def test_learned_lut_is_recosted_for_another_classifier_and_refuses_unknown_models(tmp_path, monkeypatch) -> None:
    import flwr_distreal.core.lut as lut_module
    from flwr_distreal.models import build_model

    monkeypatch.setattr(lut_module, "SHIPPED_DIR", tmp_path)
    model62 = build_model("femnist_cnn", 62)
    vectors = [[0.0, 0.0], [0.49, 0.1], [0.5, 0.5]]
    LUT.from_vectors(model62, vectors, meta={"kind": "dse"}).save(tmp_path / "femnist_cnn.json")
    same = LUT.learned(model62)
    assert same.num_classes == 62 and "recosted_from_classes" not in same.meta
    model10 = build_model("femnist_cnn", 10)
    recosted = LUT.learned(model10)
    # the same vectors (per conv layer), their MACs recomputed exactly for the 10-class classifier
    np.testing.assert_array_equal(recosted.vectors, same.vectors)
    assert recosted.meta["recosted_from_classes"] == 62 and recosted.num_classes == 10
    assert recosted.macs.tolist() == [count_macs(model10, v) for v in recosted.vectors]
    assert recosted.macs.tolist() != same.macs.tolist()
    with pytest.raises(LUTError, match=r"no learned LUT is shipped for model 'densenet_bc_100'.*lut=uniform"):
        LUT.learned(build_model("densenet_bc_100", 100))


def test_shipped_luts_fit_their_models() -> None:
    from flwr_distreal.core.lut import SHIPPED_DIR
    from flwr_distreal.models import build_model

    shipped = sorted(SHIPPED_DIR.glob("*.json"))
    assert any(p.stem == "femnist_cnn" for p in shipped), "the FEMNIST CNN's learned LUT is not shipped"
    for path in shipped:
        lut = LUT.load(path)
        model = build_model(path.stem, lut.num_classes)
        lut.check_model(model)  # exact MACs, layers, classes
        assert lut.meta.get("kind") != "uniform" and len(lut) >= 2
        assert float(lut.vectors.max()) <= 0.5 and float(lut.vectors.min()) >= 0.0
        # Its provenance names paths as the DSE command was given them, not the build machine's.
        for key in ("data_root", "snapshot"):
            value = lut.meta.get(key)
            assert value is None or not Path(value).is_absolute(), f"{path.name}: meta {key}={value!r}"


def test_lut_null_is_refused_with_the_named_options() -> None:
    from flwr_distreal.run.config import ConfigError, to_run_config

    base = {"dataset": {"name": "digits"}, "model": {"name": "femnist_cnn", "small": "femnist_cnn_small"},
            "strategy": {"name": "distreal"}, "resources": {"kind": "timevarying"}}
    assert to_run_config(base).lut == "learned"
    with pytest.raises(ConfigError, match=r"learned .*uniform .*say lut=uniform"):
        to_run_config({**base, "lut": None})
