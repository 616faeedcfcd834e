"""tledge.recipe.spec and tledge.schema: TOML in, frozen typed objects out, every problem at once."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path
from types import MappingProxyType

import pytest

from tledge.backbones import BACKBONES
from tledge.errors import RecipeError
from tledge.formats import FORMATS
from tledge.recipe.spec import Recipe
from tledge.recipe.dump import dump_toml
from tledge.recipe.load import load_recipe

SHIPPED = sorted((Path(__file__).parents[1] / "recipes").glob("*.toml"))


def recipe_text(*, top: str = "", data: str = "", tables: str = "",
                source: str = "synthetic", name: str = "probe") -> str:
    """A valid recipe plus extra lines: `top` before [data], `data` inside it, then `tables`."""
    source_line = f'source = "{source}"\n' if source else ""
    return (f'name = "{name}"\n{textwrap.dedent(top)}\n'
            f"[data]\n{source_line}{textwrap.dedent(data)}\n{textwrap.dedent(tables)}\n")


def write(folder: Path, text: str, name: str = "recipe.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str) -> Recipe:
    return load_recipe(write(tmp_path, text))


def problems_of(tmp_path: Path, text: str, name: str = "recipe.toml") -> list[str]:
    """The problems a recipe file raises; also checks that the error names the file."""
    path = write(tmp_path, text, name)
    with pytest.raises(RecipeError) as raised:
        load_recipe(path)
    assert raised.value.path == str(path)
    assert str(raised.value).startswith(str(path))
    for problem in raised.value.problems:
        assert problem in str(raised.value)
    return raised.value.problems


def the_problem(problems: list[str], keypath: str) -> str:
    """The one problem reported at `keypath`."""
    found = [problem for problem in problems if problem.startswith(f"{keypath}: ")]
    assert len(found) == 1, f"expected one problem at {keypath!r}, got {problems}"
    return found[0]


# ---- the shipped recipes and the import --------------------------------------------------

def test_the_recipes_folder_is_found():
    assert {path.name for path in SHIPPED} >= {"quickstart.toml", "quickstart_pretrain.toml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.name)
def test_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert recipe.path == str(path.resolve())
    assert recipe.data.image_size is not None and recipe.model.backbone in BACKBONES


def test_importing_and_loading_recipes_does_not_import_tensorflow():
    code = textwrap.dedent(f"""
        import sys
        import tledge.recipe.load
        assert "tensorflow" not in sys.modules, "import tledge.recipe.load imported tensorflow"
        for path in {[str(path) for path in SHIPPED]!r}:
            tledge.recipe.load.load_recipe(path)
        heavy = sorted(name for name in ("tensorflow", "keras", "onnxruntime", "tf2onnx")
                       if name in sys.modules)
        assert not heavy, heavy
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---- typed, frozen, defaults -------------------------------------------------------------

def test_recipe_is_typed_and_frozen(tmp_path):
    recipe = load(tmp_path, recipe_text(
        data="image_size = [40, 48]\nbatch_size = 8",
        tables="[train.fine_tune]\nunfreeze = \"all\"\nlearning_rate = 1"))
    assert recipe.data.image_size == (40, 48) and recipe.image_size == (40, 48)
    assert isinstance(recipe.data.image_size, tuple)
    assert recipe.data.batch_size == 8 and type(recipe.data.batch_size) is int
    assert recipe.train.fine_tune.learning_rate == 1.0
    assert type(recipe.train.fine_tune.learning_rate) is float  # an int in TOML, a float here
    assert recipe.train.fine_tune.unfreeze == "all"
    assert isinstance(recipe.export.tflite, tuple) and isinstance(recipe.bench.threads, tuple)
    assert isinstance(recipe.validate.per_format, MappingProxyType)
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.data.batch_size = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        recipe.validate.per_format["keras"] = None  # type: ignore[index]


@pytest.mark.parametrize("name", list(BACKBONES))
def test_defaults_depend_on_the_backbone(tmp_path, name):
    backbone = BACKBONES[name]
    recipe = load(tmp_path, recipe_text(tables=f'[model]\nbackbone = "{name}"\nweights = "none"'))
    assert recipe.data.image_size == tuple(backbone.default_size)
    assert recipe.model.alpha == (1.0 if backbone.alphas else None)
    assert recipe.train.fine_tune.unfreeze == backbone.default_unfreeze


