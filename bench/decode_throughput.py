"""Decode speed on one GPU: plain ``generate`` (baseline) against the toolkit's engine and server, side by side.

A Llama-2-7B-shaped model with random weights (vocabulary 55,296, bf16, SDPA), greedy, prompts of 64 tokens,
128 new tokens (end tokens ignored so every answer has 128). Prints ``RESULT`` lines:

- baseline: ``model.generate`` at batch 1 and 16 (as ``../shared/bench/decode_baseline.py``);
- engine, one stream: one request through :class:`yak.generation.engine.Engine` with CUDA graphs of the eager decode
  step, then of the ``torch.compile``'d one, as a share of the card's bandwidth limit (weight bytes read per
  token / measured copy bandwidth);
- engine, 16 requests submitted together;
- server: 16 concurrent HTTP clients on ``/v1/chat/completions`` of the real Flask app on waitress, as serve_demo.py runs it.

Needs torch, transformers and flask (+ werkzeug). Run from the repository root: ``python bench/decode_throughput.py``
(about 8 minutes on an H200); ``--one_stream`` measures only the engine's one stream (about 5 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
import urllib.request

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from yak.generation.engine import Engine  # noqa: E402
from yak.generation.sampling import SamplingParams  # noqa: E402
from yak.server import ChatService, ServerArguments, create_app, make_server  # noqa: E402
from yak.template import LLAMA2_CHAT_TEMPLATE  # noqa: E402

PROMPT, NEW, CLIENTS = 64, 128, 16
GREEDY = SamplingParams(max_new_tokens=NEW, temperature=0, repetition_penalty=1.0)


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def copy_bandwidth() -> float:
    """Bytes per second moved by a large device-to-device copy (read + write)."""
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    seconds = min(timed(lambda: b.copy_(a)) for _ in range(5))
    return 2 * a.numel() / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one_stream", action="store_true",
                        help="only the engine's one-stream speed (no generate baseline, batch or server runs)")
    one_stream = parser.parse_args().one_stream
    cfg = LlamaConfig(vocab_size=55296, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    model.generation_config.pad_token_id = 0
    name = torch.cuda.get_device_name()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    limit = copy_bandwidth() / weight_bytes  # tokens/s if one decode step only had to read the weights once
    print(f"RESULT card {name}: {weight_bytes / 1e9:.1f} GB of weights, bandwidth limit {limit:.0f} tokens/s "
          f"per stream", flush=True)

    # --- baseline: plain generate
    for batch in () if one_stream else (1, CLIENTS):
        ids = torch.randint(100, 50000, (batch, PROMPT), device="cuda")
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        dt = timed(lambda: model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False))
        print(f"RESULT baseline generate bs={batch}: {batch * NEW / dt:.1f} tokens/s total", flush=True)

    # --- the engine (CUDA graphs of the eager decode step, then of the torch.compile'd one), then the server
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(__file__), "..", "models", "stories260K"))
    tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    prompts = [torch.randint(100, 50000, (PROMPT,)).tolist() for _ in range(CLIENTS)]
    for label, compile_ in (("graphs", False), ("graphs+compile", True)):
        start = time.perf_counter()
        engine = Engine(model, eos_token_ids=(), max_batch_size=CLIENTS, max_total_tokens=512, compile=compile_)
        print(f"RESULT engine[{label}] start-up: {time.perf_counter() - start:.1f} s", flush=True)
        engine.submit(prompts[0], GREEDY).wait()  # warm-up
        dt = timed(lambda: engine.submit(prompts[0], GREEDY).wait())
        print(f"RESULT engine[{label}] 1 stream: {NEW / dt:.1f} tokens/s = {NEW / dt / limit:.0%} of the bandwidth "
              f"limit", flush=True)
        if one_stream:
            continue
        engine.generate(prompts, GREEDY)
        dt = timed(lambda: engine.generate(prompts, GREEDY))
        print(f"RESULT engine[{label}] {CLIENTS} requests together: {CLIENTS * NEW / dt:.1f} tokens/s total",
              flush=True)

        args = ServerArguments(max_new_tokens_cap=NEW)
        service = ChatService(engine, tokenizer, GREEDY, None, args, "random-7b")
        server = make_server(create_app(service), socket.create_server(("127.0.0.1", 0)), args)
        threading.Thread(target=server.run, daemon=True).start()
        url = f"http://127.0.0.1:{server.effective_port}/v1/chat/completions"
        for _ in ("warm-up", "timed"):
            counts, dt = concurrent_clients(url)
        print(f"RESULT server[{label}] {CLIENTS} concurrent clients: {sum(counts) / dt:.1f} tokens/s total "
              f"({sum(counts)} tokens in {dt:.2f} s)", flush=True)
        server.close()
        server.task_dispatcher.shutdown()


def concurrent_clients(url: str) -> tuple[list[int], float]:
    """``CLIENTS`` threads post one chat completion each at the same time; their token counts and the wall time."""
    counts = [0] * CLIENTS

    def ask(i: int) -> None:
        body = {"model": "random-7b", "max_tokens": NEW, "temperature": 0,
                "messages": [{"role": "user", "content": f"Request {i}: tell me a long story about the sea."}]}
        req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            counts[i] = json.load(r)["usage"]["completion_tokens"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(CLIENTS)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts, time.perf_counter() - start


if __name__ == "__main__":
    main()
