"""The training doctor reads a run's curves: each kind of trouble from a history that shows it,
nothing from one that does not, the most severe finding's change first, and its part of the
report."""

from __future__ import annotations

import math

import pytest

from tledge.doctor import diagnose, report_lines


def phase(name, train, val, val_loss=None, *, start=1, loss=None, **extra):
    val_loss = val_loss or [1.0 - v for v in val]
    loss = loss or [1.0 - t for t in train]
    epochs = [{"epoch": start + i, "accuracy": t, "val_accuracy": v, "val_loss": vl, "loss": l}
              for i, (t, v, vl, l) in enumerate(zip(train, val, val_loss, loss))]
    best = max(range(len(val)), key=lambda i: val[i])
    return {"name": name, "epochs": epochs, "best_epoch": start + best,
            "best_val_accuracy": val[best], "skipped": None, "stopped_early": False,
            "unfrozen_layers": None, **extra}


def history(*phases, **extra):
    return {"phases": list(phases), "verdict": {"kept": phases[-1]["name"], "regressed": False},
            "pretrained": True, "test_accuracy": 0.9, **extra}


HEALTHY = history(phase("feature_extraction", [0.6, 0.75, 0.8, 0.82], [0.6, 0.72, 0.78, 0.8]),
                  phase("fine_tune", [0.85, 0.9, 0.92, 0.93], [0.84, 0.88, 0.9, 0.9], start=5,
                        unfrozen_layers=52))

CASES = {
    "diverging": history(phase("fine_tune", [0.8, 0.5, 0.2], [0.8, 0.4, 0.1],
                               loss=[0.5, 2.0, math.nan])),
    "fine_tune_hurt": {**HEALTHY, "verdict": {"kept": "feature_extraction", "regressed": True}},
    "baseline_wins": {**HEALTHY, "baseline": {"test_accuracy": 0.95}},
    "underfitting": history(phase("feature_extraction", [0.55, 0.6, 0.605, 0.607],
                                  [0.5, 0.55, 0.56, 0.56])),
    "overfitting": history(phase("fine_tune", [0.8, 0.9, 0.97, 0.99], [0.78, 0.8, 0.79, 0.77],
                                 [0.6, 0.55, 0.65, 0.8], unfrozen_layers=52)),
    "still_improving": history(phase("fine_tune", [0.7, 0.8, 0.88, 0.93],
                                     [0.7, 0.78, 0.85, 0.9], unfrozen_layers=52)),
    "unstable": history(phase("fine_tune", [0.8, 0.85, 0.9, 0.92, 0.94, 0.95],
                              [0.86, 0.83, 0.9, 0.92, 0.87, 0.9], unfrozen_layers=52)),
    # the quickstart's shape: the head settles on frozen features by epoch 3 of 8
    "settled_early": history(phase("feature_extraction",
                                   [0.556, 0.67, 0.696, 0.691, 0.702, 0.671, 0.684, 0.692],
                                   [0.65, 0.63, 0.69, 0.67, 0.69, 0.67, 0.72, 0.68]),
                             phase("fine_tune", [0.85, 0.9, 0.92, 0.93], [0.84, 0.88, 0.9, 0.9],
                                   start=9, unfrozen_layers=52)),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_each_kind_of_trouble_is_found_first_with_its_evidence_and_change(kind):
    findings = diagnose(CASES[kind])
    assert findings and findings[0].kind == kind, findings
    assert any(char.isdigit() for char in findings[0].evidence)  # its numbers
    assert findings[0].change


def test_each_change_is_also_data_a_search_can_apply():
    for kind, case in CASES.items():
        key, how, amount = diagnose(case)[0].moves[0]
        assert key.split(".")[0] in ("train", "model") and how in ("times", "set"), kind
    assert diagnose(CASES["settled_early"])[0].moves == (
        ("train.feature_extraction.epochs", "set", 3),)
    assert "fit these images poorly" in diagnose(CASES["settled_early"])[0].evidence


def test_a_healthy_run_has_no_finding_and_the_report_says_so():
    assert diagnose(HEALTHY) == []
    assert "show no underfitting, overfitting" in "\n".join(report_lines(HEALTHY))


def test_the_changes_name_the_recipe_keys_of_the_phase_in_trouble():
    assert "train.fine_tune.learning_rate" in diagnose(CASES["fine_tune_hurt"])[0].change
    assert "train.fine_tune.unfreeze" in diagnose(CASES["underfitting"])[0].change
    from_scratch = history(phase("from_scratch", [0.5, 0.6, 0.7], [0.5, 0.6, 0.7]),
                           pretrained=False)
    assert diagnose(from_scratch)[0].change == "more epochs (train.feature_extraction.epochs)"


def test_the_report_puts_the_most_severe_change_first(built_run):
    lines = report_lines(CASES["baseline_wins"])
    assert lines[1] == "### Training doctor"
    assert lines[-2].startswith("The one change most likely to help: unfreeze the whole")
    run_dir, _, _ = built_run
    text = (run_dir / "report.md").read_text(encoding="utf-8")
    assert "### Training doctor" in text  # every build's report has it


def test_the_doctor_finds_unstable_fine_tuning_and_names_its_change():
    val = [0.86, 0.87, 0.86, 0.90, 0.90, 0.89, 0.85, 0.91, 0.93, 0.95, 0.95, 0.92]
    history = {"phases": [{"name": "fine_tune", "best_epoch": 10, "unfrozen_layers": 52,
                           "epochs": [{"epoch": 9 + i, "accuracy": 0.8 + 0.015 * i,
                                       "val_accuracy": v, "loss": 0.5, "val_loss": 0.4,
                                       "learning_rate": 5e-4} for i, v in enumerate(val)]}]}
    findings = diagnose(history)
    assert [finding.kind for finding in findings] == ["unstable"]
    assert findings[0].moves[0] == ("train.fine_tune.schedule", "set", "cosine")
    assert "-0.040 at epoch 15" in findings[0].evidence
    # the same curve under a decaying schedule: the change left is a lower learning rate
    for i, epoch in enumerate(history["phases"][0]["epochs"]):
        epoch["learning_rate"] = 5e-4 / (i + 1)
    findings = diagnose(history)
    assert findings[0].moves == (("train.fine_tune.learning_rate", "times", 1 / 3),)
    assert "cosine" not in findings[0].change
