"""One training phase: optimizer, schedule, early stopping, best weights, and resume.

`fit_phase` runs `model.fit` for one phase of a recipe and returns a `PhaseResult`. It keeps
the weights of the best epoch by validation accuracy and restores them at the end. With a
checkpoint folder, every epoch is saved (the weights and optimizer state, the epoch table and
the best weights, in .npz and JSON files), so a build killed mid-training restarts from the
last finished epoch, and a finished phase is not run again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np

from tledge.errors import first_line
from tledge.rundir import atomic_path, write_json
from tledge.tasks import score
from tledge.train.multi_worker import fit_across_workers
from tledge.train.phase import (current_learning_rate, learning_rate, make_optimizer, PhaseResult,
                                skipped)

# TensorFlow, Keras and h5py are imported inside the functions that use them: the CLI imports this
# module at start-up, and they take seconds to load.


def compile_for(model, phase, steps_per_epoch, *, jit_compile=False, tasks=()):
    """Cross-entropy and accuracy; with `tasks`, one of each per task's output, the losses
    summed with the tasks' loss weights."""
    import keras

    def loss():
        return keras.losses.CategoricalCrossentropy(label_smoothing=phase.label_smoothing)
    optimizer = make_optimizer(phase.optimizer, learning_rate(phase, steps_per_epoch))
    if len(tasks) > 1:  # a model of one task trains as any one-output model
        names = [task["name"] for task in tasks]
        model.compile(optimizer=optimizer, loss={name: loss() for name in names},
                      loss_weights={task["name"]: task["loss_weight"] for task in tasks},
                      metrics={name: ["accuracy"] for name in names}, jit_compile=jit_compile)
        return
    model.compile(optimizer=optimizer, loss=loss(), metrics=["accuracy"],
                  jit_compile=jit_compile)


def fit_phase(model, name, phase, train_data, val_data, *, train_count, steps_per_epoch,
              initial_epoch=0, checkpoint_dir=None, verbose="auto",
              jit_compile=False, tasks=(), best_by="mean") -> PhaseResult:
    """Compile `model` for `phase` and train it; return what happened, epoch by epoch.

    A multi-task model (`tasks`) is judged by the `best_by` score of its tasks' accuracies
    (`tledge.tasks.score`), logged as its `accuracy` and `val_accuracy` beside each task's.
    """
    import keras
    compile_for(model, phase, steps_per_epoch, jit_compile=jit_compile, tasks=tasks)
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    total = int(model.count_params())
    if phase.epochs == 0:
        return skipped(name, "0 epochs")
    if _across_workers():
        return fit_across_workers(model, name, phase, train_data, val_data,
                                  train_count=train_count, steps_per_epoch=steps_per_epoch,
                                  initial_epoch=initial_epoch,
                                  log=print if verbose else (lambda line: None))
    store = _PhaseStore(checkpoint_dir, name) if checkpoint_dir else None
    if store:
        damage = store.damage()
        if damage:
            warnings.warn(f"the checkpoint of phase {name} in {store.folder} is damaged "
                          f"({damage}; a kill or a full disk?): discarded, the phase starts "
                          "again from its first epoch")
            store.discard()
    if store and store.finished():
        return store.load_finished(model)
    monitor = "val_accuracy" if val_data is not None else "accuracy"
    recorder = _Recorder(monitor, store, name)
    callbacks = [recorder]
    if len(tasks) > 1:  # first: the score must be in the logs before anything reads them
        callbacks.insert(0, _TaskScore([task["name"] for task in tasks], best_by))
    if phase.early_stopping:
        callbacks.append(keras.callbacks.EarlyStopping(monitor=monitor,
                                                       patience=phase.early_stopping))
    if phase.schedule == "plateau":
        callbacks.append(keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss" if val_data is not None else "loss", factor=0.5, patience=2,
            min_lr=phase.learning_rate / 100))
    last_epoch = initial_epoch + phase.epochs
    resume_at = store.restore_backup(model) if store else None
    start = time.perf_counter()
    model.fit(train_data, validation_data=val_data, epochs=last_epoch,
              initial_epoch=initial_epoch if resume_at is None else resume_at,
              callbacks=callbacks, verbose=verbose,
              shuffle=False)  # the dataset shuffles itself; Keras would warn it ignores True
    wall = time.perf_counter() - start + recorder.earlier_seconds
    ran = len(recorder.rows)
    result = PhaseResult(name, recorder.rows, recorder.best_epoch,
                         recorder.best if recorder.weights is not None else None,
                         round(wall, 3), round(train_count * ran / max(wall, 1e-9), 1),
                         trainable, total, stopped_early=ran < phase.epochs,
                         resumed_from_epoch=recorder.resumed_from)
    if recorder.weights is not None:
        model.set_weights(recorder.weights)
    if store:
        store.save_finished(model, result)
    return result


