"""The safe loading layer: every pickle a tool reads (``.bin``, ``.pt``, ``.pth``) goes through here.

``torch.load(weights_only=True)`` builds only tensors, containers, numbers, strings and the classes of
:data:`ALLOWED_GLOBALS`; :func:`pickle_problem` reads a pickle's imports statically first, so that a refused
file is one line naming it instead of an ``UnpicklingError`` page. ``YAK_TRUST_PICKLE=1`` is the only way to
unpickle anything else (docs/safety.md). DeepSpeed's own loader, which unpickles in full, is rerouted here by
:func:`guard_deepspeed`. What the files are is in :mod:`yak.formats`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import zipfile
from pathlib import Path
from typing import IO

import torch

from yak import YakError
from yak.io import unreadable

logger = logging.getLogger(__name__)

TRUST_ENV = "YAK_TRUST_PICKLE"
# What may be unpickled besides torch's own safe types: numpy's RNG state in the Trainer's rng_state.pth
# (transformers' own allowlist), and the objects DeepSpeed stores in its ZeRO optimizer states (found in real
# ZeRO-2/ZeRO-3 checkpoints of DeepSpeed 0.19; DynamicLossScaler is what fp16 runs store instead).
ALLOWED_GLOBALS = (
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype",
    "numpy.dtypes.UInt32DType",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
)  # fmt: skip
# Written by the Trainer and never read back: not scanned (it pickles the TrainingArguments class).
UNREAD_PICKLES = ("training_args.bin",)


def trust_pickle() -> bool:
    """Whether the user opted in to loading pickles that may run code (``YAK_TRUST_PICKLE=1``)."""
    return os.environ.get(TRUST_ENV, "").lower() in ("1", "true", "yes")


def _warn_trust(path) -> None:
    logger.warning("%s=1: loading %s with pickle, which runs any code it holds; only do this for files "
                   "from a source you trust", TRUST_ENV, path)


def _allowed_objects() -> list:
    """The :data:`ALLOWED_GLOBALS` whose package is already imported (DeepSpeed's only in DeepSpeed runs:
    importing it takes seconds); a file that needs another one is refused as it should be."""
    import importlib
    import warnings

    objects = []
    for name in ALLOWED_GLOBALS:
        module, _, attr = name.rpartition(".")
        top = module.split(".")[0]
        if top != "numpy" and top not in sys.modules:
            continue
        with contextlib.suppress(ImportError, AttributeError), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy 2 warns on numpy.core, numpy 1 lacks numpy._core
            objects.append(getattr(importlib.import_module(module), attr))
    return objects


def _refused(path, why: str) -> YakError:
    return YakError(f"{path} is refused: {why}; a pickle can run code when loaded, and only tensors and the "
                    f"types PyTorch and DeepSpeed store are read. Re-create the file from trusted weights, or, "
                    f"if you trust its source, set {TRUST_ENV}=1 (docs/safety.md)")


def pickle_globals(f: IO[bytes]) -> tuple[set[str], int]:
    """The ``module.name`` of every global the pickles at the start of ``f`` import, read statically (nothing
    is run), and how many whole pickles were read.

    An old-style ``torch.save`` file is several pickles in a row, then raw tensor bytes (where the scan stops).
    Hand-written over ``pickletools.genops`` because torch's own scanner (``get_globals_in_pkl``) stops at
    protocol 2 and reports a protocol-4 pickle, which a payload may well be, as unreadable.
    """
    import pickletools

    found, strings, memo, pickles = set(), [], {}, 0
    with contextlib.suppress(Exception):  # past the pickles (raw tensor bytes), or a pickle cut short
        while True:
            for op, arg, _ in pickletools.genops(f):  # reads up to this pickle's STOP, then returns
                if op.name == "GLOBAL":
                    found.add(arg.replace(" ", "."))
                elif "UNICODE" in op.name or "STRING" in op.name:
                    strings.append(arg)
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = strings[-1] if strings else None
                elif op.name.endswith("PUT"):
                    memo[arg] = strings[-1] if strings else None
                elif op.name.endswith("GET"):
                    strings.append(memo.get(arg))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:  # module and name: the last two strings
                    found.add(f"{strings[-2]}.{strings[-1]}")
            pickles, memo = pickles + 1, {}
    return found, pickles


# the first pickle of an old-style torch.save file (torch.serialization.MAGIC_NUMBER, pickled with protocol 2)
LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."


def pickle_problem(path: str | os.PathLike) -> YakError | None:
    """The error ``torch.load(path, weights_only=True)`` would end in, found without running anything; or None.

    The pickles' globals are read statically (:func:`pickle_globals`; ``data.pkl`` of a ``torch.save`` zip)
    and must be torch's safe ones or :data:`ALLOWED_GLOBALS`. Anything that is neither a ``torch.save`` zip nor
    an old-style ``torch.save`` file (a plain pickle, or no pickle at all) is then given to the weights-only
    unpickler, which never runs code. Nothing large is read: the tensors' bytes are never touched.
    """
    from torch._weights_only_unpickler import _get_allowed_globals

    try:
        with contextlib.ExitStack() as stack:
            if zipfile.is_zipfile(path):
                z = stack.enter_context(zipfile.ZipFile(path))
                f = stack.enter_context(z.open(next(n for n in z.namelist() if n.endswith("data.pkl"))))
                torch_file = True
            else:
                f = stack.enter_context(open(path, "rb"))
                torch_file = f.read(len(LEGACY_MAGIC)) == LEGACY_MAGIC
                f.seek(0)
            found, pickles = pickle_globals(f)
    except (OSError, StopIteration, zipfile.BadZipFile) as e:
        return unreadable(path, e)
    unsafe = sorted(found - set(_get_allowed_globals()) - set(ALLOWED_GLOBALS))
    if unsafe:
        return _refused(path, f"it imports {', '.join(unsafe[:4])} when unpickled")
    if torch_file and pickles:
        return None  # its pickles were read above; torch.load will find a cut tensor itself
    try:  # the weights-only unpickler, which never runs code, decides
        with torch.serialization.safe_globals(_allowed_objects()):
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, EOFError, RuntimeError, ...
        # torch's message is a page long; its reason is the line after "WeightsUnpickler error:"
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        return unreadable(path, type(e)(reason[1]) if reason else e)
    return None


def torch_load(path: str | os.PathLike, **kwargs):
    """``torch.load`` of a checkpoint file with ``weights_only=True`` and :data:`ALLOWED_GLOBALS`.

    With ``YAK_TRUST_PICKLE=1`` the file is unpickled in full (logged as a warning).

    Raises:
        YakError: naming the file, when it holds anything else or is cut short.
    """
    if trust_pickle():
        _warn_trust(path)
        return torch.load(path, weights_only=False, **kwargs)
    try:
        with torch.serialization.safe_globals(_allowed_objects()):
            return torch.load(path, weights_only=True, **kwargs)
    except Exception as e:
        raise pickle_problem(path) or unreadable(path, e) from e


def check_pickles(folder: str | os.PathLike) -> None:
    """Refuse a training checkpoint that holds a pickle the resume would not load as plain tensors.

    Every ``.pt``/``.pth``/``.bin`` file under ``folder`` is scanned (the Trainer's optimizer, scheduler and
    RNG states, DeepSpeed's ``global_step*/`` states, ``.bin`` weights), before anything is loaded: one line
    naming the file replaces an ``UnpicklingError`` traceback half-way into the resume. With
    ``YAK_TRUST_PICKLE=1`` only the files that transformers loads with ``weights_only`` whatever Yak says
    (``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``, ``rng_state*.pth``) are still scanned.
    """
    trainer_files = re.compile(r"(optimizer|scheduler|scaler)\.pt|rng_state(_\d+)?\.pth")
    for path in sorted(Path(folder).rglob("*")):
        if path.suffix not in (".pt", ".pth", ".bin") or path.name in UNREAD_PICKLES or not path.is_file():
            continue
        if trust_pickle() and not trainer_files.fullmatch(path.name):
            continue
        problem = pickle_problem(path)
        if problem:
            raise problem


def guard_deepspeed() -> None:
    """Make DeepSpeed read its checkpoints through :func:`torch_load` (it unpickles them in full).

    DeepSpeed's ``TorchCheckpointEngine.load`` reads ``mp_rank_00_model_states.pt`` and the ZeRO optimizer
    states with ``weights_only=False``; replaced here by the allowlisted weights-only load.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    def load(self, path: str, map_location=None):
        return torch_load(path, map_location=map_location)

    TorchCheckpointEngine.load = load
