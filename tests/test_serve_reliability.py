"""Issue 21 (reliability 3), the server's side: one user can never slow or break another. Huge
bodies and prompts never stall other streams, bad values are 400s (never 500s or coercions), half-sent
requests time out, the Host header is checked, and SIGTERM ends every client cleanly."""

import json
import os
import signal
import socket
import subprocess
import threading
import time

import httpx
import pytest

pytest.importorskip("uvicorn")

from conftest import launch_on_free_port  # noqa: E402

CHAPTERS = ("11",)  # `make check CH=11` runs this file (tools/check.py)

MAX_MODEL_LEN = 512
ARGS = ("--served-model-name", "tiny", "--threads", "1", "--max-model-len", str(MAX_MODEL_LEN),
        "--header-timeout", "1", "--body-timeout", "2")


def start(tiny_model, tmp_path, *extra):
    return launch_on_free_port(tiny_model, tmp_path, *ARGS, *extra)


def stop(proc, log):
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.seek(0)
    return log.read()


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    proc, url, log = start(tiny_model, tmp_path_factory.mktemp("serve"))
    yield url
    print(stop(proc, log)[-3000:])


def post(url, path, body, **kw):
    """POST a body as JSON text (lone surrogates stay escaped, as a client in any language sends)."""
    return httpx.post(url + path, content=json.dumps(body), timeout=60,
                      headers={"content-type": "application/json"}, **kw)


# ---- finding 9: JSON booleans are not integers ------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("max_tokens", True), ("seed", True), ("top_k", True), ("min_tokens", False), ("n", True),
    ("stop_token_ids", [True]), ("temperature", True), ("prompt", [True, False]),
])
def test_booleans_are_refused_where_numbers_are_meant(server, field, value):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 4, field: value}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 400, f"{field}={value!r}: expected 400, got {r.status_code} {r.text[:200]}"
    assert field in r.json()["error"]["message"], r.json()


# ---- finding 1, through the server: an oversized stop set is a 400 --------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("stop", [f"stop {i}" for i in range(200)], "at most 128 strings"),
    ("stop", ["x" * 9000], "8192 characters"),
    ("stop_token_ids", list(range(2000)), "at most 1024"),
])
def test_an_oversized_stop_set_is_a_400(server, field, value, message):
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 4,
                                         field: value})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text[:300]
    assert len(r.text) < 1000, f"the error repeats the request: {len(r.text)} characters"


# ---- finding 7: text that is not text --------------------------------------------------------------

@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "\ud800"}),
    ("/v1/completions", {"prompt": ["ok \udfff"]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \ud800"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text",
                                                                         "text": ["a"]}]}]}),
])
@pytest.mark.tasks("11.20", "11.24")
def test_bad_text_is_a_400_not_a_500(server, path, body):
    r = post(server, path, {"model": "tiny", "max_tokens": 4, **body})
    assert r.status_code == 400, f"expected 400, got {r.status_code}: {r.text[:300]}"
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert post(server, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2}
                ).status_code == 200, "the server must go on serving"


# ---- finding 2: nothing heavy on the event loop ----------------------------------------------------