def test_explicit_unfreeze_is_not_replaced_by_the_backbone_default(tmp_path):
    recipe = load(tmp_path, recipe_text(tables='[model]\nbackbone = "small_cnn"\n'
                                               'weights = "none"\n[train.fine_tune]\nunfreeze = 3'))
    assert recipe.train.fine_tune.unfreeze == 3 != BACKBONES["small_cnn"].default_unfreeze


def test_mobilenet_defaults_to_224_and_alpha_1(tmp_path):
    recipe = load(tmp_path, recipe_text())
    assert recipe.model.backbone == "mobilenet_v2"
    assert recipe.data.image_size == (224, 224) and recipe.model.alpha == 1.0
    assert recipe.model.weights == "imagenet"  # a keyword, not resolved as a path
    assert recipe.train.fine_tune.unfreeze == 30 and recipe.data.batch_size == 32


def test_explicit_values_are_not_replaced_by_defaults(tmp_path):
    recipe = load(tmp_path, recipe_text(data="image_size = [96, 64]",
                                        tables="[model]\nalpha = 0.35"))
    assert recipe.data.image_size == (96, 64) and recipe.model.alpha == 0.35


# ---- every problem, each with file, key path, expected and found -------------------------

def test_every_problem_is_reported_at_once(tmp_path):
    problems = problems_of(tmp_path, recipe_text(
        top="seed = -1",
        data="batch_size = \"32\"\nimage_size = [48.0, 48.0]",
        tables="""
            [model]
            backbone = "mobilenetv2"
            [train.fine_tune]
            unfreeze = true
            learning_rat = 0.1
            [export]
            tflite = ["fp8"]
        """))
    assert len(problems) == 7, problems
    assert the_problem(problems, "seed") == "seed: expected at least 0, found -1"
    assert the_problem(problems, "data.batch_size") == \
        "data.batch_size: expected an integer, found '32'"
    assert "found [48.0, 48.0]" in the_problem(problems, "data.image_size")
    assert "did you mean 'mobilenet_v2'?" in the_problem(problems, "model.backbone")
    assert "found true" in the_problem(problems, "train.fine_tune.unfreeze")
    assert "did you mean 'learning_rate'?" in the_problem(problems, "train.fine_tune.learning_rat")
    assert "found 'fp8'" in the_problem(problems, "export.tflite[0]")


def test_several_cross_key_problems_are_reported_together(tmp_path):
    problems = problems_of(tmp_path, recipe_text(
        data="image_size = [16, 16]\nval_fraction = 0.5\ntest_fraction = 0.45",
        tables="""
            [model]
            alpha = 0.6
            weights = "missing.h5"
            [train.feature_extraction]
            epochs = 0
            [train.fine_tune]
            epochs = 0
            unfreeze = 1000
        """))
    assert len(problems) == 6, problems
    for keypath in ("data.image_size", "data.val_fraction + data.test_fraction", "model.alpha",
                    "model.weights", "train", "train.fine_tune.unfreeze"):
        the_problem(problems, keypath)


def test_one_problem_message_names_file_keypath_expected_and_found(tmp_path):
    path = write(tmp_path, recipe_text(tables="[train.fine_tune]\nunfreeze = 1.5"))
    with pytest.raises(RecipeError) as raised:
        load_recipe(path)
    assert raised.value.problems == [
        "train.fine_tune.unfreeze: expected an integer or a string, found 1.5"]
    assert str(raised.value) == f"{path}: train.fine_tune.unfreeze: expected an integer or a " \
                                "string, found 1.5"


