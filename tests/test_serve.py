"""`calm-edge serve` on a loopback port, driven by the official `openai` client and by raw HTTP.

The committed `small` packages serve the protocol tests (no training needed); the tiny fp32
packages the in-flight batching test, whose tokens must equal single requests'.
"""
import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from calm_edge.runtime import GeneratorParams, Model, generate
from calm_edge.serve import protocol

ROOT = Path(__file__).resolve().parents[1]
CALM, AR = ROOT / "models" / "calm-small-int4", ROOT / "models" / "ar-small-int4"
PROMPT = "The history of"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(package, *options, ready_timeout=60):
    """`calm-edge serve` in a subprocess; yields (base URL, process); SIGTERM at the end."""
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "calm_edge.cli", "serve", "--package", str(package),
                                "--port", str(port), "--threads", "1", *options],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited: {process.stderr.read()}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the server did not become ready")
            time.sleep(0.1)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
        process.stdout.close()
        process.stderr.close()


@pytest.fixture(scope="module")
def calm_server():
    with running_server(CALM) as (url, _):
        yield url


@pytest.fixture(scope="module")
def calm_model():
    return Model(CALM, threads=1)


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def _metric(url, name, labels="", absent=None):
    """The value of metric `name` ({labels} as /metrics prints them, e.g. 'endpoint="/v1/models",status="200"').

    A metric not printed is an error, unless `absent` gives its value (a labelled counter shows
    only the label values it has counted)."""
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{" + labels):
            return float(line.rsplit(" ", 1)[1])
    if absent is not None:
        return absent
    raise AssertionError(f"{name}{{{labels}}} not in /metrics")


def _answered(url, endpoint, status):
    return _metric(url, "calm_edge_requests_total", f'endpoint="{endpoint}",status="{status}"', absent=0.0)


def test_completions_plain_and_streamed_equal_calm_edge_generate(calm_server, calm_model):
    client = _client(calm_server)
    expected = generate(calm_model, PROMPT, GeneratorParams(max_new_tokens=24, seed=3))
    whole = client.completions.create(model="calm", prompt=PROMPT, max_tokens=24, seed=3)
    assert whole.choices[0].text == expected.text
    assert whole.usage.completion_tokens == len(expected.token_ids) and whole.usage.prompt_tokens == 3
    assert whole.choices[0].finish_reason == ("length" if expected.stopped_by == "max_new_tokens" else "stop")
    pieces, usage = [], None
    for chunk in client.completions.create(model="calm", prompt=PROMPT, max_tokens=24, seed=3, stream=True):
        pieces += [c.text for c in chunk.choices]
        usage = chunk.usage or usage
    assert "".join(pieces) == expected.text and len([p for p in pieces if p]) > 1
    assert usage.completion_tokens == len(expected.token_ids)
    # The command line prints the same text for the same prompt and seed.
    done = subprocess.run([sys.executable, "-m", "calm_edge.cli", "generate", "--package", str(CALM), PROMPT,
                           "--max-new-tokens", "24", "--seed", "3", "--json", "--threads", "1"],
                          capture_output=True, text=True, check=True)
    assert json.loads(done.stdout)["text"] == whole.choices[0].text


def test_a_stop_sequence_across_two_chunks_is_never_streamed(calm_server, calm_model):
    client = _client(calm_server)
    chunks = [c.choices[0].text for c in client.completions.create(
        model="calm", prompt=PROMPT, max_tokens=32, seed=4, stream=True, extra_body={"extra": {"ignore_eos": True}})
        if c.choices and c.choices[0].text]
    j = next(j for j in range(1, len(chunks) - 1) if len(chunks[j + 1]) >= 2 and chunks[j].strip())
    stop = chunks[j][-1] + chunks[j + 1][:2]  # begins in one step's text, ends in the next's
    expected = generate(calm_model, PROMPT, GeneratorParams(max_new_tokens=32, seed=4, stop_at_eos=False,
                                                            stop_sequences=(stop,)))
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="calm", prompt=PROMPT, max_tokens=32, seed=4, stream=True, stop=[stop],
        extra_body={"extra": {"ignore_eos": True}}) if c.choices)
    assert expected.stopped_by == "stop_sequence" and streamed == expected.text == "".join(chunks)[:len(streamed)]


def test_temperature_half_and_calm_sampler_settings_travel_in_extra(calm_server, calm_model):
    client = _client(calm_server)
    for method, candidates in (("batch", 8), ("exact", 16)):
        params = GeneratorParams(max_new_tokens=16, seed=5, temperature=0.5, method=method, candidates=candidates)
        got = client.completions.create(model="calm", prompt=PROMPT, max_tokens=16, seed=5, temperature=0.5,
                                        extra_body={"extra": {"method": method, "candidates": candidates}})
        assert got.choices[0].text == generate(calm_model, PROMPT, params).text


