"""The `llm-audit` command line: the parser and the dispatch, nothing else.

Each stage owns its commands (`run.commands`, `report.commands`, `grok.cli`). User errors
(a missing file, a bad option value) and what the file system refuses (a read-only or
full disk) print one line on stderr and exit 2, with no traceback; results go to stdout,
logs and progress to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import __version__
from .errors import AuditError
from .grok.cli import add_grok_parser
from .report.commands import add_parsers as add_report_parsers
from .run.commands import add_parsers as add_run_parsers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-audit",
        description="Spectral (HTSR) audit and correlation-trap detection for model weights.",
    )
    parser.add_argument("--version", action="version", version=f"llm-audit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_parsers(sub)
    add_report_parsers(sub)
    add_grok_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `llm-audit` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AuditError as err:
        print(f"llm-audit: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:  # the file system refused: a read-only folder, a full disk
        where = f"{err.filename}: " if err.filename else ""
        print(f"llm-audit: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
