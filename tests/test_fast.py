"""Packing without contamination and the equal-quality guard for the fast path (CPU)."""

import pytest
import torch

from loratune.config import LoraConfig, ModelConfig
from loratune.data import packing
from loratune.data.examples import IGNORE, Example, collate
from loratune.model import attention
from loratune.model.load import add_lora, load_base_model, unwrap_causal_lm
from loratune.model.loss import packed_nll, sum_token_nll


def random_examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, 250, (n,), generator=g).tolist()
        out.append(Example(ids, [IGNORE] * 3 + ids[3:], {}))
    return out


def test_pack_rows_fits_every_example_once_within_row_length():
    examples = random_examples([30, 5, 17, 40, 12, 9, 33, 1, 20])
    rows = packing.pack_rows(examples, list(range(len(examples))), 48)
    assert sorted(i for row in rows for i in row) == list(range(len(examples)))
    assert all(sum(len(examples[i].input_ids) for i in row) <= 48 for row in rows)
    assert len(rows) == 4  # 167 tokens: best fit needs ceil(167 / 48) = 4 rows here


def test_packed_rows_restart_positions_and_never_target_a_neighbour():
    examples = random_examples([4, 3])
    batch = packing.collate_packed([examples], 10, pad_id=0)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 0, 0]
    assert batch["doc_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, -1, -1, -1]
    targets = batch["targets"][0].tolist()
    assert targets[3] == IGNORE  # first example's last token does not predict the second's first
    assert targets[:3] == [IGNORE, IGNORE, examples[0].input_ids[3]]


@pytest.fixture(params=["gpt2", "gpt_neox", "llama"])
def lora_model(request, tmp_path_factory):
    from conftest import save_tiny

    path = save_tiny(request.param, tmp_path_factory.mktemp(request.param))
    model = add_lora(load_base_model(ModelConfig(name=str(path)), torch.device("cpu")), LoraConfig(r=4, dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return model.eval()


def test_packed_loss_and_gradients_equal_one_by_one(lora_model):
    examples = random_examples([7, 13, 5, 20, 11])
    reference = 0.0
    for e in examples:
        nll, _ = sum_token_nll(lora_model, collate([e], pad_id=0))
        nll.backward()
        reference += nll.item()
    ref_grads = [p.grad.clone() for p in lora_model.parameters() if p.requires_grad]
    lora_model.zero_grad()

    attention.use_packed_attention(lora_model)
    rows = packing.pack_rows(examples, list(range(len(examples))), 32)
    assert any(len(r) > 1 for r in rows)  # something really is packed together
    batch = packing.collate_packed([[examples[i] for i in r] for r in rows], 32, pad_id=0)
    lm = unwrap_causal_lm(lora_model)
    packed = packed_nll(getattr(lm, lm.base_model_prefix), lm.get_output_embeddings(), batch)
    packed.backward()
    assert packed.item() == pytest.approx(reference, rel=1e-5)
    for ref, p in zip(ref_grads, (p for p in lora_model.parameters() if p.requires_grad)):
        torch.testing.assert_close(p.grad, ref, atol=1e-5, rtol=1e-4)


def test_equal_quality_guard_packed_loop_matches_plain_loop(tiny_llama_dir, tmp_path):
    """With every example longer than half a row, each packed row holds exactly one example, so the
    packed loop sees the plain loop's batches: the loss curves must agree to float tolerance."""
    import json

    from conftest import write_jsonl
    from test_train import losses, tiny_config

    records = [{"question": f"Question number {i:03d}: what is {i} times {i % 7}? ", "answer": f"{i * (i % 7)}."}
               for i in range(48)]
    data = write_jsonl(tmp_path / "long.jsonl", records)
    from loratune.training.recipe import train

    plain, _ = train(tiny_config(tiny_llama_dir, data, tmp_path / "plain", max_steps=6, log_every=1))
    cfg = tiny_config(tiny_llama_dir, data, tmp_path / "packed", max_steps=6, log_every=3)
    cfg.data.packing = True
    packed, _ = train(cfg)
    assert json.loads((packed / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1  # every step recorded
    assert losses(packed) == pytest.approx(losses(plain), rel=1e-4)
    assert losses(plain)[-1] < losses(plain)[0]
