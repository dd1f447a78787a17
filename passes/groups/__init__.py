"""Permutation-group analysis: abstract interpretation of an fx graph over spaces.

Each node's output gets one dim per axis (see ``spaces``); an op's *rule* says
which dims are equal, which parameters axes live in which dims, which layers
least squares can solve, and how to rewrite the op when widths change.  Rules
live in one registry keyed by module class, function or method name; an op
with no rule fixes every space it touches and is reported.

- ``analysis``: what the analysis finds (``Analysis``, ``Layer``, ...) and ways to read it;
- ``registry``: ``rule``, the table it fills, the ``Context`` a rule sees, helpers rules share;
- ``driver``: ``analyze``, one rule per node;
- the rules, one module per op family, each registering its own on import: ``elementwise``,
  ``linear``, ``attention``, ``normalization``, ``reductions``, ``shape``, ``indexing``, ``vendor``.
"""

# Every op family's module, for the rules it registers when imported: the registry is full once this package is.
from pleascc.passes.groups import (attention, elementwise, indexing, linear, normalization,  # noqa: F401
                                   reductions, shape, vendor)
from pleascc.passes.groups.analysis import (Analysis, FeatureNorm, Group, Layer, ParamBinding, Size, coverage,
                                            permutation_groups, permute_state, random_permutations)
from pleascc.passes.groups.driver import analyze, per_head_spaces
from pleascc.passes.groups.registry import RULES, Context, leaves, rule

__all__ = ["Analysis", "Context", "FeatureNorm", "Group", "Layer", "ParamBinding", "RULES", "Size", "analyze",
           "coverage", "leaves", "per_head_spaces", "permutation_groups", "permute_state", "random_permutations",
           "rule"]
