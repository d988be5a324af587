"""What every top-level script shares: argument parsing, logging set-up, clean error exits."""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Callable, Sequence

from yak import YakError

README_HINT = "(help: README.md, section 'When something goes wrong', and the guides in docs/)"


def setup_logging(level: int = logging.INFO) -> None:
    """Configure logging for a script; only rank 0 of a distributed run logs below WARNING."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def parse_args(dataclass_types: Sequence[type], args: Sequence[str] | None = None, description: str = ""):
    """Parse dataclasses from the command line, or from one ``.json``/``.yaml`` file given alone.

    Unknown options or keys are errors, never silently ignored.
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_types, description=description)
    args = list(sys.argv[1:] if args is None else args)
    if len(args) == 1 and args[0].endswith((".json", ".yaml", ".yml")):
        path = args[0]
        if not os.path.isfile(path):
            raise YakError(f"config file {path} does not exist")
        try:
            if path.endswith(".json"):
                return parser.parse_json_file(path, allow_extra_keys=False)
            return parser.parse_yaml_file(path, allow_extra_keys=False)
        except ValueError as e:
            raise YakError(f"config file {path}: {e}") from e
    try:
        return parser.parse_args_into_dataclasses(args=args)
    except ValueError as e:  # unknown options
        raise YakError(f"{e}; run with --help for the options") from e


def run_main(fn: Callable[[], object]) -> Callable[[], None]:
    """Decorate a script's ``main``: a :class:`YakError` prints one clear message and exits 2."""

    @functools.wraps(fn)
    def wrapper() -> None:
        try:
            fn()
        except YakError as e:
            print(f"error: {e}\n{README_HINT}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
