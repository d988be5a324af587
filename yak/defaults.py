"""The embedded default model: what ``python serve_demo.py`` and ``python inference_hf.py --interactive`` load
when no ``--base_model`` is given, so that the commands a newcomer types first work as typed.

It is the newest merged output of the shipped pipeline (``run_merge_export.sh``'s ``output/merged-hf``, or
``run_demo.sh``'s ``outputs/demo/merged``) when one exists, else the shipped tiny model ``models/stories260K``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from yak import YakError

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = Path("models") / "stories260K"
# where the shipped scripts write merged models, relative to the repository (both scripts run from there)
MERGED_OUTPUTS = (Path("output") / "merged-hf", Path("outputs") / "demo" / "merged")


def default_model(root: Path = ROOT) -> tuple[Path, str]:
    """The default model folder and why it was chosen.

    A merged output counts once it is complete: the merge renames its folder into place with
    ``yak_merge.json`` inside, so a folder that has one is whole. The newest (by that file's time) wins.

    Args:
        root: the repository the shipped scripts run in.
    """
    from yak.formats import MERGE_FILE

    merged = [root / p for p in MERGED_OUTPUTS if (root / p / MERGE_FILE).is_file()]
    if merged:
        newest = max(merged, key=lambda p: (p / MERGE_FILE).stat().st_mtime)
        return newest, "the newest merged output of the shipped pipeline"
    if (root / TINY_MODEL / "config.json").is_file():
        return root / TINY_MODEL, "the shipped tiny model; no merged output of the pipeline yet"
    raise YakError(f"no --base_model given, and neither a merged output ({', '.join(map(str, MERGED_OUTPUTS))}) "
                   f"nor the shipped tiny model ({TINY_MODEL}) is in {root}; give --base_model")


def with_default_model(source):
    """``source`` (a :class:`yak.source.ModelSource`) with ``base_model`` set to :func:`default_model` when it was
    not given (logged)."""
    if source.base_model:
        return source
    if source.adapters:
        raise YakError("--adapters (--lora_model) needs --base_model: the model the adapters were trained on")
    folder, why = default_model()
    logger.info("no --base_model given: using %s (%s)", _shown(folder), why)
    return dataclasses.replace(source, base_model=str(folder))


def _shown(folder: Path) -> str:
    """A path as short as it can be said: relative to the working directory when inside it."""
    try:
        return str(folder.relative_to(Path.cwd()))
    except ValueError:
        return str(folder)
