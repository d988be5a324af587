"""What every top-level script shares: argument parsing, logging set-up, clean error exits."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
import typing
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


def verbose_logs() -> None:
    """Detailed logs (``--verbose``): the package's debug messages, not those of the libraries under it."""
    logging.getLogger("yak").setLevel(logging.DEBUG)


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
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f) if path.endswith(".json") else yaml.load(f, Loader=_yaml_loader())
        except (ValueError, yaml.YAMLError) as e:
            raise YakError(f"config file {path} cannot be read: {e}") from e
        problems = _check_config(parser, config)
        if problems:
            raise YakError(f"config file {path}:\n  - " + "\n  - ".join(problems))
        try:
            return parser.parse_dict(config, allow_extra_keys=False)
        except ValueError as e:
            raise YakError(f"config file {path}: {e}") from e
    try:
        return parser.parse_args_into_dataclasses(args=args)
    except ValueError as e:  # unknown options
        raise YakError(f"{e}; run with --help for the options") from e


def _yaml_loader():
    """PyYAML's safe loader with YAML 1.2's (and JSON's) floats: YAML 1.1 reads ``1e-5`` (no dot) as a string,
    which :func:`_check_config` converts for an option but not inside a dict such as ``lr_scheduler_kwargs:
    {min_lr: 1e-5}`` (a TypeError in the scheduler once the model had loaded; the command line's JSON reads
    a number)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(  # copies the resolvers of SafeLoader first: SafeLoader is left as it is
        "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."),
    )
    return Loader


def _check_config(parser, config) -> list[str]:
    """What argparse would refuse on the command line, checked on a config file's values, which
    ``parse_dict`` passes to the dataclasses unchecked (a missing required option is a TypeError there, a
    value outside its choices or a string for a number goes through). Numbers written as strings are
    converted as on the command line: YAML reads ``2e-4`` (no dot) as a string. An option's other names
    (aliases such as the original project's ``model_name_or_path``) are keys as on the command line."""
    from argparse import ArgumentTypeError

    from transformers.hf_argparser import string_to_bool

    if not isinstance(config, dict):
        return [f"expected a mapping of option names to values, found {type(config).__name__}"]
    actions = {a.dest: a for a in parser._actions}
    problems = []
    # an option's other names (e.g. the original project's model_name_or_path for base_model) as keys too
    aliases = {o.lstrip("-"): a.dest for a in parser._actions for o in a.option_strings if o.lstrip("-") != a.dest}
    for key in [k for k in config if k in aliases]:
        if aliases[key] in config:
            problems.append(f"'{key}' and '{aliases[key]}' are one option; give it once")
        config[aliases[key]] = config.pop(key)
    hints = {k: hint for t in parser.dataclass_types for k, hint in typing.get_type_hints(t).items()}
    strings = {k for k, hint in hints.items() if hint is str}
    # options that the command line cannot set to None (YAML's "key:" with no value is null): the program
    # would meet None where it expects a value (e.g. modules_to_save: None.split, an AttributeError)
    defaults = {f.name: f.default for t in parser.dataclass_types for f in dataclasses.fields(t)}
    not_null = {k for k, hint in hints.items() if type(None) not in typing.get_args(hint) and hint is not typing.Any
                and defaults.get(k) is not None}
    problems += [f"'{a.dest}' is required" for a in parser._actions if a.required and a.dest not in config]
    for key, value in config.items():
        action = actions.get(key)
        if value is None and key in not_null:
            problems.append(f"'{key}' has no value; give one (e.g. '' for an empty list of names) or leave it out")
        if action is None or value is None:  # unknown keys are reported by parse_dict
            continue
        if action.nargs in ("+", "*") and not isinstance(value, list):
            value = [value]  # "adapters: DIR" is one folder, not a list of its characters
        many = isinstance(value, list) and action.nargs in ("+", "*")
        values = list(value) if many else [value]
        for i, v in enumerate(values):
            if action.type in (int, float) and isinstance(v, str):
                with contextlib.suppress(ValueError):
                    values[i] = v = action.type(v)
            if action.type is string_to_bool and isinstance(v, (str, int)) and not isinstance(v, bool):
                # parse_dict would keep the string, and "false" is truthy: overwrite_output_dir: "false" deletes
                with contextlib.suppress(ArgumentTypeError):
                    values[i] = v = string_to_bool(str(v))
            if action.type is string_to_bool and not isinstance(v, bool):
                problems.append(f"'{key}' must be true or false, found {v!r}")
            if key in strings and not isinstance(v, str):
                problems.append(f"'{key}' must be a string, found {v!r}")
            elif action.choices is not None and v not in action.choices:
                problems.append(f"'{key}' is {v!r}; choose one of {', '.join(map(str, action.choices))}")
            elif action.type in (int, float) and (
                isinstance(v, bool) or not isinstance(v, (int, action.type))
            ):
                problems.append(
                    f"'{key}' must be {'an integer' if action.type is int else 'a number'}, found {v!r}"
                )
        config[key] = values if many else values[0]
    return problems


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
WATCHDOG_S = 1.0


def stop_with_launcher() -> None:
    """End this process when its parent, the launcher (torchrun), dies.

    A ``kill -9`` of torchrun (or of its terminal, or the OOM killer) left its workers training on, orphaned,
    holding their GPUs (issue 13, case 12). On Linux the kernel kills this process when its parent dies
    (``prctl(PR_SET_PDEATHSIG, SIGKILL)``, through ctypes: no library offers it): SIGKILL, because a rank
    blocked in a collective runs no Python signal handler, and nothing needs cleaning (a checkpoint counts only
    once complete). Elsewhere a watchdog thread checks the parent every second and exits with a message.
    """
    launcher = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            if os.getppid() != launcher:  # it died just before the call: no signal will come
                _launcher_died(launcher)
            return
    threading.Thread(target=_watch_launcher, args=(launcher,), name="yak-launcher-watchdog", daemon=True).start()


def _watch_launcher(launcher: int) -> None:
    while os.getppid() == launcher:
        time.sleep(WATCHDOG_S)
    _launcher_died(launcher)


def _launcher_died(launcher: int) -> None:
    print(f"error: the launcher of this worker (PID {launcher}) died; rank {os.environ.get('RANK', '?')} stops",
          file=sys.stderr, flush=True)
    os._exit(1)


def run_main(fn: Callable[[], object]) -> Callable[[], None]:
    """Decorate a script's ``main``: a :class:`YakError` prints one clear message and exits 2.

    SIGTERM (``kill``, a job scheduler) ends the script like Ctrl-C does, through the cleanup of what it was
    writing (``atomic_output_dir`` removes its temporary folder), instead of Python's default of dying on the
    spot and leaving it behind. Not under torchrun (``LOCAL_RANK`` set): a rank waiting in a collective could
    not run the handler and would linger until torchrun's SIGKILL, and training writes no temporary folder
    (its checkpoints are marked complete only once written). There, instead, the worker stops when its
    launcher dies (:func:`stop_with_launcher`).
    """

    @functools.wraps(fn)
    def wrapper() -> None:
        if "LOCAL_RANK" in os.environ:
            stop_with_launcher()
        else:
            signal.signal(signal.SIGTERM, _terminate)
        try:
            fn()
        except YakError as e:
            print(f"error: {e}\n{README_HINT}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
