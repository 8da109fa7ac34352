"""Data parallelism on CPUs (gloo): 2 processes train what 1 process trains with the same global batch, and resume."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_resume import write_config
from test_train import losses, tiny_config

from loratune.data.batches import all_batches
from loratune.training.distributed import Dist, check_grad_accum, my_share
from loratune.training.recipe import train

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}


def dist_config(model_dir, data, out):
    cfg = tiny_config(model_dir, data, out, batch_size=2, grad_accum=2, max_steps=6, save_every=3, keep_checkpoints=5,
                      eval_every=3, report_to=[], device="cpu")
    cfg.data.datasets[0].eval_fraction = 0.25
    return cfg


def train_two_processes(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "loratune", "train", "--nproc", "2", *args],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def adapter(run_dir):
    return load_file(run_dir / "adapter_model.safetensors")


def eval_losses(run_dir):
    return [e["eval_loss"] for e in json.loads((run_dir / "eval_history.json").read_text())]


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory):
    from conftest import QA, write_jsonl

    tmp = tmp_path_factory.mktemp("dist")
    data = write_jsonl(tmp / "qa.jsonl", QA)
    one, _ = train(dist_config(tiny_llama_dir, data, tmp / "one"))
    cfg = dist_config(tiny_llama_dir, data, tmp / "two")
    config_file = write_config(cfg, tmp / "two.yaml")
    proc = train_two_processes(config_file)
    return one, tmp / "two", config_file, proc


def test_two_processes_match_one_with_the_same_global_batch(runs):
    one, two, _, proc = runs
    assert "2 processes (flat gradient all-reduce)" in proc.stderr  # the path taken, logged once (rank 0)
    assert proc.stderr.count("saved adapter to") == 1
    assert len(losses(two)) == 6
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    assert eval_losses(two) == pytest.approx(eval_losses(one), rel=1e-5)  # each rank scored half the held-out set
    a, b = adapter(one), adapter(two)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)
    final = json.loads((two / "final_metrics.json").read_text())
    assert final["processes"] == 2 and final["tokens"] == json.loads((one / "final_metrics.json").read_text())["tokens"]
    assert (two / "checkpoints" / "step-000003" / "rng-rank1.pt").is_file()  # rank 1's dropout stream is kept


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_one_host_match_one_process(runs, tmp_path):
    """Multi-node as a cluster runs it: two torchrun invocations (--nnodes 2, --node_rank 0 and 1, one process each)
    meeting at a rendezvous address, here 127.0.0.1 over gloo."""
    one, _, config_file, _ = runs
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
           "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "loratune", "train", config_file,
           f"--output_dir={tmp_path / 'nodes'}"]
    nodes = [subprocess.Popen([*cmd[:3], f"--node_rank={rank}", *cmd[3:]], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert losses(tmp_path / "nodes") == pytest.approx(losses(one), rel=1e-5)
    assert json.loads((tmp_path / "nodes" / "final_metrics.json").read_text())["processes"] == 2


def interrupted_copy(run_dir: Path, dest: Path, at_step: int) -> Path:
    """What a run killed after checkpoint `at_step` leaves: later checkpoints and the final files never written."""
    shutil.copytree(run_dir, dest)
    for ckpt in (dest / "checkpoints").glob("step-*"):
        if int(ckpt.name.split("-")[1]) > at_step:
            shutil.rmtree(ckpt)
    for name in ("adapter_model.safetensors", "adapter_config.json", "final_metrics.json"):
        (dest / name).unlink()
    return dest


def test_two_process_run_resumes_exactly(runs, tmp_path):
    _, two, config_file, _ = runs
    resumed = interrupted_copy(two, tmp_path / "resumed", at_step=3)
    proc = train_two_processes(config_file, "--resume", str(resumed))
    assert "resumed from" in proc.stderr
    assert losses(resumed) == pytest.approx(losses(two), rel=1e-6)
    for name, weight in adapter(two).items():
        torch.testing.assert_close(adapter(resumed)[name], weight, rtol=1e-6, atol=1e-7)


def test_a_two_process_checkpoint_resumes_in_one_process(runs, tmp_path):
    from loratune.config import load_config

    _, two, config_file, _ = runs
    resumed = interrupted_copy(two, tmp_path / "resumed1", at_step=3)
    cfg = load_config(config_file, [("output_dir", str(resumed))])
    train(cfg, resume=True)
    assert losses(resumed) == pytest.approx(losses(two), rel=1e-5)


def test_ranks_split_each_step_without_overlap(tiny_llama_dir, qa_file):
    from loratune.data.examples import load_data
    from loratune.model.load import load_tokenizer

    cfg = tiny_config(tiny_llama_dir, qa_file, "unused")
    examples = load_data(cfg.data, load_tokenizer(cfg.model), 0)[0]
    stream = all_batches(examples, batch_size=2, row_len=None, seed=0)
    for _ in range(5):  # steps of 4 micro-batches
        step = [next(stream) for _ in range(4)]
        shares = [my_share(step, Dist(rank, 2, rank)) for rank in range(2)]
        ids = [[id(e) for batch in share for e in batch] for share in shares]
        assert not set(ids[0]) & set(ids[1])
        assert sorted(ids[0] + ids[1]) == sorted(id(e) for batch in step for e in batch)


def test_grad_accum_must_split_over_the_processes():
    check_grad_accum(4, Dist(0, 2, 0))
    with pytest.raises(ValueError, match=r"train.grad_accum=3 is not a multiple of the 2 processes"):
        check_grad_accum(3, Dist(0, 2, 0))


def test_fsdp_matches_one_process_and_resumes(runs, tmp_path):
    one, _, config_file, _ = runs
    fsdp = tmp_path / "fsdp"
    proc = train_two_processes(config_file, "--train.parallel=fsdp", f"--output_dir={fsdp}")
    assert "2 processes" in proc.stderr
    assert losses(fsdp) == pytest.approx(losses(one), rel=1e-5)
    assert eval_losses(fsdp) == pytest.approx(eval_losses(one), rel=1e-5)
    for name, weight in adapter(one).items():  # gathered from the shards into an ordinary PEFT adapter
        # atol 1e-5: one process runs its batches as one row, shared prefix once (loss.trained_hidden); FSDP runs every row whole:
        # the same sums, rounded differently
        torch.testing.assert_close(adapter(fsdp)[name], weight, rtol=1e-5, atol=1e-5)

    resumed = interrupted_copy(fsdp, tmp_path / "fsdp-resumed", at_step=3)
    train_two_processes("--resume", str(resumed))  # with the run's own config.yaml, which says parallel: fsdp
    assert losses(resumed) == pytest.approx(losses(fsdp), rel=1e-6)
    for name, weight in adapter(fsdp).items():
        torch.testing.assert_close(adapter(resumed)[name], weight, rtol=1e-6, atol=1e-7)


def test_unknown_parallel_mode_names_the_key(tiny_llama_dir, qa_file, tmp_path):
    cfg = tiny_config(tiny_llama_dir, qa_file, tmp_path / "run", parallel="dpp", report_to=[])
    with pytest.raises(ValueError, match=r"train.parallel: 'dpp' should be one of ddp, fsdp"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_nproc_below_one_is_refused():
    proc = subprocess.run([sys.executable, "-m", "loratune", "train", "--nproc", "0"], env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--nproc 0: the number of processes must be 1 or more" in proc.stderr
