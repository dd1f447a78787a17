"""The layers least squares refits, one class per kind: what a fit reads of one, its rows, its unknowns, its
cost, its warm start and the parameters its solution becomes.

``Layer`` holds the fields every kind has and the defaults most kinds share;
``LinearLayer`` (and ``TransposedLinearLayer``), ``ConvLayer`` (grouped and
depthwise too) and ``NormLayer`` override where they differ.  A new kind is a subclass here and a rule that
records it (``groups``); the passes call these methods and never ask a layer
its kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar

import torch

from pleascc.passes.reads import at_positions, at_tokens, check_unpadded, im2col_patches, pair
from pleascc.passes.spaces import Dim

if TYPE_CHECKING:
    from pleascc.passes.gram import GramSum
    from pleascc.passes.groups import Analysis
    from pleascc.passes.merge_maps import MergeMaps

State = dict[str, torch.Tensor]


@dataclass
class Layer:
    """An affine op that least squares can refit: y = W·x + b along one axis.

    Its fit's rows are its read inputs with a ones column for the bias, one
    row per sample and position read, one weight row per output.
    """

    kind: ClassVar[str]  # its name in reports
    folds_running_stats: ClassVar[bool] = False  # its fit folds running statistics into its parameters
    may_head: ClassVar[bool] = True  # may compute the model's outputs, fitted per model (``head_layers``)

    node: str
    weight: str
    bias: str | None
    in_axis: int
    in_dim: Dim
    out_axis: int
    out_dim: Dim
    source: str = ""  # the node holding the layer's input
    batch_axis: int | None = None  # the axis of its input (and output) holding the samples, if known
    refit: bool = True  # False: counted and observed like any layer, merged by its permuted average

    # what its fit reads (``reads``)

    def read_value(self, v: torch.Tensor, positions: int | None) -> torch.Tensor:
        """Its input or output as its fit reads it: a channels-first map at ``sampled_positions``."""
        return at_positions(v, positions)

    def read_input(self, x: torch.Tensor, positions: int | None) -> torch.Tensor:
        """What its fit reads of one input, before the models' are merged along ``unit_axis``.

        Sampling first means the merge only touches the values that are read.
        """
        return self.read_value(x, positions)

    @property
    def unit_axis(self) -> int:
        """The axis of ``read_input``'s result that holds its input units."""
        return 1

    @property
    def kernel_positions(self) -> int:
        """Columns of its rows per input unit."""
        return 1

    @property
    def sampled(self) -> bool:
        """Whether its fit reads at most ``positions`` positions (or tokens) per sample, not all of them."""
        return True

    def merges_first(self, source: tuple, output: tuple, positions: int | None) -> bool:
        """Whether merging the models' inputs (of shape ``source``; its output's ``output``) before reading
        them is less work than reading first."""
        return False

    def input_bytes(self, source: tuple, output: tuple, positions: int | None) -> int:
        """Float32 bytes of one model's input of shape ``source`` as kept before the models' are merged: read
        (``read_input``), or whole where merging first reads less (``merges_first``)."""
        return self.read_bytes(source, positions)

    def reads_input_as(self, producer: Layer) -> bool:
        """Whether its fit reads its input, ``producer``'s output, as ``producer``'s fit reads it (a norm after
        a convolution: both at the sampled positions), so one recording serves both (``stats.record_input``)."""
        return (type(self).read_input is Layer.read_input and type(self).read_value is type(producer).read_value
                and self.batch_axis == producer.batch_axis)

    def rows_bytes(self, source: tuple, output: tuple, positions: int | None) -> int:
        """Its least-squares rows on the example (input shape ``source``, output ``output``): up to twice
        one model's input width, read (float32) and laid out as rows (float32)."""
        read = math.prod(output[2:])
        read = read if positions is None else min(read, positions)
        return 2 * 8 * output[0] * source[1] * self.kernel_positions * read

    def read_bytes(self, shape: tuple, positions: int | None) -> int:
        """Float32 bytes of its output of ``shape`` as its fit reads it (on the example batch)."""
        per_map = math.prod(shape[2:])
        return 4 * shape[0] * shape[1] * min(per_map, positions or per_map)

    # its fit: rows, moments, unknowns (``stats``, ``solve``)

    def groups(self, maps: MergeMaps) -> int:
        """Groups its fit splits into, each with its own rows and weights."""
        return 1

    def one_group(self, maps: MergeMaps) -> bool:
        """Whether its blocks read columns of the full rows, and so share its Gram (``stats._rows_key``)."""
        return False

    def rows(self, x: torch.Tensor, maps: MergeMaps) -> torch.Tensor:
        """Merged ``read_input`` as (groups, samples, features per group), with a ones column for the bias,
        in the input's precision (float32: see ``GramSum``)."""
        cols = self._features(x, maps)
        rows = cols.new_empty(*cols.shape[:-1], cols.shape[-1] + 1)  # one copy: layout and ones
        rows[..., :-1] = cols
        rows[..., -1] = 1
        return rows.reshape(cols.shape[0], -1, rows.shape[-1])

    def _features(self, x: torch.Tensor, maps: MergeMaps) -> torch.Tensor:
        """``rows`` without the ones column, before its samples are flattened."""
        return x.reshape(1, -1, x.shape[-1])

    def target_rows(self, y: torch.Tensor, maps: MergeMaps) -> torch.Tensor:
        """Target (read like ``read_input``) as (groups, samples, outputs per group), matching ``rows``."""
        return y.reshape(-1, y.shape[-1]).unsqueeze(0)

    def add_gram(self, gram: GramSum, rows: torch.Tensor) -> None:
        """Add one batch of ``rows`` to its Gram."""
        gram.add(rows)

    def predict(self, rows: torch.Tensor, warm_start: torch.Tensor) -> torch.Tensor:
        """The warm start's outputs on ``rows``, laid out as ``target_rows``."""
        return rows @ warm_start.transpose(1, 2)

    def residual_moments(self, residual: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The residual's products with the rows, (groups, outputs per group, features + 1), and the rows
        they sum over."""
        return residual.transpose(1, 2) @ rows, rows.shape[1]

    @property
    def has_bias(self) -> bool:
        """Whether its fit solves for a bias (else the rows' ones column is dropped)."""
        return bool(self.bias)

    def unknowns(self, analysis: Analysis) -> int:
        """Unknowns per output in one model: a row of its weight and the bias (a norm's: γ and β)."""
        return math.prod(analysis.table.size(d) for d in analysis.params[self.weight].dims[1:]) + 1

    @property
    def blocked(self) -> bool:
        """Whether it is dense (Linear, F.linear on parameters, ungrouped Conv): merged, it skips the
        cross-model blocks, in cost and in its fits' blocks."""
        return False

    def fuses_into(self, producer: Layer) -> bool:
        """Whether it is fitted in the pass of ``producer``, the layer it reads (``fused_norms``)."""
        return False

    # weights (``solve``)

    def warm_start(self, analysis: Analysis, maps: MergeMaps, states: tuple[State, ...],
                   merged: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """Its warm-start weights as (groups, outputs per group, inputs per group + 1), from its parameters
        each in the merged layout (``merged``: ``solve.merge_param``)."""
        return self.as_rows(maps, merged(self.weight), merged(self.bias) if self.bias else None)

    def as_rows(self, maps: MergeMaps, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """A weight and bias as (groups, outputs per group, inputs per group + 1)."""
        out = weight.shape[0]
        groups = self.groups(maps)
        bias = bias if bias is not None else torch.zeros(out, dtype=torch.float64)
        w = weight.reshape(groups, out // groups, -1)
        return torch.cat([w, bias.reshape(groups, out // groups, 1)], dim=2)

    def params(self, w: torch.Tensor, like: State) -> State:
        """Turn a solved (groups, out, in + 1) block back into its parameters (shaped like ``like``'s)."""
        groups, out_per_group, _ = w.shape
        shape = list(like[self.weight].shape)
        out = {self.weight: w[:, :, :-1].reshape(groups * out_per_group, -1, *shape[2:])}
        if self.bias:
            out[self.bias] = w[:, :, -1].reshape(-1)
        return out


@dataclass
class LinearLayer(Layer):
    """``nn.Linear``, ``F.linear`` on parameters: units on its last axis, any axes before it samples or tokens."""

    kind: ClassVar[str] = "linear"

    def read_value(self, v: torch.Tensor, positions: int | None) -> torch.Tensor:
        """At sampled tokens where the analysis knows its batch axis (units stay last), else all of it."""
        if self.batch_axis is None:
            check_unpadded(f"{self.node} (its batch axis is unknown)")
            return v
        return at_tokens(v, self.batch_axis, (-1,), positions)

    @property
    def unit_axis(self) -> int:
        return self.in_axis

    @property
    def sampled(self) -> bool:
        return self.batch_axis is not None

    def rows_bytes(self, source: tuple, output: tuple, positions: int | None) -> int:
        return 2 * 8 * math.prod(source)

    def read_bytes(self, shape: tuple, positions: int | None) -> int:
        if self.batch_axis is None:
            return 4 * math.prod(shape)
        tokens = math.prod(shape) // shape[self.batch_axis] // shape[-1]
        return 4 * shape[self.batch_axis] * shape[-1] * min(tokens, positions or tokens)

    def one_group(self, maps: MergeMaps) -> bool:
        return True

    @property
    def blocked(self) -> bool:
        return True

    def resize(self, module: torch.nn.Module) -> None:
        """Set a copy's size attributes to the weight it now holds (emit's blocks)."""
        module.out_features, module.in_features = module.weight.shape


@dataclass
class TransposedLinearLayer(LinearLayer):
    """A Linear whose weight is stored (in, out), as GPT-2's ``Conv1D``: fitted as a Linear, stored back so."""

    def unknowns(self, analysis: Analysis) -> int:
        return analysis.table.size(analysis.params[self.weight].dims[0]) + 1

    def as_rows(self, maps: MergeMaps, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return super().as_rows(maps, weight.t(), bias)

    def params(self, w: torch.Tensor, like: State) -> State:
        out = super().params(w, {**like, self.weight: like[self.weight].t()})
        return {**out, self.weight: out[self.weight].t()}

    def resize(self, module: torch.nn.Module) -> None:
        module.nx, module.nf = module.weight.shape


@dataclass
class ConvLayer(Layer):
    """A convolution, grouped and depthwise ones too: channels on axis 1; its fit reads im2col patches.

    Grouped, its channels split into (groups × per group) spaces and each
    group is a fit of its own.
    """

    kind: ClassVar[str] = "conv"

    groups_dim: Dim | None = None  # the dim whose width is the group count
    conv: dict = field(default_factory=dict)  # kernel_size, stride, padding, dilation

    def read_input(self, x: torch.Tensor, positions: int | None) -> torch.Tensor:
        """Its im2col patches at the sampled output positions, as (N, C, k·P)."""
        return im2col_patches(x, self.conv, positions).reshape(x.shape[0], x.shape[1], -1)

    @property
    def kernel_positions(self) -> int:
        """Its kernel's size."""
        return math.prod(pair(self.conv["kernel_size"]))

    def merges_first(self, source: tuple, output: tuple, positions: int | None) -> bool:
        """Where its patches hold more values per channel than its input map (ResNet-50's last stages: 9·64
        from 14² or 7²), merging the maps first reads patches once."""
        return self._patch_values(output, positions) >= math.prod(source[2:])

    def input_bytes(self, source: tuple, output: tuple, positions: int | None) -> int:
        return 4 * source[0] * source[1] * min(self._patch_values(output, positions), math.prod(source[2:]))

    def _patch_values(self, output: tuple, positions: int | None) -> int:
        """Values per input channel its patches hold, per sample."""
        outputs = math.prod(output[2:])
        return self.kernel_positions * (outputs if positions is None else min(outputs, positions))

    def groups(self, maps: MergeMaps) -> int:
        return maps.size(self.groups_dim) if self.groups_dim is not None else 1

    def one_group(self, maps: MergeMaps) -> bool:
        return self.groups_dim is None or maps.size(self.groups_dim) == 1

    def _features(self, x: torch.Tensor, maps: MergeMaps) -> torch.Tensor:
        groups = self.groups(maps)
        n, per_group = x.shape[0], x.shape[1] // groups * self.kernel_positions
        return x.reshape(n, groups, per_group, -1).permute(1, 0, 3, 2)  # (groups, N, P, features)

    def target_rows(self, y: torch.Tensor, maps: MergeMaps) -> torch.Tensor:
        """Its (N, C, P) target as (groups, samples, outputs per group)."""
        groups = self.groups(maps)
        n, c = y.shape[:2]
        return y.reshape(n, groups, c // groups, -1).permute(1, 0, 3, 2).reshape(groups, -1, c // groups)

    @property
    def blocked(self) -> bool:
        return self.groups_dim is None

    def resize(self, module: torch.nn.Module) -> None:
        module.out_channels, module.in_channels = module.weight.shape[0], module.weight.shape[1] * module.groups


@dataclass
class NormLayer(Layer):
    """A BatchNorm in inference: y = γ·(x − μ)/σ + β per channel, two unknowns a channel.

    Its rows are its values as read, (N, C, P), as they are: its moments are
    sums over each channel's values (``_norm_gram``), not products of
    (C, N·P, 2) rows.
    """

    kind: ClassVar[str] = "norm"
    folds_running_stats: ClassVar[bool] = True  # ``params``: re-estimating them (``reset_bn``) undoes its fit
    may_head: ClassVar[bool] = False  # it rescales a head's outputs channel by channel

    running: tuple = ()  # (running_mean, running_var, eps)

    def rows(self, x: torch.Tensor, maps: MergeMaps) -> torch.Tensor:
        return x

    def target_rows(self, y: torch.Tensor, maps: MergeMaps) -> torch.Tensor:
        return y

    def add_gram(self, gram: GramSum, rows: torch.Tensor) -> None:
        gram.add_product(_norm_gram(rows))

    def predict(self, rows: torch.Tensor, warm_start: torch.Tensor) -> torch.Tensor:
        """The warm start's γ·x + β per channel."""
        gamma, beta = warm_start[:, 0, 0, None], warm_start[:, 0, 1, None]
        return rows * gamma + beta

    def residual_moments(self, residual: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The residual's sums with x and with 1 per channel, (C, 1, 2)."""
        rx = torch.stack([(residual * rows).sum((0, 2)), residual.sum((0, 2))], dim=1).unsqueeze(1)
        return rx, rows.shape[0] * rows.shape[2]

    @property
    def has_bias(self) -> bool:
        return True

    def fuses_into(self, producer: Layer) -> bool:
        """A norm reading a convolution: its moments are quadratic forms of the convolution's."""
        return isinstance(producer, ConvLayer)

    def warm_start(self, analysis: Analysis, maps: MergeMaps, states: tuple[State, ...],
                   merged: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """Each model's scale and shift on its running statistics, merged as the channels are: (C, 1, 2)."""
        mean_name, var_name, eps = self.running
        scale = [s[self.weight] / (s[var_name] + eps).sqrt() for s in states]
        shift = [s[self.bias] - s[mean_name] * k for s, k in zip(states, scale)]
        every = [torch.stack([k, b], dim=1).double() for k, b in zip(scale, shift)]
        dim = analysis.params[self.weight].dims[0]
        return maps.merge(tuple(every), [(0, dim)]).unsqueeze(1)

    def params(self, w: torch.Tensor, like: State) -> State:
        """The fitted scale and shift as γ and β, on running statistics of 0 and 1."""
        mean_name, var_name, eps = self.running
        scale, shift = w[:, 0, 0], w[:, 0, 1]
        ones = torch.ones_like(scale)
        return {self.weight: scale * (1 + eps) ** 0.5, self.bias: shift,
                mean_name: torch.zeros_like(scale), var_name: ones}


def _norm_gram(x: torch.Tensor) -> torch.Tensor:
    """A normalization's Gram per channel of its read input (N, C, P): [[Σx², Σx], [Σx, n]], as (C, 2, 2).

    Its fit has two unknowns per channel (γ, β), so its moments are sums over
    each channel's values, reduced in the maps' own layout, not formed as
    (C, N·P, 2) rows through batched 1×2 products (slow, channels-last slower).
    """
    total, square = x.sum((0, 2)), x.square().sum((0, 2))
    gram = torch.stack([square, total, total, torch.full_like(total, x.shape[0] * x.shape[2])], dim=1)
    return gram.reshape(-1, 2, 2)
