"""The merge's options: one dataclass with their defaults, checks and help, from which ``pleascc.merge``'s
keywords, ``pleascc merge``'s flags and the options table of docs/merge.md all derive.

Apart from ``pleascc.api`` because the command line parses its arguments
before it imports torch (``--help`` stays instant); this module imports nothing heavy.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from pleascc.passes.errors import PleasccError

# method -> (matcher, how layers are refitted: PLeaS least squares, RegMean, or not at all)
METHODS = {"pleas": ("hungarian", "least-squares"), "permute": ("hungarian", None), "average": ("identity", None),
           "zipit": ("zipit", None), "regmean": ("identity", "regmean"), "prune": ("l1", None)}
N_WAY_METHODS = ("pleas", "permute", "average", "zipit", "regmean")  # those that merge more than two models
LABELS = ("shared", "separate")
MATCHINGS = ("activation", "weight")
WIDTH_SEARCHES = ("greedy", "uniform", "stages")  # see passes.budget.WIDTHS
LEAST_SQUARES = ("sequential", "one-pass")  # fit inputs: the merged model's own, or the originals' features
AUTO = "auto"  # positions by input: ``read_positions``
AUTO_POSITIONS = 64  # what ``auto`` reads of an image's feature maps
SHARED_FLAGS = ("samples", "seed")  # options whose flags every command has (``pleascc.cli``'s data flags)


def _option(default, help: str, flag: str | None = "", choices: tuple | None = None, metavar: str | None = None):
    """A field of ``MergeOptions``: its default and help, and its command-line flag ("": from its name;
    None: the API only, or a flag the command line shares with other commands)."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "metavar": metavar})