@pytest.mark.tasks("11.20", "11.24")
def test_huge_requests_never_stall_another_stream(server):
    """A 20 MB prompt, a 200,000-message chat (6.6 MB) and a 3 MB prompt while another client
    streams: the first two are over the 4 MiB body limit (413, before any parsing), the last is over
    the character limit (400, before tokenizing); the stream's tokens keep coming. Tokenizing on the
    event loop froze every stream for tens of seconds (59 s for these on this machine)."""
    stamps, done = [], threading.Event()

    def streamer():
        body = {"model": "tiny", "prompt": "Count:", "max_tokens": 480, "temperature": 0,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    stamps.append(time.perf_counter())
        done.set()

    t = threading.Thread(target=streamer)
    t.start()
    while len(stamps) < 5 and not done.is_set():
        time.sleep(0.01)
    statuses = {}
    huge = {
        "20 MB prompt": ("/v1/completions", {"prompt": "word " * 4_000_000}),
        "3 MB prompt": ("/v1/completions", {"prompt": "word " * 600_000}),
        "200,000 messages": ("/v1/chat/completions",
                             {"messages": [{"role": "user", "content": ""}] * 200_000}),
    }
    windows = {}
    for what, (path, body) in huge.items():
        data = json.dumps({"model": "tiny", "max_tokens": 4, **body})  # not timed: the client's work
        a = time.perf_counter()
        try:
            statuses[what] = httpx.post(server + path, content=data, timeout=60, headers={
                "content-type": "application/json"}).status_code
        except httpx.TransportError as e:  # the server may answer 413 and close while we send
            statuses[what] = type(e).__name__
        windows[what] = (a, time.perf_counter())
    t.join(120)
    gaps = {what: max([b - a for a, b in zip(stamps, stamps[1:]) if b > w0 and a < w1], default=0)
            for what, (w0, w1) in windows.items()}
    worst = max(gaps.values())
    spans = list(windows.values())
    calm = max(b - a for a, b in zip(stamps, stamps[1:])
               if not any(b > w0 and a < w1 for w0, w1 in spans))
    print(f"statuses {statuses}; the longest gap between the stream's events during each request "
          f"(ms): { {k: round(1e3 * v) for k, v in gaps.items()} }; outside them {1e3 * calm:.0f} ms")
    for what in ("20 MB prompt", "200,000 messages"):
        assert statuses[what] in (413, "WriteError", "RemoteProtocolError"), statuses
    assert statuses["3 MB prompt"] == 400, statuses
    assert len(stamps) > 400, f"the stream ended early: {len(stamps)} events"
    # The old server tokenized on the event loop: 59 s without a token here. What is left is the
    # body's transfer and JSON parsing (about 0.1 s of CPU for 3 MB), stretched by this machine's
    # load (8 agents on 2 cores: gaps of up to a second with nothing big going on, in `calm`).
    assert worst < max(5.0, 3 * calm), f"another stream waited {worst:.2f} s for its next token"


# ---- also: half-sent requests and the Host header -----------------------------------------------------

def test_a_half_sent_request_is_closed_after_the_header_timeout(server):
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and nothing more
        t = time.monotonic()
        try:
            got = s.recv(100)
        except TimeoutError:
            got = None
        took = time.monotonic() - t
    assert got == b"" and took < 5, f"the connection was still open after {took:.1f} s ({got!r})"


def test_a_trickled_body_gets_a_408_after_the_body_timeout(server):
    """The head at once, then the body a byte every 0.2 s: past the header timeout (1 s here) the
    connection stays; at the body timeout (2 s here) it gets a 408 and is closed. Before, such a
    client held its connection and handler for as long as it kept trickling."""
    host, port = server.removeprefix("http://").split(":")
    got = b""
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: "
                  b"application/json\r\ncontent-length: 1000\r\n\r\n{")
        t = time.monotonic()
        s.settimeout(0.2)
        while time.monotonic() - t < 15:
            try:
                s.sendall(b" ")
                data = s.recv(4096)
            except TimeoutError:
                continue
            except OSError:  # reset once closed
                break
            if not data:
                break
            got += data
        took = time.monotonic() - t
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), got[:300]
    assert json.loads(body)["error"]["code"] == 408, body
    assert 1.5 < took < 6, f"closed after {took:.1f} s; the body timeout is 2 s"


