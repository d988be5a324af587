"""Export a merged Hugging Face model to GGUF for llama.cpp: f16 conversion, quantization, tokenizer check.

The conversion is llama.cpp's own ``convert_hf_to_gguf.py`` (with its sibling ``conversion/`` package and
``gguf-py``), taken from a llama.cpp checkout (``--llama_cpp_dir``) or, by default, from the llama.cpp sources
that the llama-cpp-python source package carries, of the pinned version (``requirements-gguf.txt``) or the
installed one, so that converter and runtime agree. The export never downloads anything: the user fetches that
package once with pip (:func:`fetch_command`) into a cache folder, where its converter is extracted. Quantization uses
llama.cpp's ``llama-quantize`` binary when one is found, else llama-cpp-python's ``llama_model_quantize``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from yak import YakError
from yak.formats import check_model_folder, has_tokenizer
from yak.outdir import cache_entry, inputs_inside, output_dir_problems, replace_dir

logger = logging.getLogger(__name__)

CONVERTER = "convert_hf_to_gguf.py"
# What the converter needs from a llama.cpp source tree (FACTS: the script alone fails without them).
CONVERTER_PARTS = (CONVERTER, "conversion", "gguf-py")
# Kept from the source package too: llama.cpp's converter of Meta's .pth layout.
CACHED_PARTS = (*CONVERTER_PARTS, "examples/convert_legacy_llama.py")
# llama.cpp's version, pinned in requirements-gguf.txt (tests check that both agree): converted and quantized
# with it, stories260K matched the Hugging Face model (docs/export.md).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
REQUIREMENTS_FILE = "requirements-gguf.txt"
CONVERT_TYPES = ("f16", "bf16", "f32", "q8_0")
QUANT_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k")


def default_cache_dir() -> Path:
    """Where the fetched llama.cpp sources are kept: ``$YAK_CACHE_DIR`` or ``~/.cache/yak``."""
    return Path(os.environ.get("YAK_CACHE_DIR") or Path.home() / ".cache" / "yak")


@dataclass
class GGUFArguments:
    model_dir: str = field(metadata={"help": "Merged model folder in Hugging Face layout (from "
                                             "merge_lora_low_mem.py --output_type huggingface)."})
    output_dir: str = field(metadata={"help": "Folder for the .gguf files (written atomically)."})
    outtype: str = field(default="f16", metadata={"help": f"Type of the converted file: {', '.join(CONVERT_TYPES)}."})
    quant_types: str = field(default="q4_0", metadata={
        "help": f"Comma-separated llama.cpp quantization types made from the converted file ({', '.join(QUANT_TYPES)}, "
                "...); empty for none."})
    llama_cpp_dir: str | None = field(default=None, metadata={
        "help": "A llama.cpp checkout (with convert_hf_to_gguf.py, conversion/, gguf-py/; build/bin/llama-quantize "
                "is used if built). Default: the llama.cpp sources of the pinned llama-cpp-python source package in "
                "$YAK_CACHE_DIR (~/.cache/yak), fetched once by you with pip (docs/export.md); nothing is "
                "downloaded."})
    check_file: str | None = field(default=None, metadata={
        "help": "Text file (one sample a line): check that llama.cpp tokenizes each line as the Hugging Face "
                "tokenizer does (needs llama-cpp-python)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output_dir."})


def _has_parts(folder: Path, parts: tuple[str, ...] = CONVERTER_PARTS) -> bool:
    return all((folder / part).exists() for part in parts)


def sources_version() -> str:
    """The llama-cpp-python version whose llama.cpp sources convert: the installed one (converter and runtime
    in step), else the pinned one."""
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return LLAMA_CPP_PYTHON_VERSION


def fetch_command(cache_dir: Path | None = None) -> str:
    """The one pip command that fetches the pinned llama.cpp sources (run by the user: the export never downloads)."""
    return (f"pip download --no-deps --no-binary :all: -d {cache_dir or default_cache_dir()} "
            f"llama-cpp-python=={sources_version()}")


def gguf_howto() -> str:
    """How to add GGUF export to this machine, in one line."""
    return (f"to add GGUF: pip install -r {REQUIREMENTS_FILE} (llama.cpp, pinned), then fetch its converter once: "
            f"{fetch_command()} (docs/export.md)")


def _sources_folder(cache_dir: Path | None) -> tuple[Path, Path]:
    """The extracted converter folder and the source package it is extracted from, in the cache."""
    cache, version = cache_dir or default_cache_dir(), sources_version()
    return cache / f"llama.cpp-from-llama-cpp-python-{version}", cache / f"llama_cpp_python-{version}.tar.gz"


def llama_cpp_sources(llama_cpp_dir: str | os.PathLike | None = None, cache_dir: Path | None = None) -> Path:
    """A llama.cpp source folder holding the GGUF converter; nothing is downloaded.

    Args:
        llama_cpp_dir: a llama.cpp checkout given by the user; used as is.
        cache_dir: where the pinned llama-cpp-python source package lies (see :func:`fetch_command`) and its
            converter is extracted to (default :func:`default_cache_dir`).

    Raises:
        YakError: when the given checkout lacks the converter, or the cache holds neither the extracted
            converter nor the source package.
    """
    if llama_cpp_dir is not None:
        folder = Path(llama_cpp_dir)
        if not _has_parts(folder):
            raise YakError(f"--llama_cpp_dir {folder}: expected a llama.cpp checkout with "
                           f"{', '.join(CONVERTER_PARTS)}; missing "
                           f"{[p for p in CONVERTER_PARTS if not (folder / p).exists()]}")
        return folder
    folder, archive = _sources_folder(cache_dir)
    if _has_parts(folder, CACHED_PARTS):
        return folder
    if not archive.is_file():
        raise YakError(f"no llama.cpp converter: neither {folder} nor {archive} exists. Fetch the pinned sources "
                       f"once with: {fetch_command(cache_dir)}; or pass --llama_cpp_dir with a llama.cpp checkout")
    _extract_sources(archive, folder)
    return folder


def _extract_sources(archive: Path, folder: Path) -> None:
    """Keep only the converter's parts of llama-cpp-python's source package (about 2 of its 76 MB)."""
    logger.info("extracting llama.cpp's converter from %s into %s", archive, folder)
    try:
        with cache_entry(folder) as out, tarfile.open(archive) as tar:
            prefix = tar.getmembers()[0].name.split("/")[0] + "/vendor/llama.cpp"
            wanted = [m for m in tar.getmembers() if any(
                m.name == f"{prefix}/{p}" or m.name.startswith(f"{prefix}/{p}/") for p in CACHED_PARTS)]
            for m in wanted:
                m.name = m.name[len(prefix) + 1:]
            tar.extractall(out, members=wanted, filter="data")  # "data": no links or paths out of the folder
    except (OSError, tarfile.TarError) as e:
        raise YakError(f"{archive} cannot be read ({e}); delete it and fetch it again: {fetch_command()}") from None
    if not _has_parts(folder, CACHED_PARTS):
        raise YakError(f"{archive} holds no llama.cpp converter ({', '.join(CACHED_PARTS)}); it is not a "
                       f"llama-cpp-python source package: delete it and run {fetch_command()}")


def gguf_problems(args: GGUFArguments) -> list[str]:
    """What the export of ``args`` needs from llama.cpp and does not find here (empty: it can run). Nothing is
    downloaded or extracted."""
    problems = []
    if args.llama_cpp_dir is not None:
        if not _has_parts(Path(args.llama_cpp_dir)):
            problems.append(f"--llama_cpp_dir {args.llama_cpp_dir}: expected a llama.cpp checkout with "
                            f"{', '.join(CONVERTER_PARTS)}")
    else:
        folder, archive = _sources_folder(None)
        if not _has_parts(folder, CACHED_PARTS) and not archive.is_file():
            problems.append(f"llama.cpp's converter is not in {default_cache_dir()}: fetch the pinned sources once "
                            f"with {fetch_command()}, or pass --llama_cpp_dir")
    qtypes = [q.strip().lower() for q in args.quant_types.split(",") if q.strip()]
    return _runtime_problems(qtypes, args.check_file, args.llama_cpp_dir) + problems


def convert_to_gguf(model_dir: Path, outfile: Path, outtype: str = "f16",
                    llama_cpp_dir: str | os.PathLike | None = None) -> Path:
    """Run llama.cpp's ``convert_hf_to_gguf.py`` on a merged model folder.

    Args:
        model_dir: Hugging Face model folder with config.json, weights and tokenizer files.
        outfile: the .gguf file to write.
        outtype: f16, bf16, f32 or q8_0.
        llama_cpp_dir: a llama.cpp checkout, else the cached sources (see :func:`llama_cpp_sources`).
    """
    src = llama_cpp_sources(llama_cpp_dir)
    # the converter's own gguf-py, which may be newer than the installed gguf package
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src / "gguf-py"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(src / CONVERTER), str(model_dir), "--outfile", str(outfile), "--outtype", outtype]
    logger.info("converting: %s", " ".join(cmd))
    done = subprocess.run(cmd, env=env, capture_output=True, check=False, text=True)
    if done.returncode or not outfile.is_file():
        raise YakError(f"llama.cpp's converter failed on {model_dir}:\n{done.stderr.strip()[-2000:]}")
    return outfile


def _quantize_binary(llama_cpp_dir: str | os.PathLike | None) -> str | None:
    if llama_cpp_dir is not None:
        for sub in ("build/bin/llama-quantize", "llama-quantize"):
            if (Path(llama_cpp_dir) / sub).is_file():
                return str(Path(llama_cpp_dir) / sub)
    return shutil.which("llama-quantize")


def _llama_cpp():
    """The llama-cpp-python module, or None when it is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