@pytest.mark.parametrize("section, key, keypath, suggestion", [
    ("[train.feature_extraction]", "learning_rat", "train.feature_extraction.learning_rat",
     "learning_rate"),
    ("[data]", "batchsize", "data.batchsize", "batch_size"),
    ("[model]", "backbon", "model.backbon", "backbone"),
    ("[validate]", "min_agrement", "validate.min_agrement", "min_agreement"),
    ("[bench]", "thread", "bench.thread", "threads"),
    ("", "sed", "sed", "seed"),
])
def test_unknown_key_names_the_closest_valid_one(tmp_path, section, key, keypath, suggestion):
    if section == "[data]":
        text = recipe_text(data=f"{key} = 1")
    elif section:
        text = recipe_text(tables=f"{section}\n{key} = 1")
    else:
        text = recipe_text(top=f"{key} = 1")
    problem = the_problem(problems_of(tmp_path, text), keypath)
    assert problem == f"{keypath}: unknown key; did you mean '{suggestion}'?"


def test_unknown_key_far_from_any_lists_the_valid_keys(tmp_path):
    problem = the_problem(problems_of(tmp_path, recipe_text(tables="[model]\nzzz = 1")),
                          "model.zzz")
    assert problem == "model.zzz: unknown key; valid keys are alpha, backbone, dropout, head, tasks, weights"


def test_path_is_not_a_recipe_key(tmp_path):
    # `Recipe.path` records where the file came from; a recipe must not be able to set it.
    problem = the_problem(problems_of(tmp_path, recipe_text(top='path = "elsewhere.toml"')),
                          "path")
    assert "unknown key" in problem and "path" not in problem.split("valid keys are")[-1]


# ---- impossible values -------------------------------------------------------------------

