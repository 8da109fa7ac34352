"""`loratune serve` as a user runs it: a real server process on a free local port, talked to with the official
`openai` client and with raw HTTP. Two adapters of one tiny base are trained to answer differently ("yes" and
"no"), so which adapter served a request shows in its answer."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import yaml
from badinput import check_bad, run_cli
from conftest import QA, write_jsonl

import loratune
from loratune.config import Config, DataConfig, DatasetConfig, LoraConfig, ModelConfig, TrainConfig

TRAINED = ["What is 2 plus 3?", "What is 5 plus 1?", "What is 0 plus 0?"]  # questions of the training data
QUESTIONS = TRAINED + ["Say hi"]


def train_answering(base: Path, answer: str, out: Path) -> Path:
    """A chat adapter that answers every question with `answer`."""
    records = [{"messages": [{"role": "user", "content": q["question"]}, {"role": "assistant", "content": answer}]}
               for q in QA]
    cfg = Config(model=ModelConfig(name=str(base)), lora=LoraConfig(r=4, alpha=8, dropout=0.0),
                 data=DataConfig(datasets=[DatasetConfig(path=str(write_jsonl(out.with_suffix(".jsonl"), records)))],
                                 max_length=64),
                 train=TrainConfig(batch_size=4, lr=3e-2, max_steps=300, seed=0, warmup_steps=1, report_to=[]),
                 output_dir=str(out))
    return loratune.train(cfg)[0]


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("serve")
    return {"alpha": train_answering(tiny_llama_dir, "yes", tmp / "alpha"),
            "beta": train_answering(tiny_llama_dir, "no", tmp / "beta")}


class Server:
    """`python -m loratune serve ARGS --port 0`, up until stopped; its address read from what it prints."""

    def __init__(self, args: list[str], env: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, "-m", "loratune", "serve", *args, "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        self.output = []
        deadline = time.monotonic() + 120
        for line in self.proc.stdout:
            self.output.append(line)
            found = re.search(r"at http://127\.0\.0\.1:(\d+)/v1", line)
            if found:
                self.port = int(found.group(1))
                break
            assert time.monotonic() < deadline, "".join(self.output)
        else:
            raise AssertionError("the server did not start:\n" + "".join(self.output))
        threading.Thread(target=lambda: self.output.extend(self.proc.stdout), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0)

    def request(self, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        data = response.read()
        conn.close()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(data) if data else None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(runs):
    s = Server([str(runs["alpha"]), f"second={runs['beta']}", "--max-tokens", "240"])
    yield s
    s.stop()


def chat(client: openai.OpenAI, model: str, question: str, **kw) -> str:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                           temperature=0, max_tokens=24, **kw)
    return reply.choices[0].message.content


def test_models_lists_every_run_and_the_base(server, tiny_llama_dir):
    names = [m.id for m in server.client().models.list()]
    assert names == [tiny_llama_dir.name, "alpha", "second"]


def test_each_adapter_answers_as_it_was_trained(server):
    client = server.client()
    for question in TRAINED:
        assert chat(client, "alpha", question) == "yes"
        assert chat(client, "second", question) == "no"
    reply = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": TRAINED[0]}],
                                           temperature=0, max_tokens=24)
    assert reply.choices[0].finish_reason == "stop" and reply.object == "chat.completion"
    assert reply.usage.completion_tokens == 3 and reply.usage.prompt_tokens > 10
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 3


def test_streaming_gives_the_same_text_in_pieces(server):
    client = server.client()
    chunks = list(client.chat.completions.create(
        model="second", messages=[{"role": "user", "content": "What is 2 plus 3?"}], temperature=0, max_tokens=24,
        stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == "no" and len(pieces) >= 2  # token by token, not in one piece
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 2
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="alpha", prompt="The sum", max_tokens=10, temperature=0, stream=True))
    assert text == client.completions.create(model="alpha", prompt="The sum", max_tokens=10, temperature=0).choices[0].text


def test_mixed_concurrent_requests_equal_one_at_a_time(server, tiny_llama_dir):
    """Requests for two adapters and the base, sent together, share forward passes (one batch of mixed adapters,
    joined while others decode): each answer is what the same request gets alone."""
    client = server.client()
    jobs = [(model, q) for q in QUESTIONS for model in ("alpha", "second", tiny_llama_dir.name)] * 2
    alone = [chat(client, model, q) for model, q in jobs]
    steps_before = server.request("GET", "/health")[2]["steps"]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: chat(client, *job), jobs))
    steps = server.request("GET", "/health")[2]["steps"] - steps_before
    assert together == alone
    assert steps < sum(24 for _ in jobs) / 2, f"{steps} decoding steps for {len(jobs)} requests: not batched"


def test_greedy_answers_equal_loratune_generate(server, runs, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(q + "\n" for q in QUESTIONS + ["What is 4 plus 4?", "Hello there"]))
    code, text = run_cli(["generate", str(runs["alpha"]), "--input", str(prompts), "--output",
                          str(tmp_path / "out.txt"), "--max_new_tokens", "24"], tmp_path)
    assert code == 0, text
    expected = (tmp_path / "out.txt").read_text().splitlines()
    client = server.client()
    assert [chat(client, "alpha", q).strip() for q in prompts.read_text().splitlines()] == expected


def test_sampling_options(server, tiny_llama_dir):
    client = server.client()
    first, again = (client.completions.create(model=tiny_llama_dir.name, prompt="hi", temperature=1.5, seed=7,
                                              max_tokens=12, n=3) for _ in range(2))
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.text for c in again.choices]  # a seed gives the same draws
    assert len(set(texts)) == 3  # each choice its own draw
    assert 3 <= first.usage.completion_tokens <= 36
    stopped = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": TRAINED[1]}],
                                             temperature=0, max_tokens=24, stop=["es"])
    assert stopped.choices[0].message.content == "y" and stopped.choices[0].finish_reason == "stop"
    cut = client.chat.completions.create(model="second", messages=[{"role": "user", "content": TRAINED[1]}],
                                         temperature=0, max_tokens=1)
    assert cut.choices[0].message.content == "n" and cut.choices[0].finish_reason == "length"


def test_bad_requests_get_openai_errors_and_the_server_lives_on(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError, match="not served here"):
        chat(client, "gamma", "hi")
    cases = [
        (b'{"model": "alpha", "messages": [', 400, "not valid JSON"),
        (json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}), 400,
         "temperature"),
        (json.dumps({"model": "alpha", "messages": []}), 400, "messages"),
        (json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 241}), 400,
         "over this server's limit of 240"),
        (json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "x" * 300}]}), 400,
         "context is 256 tokens"),
        (json.dumps({"model": "alpha", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}), 400, "stop"),
        (json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}), 413, "bytes"),
    ]
    for body, status, needle in cases:
        path = "/v1/completions" if b'"prompt"' in (body if isinstance(body, bytes) else body.encode()) else \
            "/v1/chat/completions"
        got, _, reply = server.request("POST", path, body)
        assert got == status, (body[:80], got, reply)
        assert needle in reply["error"]["message"] and reply["error"]["type"], reply
    assert server.request("GET", "/v1/nothing")[0] == 404
    assert chat(client, "alpha", TRAINED[0]) == "yes"  # still serving
    assert server.proc.poll() is None


def test_a_client_that_goes_away_frees_its_slot(server, tiny_llama_dir):
    """A stream read for a few tokens and dropped: the engine stops decoding it (it would run 240 tokens)."""
    request = {"model": tiny_llama_dir.name, "prompt": "zz", "max_tokens": 240, "temperature": 0}
    reply = server.request("POST", "/v1/completions", json.dumps(request))[2]
    assert reply["choices"][0]["finish_reason"] == "length"  # this request does run to its limit
    before = server.request("GET", "/health")[2]["steps"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({**request, "stream": True}),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    response.fp.readline()  # the first event
    conn.sock.close()
    conn.close()
    for _ in range(100):
        health = server.request("GET", "/health")[2]
        if health["running"] == 0:
            break
        time.sleep(0.05)
    assert health["running"] == 0 and health["steps"] - before < 200, health


def test_api_key_and_a_full_queue(runs):
    server = Server([str(runs["alpha"]), "--max-queue", "2"], env={"LORATUNE_API_KEY": "s3cret"})
    try:
        with pytest.raises(openai.AuthenticationError):
            chat(server.client("wrong"), "alpha", "hi")
        assert server.request("GET", "/v1/models")[0] == 401
        assert chat(server.client("s3cret"), "alpha", TRAINED[0]) == "yes"
        status, headers, reply = server.request("POST", "/v1/chat/completions", json.dumps(
            {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "n": 3}),
            {"Authorization": "Bearer s3cret"})
        assert status == 503 and headers["retry-after"] == "1" and "busy" in reply["error"]["message"]
    finally:
        server.stop()


def test_bad_serve_commands_fail_before_loading(runs, tmp_path, tiny_gpt2_dir):
    check_bad(["serve", str(tmp_path / "nope")], tmp_path, "no such run directory")
    check_bad(["serve", str(runs["alpha"]), f"alpha={runs['beta']}"], tmp_path, "two runs would be served as 'alpha'")
    other = tmp_path / "other"
    other.mkdir()
    saved = yaml.safe_load((runs["alpha"] / "config.yaml").read_text())
    saved["model"]["name"] = str(tiny_gpt2_dir)
    (other / "config.yaml").write_text(yaml.safe_dump(saved))
    (other / "adapter_model.safetensors").write_bytes(b"")
    check_bad(["serve", str(runs["alpha"]), str(other)], tmp_path, "one base model")
    check_bad(["serve", str(runs["alpha"]), "--max-batch", "0"], tmp_path, "--max-batch must be 1 or more")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        check_bad(["serve", str(runs["alpha"]), "--port", str(taken.getsockname()[1])], tmp_path, "choose another --port")
