"""What a base, adapter and merged folder contain, and how each is read, checked and fingerprinted.

One home for the on-disk formats (``docs/formats.md``) and the rules of reading them (``docs/safety.md``):

* **base** model folder: ``config.json``, weights (``model.safetensors``, shards with their ``.index.json``,
  or ``pytorch_model.bin``), tokenizer files;
* **stage-1 output**: ``yak_adapter.json`` + ``embeddings.safetensors``;
* **LoRA adapter** (stage 2, SFT): peft's ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``);
* **merged** model: a base folder with ``yak_merge.json`` (what was merged into it, on which base).

Training outputs also hold ``yak_base.json``, the identity of the base they were trained for, which
:func:`adapter_base_problems` compares with the base given to train, merge, inference, serving and evaluation.

Nothing here runs code from data: weights are read with safetensors, and every pickle through
:mod:`yak.safe_load` (``weights_only=True`` and an allowlist of exactly the types the Trainer and DeepSpeed
store). A file that is cut short or corrupt becomes a :class:`~yak.YakError` naming it, never a traceback from
deep in a library.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from yak import YakError
from yak.io import read_json, unreadable
from yak.safe_load import pickle_problem, torch_load, trust_pickle

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ file names

CONFIG_FILE = "config.json"
EMBEDDINGS_FILE = "embeddings.safetensors"
# The weight files of a stage-1 output and of a LoRA adapter: safetensors, or PyTorch .bin files (a torch.save of
# the state dict, train.py --save_safetensors False, as the original project wrote), read as plain tensors only.
EMBEDDINGS_FILES = (EMBEDDINGS_FILE, "embeddings.bin")
YAK_ADAPTER_FILE = "yak_adapter.json"
YAK_ADAPTER_FORMAT = "yak-embeddings"
YAK_ADAPTER_VERSION = 1
ADAPTER_CONFIG_FILE = "adapter_config.json"
RUN_FILE = "yak_run.json"  # a training output's settings, with the --adapters it was trained on top of
MERGE_FILE = "yak_merge.json"  # in a merged model: its base and the folders merged into it
BASE_FILE = "yak_base.json"  # in a training output: the identity of the base it was trained for
BASE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # each alone or sharded with "<name>.index.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# Files that make up a tokenizer folder (copied verbatim by the merge, so that llama.cpp's converter sees
# what transformers sees). A folder *has* a tokenizer when it has one of TOKENIZER_MODELS: a
# tokenizer_config.json alone cannot be loaded.
TOKENIZER_MODELS = ("tokenizer.json", "tokenizer.model")
TOKENIZER_FILES = (*TOKENIZER_MODELS, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja")

EMBED_KEY = "model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"
PEFT_PREFIX = "base_model.model."  # peft's prefix of a causal LM's keys; ".modules_to_save.<name>" stripped
PEFT_EMBED_KEY = PEFT_PREFIX + EMBED_KEY
PEFT_LM_HEAD_KEY = PEFT_PREFIX + LM_HEAD_KEY
VOCAB_MULTIPLE = 64  # rows padded to a multiple of 64: tensor-core friendly, the usual choice (LLaMA-Factory)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}  # its spec's names
SAFETENSORS_TORCH = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def padded_vocab_size(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`VOCAB_MULTIPLE`: the rows training resizes a vocabulary to."""
    return -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


# ------------------------------------------------------------------------------------------------ weights


def weight_files(folder: str | os.PathLike, stems: Sequence[str] = BASE_WEIGHTS) -> list[Path] | None:
    """The weight files of ``folder``: the first of ``stems`` found alone or through its ``.index.json``."""
    folder = Path(folder)
    for stem in stems:
        index = folder / f"{stem}.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise unreadable(index, ValueError("no weight_map"))
            return [folder / n for n in sorted(set(weight_map.values()))]
        if (folder / stem).is_file():
            return [folder / stem]
    return None


def check_weight_file(path: str | os.PathLike) -> None:
    """Raise for a weight file that cannot be read: a safetensors file cut short (its header covers the data),
    or a pickle that is not plain tensors."""
    from safetensors import SafetensorError, safe_open

    if str(path).endswith(".safetensors"):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (OSError, SafetensorError) as e:
            raise unreadable(path, e) from e
        return
    if not trust_pickle():
        problem = pickle_problem(path)
        if problem:
            raise problem