def _across_workers() -> bool:
    """Whether this phase runs under MultiWorkerMirroredStrategy (see tledge.train.multi_worker)."""
    import tensorflow as tf
    return isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy)


class _PhaseStore:
    """Files that let a killed phase resume: the last finished epoch (weights and optimizer
    state), the epoch rows, the best weights, the end.

    Arrays go into .npz files written through `rundir.atomic_path` (which refuses a write the
    disk cannot hold): five times faster than Keras' h5 weights files at MobileNetV2's ~600
    arrays, and no h5py, which can crash the process on a disk that fills under it.
    """

    def __init__(self, folder, name):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.backup_path = self.folder / f"{name}.backup.npz"
        self.state_path = self.folder / f"{name}.state.json"
        self.best_path = self.folder / f"{name}.best.npz"
        self.done_path = self.folder / f"{name}.done.json"
        self.final_path = self.folder / f"{name}.final.npz"

    def files(self) -> list[Path]:
        return [path for path in [self.backup_path, self.state_path, self.best_path,
                                  self.done_path, self.final_path] if path.is_file()]

    def damage(self) -> str | None:
        """What makes this phase's checkpoint unusable (a truncated or garbled file), or None.

        Every JSON file must parse and every .npz file must read in full, each array passing
        its zip checksum, which is what resuming will read.
        """
        for path in self.files():
            try:
                if path.suffix == ".json":
                    json.loads(path.read_text(encoding="utf-8"))
                else:
                    _read_arrays(path)
            except Exception as error:  # zipfile, numpy and the OS raise several kinds
                return f"{path.name}: {first_line(error) or type(error).__name__}"
        return None

    def discard(self) -> None:
        for path in (self.backup_path, self.state_path, self.best_path, self.done_path,
                     self.final_path):
            path.unlink(missing_ok=True)
        self.folder.mkdir(parents=True, exist_ok=True)

    def finished(self) -> bool:
        return self.done_path.is_file() and self.final_path.is_file()

    def load_finished(self, model) -> PhaseResult:
        model.set_weights(_read_arrays(self.final_path)["weights"])
        return PhaseResult(**json.loads(self.done_path.read_text()))

    def save_finished(self, model, result) -> None:
        _write_arrays(self.final_path, weights=model.get_weights())
        write_json(self.done_path, dataclasses.asdict(result))
        self.backup_path.unlink(missing_ok=True)  # the phase is done: nothing to resume

    def read_state(self):
        """The epoch rows and the best weights of a killed run, or None."""
        if self.state_path.is_file() and self.best_path.is_file():
            state = json.loads(self.state_path.read_text())
            return state, _read_arrays(self.best_path)["weights"]
        return None

    def write_state(self, state, best_weights=None) -> None:
        if best_weights is not None:  # a new best epoch
            _write_arrays(self.best_path, weights=best_weights)
        write_json(self.state_path, state)

    def restore_backup(self, model) -> int | None:
        """Put the last finished epoch's weights and optimizer state back into `model`;
        return that epoch (the first to run next), or None where there is no backup."""
        if not self.backup_path.is_file():
            return None
        saved = _read_arrays(self.backup_path)
        optimizer = model.optimizer
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        variables = optimizer.variables
        if len(saved["optimizer"]) != len(variables) or any(
                tuple(value.shape) != tuple(variable.shape)
                for value, variable in zip(saved["optimizer"], variables)):
            warnings.warn(f"the backup {self.backup_path.name} in {self.folder} holds another "
                          "optimizer's state: discarded, the phase starts again from its "
                          "first epoch")
            self.discard()
            return None
        model.set_weights(saved["weights"])
        for variable, value in zip(variables, saved["optimizer"]):
            variable.assign(value)
        return int(saved["epoch"][0])

    def write_backup(self, model, epoch: int) -> None:
        _write_arrays(self.backup_path, weights=model.get_weights(),
                      optimizer=[variable.numpy() for variable in model.optimizer.variables],
                      epoch=[np.array(epoch)])


