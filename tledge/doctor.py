"""The training doctor: what a run's curves say about how it was trained, and the one change
most likely to help.

It reads history.json (each phase's epochs: train and validation accuracy and loss) and,
where the run trained one, the from-scratch baseline's figures, and looks for six things:

- diverging: a loss that is not finite, or validation loss that ends far above its best
  while validation accuracy collapses (the learning rate is too high);
- fine-tuning that hurt: the verdict kept the feature-extraction weights;
- a baseline that beats the transfer on the test split;
- underfitting: the last phase ends with low training accuracy that has stopped rising;
- unstable: validation accuracy that falls back from one epoch to the next, again and
  again, and ends below its best (the steps overshoot);
- overfitting: training accuracy far above validation, the gap growing since the best
  epoch while validation loss rises;

and, failing those, a phase still improving when it ran out of epochs; and, least severe,
feature extraction that had settled by its first half while fine-tuning followed (epochs that
bought nothing). Each finding carries
its evidence (numbers from the curves) and a change to the recipe, named by its key. The most
severe finding's change is "the one change": what to try first.
"""

from __future__ import annotations

import dataclasses
import math

UNDERFIT_TRAIN = 0.80  # the last phase's final training accuracy below this: low
FLAT = 0.01  # per epoch, over the last three epochs: stopped rising
OVERFIT_GAP = 0.15  # training accuracy this far above validation accuracy: a gap
BASELINE_MARGIN = 0.02  # a baseline this much better on the test split beats the transfer
UNSTABLE_DROP = 0.02  # validation accuracy falling this much from one epoch to the next
SETTLED = 0.02  # feature extraction's later half adding less training accuracy than this


@dataclasses.dataclass(frozen=True)
class Finding:
    kind: str  # "diverging" | "fine_tune_hurt" | "baseline_wins" | "underfitting" | ...
    evidence: str  # what the curves show, with their numbers
    change: str  # the recipe change to try, by its key
    # the change as data, for `tledge tune` to try: (recipe key, "times" | "set", amount)
    moves: tuple = ()


def _epochs(phase) -> list[dict]:
    return [epoch for epoch in phase.get("epochs") or [] if isinstance(epoch, dict)]


def _last_phase(history) -> dict | None:
    trained = [phase for phase in history.get("phases") or []
               if not phase.get("skipped") and _epochs(phase)]
    return trained[-1] if trained else None


def _key(phase) -> str:
    """The recipe table that sets a phase (from scratch, the first phase's table does)."""
    return {"feature_extraction": "train.feature_extraction",
            "from_scratch": "train.feature_extraction",
            "fine_tune": "train.fine_tune"}.get(phase.get("name"), "train")


def _diverging(history) -> Finding | None:
    for phase in history.get("phases") or []:
        epochs = _epochs(phase)
        losses = [epoch.get("loss") for epoch in epochs]
        broken = next((epoch for epoch, loss in zip(epochs, losses)
                       if loss is not None and not math.isfinite(loss)), None)
        if broken is not None:
            return Finding("diverging", f"{phase['name']}: the training loss became "
                           f"{broken['loss']} at epoch {broken['epoch']}",
                           f"lower {_key(phase)}.learning_rate (a third)",
                           ((f"{_key(phase)}.learning_rate", "times", 1 / 3),))
        val = [epoch.get("val_accuracy") for epoch in epochs]
        val_loss = [epoch.get("val_loss") for epoch in epochs]
        if len(epochs) >= 3 and all(v is not None for v in val + val_loss):
            best = max(val)
            if val_loss[-1] > 3 * min(val_loss) and val[-1] < best - 0.3:
                return Finding(
                    "diverging", f"{phase['name']}: validation loss ended at {val_loss[-1]:.2f} "
                    f"(best {min(val_loss):.2f}) and validation accuracy at {val[-1]:.3f} "
                    f"(best {best:.3f})", f"lower {_key(phase)}.learning_rate (a third)",
                    ((f"{_key(phase)}.learning_rate", "times", 1 / 3),))
    return None


def _fine_tune_hurt(history) -> Finding | None:
    verdict = history.get("verdict") or {}
    if not verdict.get("regressed"):
        return None
    phases = {phase.get("name"): phase for phase in history.get("phases") or []}
    before = (phases.get("feature_extraction") or {}).get("best_val_accuracy")
    after = (phases.get("fine_tune") or {}).get("best_val_accuracy")
    numbers = f" (best validation accuracy {after:.3f} against {before:.3f})" \
        if before is not None and after is not None else ""
    return Finding("fine_tune_hurt", f"fine-tuning made the model worse{numbers}; the "
                   "feature-extraction weights were kept",
                   "lower train.fine_tune.learning_rate (a third), or unfreeze fewer layers "
                   "(train.fine_tune.unfreeze)",
                   (("train.fine_tune.learning_rate", "times", 1 / 3),))


