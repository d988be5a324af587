"""The generation engine on the real tiny model: greedy == transformers' generate, batching == alone, limits."""

from __future__ import annotations

import queue
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

from tests.conftest import HELDOUT, ROOT
from yak import YakError
from yak.generation import GenerationArguments, InferenceArguments, run_inference
from yak.generation.engine import Engine
from yak.generation.loading import load_for_inference
from yak.generation.prompts import chat_messages, encode_chat, encode_raw, stop_token_ids
from yak.generation.request import EngineFull, TextStreamer
from yak.generation.sampling import SamplingParams, sample_next
from yak.source import ModelSource
from yak.template import LLAMA2_CHAT_TEMPLATE

GREEDY = SamplingParams(max_new_tokens=40, temperature=0, repetition_penalty=1.0)
STARTS = ["Once upon a time", "Lily went to the park", "The cat", "Tom had a big red ball and", "One day, a bird"]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    return model, tokenizer


@pytest.fixture(scope="module")
def engine(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    return Engine(model, stop_token_ids(model, tokenizer), max_batch_size=16, max_total_tokens=256)


def _hf_greedy(model, ids, max_new_tokens, repetition_penalty=1.0, eos=(2,)):
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                         repetition_penalty=repetition_penalty, eos_token_id=list(eos))[0, len(ids):].tolist()
    return next((out[:i] for i, t in enumerate(out) if t in eos), out)


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_equals_transformers_generate(engine, model_and_tokenizer, penalty):
    model, tokenizer = model_and_tokenizer
    prompts = [encode_raw(tokenizer, s) for s in STARTS]
    params = SamplingParams(max_new_tokens=40, temperature=0, repetition_penalty=penalty)
    requests = engine.generate(prompts, params)  # submitted together: decoded in one batch
    for prompt, request in zip(prompts, requests):
        assert request.output_ids == _hf_greedy(model, prompt, 40, penalty)
        assert request.finish_reason == ("length" if len(request.output_ids) == 40 else "stop")