def _runtime_problems(qtypes: list[str], check_file: str | None, llama_cpp_dir: str | None) -> list[str]:
    """What the quantization and the tokenizer check need from llama.cpp, known before the conversion runs."""
    binary = _quantize_binary(llama_cpp_dir)
    llama_cpp = _llama_cpp() if check_file or (qtypes and not binary) else None
    problems = []
    if check_file and llama_cpp is None:
        problems.append(f"--check_file needs llama-cpp-python (pip install -r {REQUIREMENTS_FILE}; "
                        "docs/export.md), or leave out --check_file")
    if qtypes and not binary:
        if llama_cpp is None:
            problems.append(f"--quant_types {','.join(qtypes)} needs llama.cpp's llama-quantize (build llama.cpp "
                            f"and pass --llama_cpp_dir) or llama-cpp-python (pip install -r {REQUIREMENTS_FILE}); "
                            "or pass --quant_types ''")
        elif unknown := [q for q in qtypes if not hasattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{q.upper()}")]:
            problems.append(f"--quant_types: unknown {', '.join(unknown)}; llama.cpp knows e.g. "
                            f"{', '.join(QUANT_TYPES)}")
    return problems


def quantize(src: Path, dst: Path, qtype: str, llama_cpp_dir: str | os.PathLike | None = None) -> Path:
    """Quantize a GGUF file with llama.cpp (``llama-quantize`` if found, else llama-cpp-python's bindings).

    Args:
        src: the f16/bf16/f32 GGUF file.
        dst: the quantized file to write.
        qtype: llama.cpp's type name, e.g. ``q4_0`` or ``q4_k_m``.
        llama_cpp_dir: a llama.cpp checkout whose ``build/bin/llama-quantize`` to use.
    """
    binary = _quantize_binary(llama_cpp_dir)
    if binary:
        done = subprocess.run([binary, str(src), str(dst), qtype.upper()], capture_output=True, check=False, text=True)
        if done.returncode:
            raise YakError(f"llama-quantize {qtype} failed:\n{done.stderr.strip()[-2000:]}")
        return dst
    llama_cpp = _llama_cpp()
    if llama_cpp is None:
        raise YakError("quantizing needs llama.cpp's llama-quantize (build llama.cpp and pass --llama_cpp_dir) "
                       f"or llama-cpp-python (pip install -r {REQUIREMENTS_FILE})")
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}", None)
    if ftype is None:
        raise YakError(f"unknown quantization type {qtype!r}; llama.cpp knows e.g. {', '.join(QUANT_TYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise YakError(f"llama.cpp could not quantize {src} to {qtype}")
    return dst


def tokenizer_mismatches(gguf_file: Path, tokenizer_dir: Path, lines: list[str]) -> list[tuple[str, list, list]]:
    """Lines that llama.cpp (reading the GGUF vocabulary) tokenizes differently from the Hugging Face tokenizer.

    Returns:
        ``(line, llama.cpp ids, Hugging Face ids)`` for every line that differs; empty when all agree.
    """
    import llama_cpp

    from yak.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    out = []
    with contextlib.closing(llama_cpp.Llama(str(gguf_file), vocab_only=True, verbose=False)) as llm:
        for line in lines:
            ours, theirs = llm.tokenize(line.encode("utf-8"), add_bos=False, special=False), tok.encode(
                line, add_special_tokens=False)
            if ours != theirs:
                out.append((line, ours, theirs))
    return out


def export_gguf(args: GGUFArguments) -> list[Path]:
    """Convert ``args.model_dir`` to GGUF and quantize it; returns the written files.

    Args:
        args: the export options (see :class:`GGUFArguments`).
    """
    model_dir = Path(args.model_dir)
    qtypes = [q.strip().lower() for q in args.quant_types.split(",") if q.strip()]
    problems = []
    try:  # config, weights and tokenizer files whole; .bin pickles plain tensors
        check_model_folder(model_dir, "--model_dir")
    except YakError as e:
        problems.append(f"{e}; give a merged Hugging Face model folder")
    if not has_tokenizer(model_dir):
        problems.append(f"--model_dir {model_dir}: no tokenizer files; merge with the tokenizer copied")
    if args.outtype not in CONVERT_TYPES:
        problems.append(f"--outtype {args.outtype!r}: choose one of {', '.join(CONVERT_TYPES)}")
    if args.check_file and not Path(args.check_file).is_file():
        problems.append(f"--check_file {args.check_file}: no such file")
    problems += output_dir_problems(args.output_dir, args.overwrite)
    if inputs_inside(args.output_dir, [model_dir]):  # --overwrite would replace the model
        problems.append(f"--output_dir {args.output_dir} is (or contains) the model folder {model_dir}; "
                        "choose a new folder")
    if args.outtype in qtypes:  # the same file name: llama.cpp would write the file it reads
        problems.append(f"--quant_types {args.outtype} is the --outtype file itself; leave it out")
    problems += gguf_problems(args)
    if problems:
        raise YakError("cannot export:\n  - " + "\n  - ".join(problems))
    name = model_dir.resolve().name
    with replace_dir(args.output_dir, overwrite=args.overwrite) as tmp:
        converted = convert_to_gguf(model_dir, tmp / f"{name}-{args.outtype}.gguf", args.outtype, args.llama_cpp_dir)
        files = [converted] + [quantize(converted, tmp / f"{name}-{q}.gguf", q, args.llama_cpp_dir) for q in qtypes]
        if args.check_file:
            lines = [t for t in Path(args.check_file).read_text(encoding="utf-8").splitlines() if t.strip()]
            bad = tokenizer_mismatches(converted, model_dir, lines)
            logger.info("tokenizer check: llama.cpp equals Hugging Face on %d/%d lines", len(lines) - len(bad),
                        len(lines))
            if bad:
                raise YakError(f"llama.cpp tokenizes {len(bad)}/{len(lines)} lines of {args.check_file} "
                               f"differently from the Hugging Face tokenizer, e.g. {bad[0][0][:80]!r}: "
                               f"{bad[0][1][:12]} vs {bad[0][2][:12]}")
    files = [Path(args.output_dir) / f.name for f in files]
    for f in files:
        logger.info("%-40s %8.1f MiB", f.name, f.stat().st_size / 2**20)
    return files