def _baseline_wins(history) -> Finding | None:
    baseline = history.get("baseline") or {}
    ours, theirs = history.get("test_accuracy"), baseline.get("test_accuracy")
    if ours is None or theirs is None or theirs < ours + BASELINE_MARGIN:
        return None
    last = _last_phase(history) or {}
    train = _epochs(last)[-1].get("accuracy") if _epochs(last) else None
    why = (f"; the transfer's training accuracy ends at {train:.3f}, so its features do not "
           "fit this data" if train is not None and train < UNDERFIT_TRAIN else "")
    change = ("unfreeze the whole backbone (train.fine_tune.unfreeze = \"all\") and give "
              "fine-tuning more epochs" if history.get("pretrained") else
              "start from pretrained weights (model.weights)")
    moves = (("train.fine_tune.unfreeze", "set", "all"), ("train.fine_tune.epochs", "times", 1.5)) \
        if history.get("pretrained") else (("model.weights", "set", "imagenet"),)
    return Finding("baseline_wins", f"the from-scratch baseline scores {theirs:.1%} against the "
                   f"transfer's {ours:.1%} on the test split{why}", change, moves)


def _underfitting(history) -> Finding | None:
    phase = _last_phase(history)
    if phase is None:
        return None
    train = [epoch.get("accuracy") for epoch in _epochs(phase)]
    if len(train) < 3 or any(value is None for value in train[-3:]):
        return None
    slope = (train[-1] - train[-3]) / 2
    if train[-1] >= UNDERFIT_TRAIN or slope >= FLAT:
        return None
    unfreeze = phase.get("name") == "feature_extraction" or \
        (phase.get("unfrozen_layers") or 0) < 20
    change = ("unfreeze more of the backbone (train.fine_tune.unfreeze = \"all\")" if unfreeze
              else f"raise {_key(phase)}.learning_rate, or a larger model (model.alpha, "
              "data.image_size)")
    moves = (("train.fine_tune.unfreeze", "set", "all"),) if unfreeze else \
        ((f"{_key(phase)}.learning_rate", "times", 3.0), ("model.alpha", "times", 1.5))
    return Finding("underfitting", f"{phase['name']}: training accuracy ends at "
                   f"{train[-1]:.3f} and rose {slope:+.3f} per epoch over its last three "
                   "epochs: the model cannot fit even its training images", change, moves)


def _overfitting(history) -> Finding | None:
    phase = _last_phase(history)
    if phase is None:
        return None
    epochs = _epochs(phase)
    if len(epochs) < 3 or any(epoch.get(key) is None for epoch in epochs
                              for key in ("accuracy", "val_accuracy", "val_loss")):
        return None
    gap = epochs[-1]["accuracy"] - epochs[-1]["val_accuracy"]
    best = max(range(len(epochs)), key=lambda i: epochs[i]["val_accuracy"])
    gap_at_best = epochs[best]["accuracy"] - epochs[best]["val_accuracy"]
    rising = epochs[-1]["val_loss"] > min(epoch["val_loss"] for epoch in epochs) * 1.1
    if gap < OVERFIT_GAP or gap <= gap_at_best or not rising:
        return None
    return Finding("overfitting", f"{phase['name']}: training accuracy {epochs[-1]['accuracy']:.3f}"
                   f" against validation {epochs[-1]['val_accuracy']:.3f} at the end (a gap of "
                   f"{gap:.3f}, {gap_at_best:.3f} at the best epoch), validation loss rising",
                   "more augmentation (data.augment) or dropout (model.dropout); the best "
                   "epoch's weights are already the ones kept",
                   (("model.dropout", "times", 2.0),))


def _still_improving(history) -> Finding | None:
    phase = _last_phase(history)
    if phase is None:
        return None
    epochs = _epochs(phase)
    val = [epoch.get("val_accuracy") for epoch in epochs]
    if len(val) < 3 or any(value is None for value in val[-3:]) or phase.get("stopped_early"):
        return None
    if phase.get("best_epoch") != epochs[-1].get("epoch") or val[-1] - val[-3] < 2 * FLAT:
        return None
    return Finding("still_improving", f"{phase['name']}: validation accuracy still rose "
                   f"{val[-1] - val[-3]:+.3f} over its last two epochs and its best epoch is "
                   "its last", f"more epochs ({_key(phase)}.epochs)",
                   ((f"{_key(phase)}.epochs", "times", 1.5),))