@dataclass(frozen=True)
class MergeOptions:
    """How ``pleascc.merge`` merges: every choice, checked when made (``PleasccError`` naming the fix)."""

    budget: float = _option(1.0, "merged FLOPs ÷ one model's: 1.0 every matched pair merged, 2.0 side by side, "
                                 "below 1.0 merged pairs merged further (merge and compress); N models: up to N "
                                 "(side by side; average and regmean: 1.0 or N)")
    labels: str | None = _option(
        None, "one head for both models' classes (`shared`, fit to the mean logits) or one per model (`separate`; "
              "outputs `logits_0`, `logits_1`); default: separate when the heads differ in size", choices=LABELS)
    method: str = _option(
        "pleas", "`pleas`; `permute` (Git Re-Basin activation matching + averaging); `average`; `zipit` (ZipIt!: "
                 "greedy merging within and across the models); `regmean` (RegMean: no permutation, closed-form merge "
                 "of each layer; for models from one base); `prune` (L1-norm channel pruning of model A, for "
                 "budgets below 1.0: the baseline of compression by merging)", choices=tuple(METHODS))
    matching: str = _option(
        "activation", "pleas, permute: pair units by their features on the data, or by their weights alone "
                      "(Git Re-Basin weight matching, data-free)", choices=MATCHINGS)
    width_search: str = _option(
        "greedy", "how the budget is spread over the groups: `greedy` (most correlation back per FLOP), `uniform` "
                  "(one share of every group kept apart), `stages` (the deepest groups kept apart first; the better "
                  "choice for transformers and for PLeaS-free)", flag="--widths", choices=WIDTH_SEARCHES)
    least_squares: str = _option(
        "sequential", "pleas: fit each layer on the merged model's own inputs, one pass over the data per level of "
                      "layers (more accurate), or on the originals' features in a single pass (faster; its "
                      "statistics read what the matching pass recorded, where that fits memory and disk, else a "
                      "second pass runs both models)",
        choices=LEAST_SQUARES)
    positions: int | str | None = _option(
        "auto", "the most spatial positions (or tokens) per sample the statistics read from a feature map (0 or "
                "None: all): a fixed random subset, the same for every sample and rank, as a layer's fit has far "
                "more rows than unknowns and matching's correlations need no more; `auto`: 64 for images, every "
                "token of token ids (each token carries more than a neighbouring pixel)")
    match_samples: int | None = _option(
        None, "matching's statistics read only the first N calibration samples (default: all); least squares still "
              "reads all of them, and the matching pass costs N/samples of a forward", metavar="N")
    batch_size: int | None = _option(
        None, "samples per batch in the statistics passes (default: the most, up to 64, whose values in flight fit "
              "in 512 MB as the passes stream the models)")
    cache_gb: float = _option(
        2.0, "least squares: memory for the activations kept between its passes (A's and B's layer outputs, and "
             "for one-pass their inputs; the merged model's values later levels read); the rest goes to disk, in "
             "`--work-dir`")
    work_dir: str | None = _option(
        None, "least squares: where activations past `--cache-gb` go, in a temporary directory removed when the "
              "merge ends, fails or is interrupted (default: the system's temporary directory, $TMPDIR); for "
              "sequential least squares one that cannot be written or is too small is an error before any pass "
              "(one-pass runs its models again instead)", metavar="DIR")
    device: str = _option(
        "cpu", "where the statistics passes run and the least-squares systems are solved: `cpu` or `cuda` "
               "(matching runs on the CPU; under torchrun each rank its local GPU, NCCL for the sums)")
    reset_bn: bool | None = _option(
        None, "recompute the merged model's BatchNorm statistics on the data afterwards, as ZipIt! and Git Re-Basin "
              "evaluate their merges (default: on for permute, average and zipit, which refit no layer; off for "
              "regmean; pleas fits its BatchNorms by least squares and refuses it); a model without BatchNorm is "
              "left as it is")
    zip_alpha: float = _option(0.3, "zipit: similarity decay of a merged unit (0: pairs only, no larger clusters)")
    zip_beta: float = _option(0.125, "zipit: share of the merges that may join two units of one model")
    zip_until: str | None = _option(
        None, "merge up to this layer or module (`layer3`) and keep both models' later layers (ZipIt!'s partial "
              "zipping; sets the widths instead of `--budget`; default: none, the budget sets them)", metavar="LAYER")
    regmean_alpha: float = _option(0.9, "regmean: scale of the input Grams' off-diagonals (1: plain least squares)")
    ridge: float = _option(1e-4, "least squares' ridge, relative to each Gram's mean diagonal", flag=None)
    samples: int | None = _option(None, "use a seeded subset of this many calibration samples", flag=None)
    seed: int = _option(0, "seed of the sample subset and of weight matching's order: the same inputs and seed "
                           "give a byte-identical merge", flag=None)
    progress: bool = _option(True, "show progress bars", flag=None)

    def __post_init__(self) -> None:
        if self.positions == 0:
            object.__setattr__(self, "positions", None)  # 0: every position, as on the command line
        if isinstance(self.positions, str) and self.positions != AUTO:
            raise PleasccError(f"positions {self.positions!r} is neither a count nor {AUTO!r}: pass --positions N "
                               f"(0: all) or leave it out")
        for name in ("labels", "method", "matching", "width_search", "least_squares"):
            choices = _field(name).metadata["choices"]
            if getattr(self, name) not in choices and not (name == "labels" and self.labels is None):
                raise PleasccError(f"unknown {name.replace('_', ' ')} {getattr(self, name)!r}: choose one of "
                                   f"{', '.join(choices)}")
        if self.matching == "weight" and METHODS[self.method][0] != "hungarian":
            raise PleasccError(f"weight matching pairs units for pleas or permute, not {self.method}: drop "
                               "--matching weight or pick one of those methods")
        if self.zip_until is not None and self.budget != 1.0:
            raise PleasccError("--zip-until sets the widths itself (merged up to that layer, apart after it); "
                               "leave --budget at 1.0")
        if not self.budget > 0.0:
            raise PleasccError(f"budget {self.budget} is not positive: it is the merged model's FLOPs ÷ one "
                               "model's")
        for name in ("match_samples", "batch_size", "samples"):
            check_positive(name, getattr(self, name))
        if self.positions != AUTO:
            check_positive("positions", self.positions)
        if self.reset_bn and self.refit == "least-squares":
            raise PleasccError("--reset-bn recomputes a baseline's BatchNorm statistics; pleas fits its BatchNorms "
                               "by least squares: drop --reset-bn")

    def check_models(self, models: int) -> None:
        """The budgets ``models`` models merge at, and what a merge of more than two supports (``align``)."""
        if self.budget > models:
            count = "two" if models == 2 else str(models)
            raise PleasccError(f"budget {self.budget:g} is above {models:.1f}: {count} models side by side are "
                               f"{models:.1f} (the budget is the merged model's FLOPs ÷ one model's)")
        if models == 2:
            return
        if self.method not in N_WAY_METHODS:
            raise PleasccError(f"--method {self.method} merges two models; {models} models merge with "
                               f"{', '.join(N_WAY_METHODS)}")
        if METHODS[self.method][0] == "identity" and self.budget not in (1.0, float(models)):
            raise PleasccError(f"{self.method} merges {models} models at budget 1.0 or {models} (side by side), not "
                               f"{self.budget:g}: other budgets choose which units to merge by matching; use "
                               "--method pleas, permute or zipit")
        if self.method == "zipit" and self.zip_alpha <= 0:
            raise PleasccError(f"--zip-alpha {self.zip_alpha:g} zips pairs only, and {models} models need clusters "
                               "of more: pass a positive --zip-alpha (default 0.3)")
        if self.zip_until is not None:
            raise PleasccError("--zip-until merges two models")

    @property
    def zip_options(self) -> dict[str, float]:
        """ZipIt!'s parameters, as ``match.zipit`` takes them."""
        return {"alpha": self.zip_alpha, "beta": self.zip_beta}

    @property
    def refit(self) -> str | None:
        """How the method refits layers after matching: PLeaS least squares, RegMean, or not at all (None)."""
        return METHODS[self.method][1]

    @property
    def resets_batch_norm(self) -> bool:
        """``reset_bn``, or the method's default: on for the methods that refit no layer, whose averaged
        BatchNorm statistics no longer describe the merged features (their papers reset them)."""
        return self.refit is None if self.reset_bn is None else self.reset_bn


