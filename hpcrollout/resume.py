"""Resubmit the unfinished shards of a run directory: `hpcrollout resume RUN_DIR [--force]`.

The run's own config.yaml is used, so generation settings cannot drift; `--set` may change resources
(`--set slurm.time_min=600`), while a changed input file or generation setting is refused unless `--force`.
Only tasks with a shard lacking its completion marker, and not queued or running now, are submitted; each
resumed shard skips the prompts it already committed. In dynamic mode resume also adds tasks to a running job:
`--set executor.num_tasks=8` while 4 run, or `--add-tasks 4`, submits 4 more that join by claiming shards.
"""

from __future__ import annotations

import argparse
import os

from hpcrollout.config import add_override_arg, load_config
from hpcrollout.rundir import RunDir
from hpcrollout.submit import add_tasks_arg, dry_run, report, submit_run


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="the run directory to resume")
    add_override_arg(parser, "change a setting for this submission, e.g. --set slurm.time_min=600 (repeatable)")
    parser.add_argument(
        "--force", action="store_true", help="resume even though the input or generation settings changed"
    )
    parser.add_argument("--dry-run", action="store_true", help="print what would be resubmitted; submit nothing")
    add_tasks_arg(parser)


def main(args: argparse.Namespace) -> int:

    rundir = RunDir(args.run_dir)
    rundir.require()
    # The run's resolved config, with run_dir pinned to where it is now (it may have been moved or mounted elsewhere).
    config = load_config(rundir.config_path, args.overrides, base={"run_dir": str(rundir.root)})
    if args.dry_run:
        print(dry_run(config, force=args.force, add_tasks=args.add_tasks))
        return 0
    result = submit_run(config, force=args.force, command="resume", add_tasks=args.add_tasks)
    print(report(result))
    return 1 if any(result.get("exit_codes", {}).values()) else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    from hpcrollout.cli import run_module

    raise SystemExit(run_module(__name__, add_cli_args, main))