CASES = [
    # id, recipe_text arguments, key path, fragment of the message
    ("unfreeze_more_than_layers", dict(tables="[train.fine_tune]\nunfreeze = 155"),
     "train.fine_tune.unfreeze", "'mobilenet_v2' has 154 layers, found 155; use a smaller count"),
    ("unfreeze_zero", dict(tables="[train.fine_tune]\nunfreeze = 0"),
     "train.fine_tune.unfreeze", "expected at least 1, found 0"),
    ("unfreeze_small_cnn", dict(tables='[model]\nbackbone = "small_cnn"\nweights = "none"\n'
                                       "[train.fine_tune]\nunfreeze = 17"),
     "train.fine_tune.unfreeze", "'small_cnn' has 16 layers, found 17"),
    ("image_size_below_minimum", dict(data="image_size = [31, 64]"),
     "data.image_size", "'mobilenet_v2' needs at least 32x32, found 31x64"),
    ("image_size_below_schema_minimum", dict(data="image_size = [4, 64]"),
     "data.image_size[0]", "expected at least 8, found 4"),
    ("alpha_without_alphas", dict(tables='[model]\nbackbone = "efficientnet_b0"\nalpha = 1.0'),
     "model.alpha", "backbone 'efficientnet_b0' has no width multiplier; remove alpha"),
    ("alpha_not_offered", dict(tables="[model]\nalpha = 0.6"),
     "model.alpha", "expected one of 0.35, 0.5, 0.75, 1.0, 1.3, 1.4 for 'mobilenet_v2', found 0.6"),
    ("unknown_backbone", dict(tables='[model]\nbackbone = "efficientnet_b9"'),
     "model.backbone", "found 'efficientnet_b9'; did you mean 'efficientnet_b3'?"),
    ("unknown_source", dict(source="folders"),
     "data.source", "expected one of 'synthetic', 'folder', 'csv', 'npz', 'cifar10', found 'folders'; "
                    "did you mean 'folder'?"),
    ("missing_source", dict(source=""), "data.source", "is required (one of synthetic, folder"),
    ("folder_without_path", dict(source="folder"),
     "data.path", "is required for source 'folder' (a folder of class sub-folders)"),
    ("npz_without_path", dict(source="npz"),
     "data.path", "is required for source 'npz' (an .npz file)"),
    ("synthetic_with_path", dict(data='path = "images"'),
     "data.path", "not used by source 'synthetic'; remove it"),
    ("weights_missing_file", dict(tables='[model]\nweights = "trained/best.h5"'),
     "model.weights", "no such file "),
    ("weights_unsupported_suffix", dict(tables='[model]\nweights = "best.pt"'),
     "model.weights", "a .h5/.weights.h5/.keras file or a recipe .toml, found "),
    ("weights_unknown_keyword", dict(tables='[model]\nweights = "imagenet21k"'),
     "model.weights", "found 'imagenet21k'"),
    ("string_for_int", dict(data='batch_size = "32"'),
     "data.batch_size", "expected an integer, found '32'"),
    ("bool_for_int", dict(tables="[train.feature_extraction]\nepochs = true"),
     "train.feature_extraction.epochs", "expected an integer, found true"),
    ("float_for_int", dict(tables="[export]\ncalibration_samples = 200.0"),
     "export.calibration_samples", "expected an integer, found 200.0"),
    ("bool_for_float", dict(tables="[model]\ndropout = false"),
     "model.dropout", "expected a number, found false"),
    ("float_list_for_image_size", dict(data="image_size = [48.0, 48.0]"),
     "data.image_size", "expected a list of 2 integers, found [48.0, 48.0]"),
    ("short_image_size", dict(data="image_size = [48]"),
     "data.image_size", "expected a list of 2 integers, found [48]"),
    ("int_for_image_size", dict(data="image_size = 48"),
     "data.image_size", "expected a list of 2 integers, found 48"),
    ("table_for_list", dict(tables="[export]\ntflite = { fp32 = true }"),
     "export.tflite", "expected a list of strings, found a table"),
    ("table_for_int_list", dict(tables="[bench.threads]\ncount = 2"),
     "bench.threads", "expected a list of integers, found a table"),
    ("string_for_list", dict(tables='[export]\nonnx = "fp32"'),
     "export.onnx", "expected a list of strings, found 'fp32'"),
    ("value_for_table", dict(top="bench = [1]", tables=""),
     "bench", "expected a table, found [1]"),
    ("unfreeze_bool", dict(tables="[train.fine_tune]\nunfreeze = true"),
     "train.fine_tune.unfreeze", "expected an integer or a string, found true"),
    ("batch_size_zero", dict(data="batch_size = 0"),
     "data.batch_size", "expected at least 1, found 0"),
    ("dropout_too_high", dict(tables="[model]\ndropout = 0.95"),
     "model.dropout", "expected at most 0.9, found 0.95"),
    ("val_fraction_too_high", dict(data="val_fraction = 0.6"),
     "data.val_fraction", "expected at most 0.5, found 0.6"),
    ("negative_learning_rate", dict(tables="[train.fine_tune]\nlearning_rate = -1e-5"),
     "train.fine_tune.learning_rate", "expected at least 0.0, found -1e-05"),
    ("nan_learning_rate", dict(tables="[train.feature_extraction]\nlearning_rate = nan"),
     "train.feature_extraction.learning_rate", "found nan"),
    ("infinite_min_seconds", dict(tables="[bench]\nmin_seconds = inf"),
     "bench.min_seconds", "expected at most 3600.0, found inf"),
    ("negative_seed", dict(top="seed = -3"), "seed", "expected at least 0, found -3"),
    ("zero_threads", dict(tables="[bench]\nthreads = [2, 0]"),
     "bench.threads[1]", "expected at least 1, found 0"),
    ("rotation_out_of_range", dict(data="augment = { rotation = 0.75 }"),
     "data.augment.rotation", "expected at most 0.5, found 0.75"),
    ("unknown_flip", dict(data='augment = { flip = "horizontal_flip" }'),
     "data.augment.flip", "found 'horizontal_flip'; did you mean 'horizontal'?"),
    ("fractions_too_large", dict(data="val_fraction = 0.45\ntest_fraction = 0.45"),
     "data.val_fraction + data.test_fraction", "expected less than 0.9 together"),
    ("both_phases_zero_epochs", dict(tables="[train.feature_extraction]\nepochs = 0\n"
                                            "[train.fine_tune]\nepochs = 0"),
     "train", "both phases have 0 epochs; nothing would be trained"),
    ("unknown_per_format", dict(tables="[validate.per_format.tflite_int16]\nmin_agreement = 0.9"),
     "validate.per_format.tflite_int16", "unknown name; did you mean 'tflite_int8'?"),
    ("unknown_per_format_far", dict(tables="[validate.per_format.coreml]\nmin_agreement = 0.9"),
     "validate.per_format.coreml",
     "unknown name; expected one of keras, tflite_fp32, tflite_fp16, tflite_dynamic, "
     "tflite_int8, onnx_fp32, onnx_fp16, onnx_int8, openvino_fp32, openvino_fp16, "
     "openvino_int8, savedmodel_fp32"),
    ("unknown_key_in_per_format", dict(tables="[validate.per_format.onnx_fp32]\n"
                                              "max_abs_dif = 0.1"),
     "validate.per_format.onnx_fp32.max_abs_dif", "unknown key; did you mean 'max_abs_diff'?"),
    ("per_format_out_of_range", dict(tables="[validate.per_format.tflite_int8]\n"
                                            "min_agreement = 1.5"),
     "validate.per_format.tflite_int8.min_agreement", "expected at most 1.0, found 1.5"),
    ("per_format_not_a_table", dict(tables="[validate.per_format]\ntflite_int8 = 0.5"),
     "validate.per_format.tflite_int8", "expected a table, found 0.5"),
    ("unknown_tflite_precision", dict(tables='[export]\ntflite = ["fp32", "int4"]'),
     "export.tflite[1]", "expected one of 'fp32', 'fp16', 'dynamic', 'int8', found 'int4'"),
    ("misspelt_tflite_precision", dict(tables='[export]\ntflite = ["in8"]'),
     "export.tflite[0]", "found 'in8'; did you mean 'int8'?"),
    ("unknown_onnx_precision", dict(tables='[export]\nonnx = ["dynamic"]'),
     "export.onnx[0]", "expected one of 'fp32', 'fp16', 'int8', found 'dynamic'"),
    ("unknown_runtime", dict(tables='[bench]\nruntimes = ["tflite"]'),
     "bench.runtimes[0]", "found 'tflite'"),
    ("no_runtimes", dict(tables="[bench]\nruntimes = []"),
     "bench.runtimes", "expected at least one runtime"),
    ("unknown_shape", dict(data='synthetic = { classes = ["circle", "circel"] }'),
     "data.synthetic.classes[1]", "found 'circel'; did you mean 'circle'?"),
    ("one_shape", dict(data='synthetic = { classes = ["circle", "circle"] }'),
     "data.synthetic.classes", "expected at least 2 different classes"),
    ("bad_name", dict(name="my run"),
     "name", "expected letters, digits, '_', '-' or '.' (not starting with '.'), found 'my run'"),
    # a name is one folder inside models/: never the folder above it, nor a hidden one
    ("dots_name", dict(name=".."), "name", "found '..'"),
    ("hidden_name", dict(name=".run"), "name", "not starting with '.'"),
]