def _unstable(history) -> Finding | None:
    """The last phase's validation accuracy falls back by UNSTABLE_DROP or more, from one epoch
    to the next, at least twice, and ends below its best: each step overshoots."""
    phase = _last_phase(history)
    if phase is None:
        return None
    epochs = _epochs(phase)
    val = [epoch.get("val_accuracy") for epoch in epochs]
    if len(val) < 4 or any(value is None for value in val):
        return None
    falls = [(epochs[i]["epoch"], val[i - 1] - val[i]) for i in range(1, len(val))
             if val[i - 1] - val[i] >= UNSTABLE_DROP]
    if len(falls) < 2 or val[-1] >= max(val):
        return None
    shown = ", ".join(f"-{fall:.3f} at epoch {epoch}" for epoch, fall in falls)
    rates = {epoch.get("learning_rate") for epoch in epochs}
    constant = len(rates) == 1  # the phase ran at one learning rate throughout
    moves = ((f"{_key(phase)}.schedule", "set", "cosine"),) if constant else ()
    return Finding("unstable", f"{phase['name']}: validation accuracy fell back {len(falls)} "
                   f"times ({shown}) and ends at {val[-1]:.3f} against its best {max(val):.3f}: "
                   "the steps overshoot", (f"a decaying learning rate ({_key(phase)}.schedule = "
                                           "\"cosine\"), or lower " if constant else "lower ")
                   + f"{_key(phase)}.learning_rate (a third)",
                   moves + ((f"{_key(phase)}.learning_rate", "times", 1 / 3),))


def _settled_early(history) -> Finding | None:
    """Feature extraction's later half raises training accuracy by less than SETTLED over its
    first half, and fine-tuning follows: the head had settled, those epochs bought nothing."""
    phases = {phase.get("name"): phase for phase in history.get("phases") or []
              if not phase.get("skipped") and _epochs(phase)}
    if "feature_extraction" not in phases or "fine_tune" not in phases:
        return None
    train = [epoch.get("accuracy") for epoch in _epochs(phases["feature_extraction"])]
    if len(train) < 4 or any(value is None for value in train):
        return None
    half = len(train) // 2
    early, late = max(train[:half]), max(train[half:])
    if late >= early + SETTLED:
        return None
    settled = train.index(early) + 1
    tuned = _epochs(phases["fine_tune"])[-1].get("accuracy")
    poorly = (f"; the frozen features fit these images poorly (training accuracy "
              f"{early:.3f}), and fine-tuning took it to {tuned:.3f}"
              if early < UNDERFIT_TRAIN and tuned is not None else "")
    return Finding("settled_early", f"feature_extraction: training accuracy reached {early:.3f} "
                   f"by epoch {settled} and at most {late:.3f} in its last {len(train) - half} "
                   f"epochs: the head had settled, those epochs bought nothing{poorly}",
                   f"fewer feature-extraction epochs (train.feature_extraction.epochs = "
                   f"{settled})", (("train.feature_extraction.epochs", "set", settled),))


RULES = (_diverging, _fine_tune_hurt, _baseline_wins, _underfitting, _unstable, _overfitting,
         _still_improving, _settled_early)  # most severe first: the first finding's change is the one to try


def diagnose(history) -> list[Finding]:
    """Every finding on a run's history (history.json as read), most severe first."""
    if not history or history.get("adaptation"):
        return []
    return [finding for rule in RULES if (finding := rule(history)) is not None]


def report_lines(history, md=str) -> list[str]:
    """The report's "Training doctor" part."""
    if not history or history.get("adaptation") or not history.get("phases"):
        return []
    findings = diagnose(history)
    lines = ["", "### Training doctor", ""]
    if not findings:
        return lines + ["The curves show no underfitting, overfitting, instability or "
                        "regression, no phase was cut short while still improving, and none ran "
                        "on long after it had settled.", ""]
    lines += [f"- **{finding.kind.replace('_', ' ')}**: {md(finding.evidence)}."
              for finding in findings]
    return lines + ["", f"The one change most likely to help: {md(findings[0].change)}.", ""]
