"""The C++ Engine (runtime/cpp/src/engine.cpp) against the Python one (runtime/engine.py): the schedule
of tests/test_engine.py (mixed arrivals, T = 1 and 1/2, a cancellation while running, a request
queued behind a full batch, one cancelled the step it arrives) gives the same outputs step for step,
every request the tokens it gets alone, and bad arguments the same refusals. CALM runs in both decoder
layouts (test_cpp_runtime.KINDS): split, whose T = 1/2 requests decode lazily, and whole.

runtime/cpp/tests/engine_schedule.cpp drives the C++ Engine as `python_lines` drives the Python one.
"""
import re
import subprocess

import pytest

from calm_edge.errors import CalmEdgeError
from calm_edge.runtime.engine import Engine
from calm_edge.runtime.generator import generate_tokens
from calm_edge.runtime.model import Model

from test_cpp_runtime import KINDS, package_of
from test_engine import PROMPTS, REQUESTS, _params

MAX_BATCH = 3
TIMEOUT = 300


def schedule_text(requests):
    """`requests` (test_engine's table) in engine_schedule's format."""
    lines = [f"ARRIVE {arrive} {n} {t!r} {seed} {PROMPTS[prompt]}" for arrive, prompt, n, t, seed, _ in requests]
    lines += [f"CANCEL {cancel} {index}" for index, (*_, cancel) in enumerate(requests) if cancel is not None]
    return "\n".join(lines) + "\n"


def run_schedule(build, package, max_batch, batching, schedule):
    return subprocess.run([str(build / "engine_schedule"), str(package), str(max_batch), batching], input=schedule,
                          capture_output=True, text=True, timeout=TIMEOUT)


def python_lines(model, requests, max_batch, batching):
    """The Python Engine driven as test_engine._drive drives it, each output printed as engine_schedule prints it."""
    engine = Engine(model, max_batch=max_batch, batching=batching)
    lines, last_arrival = [], max(r[0] for r in requests)
    for step in range(500):
        for index, (arrive, prompt, n, t, seed, _) in enumerate(requests):
            if arrive == step:
                engine.add_request(model.tokenizer.encode(PROMPTS[prompt]), _params(n, t, seed), request_id=index)
        for index, (*_, cancel) in enumerate(requests):
            if cancel == step:
                engine.cancel(index)
        if not engine.has_work and step > last_arrival:
            break
        for output in engine.step():
            ended = f" -> {output.stop_reason}" if output.finished else ""
            lines.append(f"{step} {output.request_id}:" + "".join(f" {i}" for i in output.new_ids) + ended)
    return lines


def parse(lines):
    """({request: tokens}, {request: stop reason}, {request: the step of its first output}) of step lines."""
    tokens, reasons, first = {}, {}, {}
    for line in lines:
        head, _, rest = line.partition(":")
        step, request = map(int, head.split())
        ids, _, reason = rest.partition(" -> ")
        tokens.setdefault(request, []).extend(int(i) for i in ids.split())
        first.setdefault(request, step)
        if reason:
            reasons[request] = reason
    return tokens, reasons, first


def check_schedule(build, package, requests, max_batch, batching):
    """Both Engines on `requests`: the same outputs step for step, and each request's tokens those it
    gets alone (from the C++ Generator and from Python's); returns parse() of the outputs."""
    model = Model(package, threads=1)
    done = run_schedule(build, package, max_batch, batching, schedule_text(requests))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    steps = [line for line in lines if not line.startswith("alone ")]
    assert steps == python_lines(model, requests, max_batch, batching)

    cpp_alone = {int(line.split()[1].rstrip(":")): [int(i) for i in line.split(":")[1].split()]
                 for line in lines if line.startswith("alone ")}
    tokens, reasons, first = parse(steps)
    for index, (_, prompt, n, t, seed, cancel) in enumerate(requests):
        alone = generate_tokens(model, [model.tokenizer.encode(PROMPTS[prompt])], _params(n, t, seed))[0]
        assert cpp_alone[index] == alone, index
        if cancel is None:
            assert tokens[index] == alone, index
        else:
            assert reasons[index] == "cancelled" and tokens[index] == alone[:len(tokens[index])], index
    return tokens, reasons, first


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_the_cpp_engine_steps_as_the_python_engine_does(cpp_build, request, kind, batching):
    tokens, reasons, first = check_schedule(cpp_build, package_of(request, kind), REQUESTS, MAX_BATCH, batching)
    assert all(reasons[i] == "max_new_tokens" for i, r in enumerate(REQUESTS) if r[5] is None)
    # The schedule covers what its table says: request 5 is cancelled before it runs, request 4 waits
    # for a row (the batch of 3 is full when it arrives at step 3), and with CALM's continuous batching
    # request 3 is cancelled while it runs (elsewhere rows free up later, and it is still queued).
    assert not tokens[5] and first[4] > 3
    assert bool(tokens[3]) == (kind.startswith("calm") and batching == "continuous")


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_requests_that_fill_the_context_make_the_cpp_engine_drop_columns_as_python_does(cpp_build, packages,
                                                                                        batching):
    """Staggered requests that each run until the context is full: the cache would outgrow its
    max_context + 1 positions unless the columns no row attends are dropped, by the same rule. The
    second, longer than the first, adds columns on the left of the running row's cache. A static
    batch keeps its ended rows until it empties; their columns do not hold the cache.
    """
    generous = 1000  # more tokens than the tiny CALM model's 64 positions of 4 hold
    requests = [(0, 2, generous, 1.0, 1, None), (1, 3, generous, 0.5, 2, None), (7, 1, generous, 1.0, 3, None),
                (30, 2, generous, 1.0, 4, None), (31, 5, generous, 0.5, 5, None)]
    _, reasons, _ = check_schedule(cpp_build, packages["calm"], requests, 2, batching)
    assert list(reasons.values()) == ["context"] * len(requests)


@pytest.mark.parametrize("max_batch, batching, schedule, message", [
    (0, "continuous", "", "max_batch=0 must be a whole number of at least 1"),
    (MAX_BATCH, "dynamic", "", "batching='dynamic': choose one of continuous, static"),
    (MAX_BATCH, "continuous", "ARRIVE 0 8 0.7 1 In the beginning\n", "temperature 0.7 is not 1/n for a whole number n"),
])
def test_the_cpp_engine_refuses_what_the_python_engine_refuses(cpp_build, packages, max_batch, batching, schedule,
                                                               message):
    done = run_schedule(cpp_build, packages["calm"], max_batch, batching, schedule)
    assert done.returncode == 1 and done.stderr.startswith("engine_schedule: error: "), (done.returncode, done.stderr)
    assert message in done.stderr, done.stderr
    with pytest.raises(CalmEdgeError, match=re.escape(message)):
        engine = Engine(Model(packages["calm"]), max_batch=max_batch, batching=batching)
        engine.add_request([5, 6], _params(8, 0.7, 1))