def test_max_new_tokens_counts_only_new_tokens_and_eos_stops(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = encode_raw(tokenizer, STARTS[0])
    free = Engine(model, [], max_batch_size=2, max_total_tokens=128)
    out = free.submit(prompt, SamplingParams(max_new_tokens=7, temperature=0)).wait()
    assert len(out.output_ids) == 7 and out.finish_reason == "length"
    stop_at = out.output_ids[3]  # pretend this token ends answers: generation stops before it
    first = out.output_ids.index(stop_at)
    stopping = Engine(model, [stop_at], max_batch_size=2, max_total_tokens=128)
    cut = stopping.submit(prompt, SamplingParams(max_new_tokens=7, temperature=0)).wait()
    assert cut.output_ids == out.output_ids[:first] and cut.finish_reason == "stop"


def test_requests_ending_while_the_next_step_is_enqueued(model_and_tokenizer):
    # Greedy steps run one ahead: each request below ends (end token, its length, the engine's whole length)
    # while the step after is already launched, at a different step from the others; then the rows are reused.
    model, tokenizer = model_and_tokenizer
    prompts = [encode_raw(tokenizer, s) for s in STARTS[:4]]
    stop_at = _hf_greedy(model, prompts[0], 20)[6]  # an end token for this test, first met mid-answer
    eos = (2, stop_at)
    engine = Engine(model, eos, max_batch_size=4, max_total_tokens=64)
    lengths = [20, 1, 64 - len(prompts[2]), 64 - len(prompts[3])]  # the last two fill their whole cache rows
    params = [SamplingParams(max_new_tokens=n, temperature=0, repetition_penalty=1.2) for n in lengths]
    for _ in range(2):
        requests = engine.generate(prompts, params)
        for prompt, n, request in zip(prompts, lengths, requests):
            expected = _hf_greedy(model, prompt, n, 1.2, eos)
            assert request.output_ids == expected
            assert request.finish_reason == ("length" if len(expected) == n else "stop")
    assert requests[0].finish_reason == "stop" and requests[1].finish_reason == "length"


def test_greedy_and_sampled_requests_in_one_batch(engine, model_and_tokenizer):
    # Sampled rows pick their tokens after the step; top_k 1 makes that path deterministic (= greedy), and the
    # greedy rows must not notice the sampled ones, nor the run-ahead that starts once the sampled ones end.
    model, tokenizer = model_and_tokenizer
    prompts = [encode_raw(tokenizer, s) for s in STARTS]
    params = [SamplingParams(max_new_tokens=40, temperature=0, repetition_penalty=1.3),
              SamplingParams(max_new_tokens=30, temperature=0.7, top_k=1, repetition_penalty=1.3),
              SamplingParams(max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0),
              SamplingParams(max_new_tokens=40, temperature=0, repetition_penalty=1.0),
              SamplingParams(max_new_tokens=25, temperature=0.9, top_k=1, repetition_penalty=1.0)]
    requests = engine.generate(prompts, params)
    for prompt, p, request in zip(prompts, params, requests):
        if p.greedy or p.top_k == 1:
            assert request.output_ids == _hf_greedy(model, prompt, p.max_new_tokens, p.repetition_penalty)
    assert 1 <= len(requests[2].output_ids) <= 8 and requests[2].finish_reason in ("stop", "length")


def test_extreme_sampling_settings_neither_fail_nor_disturb_the_batch(engine, model_and_tokenizer):
    # float32 makes temperature 1e-45 and top_p 1e-300 zero: the division by zero or the empty nucleus failed
    # sampling, and with it every request decoded in the same batch (HTTP 500 for all of them).
    model, tokenizer = model_and_tokenizer
    prompts = [encode_raw(tokenizer, s) for s in STARTS[:4]]
    params = [SamplingParams(max_new_tokens=20, temperature=0, repetition_penalty=1.0),
              SamplingParams(max_new_tokens=20, temperature=1e-45, repetition_penalty=1.0),
              SamplingParams(max_new_tokens=20, temperature=1.0, top_p=1e-300, repetition_penalty=1.0),
              SamplingParams(max_new_tokens=20, temperature=1e-300, top_p=1e-300, repetition_penalty=10)]
    requests = engine.generate(prompts, params)
    for prompt, request in zip(prompts[:3], requests):  # a tiny temperature or top_p decodes greedily
        assert request.output_ids == _hf_greedy(model, prompt, 20)
    assert requests[3].finish_reason in ("stop", "length")
    with pytest.raises(ValueError, match="repetition_penalty must be in"):  # 1e-300 divides the logits by 0
        engine.submit(prompts[0], SamplingParams(repetition_penalty=1e-300))


def test_submit_rejects_bad_requests(engine):
    with pytest.raises(ValueError, match="over the limit of 256 tokens"):
        engine.submit([1] * 250, SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="top_p"):
        engine.submit([1, 2], SamplingParams(top_p=0))
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], SamplingParams())


def test_streaming_matches_and_cancel_stops(engine, model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    prompt = encode_raw(tokenizer, STARTS[1])
    streamer = TextIteratorStreamer(tokenizer, skip_special_tokens=True)
    request = engine.submit(prompt, GREEDY, streamer)
    assert "".join(streamer) == tokenizer.decode(request.wait().output_ids, skip_special_tokens=True)
    streamer = TextIteratorStreamer(tokenizer, skip_special_tokens=True)
    long = engine.submit(prompt, SamplingParams(max_new_tokens=200, temperature=0, repetition_penalty=1.0), streamer)
    next(iter(streamer))
    long.cancel()
    assert long.wait(timeout=30).finish_reason == "cancelled" and len(long.output_ids) < 200


def test_cancelling_a_waiting_request_takes_it_out_of_the_queue_at_once(model_and_tokenizer):
    """A waiting request whose client went away must not hold a place in the queue (--max_queue) until a slot
    frees: cancel() ends it at once."""
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, (), max_batch_size=1, max_total_tokens=512)  # no end token: answers run to the length
    prompt = encode_raw(tokenizer, STARTS[0])
    streamer = TextIteratorStreamer(tokenizer)
    running = engine.submit(prompt, SamplingParams(max_new_tokens=400, temperature=0), streamer)
    next(iter(streamer))
    waiting = engine.submit(prompt, SamplingParams(max_new_tokens=5, temperature=0))
    assert engine.load["waiting"] == 1
    waiting.cancel()
    assert waiting.done and waiting.finish_reason == "cancelled" and engine.load["waiting"] == 0
    assert not running.done
    running.cancel()
    assert running.wait(timeout=30).finish_reason == "cancelled"
    engine.close()