def stream_gaps_during(url, requests: dict) -> tuple[dict, float, dict]:
    """Send each body while another client streams: {what: the stream's longest gap during it},
    the 99th percentile of its gaps at other times, and {what: status}."""
    stamps, stop = [], threading.Event()

    def streamer():
        body = {"model": "tiny", "prompt": "Count:", "max_tokens": 480, "temperature": 0,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    stamps.append(time.perf_counter())
                if stop.is_set():
                    break

    t = threading.Thread(target=streamer)
    t.start()
    while len(stamps) < 5:
        time.sleep(0.01)
    windows, statuses = {}, {}
    for what, (path, data) in requests.items():
        time.sleep(0.3)
        a = time.perf_counter()
        r = httpx.post(url + path, content=data, timeout=60, headers={"content-type": "application/json"})
        windows[what], statuses[what] = (a, time.perf_counter()), r
    time.sleep(0.3)
    stop.set()
    t.join(120)
    gaps = list(zip(stamps, stamps[1:]))
    worst = {what: max([b - a for a, b in gaps if b > w0 and a < w1], default=0)
             for what, (w0, w1) in windows.items()}
    calm = sorted(b - a for a, b in gaps
                  if not any(b > w0 and a < w1 for w0, w1 in windows.values()))
    return worst, calm[int(0.99 * len(calm))], statuses


def test_parsing_a_body_of_many_values_never_stalls_another_stream(server):
    """4 MiB bodies of many small values, within the body limit: json.loads holds the GIL (no
    thread helps) for 0.3 s (a list of one-character prompts) to 1.3 s (small nested lists), and
    every other stream waited that long for its next token. Parsed in a separate process now, and
    refused there (more than MAX_JSON_VALUES values): the stream's longest gap stays near its usual."""
    MiB = 2**20
    dumps = lambda body: json.dumps({"model": "tiny", "max_tokens": 4, **body})  # noqa: E731
    post(server, "/v1/completions", {"model": "tiny", "prompt": ["a"] * 200_000})  # starts the parser
    worst, calm, statuses = stream_gaps_during(server, {
        "1-char prompts": ("/v1/completions", dumps({"prompt": ["a"] * (4 * MiB // 5 - 40)})),
        "nested lists": ("/v1/completions", dumps({"prompt": "hi", "metadata": [[[1]]] * (4 * MiB // 8 - 40)})),
        "4 MiB string": ("/v1/completions", dumps({"prompt": "word " * (4 * MiB // 5 - 40)})),
    })
    print(f"the stream's longest gap during each (ms): { {k: round(1e3 * v) for k, v in worst.items()} }; "
          f"p99 at other times {1e3 * calm:.0f} ms")
    for what, r in statuses.items():
        assert r.status_code == 400, (what, r.text[:200])
        assert ("JSON values" in r.text) == (what != "4 MiB string"), r.text[:200]
    for what, gap in worst.items():
        assert gap < max(0.4, 2 * calm), f"{what}: the stream waited {gap:.2f} s for a token"


def test_the_host_header_must_name_this_server(server):
    port = server.rsplit(":", 1)[1]
    for host in ("127.0.0.1", f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        assert httpx.get(server + "/v1/models", headers={"host": host}).status_code == 200, host
    r = httpx.get(server + "/v1/models", headers={"host": f"rebind.example.com:{port}"})
    assert r.status_code == 400 and "allowed-hosts" in r.json()["error"]["message"], r.text


# ---- finding 6: SIGTERM ends every client cleanly ---------------------------------------------------

@pytest.mark.tasks("11.5")
def test_sigterm_drains_then_ends_every_client_with_503(tiny_model, tmp_path):
    """Running requests get --shutdown-timeout (1 s here) to finish; a new request meanwhile gets a
    503; then the open stream gets an error event (code 503) and [DONE], the open plain request an
    OpenAI-style 503, and the log has no traceback. Before, uvicorn cancelled them: the stream ended
    with neither, the plain request got nothing."""
    proc, url, log = start(tiny_model, tmp_path, "--shutdown-timeout", "1")
    long = {"model": "tiny", "prompt": "Count:", "max_tokens": 480, "temperature": 0,
            "ignore_eos": True}
    plain, events = [], []

    def plain_request():
        try:
            plain.append(httpx.post(url + "/v1/completions", json=long, timeout=60))
        except httpx.TransportError as e:
            plain.append(e)

    try:
        other = threading.Thread(target=plain_request)
        with httpx.stream("POST", url + "/v1/completions", json={**long, "stream": True},
                          timeout=60) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    break
            other.start()
            time.sleep(0.3)
            t = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            late = httpx.post(url + "/v1/completions", json={**long, "max_tokens": 2}, timeout=10)
            events = [line for line in lines if line.startswith("data: ")]
        other.join(60)
        proc.wait(timeout=30)
        took = time.monotonic() - t
    finally:
        text = stop(proc, log)
        print(text[-3000:])
    print(f"stopped {took:.1f} s after SIGTERM; the stream's last events: {events[-2:]}")
    assert late.status_code == 503 and late.json()["error"]["code"] == 503, late.text
    assert events[-1] == "data: [DONE]", f"the stream did not end with [DONE]: {events[-3:]}"
    error = json.loads(events[-2][6:])
    assert error["error"]["code"] == 503, f"expected an error event before [DONE]: {events[-3:]}"
    (answer,) = plain
    assert isinstance(answer, httpx.Response) and answer.status_code == 503, answer
    assert answer.json()["error"]["type"] == "service_unavailable", answer.text
    assert "Traceback" not in text and "CancelledError" not in text, text[-3000:]
    assert took < 15, f"the server took {took:.1f} s to stop"


def alive(pid: int) -> bool:
    """pid runs (a zombie, exited but not yet reaped by whoever adopted it, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc (Linux)")
def test_a_killed_server_leaves_no_parser_process_behind(tiny_model, tmp_path):
    """A server killed outright (SIGKILL, the OOM killer) cannot shut down its JSON parser process;
    that process held both ends of its own task queue and waited for work forever (seen: a parser
    of a killed test server still running 24 minutes later, 350 MB). It must end by itself."""
    proc, url, log = start(tiny_model, tmp_path)
    try:
        post(url, "/v1/completions", {"model": "tiny", "prompt": ["a"] * 200_000})  # starts it
        kids = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                               text=True).stdout.split()]  # fmt: skip
        assert kids, "no parser process was started"
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while any(map(alive, kids)) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [pid for pid in kids if alive(pid)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"processes of the killed server still run after 10 s: {left}"
    finally:
        stop(proc, log)