def help_of(name: str) -> str:
    """An option's help, as the command line shows it."""
    return _field(name).metadata["help"].replace("`", "")


def check_positive(name: str, value: int | tuple[int, ...] | None) -> None:
    """A count (or each size of a shape) of the merge or of the command line: left out (None), or 1 or more."""
    values = value if isinstance(value, tuple) else (value,)
    if any(v is not None and v < 1 for v in values):
        shown = ",".join(str(v) for v in values)
        raise PleasccError(f"{name.replace('_', ' ')} {shown} is not positive: pass --{name.replace('_', '-')} "
                           "1 or more, or leave it out")


def _field(name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(MergeOptions) if f.name == name)


def flag(f: dataclasses.Field) -> str | None:
    """The command-line flag of an option (None: the API only)."""
    given = f.metadata["flag"]
    return "--" + f.name.replace("_", "-") if given == "" else given


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``pleascc merge``'s flags for the options that have one, with their defaults and help (the parser's
    formatter shows each default, unless the help says it)."""
    for f in dataclasses.fields(MergeOptions):
        if flag(f) is None:
            continue
        help = help_of(f.name).replace("%", "%%")
        if f.type == "bool | None":  # --reset-bn and --no-reset-bn; None: the method's default
            parser.add_argument(flag(f), dest=f.name, default=f.default, action=argparse.BooleanOptionalAction,
                                help=help)
            continue
        kind = {"float": float, "int | None": int, "int | str | None": _count_or_auto}.get(f.type)
        parser.add_argument(flag(f), dest=f.name, default=f.default, type=kind, choices=f.metadata["choices"],
                            metavar=f.metadata["metavar"], help=help)


def _count_or_auto(text: str) -> int | str:
    return text if text == AUTO else int(text)


def read_positions(positions: int | str | None, token_ids: bool) -> int | None:
    """The positions the statistics read per sample (None: all): ``auto`` reads every token of token ids and
    ``AUTO_POSITIONS`` of an image's feature maps."""
    if positions == AUTO:
        return None if token_ids else AUTO_POSITIONS
    return positions


def from_arguments(args) -> MergeOptions:
    """The options a parsed ``pleascc merge`` command line gives: its flags, and ``--samples`` and ``--seed``,
    which it shares with the other commands (the others at their defaults)."""
    return MergeOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(MergeOptions)
                           if flag(f) is not None or f.name in SHARED_FLAGS})


def markdown_table() -> str:
    """docs/merge.md's table of the merge's options (a test keeps the page equal to it)."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(MergeOptions):
        if flag(f) is not None:
            flags = f"`{flag(f)}`" + (f", `--no-{flag(f)[2:]}`" if f.type == "bool | None" else "")
            rows.append(f"| {flags} | {shown(f.default)} | {f.metadata['help']} |")
    return "\n".join(rows)


def shown(default: object) -> str:
    """A default as the options table and ``--help`` show it."""
    return "—" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
