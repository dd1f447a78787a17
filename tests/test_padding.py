"""Padded token data: padded tokens never enter a statistic, whatever their ids, and the merge reads the real
tokens as it would read them unpadded."""

import pytest
import torch
import torch.nn as nn
from conftest import raises
from test_hf import VOCAB, _model

import pleascc
from pleascc.passes.reads import at_tokens, valid_tokens

transformers = pytest.importorskip("transformers")

SAMPLES, TOKENS, REAL = 48, 8, 5


def _padded(left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids with a padding mask: every sample REAL tokens or more, the rest padding (on the right, or on
    the left as for generation)."""
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (SAMPLES, TOKENS))
    lengths = torch.randint(REAL, TOKENS + 1, (SAMPLES,))
    real = torch.arange(TOKENS)[None, :] < lengths[:, None]
    return ids, (real.flip(1) if left else real).long()


def _weights(result) -> dict[str, torch.Tensor]:
    return result.model.state_dict()


@pytest.mark.parametrize("name, left, options", [
    ("bert", False, {}),  # bidirectional: without the mask every token would read the padding
    ("llama-gqa", True, {"least_squares": "one-pass"}),
    ("gpt2", False, {"positions": 6}),  # fewer tokens read than a sample holds: sampled, then padding dropped
    ("gpt2", True, {"cache_gb": 1e-4}),  # sequential least squares' recorded outputs and frontier on disk
    ("bert", False, {"method": "zipit"}),
    ("llama-gqa", False, {"method": "regmean"}),
])
def test_the_ids_of_padded_tokens_do_not_change_the_merge(name, left, options):
    (a, _), (b, _) = _model(name, 0), _model(name, 1)
    ids, mask = _padded(left)
    other = torch.where(mask.bool(), ids, torch.randint(0, VOCAB, ids.shape))
    first = pleascc.merge(a, b, {"input_ids": ids, "attention_mask": mask}, progress=False, **options)
    second = pleascc.merge(a, b, {"input_ids": other, "attention_mask": mask}, progress=False, **options)
    assert all(torch.equal(w, _weights(second)[k]) for k, w in _weights(first).items())


def test_padded_tokens_merge_as_the_same_tokens_unpadded():
    """Every sample REAL real tokens then padding: the merge equals the one on the REAL tokens alone, up to the
    rounding that reordering the samples also makes (the fits amplify it in their weights, not in the outputs)."""
    (a, _), (b, _) = _model("bert", 0), _model("bert", 1)
    ids, _ = _padded()
    mask = (torch.arange(TOKENS) < REAL).long().expand(SAMPLES, -1)
    padded = pleascc.merge(a, b, {"input_ids": ids, "attention_mask": mask}, progress=False)
    unpadded = pleascc.merge(a, b, ids[:, :REAL].contiguous(), progress=False)
    with torch.no_grad():
        want, got = unpadded.model(ids[:, :REAL]), padded.model(ids[:, :REAL])
    assert (got - want).norm() / want.norm() < 1e-4


def test_a_tokenizer_s_padded_output_is_calibration_data():
    texts = [f"s{k} " + "ab " * (k % 5) for k in range(SAMPLES)]
    batch = transformers.ByT5Tokenizer()(texts, padding=True, return_tensors="pt")  # bytes + 3: ids below VOCAB
    assert not bool(batch["attention_mask"].all()) and int(batch["input_ids"].max()) < VOCAB
    (a, _), (b, _) = _model("gpt2", 0), _model("gpt2", 1)
    merged = pleascc.merge(a, b, batch, progress=False).model
    with torch.no_grad():
        assert torch.isfinite(merged(batch["input_ids"], batch["attention_mask"])).all()


def test_reads_keep_only_real_tokens():
    x = torch.arange(2 * 4 * 3.0).reshape(2, 4, 3)  # (samples, tokens, units)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    with valid_tokens(mask):
        read = at_tokens(x, 0, (-1,), None)
        pooled = at_tokens(x[:, 0], 0, (-1,), None)  # one position per sample: nothing to drop
    assert torch.equal(read, torch.cat([x[0, :2], x[1, 1:]])[None])
    assert torch.equal(pooled, x[:, 0][:, None])
    assert torch.equal(at_tokens(x, 0, (-1,), None), x)  # outside a padded batch: every token


class _Tokens(nn.Module):
    """A user's token model whose forward takes no padding mask."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.out = nn.Embedding(VOCAB, 16), nn.Linear(16, 4)

    def forward(self, ids):
        return self.out(torch.relu(self.embed(ids)))


@pytest.mark.parametrize("mask, expected", [
    (torch.full((SAMPLES, TOKENS), 2), "holds values other than 0 and 1"),
    (torch.zeros(SAMPLES, TOKENS, dtype=torch.long), "has samples with no real token: drop them"),
    (torch.ones(SAMPLES, 3, dtype=torch.long), "has shape (48, 3), input_ids (48, 8)"),
])
def test_a_wrong_padding_mask_is_named(mask, expected):
    (a, _), (b, _) = _model("gpt2", 0), _model("gpt2", 1)
    raises(expected, pleascc.merge, a, b, {"input_ids": _padded()[0], "attention_mask": mask}, progress=False)


def test_padding_for_a_model_without_a_mask_input_is_refused():
    ids, mask = _padded()
    raises("the model's forward takes no attention_mask: calibrate on unpadded sequences", pleascc.merge,
           _Tokens(), _Tokens(), {"input_ids": ids, "attention_mask": mask}, progress=False)