def test_close_stops_the_worker_and_fails_what_is_left(model_and_tokenizer):
    # Run at exit (atexit): a worker thread still inside the model when the interpreter stops aborts the process.
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, (), max_batch_size=1, max_total_tokens=512)  # no end token: answers run to the length
    prompt = encode_raw(tokenizer, STARTS[0])
    streamer = TextIteratorStreamer(tokenizer)
    running = engine.submit(prompt, SamplingParams(max_new_tokens=500, temperature=0), streamer)
    waiting = engine.submit(prompt, SamplingParams(max_new_tokens=5, temperature=0))
    next(iter(streamer))
    engine.close()
    assert not engine._thread.is_alive()
    for request in (running, waiting):
        with pytest.raises(RuntimeError, match="shut down"):
            request.wait(timeout=1)
    assert len(running.output_ids) < 500
    with pytest.raises(EngineFull, match="shutting down"):
        engine.submit(prompt, GREEDY)


def test_sampling_per_row_settings():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.7]] * 4))  # (B, V)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1, top_k=1, top_p=1),
              SamplingParams(temperature=1, top_k=0, top_p=0.5), SamplingParams(temperature=1, top_k=0, top_p=1)]
    draws = torch.stack([sample_next(logits, params, None) for _ in range(3000)])  # (N, B)
    assert (draws[:, :3] == 2).all()  # greedy, top_k 1 and top_p 0.5 keep only the most likely token
    share = torch.bincount(draws[:, 3], minlength=3).float() / len(draws)
    assert torch.allclose(share, torch.tensor([0.1, 0.2, 0.7]), atol=0.04)  # plain sampling follows softmax