def test_chat_plain_and_streamed_use_the_plain_template(calm_server, calm_model):
    client = _client(calm_server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about rivers."}]
    prompt = protocol.chat_prompt([protocol.Message(**m) for m in messages])
    assert prompt == "System: Be brief.\n\nUser: Tell me about rivers.\nAssistant:"
    expected = generate(calm_model, prompt, GeneratorParams(max_new_tokens=20, seed=1,
                                                            stop_sequences=(protocol.CHAT_STOP,)))
    whole = client.chat.completions.create(model="calm", messages=messages, max_tokens=20, seed=1)
    assert whole.choices[0].message.content == expected.text and whole.choices[0].message.role == "assistant"
    streamed = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="calm", messages=messages, max_tokens=20, seed=1, stream=True) if c.choices]
    assert "".join(streamed) == expected.text


def test_models_health_and_metrics(calm_server):
    models = _client(calm_server).models.list()
    assert [m.id for m in models.data] == ["calm-small-int4"]
    assert httpx.get(calm_server + "/health").json() == {"status": "ok"}
    text = httpx.get(calm_server + "/metrics").text
    for name in ("calm_edge_requests_total", "calm_edge_completion_tokens_total", "calm_edge_queue_length",
                 "calm_edge_batch_occupancy", "calm_edge_time_to_first_token_seconds_bucket",
                 "calm_edge_time_per_output_token_seconds_bucket"):
        assert name in text


def test_an_event_is_one_line_to_every_line_reader_whatever_the_text():
    from httpx._decoders import LineDecoder  # what httpx's aiter_lines reads a stream with

    from calm_edge.serve.app import _event

    text = "a\x85b\u2028c\u2029d\ne\rf\r\ng\x0bh\x0ci\x1cj\x1dk\x1el 日本 🙂"  # every break str.splitlines knows
    event = _event(protocol.Responder(False, "m", 1).chunk(text))
    for lines in (event.splitlines(), LineDecoder().decode(event), event.split("\n")):
        assert [line for line in lines if line] == [event.strip()]
    assert json.loads(event.strip()[len("data: "):])["choices"][0]["text"] == text


