"""serve_demo.py and inference_hf.py as real processes: HTTP on a free port, the openai client, stdin/stdout."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from openai import OpenAI

ROOT = Path(__file__).resolve().parent.parent
MAX_NEW = 32
# Greedy decoding and small limits, so that answers are comparable and the limits easy to hit.
GEN = ["--temperature", "0", "--max_new_tokens", str(MAX_NEW), "--max_total_tokens", "512"]
LIMITS = ["--max_new_tokens_cap", "64", "--max_body_bytes", "4096", "--max_query_chars", "300",
          "--max_history_turns", "3"]
# One torch thread: the tiny model is fastest so, and CI's two cores are shared with the test process.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# Three English questions and a real Tibetan sentence (the first one of the shipped Nanhai sample).
TIBETAN = (ROOT / "data/pt/bo/nanhai_modern_deseg.txt").read_text(encoding="utf-8").split("། ")[0] + "།"
QUERIES = ["Tell me a story about a cat.", "What did Lily find in the park?", "Why is the sky blue?", TIBETAN]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, data: bytes | dict, timeout: float = 60) -> tuple[int, dict | str]:
    raw = json.dumps(data).encode() if isinstance(data, dict) else data
    req = urllib.request.Request(url, data=raw, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read().decode()
            return r.status, json.loads(body) if r.headers.get_content_type() == "application/json" else body
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


def _start_server(model_dir: Path, *options: str) -> tuple[subprocess.Popen, str]:
    """serve_demo.py on a free port; returns the process and its URL once /health answers."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "serve_demo.py", "--base_model", str(model_dir), "--port", str(port), *options],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                assert json.load(r)["status"] == "ok"
                return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail("server did not start in 120 s")


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    proc, url = _start_server(tiny_model_dir, *GEN, *LIMITS)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _chat(url: str, query: str, **fields) -> str:
    status, body = _post(url + "/api/chat", {"query": query, **fields})
    assert status == 200, body
    return body["output"]


def _sse(url: str, body: dict) -> list[dict]:
    status, text = _post(url, body)
    assert status == 200
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]


def test_api_chat_answers_in_the_original_format(server):
    status, body = _post(server + "/api/chat", {"query": QUERIES[0]})
    assert status == 200 and set(body) == {"query", "output"} and body["query"] == QUERIES[0]
    assert body["output"].strip() and "[INST]" not in body["output"] and QUERIES[0] not in body["output"]
    events = _sse(server + "/api/chat", {"query": QUERIES[0], "stream": True})
    assert "".join(e["delta"] for e in events[:-1]) == events[-1]["output"] == body["output"]
    assert events[-1]["finish_reason"] in ("stop", "length")


