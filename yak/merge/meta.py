"""Meta's ``consolidated.NN.pth`` layout: tensor names, model-parallel splits, the rotary permutation of
q/k, ``params.json``, and what a model needs to be written in it."""

from __future__ import annotations

import re

import torch

from yak.formats import EMBED_KEY, LM_HEAD_KEY

# Meta splits its checkpoints for model parallelism by size: 7B -> 1 file, 13B -> 2, 33/34B -> 4, 65/70B -> 8.
META_SHARDS_BY_HIDDEN = {4096: 1, 5120: 2, 6656: 4, 8192: 8}
# Hugging Face name (after "model.layers.N.") -> Meta name (after "layers.N.") and the dimension Meta splits
# it along (0: column parallel, 1: row parallel, None: replicated).
META_LAYER_NAMES = {
    "self_attn.q_proj.weight": ("attention.wq.weight", 0),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
}
META_TOP_NAMES = {EMBED_KEY: ("tok_embeddings.weight", 1), "model.norm.weight": ("norm.weight", None),
                  LM_HEAD_KEY: ("output.weight", 0)}


def check_pth(config: dict, shapes: dict, num_shards: int | None, problems: list[str]) -> None:
    """Note in ``problems`` why the merged model (``config``, output ``shapes``) cannot be written in Meta's
    layout split into ``num_shards`` parts (None: as Meta splits it)."""
    if config.get("attention_bias") or config.get("mlp_bias"):
        problems.append("--output_type pth: Meta's layout has no biases, but the base model has some")
    if num_shards is not None and num_shards < 1:
        problems.append(f"--num_shards must be at least 1, got {num_shards}")
        return
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    mp = num_shards or META_SHARDS_BY_HIDDEN.get(hidden, 1)
    vocab = shapes[EMBED_KEY][0]
    for what, n in [("hidden_size", hidden), ("num_key_value_heads", kv), ("intermediate_size",
                    config["intermediate_size"]), ("vocab_size", vocab)]:
        if n % mp:
            problems.append(f"--output_type pth: {what} {n} is not divisible by {mp} shards; choose "
                            "--num_shards accordingly")
    unknown = [k for k in shapes if k not in META_TOP_NAMES and _meta_layer_name(k) is None]
    if unknown:
        problems.append(f"--output_type pth: tensors without a Meta name: {unknown[:5]}")


def _meta_layer_name(name: str) -> tuple[str, int | None] | None:
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if not m or m[2] not in META_LAYER_NAMES:
        return None
    meta, dim = META_LAYER_NAMES[m[2]]
    return f"layers.{m[1]}.{meta}", dim


def meta_name(name: str) -> tuple[str, int | None]:
    """Meta's name for a Hugging Face Llama tensor, and the dimension Meta splits it along."""
    return META_TOP_NAMES.get(name) or _meta_layer_name(name)


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the rotary permutation that transformers' Llama conversion applies to q/k projections.

    Meta's checkpoints rotate interleaved pairs (x0, x1), (x2, x3), ...; the Hugging Face layout rotates
    the two halves of each head. ``permute`` there is ``view(heads, d/heads/2, 2, in).transpose(1, 2)``.
    """
    out, inp = w.shape  # (heads * head_dim, hidden)
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def meta_params(config: dict, vocab_size: int) -> dict:
    """Meta's ``params.json`` for a Llama config; ``multiple_of``/``ffn_dim_multiplier`` reproduce its FFN."""
    dim, ffn = config["hidden_size"], config["intermediate_size"]
    base = int(2 * 4 * dim / 3)

    def meta_ffn(multiple_of: int, mult: float | None) -> int:  # Meta's FeedForward sizing
        h = int(mult * base) if mult is not None else base
        return multiple_of * ((h + multiple_of - 1) // multiple_of)

    candidates = [(2**k, None) for k in range(12, -1, -1)] + [(2**k, ffn / base) for k in range(12, -1, -1)]
    multiple_of, mult = next(((m, f) for m, f in candidates if meta_ffn(m, f) == ffn), (1, (ffn + 0.5) / base))
    params = {"dim": dim, "n_layers": config["num_hidden_layers"], "n_heads": config["num_attention_heads"],
              "n_kv_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
              "vocab_size": vocab_size, "multiple_of": multiple_of, "norm_eps": config["rms_norm_eps"],
              "rope_theta": config.get("rope_theta", 10000.0)}
    if mult is not None:
        params["ffn_dim_multiplier"] = mult
    return params
