"""The options of the generation scripts besides the model (:class:`yak.source.ModelSource`): the devices, the
default sampling settings and the engine's capacity, and what ``inference_hf.py`` does."""

from __future__ import annotations

from dataclasses import dataclass, field

from yak import YakError
from yak.generation.engine import Engine
from yak.generation.prompts import stop_token_ids
from yak.generation.sampling import SamplingParams


@dataclass
class GenerationArguments:
    """The devices, the default sampling settings and the engine's capacity (requests may override the sampling
    settings)."""

    gpus: str | None = field(
        default=None, metadata={"help": "GPU ids to use, e.g. '0,1' (sets CUDA_VISIBLE_DEVICES). Default: all."}
    )
    only_cpu: bool = field(default=False, metadata={"help": "Run on the CPU even when a GPU is present."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Quantize weights to 8 bit (needs bitsandbytes)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Quantize weights to 4 bit (needs bitsandbytes)."})
    use_flash_attention_2: bool = field(
        default=False,
        metadata={"help": "Attention through flash-attn 2 (the original project's flag) when it is installed and a "
                  "CUDA GPU is used; otherwise PyTorch's sdpa, and the log says so."},
    )
    max_new_tokens: int = field(default=400, metadata={"help": "Generated tokens at most per answer."})
    temperature: float = field(default=0.2, metadata={"help": "Sampling temperature; 0 = greedy decoding."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling threshold (1 = off)."})
    top_k: int = field(default=40, metadata={"help": "Keep the k most likely tokens (0 = off)."})
    repetition_penalty: float = field(default=1.1, metadata={"help": "Penalty on repeated tokens (1 = off)."})
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "System prompt for chat prompts; default: the chat template's own. '' = none."},
    )
    max_batch_size: int = field(default=16, metadata={"help": "Requests decoded together at most."})
    max_total_tokens: int = field(
        default=2048,
        metadata={"help": "Prompt + answer tokens at most per request (KV cache length per slot); capped at "
                  "the model's max_position_embeddings."},
    )
    cuda_graphs: bool = field(
        default=True, metadata={"help": "On CUDA, replay captured CUDA graphs for decode steps (faster)."}
    )
    compile: bool = field(
        default=False,
        metadata={"help": "On CUDA, also torch.compile the decode step: about 1.3x faster decoding, about 3 "
                  "minutes more start-up for a 7B model."},
    )

    def build_engine(self, model, tokenizer, max_queue: int | None = None) -> "Engine":
        """Start an :class:`Engine` for ``model`` with these capacity settings."""
        return Engine(model, stop_token_ids(model, tokenizer), max_batch_size=self.max_batch_size,
                      max_total_tokens=self.max_total_tokens, cuda_graphs=self.cuda_graphs, compile=self.compile,
                      max_queue=max_queue)

    def problems(self) -> list[str]:
        """What is out of range: the sampling settings and the engine's capacity (empty when valid)."""
        out = [f"--{p}" for p in self.sampling().problems()]
        if self.max_batch_size < 1:  # an engine without slots never starts a request: every one would hang
            out.append(f"--max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_total_tokens < 2:
            out.append(f"--max_total_tokens must be at least 2 (a prompt token and an answer token), got "
                       f"{self.max_total_tokens}")
        elif self.max_new_tokens >= self.max_total_tokens:  # every request would be refused
            out.append(f"--max_new_tokens {self.max_new_tokens} leaves no room for the prompt in "
                       f"--max_total_tokens {self.max_total_tokens}")
        return out

    def check_room(self, max_total_tokens: int) -> None:
        """Raise a :class:`YakError` when ``--max_new_tokens`` leaves no room for a prompt in the loaded model's
        ``max_total_tokens``, which the engine caps at the model's context: every answer would be refused."""
        if self.max_new_tokens >= max_total_tokens:
            raise YakError(f"--max_new_tokens {self.max_new_tokens} leaves no room for the prompt in the model's "
                           f"{max_total_tokens} positions (its max_position_embeddings, below --max_total_tokens "
                           f"{self.max_total_tokens}); lower --max_new_tokens")

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
        )


@dataclass
class InferenceArguments:
    """What ``inference_hf.py`` does: chat interactively, or answer every line of a file."""

    with_prompt: bool = field(
        default=False,
        metadata={"help": "Wrap inputs in the chat template (for chat/SFT models); off: plain text continuation."},
    )
    interactive: bool = field(default=False, metadata={"help": "Chat on the terminal (streams, keeps history)."})
    data_file: str | None = field(default=None, metadata={"help": "Text file with one input per line."})
    predictions_file: str = field(
        default="predictions.json",
        metadata={"help": "Where file mode writes its answers: .json (a list) or .jsonl (one object per line)."},
    )
    use_vllm: bool = field(default=False, metadata={"help": "Generate with vLLM (merged models; pip install vllm)."})
