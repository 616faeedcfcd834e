"""What a recipe is: one frozen dataclass per TOML table, each key with its default, type,
bounds and help (the schema reads them). Loading and checking live in `tledge.recipe.load`
and `tledge.recipe.rules`; writing a recipe back as TOML in `tledge.recipe.dump`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from types import MappingProxyType
from typing import Any

from tledge.backbones import BACKBONES
from tledge.data.synthetic import (BACKGROUNDS, COLOURS, DEFAULT_DOMAIN, PALETTES, SHAPES,
                                   SIZES)
from tledge.formats import FORMATS, precisions, RUNTIME_NAMES
from tledge.schema import option, to_dict

SOURCES = ("synthetic", "folder", "csv", "npz", "cifar10")
BAD_IMAGE_POLICIES = ("error", "skip")
FLIPS = ("none", "horizontal", "vertical", "horizontal_and_vertical")
HEADS = ("new", "keep")


def _backbone_names():  # called when a recipe is checked: a backbone registered later counts
    return tuple(BACKBONES)


def _synthetic_names():
    return SHAPES


def _tflite_precisions():
    return precisions("tflite")


def _onnx_precisions():
    return precisions("onnx")


def _openvino_precisions():
    return precisions("openvino")


def _format_names():
    return tuple(FORMATS)


def _runtime_names():
    return RUNTIME_NAMES


@dataclasses.dataclass(frozen=True)
class AugmentRecipe:
    """Random changes to training images only; never to calibration, validation or test."""

    flip: str = option("none", choices=FLIPS, help="random flips during training")
    rotation: float = option(0.0, minimum=0.0, maximum=0.5,
                             help="random rotation, as a fraction of a full turn")
    zoom: float = option(0.0, minimum=0.0, maximum=0.9, help="random zoom, as a fraction")
    translation: float = option(0.0, minimum=0.0, maximum=0.5,
                                help="random shift, as a fraction of height and width")
    contrast: float = option(0.0, minimum=0.0, maximum=1.0, help="random contrast factor")
    brightness: float = option(0.0, minimum=0.0, maximum=1.0,
                               help="random brightness change, as a fraction of 255")

    @property
    def active(self) -> bool:
        return self.flip != "none" or any((self.rotation, self.zoom, self.translation,
                                           self.contrast, self.brightness))


@dataclasses.dataclass(frozen=True)
class DomainRecipe:
    """How the generated world looks. One recipe trains on one domain and another evaluates or
    adapts on a second: the same classes, another camera, light or factory line."""
    palette: str = option("any", choices=PALETTES,
                          help="colours: any | warm | cool | grey | dark | light")
    background: str = option("flat", choices=BACKGROUNDS,
                             help="flat | texture (random stripes behind the shape)")
    contrast: float = option(1.0, minimum=0.05, maximum=2.0,
                             help="each image's contrast about its mean colour (1: as drawn)")
    brightness: float = option(0.0, minimum=-0.8, maximum=0.8,
                               help="every pixel moved by this x 255")
    blur: float = option(0.0, minimum=0.0, maximum=8.0, help="gaussian blur, sigma in pixels")


@dataclasses.dataclass(frozen=True)
class SyntheticRecipe:
    classes: tuple[str, ...] = option(
        ("circle", "square", "triangle", "cross", "ring", "star", "hbars", "checker"),
        choices=_synthetic_names, help="which generated shapes are the classes")
    samples_per_class: int = option(60, minimum=4, help="images generated per class")
    noise: float = option(0.08, minimum=0.0, maximum=1.0, help="pixel noise, 0 to 1")
    domain: DomainRecipe = option(DomainRecipe(), help="[data.synthetic.domain]: the look of "
                                                       "the generated world")
    colours: tuple[str, ...] = option(("red", "green", "blue"), choices=tuple(COLOURS),
                                      help="the classes of a task with labels = \"colour\" "
                                           "(the shape's colour)")
    sizes: tuple[str, ...] = option(SIZES, choices=SIZES,
                                    help="the classes of a task with labels = \"size\"")


@dataclasses.dataclass(frozen=True)
class TaskRecipe:
    """One labelling of the images, answered by one output of the model ([[data.tasks]])."""

    name: str = option(help="the task's name: its output's name in every artifact")
    labels: str = option(help="where its labels come from: a column of the csv source, or "
                              "shape | colour | size for the synthetic source")
    loss_weight: float = option(1.0, minimum=0.0, maximum=1000.0,
                                help="its loss's weight in training")


@dataclasses.dataclass(frozen=True)
class CsvRecipe:
    """Columns of the `csv` source: one row per image."""

    image_column: str = option("image", help="image file path, relative to the CSV file")
    label_column: str = option("label", help="class name of the image (single-task; "
                                              "[[data.tasks]] name their own columns)")
    split_column: str = option("", help="optional: train | val | validation | test per row")


@dataclasses.dataclass(frozen=True)
class DataRecipe:
    source: str = option(choices=SOURCES, help="one of " + ", ".join(SOURCES))
    path: str | None = option(None, path=True,
                              help="a folder (folder source), a .csv file (csv source) or an "
                                   ".npz file (npz source)")
    image_size: tuple[int, int] | None = option(
        None, minimum=8, maximum=1024, help="[height, width]; the backbone's default if unset")
    val_fraction: float = option(0.1, minimum=0.0, maximum=0.5)
    test_fraction: float = option(0.1, minimum=0.0, maximum=0.5)
    batch_size: int = option(32, minimum=1, maximum=4096)
    train_per_class: int = option(0, minimum=0,
                                  help="train on at most this many images per class (0: all), "
                                       "validation and test split as carved: how far a few "
                                       "labels go")
    tasks: tuple[TaskRecipe, ...] = option(
        (), help="[[data.tasks]]: several labellings of each image (csv and synthetic "
                 "sources); the model answers each with an output of its own")
    augment: AugmentRecipe = option(AugmentRecipe())
    synthetic: SyntheticRecipe = option(SyntheticRecipe())
    csv: CsvRecipe = option(CsvRecipe())
    on_bad_image: str = option("error", choices=BAD_IMAGE_POLICIES,
                               help="error: stop and list every unreadable image | skip: leave "
                                    "them out, listed in split.json and the report")
    cache_dir: str | None = option(None, path=True,
                                   help="where prepared data is cached; default "
                                        "$TLEDGE_CACHE_DIR, else ~/.cache/tledge/data")
    workers: int = option(0, minimum=0, maximum=256,
                          help="processes that decode images while preparing; 0: one per core")


@dataclasses.dataclass(frozen=True)
class ModelRecipe:
    backbone: str = option("mobilenet_v2", choices=_backbone_names,
                           help="registry name; see `tledge backbones`")
    alpha: float | None = option(None, minimum=0.1, maximum=2.0,
                                 help="width multiplier (mobilenet backbones only)")
    weights: str = option("imagenet", path="keyword_or_path",
                          help="imagenet | none | a .h5/.keras weights file | a recipe .toml")
    dropout: float = option(0.2, minimum=0.0, maximum=0.9)
    head: str = option("new", choices=HEADS,
                       help="new: a fresh classification head | keep: the head of the model "
                            "that `weights` names (same classes): adapt a trained model to "
                            "another domain with a few labelled images")
    tasks: tuple[str, ...] = option((), help="which of [[data.tasks]] this model answers "
                                             "(default: all of them)")


OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("constant", "cosine", "plateau")


@dataclasses.dataclass(frozen=True)
class PhaseRecipe:
    epochs: int = option(5, minimum=0, maximum=10_000)
    learning_rate: float = option(1e-3, minimum=0.0, maximum=10.0)
    optimizer: str = option("adam", choices=OPTIMIZERS)
    schedule: str = option("constant", choices=SCHEDULES,
                           help="constant | cosine (after warm-up) | plateau (halve on a "
                                "stalled validation loss)")
    warmup_epochs: int = option(0, minimum=0, maximum=1000,
                                help="linear warm-up before a cosine schedule")
    early_stopping: int = option(0, minimum=0, maximum=1000,
                                 help="stop after this many epochs without a better validation "
                                      "accuracy; 0 never stops early")
    label_smoothing: float = option(0.0, minimum=0.0, maximum=0.5)


@dataclasses.dataclass(frozen=True)
class FineTuneRecipe(PhaseRecipe):
    epochs: int = option(5, minimum=0, maximum=10_000)
    learning_rate: float = option(1e-5, minimum=0.0, maximum=10.0)
    unfreeze: int | str | None = option(
        None, minimum=1, help="top layers to unfreeze: a count, a layer name or 'all'; "
                              "the backbone's default_unfreeze if unset")
    batchnorm: str = option("frozen", choices=("frozen", "train"),
                            help="frozen keeps BatchNorm in inference mode (right for small "
                                 "data); train updates its statistics")


@dataclasses.dataclass(frozen=True)
class TrainRecipe:
    feature_extraction: PhaseRecipe = option(PhaseRecipe())
    fine_tune: FineTuneRecipe = option(FineTuneRecipe())
    class_weight: str = option("none", choices=("none", "balanced"),
                               help="balanced weighs each class by the inverse of its count")
    cache_bottlenecks: str = option(
        "auto", choices=("auto", "always", "never"),
        help="train the feature-extraction head on cached backbone features: auto = when "
             "augmentation is off; always = also with augmentation (then not augmented)")
    distribute: str = option("none", choices=("none", "mirrored", "multi_worker"))
    mixed_precision: bool = option(False, help="float16 compute on a GPU; exports stay float32")
    jit_compile: bool = option(False, help="XLA-compile the training step")
    best_by: str = option("mean", help="multi-task: the validation score that picks the best "
                                       "weights: \"mean\" (of the tasks' accuracies) or a "
                                       "task's name")
    compare_single_task: bool = option(
        False, help="multi-task: also train one single-task model per task on the same split, "
                    "and report whether the one multi-task model beats them")


@dataclasses.dataclass(frozen=True)
class BaselineRecipe:
    """A from-scratch model on the same split, to show what the transfer buys."""

    backbone: str = option("small_cnn", choices=_backbone_names)
    epochs: int = option(20, minimum=1, maximum=10_000)
    learning_rate: float = option(1e-3, minimum=0.0, maximum=10.0)
    optimizer: str = option("adam", choices=OPTIMIZERS)
    early_stopping: int = option(0, minimum=0, maximum=1000)


@dataclasses.dataclass(frozen=True)
class ExportRecipe:
    tflite: tuple[str, ...] = option(("fp32", "int8"), choices=_tflite_precisions)
    onnx: tuple[str, ...] = option(("fp32",), choices=_onnx_precisions)
    openvino: tuple[str, ...] = option((), choices=_openvino_precisions,
                                       help="OpenVINO IR folders; int8 through NNCF with "
                                            "accuracy control (needs openvino and nncf)")
    savedmodel: bool = option(False, help="also write a TensorFlow SavedModel folder")
    int8_io: str = option("uint8", choices=("uint8", "int8", "float32"),
                          help="TFLite int8 input/output: uint8 takes raw pixel bytes")
    calibration_samples: int = option(200, minimum=1, maximum=100_000,
                                      help="training images used to calibrate int8")
    int8_repair: str = option("auto", choices=("auto", "off"),
                              help="when an int8 artifact fails parity, try other "
                                   "quantization settings and keep the first that passes")
    int8_repair_attempts: int = option(8, minimum=1, maximum=100,
                                       help="int8 exports tried per format, the first included")
    int8_repair_seconds: float = option(300.0, minimum=0.0, maximum=86_400.0,
                                        help="time after which the int8 search stops")
    int8_repair_images: int = option(500, minimum=0, maximum=100_000,
                                     help="training images held apart from calibration to "
                                          "judge int8 repair candidates on (fewer where the "
                                          "training split cannot spare them; 0: judge on the "
                                          "validation split)")
    int8_float_steps: int = option(4, minimum=0, maximum=5,
                                   help="int8 repair: steps keeping the worst layers in float "
                                        "(1, 2, 4, 8, 16 of them), tried after the "
                                        "int8_repair_attempts, within int8_repair_seconds")
    int8_qat_steps: int = option(300, minimum=0, maximum=100_000,
                                 help="int8 repair, last remedy: steps of a quantization-aware "
                                      "fine-tune distilling the model (0: never), where the "
                                      "int8_repair_seconds left allow it")
    author: str = option("", help="the author named in each .tflite's standard metadata")
    license: str = option("", help="the license named in each .tflite's standard metadata")


@dataclasses.dataclass(frozen=True)
class ToleranceRecipe:
    max_accuracy_drop: float | None = option(None, minimum=0.0, maximum=1.0)
    min_agreement: float | None = option(None, minimum=0.0, maximum=1.0)
    max_abs_diff: float | None = option(None, minimum=0.0, maximum=1.0)


@dataclasses.dataclass(frozen=True)
class ValidateRecipe:
    max_accuracy_drop: float | None = option(
        None, minimum=0.0, maximum=1.0, help="for every artifact, unless its own table says")
    min_agreement: float | None = option(None, minimum=0.0, maximum=1.0)
    max_abs_diff: float | None = option(None, minimum=0.0, maximum=1.0)
    per_format: dict[str, ToleranceRecipe] = option(
        MappingProxyType({}), choices=_format_names,
        help="per-artifact thresholds, e.g. [validate.per_format.tflite_int8]")

    def tolerance(self, format_name: str) -> dict:
        """Thresholds for one artifact: its own table, then the top level, then the default."""
        chosen = dict(FORMATS[format_name].tolerance)
        for source in (self, self.per_format.get(format_name)):
            if source is None:
                continue
            for key in chosen:
                value = getattr(source, key)
                if value is not None:
                    chosen[key] = value
        return chosen


@dataclasses.dataclass(frozen=True)
class BenchRecipe:
    runtimes: tuple[str, ...] = option(("keras", "keras_gpu", "litert", "onnxruntime",
                                        "onnxruntime_cuda", "onnxruntime_tensorrt", "openvino",
                                        "tensorflow"),
                                       choices=_runtime_names)
    threads: tuple[int, ...] = option((2,), minimum=1, maximum=256)
    batch_sizes: tuple[int, ...] = option((1,), minimum=1, maximum=4096)
    warmup: int = option(5, minimum=0, maximum=10_000, help="untimed runs before timing")
    min_runs: int = option(30, minimum=1, maximum=1_000_000)
    min_seconds: float = option(1.0, minimum=0.0, maximum=3600.0)
    isolate: bool = option(True, help="each combination in its own process: memory figures "
                                      "of its own, TensorFlow's thread count honoured")


@dataclasses.dataclass(frozen=True)
class PickRecipe:
    """What the pick optimises among every trained model's artifacts that passed parity."""

    objective: str = option("fastest", choices=("fastest", "most_accurate"),
                            help="fastest (p50 at the first [bench] threads and batch) | "
                                 "most_accurate (accuracy on the evaluation split)")
    max_accuracy_drop: float = option(
        0.0, minimum=0.0, maximum=1.0,
        help="how far below the most accurate model (the transfer or the [baseline]) a "
             "model may be and still ship; 0: only the most accurate model ships")
    max_latency_ms: float | None = option(None, minimum=0.0, maximum=1e6,
                                          help="only artifacts at most this slow (p50)")
    max_size_kb: float | None = option(None, minimum=0.0, maximum=1e9,
                                       help="only artifacts at most this large, in KiB")
    members: bool = option(False, help="an ensemble's inline members are candidates too "
                                       "(each is a run directory in members/)")