class WeightHandle:
    """One open weight file: safetensors through ``safe_open`` or a ``.bin`` through :func:`torch_load`."""

    def __init__(self, path: Path, st=None, sd: dict | None = None):
        self._path, self._st, self._sd = path, st, sd

    def keys(self) -> list[str]:
        return list(self._st.keys()) if self._st is not None else list(self._sd)

    def shape_dtype(self, k: str) -> tuple[tuple[int, ...], torch.dtype]:
        if self._st is not None:
            s = self._st.get_slice(k)
            return tuple(s.get_shape()), SAFETENSORS_TORCH.get(s.get_dtype(), torch.float32)
        t = self._sd[k]
        return tuple(t.shape), t.dtype

    def get(self, k: str) -> torch.Tensor:
        from safetensors import safe_open

        if self._sd is not None:
            return self._sd[k]
        # A fresh mapping per tensor: pages of a mapping count in the resident memory until it is closed,
        # so one mapping held for the whole file grows to the file's size (measured on bench/merge_memory.py,
        # 0.74 GiB shards: peak 1.74 GiB with one mapping per file, 0.87 GiB with one per tensor).
        with safe_open(str(self._path), framework="pt", device="cpu") as st:
            return st.get_tensor(k)


@contextlib.contextmanager
def open_weights(path: Path) -> Iterator[WeightHandle]:
    from safetensors import safe_open

    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt", device="cpu") as st:
            yield WeightHandle(path, st=st)
        return
    try:  # zip-format .bin files map lazily; legacy pickles must be read whole
        sd = torch_load(path, map_location="cpu", mmap=True)
    except YakError:
        sd = torch_load(path, map_location="cpu")
    yield WeightHandle(path, sd=sd)
    del sd


class WeightIndex:
    """Names, shapes and dtypes of the tensors of one or more weight files, read from their headers."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.file_of: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for f in files:
            check_weight_file(f)
            try:
                with open_weights(f) as h:
                    for k in h.keys():  # noqa: SIM118 - a handle, not a dict
                        self.file_of[k] = f
                        self.shapes[k], self.dtypes[k] = h.shape_dtype(k)
            except (OSError, RuntimeError, ValueError) as e:  # safetensors' and torch's errors on a bad file
                raise unreadable(f, e) from e


# ------------------------------------------------------------------------------------------------ folders


def read_config(folder: str | os.PathLike, what: str = "model folder") -> dict:
    """The ``config.json`` of a model folder; a clear error when there is none or it is broken."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise YakError(f"{what} {folder} has no {CONFIG_FILE}; pass a Hugging Face model folder")
    return read_json(path)


def check_model_folder(folder: str | os.PathLike, what: str = "model folder") -> dict:
    """Check a base or merged model folder before anything large is loaded; return its config.

    Its ``config.json`` must parse, its weight files (safetensors, or ``.bin`` holding plain tensors) must be
    there and whole, its tokenizer files (if any) must parse.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise YakError(f"{what} {folder} is not a folder")
    config = read_config(folder, what)
    files = weight_files(folder)
    if files is None:
        found = sorted(p.name for p in folder.iterdir())[:12]
        raise YakError(f"{what} {folder} has no weights ({' or '.join(BASE_WEIGHTS)}, alone or sharded with an "
                       f"index; found {', '.join(found)})")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise YakError(f"{what} {folder}: its index names shards that are missing: {', '.join(missing[:5])}")
    for f in files:
        check_weight_file(f)
    check_tokenizer_files(folder)
    return config


def check_tokenizer_files(folder: str | os.PathLike) -> None:
    """Raise for a tokenizer file that is cut short or corrupt (JSON that does not parse, a ``tokenizer.model``
    that is not a whole SentencePiece model), before transformers meets it and reports something else
    (a cut ``tokenizer.model`` made it say "tiktoken is required")."""
    folder = Path(folder)
    for name in TOKENIZER_FILES:
        if name.endswith(".json") and (folder / name).is_file():
            read_json(folder / name)
    sp = folder / "tokenizer.model"
    if sp.is_file():
        from google.protobuf.message import DecodeError
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        try:
            proto.ParseFromString(sp.read_bytes())
        except DecodeError as e:
            raise unreadable(sp, e) from e
        # fields are written in number order, the pieces first: a file cut between two fields parses, short
        if not proto.pieces or not proto.HasField("normalizer_spec"):
            raise unreadable(sp, ValueError("not a whole SentencePiece model"))


def has_tokenizer(folder: str | os.PathLike) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_MODELS)


def tokenizer_dir(base_model: str | os.PathLike, adapters: Sequence[str | os.PathLike] = (),
                  tokenizer_path: str | os.PathLike | None = None) -> Path:
    """The tokenizer of base + adapters: ``tokenizer_path`` when given, else the last adapter folder that has
    one (training saves its tokenizer into every output), else the base model's."""
    if tokenizer_path:
        return Path(tokenizer_path)
    return next((Path(a) for a in reversed(adapters) if has_tokenizer(a)), Path(base_model))


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of how the tokenizer turns text into ids and back: its full serialization (vocabulary, merges,
    normalizer, special tokens), its special-token map and chat template; the folder's name does not count."""
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps([tokenizer.special_tokens_map, tokenizer.chat_template, tokenizer.eos_token_id],
                        sort_keys=True).encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ adapters


