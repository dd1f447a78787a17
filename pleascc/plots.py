"""Pictures: the permutation groups over the model graph, and a one-page summary of a merge."""

from __future__ import annotations

import networkx as nx
import torch.fx as fx

from pleascc.outputs import write_atomically
from pleascc.passes.groups import Analysis, leaves


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


def draw_groups(gm: fx.GraphModule, analysis: Analysis, path: str) -> None:
    """The graph left to right by depth, each node coloured by its group; grey crosses hold only fixed spaces."""
    plt = _figure()
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        graph.add_node(node.name)
        graph.add_edges_from((arg.name, node.name) for arg in node.all_input_nodes)
    generations = list(nx.topological_generations(graph))
    for depth, layer in enumerate(generations):
        for name in layer:
            graph.nodes[name]["depth"] = depth
    pos = nx.multipartite_layout(graph, subset_key="depth")
    groups = node_groups(analysis)
    roots = sorted({g for g in groups.values() if g is not None})
    palette = plt.get_cmap("tab20")
    colour = {root: palette(k % 20) for k, root in enumerate(roots)}
    breadth = max(len(layer) for layer in generations)
    fig, ax = plt.subplots(figsize=(min(4 + len(generations) * 0.35, 60), min(3 + breadth * 0.8, 20)))
    nx.draw_networkx_edges(graph, pos, ax=ax, alpha=0.35, width=0.6, arrows=True, arrowsize=6,
                           connectionstyle="arc3,rad=0.25")  # arcs: a skip connection stands out from the chain
    for name, (x, y) in pos.items():
        ax.annotate(name, (x, y), xytext=(0, -6), textcoords="offset points", rotation=90, fontsize=5,
                    ha="center", va="top", color="dimgrey")
    free = [n for n in graph if groups.get(n) is not None]
    fixed = [n for n in graph if groups.get(n) is None]
    nx.draw_networkx_nodes(graph, pos, nodelist=free, node_color=[colour[groups[n]] for n in free],
                           node_size=40, ax=ax)
    nx.draw_networkx_nodes(graph, pos, nodelist=fixed, node_color="lightgrey", node_shape="x", node_size=30, ax=ax)
    for root in roots[:20]:
        ax.scatter([], [], color=colour[root], label=f"group {root} ({analysis.root_size(root)})")
    ax.scatter([], [], color="lightgrey", marker="x", label="fixed only")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"{len(roots)} permutation groups over {len(graph)} nodes (colour: a node's first free axis)")
    ax.axis("off")
    fig.tight_layout()
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
    axes[0].plot(index, [2 * g["size"] for g in groups], "r_", markersize=12, label="side by side (2.0)")
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
