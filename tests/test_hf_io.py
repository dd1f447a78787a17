"""Hugging Face model directories and token data through the command line: in, merged, out, and every refusal."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import cli_error, save_npz

from pleascc.cli import main
from pleascc.export import onnx_predict
from pleascc.load import load_model

transformers = pytest.importorskip("transformers")

VOCAB, TOKENS = 300, 16


def _gpt2(seed: int) -> "transformers.GPT2LMHeadModel":
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                     bos_token_id=1, eos_token_id=1)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict[str, str]:
    """Two GPT-2 directories from different seeds (A sharded, with a byte tokenizer), token ids and text."""
    root = tmp_path_factory.mktemp("hf")
    files = {name: str(root / name) for name in ("a", "b", "ids", "padded", "bad_mask", "text")}
    _gpt2(0).save_pretrained(files["a"], max_shard_size="50KB")
    _gpt2(1).save_pretrained(files["b"])
    transformers.ByT5Tokenizer().save_pretrained(files["a"])
    ids = np.random.default_rng(0).integers(0, VOCAB, (48, TOKENS))
    files["ids"] = save_npz(root / "ids.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    files["padded"] = save_npz(root / "padded.npz", input_ids=ids, attention_mask=np.tril(np.ones_like(ids))[:48])
    files["bad_mask"] = save_npz(root / "bad_mask.npz", input_ids=ids, attention_mask=2 * np.ones_like(ids))
    files["text"] = str(root / "text.txt")
    with open(files["text"], "w") as f:
        f.write("Merging two language models from different seeds. " * 40)
    return files


def test_a_sharded_model_directory_merges_from_token_ids_and_runs_in_onnx(hf, tmp_path):
    assert any(name.endswith(".index.json") for name in os.listdir(hf["a"]))
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    assert main(["merge", hf["a"], hf["b"], "--data", hf["ids"], "-o", str(out), "--report", str(report),
                 "--no-progress"]) == 0
    assert json.loads(report.read_text())["onnx"]["outputs"] == ["logits"]
    x = torch.from_numpy(np.load(hf["ids"])["input_ids"][:4])
    (logits,) = onnx_predict(str(out), x)
    assert logits.shape == (4, TOKENS, VOCAB) and np.isfinite(logits).all()
    (shorter,) = onnx_predict(str(out), x[:, :7])  # any length: a causal model's first 7 logits are the same
    np.testing.assert_allclose(shorter, logits[:, :7], rtol=1e-4, atol=1e-5)


def test_padded_token_ids_merge_and_their_padding_is_not_read(hf, tmp_path):
    """Sample k holds k + 1 real tokens, the rest padding (``tests/test_padding.py``: no statistic reads it)."""
    out = tmp_path / "m.onnx"
    assert main(["merge", hf["a"], hf["b"], "--data", hf["padded"], "-o", str(out), "--no-progress"]) == 0
    (logits,) = onnx_predict(str(out), torch.from_numpy(np.load(hf["padded"])["input_ids"][:2]))
    assert logits.shape == (2, TOKENS, VOCAB) and np.isfinite(logits).all()


def test_text_is_cut_into_chunks_by_model_a_s_tokenizer_and_saved_as_a_directory(hf, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", hf["a"], hf["b"], "--data", hf["text"], "--seq-len", "32", "--format", "hf",
                 "-o", str(out), "--no-progress"]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(merged).__name__ == "GPT2LMHeadModel"
    with torch.no_grad():
        logits = merged(torch.randint(0, VOCAB, (2, 8))).logits
    assert logits.shape == (2, 8, VOCAB) and torch.isfinite(logits).all()
    assert sorted(os.listdir(tmp_path)) == ["merged"]  # staged beside, moved in whole


def test_a_self_merge_saved_as_a_directory_is_the_model(hf, tmp_path):
    out = tmp_path / "self"
    assert main(["merge", hf["a"], hf["a"], "--data", hf["ids"], "--format", "hf", "-o", str(out),
                 "--no-progress"]) == 0
    a = transformers.GPT2LMHeadModel.from_pretrained(hf["a"], local_files_only=True).eval()
    merged = transformers.GPT2LMHeadModel.from_pretrained(out, local_files_only=True).eval()
    x = torch.randint(0, VOCAB, (3, TOKENS))
    with torch.no_grad():
        want, got = a(x).logits, merged(x).logits
    assert (got - want).norm() / want.norm() < 1e-4


@pytest.mark.parametrize("case, expected", [
    (lambda hf, out: ["merge", "openai/gpt2", hf["b"], "--data", hf["ids"], "-o", out],
     "not a local directory and pleascc works offline: download it first"),
    (lambda hf, out: ["merge", "runs/missing.pt", hf["b"], "--data", hf["ids"], "-o", out],
     "checkpoint runs/missing.pt not found: check the path"),
    (lambda hf, out: ["merge", hf["a"], hf["b"], "--data", hf["bad_mask"], "-o", out],
     "holds values other than 0 and 1: store 1 for a real token, 0 for padding"),
    (lambda hf, out: ["merge", hf["a"], hf["b"], "--data", hf["text"], "--tokenizer", hf["b"], "-o", out],
     "holds no tokenizer"),
    (lambda hf, out: ["merge", hf["b"], hf["a"], "--data", hf["text"], "-o", out],
     "is text: pass --tokenizer DIR"),
    (lambda hf, out: ["merge", hf["a"], hf["b"], "--data", hf["text"], "--seq-len", "100000", "-o", out],
     "0 chunk(s) of --seq-len 100000"),
    (lambda hf, out: ["merge", hf["a"], hf["b"], "--data", hf["ids"], "--format", "hf", "--budget", "1.5",
                      "-o", out], "--format hf writes the config's widths, budget 1.0"),
])
def test_what_a_user_gets_wrong_is_one_line(hf, tmp_path, capsys, case, expected):
    out = str(tmp_path / "out")
    assert expected in cli_error(capsys, [*case(hf, out), "--no-progress"])
    assert os.listdir(tmp_path) == []


def test_directories_without_safetensors_or_with_another_config_are_refused(hf, tmp_path, capsys):
    pickled = tmp_path / "pickled"
    model = _gpt2(2)
    model.save_pretrained(pickled)
    os.remove(pickled / "model.safetensors")
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")  # the format before safetensors
    capsys.readouterr()  # save_pretrained's progress
    message = cli_error(capsys, ["merge", str(pickled), hf["b"], "--data", hf["ids"], "-o", str(tmp_path / "m.onnx")])
    assert "pickled weights (pytorch_model.bin): pass --trust-pickle" in message
    loaded = load_model(str(pickled), trust_pickle=True)
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in loaded.state_dict().items())
    heads = tmp_path / "heads"
    model = _gpt2(3)
    model.config.n_head = 2
    model.save_pretrained(heads)
    capsys.readouterr()
    message = cli_error(capsys, ["merge", hf["a"], str(heads), "--data", hf["ids"], "-o", str(tmp_path / "m.onnx")])
    assert "differ in their config: n_head is 4 vs 2" in message

