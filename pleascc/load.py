"""Turn user-supplied checkpoints and architecture specs into eval-mode float32 CPU models.

Every failure a user can cause becomes a one-line PleasccError naming the cause and the fix.
Pickles that can run code are only unpickled when the caller passes trust_pickle=True.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Callable, Mapping

import torch
from torch import nn

from pleascc import hf, hf_io
from pleascc.passes.errors import PleasccError

# Keys under which training scripts commonly nest the state dict, most specific first.
STATE_DICT_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "net",
    "network",
    "module",
    "model_ema",
    "state_dict_ema",
    "ema",
    "weights",
    "params",
)
# Prefixes added by DataParallel/DDP and torch.compile; removed when every key has one.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
NOT_A_CHECKPOINT = "expected a state dict saved with torch.save or a .safetensors file"


def _first_line(exc: BaseException) -> str:
    """Shorten an exception to one line so it can be embedded in a PleasccError."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _fmt_shape(shape: torch.Size) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


# ---------------------------------------------------------------------------- architectures


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _timm_factory(name: str) -> Callable[..., nn.Module]:
    import timm

    if not timm.is_model(name):
        raise PleasccError(
            f"timm has no model '{name}'{_suggest(name, timm.list_models())}: "
            f"check --arch (list names with timm.list_models())"
        )
    return lambda **kw: timm.create_model(name, pretrained=False, **kw)


def _torchvision_factory(name: str) -> Callable[..., nn.Module]:
    import torchvision

    known = torchvision.models.list_models()
    if name not in known:
        raise PleasccError(
            f"torchvision has no model '{name}'{_suggest(name, known)}: "
            f"check --arch (list names with torchvision.models.list_models())"
        )
    return lambda **kw: torchvision.models.get_model(name, weights=None, **kw)


@contextlib.contextmanager
def _cwd_importable():
    """Let `module:factory` name a module in the working directory, as `python -m` would."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        yield
    finally:
        if added:
            sys.path.remove(cwd)


def _import_module(target: str):
    """Import a dotted module name or a .py file; file modules get a private name."""
    if target.endswith(".py") or os.sep in target or "/" in target:
        if not os.path.isfile(target):
            raise PleasccError(f"architecture file {target} not found: check the path in --arch")
        name = "pleascc_arch_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(target))[0])
        spec = importlib.util.spec_from_file_location(name, target)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up here
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise PleasccError(f"importing {target} failed ({_first_line(exc)}): fix the file") from exc
        return module
    try:
        with _cwd_importable():
            return importlib.import_module(target)
    except ImportError as exc:
        raise PleasccError(
            f"cannot import module '{target}' ({_first_line(exc)}): "
            f"install it or run from the directory that contains it"
        ) from exc
    except Exception as exc:
        raise PleasccError(f"importing module '{target}' failed ({_first_line(exc)}): fix the module") from exc


def _user_factory(target: str, attr: str) -> Callable[..., nn.Module]:
    module = _import_module(target)
    factory = getattr(module, attr, None)
    if factory is None:
        raise PleasccError(f"{target} has no '{attr}': check the name after ':' in --arch")
    if not callable(factory):
        raise PleasccError(
            f"{target}:{attr} is not callable: --arch must name a class or function that builds the model"
        )
    return factory


def _factory(spec: str) -> Callable[..., nn.Module]:
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise PleasccError(
            f"--arch '{spec}' is not a known form: use timm:NAME, torchvision:NAME, "
            f"package.module:factory or path/to/file.py:factory"
        )
    if target == "timm":
        return _timm_factory(attr)
    if target == "torchvision":
        return _torchvision_factory(attr)
    return _user_factory(target, attr)


def build_arch(spec: str, kwargs: dict | None = None) -> nn.Module:
    """Build an untrained model from an --arch spec, so a state dict has something to load into."""
    factory = _factory(spec)
    try:
        model = factory(**(kwargs or {}))
    except Exception as exc:
        raise PleasccError(
            f"building {spec} failed ({_first_line(exc)}): check --arch and its arguments"
        ) from exc
    if not isinstance(model, nn.Module):
        raise PleasccError(
            f"{spec} returned {type(model).__name__}, not a torch.nn.Module: "
            f"--arch must name a factory that returns the model"
        )
    return model


# ---------------------------------------------------------------------------- checkpoints


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo the key prefixes that DataParallel/DDP and torch.compile add."""
    state = dict(state)
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    return state