TUNE_OBJECTIVES = ("accuracy", "accuracy_and_latency")


@dataclasses.dataclass(frozen=True)
class TuneRecipe:
    """[tune]: what `tledge tune` searches (a space over this recipe's own keys), for what
    (an objective and constraints measured on each trial's exported artifacts) and within
    what (a budget). Each trial is a build of this recipe with the trial's values."""

    space: dict[str, Any] = option(
        MappingProxyType({}),
        help="[tune.space]: a recipe key and what it may be: a list of values "
             "(model.dropout = [0.1, 0.3]) or a range (train.fine_tune.learning_rate = "
             "{ low = 1e-5, high = 1e-3, log = true }; add step = N for a grid)")
    objective: str = option("accuracy", choices=TUNE_OBJECTIVES,
                            help="accuracy (validation accuracy, within the constraints) | "
                                 "accuracy_and_latency (both: a Pareto search)")
    runtime: str = option("litert", choices=_runtime_names,
                          help="where each trial's artifacts are timed")
    threads: int | None = option(None, minimum=1, maximum=256,
                                 help="threads to time at (default: the first of [bench])")
    max_latency_ms: float | None = option(None, minimum=0.0, maximum=1e6,
                                          help="constraint: p50 at most this, on the runtime")
    max_size_kb: float | None = option(None, minimum=0.0, maximum=1e9,
                                       help="constraint: artifact file at most this, in KiB")
    max_memory_mb: float | None = option(None, minimum=0.0, maximum=1e6,
                                         help="constraint: memory the runtime adds while "
                                              "running the artifact, in MiB")
    device: str = option("", help="rank by this imported device's p50 (`tledge bench RUN "
                                  "--import`) where the trial's artifact was run there")
    trials: int = option(20, minimum=1, maximum=100_000,
                         help="trials in the study, all workers together (a resumed study "
                              "counts those done)")
    minutes: float = option(0.0, minimum=0.0, maximum=100_000.0,
                            help="this worker starts no trial after this long (0: no limit)")
    storage: str = option("", help="an Optuna database URL shared by several workers "
                                   "(default: sqlite in the study folder)")
    startup_trials: int = option(4, minimum=0, maximum=10_000,
                                 help="random trials before the sampler models the results")
    pruning: bool = option(True, help="stop a trial whose validation accuracy at an epoch is "
                                      "below the median of the trials before it at that epoch")
    prune_after_trials: int = option(3, minimum=1, maximum=10_000,
                                     help="finished trials before any is pruned")
    prune_after_epochs: int | None = option(
        None, minimum=0, maximum=10_000,
        help="epochs of its deciding phase (fine-tuning, else the first) a trial runs before "
             "it may be pruned (default: half of them; early epochs are noisy)")
    seed_from_doctor: bool = option(True, help="after the recipe as written, try the "
                                               "changes the training doctor names on its "
                                               "curves (one per finding, two at most)")


