"""The `hpcrollout` command: wires one subcommand per stage module (each has add_cli_args and main)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable

from hpcrollout import __version__
from hpcrollout.errors import HpcRolloutError

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("hpcrollout.run", "do a whole run on this machine: shard, generate, merge (the seed's vllm_rollout.py)"),
    "demo": ("hpcrollout.demo", "run the whole pipeline on CPU with a tiny model built on the spot"),
    "submit": ("hpcrollout.submit", "prepare a run directory and launch its array (local or SLURM)"),
    "resume": ("hpcrollout.resume", "resubmit the unfinished shards of a run directory"),
    "status": ("hpcrollout.status", "where a run stands: shards, progress, throughput, failures"),
    "merge": ("hpcrollout.merge", "join a finished run's shards into one Parquet file, in input order"),
    "flatten": ("hpcrollout.flatten", "one row per response"),
    "analyze": ("hpcrollout.analyze", "lengths, finish reasons, duplicates, diversity, errors; --plot PNG"),
    "filter": ("hpcrollout.filter", "keep responses by length, finish reason, errors"),
    "export": ("hpcrollout.export", "JSONL, one object per row or per response, with a chat-messages form"),
    "score": ("hpcrollout.scoring.score", "check responses against references: math, exact, regex, choice, python"),
    "shard": ("hpcrollout.shard", "only prepare the run directory (validate input, write shards)"),
    "worker": ("hpcrollout.worker", "run one array task's shards (what executors launch)"),
}


class StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is at each record, not the stream it was made with.

    Commands run in-process (tests, notebooks, pytest's capture) swap and close ``sys.stderr``; a handler bound
    to the old stream would then fail on every later record with "I/O operation on closed file".
    """

    @property
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # noqa: ANN001
        pass


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logger = logging.getLogger("hpcrollout")
    if not logger.handlers:
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def _invoke(main: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return int(main(args) or 0)
    except HpcRolloutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run_module(
    name: str,
    add_cli_args: Callable[[argparse.ArgumentParser], None],
    main: Callable[[argparse.Namespace], int],
    argv: list[str] | None = None,
) -> int:
    """Entry point for `python -m hpcrollout.<module>`."""
    module = sys.modules[name]
    parser = argparse.ArgumentParser(
        prog=f"python -m {module.__spec__.name if module.__spec__ else name}",
        description=(module.__doc__ or "").split("\n\n")[0],
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    add_cli_args(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return _invoke(main, args)


DESCRIPTION = (
    "n sampled responses per chat prompt, at cluster scale: shard a Parquet file of prompts, generate on a SLURM "
    "job array (or this machine) with vLLM or transformers, resume after any interruption without losing or "
    "doubling a sample, then merge, analyze, flatten, filter and export. Start with: hpcrollout demo"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hpcrollout", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"hpcrollout {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for command, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(command, help=help_text, description=help_text)
        # -v after the subcommand too; SUPPRESS: absent there, it does not reset a -v given before it
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
        if command == wanted:  # import only the module that runs: keeps `hpcrollout status` fast
            module = importlib.import_module(module_name)
            module.add_cli_args(p)
            p.set_defaults(_main=module.main)
    args = parser.parse_args(argv)
    if not getattr(args, "_main", None):
        parser.print_help()
        return 0 if args.command is None else 2
    setup_logging(args.verbose)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return _invoke(args._main, args)


if __name__ == "__main__":
    raise SystemExit(main())
