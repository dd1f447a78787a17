"""In-place ops and their out-of-place twins.

The tracer makes every op out of place (``OUT_OF_PLACE``, ``INPLACE_METHODS``),
as the passes read values that a later in-place op would overwrite; the
statistics passes run an op in place again where nothing reads its input
afterwards (``in_place_twin``, used by ``executor.lockstep``).
"""

from __future__ import annotations

import copy
import operator
from typing import Callable

import torch
import torch.fx as fx

# In-place ops overwrite values the statistics pass captures; trace them out-of-place.
OUT_OF_PLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                operator.itruediv: operator.truediv}
INPLACE_METHODS = {"add_", "sub_", "mul_", "div_", "relu_", "sigmoid_", "clamp_", "hardtanh_", "tanh_"}
_IN_PLACE = {**{out: inp for inp, out in OUT_OF_PLACE.items()}, torch.relu: torch.relu_, torch.sigmoid: torch.sigmoid_,
             torch.tanh: torch.tanh_}  # the twins lockstep may run where nothing else reads the input


def in_place_twin(gm: fx.GraphModule, node: fx.Node) -> Callable | None:
    """``node``'s op writing into its first argument, called with the node's arguments; None if it has none.

    ``trace`` makes every op out of place, as the passes read values that a
    later in-place op would overwrite; where nothing reads the input again,
    running it in place saves an allocation and a pass over memory
    (``executor.lockstep``).  One rule per kind of op: a module or function with
    an ``inplace`` flag, a function with an in-place twin, a method with one.
    """
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if not isinstance(getattr(module, "inplace", None), bool):
            return None
        twin = copy.copy(module)  # shares the parameters; only the flag differs
        twin.inplace = True
        return twin
    if node.op == "call_function" and node.target in _IN_PLACE:
        return _IN_PLACE[node.target]
    if node.op == "call_function" and node.kwargs.get("inplace") is False:
        return lambda *args, **kwargs: node.target(*args, **{**kwargs, "inplace": True})
    if node.op == "call_method" and node.target + "_" in INPLACE_METHODS:
        return lambda tensor, *args, **kwargs: getattr(tensor, node.target + "_")(*args, **kwargs)
    return None