@pytest.mark.parametrize("parts, keypath, fragment",
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_impossible_value_is_reported_at_its_key(tmp_path, parts, keypath, fragment):
    problems = problems_of(tmp_path, recipe_text(**parts))
    assert fragment in the_problem(problems, keypath)
    assert len(problems) == 1, problems  # nothing else in these recipes is wrong


def test_missing_required_keys(tmp_path):
    problems = problems_of(tmp_path, 'description = "no name, no data"\n')
    assert problems == [
        "name: is required (a name for the run: letters, digits, '_', '-' or '.')",
        "data: is required (the [data] table)"]


def test_weights_recipe_cannot_name_itself(tmp_path):
    text = recipe_text(tables='[model]\nweights = "self.toml"')
    problem = the_problem(problems_of(tmp_path, text, name="self.toml"), "model.weights")
    assert problem == "model.weights: a recipe cannot take its weights from itself"


def test_weights_recipe_naming_itself_through_another_path(tmp_path):
    text = recipe_text(tables='[model]\nweights = "../recipes/./self.toml"')
    problem = the_problem(problems_of(tmp_path / "recipes", text, name="self.toml"),
                          "model.weights")
    assert "cannot take its weights from itself" in problem


# ---- relative paths ----------------------------------------------------------------------

@pytest.mark.parametrize("written, expected", [
    ("images", "recipes/images"),           # a bare folder name is a path too
    ("data/flowers", "recipes/data/flowers"),
    ("../shared/flowers", "shared/flowers"),
])
def test_data_path_is_relative_to_the_recipe_file(tmp_path, monkeypatch, written, expected):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / expected).mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    path = write(tmp_path / "recipes", recipe_text(source="folder", data=f'path = "{written}"'))
    recipe = load_recipe(path)
    assert recipe.data.path == str((tmp_path / expected).resolve())
    assert recipe.path == str(path.resolve())


