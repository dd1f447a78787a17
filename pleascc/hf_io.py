"""Hugging Face model directories in and out, and text cut into token chunks: offline only.

A directory is ``config.json`` plus safetensors weights (one file, or shards
with their index); its architecture comes from the config, so no ``--arch``.
Weights saved as pickles (``pytorch_model.bin``) load only with
``--trust-pickle``: unpickling runs code.  ``transformers`` is an optional
extra, imported only here and in ``hf``'s tracing.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from pleascc.passes.errors import PleasccError, first_line

INSTALL = "install the Hugging Face extra: pip install 'pleascc[hf]'"
SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# config entries that name or describe a checkpoint rather than the network it holds
_NOT_ARCHITECTURE = {"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "id2label",
                     "label2id", "_commit_hash", "bos_token_id", "eos_token_id", "pad_token_id"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise PleasccError(f"Hugging Face models need the transformers package: {INSTALL}") from None
    return transformers


def is_model_directory(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def is_hub_id(path: str) -> bool:
    """``owner/name`` that is not a local path, nor a missing file's (``runs/a.pt``): what ``from_pretrained``
    would download."""
    return (not os.path.exists(path) and re.fullmatch(r"[\w.-]+/[\w.-]+", path) is not None
            and re.search(r"\.(pt|pth|bin|ckpt|safetensors|json)$", path) is None)


def hub_id_error(path: str) -> PleasccError:
    return PleasccError(f"{path} is not a local directory and pleascc works offline: download it first "
                        f"(hf download {path} --local-dir DIR) and pass DIR")


def load_directory(path: str, trust_pickle: bool = False) -> nn.Module:
    """The model a ``save_pretrained`` directory holds, as its config's first architecture, float32, eval mode."""
    transformers = _transformers()
    files = set(os.listdir(path))
    if not files & set(SAFETENSORS) and not (trust_pickle and files & set(PICKLES)):
        found = "pickled weights (pytorch_model.bin): pass --trust-pickle to unpickle them (it runs code)" \
            if files & set(PICKLES) else "no weights: save the model with save_pretrained"
        raise PleasccError(f"model directory {path} has {found}")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise PleasccError(f"cannot read {path}/config.json ({first_line(exc)}): save the model with "
                           "save_pretrained") from exc
    names = config.architectures or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise PleasccError(f"{path}/config.json names no architecture transformers {transformers.__version__} "
                           f"has ({names or 'none'}): save the model with save_pretrained")
    transformers.utils.logging.disable_progress_bar()  # pleascc's own bars show the work
    try:
        model, info = cls.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                          use_safetensors=not files & set(PICKLES) or None,
                                          output_loading_info=True)
    except Exception as exc:
        raise PleasccError(f"cannot load {path} as {cls.__name__}: {first_line(exc)}") from exc
    missing = sorted(info["missing_keys"]) + sorted(info["mismatched_keys"])
    if missing:  # transformers would start them from random values
        raise PleasccError(f"{path} lacks {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                           else "") + f" of {cls.__name__}: its weights do not match its config.json")
    return model.float().eval()


def check_same_config(a: nn.Module, b: nn.Module, names: tuple[str, str] = ("A", "B")) -> None:
    """Refuse two transformers models whose configs describe different networks (heads, norms, positions):
    equal shapes do not make equal architectures (4 heads of 16 or 8 of 8)."""
    configs = [{k: v for k, v in m.config.to_dict().items() if k not in _NOT_ARCHITECTURE} for m in (a, b)]
    for key in sorted(configs[0].keys() | configs[1].keys()):
        if configs[0].get(key) != configs[1].get(key):
            raise PleasccError(f"models {names[0]} and {names[1]} differ in their config: {key} is "
                               f"{configs[0].get(key)!r} vs {configs[1].get(key)!r}; pleascc merges two models "
                               "of the same architecture")


def save_directory(merged: nn.Module, like: nn.Module, path: str, example: torch.Tensor) -> dict:
    """Save ``merged`` (a merged graph of ``like``'s architecture) with ``save_pretrained`` into ``path``, and
    check that ``from_pretrained`` reads back a model that computes what ``merged`` does on ``example``.

    Its tensors go into ``like``'s class built from its config: this works
    where the merged widths are the config's (budget 1.0), else the error
    points to the formats that hold any width.  Tied embeddings that the merge
    made differ are saved untied.  The directory appears whole or not at all.
    """
    state = merged.state_dict()
    expected = like.state_dict()  # the shapes its config makes
    differ = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if differ:
        raise PleasccError(f"the merged model's widths do not fit {type(like.config).__name__}: {differ[0]} is "
                           f"{tuple(state[differ[0]].shape)}, the config makes {tuple(expected[differ[0]].shape)}; "
                           "pass --format onnx or pt for budgets other than 1.0")
    config = like.config.__class__.from_dict(like.config.to_dict())
    if getattr(config, "tie_word_embeddings", False) and _tied_differ(like, state):
        config.tie_word_embeddings = False
    model = like.__class__(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise PleasccError(f"cannot save the merged model as {type(model).__name__} ({first_line(exc)}): pass "
                           "--format onnx or pt") from exc
    staging = tempfile.mkdtemp(prefix=".pleascc-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        model.save_pretrained(staging)
        reloaded = type(model).from_pretrained(staging, local_files_only=True, dtype=torch.float32).eval()
        with torch.no_grad():
            got = reloaded(**{model.main_input_name: example}, return_dict=False)[0]
            want = merged(example)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"path": path, "class": type(model).__name__, "max_abs_diff": float((got - want).abs().max())}


def _tied_differ(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Whether two names of one tied parameter hold different merged values."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return any(not torch.equal(state[group[0]], state[k]) for group in names.values() if len(group) > 1
               for k in group[1:] if group[0] in state and k in state)


def tokenizer_of(directory: str) -> str | None:
    """``directory`` when it holds a tokenizer (a model saved with its tokenizer), else None."""
    return directory if any(os.path.isfile(os.path.join(directory, f)) for f in TOKENIZER_FILES) else None


def text_tokens(path: Path, tokenizer: str | None, seq_len: int) -> torch.Tensor:
    """A text file, tokenized by a local tokenizer and cut into (N, seq_len) int64 chunks (the tail dropped)."""
    if tokenizer is None:
        raise PleasccError(f"{path} is text: pass --tokenizer DIR, a local tokenizer directory, to cut it into "
                           "tokens")
    if not os.path.isdir(tokenizer):
        raise (hub_id_error(tokenizer) if is_hub_id(tokenizer) else
               PleasccError(f"tokenizer {tokenizer} is not a directory: pass a local tokenizer directory"))
    if tokenizer_of(tokenizer) is None:
        raise PleasccError(f"{tokenizer} holds no tokenizer ({', '.join(TOKENIZER_FILES)}): save one there with "
                           "tokenizer.save_pretrained")
    transformers = _transformers()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    except Exception as exc:
        raise PleasccError(f"cannot load the tokenizer in {tokenizer} ({first_line(exc)}): save one there with "
                           "tokenizer.save_pretrained") from exc
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PleasccError(f"cannot read {path} as UTF-8 text ({first_line(exc)})") from exc
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    n = len(ids) // seq_len
    if n < 2:
        raise PleasccError(f"{path} gives {len(ids)} tokens, {n} chunk(s) of --seq-len {seq_len}; matching needs "
                           "at least 2: pass more text or a shorter --seq-len")
    return ids[: n * seq_len].view(n, seq_len)
