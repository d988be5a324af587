"""Latency and throughput of the real server: the tiny model, 1 client and then 16 concurrent clients.

Starts ``serve_demo.py`` with ``models/stories260K`` on a free port (greedy, end tokens honoured), on the CPU or
(``--device gpu``) on the GPU with CUDA graphs (``bench/gpu_checks.sh``'s job ``serve``), then each
client posts ``--requests`` chat completions one after another. Prints p50/p95 latency per request and generated
tokens per second in total, as a table and as ``RESULT`` lines. Run from the repository root:
``python bench/serve_latency.py [--clients 16] [--requests 8] [--max_new_tokens 64] [--torch_threads 1]
[--device cpu|gpu]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ["Tell me a story about a cat.", "What did Lily find in the park?", "Why is the sky blue?",
             "Who is Tom's best friend?"]


def start_server(port: int, max_new_tokens: int, torch_threads: int, device: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(torch_threads)}
    cmd = [sys.executable, "serve_demo.py", "--base_model", "models/stories260K", "--port", str(port),
           "--temperature", "0", "--max_new_tokens", str(max_new_tokens), "--max_total_tokens", "512",
           "--max_new_tokens_cap", str(max_new_tokens)] + (["--only_cpu"] if device == "cpu" else [])
    log = tempfile.TemporaryFile()  # noqa: SIM115 - the server's messages, read if it does not start
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    proc.kill()
    log.seek(0)
    raise SystemExit("the server did not start:\n" + log.read().decode(errors="replace")[-3000:])


def run_clients(url: str, clients: int, requests: int) -> tuple[list[float], int, float]:
    """Latencies (s), generated tokens and wall time of ``clients`` threads posting ``requests`` each."""
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(requests):
            body = {"model": "tiny", "messages": [{"role": "user", "content": f"{QUESTIONS[(c + r) % 4]} ({c}.{r})"}]}
            req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
            start = time.perf_counter()
            with urllib.request.urlopen(req, timeout=600) as resp:
                n = json.load(resp)["usage"]["completion_tokens"]
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens[0] += n

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, tokens[0], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--torch_threads", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_server(port, args.max_new_tokens, args.torch_threads, args.device)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        run_clients(url, 1, 2)  # warm-up
        rows = []
        for clients in (1, args.clients):
            lat, tokens, wall = run_clients(url, clients, args.requests)
            q = statistics.quantiles(lat, n=20)
            rows.append((clients, len(lat), statistics.median(lat), q[18], tokens / wall, len(lat) / wall))
    finally:
        proc.terminate()
        proc.wait()
    print("\n| clients | requests | p50 latency (s) | p95 latency (s) | tokens/s | requests/s |")
    print("|---|---|---|---|---|---|")
    for c, n, p50, p95, tps, rps in rows:
        print(f"| {c} | {n} | {p50:.2f} | {p95:.2f} | {tps:.0f} | {rps:.1f} |")
    for c, n, p50, p95, tps, rps in rows:
        print(f"RESULT serve {args.device} tiny clients={c}: p50 {p50:.2f} s, p95 {p95:.2f} s, {tps:.0f} tokens/s, "
              f"{rps:.1f} requests/s")


if __name__ == "__main__":
    main()