def test_npz_path_is_relative_to_the_recipe_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "a" / "b", recipe_text(source="npz", data='path = "arrays.npz"'))
    (tmp_path / "a" / "b" / "arrays.npz").write_bytes(b"")
    recipe = load_recipe(path.relative_to(tmp_path))  # a relative recipe path as well
    assert recipe.data.path == str((tmp_path / "a" / "b" / "arrays.npz").resolve())


def test_absolute_data_path_is_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = (tmp_path / "abs" / "images").resolve()
    target.mkdir(parents=True)
    recipe = load(tmp_path / "recipes", recipe_text(source="folder", data=f'path = "{target}"'))
    assert recipe.data.path == str(target)


@pytest.mark.parametrize("written, file", [
    ("best.h5", "recipes/best.h5"),
    ("best.weights.h5", "recipes/best.weights.h5"),
    ("../weights/best.keras", "weights/best.keras"),
    ("other.toml", "recipes/other.toml"),
])
def test_weights_path_is_relative_to_the_recipe_file(tmp_path, monkeypatch, written, file):
    (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / file).write_bytes(b'name = "other"\n[data]\nsource = "synthetic"\n'
                                  if file.endswith(".toml") else b"")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write(tmp_path / "recipes", recipe_text(tables=f'[model]\nweights = "{written}"'))
    assert load_recipe(path).model.weights == str((tmp_path / file).resolve())


def test_weights_file_next_to_cwd_but_not_to_the_recipe_is_missing(tmp_path, monkeypatch):
    # The file exists relative to the current directory only: that must not be enough.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "best.h5").write_bytes(b"")
    path = write(tmp_path / "recipes", recipe_text(tables='[model]\nweights = "best.h5"'))
    with pytest.raises(RecipeError) as raised:
        load_recipe(path)
    problem = the_problem(raised.value.problems, "model.weights")
    assert problem.startswith(
        f"model.weights: no such file '{(tmp_path / 'recipes' / 'best.h5').resolve()}'")


@pytest.mark.parametrize("keyword", ["imagenet", "none"])
def test_weights_keywords_are_not_paths(tmp_path, keyword):
    recipe = load(tmp_path, recipe_text(tables=f'[model]\nweights = "{keyword}"'))
    assert recipe.model.weights == keyword


# ---- unreadable files --------------------------------------------------------------------

def test_missing_file_is_a_recipe_error_naming_it(tmp_path):
    path = tmp_path / "nowhere" / "absent.toml"
    with pytest.raises(RecipeError) as raised:
        load_recipe(path)
    assert raised.value.path == str(path)
    assert str(raised.value).startswith(f"{path}: no such recipe file")


def test_a_folder_is_not_a_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path)


def test_invalid_toml_is_a_recipe_error_naming_file_and_line(tmp_path):
    path = write(tmp_path, 'name = "probe"\n[data]\nsource = synthetic\n')
    with pytest.raises(RecipeError) as raised:
        load_recipe(path)
    assert raised.value.path == str(path)
    assert len(raised.value.problems) == 1
    assert raised.value.problems[0].startswith("not valid TOML: ")
    assert "line 3" in raised.value.problems[0]
    assert str(raised.value).startswith(f"{path}: not valid TOML")


def test_duplicate_table_is_invalid_toml(tmp_path):
    path = write(tmp_path, recipe_text() + '[data]\nsource = "npz"\n')
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(path)


def test_file_that_is_not_utf8_is_a_recipe_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(recipe_text(top='description = "café"').encode("latin-1"))
    with pytest.raises(RecipeError) as raised:
        load_recipe(path)
    assert raised.value.path == str(path)
    assert raised.value.problems[0].startswith("not valid TOML")


# ---- hash --------------------------------------------------------------------------------

