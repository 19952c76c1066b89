"""What every command-line entry point shares: parsing flags or one JSON / YAML arguments file into `HfArgumentParser`
dataclasses, and reporting a user's mistake as one `error: ...` line (exit 2) while a real bug keeps its traceback.

Leaves out on purpose: sub-commands and interactive prompts.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

from miniclip.checkpoints.io import CheckpointError
from miniclip.training.arguments import is_args_file

# What a user can cause with a bad file, flag or checkpoint: a message that names the thing and the fix.
USER_ERRORS = (CheckpointError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError,
               KeyError)
DEBUG_ENV = "MINICLIP_DEBUG"  # =1: user errors keep their traceback too (for bug reports)


def parse_dataclass(cls, argv: list[str] | None, description: str | None = None):
    """One dataclass of arguments from flags or an arguments file (unknown keys in the file are refused)."""
    from transformers import HfArgumentParser
    parser = HfArgumentParser(cls, description=description)
    argv = sys.argv[1:] if argv is None else list(argv)
    if is_args_file(argv):
        read = parser.parse_json_file if argv[0].endswith(".json") else parser.parse_yaml_file
        return read(argv[0], allow_extra_keys=False)[0]
    return parser.parse_args_into_dataclasses(argv)[0]


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None, prog: str = "miniclip") -> Any:
    """Call `main(argv)`; a user error prints `<prog>: error: <message>` on stderr and exits with status 2 (as
    argparse does for a bad flag); anything else is a bug and keeps its traceback."""
    try:
        return main(argv)
    except USER_ERRORS as e:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