def _write_arrays(path, **groups) -> None:
    """Named lists of arrays in one .npz file (`name/index` keys), written atomically."""
    arrays = {f"{name}/{index}": np.asarray(value) for name, values in groups.items()
              for index, value in enumerate(values)}
    needed = sum(array.nbytes for array in arrays.values()) + 256 * len(arrays) + 65_536
    with atomic_path(path, needs=needed) as temporary:
        with open(temporary, "wb") as handle:
            np.savez(handle, **arrays)


def _read_arrays(path) -> dict[str, list]:
    """The lists `_write_arrays` wrote, every array read in full (and checksummed)."""
    groups: dict[str, dict[int, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            name, index = key.rsplit("/", 1)
            groups.setdefault(name, {})[int(index)] = data[key]
    return {name: [values[index] for index in range(len(values))]
            for name, values in groups.items()}


class _TaskScore:
    """Puts a multi-task model's score in the epoch's logs as `accuracy`/`val_accuracy`, so
    the best weights, early stopping and the phase verdict all follow the recipe's score."""

    def __new__(cls, names, best_by):
        import keras

        class TaskScore(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if logs is None:
                    return
                for prefix in ("", "val_"):
                    found = {name: logs[f"{prefix}{name}_accuracy"] for name in names
                             if f"{prefix}{name}_accuracy" in logs}
                    if len(found) == len(names):
                        logs[f"{prefix}accuracy"] = score(
                            {name: float(value) for name, value in found.items()}, best_by)

        return TaskScore()


class _Recorder:
    """Records every epoch and keeps the best weights; with a store, saves after each epoch
    what a killed run resumes from (the best weights when they change, the rows, then the
    epoch's own weights and optimizer state)."""

    def __new__(cls, monitor, store, name):
        import keras

        class Recorder(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.rows, self.best, self.best_epoch, self.weights = [], -1.0, None, None
                self.earlier_seconds, self.resumed_from, self._started = 0.0, None, None

            def on_train_begin(self, logs=None):
                self._started = time.perf_counter()
                saved = store.read_state() if store else None
                if saved:  # a killed run: take back its epochs and its best weights
                    state, self.weights = saved
                    self.rows, self.best = state["rows"], state["best"]
                    self.best_epoch, self.earlier_seconds = state["best_epoch"], state["seconds"]
                    self.resumed_from = self.rows[-1]["epoch"] if self.rows else None
                    for row in self.rows:  # a watcher sees the epochs done before too
                        for watcher in list(_WATCHERS):
                            watcher(name, row)

            def on_epoch_end(self, epoch, logs=None):
                logs = logs or {}
                row = {"epoch": epoch + 1, **{key: float(value) for key, value in logs.items()}}
                row["learning_rate"] = current_learning_rate(self.model.optimizer)
                self.rows = [r for r in self.rows if r["epoch"] != row["epoch"]] + [row]
                value = logs.get(monitor)
                improved = value is not None and value > self.best
                if improved:
                    self.best, self.best_epoch = float(value), epoch + 1
                    self.weights = self.model.get_weights()
                if store:
                    seconds = self.earlier_seconds + time.perf_counter() - self._started
                    if self.weights is not None:
                        store.write_state({"rows": self.rows, "best": self.best,
                                           "best_epoch": self.best_epoch, "seconds": seconds},
                                          self.weights if improved else None)
                    store.write_backup(self.model, epoch + 1)
                for watcher in list(_WATCHERS):  # last: the epoch is saved whatever it raises
                    watcher(name, row)

        return Recorder()


_WATCHERS: list = []


@contextlib.contextmanager
def watching_epochs(watcher):
    """Call `watcher(phase name, epoch row)` after each epoch of each phase trained meanwhile,
    once the epoch is recorded (and saved, with a checkpoint folder); an exception it raises
    stops the training there (`tledge tune` prunes a trial so)."""
    _WATCHERS.append(watcher)
    try:
        yield
    finally:
        _WATCHERS.remove(watcher)


def steps_per_epoch(count: int, batch_size: int) -> int:
    return max(1, math.ceil(count / batch_size))
