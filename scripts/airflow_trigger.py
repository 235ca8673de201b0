"""`airflow dags trigger` with a clear message when the logical date already has a run.

    python scripts/airflow_trigger.py DAG_ID [--logical-date 2026-11-24] [--conf '{"partition": "2026-11-24"}']

Airflow's CLI prints a raw database error (`IntegrityError ... duplicate key value violates unique constraint
"dag_run_dag_id_logical_date_key"`, or SQLite's `UNIQUE constraint failed`) when a run exists for that DAG and
logical date. This wrapper runs the same command (the `airflow` next to this interpreter, else on PATH) and, in
that case, says what happened and what to do instead; any other output passes through unchanged. Exit status:
Airflow's, or 2 for an existing logical date.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

DUPLICATE_MARKERS = ("dag_run_dag_id_logical_date_key", "UNIQUE constraint failed: dag_run.dag_id, dag_run.logical_date",
                     "UniqueViolation", "IntegrityError")


def is_duplicate_run(output: str) -> bool:
    return any(marker in output for marker in DUPLICATE_MARKERS) and "dag_run" in output


def explain(dag_id: str, logical_date: str | None) -> str:
    day = logical_date or "that logical date"
    return (f"{dag_id} already has a run for the logical date {day}: Airflow allows one run per DAG and logical "
            "date, so nothing was triggered.\n"
            f"  re-run it:      airflow tasks clear {dag_id} --start-date {day} --end-date {day} --yes\n"
            f"  re-run a range: airflow backfill create --dag-id {dag_id} --from-date ... --to-date ... "
            "--reprocess-behavior completed\n"
            "  or trigger without --logical-date (a manual run; medpipe DAGs then take the partition from the "
            "`partition` param)")


def airflow_binary() -> str:
    beside = Path(sys.executable).parent / "airflow"
    return str(beside) if beside.is_file() else (shutil.which("airflow") or "airflow")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dag_id")
    parser.add_argument("--logical-date", "-l")
    parser.add_argument("--conf", "-c")
    parser.add_argument("--run-id", "-r")
    args = parser.parse_args(argv)
    command = [airflow_binary(), "dags", "trigger", args.dag_id]
    for flag, value in (("--logical-date", args.logical_date), ("--conf", args.conf), ("--run-id", args.run_id)):
        if value:
            command += [flag, value]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 and is_duplicate_run(result.stdout + result.stderr):
        print(explain(args.dag_id, args.logical_date), file=sys.stderr)
        return 2
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
