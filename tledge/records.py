"""A run's records of results, each read one way: one reader and one type per record.

    read_parity(run)   -> Parity | None     parity.json: `ParityRow`s (`tledge.parity`)
    read_bench(run)    -> Bench | None      bench.json: `BenchRow`s (`tledge.core.timing`), the pick
    read_devices(run)  -> {name: DeviceResult}   devices.json: a device's `BenchRow`s and
                                            `DeviceCheck`s (`tledge bench --import`)
    read_history(run)  -> dict | None       history.json: the train stage's phases and verdict
    read_domains(run)  -> {name: result}    domains.json: `tledge evaluate`'s results

A record that is missing reads as None (or {}); a damaged one is a one-line RunDirError, for
every caller alike: a caller that can do without it (a sibling run's record) catches that.

`tledge.rundir.read_record` checks that a record has the shape tledge writes; the readers here
turn it into typed rows (a row with a key tledge does not write is the same one-line
RunDirError), with the helpers every caller needs, so that no caller picks a row or a default
of its own:

    parity = read_parity(run_dir)          # None before validate ran
    parity.own("tflite_int8")              # the row in the artifact's own runtime
    parity.find("onnx_int8", "openvino")   # a row of one (artifact, runtime) pair
    parity.reference                       # the Keras model's own row
    parity.per_class("keras")              # accuracy per class, None for a class with no image
    parity.task("onnx_int8", "colour")     # one task's figures of a multi-task artifact

Figures are computed by `tledge.core.metrics`, never here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tledge.core.metrics import per_class_accuracy
from tledge.core.timing import BenchRow
from tledge.errors import first_line, RunDirError
from tledge.parity import ParityRow
from tledge.rundir import BENCH, DEVICES, DOMAINS, HISTORY, PARITY, read_record


@dataclasses.dataclass
class Parity:
    """parity.json: every (artifact, runtime) pair judged on `images` images of `split`.

    Rows come in the order validate wrote them: an artifact's row in its own runtime first,
    then its rows in the other runtimes that run it."""
    split: str
    images: int
    rows: list  # [ParityRow]

    def own_rows(self) -> dict:
        """{artifact: its row in its own runtime}."""
        own = {}
        for row in self.rows:
            own.setdefault(row.artifact, row)
        return own

    def own(self, artifact: str) -> ParityRow | None:
        """The artifact's row in its own runtime (the one the pick and the report judge)."""
        return self.own_rows().get(artifact)

    def is_own(self, row: ParityRow) -> bool:
        return self.own(row.artifact) is row

    def find(self, artifact: str, runtime: str) -> ParityRow | None:
        return next((row for row in self.rows
                     if (row.artifact, row.runtime) == (artifact, runtime)), None)

    @property
    def reference(self) -> ParityRow | None:
        """The Keras model's own row (status "reference")."""
        return next((row for row in self.rows if row.status == "reference"), None)

    @property
    def failed(self) -> list:
        return [row for row in self.rows if row.status == "failed"]

    @property
    def insufficient(self) -> list:
        """Rows that met their thresholds on too few images to show them."""
        return [row for row in self.rows if row.status == "insufficient"]

    def per_class(self, artifact: str) -> list:
        """Accuracy per class of the artifact's own row (None for a class with no image);
        [] where the row has no confusion matrix."""
        row = self.own(artifact)
        return per_class_accuracy(row.confusion) if row and row.confusion else []

    def task(self, artifact: str, name: str) -> dict | None:
        """One task's figures of a multi-task artifact's own row."""
        row = self.own(artifact)
        return (row.tasks or {}).get(name) if row else None

    def to_json(self) -> dict:
        return {"split": self.split, "images": self.images,
                "rows": [row_json(row) for row in self.rows]}


def row_json(row: ParityRow) -> dict:
    """A parity row as parity.json keeps it (`tasks` and `evidence` only where they are)."""
    data = dataclasses.asdict(row)
    for key in ("tasks", "evidence"):
        if data.get(key) is None:
            data.pop(key)
    return data


def read_parity(folder) -> Parity | None:
    """The parity record of a run directory (or a sub-run's), None before validate wrote it;
    a one-line RunDirError naming the command to rerun when it is not what tledge writes."""
    path = Path(folder) / PARITY
    if not path.is_file():
        return None
    data = read_record(path)
    with _rows_of(path, f"tledge validate {path.parent}"):
        return Parity(data["split"], data["images"],
                      [typed(ParityRow, row) for row in data["rows"]])


_KINDS = {"str": (str,), "int": (int,), "float": (int, float), "dict": (dict,),
          "list": (list,), "bool": (bool,)}