LONG_PROMPT = "word " * 3000
BAD_REQUESTS = [
    # (what, body bytes, status, param)
    ("not JSON", b'{"prompt": ', 400, None),
    ("not an object", b'["The"]', 400, None),
    ("invalid UTF-8", b'{"prompt": "\xff\xfe"}', 400, None),
    ("no prompt", b'{"max_tokens": 4}', 400, "prompt"),
    ("empty prompt", b'{"prompt": ""}', 400, "prompt"),
    ("prompt of the wrong type", b'{"prompt": 5}', 400, "prompt"),
    ("max_tokens as a string", b'{"prompt": "a", "max_tokens": "5"}', 400, "max_tokens"),
    ("max_tokens zero", b'{"prompt": "a", "max_tokens": 0}', 400, "max_tokens"),
    ("max_tokens beyond the context", b'{"prompt": "a", "max_tokens": 50000}', 400, "max_tokens"),
    ("temperature not 1/n", b'{"prompt": "a", "temperature": 0.7}', 400, "temperature"),
    ("temperature NaN", b'{"prompt": "a", "temperature": NaN}', 400, "temperature"),
    ("temperature as a string", b'{"prompt": "a", "temperature": "hot"}', 400, "temperature"),
    ("stream as a string", b'{"prompt": "a", "stream": "yes"}', 400, "stream"),
    ("negative seed", b'{"prompt": "a", "seed": -1}', 400, "seed"),
    ("seed of 2^64", b'{"prompt": "a", "seed": 18446744073709551616}', 400, "seed"),
    ("n of 2", b'{"prompt": "a", "n": 2}', 400, "n"),
    ("echo", b'{"prompt": "a", "echo": true}', 400, "echo"),
    ("unknown method", b'{"prompt": "a", "extra": {"method": "greedy"}}', 400, "extra.method"),
    ("a million candidates", b'{"prompt": "a", "extra": {"candidates": 1000000}}', 400, "extra.candidates"),
    ("unknown extra field", b'{"prompt": "a", "extra": {"beams": 4}}', 400, "extra.beams"),
    ("too many stop sequences", b'{"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
    ("a prompt beyond the context", json.dumps({"prompt": LONG_PROMPT}).encode(), 400, "prompt"),
    ("a body over the limit", b'{"prompt": "' + b"a" * (2 << 20) + b'"}', 413, None),
]


@pytest.mark.parametrize("what,body,status,param", BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_with_an_openai_error_body(calm_server, what, body, status, param):
    answered = _answered(calm_server, "/v1/completions", status)
    response = httpx.post(calm_server + "/v1/completions", content=body,
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    assert _answered(calm_server, "/v1/completions", status) == answered + 1  # /metrics counted it, once
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_bad_chat_requests_and_the_server_serves_on(calm_server):
    for body, param in ((b'{"messages": []}', "messages"),
                        (b'{"messages": [{"role": "robot", "content": "hi"}]}', "messages.0.role"),
                        (b'{"messages": [{"role": "user"}]}', "messages.0.content")):
        response = httpx.post(calm_server + "/v1/chat/completions", content=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert httpx.get(calm_server + "/v1/nothing").status_code == 404
    # No bad request left a row behind.
    assert _client(calm_server).completions.create(model="m", prompt="a", max_tokens=4).usage.completion_tokens > 0
    assert _metric(calm_server, "calm_edge_running_requests") == 0


def test_a_client_that_leaves_mid_stream_frees_its_row(calm_server):
    with httpx.stream("POST", calm_server + "/v1/completions", timeout=30,
                      json={"prompt": PROMPT, "max_tokens": 2000, "stream": True,
                            "extra": {"ignore_eos": True}}) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break
    deadline = time.monotonic() + 10
    while _metric(calm_server, "calm_edge_running_requests") > 0:
        assert time.monotonic() < deadline, "the abandoned request still holds a row"
        time.sleep(0.1)


def test_a_full_queue_answers_429_with_retry_after():
    with running_server(CALM, "--max-batch", "1", "--max-queue", "1") as (url, _):
        long = {"prompt": PROMPT, "max_tokens": 1500, "stream": True, "extra": {"ignore_eos": True}}
        with httpx.stream("POST", url + "/v1/completions", json=long, timeout=60) as first:
            lines = first.iter_lines()  # kept: a closed iterator would close the stream
            next(lines)  # the first request holds the only row
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                waiting = pool.submit(httpx.post, url + "/v1/completions", json={"prompt": "a", "max_tokens": 4},
                                      timeout=60)
                time.sleep(0.5)  # queued behind the first
                refused = httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 4}, timeout=60)
                assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
                assert refused.json()["error"]["type"] == "rate_limit_error"
                first.close()
                assert waiting.result().status_code == 200


def test_request_timeout_gives_504_and_sigterm_ends_in_flight_requests_in_time():
    with running_server(AR, "--request-timeout", "0.3", "--shutdown-timeout", "1") as (url, process):
        response = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 500,
                                                                 "extra": {"ignore_eos": True}}, timeout=30)
        assert response.status_code == 504 and response.json()["error"]["type"] == "timeout"
    with running_server(AR, "--shutdown-timeout", "1") as (url, process):
        with httpx.stream("POST", url + "/v1/completions", timeout=30,
                          json={"prompt": PROMPT, "max_tokens": 500, "stream": True,
                                "extra": {"ignore_eos": True}}) as response:
            lines = response.iter_lines()
            next(lines)
            began = time.monotonic()
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        # uvicorn re-raises the signal once it has shut down, so the exit status is SIGTERM's.
        assert process.wait(timeout=20) in (0, -signal.SIGTERM)
        assert time.monotonic() - began < 10
        assert rest[-1] == "data: [DONE]"  # the stream ended cleanly: finished, or ended by the shutdown


def test_in_flight_batching_over_http_gives_each_request_its_tokens_alone(packages):
    """Requests arriving at different times, some cancelled, each get the text they get alone."""
    model = Model(packages["calm"])
    prompts = ["In the beginning", "And he said unto them,", "The", "And God saw the light"]
    with running_server(packages["calm"], "--max-batch", "3") as (url, _):
        client = _client(url)

        def ask(i):
            time.sleep(0.05 * i)
            return client.completions.create(model="m", prompt=prompts[i % 4], max_tokens=8 + 6 * i, seed=i)

        def abandon():
            with httpx.stream("POST", url + "/v1/completions", timeout=30,
                              json={"prompt": "The", "max_tokens": 200, "stream": True, "seed": 9}) as response:
                next(response.iter_lines())

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(ask, i) for i in range(7)] + [pool.submit(abandon), pool.submit(abandon)]
            results = [f.result() for f in futures[:7]]
            futures[7].result(), futures[8].result()
    for i, result in enumerate(results):
        alone = generate(model, prompts[i % 4], GeneratorParams(max_new_tokens=8 + 6 * i, seed=i))
        assert result.choices[0].text == alone.text, i
