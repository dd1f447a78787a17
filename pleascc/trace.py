"""Front end: turn an nn.Module into the one IR, a normalized fx GraphModule."""

from __future__ import annotations

import copy
import math
import traceback

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from pleascc.passes.errors import PleasccError, first_line
from pleascc.passes.in_place import INPLACE_METHODS, OUT_OF_PLACE
from pleascc import hf
from pleascc.passes.opaque_ops import TRANSPOSED_LINEARS, grid_offsets, timm_registrations

# fx keeps a wrapped function opaque only in the modules that name it to fx.wrap: here, where GPSA calls it
fx.wrap("grid_offsets")


class _Tracer(fx.Tracer):
    """fx's tracer plus timm's leaf modules and wrapped functions, when timm is present, and GPT-2's Conv1D."""

    def __init__(self) -> None:
        leaves, functions = timm_registrations()
        super().__init__(autowrap_functions=tuple(functions))
        self._leaves = tuple(leaves + TRANSPOSED_LINEARS)
        self.failed_in: str | None = None  # the innermost module whose code failed to trace

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaves) or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        """A module outside the model's tree without tensors of its own (transformers' wrappers of functions,
        which the ``kernels`` package makes modules) is traced through, like the function it wraps."""
        if not any(m is sub for sub in self.root.modules()) and not any(True for _ in m.state_dict()):
            return forward(*args, **kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = f"{self.path_of_module(m)} ({type(m).__name__})"
            raise


class _ExampleTracer(hf.ExampleTracing, _Tracer):
    """For transformers' models, which unpack shapes and slice their buffers by sizes read in the graph."""

    proxy_buffer_attributes = True


def trace(model: nn.Module, name: str = "model") -> fx.GraphModule:
    """Trace a deep copy of ``model`` (eval mode) and make every op out-of-place.

    A copy, because tracing may mutate modules and a GraphModule shares
    parameters with its source.
    """
    model = copy.deepcopy(model).eval()
    transformers = hf.is_transformers_model(model)
    if transformers:
        model = hf.adapt(model)
    _open_modules(model)
    for m in model.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
    tracer = _ExampleTracer() if transformers else _Tracer()
    try:
        if transformers:
            tracer.start_example(model, hf.example(model))
            with hf.mask_builders(model):
                graph = tracer.trace(model)
        else:
            graph = tracer.trace(model)
    except Exception as err:  # any failure inside user code: name the module and the line
        where = f"{name}, in {tracer.failed_in}" if tracer.failed_in else name
        if isinstance(err, PleasccError):
            raise PleasccError(f"{where}: {err}") from None
        raise PleasccError(f"cannot trace {where}: {_where(err)}; make that code traceable by torch.fx "
                           "(no data-dependent Python control flow) or wrap it with torch.fx.wrap") from None
    gm = fx.GraphModule(model, graph, model.__class__.__name__)
    _make_out_of_place(gm)
    return gm


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` used as self-attention, in ops the analysis can see through.

    The packed module is a leaf whose inner projections least squares could
    not reach; this is the same computation (and the same parameter names),
    written as a fused-qkv ``F.linear``, a head reshape and attention.
    """

    def __init__(self, mha: nn.MultiheadAttention, where: str) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.batch_first = mha.num_heads, mha.head_dim, mha.batch_first
        self.in_proj_weight, self.in_proj_bias, self.out_proj = mha.in_proj_weight, mha.in_proj_bias, mha.out_proj
        self.where = where

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if key is not query or value is not query or key_padding_mask is not None or attn_mask is not None:
            raise TypeError(f"nn.MultiheadAttention {self.where} is used with a different key/value or a mask; "
                            "pleascc supports it as self-attention without masks")
        x = query if self.batch_first else query.transpose(0, 1)
        batch, tokens, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if need_weights:
            weights = torch.softmax((q @ k.transpose(-2, -1)) * self.head_dim ** -0.5, dim=-1)
            out = weights @ v
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            out, weights = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal), None
        out = self.out_proj(out.transpose(1, 2).reshape(batch, tokens, width))
        return (out if self.batch_first else out.transpose(0, 1)), weights


def _open_multihead_attention(m: nn.MultiheadAttention, where: str) -> nn.Module | None:
    if m._qkv_same_embed_dim and m.bias_k is None and not m.add_zero_attn:
        return SelfAttention(m, where)
    return None


def _adopt(opened: nn.Module, block: nn.Module, *attributes: str) -> None:
    """Give an opened module the block's children (so its parameter names stay) and the named plain attributes."""
    for name, child in block.named_children():
        opened.add_module(name, child)
    for name in attributes:
        setattr(opened, name, getattr(block, name))


class PatchTransformer(nn.Module):
    """timm's ``MobileVitBlock`` with its unfold and fold as one reshape and permute each.

    timm's block is a leaf (its unfold reads sizes in Python); this is the same
    computation, same parameter names, for inputs whose height and width are
    multiples of the patch size (others fail loudly in the reshape).  Channel
    sizes are left to ``-1`` so a merge can change them.
    """

    def __init__(self, block: nn.Module, where: str) -> None:
        super().__init__()
        _adopt(self, block)
        self.patch_size = tuple(block.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_1x1(self.conv_kxk(x))
        batch, _, height, width = x.shape
        ph, pw = self.patch_size
        nh, nw = height // ph, width // pw
        x = x.reshape(batch, -1, nh, ph, nw, pw).permute(0, 3, 5, 2, 4, 1).reshape(batch * ph * pw, nh * nw, -1)
        x = self.norm(self.transformer(x))
        x = x.reshape(batch, ph, pw, nh, nw, -1).permute(0, 5, 3, 1, 4, 2).reshape(batch, -1, height, width)
        x = self.conv_proj(x)
        if self.conv_fusion is not None:
            x = self.conv_fusion(torch.cat((shortcut, x), dim=1))
        return x


class PatchLinearTransformer(PatchTransformer):
    """timm's ``MobileVitV2Block``: (B, C, pixels of a patch, patches) through linear attention, same parameters.

    The same unfold/fold as one reshape and permute each as ``PatchTransformer``,
    in V2's channels-first layout; no shortcut fusion.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_1x1(self.conv_kxk(x))
        batch, _, height, width = x.shape
        ph, pw = self.patch_size
        nh, nw = height // ph, width // pw
        x = x.reshape(batch, -1, nh, ph, nw, pw).permute(0, 1, 3, 5, 2, 4).reshape(batch, -1, ph * pw, nh * nw)
        x = self.norm(self.transformer(x))
        x = x.reshape(batch, -1, ph, pw, nh, nw).permute(0, 1, 4, 2, 5, 3).reshape(batch, -1, height, width)
        return self.conv_proj(x)


class GatedPositionalAttention(nn.Module):
    """timm's ConViT ``GPSA`` with its cached relative offsets computed in the graph (``grid_offsets``).

    timm's module is a leaf because it fills a cache in Python; this is the same
    computation with the same parameter names.
    """

    def __init__(self, gpsa: nn.Module, where: str) -> None:
        super().__init__()
        self.num_heads, self.scale = gpsa.num_heads, gpsa.scale
        self.qk, self.v, self.proj, self.pos_proj = gpsa.qk, gpsa.v, gpsa.proj, gpsa.pos_proj
        self.gating_param = gpsa.gating_param

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qk = self.qk(x).reshape(batch, tokens, 2, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
        patch_score = ((qk[0] @ qk[1].transpose(-2, -1)) * self.scale).softmax(dim=-1)
        pos_score = self.pos_proj(grid_offsets(x).expand(batch, -1, -1, -1)).permute(0, 3, 1, 2).softmax(dim=-1)
        gate = torch.sigmoid(self.gating_param.view(1, -1, 1, 1))
        attn = (1.0 - gate) * patch_score + gate * pos_score
        attn = attn / attn.sum(dim=-1).unsqueeze(-1)
        v = self.v(x).reshape(batch, tokens, self.num_heads, width // self.num_heads).permute(0, 2, 1, 3)
        return self.proj((attn @ v).transpose(1, 2).reshape(batch, tokens, width))


@fx.wrap
def fourier_positions(shape: tuple[int, int, int], channels: int, temperature: float) -> torch.Tensor:
    """(batch, 2·channels, H, W): sine and cosine features of each position's (y, x), as timm's EdgeNeXt makes.

    Wrapped for fx (its sizes are Python ints); a function of sizes alone, so a
    constant to the analysis.
    """
    batch, height, width = shape
    y = torch.arange(1, height + 1, dtype=torch.float32).view(1, -1, 1).expand(batch, height, width)
    x = torch.arange(1, width + 1, dtype=torch.float32).view(1, 1, -1).expand(batch, height, width)
    y, x = y / (height + 1e-6) * 2 * math.pi, x / (width + 1e-6) * 2 * math.pi
    steps = temperature ** (2 * torch.div(torch.arange(channels), 2, rounding_mode="floor") / channels)
    features = []
    for grid in (y, x):
        phases = grid[..., None] / steps
        features.append(torch.stack((phases[..., 0::2].sin(), phases[..., 1::2].cos()), dim=4).flatten(3))
    return torch.cat(features, dim=3).permute(0, 3, 1, 2)


class FourierPositionEncoding(nn.Module):
    """timm's EdgeNeXt ``PositionalEncodingFourier``: constant Fourier features, then a learnt 1×1 projection.

    timm's module is a leaf because fx cannot trace its ``torch.arange`` over
    sizes; here that part is a wrapped constant and the projection is visible.
    """

    def __init__(self, encoding: nn.Module, where: str) -> None:
        super().__init__()
        self.token_projection = encoding.token_projection
        self.hidden_dim, self.temperature = encoding.hidden_dim, encoding.temperature

    def forward(self, shape: tuple[int, int, int]) -> torch.Tensor:
        features = fourier_positions(shape, self.hidden_dim, self.temperature)
        return self.token_projection(features.to(self.token_projection.weight.dtype))


class FourierPositionEncodingXCiT(FourierPositionEncoding):
    """timm's XCiT ``PositionalEncodingFourier``: EdgeNeXt's, called with (B, H, W) and tiled over the batch."""

    def forward(self, batch: int, height: int, width: int) -> torch.Tensor:
        return super().forward((1, height, width)).repeat(batch, 1, 1, 1)


class WindowedBlock(nn.Module):
    """timm's TinyViT ``TinyVitBlock``: window attention, a depthwise conv and an MLP, same parameters.

    timm's block is a leaf because it pads only when the size needs it; here
    the pad (zero when not needed) and the crop are always applied, with amounts
    computed from the size, and one window is the general case's nH = nW = 1.
    """

    def __init__(self, block: nn.Module, where: str) -> None:
        super().__init__()
        _adopt(self, block, "window_size")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        ws = self.window_size
        pad_b, pad_r = (ws - height % ws) % ws, (ws - width % ws) % ws
        nh, nw = (height + pad_b) // ws, (width + pad_r) // ws
        y = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        y = y.view(batch, nh, ws, nw, ws, channels).transpose(2, 3).reshape(batch * nh * nw, ws * ws, channels)
        y = self.attn(y).view(batch, nh, nw, ws, ws, channels).transpose(2, 3)
        y = y.reshape(batch, nh * ws, nw * ws, channels)[:, :height, :width]
        x = x + self.drop_path1(y)
        x = self.local_conv(x.permute(0, 3, 1, 2)).reshape(batch, channels, height * width).transpose(1, 2)
        x = x + self.drop_path2(self.mlp(x))
        return x.view(batch, height, width, channels)


class NormFreeResidual(nn.Module):
    """timm's NFNet ``NormFreeBlock`` with its skip-init gain applied out of place, same parameters.

    timm's block is a leaf because fx loses its in-place ``out.mul_(gain)``.
    """

    def __init__(self, block: nn.Module, where: str) -> None:
        super().__init__()
        _adopt(self, block, "downsample", "conv2b", "act2b", "attn", "attn_last", "skipinit_gain", "alpha", "beta",
               "attn_gain")  # children that may be None, a parameter that may be None, and scalars

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(x) * self.beta
        shortcut = x if self.downsample is None else self.downsample(out)
        out = self.conv2(self.act2(self.conv1(out)))
        if self.conv2b is not None:
            out = self.conv2b(self.act2b(out))
        if self.attn is not None:
            out = self.attn_gain * self.attn(out)
        out = self.conv3(self.act3(out))
        if self.attn_last is not None:
            out = self.attn_gain * self.attn_last(out)
        out = self.drop_path(out)
        if self.skipinit_gain is not None:
            out = out * self.skipinit_gain
        return out * self.alpha + shortcut


class LinearAttention(nn.Module):
    """timm's EfficientViT ``LiteMLA`` (ReLU linear attention over multi-scale q, k, v), with the same parameters.

    timm's module is a leaf because it turns autocast off after checking the
    device, which fx cannot trace; pleascc computes in float32 anyway.
    """

    def __init__(self, mla: nn.Module, where: str) -> None:
        super().__init__()
        self.dim, self.eps = mla.dim, mla.eps
        self.qkv, self.aggreg, self.kernel_func, self.proj = mla.qkv, mla.aggreg, mla.kernel_func, mla.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        qkv = self.qkv(x)
        qkv = torch.cat([qkv] + [scale(qkv) for scale in self.aggreg], dim=1)
        q, k, v = qkv.reshape(batch, -1, 3 * self.dim, height * width).transpose(-1, -2).chunk(3, dim=-1)
        q, k = self.kernel_func(q), self.kernel_func(k)
        v = F.pad(v, (0, 1), mode="constant", value=1.0)  # a ones column: its output is the normaliser
        out = q @ (k.transpose(-1, -2) @ v)
        out = out[..., :-1] / (out[..., -1:] + self.eps)
        return self.proj(out.transpose(-1, -2).reshape(batch, -1, height, width))


class WindowedCascadedAttention(nn.Module):
    """timm's EfficientViT (MSRA) ``LocalWindowAttention``: windows around cascaded group attention, same parameters.

    timm's module is a leaf because its windowing branches on the input size,
    and its attention keeps a bias cache outside its parameters (stale once the
    weights change).  Here the windows follow the size the model was built for,
    and the biases are gathered from the parameter in every forward.
    """

    def __init__(self, local: nn.Module, where: str) -> None:
        super().__init__()
        self.attn, self.resolution = local.attn, local.resolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ws, side = self.attn.resolution, self.resolution
        if side == ws:
            return self._attention(x)
        batch, channels = x.shape[0], x.shape[1]
        pad = (ws - side % ws) % ws
        windows = (side + pad) // ws
        x = F.pad(x.permute(0, 2, 3, 1), (0, 0, 0, pad, 0, pad))
        x = x.view(batch, windows, ws, windows, ws, channels).transpose(2, 3)
        x = self._attention(x.reshape(-1, ws, ws, channels).permute(0, 3, 1, 2))
        x = x.permute(0, 2, 3, 1).view(batch, windows, windows, ws, ws, channels)
        x = x.transpose(2, 3).reshape(batch, windows * ws, windows * ws, channels)
        return x[:, :side, :side].permute(0, 3, 1, 2)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        batch, _, height, width = x.shape
        chunks = x.chunk(len(attn.qkvs), dim=1)
        biases = attn.attention_biases[:, attn.attention_bias_idxs]
        feat, outputs = chunks[0], []
        for head, (qkv, dw) in enumerate(zip(attn.qkvs, attn.dws)):
            feat = qkv(feat if head == 0 else feat + chunks[head])
            q, k, v = feat.view(batch, -1, height, width).split([attn.key_dim, attn.key_dim, attn.val_dim], dim=1)
            q, k, v = dw(q).flatten(2), k.flatten(2), v.flatten(2)
            scores = ((q * attn.scale).transpose(-2, -1) @ k + biases[head]).softmax(dim=-1)
            feat = (v @ scores.transpose(-2, -1)).view(batch, attn.val_dim, height, width)
            outputs.append(feat)
        return attn.proj(torch.cat(outputs, 1))


class StridedConvAttention(nn.Module):
    """timm's CPUBone and LowFormer ``ConvAttention`` (attention on a strided projection, upsampled back).

    timm's modules are leaves: CPUBone's pads only when the size is odd (here
    the pad is always applied, with amounts computed from the size, zero when
    even); LowFormer's does not pad at all.
    """

    def __init__(self, attention: nn.Module, where: str) -> None:
        super().__init__()
        _adopt(self, attention, "num_heads", "head_dim", "num_keys", "att_stride", "o_proj_inpdim")
        self.small_kernels = getattr(attention, "small_kernels", False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2], x.shape[-1]
        if self.small_kernels and self.att_stride > 1:
            x = F.pad(x, (0, (-width) % self.att_stride, 0, (-height) % self.att_stride))
        xout = self.pwise(self.conv_proj(x))
        batch, _, h, w = xout.shape
        qkv = xout.reshape(batch, self.num_heads, self.num_keys * self.head_dim, h * w).permute(0, 1, 3, 2)
        q, k, v = qkv.chunk(3, dim=3)
        values = F.scaled_dot_product_attention(q, k, v)
        o = self.o_proj(values.permute(0, 1, 3, 2).reshape(batch, self.o_proj_inpdim, h, w))
        return self.upsampling(o)[..., :height, :width]


# Leaf modules fx cannot see into -> a traceable equivalent (or None to leave one as it is); one rule per type.
OPENERS = {
    "torch.nn.modules.activation.MultiheadAttention": _open_multihead_attention,
    "timm.models.mobilevit.MobileVitBlock": PatchTransformer,
    "timm.models.mobilevit.MobileVitV2Block": PatchLinearTransformer,
    "timm.models.convit.GPSA": GatedPositionalAttention,
    "timm.models.efficientvit_mit.LiteMLA": LinearAttention,
    "timm.models.edgenext.PositionalEncodingFourier": FourierPositionEncoding,
    "timm.models.xcit.PositionalEncodingFourier": FourierPositionEncodingXCiT,
    "timm.models.tiny_vit.TinyVitBlock": WindowedBlock,
    "timm.models.nfnet.NormFreeBlock": NormFreeResidual,
    "timm.models.efficientvit_msra.LocalWindowAttention": WindowedCascadedAttention,
    "timm.models.cpubone.ConvAttention": StridedConvAttention,
    "timm.models.lowformer.ConvAttention": StridedConvAttention,
}


def _open_modules(model: nn.Module) -> None:
    """Swap each module an opener knows for its traceable equivalent."""
    for name, m in list(model.named_modules()):
        opener = OPENERS.get(f"{type(m).__module__}.{type(m).__qualname__}")
        opened = opener(m, name) if opener else None
        if opened is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, opened)


def _where(err: Exception) -> str:
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "/torch/" not in f.filename]
    message = first_line(err)
    if frames:
        f = frames[-1]
        return f"{type(err).__name__} at {f.filename}:{f.lineno} ({(f.line or '').strip()}): {message}"
    return f"{type(err).__name__}: {message}"


def _make_out_of_place(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in OUT_OF_PLACE:
            node.target = OUT_OF_PLACE[node.target]
        elif node.op == "call_method" and node.target in INPLACE_METHODS:
            node.target = node.target[:-1]
        if node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
    gm.recompile()


def check_same_graph(a: fx.GraphModule, b: fx.GraphModule, name: str = "B") -> None:
    """Both models (A and ``name``) must trace to the same graph: the passes analyse A's and apply to both."""
    for na, nb in zip(a.graph.nodes, b.graph.nodes):
        if (na.op, str(na.target)) != (nb.op, str(nb.target)):
            raise PleasccError(f"models A and {name} trace to different graphs at node {na.name} "
                               f"({na.op} {na.target} vs {nb.op} {nb.target}); pleascc merges models "
                               "of the same architecture")
    if len(a.graph.nodes) != len(b.graph.nodes):
        raise PleasccError(f"models A and {name} trace to graphs of different length; pleascc merges models "
                           "of the same architecture")
    shapes = [_output_structure(gm) for gm in (a, b)]
    if shapes[0] != shapes[1]:
        raise PleasccError(f"models A and {name} return differently structured outputs ({shapes[0]} vs {shapes[1]}); "
                           "make both forward methods return the same tensors, tuples and dicts")


def _output_structure(gm: fx.GraphModule) -> str:
    """What a graph returns, with each tensor as ``T``: ``(T, {'aux': T})``, say."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return str(fx.node.map_arg(output.args[0], lambda _: "T"))
