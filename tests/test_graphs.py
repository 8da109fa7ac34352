"""CUDA graphs and compilation: which runs use them. The graph replay itself needs a GPU; benchmarks/throughput.py
checks it there (its equal-quality guard compares the compiled, replayed path with the plain one)."""

import logging

import pytest
import torch

from loratune.config import TrainConfig
from loratune.training.graphs import GraphedMicroStep, graphs_blocker
from loratune.training.options import COMPILE_MIN_TOKENS, worth_compiling
from loratune.training.recipe import train


def test_failed_capture_falls_back_to_plain_launches_with_the_same_gradients(caplog):
    """On the CPU every capture fails (no CUDA); with fallback the step must still add loss x scale's gradients
    to .grad, micro-batch after micro-batch, and say once that it fell back."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)

    def loss_of(batch):
        return (layer(batch["x"]) ** 2).sum()

    step = GraphedMicroStep(loss_of, list(layer.parameters()), fallback=True)
    with caplog.at_level(logging.WARNING, logger="loratune"):
        first, second = step({"x": x}, 0.5), step({"x": x}, 0.25)
    assert caplog.text.count("CUDA graph capture failed") == 1
    assert first.item() == second.item() == pytest.approx(loss_of({"x": x}).item())
    got = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    (0.75 * loss_of({"x": x})).backward()
    for g, p in zip(got, layer.parameters()):
        torch.testing.assert_close(g, p.grad)

    strict = GraphedMicroStep(loss_of, list(layer.parameters()), fallback=False)
    with pytest.raises(RuntimeError):
        strict({"x": x}, 1.0)


@pytest.mark.parametrize("kwargs, reason", [
    (dict(device=torch.device("cpu")), "need a CUDA device"),
    (dict(packed=False), "turn on data.packing"),
    (dict(processes=2), "DDP's wrapper or FSDP"),
    (dict(fp16_scaler=True), "precision=fp16"),
    (dict(checkpointing=True), "gradient_checkpointing"),
])
def test_runs_that_cannot_use_cuda_graphs_say_why(kwargs, reason):
    run = dict(device=torch.device("cuda"), packed=True, processes=1, fp16_scaler=False, checkpointing=False)
    assert graphs_blocker(**run) is None
    assert reason in graphs_blocker(**{**run, **kwargs})


def test_cuda_graphs_on_where_impossible_is_a_clear_error_before_anything_is_written(tiny_gpt2_dir, qa_file, tmp_path):
    from test_train import tiny_config

    with pytest.raises(ValueError, match="train.cuda_graphs=on: CUDA graphs need a CUDA device"):
        train(tiny_config(tiny_gpt2_dir, qa_file, tmp_path / "run", device="cpu", cuda_graphs="on"))
    assert not (tmp_path / "run").exists()


def test_compilation_is_left_to_long_runs_unless_asked():
    assert not worth_compiling(TrainConfig(), COMPILE_MIN_TOKENS - 1)
    assert worth_compiling(TrainConfig(), COMPILE_MIN_TOKENS)
    assert worth_compiling(TrainConfig(compile="on"), 1)
    assert not worth_compiling(TrainConfig(compile="off"), 10 * COMPILE_MIN_TOKENS)
    with pytest.raises(ValueError, match="train.compile: 'yes' should be one of auto, on, off"):
        worth_compiling(TrainConfig(compile="yes"), 1)


def test_a_batch_of_another_shape_runs_eagerly_instead_of_replaying():
    """copy_ into the captured inputs would broadcast a 1-row batch over 4 rows without a word."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)

    def loss_of(batch):
        return (layer(batch["x"]) ** 2).sum()

    class NoReplay:
        def replay(self):
            raise AssertionError("replayed a graph captured for another shape")

    step = GraphedMicroStep(loss_of, list(layer.parameters()), fallback=True)
    step.graph, step.inputs, step.scale = NoReplay(), {"x": torch.zeros(4, 4)}, torch.zeros(())  # as after a capture
    x = torch.randn(1, 4)
    assert step({"x": x}, 0.5).item() == pytest.approx(loss_of({"x": x}).item())
    got = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    (0.5 * loss_of({"x": x})).backward()
    for g, p in zip(got, layer.parameters()):
        torch.testing.assert_close(g, p.grad)