def typed(cls, row):
    """`cls(**row)` for a row dataclass, its values checked against the field's annotation
    (a number where a number is written, text where text is): TypeError otherwise, which the
    readers turn into one line. A row that reads is then one every consumer can format."""
    if not isinstance(row, dict):
        raise TypeError(f"a row is a JSON {type(row).__name__}, not an object")
    for field in dataclasses.fields(cls):
        if field.name not in row:
            continue
        value = row[field.name]
        names = [part.strip() for part in str(field.type).split("|")]
        if value is None and "None" in names:
            continue
        kinds = tuple(kind for name in names if name != "None"
                      for kind in _KINDS.get(name, (object,)))
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise TypeError(f"'{field.name}' is a JSON {type(value).__name__}, not "
                            f"{' or '.join(names)}")
    return cls(**row)


class _rows_of:
    """A row with keys tledge does not write (TypeError from the row's dataclass) is a
    one-line RunDirError naming the command that writes the record again."""

    def __init__(self, path, command):
        self.path, self.command = path, command

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if kind is not None and issubclass(kind, (TypeError, AttributeError)):
            raise RunDirError(f"{self.path} is not what tledge writes ({first_line(error)}); "
                              f"run `{self.command}` again") from None
        return False


@dataclasses.dataclass
class Bench:
    """bench.json: every combination timed on this machine, and the pick."""
    rows: list  # [BenchRow]
    pick: dict | None = None  # what `tledge.bench.stage.choose` picked (None: nothing qualified)
    settings: dict = dataclasses.field(default_factory=dict)
    machine: dict = dataclasses.field(default_factory=dict)  # `tledge.core.machine` facts
    flops_per_image: float | None = None
    single_task: list = dataclasses.field(default_factory=list)  # a multi-task run's models

    def timed(self, artifact: str | None = None, runtime: str | None = None) -> list:
        """The rows that ran ("ok"), of one artifact and runtime where given."""
        return [row for row in self.rows if row.status == "ok"
                and artifact in (None, row.artifact) and runtime in (None, row.runtime)]

    @property
    def isolated(self) -> bool:
        """Whether each row ran in a process of its own (its peak memory is its own)."""
        return self.settings.get("isolate", True) is not False


def read_bench(folder) -> Bench | None:
    """The bench record of a run directory (or a sub-run's), None before bench wrote it."""
    path = Path(folder) / BENCH
    if not path.is_file():
        return None
    data = read_record(path)
    if "pick" not in data:
        raise RunDirError(f"{path} is not what tledge writes (it has no pick); run "
                          f"`tledge bench {path.parent}` again")
    pick = data["pick"]
    if pick is not None and not (isinstance(pick, dict) and isinstance(pick.get("artifact"), str)):
        raise RunDirError(f"{path} is not what tledge writes (its pick names no artifact); run "
                          f"`tledge bench {path.parent}` again")
    with _rows_of(path, f"tledge bench {path.parent}"):
        return Bench([typed(BenchRow, row) for row in data["rows"]], pick,
                     _table(data.get("settings")), _table(data.get("machine")),
                     data.get("flops_per_image"), list(data.get("single_task") or []))


@dataclasses.dataclass
class DeviceCheck:
    """A device's check of one artifact on the bundled images against the build machine's
    outputs (`tledge.core.device.compare_outputs`), or why it could not run (`error`)."""
    artifact: str
    runtime: str
    images: int | None = None
    accuracy: float | None = None
    host_accuracy: float | None = None
    agreement_with_host: float | None = None  # a multi-task artifact's: its lowest task's
    max_difference: float | None = None
    difference_unit: str = ""
    flipped: list = dataclasses.field(default_factory=list)
    flipped_count: int = 0
    error: str | None = None


@dataclasses.dataclass
class DeviceResult:
    """One device's result.json as `tledge bench --import` stored it."""
    name: str
    device: dict  # the device's facts (`tledge.core.machine`), its runtimes' versions
    rows: list  # [BenchRow]
    checks: list  # [DeviceCheck]
    artifacts: dict  # {artifact: sha256 of the file it measured}
    settings: dict = dataclasses.field(default_factory=dict)
    measured: str | None = None
    bundle: dict | None = None

    def check(self, artifact: str) -> DeviceCheck | None:
        return next((check for check in self.checks if check.artifact == artifact), None)

    def stale(self, checksums: dict) -> list:
        """The artifacts it measured whose file the run has re-exported since."""
        return sorted(name for name, digest in self.artifacts.items()
                      if checksums.get(name) != digest)

    def to_json(self) -> dict:
        return {"device": self.device, "settings": self.settings,
                "rows": [dataclasses.asdict(row) for row in self.rows],
                "accuracy": [{key: value for key, value in dataclasses.asdict(check).items()
                              if check.error is None or key in ("artifact", "runtime", "error")}
                             for check in self.checks],
                "artifacts": self.artifacts, "measured": self.measured, "bundle": self.bundle}


def read_devices(folder) -> dict:
    """{device name: DeviceResult} of a run directory ({} before any was imported)."""
    path = Path(folder) / DEVICES
    if not path.is_file():
        return {}
    found = {}
    for name, result in read_record(path)["devices"].items():
        problems = device_problems(result)
        if problems:
            raise RunDirError(f"{path} is not what tledge writes ({name}: {problems[0]}); import "
                              f"the device's result again (`tledge bench {path.parent} --import "
                              "RESULT`) or delete the file")
        found[name] = device_result(name, result)
    return found


