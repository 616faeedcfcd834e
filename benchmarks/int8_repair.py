"""Before and after int8 repair, for every int8 artifact of one or more built runs.

For each artifact: the plain export (accuracy and agreement on the validation split, size,
p50), the remedy the export kept and its figures, and the validate stage's verdict on the
test split; then the latency cost of the remedy (kept p50 over plain p50). Figures come from
the runs' manifests (each int8 entry's `quantization` record, written by the export stage)
and parity.json; nothing is re-run, so build the runs first on the machine to report, e.g.

    tledge build recipes/quickstart.toml
    python benchmarks/int8_repair.py models/quickstart [OTHER_RUN ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main():
    from tledge.core.machine import machine_facts
    from tledge.rundir import PARITY, read_manifest, read_record
    from tledge.report.int8 import int8_records
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", default=["models/quickstart"])
    args = parser.parse_args()
    facts = machine_facts()
    print(f"machine: {facts['cpu']} ({facts['isa']}), {facts['cores']} cores")
    print("| run | artifact | plain: accuracy / agreement (val) | kept | kept: accuracy / "
          "agreement (val) | test: accuracy / agreement | size KiB | p50 ms plain → kept |")
    print("|---|---|---|---|---|---|---:|---|")
    for run in args.runs:
        run = Path(run)
        manifest = read_manifest(run)
        parity = read_record(run / PARITY) if (run / PARITY).is_file() else {"rows": []}
        judged = {}
        for row in parity["rows"]:
            judged.setdefault(row["artifact"], row)
        for entry, record in int8_records(manifest):
            attempts = record.get("attempts") or []
            if not attempts or attempts[0].get("agreement") is None:
                print(f"| {manifest['recipe']['name']} | {entry['name']} | (not judged at export: "
                      "export.int8_repair = \"off\") | | | | | |")
                continue
            plain = attempts[0]
            kept = next((row for row in reversed(attempts)
                         if row["remedy"] == record["remedy"]
                         and row["settings"] == record["settings"]), plain)
            test = judged.get(entry["name"], {})
            verdict = f"{test.get('accuracy', 0):.4f} / {test.get('agreement', 0):.4f} " \
                      f"{test.get('status', 'not validated')}" if test else "not validated"
            cost = kept["p50_ms"] / plain["p50_ms"] - 1 if plain.get("p50_ms") else 0.0
            print(f"| {manifest['recipe']['name']} | {entry['name']} | {plain['accuracy']:.4f} / "
                  f"{plain['agreement']:.4f} {'passed' if plain['passed'] else 'failed'} | "
                  f"{record['remedy']} | "
                  + (f"{kept['accuracy']:.4f} / {kept['agreement']:.4f} "
                     f"{'passed' if kept['passed'] else 'failed'}" if kept is not plain else "-")
                  + f" | {verdict} | {entry['size_bytes'] / 1024:,.0f} | "
                  f"{plain['p50_ms']:.3f} → {kept['p50_ms']:.3f} "
                  + ("(same)" if abs(cost) < 0.005 else f"({cost:+.0%})") + " |")


if __name__ == "__main__":
    main()
