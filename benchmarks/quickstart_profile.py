"""Where the quickstart's time goes: each stage's seconds of a fresh `tledge build`.

Builds a recipe (recipes/quickstart.toml by default) into a fresh folder with a fresh data
cache, as a new user's first build runs, in this process, and times every line the build
prints: each `== stage` line starts a stage, so a stage's seconds run to the next one. The
pretrained backbone's own build (a recipe named as weights) is split out the same way. Prints
the machine (CPU, ISA, cores), each stage's seconds and share, and the total.

A run of the weights recipe that the checkout ships (models/quickstart_pretrain) is copied in
beside the build, as a user's build finds it; `--pretrain` leaves it out, so it is trained too.

    python benchmarks/quickstart_profile.py
    python benchmarks/quickstart_profile.py --pretrain
    python benchmarks/quickstart_profile.py recipes/multitask_quickstart.toml --keep models/qs
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
import time
from pathlib import Path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="recipes/quickstart.toml")
    parser.add_argument("--keep", type=Path, default=None,
                        help="Build into this folder and keep it (default: a temporary one).")
    parser.add_argument("--pretrain", action="store_true",
                        help="Train the weights recipe too, instead of the run models/ ships.")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    folder = Path(tempfile.mkdtemp(prefix="tledge-profile-"))
    os.environ["TLEDGE_CACHE_DIR"] = str(folder / "cache")  # fresh: the data is prepared too
    out = args.keep or folder / "models" / Path(args.recipe).stem
    if args.keep:
        shutil.rmtree(args.keep, ignore_errors=True)
    shipped = Path("models") / "quickstart_pretrain"
    beside = out.parent / shipped.name
    if not args.pretrain and (shipped / "manifest.json").is_file() \
            and beside.resolve() != shipped.resolve():
        shutil.copytree(shipped, beside, dirs_exist_ok=True)

    from tledge.core.machine import machine_facts
    from tledge.stages import build
    started = time.perf_counter()
    import tensorflow  # noqa: F401  (its import is part of what a user waits for)
    marks = [("import tensorflow", started)]

    def log(line: str) -> None:
        now = time.perf_counter()
        print(f"{now - started:7.1f}s  {line}", flush=True)
        for text in line.splitlines():
            stage = _stage_of(text)
            if stage:
                marks.append((stage, now))

    try:
        build(args.recipe, out=out, log=log, verbose=0)
    finally:
        ended = time.perf_counter()
        facts = machine_facts()
        seconds = {}
        for (stage, at), (_, until) in zip(marks, marks[1:] + [("end", ended)]):
            seconds[stage] = seconds.get(stage, 0.0) + until - at
        total = ended - started
        print(f"\n{args.recipe} on {facts['cpu']} ({facts['isa']}), {os.cpu_count()} cores, "
              f"{time.strftime('%Y-%m-%d')}")
        print(f"{'stage':<40} {'seconds':>8} {'share':>6}")
        for stage, value in seconds.items():
            print(f"{stage:<40} {value:>8.1f} {value / total:>6.0%}")
        print(f"{'total':<40} {total:>8.1f}")
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


def _stage_of(line: str) -> str | None:
    """The stage a build's `== ...` line starts (with the weights recipe's own build and the
    sub-run named), or None."""
    text = line.strip()
    if text.startswith("weights: ") and ("training it" in text or "retraining" in text):
        return "pretrain: " + text.split()[1]  # the weights recipe's build starts
    if not text.startswith("== ") or "up to date" in text:
        return None
    name = text[3:].split(" -> ")[0].strip()
    return re.sub(r"\s+", " ", name)


if __name__ == "__main__":
    main()