def device_result(name: str, result: dict) -> DeviceResult:
    """A stored device result as its type (`device_problems` of it must be empty)."""
    return DeviceResult(
        name, result["device"], [typed(BenchRow, row) for row in result["rows"]],
        [DeviceCheck(**check) for check in result.get("accuracy") or []],
        result["artifacts"], _table(result.get("settings")), result.get("measured"),
        result.get("bundle"))


_DEVICE_TEXT = ("name", "cpu", "isa", "arch", "system", "python", "model", "emulated")
_CHECK_NUMBERS = ("accuracy", "host_accuracy", "agreement_with_host", "max_difference")


def device_problems(result) -> list:
    """Every way one stored device result is not what the report and the pick can read: what
    `tledge bench --import` refuses before it lands, and what reading refuses after."""
    if not isinstance(result, dict):
        return [f"a device result is a JSON object, found {_shown(result)}"]
    problems = []
    device = result.get("device")
    if not isinstance(device, dict):
        problems.append(f"device: expected an object, found {_shown(device)}")
        device = {}
    for key in _DEVICE_TEXT:
        if device.get(key) is not None and not isinstance(device[key], str):
            problems.append(f"device.{key}: expected text, found {_shown(device[key])}")
    cores = device.get("cores")
    if cores is not None and (not isinstance(cores, int) or isinstance(cores, bool)):
        problems.append(f"device.cores: expected a whole number, found {_shown(cores)}")
    runtimes = device.get("runtimes", {})
    if not _text_table(runtimes):
        problems.append("device.runtimes: expected {module: version} as text, found "
                        f"{_shown(runtimes)}")
    if not _text_table(result.get("artifacts")):
        problems.append("artifacts: expected {artifact: sha256} as text, found "
                        f"{_shown(result.get('artifacts'))}")
    if result.get("measured") is not None and not isinstance(result["measured"], str):
        problems.append(f"measured: expected text, found {_shown(result['measured'])}")
    rows = result.get("rows")
    if not isinstance(rows, list):
        problems.append(f"rows: expected a list, found {_shown(rows)}")
        rows = []
    for number, row in enumerate(rows):
        try:
            typed(BenchRow, row)
        except TypeError as error:  # not an object, a key tledge does not write, a wrong type
            problems.append(f"rows[{number}]: {first_line(error)}")
    checks = result.get("accuracy") or []
    if not isinstance(checks, list):
        problems.append(f"accuracy: expected a list, found {_shown(checks)}")
        checks = []
    for number, check in enumerate(checks):
        where = f"accuracy[{number}]"
        try:
            check = DeviceCheck(**check)
        except TypeError as error:
            problems.append(f"{where}: {first_line(error)}")
            continue
        if not isinstance(check.artifact, str):
            problems.append(f"{where}.artifact: expected text, found {_shown(check.artifact)}")
        for key in _CHECK_NUMBERS:
            value = getattr(check, key)
            if value is not None and (not isinstance(value, (int, float))
                                      or isinstance(value, bool)):
                problems.append(f"{where}.{key}: expected a number, found {_shown(value)}")
        if not isinstance(check.flipped, list) or not all(
                isinstance(flip, dict) and {"image", "build", "device"} <= set(flip)
                for flip in check.flipped):
            problems.append(f"{where}.flipped: expected a list of {{image, build, device}}")
        if not isinstance(check.flipped_count, int) or isinstance(check.flipped_count, bool):
            problems.append(f"{where}.flipped_count: expected a whole number, found "
                            f"{_shown(check.flipped_count)}")
    return problems


def _text_table(value) -> bool:
    return isinstance(value, dict) and all(isinstance(key, str) and isinstance(item, str)
                                           for key, item in value.items())


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_history(folder) -> dict | None:
    """The train stage's history.json (phases and their epochs, the verdict, the test
    accuracy; a baseline's, an ensemble's or an adaptation's figures), None before training."""
    path = Path(folder) / HISTORY
    return read_record(path) if path.is_file() else None


def read_domains(folder) -> dict:
    """{domain name: its evaluation} from domains.json ({} before any evaluation)."""
    path = Path(folder) / DOMAINS
    return read_record(path)["domains"] if path.is_file() else {}


READERS = {PARITY: read_parity, BENCH: read_bench, DEVICES: read_devices,
           HISTORY: read_history, DOMAINS: read_domains}


def check_record(path) -> None:
    """Read a run record as its one reader does (a results record into its typed rows, any
    other through `read_record`): a RunDirError when it is not what tledge writes."""
    path = Path(path)
    reader = READERS.get(path.name)
    if reader is not None:
        if not path.is_file():
            read_record(path)  # says it is missing, as for any record
        reader(path.parent)
    else:
        read_record(path)


def _table(value) -> dict:
    return value if isinstance(value, dict) else {}