def read_stage1(folder: str | os.PathLike) -> dict:
    """The ``yak_adapter.json`` of a stage-1 output, checked to be this format and version."""
    folder = Path(folder)
    info = read_json(folder / YAK_ADAPTER_FILE)
    if info.get("format") != YAK_ADAPTER_FORMAT or info.get("version") != YAK_ADAPTER_VERSION:
        raise YakError(f"{folder / YAK_ADAPTER_FILE}: format {info.get('format')!r} version {info.get('version')!r} "
                       f"is not {YAK_ADAPTER_FORMAT!r} version {YAK_ADAPTER_VERSION}")
    if weights_in(folder, EMBEDDINGS_FILES) is None:
        raise YakError(f"{folder} has {YAK_ADAPTER_FILE} but no {' or '.join(EMBEDDINGS_FILES)}")
    return info


def weights_in(folder: str | os.PathLike, names: Sequence[str]) -> Path | None:
    """The first of the weight files ``names`` that ``folder`` holds (None: none)."""
    return next((Path(folder) / n for n in names if (Path(folder) / n).is_file()), None)


def adapter_weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a stage-1 output or a peft adapter folder (see :func:`adapter_kind`)."""
    folder = Path(folder)
    if (folder / YAK_ADAPTER_FILE).is_file():
        return [weights_in(folder, EMBEDDINGS_FILES) or folder / EMBEDDINGS_FILE]
    files = weight_files(folder, ADAPTER_WEIGHTS)
    if files is None:
        raise YakError(f"adapter {folder} has {ADAPTER_CONFIG_FILE} but no {' or '.join(ADAPTER_WEIGHTS)}")
    return files


def adapter_kind(folder: str | os.PathLike) -> str:
    """``"embeddings"`` (stage 1) or ``"lora"`` (peft adapter); raise for anything else.

    The folder's files are checked here, before anything large is loaded: a JSON file that is not JSON or a
    weight file cut short is a :class:`YakError` naming the file, not a traceback from deep in peft.
    """
    folder = Path(folder)
    if (folder / YAK_ADAPTER_FILE).is_file():
        read_stage1(folder)
        kind = "embeddings"
    elif (folder / ADAPTER_CONFIG_FILE).is_file():
        read_json(folder / ADAPTER_CONFIG_FILE)
        kind = "lora"
    elif not folder.is_dir():
        raise YakError(f"adapter folder {folder} does not exist")
    else:
        raise YakError(f"{folder} is neither a stage-1 output ({YAK_ADAPTER_FILE}) nor a peft adapter "
                       f"({ADAPTER_CONFIG_FILE})")
    for f in adapter_weight_files(folder):
        check_weight_file(f)
    check_tokenizer_files(folder)
    return kind


def adapter_vocab_rows(folder: str | os.PathLike) -> int | None:
    """Number of embedding rows an adapter folder carries (None if it carries no embeddings)."""
    if adapter_kind(folder) == "embeddings":
        return int(read_stage1(folder)["vocab_size"])
    shapes = WeightIndex(adapter_weight_files(folder)).shapes
    return shapes[PEFT_EMBED_KEY][0] if PEFT_EMBED_KEY in shapes else None


def carries_lm_head(folder: str | os.PathLike) -> bool:
    """Whether an adapter folder brings a full ``lm_head`` matrix (untied stage-1 output, or modules_to_save)."""
    if adapter_kind(folder) == "embeddings":
        return not read_stage1(folder)["tie_word_embeddings"]
    return PEFT_LM_HEAD_KEY in WeightIndex(adapter_weight_files(folder)).shapes


def adapter_order_problems(base_model: str | os.PathLike | None, adapters: Sequence[str | os.PathLike]) -> list[str]:
    """Adapters that cannot apply in this order on this base, as the folders' own records say.

    Stages apply in the order they were trained (stage 1, CPT, SFT): a folder must not come after one that
    its ``yak_run.json`` says was trained on top of it (the reverse order loads without error but gives the
    earlier stage's embeddings). A folder that the base's ``yak_merge.json`` lists is merged into it already
    (applying it again adds its LoRA update twice). Folders moved since are not recognised, so this never
    refuses a correct list.
    """
    resolved = [Path(a).resolve() for a in adapters]
    problems = []
    for i, folder in enumerate(adapters):
        for earlier in _recorded(Path(folder) / RUN_FILE, ("identity", "adapters")):
            if Path(earlier).resolve() in resolved[i + 1:]:
                problems.append(f"{folder} was trained on top of {earlier}, so it must come after it "
                                "(order: stage 1, stage 2 / CPT, SFT)")
    merged = {Path(p).resolve() for p in merged_adapters(base_model)} if base_model else set()
    problems += [f"{a} is merged into {base_model} already; leave it out" for a, r in zip(adapters, resolved)
                 if r in merged]
    return problems


def merged_adapters(model_dir: str | os.PathLike) -> list[str]:
    """The folders merged into ``model_dir`` as its ``yak_merge.json`` lists them (empty for other models)."""
    return _recorded(Path(model_dir) / MERGE_FILE, ("adapters",))


def _recorded(path: Path, keys: tuple[str, ...]):
    """The value at ``keys`` in a JSON record of a Yak output (a list unless ``keys`` ends at a dict); empty
    when there is none."""
    if not path.is_file():  # not a Yak output: nothing recorded
        return []
    try:
        value = read_json(path)
        for key in keys:
            value = value[key]
    except (YakError, KeyError, TypeError):  # unreadable, or written by another version: nothing to check
        return []
    return value if isinstance(value, (list, dict)) else []


# ------------------------------------------------------------------------------------------------ base identity

# The config fields that decide which weights fit and what they mean; the fingerprint is taken over these only,
# so that re-saving a config (other transformers version, dtype) keeps it.
IDENTITY_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "vocab_size", "tie_word_embeddings")


def base_record(model_dir: str | os.PathLike, tokenizer=None) -> dict:
    """The identity of a base model, as training records it in ``yak_base.json`` (docs/formats.md).

    Layers, hidden size, vocabulary, a fingerprint of the config's :data:`IDENTITY_FIELDS` and of the base's
    tokenizer. A merged model answers with the record of the base it was merged from (its ``yak_merge.json``),
    so an SFT adapter trained on base + stage outputs also fits the model they were merged into.

    Args:
        model_dir: the base (or merged) model folder.
        tokenizer: the base's own tokenizer, if already loaded; else the folder's is loaded (none: no
            tokenizer fingerprint).
    """
    inherited = _recorded(Path(model_dir) / MERGE_FILE, ("base_record",))
    if isinstance(inherited, dict) and inherited:
        return inherited
    config = read_config(model_dir)
    fields = {k: config.get(k) for k in IDENTITY_FIELDS}
    fields["num_key_value_heads"] = fields["num_key_value_heads"] or fields["num_attention_heads"]
    fields["tie_word_embeddings"] = bool(fields["tie_word_embeddings"])
    if tokenizer is None and has_tokenizer(model_dir):
        from yak.tokenizer import load_tokenizer  # the one tokenizer loader (a helper reaching up, lazily)

        tokenizer = load_tokenizer(model_dir)
    return {
        "path": str(Path(model_dir).resolve()),
        "num_hidden_layers": fields["num_hidden_layers"],
        "hidden_size": fields["hidden_size"],
        "vocab_size": fields["vocab_size"],
        "config_sha256": hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest(),
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
    }


def _describe(record: dict) -> str:
    tok = record.get("tokenizer_sha256")
    return (f"{record.get('path')} ({record.get('num_hidden_layers')} layers, hidden size {record.get('hidden_size')}, "
            f"vocabulary {record.get('vocab_size')}, config {str(record.get('config_sha256'))[:12]}, tokenizer "
            f"{tok[:12] if tok else 'none'})")


def adapter_base_problems(base_model: str | os.PathLike, adapters: Sequence[str | os.PathLike]
                          ) -> tuple[list[str], list[str]]:
    """Whether each adapter was made for ``base_model``: ``(problems, warnings)``.

    An adapter trained by Yak carries ``yak_base.json``: its layers, hidden size, vocabulary and the config and
    tokenizer fingerprints must equal the base's. Every adapter's tensors are also compared with the base's
    (headers only): a LoRA update of a layer the base lacks, a layer of the base without one, or a matrix of
    another width. An adapter without the record (made elsewhere) gets only these shape checks, and a warning.
    """
    base_model = Path(base_model)
    record, shapes = None, None
    problems, warnings = [], []
    for folder in map(Path, adapters):
        if (folder / BASE_FILE).is_file():
            recorded = read_json(folder / BASE_FILE)
            record = record or base_record(base_model)
            keys = ("num_hidden_layers", "hidden_size", "vocab_size", "config_sha256", "tokenizer_sha256")
            if any(recorded.get(k) is not None and record.get(k) is not None and recorded[k] != record[k]
                   for k in keys):
                problems.append(f"{folder} was trained for the base {_describe(recorded)}, but the base given is "
                                f"{_describe(record)}: give the base it was trained for")
                continue
        else:
            warnings.append(f"{folder} has no {BASE_FILE} (not trained by this toolkit, or by an older version): "
                            f"only its shapes are checked against {base_model}")
        shapes = shapes or _base_shapes(base_model)
        problems += _shape_problems(base_model, shapes, folder)
    return problems, warnings


def _base_shapes(base_model: Path) -> dict[str, tuple[int, ...]]:
    """The base's tensor shapes (headers only), a tied model's ``lm_head`` included; empty without weights."""
    files = weight_files(base_model)
    shapes = dict(WeightIndex(files).shapes) if files else {}
    if EMBED_KEY in shapes:
        shapes.setdefault(LM_HEAD_KEY, shapes[EMBED_KEY])
    return shapes


def _shape_problems(base_model: Path, base: dict[str, tuple[int, ...]], folder: Path) -> list[str]:
    """Tensors of an adapter that do not fit the base's (names and widths; rows of the vocabulary may grow)."""
    config = read_config(base_model)
    hidden, layers = config.get("hidden_size"), config.get("num_hidden_layers")
    if adapter_kind(folder) == "embeddings":
        width = WeightIndex(adapter_weight_files(folder)).shapes.get(EMBED_KEY, (0, hidden))[1]
        if width == hidden:
            return []
        return [f"{folder} holds embeddings of width {width}, the base {base_model} has hidden size {hidden}"]
    shapes = WeightIndex(adapter_weight_files(folder)).shapes
    missing, wrong, seen_layers = [], [], set()
    for key, shape in shapes.items():
        if not base or "lora_embedding_" in key or ".modules_to_save." in key or ".original_module." in key:
            continue  # embedding LoRA (rare) is left to peft; the duplicates of save_embedding_layers are skipped
        m = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+)\.lora_([AB])\.weight", key)
        name = (m[1] if m else key.removeprefix(PEFT_PREFIX).replace(".base_layer", "")).removesuffix(".weight")
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if layer:
            seen_layers.add(int(layer[1]))
        if f"{name}.weight" not in base:
            missing.append(name)
            continue
        want = base[f"{name}.weight"]
        # LoRA A is (r, in), B (out, r); a full matrix (modules_to_save) may have more rows (vocabulary)
        dim = (1 if m[2] == "A" else 0) if m else None
        fits = shape[dim] == want[dim] if m else (len(shape) == len(want) and shape[1:] == want[1:])
        if not fits:
            wrong.append(f"{key} {list(shape)} vs {list(want)}")
    problems = []
    if missing:
        problems.append(f"{folder} has weights for {len(missing)} modules that the base {base_model} ({layers} "
                        f"layers) lacks, e.g. {missing[0]}: it was made for another base")
    if wrong:
        problems.append(f"{folder} does not fit the base {base_model}: {wrong[0]}"
                        f"{f' (and {len(wrong) - 1} more)' if len(wrong) > 1 else ''}; it was made for another base")
    cfg = read_json(folder / ADAPTER_CONFIG_FILE)
    if seen_layers and layers and not cfg.get("layers_to_transform") and not missing:
        absent = sorted(set(range(layers)) - seen_layers)
        if absent:
            problems.append(f"{folder} has LoRA weights for {len(seen_layers)} layers, the base {base_model} has "
                            f"{layers} (none for layer {absent[0]}): it was made for another base")
    return problems


def require_adapters_fit(base_model: str | os.PathLike, adapters: Sequence[str | os.PathLike]) -> None:
    """Raise a :class:`YakError` listing :func:`adapter_base_problems`; log its warnings."""
    problems, warnings = adapter_base_problems(base_model, adapters)
    for w in warnings:
        logger.warning("%s", w)
    if len(problems) == 1:
        raise YakError(f"adapter and base do not belong together: {problems[0]}")
    if problems:
        raise YakError("adapter and base do not belong together:\n  - " + "\n  - ".join(problems))


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a weight file (safetensors, or ``.bin`` through :func:`yak.safe_load.torch_load`)."""
    path = Path(path)
    check_weight_file(path)
    try:
        with open_weights(path) as h:
            return {k: h.get(k) for k in h.keys()}  # noqa: SIM118 - a handle, not a dict
    except (OSError, RuntimeError, ValueError) as e:  # safetensors' and torch's errors on a bad file
        raise unreadable(path, e) from e
