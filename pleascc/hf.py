"""Hugging Face ``transformers`` models made traceable by torch.fx, into the same IR as every other model.

transformers builds masks with Python control flow, returns ``ModelOutput``
objects, keeps caches and picks an attention kernel at run time; none of that
traces.  ``adapt`` turns a model (a copy: the tracer's) into one whose forward
takes the main input (``input_ids``, or ``pixel_values``) and, for token ids,
an optional padding mask, and returns its first output, with eager attention
and norms the analysis knows.  ``mask_builders`` swaps transformers' mask
builders for one opaque op, ``attention_bias``, while tracing, and
``ExampleTracing`` lets the tracer unpack shapes.  What is not understood fails
closed: a mask builder asked for anything but causal, bidirectional,
sliding-window and padding masks is a ``PleasccError`` (``trace`` names the
module), and a condition on sizes is checked when the graph runs.
"""
from __future__ import annotations

import contextlib
import inspect
import operator
import sys
from typing import Callable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx._symbolic_trace import _maybe_revert_all_patches

from pleascc.passes.errors import PleasccError
from pleascc.passes.opaque_ops import attention_bias, tokens_mask

# fx keeps a wrapped function opaque only in the modules that name it to fx.wrap: here, where they are called
fx.wrap("attention_bias")
fx.wrap("tokens_mask")

ATTENTION = "eager"  # transformers' own attention in plain ops; its sdpa path branches on sizes in Python


def is_transformers_model(model: nn.Module) -> bool:
    """A ``transformers`` PreTrainedModel (known by its base class, so transformers need not be imported)."""
    return any(c.__module__ == "transformers.modeling_utils" and c.__name__ == "PreTrainedModel"
               for c in type(model).__mro__)


def adapt(model: nn.Module) -> nn.Module:
    """Make ``model`` (a copy, changed in place) traceable: eager attention, tensors in and out, known norms."""
    model.set_attn_implementation(ATTENTION)
    _open_rms_norms(model)
    model.__class__ = _traced_class(type(model))
    return model


def _traced_class(cls: type) -> type:
    """``cls`` with a forward of (main input, optional padding mask) that returns its first output."""
    signature = inspect.signature(cls.forward).parameters
    main = cls.main_input_name
    fixed = {"return_dict": False, **{k: False for k in ("use_cache", "output_attentions",
                                                         "output_hidden_states") if k in signature}}
    original = cls.forward
    if "attention_mask" in signature and main == "input_ids":  # a padding mask either way: all ones by default
        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None):
            mask = tokens_mask(x, attention_mask)
            return _first_output(original(self, **{main: x}, attention_mask=mask, **fixed))
    else:
        def forward(self, x: torch.Tensor):
            return _first_output(original(self, **{main: x}, **fixed))
    return type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})


def _first_output(output):
    """A model's first output (logits, embeddings): the hidden states it may return beside them would make
    the residual stream an output, which no merge may permute."""
    return output[0] if isinstance(output, tuple) else output


def example(model: nn.Module) -> torch.Tensor:
    """A small input of the model's kind: token ids, or one image at the configured size."""
    if model.main_input_name == "pixel_values":
        size = model.config.image_size
        return torch.zeros(1, model.config.num_channels, size, size)
    return torch.zeros(1, 4, dtype=torch.long)


class ExampleTracing:
    """A tracer mixin that runs ``example`` through the graph traced so far when code iterates a traced value.

    transformers unpacks shapes (``(*x.shape[:-1], -1, head_dim)``), which a
    plain fx tracer cannot iterate; the example gives their length (a rank, so
    nothing about the example's sizes is kept).  Each node runs once, with fx's
    patches reverted so that running records nothing.
    """

    def start_example(self, root: nn.Module, example: torch.Tensor) -> None:
        self._example = (root, (example,))
        self._run: fx.Interpreter | None = None
        self._last: fx.Node | None = None

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _SizedProxy(node, self)

    def iter(self, obj: fx.Proxy):
        return iter([obj[k] for k in range(self.length(obj))])

    def length(self, obj: fx.Proxy) -> int:
        """The length of a traced shape (or other tuple); a tensor's is its batch, which stays unknown."""
        value = self._value(obj.node)
        if not isinstance(value, (tuple, list)):
            raise fx.proxy.TraceError(f"cannot take the length of {obj.node.name}, a traced "
                                      f"{type(value).__name__}")
        return len(value)

    def to_bool(self, obj: fx.Proxy) -> bool:
        """A condition on sizes or dtypes (not on a tensor's values) takes the example's branch, and the graph
        checks at run time that its input takes the same (``torch._assert``): a guard, never a silent guess."""
        value = self._value(obj.node)
        if not isinstance(value, bool):
            return super().to_bool(obj)
        condition = obj if value else self.create_proxy("call_function", operator.not_, (obj,), {})
        self.create_proxy("call_function", torch._assert, (condition, f"pleascc traced this model for inputs "
                          f"where {obj.node.format_node()} is {value}"), {})
        return value

    def rank(self, obj: fx.Proxy) -> int:
        value = self._value(obj.node)
        if not isinstance(value, torch.Tensor):
            raise fx.proxy.TraceError(f"cannot take the rank of {obj.node.name}, a traced {type(value).__name__}")
        return value.ndim

    def _value(self, node: fx.Node):
        if self._run is None:
            root, args = self._example
            self._run = fx.Interpreter(root, garbage_collect_values=False, graph=self.graph)
            self._run.args_iter = iter(args)
        with _maybe_revert_all_patches(), torch.no_grad():
            while node not in self._run.env:  # the nodes up to it not run yet, in order
                self._last = self._last.next if self._last is not None else next(iter(self.graph.nodes))
                self._run.env[self._last] = self._run.run_node(self._last)
        return self._run.env[node]


