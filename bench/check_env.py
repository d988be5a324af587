"""The first job of ``bench/gpu_checks.sh``: is everything its jobs import there, in versions that fit?

Prints the versions of the packages the jobs use, imports the modules they import, checks every installed
package's requirements among them (a carried wheel installed with ``pip --no-deps`` is checked by nobody
else) and, with ``--gpu``, the card. Exits 1 when a module does not import or (``--gpu``) no GPU is seen;
unmet version requirements are printed as warnings (a pin that is only a pin must not stop the run).

    python bench/check_env.py [--gpu]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import os
import sys

from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the package yak lies beside bench/

# what the jobs import: (distribution, module)
USED = [("torch", "torch"), ("transformers", "transformers"), ("peft", "peft"), ("accelerate", "accelerate"),
        ("datasets", "datasets"), ("pyarrow", "pyarrow"), ("deepspeed", "deepspeed"), ("flask", "flask"),
        ("sentencepiece", "sentencepiece"), ("tokenizers", "tokenizers"), ("safetensors", "safetensors"),
        ("pytest", "pytest"), ("openai", "openai"), ("gguf", "gguf")]
GPU_ONLY = [("liger-kernel", "liger_kernel"), ("triton", "triton")]
OURS = ["yak", "yak.training", "yak.generation.engine", "yak.server", "yak.data", "yak.merge"]


def unmet(dist: str) -> list[str]:
    """The requirements of ``dist`` (without extras) that the installed packages do not meet."""
    problems = []
    for line in md.requires(dist) or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            found = md.version(req.name)
        except md.PackageNotFoundError:
            problems.append(f"{dist} needs {req}, not installed")
            continue
        if req.specifier and not req.specifier.contains(found, prereleases=True):
            problems.append(f"{dist} needs {req}, found {found}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="a CUDA GPU must be visible; check the GPU-only packages")
    gpu = parser.parse_args().gpu
    errors, warnings = [], []
    print(f"python {sys.version.split()[0]} at {sys.executable}; PYTHONPATH={os.environ.get('PYTHONPATH', '')}")
    for dist, module in USED + (GPU_ONLY if gpu else []):
        try:
            version = md.version(dist)
        except md.PackageNotFoundError:
            errors.append(f"{dist}: not installed (bench/gpu_wheels.txt lists the wheels to carry)")
            continue
        try:
            mod = importlib.import_module(module)
            where = os.path.dirname(getattr(mod, "__file__", None) or "?")
        except Exception as e:  # noqa: BLE001 - any import failure is the finding
            errors.append(f"{dist} {version}: import {module} failed: {type(e).__name__}: {e}")
            continue
        warnings += unmet(dist)
        print(f"  {dist:14} {version:16} {where}")
    for module in OURS:
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001
            errors.append(f"import {module} failed: {type(e).__name__}: {e}")
    import torch

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"GPU: {torch.cuda.device_count()} x {p.name}, {p.total_memory / 2**30:.1f} GiB, "
              f"capability {p.major}.{p.minor}, torch {torch.__version__} (CUDA {torch.version.cuda})")
    elif gpu:
        errors.append(f"no CUDA GPU visible to torch {torch.__version__}")
    else:
        print(f"no GPU (rehearsal); torch {torch.__version__}")
    for w in warnings:
        print(f"WARN {w}")
    for e in errors:
        print(f"ERROR {e}")
    print(f"RESULT preflight: {len(errors)} error(s), {len(warnings)} warning(s)")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
