"""Low-memory merge of stage-1 embeddings and LoRA adapters into a Llama base model.

The merge streams: every output tensor is computed on its own (in float32, from memory-mapped base and
adapter files), checked for NaN/inf, cast to the output dtype and appended to the output file, so the
resident memory stays near one base shard plus one tensor, whatever the model size. Two layouts are written:

* ``huggingface``: ``model-0000i-of-0000N.safetensors`` shards with ``model.safetensors.index.json``,
  ``config.json`` (with the merged ``vocab_size`` and tying), the generation config and the tokenizer;
* ``pth``: Meta's layout, ``consolidated.NN.pth`` split for model parallelism as Meta splits 7B/13B/70B,
  ``params.json``, the q/k rotary permutation of the Hugging Face conversion undone, and the tokenizer.

Inputs apply in order, as training produced them: base -> resized vocabulary -> stage-1 embeddings
(``yak_adapter.json`` + ``embeddings.safetensors``) -> peft LoRA adapters (CPT, then SFT), whose
``modules_to_save`` carry the full trained embeddings. Everything is validated before anything is written.

A module per concern, each importing only from those above it:

- :mod:`yak.merge.meta`: Meta's ``.pth`` names, splits and ``params.json`` (``meta_params``).
- :mod:`yak.merge.plan`: ``MergeArguments``; every input read and checked, every output tensor planned
  (``plan_merge``).
- :mod:`yak.merge.compute`: each merged tensor computed from memory-mapped inputs (``iter_merged``).
- :mod:`yak.merge.write`: ``StreamingSafetensorsWriter``; the Hugging Face and ``.pth`` layouts written.
- :mod:`yak.merge.run`: the entry point (``merge``).

``merge_lora_low_mem.py`` uses the entry points re-exported here.
"""

from yak.merge.meta import meta_params
from yak.merge.plan import MergeArguments, plan_merge
from yak.merge.run import merge

__all__ = ["MergeArguments", "merge", "meta_params", "plan_merge"]