class _SizedProxy(fx.Proxy):
    """A proxy whose shapes have a length (``list.extend`` asks for it before iterating) and whose tensors have
    a rank (``if mask.ndim < 4``), both the example's: neither depends on the sizes of an input."""

    def __len__(self) -> int:
        return self.tracer.length(self)

    def __getattr__(self, k: str):
        if k == "ndim":
            return self.tracer.rank(self)
        return _SizedAttribute(self, k)


class _SizedAttribute(fx.proxy.Attribute):
    def __len__(self) -> int:
        return self.tracer.length(self)


# ----- RMSNorm: transformers writes it per model (x · rsqrt(mean(x²) + ε) · γ); nn.RMSNorm is the same op


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # LlamaRMSNorm's, the one opened
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)


def _same_code(a: Callable, b: Callable) -> bool:
    """Whether two functions' bodies are the same code (transformers copies modules per model)."""
    body = [inspect.getsource(f).split(":", 1)[1].split("\n", 1)[1] for f in (a, b)]
    return [line.strip() for line in body[0].splitlines()] == [line.strip() for line in body[1].splitlines()]


def _open_rms_norms(model: nn.Module) -> None:
    """Swap every RMSNorm module whose forward is Llama's for ``nn.RMSNorm`` (same parameter, same values).

    As a norm module the analysis knows it normalises the hidden axis (a merge
    wider than one model normalises each model's units apart); traced through,
    its mean over that axis would mix both models' units.  Others (Gemma's
    1 + γ) stay as they are, and their ``rsqrt`` has no rule: fixed, reported.
    """
    for name, m in list(model.named_modules()):
        if not (type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon")
                and _same_code(type(m).forward, _rms_norm_forward)):
            continue
        norm = nn.RMSNorm(m.weight.shape, eps=m.variance_epsilon, device=m.weight.device, dtype=m.weight.dtype)
        norm.weight = m.weight
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, norm)


# ----- masks


def _mask_builder(kind: str) -> Callable:
    """A stand-in for transformers' ``create_<kind>_mask`` that records ``attention_bias`` in the graph."""

    def build(config, inputs_embeds, attention_mask=None, *args, **kwargs):
        extra = {k: v for k, v in kwargs.items() if v is not None and k not in _IGNORED}
        if args or extra or getattr(config, "_attn_implementation", ATTENTION) != ATTENTION:
            raise PleasccError(f"cannot trace {type(config).__name__}'s {kind} mask with "
                               f"{sorted(extra) or 'positional arguments'}: pleascc knows causal, bidirectional, "
                               "sliding-window and padding masks of eager attention")
        if attention_mask is not None and attention_mask.ndim != 2:  # the example's rank, while tracing
            raise PleasccError(f"cannot trace a {kind} mask from a prepared mask: pass a (batch, tokens) padding "
                               "mask")
        window = getattr(config, "sliding_window", None) if kind == "sliding_window_causal" else None
        return attention_bias(inputs_embeds, attention_mask, kind != "bidirectional", window)

    return build


_IGNORED = {"position_ids", "layer_idx", "allow_is_causal_skip", "allow_is_bidirectional_skip"}
_BUILDERS = {f"create_{kind}_mask": _mask_builder(kind) for kind in ("causal", "bidirectional",
                                                                        "sliding_window_causal")}


@contextlib.contextmanager
def mask_builders(model: nn.Module) -> Iterator[None]:
    """While tracing: transformers' mask builders, in every module ``model``'s code comes from, are ours."""
    saved = []
    for source in {type(m).__module__ for m in model.modules()}:
        namespace = vars(sys.modules[source])
        for name, builder in _BUILDERS.items():
            if name in namespace:
                saved.append((namespace, name, namespace[name]))
                namespace[name] = builder
    try:
        yield
    finally:
        for namespace, name, value in saved:
            namespace[name] = value
