"""Mean +- 95% CI table over finished run folders (e.g. the tasks of an experiment that was stopped early).

    .venv/bin/python bench/summarize_runs.py experiments/ucm_captions_scratch_dev/task_seed10*

Uses the experiment's own table code (`cmg_core.experiment.summarize`, methods named with their CMLE reading)
and prints the per-stage time split of the runs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmg_core.experiment import markdown_table, metric_rows, summarize, time_split  # noqa: E402
from cmg_core.runs import Run  # noqa: E402


def main(argv=None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    runs = [Run.open(p) for p in paths if (p / "run.json").is_file()]
    skipped = [r.name for r in runs if r.status != "done"]
    runs = [r for r in runs if r.status == "done"]
    if skipped:
        print(f"left out (not finished): {', '.join(skipped)}")
    if not runs:
        print("no finished run folder among", [str(p) for p in paths])
        return 1
    rows = []
    for run in runs:
        rows += [{"run": run.name, **r} for r in metric_rows(run.metrics(), run.config().cmle.loss)]
    per_task = pd.DataFrame(rows)
    print(f"{len(runs)} runs: {', '.join(r.name for r in runs)}\n")
    print(markdown_table(summarize(per_task)))
    print()
    print(time_split(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