def test_hash_is_stable_and_ignores_layout(tmp_path):
    text = recipe_text(data="batch_size = 16\nimage_size = [48, 48]",
                       tables="[model]\nbackbone = \"mobilenet_v2\"\nalpha = 0.5")
    same = ('# the same recipe, written differently\n'
            '[model]\nalpha = 0.5   # a comment\n\n'
            '[data]\nimage_size = [ 48, 48 ]\nbatch_size = 16\nsource = "synthetic"\n')
    first = load(tmp_path / "one", text)
    again = load(tmp_path / "one", text)
    # top-level keys must come before the first table; put `name` there
    reordered = load(tmp_path / "one", 'name = "probe"\n' + same)
    digest = first.hash()
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert digest == again.hash() == reordered.hash()
    assert first.hash("data", "model") == reordered.hash("model", "data")


def test_hash_is_the_same_in_another_process(tmp_path):
    path = write(tmp_path, recipe_text(tables="[validate.per_format.tflite_int8]\n"
                                              "min_agreement = 0.8"))
    code = f"from tledge.recipe.load import load_recipe; print(load_recipe({str(path)!r}).hash())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONHASHSEED": "123", "PATH": ""}, check=True)
    assert result.stdout.strip() == load_recipe(path).hash()


@pytest.mark.parametrize("data, tables, changed", [
    ("batch_size = 16", "", "data"),
    ("", "[model]\ndropout = 0.3", "model"),
    ("", "[train.fine_tune]\nunfreeze = 31", "train"),
    ("", "[validate.per_format.keras]\nmax_abs_diff = 0.001", "validate"),
    ("", "[bench]\nthreads = [1]", "bench"),
])
def test_hash_changes_when_a_value_changes(tmp_path, data, tables, changed):
    base = load(tmp_path / "base", recipe_text())
    other = load(tmp_path / "other", recipe_text(data=data, tables=tables))
    assert other.hash() != base.hash()
    assert other.hash(changed) != base.hash(changed)
    unchanged = [name for name in ("data", "model", "train", "validate", "bench")
                 if name != changed]
    assert other.hash(*unchanged) == base.hash(*unchanged)


def test_hash_changes_with_the_name(tmp_path):
    assert load(tmp_path, recipe_text()).hash() != load(tmp_path, recipe_text(name="p2")).hash()


# ---- dump_toml round trip ----------------------------------------------------------------

def tricky_recipe(folder: Path) -> Path:
    """A recipe that exercises what dump_toml must write back: every kind of value."""
    (folder / "weights").mkdir(parents=True)
    (folder / "weights" / "start.weights.h5").write_bytes(b"")
    text = recipe_text(
        source="folder",
        top=('description = "quotes \\" back\\\\slash\\ttab\\nnewline é ü 日本 😀 \\u007f"\n'
             "seed = 7"),
        data="""
            path = "images"
            image_size = [40, 56]
            augment = { flip = "horizontal_and_vertical", rotation = 0.125 }
        """,
        tables="""
            [model]
            backbone = "mobilenet_v2"
            alpha = 0.35
            weights = "../weights/start.weights.h5"
            [train.feature_extraction]
            epochs = 0
            learning_rate = 1e-7
            [train.fine_tune]
            unfreeze = "block_13_expand"
            [export]
            tflite = ["int8"]
            onnx = []
            [validate]
            max_accuracy_drop = 0.02
            [validate.per_format.tflite_int8]
            min_agreement = 0.85
            max_abs_diff = 2e-3
            [validate.per_format.keras]
            max_accuracy_drop = 0
            [bench]
            threads = [1, 2, 4]
            batch_sizes = [1, 8]
            min_seconds = 0.25
        """)
    (folder / "recipes" / "images").mkdir(parents=True, exist_ok=True)
    return write(folder / "recipes", text)


@pytest.mark.parametrize("source", SHIPPED + ["tricky"],
                         ids=[path.name for path in SHIPPED] + ["tricky"])
def test_dump_toml_round_trips(tmp_path, monkeypatch, source):
    path = tricky_recipe(tmp_path / "src") if source == "tricky" else source
    recipe = load_recipe(path)
    text = dump_toml(recipe.to_dict())
    # the run directory keeps the resolved recipe somewhere else, read from somewhere else
    monkeypatch.chdir(tmp_path)
    stored = write(tmp_path / "models" / "run", text)
    again = load_recipe(stored)
    assert again.to_dict() == recipe.to_dict()
    assert again.hash() == recipe.hash()
    assert dump_toml(again.to_dict()) == text


