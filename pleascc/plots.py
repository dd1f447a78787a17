"""Pictures: the permutation groups over the model graph, and a one-page summary of a merge."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch.fx as fx

from pleascc.outputs import write_atomically
from pleascc.passes.groups import Analysis, leaves

ROWS_PER_COLUMN = 36  # the most graph levels one column of the groups picture holds; deeper graphs wrap
ROW_INCHES, LEGEND_INCHES = 0.24, 2.4  # a level's height; the legend's width
CHAR_INCHES = 0.058  # a label character's width at 7 points: a branch is as wide as the longest label
LABEL_CHARS = 36  # labels past this are shortened, so that one long name does not widen every branch
MARKERS = "osD^vP*"  # with tab10's ten colours: 70 groups told apart before any repeats


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110))


def node_groups(analysis: Analysis) -> dict[str, int | None]:
    """Each node's group: the first free space among its axes (None: all its axes are fixed)."""
    out = {}
    for name, dims in analysis.node_dims.items():
        free = [a.id for d in leaves(dims) for a in analysis.table.atoms(d) if a.id not in analysis.table.fixed]
        out[name] = free[0] if free else None
    return out


def drawn_nodes(gm: fx.GraphModule, analysis: Analysis) -> list[fx.Node]:
    """The nodes the groups picture shows: those holding tensors, and the output; parameter reads are their
    op's, and size bookkeeping (``x.shape[0]``, asserts) holds no axis to permute."""
    return [node for node in gm.graph.nodes if node.op == "output"
            or (node.op != "get_attr" and analysis.node_dims.get(node.name) is not None)]


def node_levels(nodes: list[fx.Node]) -> dict[str, int]:
    """Each node's level: one past its deepest drawn input (fx lists inputs first); a node with none that is not
    a model input (a tensor made from parameters alone) sits just above its first user."""
    level: dict[str, int] = {}
    for node in nodes:
        level[node.name] = max((level[arg.name] + 1 for arg in node.all_input_nodes if arg.name in level), default=0)
    for node in reversed(nodes):
        users = [level[user.name] for user in node.users if user.name in level]
        if node.op != "placeholder" and users and not any(arg.name in level for arg in node.all_input_nodes):
            level[node.name] = max(min(users) - 1, 0)
    return level


class Layout(NamedTuple):
    """Where each node of the groups picture goes: x in branches, y in levels downwards, and its column."""

    pos: dict[str, tuple[float, int]]
    column: dict[str, int]
    width: int  # branches, over all the columns
    rows: int  # levels per column


def layout(nodes: list[fx.Node]) -> Layout:
    """Levels top to bottom; in a level, each node under its leftmost input where that is free, else in the
    next free branch to the right; past ``ROWS_PER_COLUMN`` levels the next ones go in a column to the right,
    as a newspaper's (a strip of a deep graph is unreadable at any size)."""
    level = node_levels(nodes)
    levels = max(level.values()) + 1
    rows = math.ceil(levels / math.ceil(levels / ROWS_PER_COLUMN))
    branch: dict[str, int] = {}
    for k in range(levels):
        taken: set[int] = set()
        for node in sorted((n for n in nodes if level[n.name] == k), key=lambda n: _under(n, branch)):
            slot = _under(node, branch)
            while slot in taken:
                slot += 1
            branch[node.name] = slot
            taken.add(slot)
    column = {name: level[name] // rows for name in branch}
    widths = [1 + max((b for name, b in branch.items() if column[name] == c), default=0)
              for c in range(max(column.values()) + 1)]
    starts = [sum(widths[:c]) for c in range(len(widths))]
    pos = {name: (starts[column[name]] + b, level[name] % rows) for name, b in branch.items()}
    return Layout(pos, column, sum(widths), rows)


def _under(node: fx.Node, branch: dict[str, int]) -> int:
    """The leftmost branch of a node's placed inputs (0 for none): where it goes if that is free, so that a
    chain keeps its line and a join (a residual's add, a concatenation) comes back to the left."""
    return min((branch[arg.name] for arg in node.all_input_nodes if arg.name in branch), default=0)


def node_label(gm: fx.GraphModule, node: fx.Node) -> str:
    """A node's name and, where the name does not say it, what it computes (``layer1_0_conv1 (Conv2d)``)."""
    if node.op == "call_module":
        kind = type(gm.get_submodule(node.target)).__name__
    else:
        kind = getattr(node.target, "__name__", str(node.target)) if node.op.startswith("call") else \
            "input" if node.op == "placeholder" else node.op
    label = node.name if kind.lower() in node.name.lower() else f"{node.name} ({kind})"
    return label if len(label) <= LABEL_CHARS else label[:LABEL_CHARS - 1] + "…"


def _edge(ax, start: tuple[float, int], end: tuple[float, int]) -> None:
    """An arrow down a column: straight to the next level, bowed past the nodes it skips (a residual)."""
    skipped = end[1] - start[1] - 1 if start[0] == end[0] else 0
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(
        arrowstyle="-|>", mutation_scale=7, shrinkA=4, shrinkB=4, lw=0.7, color="0.45",
        connectionstyle=f"arc3,rad={min(0.35, 2 / skipped) if skipped else 0.0}"))  # bowed about 0.2 inches