FUSIONS = ("mean", "weighted", "concat")


@dataclasses.dataclass(frozen=True)
class MemberRecipe:
    """One ensemble member: another recipe, or a model trained inline in this build."""

    recipe: str | None = option(None, path=True, help="another recipe file")
    name: str | None = option(None, help="inline members: a name, unique in the ensemble")
    image_size: tuple[int, int] | None = option(None, minimum=8, maximum=1024)
    model: ModelRecipe = option(ModelRecipe())
    train: TrainRecipe = option(TrainRecipe())


@dataclasses.dataclass(frozen=True)
class ConcatRecipe:
    """The head trained on the members' concatenated features (fusion = "concat")."""

    epochs: int = option(10, minimum=1, maximum=10_000)
    learning_rate: float = option(1e-3, minimum=0.0, maximum=10.0)
    dropout: float = option(0.2, minimum=0.0, maximum=0.9)
    fine_tune_epochs: int = option(0, minimum=0, maximum=10_000,
                                   help="then train the whole fused graph (BatchNorm frozen)")
    fine_tune_learning_rate: float = option(1e-5, minimum=0.0, maximum=10.0)


@dataclasses.dataclass(frozen=True)
class EnsembleRecipe:
    fusion: str = option("mean", choices=FUSIONS,
                         help="mean (soft voting) | weighted (weights fitted on validation) | "
                              "concat (a new head on the members' pooled features)")
    members: tuple[MemberRecipe, ...] = option((), help="[[ensemble.members]] tables")
    concat: ConcatRecipe = option(ConcatRecipe())


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str = option(help="a name for the run: letters, digits, '_', '-' or '.'")
    seed: int = option(0, minimum=0)
    description: str = option("")
    data: DataRecipe = option(help="the [data] table")
    model: ModelRecipe = option(ModelRecipe())
    train: TrainRecipe = option(TrainRecipe())
    baseline: BaselineRecipe | None = option(
        None, help="[baseline] trains a model from scratch beside the transfer model")
    ensemble: EnsembleRecipe | None = option(
        None, help="[ensemble]: this recipe fuses several members into one model")
    export: ExportRecipe = option(ExportRecipe())
    validate: ValidateRecipe = option(ValidateRecipe())
    bench: BenchRecipe = option(BenchRecipe())
    pick: PickRecipe = option(PickRecipe())
    tune: TuneRecipe | None = option(None, help="[tune]: what `tledge tune` searches")
    path: str = ""  # the file it came from; not a recipe key

    @property
    def image_size(self) -> tuple[int, int]:
        return self.data.image_size

    def to_dict(self, paths=None) -> dict:
        """The recipe as plain data; `paths` rewrites its file paths (see `schema.to_dict`)."""
        out = to_dict(self, paths)
        out.pop("path", None)
        if self.ensemble is not None:  # its members carry the models and their training
            out.pop("model", None)
            out.pop("train", None)
            out["ensemble"]["members"] = [
                {"recipe": member["recipe"]} if member.get("recipe") else member
                for member in out["ensemble"]["members"]]
        return out

    def hash(self, *sections: str) -> str:
        """A stable hash of the given top-level sections (all of them when none is given).

        File paths are left out: where a checkout lives is not what a run depends on. What
        the files hold is hashed by the stages that read them (the data's cache key, the
        sha256 of weights files and member models), so a moved or copied checkout hashes
        the same and a changed file does not.
        """
        data = self.to_dict(paths=lambda path: "<file>")
        data.pop("tune", None)  # what `tledge tune` searches; no stage of a build reads it
        for section, key in _NOT_HASHED:  # no stage is redone for these
            data.get(section, {}).pop(key, None)
        members = (data.get("ensemble") or {}).get("members") or []
        for root, keys in [(data, _HASHED_WHEN_SET),  # at their defaults, keys added later
                           *((member, _MEMBER_HASHED_WHEN_SET) for member in members)]:
            for *tables, key, default in keys:  # leave the hash as it was: no run is redone
                table = root
                for name in tables:
                    table = table.get(name) or {}
                if table.get(key) == default:
                    table.pop(key)
        chosen = {key: data.get(key) for key in sections} if sections else data
        text = json.dumps(chosen, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]




# Where and how fast, not what; and the single-task models trained beside a multi-task model,
# which the build adds or removes without training the model again
_NOT_HASHED = (("data", "cache_dir"), ("data", "workers"), ("train", "compare_single_task"))
_HASHED_WHEN_SET = (("data", "synthetic", "domain", DEFAULT_DOMAIN), ("model", "head", "new"),
                    ("data", "train_per_class", 0), ("data", "tasks", []),
                    ("data", "synthetic", "colours", ["red", "green", "blue"]),
                    ("data", "synthetic", "sizes", list(SIZES)), ("model", "tasks", []),
                    ("train", "best_by", "mean"), ("train", "compare_single_task", False),
                    ("export", "int8_repair_images", 500), ("export", "int8_float_steps", 4),
                    ("export", "int8_qat_steps", 300), ("export", "openvino", []))
# An inline ensemble member's model and train tables: the keys added after members were
_MEMBER_HASHED_WHEN_SET = (("model", "tasks", []), ("train", "best_by", "mean"),
                           ("train", "compare_single_task", False))
