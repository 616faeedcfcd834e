"""Every reader of a file a user can reach, fuzzed (Hypothesis): documents generated from
scratch and documents mutated from one tledge writes give a valid result or one line (a
TledgeError, which the command line prints as `error: ...`), never another exception. A
valid result is then used as its consumers use it (typed rows formatted as the report does).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tledge.core.timing import BenchRow
from tledge.errors import TledgeError
from tledge.parity import ParityRow
from tledge.records import DeviceCheck, DeviceResult, READERS

FUZZ = settings(max_examples=1000, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
FEW = settings(max_examples=80, deadline=None, derandomize=True,
               suppress_health_check=list(HealthCheck))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) |
    st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) |
    st.dictionaries(st.text(max_size=10), children, max_size=4), max_leaves=12)


def _mutated(document, data):
    """`document` with one part replaced, removed or retyped, chosen by Hypothesis."""
    if isinstance(document, dict) and document:
        key = data.draw(st.sampled_from(sorted(document)))
        action = data.draw(st.sampled_from(["replace", "remove", "recurse"]))
        changed = dict(document)
        if action == "remove":
            del changed[key]
        elif action == "replace":
            changed[key] = data.draw(json_values)
        else:
            changed[key] = _mutated(document[key], data)
        return changed
    if isinstance(document, list) and document:
        index = data.draw(st.integers(0, len(document) - 1))
        changed = list(document)
        changed[index] = _mutated(document[index], data) if data.draw(st.booleans()) \
            else data.draw(json_values)
        return changed
    return data.draw(json_values)


def _text(document, data) -> str:
    """The document as text, sometimes truncated or with a character changed."""
    text = json.dumps(document)
    how = data.draw(st.sampled_from(["whole", "whole", "whole", "truncated", "changed"]))
    if how == "truncated":
        return text[:data.draw(st.integers(0, max(len(text) - 1, 0)))]
    if how == "changed" and text:
        at = data.draw(st.integers(0, len(text) - 1))
        return text[:at] + data.draw(st.characters()) + text[at + 1:]
    return text


def _valid_records() -> dict:
    parity = {"split": "test", "images": 4, "rows": [
        dataclasses.asdict(ParityRow("keras", "keras", "reference", accuracy=0.75,
                                     confusion=[[3, 1], [0, 0]])),
        dataclasses.asdict(ParityRow("tflite_int8", "litert", "passed", accuracy=0.75,
                                     accuracy_drop=0.0, agreement=1.0, max_abs_diff=0.01,
                                     thresholds={"min_agreement": 0.97}, sha256="ab"))]}
    rows = [BenchRow("keras", "keras", 2, 1, "ok", p50_ms=3.0),
            BenchRow("tflite_int8", "litert", 2, 1, "ok", p50_ms=0.2)]
    bench = {"rows": [dataclasses.asdict(row) for row in rows],
             "pick": {"artifact": "tflite_int8", "runtime": "litert"},
             "settings": {"isolate": False}, "machine": {"isa": "AVX2"}}
    device = DeviceResult("pi", {"arch": "aarch64", "cpu": "Cortex-A72"}, rows[1:],
                          [DeviceCheck("tflite_int8", "ai_edge_litert", images=8, accuracy=0.9,
                                       agreement_with_host=0.875)],
                          {"tflite_int8": "abc"})
    return {"parity.json": parity, "bench.json": bench,
            "devices.json": {"devices": {"pi": device.to_json()}},
            "history.json": {"phases": [{"name": "feature_extraction", "epochs": []}]},
            "domains.json": {"domains": {"night": {"accuracy": 0.5}}}}


def _use(result) -> None:
    """What consumers do with a result: format its rows' numbers and texts."""
    results = result.values() if isinstance(result, dict) else [result]
    for item in results:
        for row in list(getattr(item, "rows", None) or []) + list(getattr(item, "checks", None)
                                                                  or []):
            for field in dataclasses.fields(row):
                value = getattr(row, field.name)
                declared = str(field.type)
                if value is None:
                    continue
                if "float" in declared or "int" in declared:  # the report's number format
                    f"{value:.4f}"
                else:
                    str(value)