def test_chat_prompt_uses_the_template(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    ids = encode_chat(tokenizer, chat_messages("Hi", [["Who?", "Me."]], system_prompt="Be brief."))
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 2  # one per user turn
    text = tokenizer.decode(ids)
    assert "<<SYS>>\nBe brief.\n<</SYS>>" in text and text.endswith("Hi [/INST]") and "Me. </s>" in text
    assert "<<SYS>>" not in tokenizer.decode(encode_chat(tokenizer, chat_messages("Hi", system_prompt="")))


def test_raw_text_holding_special_token_strings_stays_text(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    text = "Once upon a time</s><s> there was a cat"
    ids = encode_raw(tokenizer, text)
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids
    assert tokenizer.bos_token_id not in ids[1:] and tokenizer.decode(ids[1:]) == text


def test_cli_refuses_missing_backends_and_bad_files(tiny_model_dir, tmp_path):
    model = ModelSource(base_model=str(tiny_model_dir))
    data = tmp_path / "in.txt"
    data.write_text("one\n\nthree\n", encoding="utf-8")
    with pytest.raises(YakError, match="empty lines 2"):
        run_inference(model, GenerationArguments(), InferenceArguments(data_file=str(data)))
    with pytest.raises(YakError, match="exactly one of --interactive and --data_file"):
        run_inference(model, GenerationArguments(), InferenceArguments())
    data.write_bytes(b"one\ncaf\xe9\n")
    with pytest.raises(YakError, match="not valid UTF-8"):
        run_inference(model, GenerationArguments(), InferenceArguments(data_file=str(data)))
    data.write_text("one\n", encoding="utf-8")
    folder = tmp_path / "answers.json"
    folder.mkdir()
    with pytest.raises(YakError, match="is a folder"):  # was an IsADirectoryError once every answer was done
        run_inference(model, GenerationArguments(),
                      InferenceArguments(data_file=str(data), predictions_file=str(folder)))
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("one\n", encoding="utf-8")
    with pytest.raises(YakError, match="would replace the inputs"):
        run_inference(model, GenerationArguments(), InferenceArguments(data_file=str(inputs), predictions_file=str(inputs)))
    # an engine without slots never started a request: inference_hf.py and every server request hung
    from yak.server import ServerArguments, build_service

    with pytest.raises(YakError, match="--max_new_tokens 600 leaves no room for the prompt"):
        run_inference(model, GenerationArguments(max_new_tokens=600, max_total_tokens=600),
                      InferenceArguments(interactive=True))
    # the engine caps --max_total_tokens (default 2048) at the model's 512 positions: every input was refused
    with pytest.raises(YakError, match="--max_new_tokens 600 leaves no room for the prompt in the model's 512"):
        run_inference(model, GenerationArguments(max_new_tokens=600), InferenceArguments(interactive=True))
    with pytest.raises(YakError, match="--max_new_tokens 600 leaves no room for the prompt in the model's 512"):
        build_service(model, GenerationArguments(max_new_tokens=600), ServerArguments())  # every request was a 400
    empty = GenerationArguments(max_batch_size=0, temperature=-1)
    with pytest.raises(YakError, match="--temperature must be in .*--max_batch_size must be at least 1"):
        run_inference(model, empty, InferenceArguments(data_file=str(data)))
    with pytest.raises(YakError, match="--max_batch_size must be at least 1.*--max_queue must be at least 1"):
        build_service(model, empty, ServerArguments(max_queue=0))  # which refused every request (503)
    with pytest.raises(YakError, match="pip install vllm"):
        run_inference(model, GenerationArguments(), InferenceArguments(data_file=str(data), use_vllm=True))
    with pytest.raises(YakError, match="bitsandbytes"):
        run_inference(model, GenerationArguments(load_in_8bit=True), InferenceArguments(data_file=str(data)))


@pytest.mark.gpu
def test_cuda_graphs_decode_like_eager(tiny_model_dir, model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).cuda().eval()
    prompts = [encode_raw(tokenizer, s) for s in STARTS]
    # greedy rows (with the default repetition penalty) decode inside the graph, the top_k=1 row after it
    params = [SamplingParams(max_new_tokens=60, temperature=0)] * 4 + [SamplingParams(max_new_tokens=30, top_k=1)]
    eager = Engine(model, [2], max_batch_size=8, max_total_tokens=256, cuda_graphs=False)
    expected = [r.output_ids for r in eager.generate(prompts, params)]
    for compile_ in (False, True):
        graphs = Engine(model, [2], max_batch_size=8, max_total_tokens=256, compile=compile_)
        assert graphs._graphs and not eager._graphs
        assert [r.output_ids for r in graphs.generate(prompts, params)] == expected


def test_base_plus_lora_adapter_decodes_like_the_peft_model(tiny_model_dir, model_and_tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    _, tokenizer = model_and_tokenizer
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, config).eval()  # random B: the adapter changes the answers
    peft_model.save_pretrained(tmp_path / "lora")
    model, tok = load_for_inference(ModelSource(base_model=tiny_model_dir, adapters=[tmp_path / "lora"],
                                                tokenizer_path=tiny_model_dir), GenerationArguments(only_cpu=True))
    prompt = encode_raw(tokenizer, STARTS[0])
    engine = Engine(model, stop_token_ids(model, tok), max_batch_size=2, max_total_tokens=128)
    got = engine.submit(prompt, GREEDY).wait().output_ids
    assert got == _hf_greedy(peft_model, prompt, 40)  # merged weights in the engine == unmerged peft forward
    assert got != _hf_greedy(AutoModelForCausalLM.from_pretrained(tiny_model_dir), prompt, 40)


def test_corrupt_adapter_is_one_clear_error_in_every_script(tiny_model_dir, tmp_path):
    """A cut-short adapter_model.safetensors or an adapter_config.json that is not JSON is one message naming
    the file (exit 2, no traceback, from the scripts), when loading for inference/serving and when merging."""
    from peft import LoraConfig, get_peft_model

    from yak.merge import MergeArguments, merge

    good = tmp_path / "lora"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                   LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(good)
    cut, not_json = tmp_path / "cut", tmp_path / "not_json"
    for bad in (cut, not_json):
        shutil.copytree(good, bad)
    weights = (good / "adapter_model.safetensors").read_bytes()
    (cut / "adapter_model.safetensors").write_bytes(weights[:-100])  # e.g. an interrupted copy
    (not_json / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ', encoding="utf-8")
    res = subprocess.run([sys.executable, "serve_demo.py", "--base_model", str(tiny_model_dir), "--only_cpu",
                          "--port", "0", "--lora_model", str(cut)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"{cut / 'adapter_model.safetensors'} cannot be read" in res.stderr and "copy it again" in res.stderr
    with pytest.raises(YakError, match="adapter_config.json cannot be read .*copy it again"):
        load_for_inference(ModelSource(base_model=tiny_model_dir, adapters=[not_json]), GenerationArguments(only_cpu=True))
    with pytest.raises(YakError, match="adapter_config.json cannot be read .*copy it again"):
        merge(ModelSource(base_model=tiny_model_dir, adapters=[not_json]),
              MergeArguments(output_dir=str(tmp_path / "merged")))


@pytest.mark.parametrize("text", ["tibetan", "mixed"])
def test_tibetan_streams_syllable_by_syllable(text):
    """transformers' streamer holds text with punctuation back until a space, which Tibetan writes only after a
    shad: answers came a sentence at a time. Ours sends every syllable as its tsheg arrives, and the pieces
    still add up to exactly the decoded answer (English, numbers and byte-fallback characters included)."""
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "tokenizer" / "merged_tokenizer_hf")
    line = next(x for x in (HELDOUT / "bo_modern_nanhai_deseg_heldout.txt").read_text("utf-8").splitlines()
                if x.count("\u0f0b") > 40)[:300]
    if text == "mixed":
        line = "Chapter 3, 1998: " + line[:150] + " \U0001f600 done."
    ids = tokenizer(line, add_special_tokens=False)["input_ids"]

    def pieces(streamer_class):
        streamer = streamer_class(tokenizer, skip_special_tokens=True)
        sent, behind = [], []  # text sent after each token; how far the sent text lags behind the decoded text
        for i, token in enumerate(ids):
            streamer.put(torch.tensor([token]))
            sent.append(next(streamer))  # ours decodes here, in the reader; transformers' did in put()
            decoded = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
            if decoded.endswith("\u0f0b"):
                behind.append(len(decoded) - len("".join(sent)))
        streamer.end()
        sent += list(streamer)
        return "".join(sent), behind

    full, behind = pieces(TextStreamer)
    assert full == tokenizer.decode(ids, skip_special_tokens=True)
    assert behind and max(behind) == 0  # everything up to each tsheg is out as soon as it is decoded
    assert max(pieces(TextIteratorStreamer)[1]) > 20  # transformers' own lags by many syllables


def test_streamer_put_only_queues_and_the_reader_decodes():
    """The engine's thread calls put() for every token of every streamed answer: it only queues the id. The
    reader decodes everything that came since its last read in one go, and waits at most its timeout."""
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "tokenizer" / "merged_tokenizer_hf")
    line = (HELDOUT / "bo_modern_nanhai_deseg_heldout.txt").read_text("utf-8").splitlines()[0][:200]
    ids = tokenizer(line, add_special_tokens=False)["input_ids"]
    streamer = TextStreamer(tokenizer, timeout=0.05, skip_special_tokens=True)
    with pytest.raises(queue.Empty):
        next(streamer)
    for token in ids:
        streamer.put(torch.tensor([token]))
    assert streamer.token_cache == []  # nothing decoded yet
    first = next(streamer)
    assert streamer.token_cache == ids and first  # all of them at once
    streamer.end()
    assert first + "".join(streamer) == tokenizer.decode(ids, skip_special_tokens=True)
    with pytest.raises(StopIteration):
        next(streamer)