def _unwrap(path: str, obj: object) -> dict[str, torch.Tensor] | nn.Module:
    """Find the state dict (or, with trust_pickle, the module) inside what the file held."""
    if isinstance(obj, nn.Module):
        return obj
    if _is_state_dict(obj):
        return _strip_wrapper_prefixes(obj)
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                return inner
            if _is_state_dict(inner):
                return _strip_wrapper_prefixes(inner)
        keys = ", ".join(str(k) for k in list(obj)[:8]) or "none"
        raise PleasccError(
            f"{path} holds a dict without a state dict of tensors (keys: {keys}): "
            f"save model.state_dict() with torch.save and pass that file"
        )
    raise PleasccError(f"{path} holds a {type(obj).__name__}, not a state dict: {NOT_A_CHECKPOINT}")


def _unreadable_reason(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return "the file is empty"
    if head.startswith(b"PK"):
        return "truncated or damaged zip archive" if not zipfile.is_zipfile(path) else "damaged archive"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "unrecognized binary data"
    return "it is a text file"


def _not_a_checkpoint(path: str, reason: str) -> PleasccError:
    return PleasccError(f"{path} is not a PyTorch checkpoint ({reason}): {NOT_A_CHECKPOINT}")


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as exc:
        raise _not_a_checkpoint(path, f"unreadable .safetensors: {_first_line(exc)}") from exc


def check_checksums(path: str) -> None:
    """Refuse a torch.save archive whose bytes no longer match their CRC-32s.

    ``torch.load`` does not check them, so one damaged byte in a tensor's shape or strides would otherwise load
    a tensor that silently reads the wrong elements.
    """
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        damaged = f"its archive ({_first_line(exc)})"
    if damaged is not None:
        raise PleasccError(f"{path} is corrupted: {damaged} does not match its checksum; save or copy it again")


def _overlapping(tensor: torch.Tensor) -> bool:
    """Whether two indices of ``tensor`` address one element (a stride too small for the axes inside it)."""
    span = 0
    axes = sorted((t, s) for s, t in zip(tensor.shape, tensor.stride()) if s > 1)
    for stride, size in axes:
        if stride <= span:
            return True
        span += (size - 1) * stride
    return False


def check_layouts(path: str, tensors: Mapping[str, object]) -> None:
    """Refuse tensors whose strides overlap: a checkpoint of the legacy format (no checksums) can be damaged
    into one, and the model would load repeated elements."""
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and _overlapping(value):
            raise PleasccError(f"{path} is corrupted: {name}'s strides {tuple(value.stride())} repeat elements "
                               f"of its shape {_fmt_shape(value.shape)}; save it again")


def _torch_load(path: str, trusted: bool) -> object:
    """``torch.load``, unpickling code only when ``trusted``; a pickled object it refuses, or whose class cannot
    be imported, gets a line of its own, anything else is not a checkpoint."""
    check_checksums(path)
    try:
        return torch.load(path, weights_only=not trusted, map_location="cpu")
    except pickle.UnpicklingError as exc:
        found = None if trusted else re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found is None:
            raise _not_a_checkpoint(path, _unreadable_reason(path)) from exc
        raise PleasccError(
            f"{path} holds a pickled object ({found.group(1)}) and unpickling it runs code: "
            f"pass --trust-pickle if you trust the file, or save model.state_dict() and pass --arch"
        ) from exc
    except (AttributeError, ImportError) as exc:
        if not trusted:
            raise _not_a_checkpoint(path, _unreadable_reason(path)) from exc
        raise PleasccError(
            f"{path} holds a pickled object whose class cannot be imported ({_first_line(exc)}): "
            f"make its module importable, or save model.state_dict() and pass --arch"
        ) from exc
    except Exception as exc:
        raise _not_a_checkpoint(path, _unreadable_reason(path)) from exc


def load_checkpoint(path: str, trust_pickle: bool = False) -> dict[str, torch.Tensor] | nn.Module:
    """Read a checkpoint file into a clean state dict (or a whole module when trust_pickle)."""
    if not os.path.exists(path):
        raise hf_io.hub_id_error(path) if hf_io.is_hub_id(path) else PleasccError(
            f"checkpoint {path} not found: check the path")
    if os.path.isdir(path):
        raise PleasccError(f"checkpoint {path} is a directory without config.json: pass the checkpoint file "
                           "inside it, or a Hugging Face model directory")
    if path.endswith(".safetensors"):
        return _unwrap(path, _load_safetensors(path))
    ckpt = _unwrap(path, _torch_load(path, trusted=trust_pickle))
    check_layouts(path, ckpt.state_dict() if isinstance(ckpt, nn.Module) else ckpt)
    return ckpt


# ---------------------------------------------------------------------------- models


def _mismatch(path: str, spec: str, model: nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """Describe the first missing key, unexpected key and shape mismatch, or None if none."""
    expected = model.state_dict()
    parts = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and expected[k].shape != state[k].shape]
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            parts.append(f"{label} {keys[0]}{more}")
    if shapes:
        k = shapes[0]
        parts.append(
            f"{k} has shape {_fmt_shape(state[k].shape)} in {path} "
            f"but {_fmt_shape(expected[k].shape)} in {spec}"
        )
    return "; ".join(parts) or None


def _load_state(path: str, spec: str, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:
        detail = _mismatch(path, spec, model, state) or _first_line(exc)
        raise PleasccError(
            f"{path} does not fit {spec}: {detail}; check --arch and its arguments (e.g. num_classes)"
        ) from exc


def load_model(
    path: str,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    trust_pickle: bool = False,
) -> nn.Module:
    """Load one trained network as an eval-mode float32 CPU model, ready for tracing.

    A Hugging Face model directory brings its architecture in its config.json: ``arch`` is not needed.
    """
    if hf_io.is_model_directory(path):
        return hf_io.load_directory(path, trust_pickle)
    ckpt = load_checkpoint(path, trust_pickle=trust_pickle)
    if isinstance(ckpt, nn.Module) and arch is None:
        model = ckpt
    elif arch is None:
        raise PleasccError(
            f"{path} is a state dict: pass --arch (e.g. torchvision:resnet18) to build the model it belongs to"
        )
    else:
        model = build_arch(arch, arch_kwargs)
        state = ckpt.state_dict() if isinstance(ckpt, nn.Module) else ckpt
        _load_state(path, arch, model, state)
    return model.float().cpu().eval()


def check_same_architecture(
    a: nn.Module, b: nn.Module, names: tuple[str, str] = ("A", "B"), heads: frozenset[str] = frozenset()
) -> None:
    """Refuse to merge two models whose parameters and buffers do not line up one to one.

    Parameters named in ``heads`` (classifier heads) may differ in their number of outputs; transformers
    models' configs must describe the same network.
    """
    na, nb = names
    if hf.is_transformers_model(a) and hf.is_transformers_model(b):
        hf_io.check_same_config(a, b, names)
    sa, sb = a.state_dict(), b.state_dict()
    for (ka, ta), (kb, tb) in zip(sa.items(), sb.items()):
        if ka != kb:
            raise PleasccError(
                f"models {na} and {nb} differ: {na} has {ka} where {nb} has {kb}; "
                f"pleascc merges two models of the same architecture"
            )
        if ta.shape != tb.shape and not (ka in heads and ta.shape[1:] == tb.shape[1:]):
            raise PleasccError(
                f"models {na} and {nb} differ at {ka}: shape {_fmt_shape(ta.shape)} vs "
                f"{_fmt_shape(tb.shape)}; pleascc merges two models of the same architecture"
            )
    if len(sa) != len(sb):
        longer, name = (sa, na) if len(sa) > len(sb) else (sb, nb)
        extra = list(longer)[min(len(sa), len(sb))]
        raise PleasccError(
            f"models {na} and {nb} differ: only {name} has {extra}; "
            f"pleascc merges two models of the same architecture"
        )