@pytest.mark.parametrize("name", sorted(READERS))
def test_run_records_read_or_say_one_line(name, tmp_path_factory):
    folder = tmp_path_factory.mktemp("records")
    valid = _valid_records()[name]
    reader = READERS[name]

    @FUZZ
    @given(data=st.data())
    def check(data):
        document = _mutated(valid, data) if data.draw(st.booleans()) else data.draw(json_values)
        (folder / name).write_text(_text(document, data), encoding="utf-8")
        try:
            result = reader(folder)
        except TledgeError as error:
            assert "\n" not in str(error).strip(), str(error)
            return
        _use(result)
    check()


def test_the_manifest_reads_or_says_one_line(built_manifest, tmp_path_factory):
    from tledge.rundir import read_manifest
    folder = tmp_path_factory.mktemp("manifest")

    @FUZZ
    @given(data=st.data())
    def check(data):
        document = _mutated(built_manifest, data) if data.draw(st.integers(0, 3)) \
            else data.draw(json_values)
        (folder / "manifest.json").write_text(_text(document, data), encoding="utf-8")
        try:
            read_manifest(folder)
        except TledgeError as error:
            assert "\n" not in str(error).strip(), str(error)
    check()


@pytest.fixture(scope="module")
def built_manifest():
    """A manifest as tledge writes one (a run directory's, without training anything)."""
    from tledge.rundir import empty_manifest
    return json.loads(json.dumps(empty_manifest(
        {"name": "m", "source": "m.keras", "hash": "0" * 16}, ["cat", "dog"], (32, 32))))


RECIPE = """name = "fuzzed"
seed = 0
[data]
source = "synthetic"
image_size = [32, 32]
val_fraction = 0.15
synthetic = { classes = ["circle", "square"], samples_per_class = 10 }
[model]
backbone = "small_cnn"
weights = "none"
[train.feature_extraction]
epochs = 2
learning_rate = 3e-3
[export]
tflite = ["fp32", "int8"]
onnx = ["fp32"]
[validate]
min_agreement = 0.9
[bench]
threads = [1]
"""


def test_a_recipe_loads_or_says_one_line(tmp_path_factory):
    from tledge.recipe.load import load_recipe
    folder = tmp_path_factory.mktemp("recipes")
    lines = RECIPE.splitlines()

    @FUZZ
    @given(data=st.data())
    def check(data):
        changed = list(lines)
        for _ in range(data.draw(st.integers(1, 3))):
            at = data.draw(st.integers(0, len(changed) - 1))
            how = data.draw(st.sampled_from(["delete", "duplicate", "value", "character"]))
            if how == "delete":
                del changed[at]
            elif how == "duplicate":
                changed.insert(at, changed[at])
            elif how == "value" and "=" in changed[at]:
                key = changed[at].split("=")[0]
                value = data.draw(st.sampled_from(['""', "-1", "0", "1e309", "[]", "{}",
                                                   "true", '"../x"', "[1, 2]", '"none"',
                                                   "nan", '"' + "x" * 300 + '"']))
                changed[at] = f"{key}= {value}"
            elif changed[at]:
                position = data.draw(st.integers(0, len(changed[at]) - 1))
                changed[at] = changed[at][:position] + data.draw(st.characters()) + \
                    changed[at][position + 1:]
            if not changed:
                break
        path = folder / "recipe.toml"
        path.write_text("\n".join(changed) + "\n", encoding="utf-8", errors="surrogatepass")
        try:
            load_recipe(path)
        except TledgeError as error:  # one line, or the file's name and a list of problems
            first, *rest = str(error).strip().splitlines()
            assert str(path) in first and all(line.startswith("  - ") for line in rest), \
                str(error)
    check()