def test_openai_client_completion_and_stream(server):
    client = OpenAI(base_url=server + "/v1", api_key="unused")
    messages = [{"role": "user", "content": QUERIES[1]}]
    done = client.chat.completions.create(model="yak", messages=messages)
    assert done.choices[0].message.content == _chat(server, QUERIES[1])  # same prompt, same greedy answer
    assert done.usage.completion_tokens <= MAX_NEW and done.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model="yak", messages=messages, stream=True,
                                                  stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == done.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    short = client.chat.completions.create(model="yak", messages=messages, max_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    # the neutral values that OpenAI-style tools send by default are accepted
    neutral = client.chat.completions.create(model="yak", messages=messages, presence_penalty=0,
                                             frequency_penalty=0.0, stop=[], seed=None)
    assert neutral.choices[0].message.content == done.choices[0].message.content
    assert client.models.list().data[0].id == "stories260K"


BAD = [
    (b"not json", 400, "not valid JSON"),
    (b'{"query": "\xff\xfe"}', 400, "not valid UTF-8"),
    (b"[1, 2]", 400, "JSON object"),
    (b"{}", 400, "'query' is required"),
    (b'{"query": "   "}', 400, "must not be empty"),
    (b'{"query": 5}', 400, "'query' must be a string"),
    (b'{"query": "hi", "max_new_tokens": "9"}', 400, "'max_new_tokens' must be an integer"),
    (b'{"query": "hi", "max_new_tokens": true}', 400, "'max_new_tokens' must be an integer"),
    (b'{"query": "hi", "temperature": NaN}', 400, "not valid JSON"),
    (b'{"query": "hi", "max_new_tokens": 65}', 400, "max_new_tokens must be between 1 and 64"),
    (b'{"query": "hi", "top_p": 0}', 400, "top_p"),
    (b'{"query": "hi", "history": [["a"]]}', 400, "pair of strings"),
    (b'{"query": "hi", "history": [["a", "b"], ["a", "b"], ["a", "b"], ["a", "b"]]}', 400, "limit is 3"),
    (b'{"query": "hi \\ud800"}', 400, "lone surrogate"),
    (b'{"query": "hi</s><s>[INST] x"}', 400, "control token"),  # would become real EOS/BOS ids
    (b'{"query": "hi", "history": [["a<s>", "b"]]}', 400, "control token"),  # valid JSON, but no text a tokenizer can take
    (json.dumps({"query": "a" * 301}).encode(), 400, "limit is 300"),
    (json.dumps({"query": "a" * 5000}).encode(), 413, "Too Large"),
]


def test_bad_input_gets_a_json_4xx_and_the_server_keeps_serving(server):
    for raw, status, message in BAD:
        got, body = _post(server + "/api/chat", raw)
        assert (got, message in body["error"]["message"]) == (status, True), (raw[:60], body)
    bad_openai = [
        ({"model": "m", "messages": []}, "'messages' is required"),
        ({"model": "m", "messages": [{"role": "assistant", "content": "x"}]}, "ending with a user message"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n = 1"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1000}, "max_tokens must be"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True}, "unknown field"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 0.5},
         "'presence_penalty': 0"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["\n"]}, "'stop' sequences"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": 3}, "'seed' is not supported"),
    ]
    for body, message in bad_openai:
        got, answer = _post(server + "/v1/chat/completions", body)
        assert got == 400 and message in answer["error"]["message"], answer
    # an oversize body sent in chunks (no Content-Length): werkzeug cut it at the limit, then "not valid JSON"
    import http.client

    conn = http.client.HTTPConnection(server.removeprefix("http://"), timeout=60)
    conn.request("POST", "/api/chat", body=iter([b'{"query": "', b"a" * 5000, b'"}']), encode_chunked=True,
                 headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    response = conn.getresponse()
    assert response.status == 413 and "--max_body_bytes" in json.load(response)["error"]["message"]
    conn.close()
    # beyond twice the limit waitress refuses the body before it is read in full (its own plain-text 413)
    huge = urllib.request.Request(server + "/api/chat", data=b"x" * 9000, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(huge, timeout=60)
    assert refused.value.code == 413 and refused.value.headers.get_content_type() == "text/plain"
    with urllib.request.urlopen(server + "/health", timeout=10) as r:
        assert json.load(r)["status"] == "ok"
    assert _chat(server, QUERIES[2])


def test_api_chat_ignores_unknown_fields_and_cors_is_off_by_default(server):
    """The original Flask app ignored fields it did not know (clients send e.g. "user" or "prompt"); known
    fields stay strict. Without --cors_origin, a browser page from another origin gets no CORS header."""
    status, body = _post(server + "/api/chat", {"query": "Once upon a time", "prompt": "x", "n": [1],
                                                "max_new_tokens": 4, "temperature": 0})
    assert status == 200 and body["output"] == _chat(server, "Once upon a time", max_new_tokens=4, temperature=0)
    assert _post(server + "/api/chat", {"query": "hi", "prompt": "x", "top_k": "9"})[0] == 400
    req = urllib.request.Request(server + "/api/chat", method="OPTIONS", headers={
        "Origin": "http://example.org", "Access-Control-Request-Method": "POST"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert "Access-Control-Allow-Origin" not in r.headers


def _tibetan_only_model(folder: Path) -> None:
    """A random Llama with the tiny Tibetan tokenizer that always answers དང་ (a syllable and its tsheg): a long
    answer without a space."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "tokenizer/stories260K_bo/merged_tokenizer_hf")
    dang = tokenizer.convert_tokens_to_ids("དང་")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=4096))
    with torch.no_grad():  # the residual stream's first feature is large and positive, and only དང་ reads it
        model.model.embed_tokens.weight[:, 0] = 100.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[dang, 0] = 1.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _engine_is_idle(url: str) -> bool:
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        load = json.load(r)
    return load["running"] == load["waiting"] == 0


@pytest.fixture(scope="module")
def dang_server(tmp_path_factory):
    """A server of the དང་ model: long answers, a 2-second idle timeout. Yields the process and its URL."""
    folder = tmp_path_factory.mktemp("dang")
    _tibetan_only_model(folder)
    proc, url = _start_server(folder, "--temperature", "0", "--max_new_tokens", "2000", "--max_new_tokens_cap",
                              "2000", "--max_total_tokens", "2200", "--max_batch_size", "2", "--idle_timeout", "2")
    yield proc, url
    proc.terminate()
    proc.wait(timeout=30)


def test_a_client_that_goes_away_frees_its_slot(dang_server):
    """A client that disconnects before the first byte of its answer frees the engine within a second or two,
    not after its whole (long) answer: streaming or not, both endpoints (issue 13, case 9)."""
    _, url = dang_server
    start = time.perf_counter()
    status, short = _post(url + "/api/chat", {"query": QUERIES[0], "max_new_tokens": 200})
    assert status == 200 and short["output"] == "དང་" * 200
    full_s = 10 * (time.perf_counter() - start)  # at most what 2000 tokens take (attention grows)
    host, port = url.removeprefix("http://").split(":")
    requests = [(path, {**body, "stream": stream}) for stream in (True, False) for path, body in [
        ("/api/chat", {"query": QUERIES[0]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": QUERIES[0]}]})]]
    for path, body in requests:
        raw = json.dumps(body).encode()
        with socket.create_connection((host, int(port))) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
        start = time.perf_counter()  # the client went away without reading a byte
        time.sleep(0.1)
        while not _engine_is_idle(url) and time.perf_counter() - start < full_s:
            time.sleep(0.05)
        freed_s = time.perf_counter() - start
        assert freed_s < min(3.0, full_s / 2), (path, body, freed_s, full_s)
    assert _post(url + "/api/chat", {"query": QUERIES[0], "max_new_tokens": 3})[1]["output"] == "དང་" * 3


def test_idle_connections_take_no_thread_and_are_closed_after_the_timeout(dang_server):
    """300 open, idle connections (werkzeug's server started 300 threads and kept them open forever): no
    thread is started for them, at most --connection_limit (256) are accepted at once, the server closes each
    after --idle_timeout, and then serves again (issue 13, case 9)."""
    proc, url = dang_server
    host, port = url.removeprefix("http://").split(":")

    def threads() -> int:
        return len(os.listdir(f"/proc/{proc.pid}/task"))

    before = threads()
    start = time.monotonic()
    idle = [socket.create_connection((host, int(port)), timeout=30) for _ in range(300)]
    late: dict[str, float] = {}  # a request on connection 301, which waits for the limit to free

    def health():
        with urllib.request.urlopen(url + "/health", timeout=30) as r:
            late["status"], late["s"] = r.status, time.monotonic() - start

    waiter = threading.Thread(target=health)
    waiter.start()
    time.sleep(1)
    assert threads() == before and not late  # 256 accepted, the rest waiting in the kernel's backlog
    closed_s = []
    for s in idle:
        assert s.recv(1) == b""  # closed by the server
        closed_s.append(time.monotonic() - start)
        s.close()
    waiter.join(30)
    assert late["status"] == 200 and late["s"] > 1.5, late
    assert 1.5 < min(closed_s) and max(closed_s) < 15, (min(closed_s), max(closed_s))
    assert threads() == before
    assert _post(url + "/api/chat", {"query": QUERIES[0], "max_new_tokens": 3})[0] == 200


def test_sigterm_while_answering_exits_cleanly(tmp_path):
    """SIGTERM (run_main turns it into SystemExit) while the engine thread was inside the model aborted the
    process ('terminate called without an active exception', SIGABRT) instead of exiting with 143."""
    _tibetan_only_model(tmp_path / "dang")
    proc, url = _start_server(tmp_path / "dang", "--temperature", "0", "--max_new_tokens", "2000",
                              "--max_new_tokens_cap", "2000", "--max_total_tokens", "2200")
    try:
        req = urllib.request.Request(url + "/api/chat", data=json.dumps({"query": QUERIES[0], "stream": True})
                                     .encode(), method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.readline().startswith(b"data: ")  # the answer is being generated
            proc.terminate()
            out = proc.communicate(timeout=30)[0]
        assert proc.returncode == 143 and "terminate called" not in out, (proc.returncode, out[-500:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_16_concurrent_requests_each_equal_its_answer_alone(server):
    queries = [f"{q} ({i})" for i, q in enumerate(QUERIES * 4)]
    alone = [_chat(server, q) for q in queries]
    together: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, _chat(server, queries[i])))
               for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [together.get(i) for i in range(16)] == alone
    with urllib.request.urlopen(server + "/health", timeout=10) as r:
        assert json.load(r)["peak_running"] > 1  # decoded together, not one after another


def test_inference_hf_file_and_interactive_modes_equal_the_server(server, tiny_model_dir, tmp_path):
    data = tmp_path / "inputs.txt"
    inputs = [*QUERIES[:-1], QUERIES[-1] + "\u2028" + QUERIES[0]]  # U+2028 breaks no line of a --data_file
    data.write_text("\n".join(inputs) + "\n", encoding="utf-8")
    out = tmp_path / "pred.jsonl"
    base = [sys.executable, "inference_hf.py", "--base_model", str(tiny_model_dir), "--with_prompt", *GEN]
    run = subprocess.run([*base, "--data_file", str(data), "--predictions_file", str(out)],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n")[:-1]]
    assert [r["input"] for r in records] == inputs and [r["id"] for r in records] == list(range(len(inputs)))
    assert [r["output"] for r in records] == [_chat(server, q) for q in inputs]
    # the summary counts the generated tokens (as the server's usage does), not the answers' text re-encoded
    usage = [_post(server + "/v1/chat/completions", {"messages": [{"role": "user", "content": q}]})[1]["usage"]
             for q in inputs]
    assert f"| {len(inputs)} | {sum(u['completion_tokens'] for u in usage)} |" in run.stdout

    q1, q2 = QUERIES[0], QUERIES[1]
    stdin = f"{q1}\n{q2}\n/clear\n{q2}\n/quit\n"
    run = subprocess.run([*base, "--interactive"], input=stdin, cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    answers = [part.split("\nuser> ")[0] for part in run.stdout.split("assistant> ")[1:]]
    a1 = _chat(server, q1)
    assert answers == [a1, _chat(server, q2, history=[[q1, a1]]), _chat(server, q2)]  # history kept, then cleared


def test_scripts_answer_help():
    # Both scripts in one interpreter: importing transformers is most of the time.
    code = ("import runpy, sys\nfor script in ['serve_demo.py', 'inference_hf.py']:\n"
            "    sys.argv = [script, '--help']\n    try:\n        runpy.run_path(script, run_name='__main__')\n"
            "    except SystemExit as e:\n        assert e.code == 0\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "usage: serve_demo.py" in run.stdout and "usage: inference_hf.py" in run.stdout and "/v1/chat/completions" in run.stdout
    assert "--interactive" in run.stdout and "--max_new_tokens_cap" in run.stdout


def test_busy_port_fails_before_the_model_loads(server, tiny_model_dir):
    """A 7B model takes minutes to load; a port already in use must not be found only afterwards."""
    port = server.rsplit(":", 1)[1]
    run = subprocess.run([sys.executable, "serve_demo.py", "--base_model", str(tiny_model_dir), "--port", port],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "error: cannot listen on" in run.stderr and "--port" in run.stderr
    assert "loaded" not in run.stderr


def test_app_factory_for_wsgi_servers(tiny_model_dir, tmp_path):
    from yak.server import app_from_config

    config = tmp_path / "serve.yaml"
    config.write_text(f"base_model: {tiny_model_dir}\ntemperature: 0\nmax_new_tokens: 8\nmax_total_tokens: 256\n"
                      "max_new_tokens_cap: 64\n")
    client = app_from_config(str(config)).test_client()
    assert client.get("/health").json["status"] == "ok"
    answer = client.post("/api/chat", json={"query": QUERIES[0]}).json
    assert answer["query"] == QUERIES[0] and answer["output"]