def test_round_trip_keeps_the_tricky_values(tmp_path):
    recipe = load_recipe(tricky_recipe(tmp_path))
    again = load_recipe(write(tmp_path / "copy", dump_toml(recipe.to_dict())))
    assert again.description.endswith("日本 😀 \x7f") and '"' in again.description
    assert again.train.fine_tune.unfreeze == "block_13_expand"
    assert again.train.feature_extraction.learning_rate == 1e-7
    assert again.export.onnx == ()
    assert again.validate.per_format["tflite_int8"].min_agreement == 0.85
    assert again.validate.per_format["tflite_int8"].max_accuracy_drop is None
    assert again.data.path == str((tmp_path / "recipes" / "images").resolve())


def test_to_dict_is_plain_toml_data(tmp_path):
    data = load_recipe(tricky_recipe(tmp_path)).to_dict()
    assert "path" not in data  # where the file came from is not part of the recipe
    assert data["data"]["image_size"] == [40, 56]
    assert data["validate"]["per_format"] == {
        "tflite_int8": {"min_agreement": 0.85, "max_abs_diff": 0.002},
        "keras": {"max_accuracy_drop": 0.0}}

    def plain(value):
        if isinstance(value, dict):
            return all(isinstance(key, str) and plain(item) for key, item in value.items())
        if isinstance(value, list):
            return all(plain(item) for item in value)
        return isinstance(value, (str, int, float, bool))
    assert plain(data)


# ---- tolerance precedence ----------------------------------------------------------------

@pytest.mark.parametrize("format_name", list(FORMATS))
def test_tolerance_defaults_come_from_the_format_table(tmp_path, format_name):
    recipe = load(tmp_path, recipe_text())
    assert recipe.validate.tolerance(format_name) == dict(FORMATS[format_name].tolerance)


def test_tolerance_per_format_beats_top_level_beats_default(tmp_path):
    recipe = load(tmp_path, recipe_text(tables="""
        [validate]
        max_accuracy_drop = 0.02
        min_agreement = 0.95
        [validate.per_format.tflite_int8]
        min_agreement = 0.8
    """))
    int8, fp32 = FORMATS["tflite_int8"].tolerance, FORMATS["tflite_fp32"].tolerance
    assert 0.8 not in (int8["min_agreement"], 0.95) and fp32["max_abs_diff"] != int8["max_abs_diff"]
    assert recipe.validate.tolerance("tflite_int8") == {
        "max_accuracy_drop": 0.02,                  # top level
        "min_agreement": 0.8,                       # its own table
        "max_abs_diff": int8["max_abs_diff"]}       # the format's default
    assert recipe.validate.tolerance("tflite_fp32") == {
        "max_accuracy_drop": 0.02, "min_agreement": 0.95,
        "max_abs_diff": fp32["max_abs_diff"]}


def test_tolerance_per_format_zero_is_kept(tmp_path):
    # 0.0 is a setting, not "unset": it must not fall through to the top level or the default
    recipe = load(tmp_path, recipe_text(tables="""
        [validate]
        max_accuracy_drop = 0.05
        [validate.per_format.onnx_fp32]
        max_accuracy_drop = 0.0
        max_abs_diff = 0
    """))
    tolerance = recipe.validate.tolerance("onnx_fp32")
    assert tolerance["max_accuracy_drop"] == 0.0 and tolerance["max_abs_diff"] == 0.0
    assert recipe.validate.tolerance("tflite_fp32")["max_accuracy_drop"] == 0.05


def test_tolerance_does_not_change_the_format_table(tmp_path):
    before = {name: dict(row.tolerance) for name, row in FORMATS.items()}
    recipe = load(tmp_path, recipe_text(tables="[validate]\nmin_agreement = 0.5"))
    for name in FORMATS:
        recipe.validate.tolerance(name)
    assert {name: dict(row.tolerance) for name, row in FORMATS.items()} == before