def test_a_device_result_imports_or_says_what_is_wrong(tmp_path_factory):
    """`tledge bench --import` checks a bundle's result.json: a list of problems, or none."""
    from tledge.bench.bundle import check_device_result
    from tledge.core.device import RESULT_FORMAT, VERSION
    from tledge.records import device_problems
    device = _valid_records()["devices.json"]["devices"]["pi"]
    valid = {**device, "format": RESULT_FORMAT, "version": VERSION,
             "device": {**device["device"], "name": "pi"}}

    @FUZZ
    @given(data=st.data())
    def check(data):
        document = _mutated(valid, data) if data.draw(st.booleans()) else data.draw(json_values)
        try:
            problems = check_device_result(document, "result.json")
        except TledgeError as error:
            assert "\n" not in str(error).strip(), str(error)
            return
        assert isinstance(problems, list) and all(isinstance(p, str) for p in problems)
        if not problems:  # what reading devices.json checks, once it is stored
            assert all(isinstance(p, str) for p in device_problems(document))
    check()


def test_an_npz_source_loads_or_says_one_line(tmp_path_factory, monkeypatch):
    from tledge.data import load_splits
    from tledge.recipe.spec import DataRecipe
    folder = tmp_path_factory.mktemp("npz")
    monkeypatch.setenv("TLEDGE_CACHE_DIR", str(folder / "cache"))
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8),
              "y_train": np.arange(12) % 3}
    dtypes = st.sampled_from(["uint8", "float32", "float64", "int64", "bool", "U3", "object"])

    @FEW
    @given(data=st.data())
    def check(data):
        chosen = dict(arrays)
        key = data.draw(st.sampled_from([None, "x_train", "y_train", "x_test", "y_test",
                                         "extra"]))
        if key is not None:  # None: the arrays as they are (the file may still be truncated)
            shape = tuple(data.draw(st.lists(st.integers(0, 12), min_size=0, max_size=4)))
            dtype = data.draw(dtypes)
            chosen[key] = np.zeros(shape, dtype=dtype if dtype != "object" else object)
            if data.draw(st.booleans()):
                chosen.pop(data.draw(st.sampled_from(sorted(chosen))))
        path = folder / "data.npz"
        np.savez(path, **chosen)
        if data.draw(st.integers(0, 3)) == 0:  # a damaged file
            raw = path.read_bytes()
            path.write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1))])
        try:
            load_splits(DataRecipe(source="npz", path=str(path), image_size=(8, 8),
                                   val_fraction=0.25, test_fraction=0.25), seed=0)
        except TledgeError as error:
            assert "\n" not in str(error).strip(), str(error)
    check()


def test_a_csv_source_loads_or_says_one_line(tmp_path_factory, monkeypatch):
    from PIL import Image
    from tledge.data import load_splits
    from tledge.recipe.spec import CsvRecipe, DataRecipe
    folder = tmp_path_factory.mktemp("csv")
    monkeypatch.setenv("TLEDGE_CACHE_DIR", str(folder / "cache"))
    for index in range(8):
        Image.fromarray(np.full((6, 6, 3), index * 30, np.uint8)).save(folder / f"{index}.png")
    rows = ["file,label"] + [f"{index}.png,{'ab'[index % 2]}" for index in range(8)]

    @FEW
    @given(data=st.data())
    def check(data):
        changed = list(rows)
        at = data.draw(st.integers(0, len(changed) - 1))
        changed[at] = data.draw(st.sampled_from([
            "", ",", "file", "9.png,a", "../0.png,a", "/etc/passwd,a", "0.png,", ",a",
            "0.png,a,extra", '"0.png,a', "0.png,\x00", "\ufeff0.png,a", "0.png;a"]))
        path = folder / "labels.csv"
        path.write_text("\n".join(changed) + "\n", encoding="utf-8")
        try:
            load_splits(DataRecipe(source="csv", path=str(path), image_size=(6, 6),
                                   val_fraction=0.25, test_fraction=0.25, csv=CsvRecipe()),
                        seed=0)
        except TledgeError as error:
            assert "\n" not in str(error).strip(), str(error)
    check()