def _wrapped_edge(ax, source: str, end: tuple[float, int]) -> None:
    """An input from an earlier column: its name left of the node, with a short dotted arrow, rather than a line
    across the picture."""
    ax.annotate(f"from {source}", xy=end, xytext=(end[0] - 0.12, end[1]), fontsize=6, color="0.4", ha="right",
                va="center", arrowprops=dict(arrowstyle="-|>", mutation_scale=6, shrinkB=4, lw=0.6, color="0.55",
                                             linestyle=":"))


def draw_groups(gm: fx.GraphModule, analysis: Analysis, path: str) -> None:
    """The traced graph top to bottom, each node marked with its group (the first free axis it holds) in a
    colour and marker of its own, its name beside it; grey crosses hold only fixed axes."""
    plt = _figure()
    nodes = drawn_nodes(gm, analysis)
    pos, column, width, rows = layout(nodes)
    labels = {node.name: node_label(gm, node) for node in nodes}
    branch = 0.35 + CHAR_INCHES * max(map(len, labels.values()))  # inches: a node and its label
    groups = node_groups(analysis)
    roots = sorted({g for g in groups.values() if g is not None})
    style = {root: (plt.get_cmap("tab10")(k % 10), MARKERS[k // 10 % len(MARKERS)]) for k, root in enumerate(roots)}
    fig = plt.figure(figsize=(width * branch + LEGEND_INCHES, rows * ROW_INCHES + 0.9))
    size = fig.get_size_inches()
    ax = fig.add_axes((0, 0.15 / size[1], width * branch / size[0], rows * ROW_INCHES / size[1]))
    ax.set(xlim=(-0.35 / branch, width - 0.35 / branch), ylim=(rows - 0.5, -0.5))  # room left for bowed arrows
    ax.axis("off")
    for node in nodes:
        for arg in (arg for arg in node.all_input_nodes if arg.name in pos):
            if column[arg.name] == column[node.name]:
                _edge(ax, pos[arg.name], pos[node.name])
            else:
                _wrapped_edge(ax, arg.name, pos[node.name])
    for name, (x, y) in pos.items():
        colour, marker = style.get(groups.get(name), ("0.6", "x"))
        ax.scatter([x], [y], s=30, color=colour, marker=marker, zorder=3)
        ax.text(x + 0.12 / branch, y, labels[name], fontsize=7, va="center", ha="left", zorder=4)
    handles = [plt.Line2D([], [], ls="", color=c, marker=m, label=f"group {root}: {analysis.root_size(root)} units")
               for root, (c, m) in style.items()]
    handles.append(plt.Line2D([], [], ls="", color="0.6", marker="x", label="only fixed axes"))
    fig.suptitle(f"{len(roots)} permutation groups over {len(pos)} nodes", x=0.02, ha="left", fontsize=10)
    fig.legend(handles=handles, loc="upper right", bbox_to_anchor=(1, 1 - 0.5 / size[1]), fontsize=7, frameon=False,
               title="group of a node's first free axis", title_fontsize=7)  # under the title
    _save(fig, path)
    plt.close(fig)


def draw_report(report: dict, path: str) -> None:
    """A merge on one page: widths the budget chose per group, matched-pair correlations, least-squares residuals."""
    plt = _figure()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    groups = report["groups"]
    index = range(len(groups))
    axes[0].bar(index, [g["width"] for g in groups], color="tab:blue", label="merged width")
    axes[0].plot(index, [g["size"] for g in groups], "k_", markersize=12, label="one model (1.0)")
    models = report["models"]
    axes[0].plot(index, [models * g["size"] for g in groups], "r_", markersize=12,
                 label=f"side by side ({models:.1f})")
    axes[0].set(xlabel="group", ylabel="units", title=f"widths at budget {report['budget']} "
                                                        f"({report['relative_flops']:.3f}× FLOPs)")
    axes[0].legend(fontsize=7)
    corr = [c for g in groups for c in g["corr"][:g["merged_pairs"]]]
    kept = [c for g in groups for c in g["corr"][g["merged_pairs"]:]]
    axes[1].hist([corr, kept], bins=30, stacked=True, label=["merged pairs", "kept apart"])
    axes[1].set(xlabel="correlation of the matched pair", ylabel="pairs", title=f"matching ({report['method']})")
    axes[1].legend(fontsize=7)
    residuals = report.get("least_squares_residuals") or {}
    axes[2].bar(range(len(residuals)), list(residuals.values()), color="tab:orange")
    axes[2].set(xlabel="layer block, in graph order", ylabel="relative residual",
                title="least-squares residuals" if residuals else "no least-squares fit (this method)")
    if residuals:
        axes[2].set_yscale("log")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
