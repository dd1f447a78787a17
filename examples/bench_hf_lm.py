"""Two small causal language models, trained here on two text domains, merged at budgets 1.0 to 2.0.

A and B are GPT-2s (``transformers``' GPT2LMHeadModel: 4 layers, width 128,
4 heads, bytes as tokens) from different seeds.  A learns Python code, B
English prose, both texts shipped with the Python interpreter, so nothing is
downloaded:

- code: the standard library's top-level modules (``Lib/*.py``);
- prose: the documentation topics ``pydoc`` shows (``pydoc_data.topics``).

Every 8th file or topic is held out.  Each merge calibrates on a mix of both
domains' training text and is scored by its held-out perplexity per domain,
beside A, B and their ensemble (the mean of their logits: what a shared
head computes at budget 2.0).  The default reads every token of each chunk
(``--positions auto`` for token ids); ``pleas, 64 positions`` reads 64 of its
128 (``--positions 64``, what images read by default).

    python examples/bench_hf_lm.py train     # both models → examples/checkpoints/hf_lm/{a,b} (save_pretrained)
    python examples/bench_hf_lm.py merge     # every merge → examples/results/hf_lm.{json,md,png}
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import cpu_name  # noqa: E402

import pleascc  # noqa: E402

HERE = Path(__file__).resolve().parent
MODELS = HERE / "checkpoints" / "hf_lm"
RESULTS = HERE / "results"
DOMAINS = ("code", "prose")
TOKENS = 128  # bytes per sequence
HELD_OUT = 8  # every 8th file or topic
VARIANTS = {"pleas": {"method": "pleas"}, "pleas, 64 positions": {"method": "pleas", "positions": 64},
            "zipit": {"method": "zipit"}, "permute": {"method": "permute"}, "average": {"method": "average"}}
BASELINES = ("zipit", "permute", "average")
BUDGETS = (1.0, 1.25, 1.5, 2.0)


def domain_texts(domain: str) -> tuple[bytes, bytes]:
    """(training text, held-out text) of one domain, as UTF-8 bytes."""
    if domain == "code":
        lib = Path(sysconfig.get_paths()["stdlib"])
        docs = [p.read_bytes() for p in sorted(lib.glob("*.py"))]
    else:
        from pydoc_data.topics import topics

        docs = [topics[k].encode() for k in sorted(topics)]
    train = b"\n".join(d for k, d in enumerate(docs) if k % HELD_OUT)
    held = b"\n".join(d for k, d in enumerate(docs) if not k % HELD_OUT)
    return train, held


def chunks(text: bytes, n: int | None = None, seed: int | None = None) -> torch.Tensor:
    """(n, TOKENS) byte ids: consecutive chunks, or with ``seed`` chunks at random offsets."""
    ids = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    if seed is None:
        count = len(ids) // TOKENS if n is None else min(n, len(ids) // TOKENS)
        return ids[: count * TOKENS].view(count, TOKENS)
    starts = torch.randint(0, len(ids) - TOKENS, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([ids[s:s + TOKENS] for s in starts.tolist()])


def build(seed: int):
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=256, n_positions=TOKENS, n_embd=128, n_layer=4, n_head=4,
                                     bos_token_id=10, eos_token_id=10)
    return transformers.GPT2LMHeadModel(config)


def train(args) -> None:
    """A on code from seed 0, B on prose from seed 1: AdamW, cosine schedule, random crops."""
    log = {}
    for name, domain, seed in (("a", "code", 0), ("b", "prose", 1)):
        text, _ = domain_texts(domain)
        model = build(seed).train()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps,
                                                       pct_start=max(0.05, 3 / args.steps))
        start = time.perf_counter()
        for step in tqdm(range(args.steps), desc=f"train {name} on {domain}"):
            x = chunks(text, args.batch, seed=seed * 1_000_003 + step)
            loss = model(x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
        model.eval().save_pretrained(args.models / name)
        log[name] = {"domain": domain, "seed": seed, "steps": args.steps, "batch": args.batch, "lr": args.lr,
                     "train_s": round(time.perf_counter() - start, 1), "final_loss": float(loss)}
    log.update(python=sys.version.split()[0], cpu=cpu_name(), tokens=TOKENS)
    (args.models / "train.json").write_text(json.dumps(log, indent=1) + "\n")


def perplexity(logits_of, x: torch.Tensor, batch: int = 64) -> float:
    """exp of the mean next-byte cross-entropy over every held-out chunk."""
    total, count = 0.0, 0
    with torch.no_grad():
        for k in range(0, len(x), batch):
            xb = x[k:k + batch]
            logits = logits_of(xb)[:, :-1]
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xb[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += xb[:, 1:].numel()
    return math.exp(total / count)


def merge(args) -> None:
    from pleascc.load import load_model

    torch.set_num_threads(args.threads)
    a, b = (load_model(str(args.models / name)) for name in "ab")
    held = {d: chunks(domain_texts(d)[1], args.eval_chunks) for d in DOMAINS}
    calibration = torch.cat([chunks(domain_texts(d)[0], args.samples // 2, seed=100 + k)
                             for k, d in enumerate(DOMAINS)])

    def score(logits_of) -> dict:
        return {d: perplexity(logits_of, held[d]) for d in DOMAINS}

    rows = [{"method": "A (code)", **score(lambda x: a(x).logits)}, {"method": "B (prose)", **score(lambda x: b(x).logits)},
            {"method": "ensemble (mean logits)", "budget": 2.0, **score(lambda x: (a(x).logits + b(x).logits) / 2)}]
    x_check = held["code"][:8]
    with torch.no_grad():
        ensemble_check = (a(x_check).logits + b(x_check).logits) / 2
    for method, options in VARIANTS.items():
        for budget in BUDGETS:
            start = time.perf_counter()
            result = pleascc.merge(a, b, calibration, budget=budget, progress=False, **options)
            seconds = time.perf_counter() - start
            row = {"method": method, "budget": budget, "relative_flops": result.report["relative_flops"],
                   "merge_s": round(seconds, 1), **score(result.model)}
            if budget == 2.0:
                with torch.no_grad():
                    got = result.model(x_check)
                row["vs_ensemble"] = float((got - ensemble_check).norm() / ensemble_check.norm())
            rows.append(row)
            print(_line(row), flush=True)
    meta = {"command": " ".join(["examples/bench_hf_lm.py", *sys.argv[1:]]), "code": _commit(),
            "python": sys.version.split()[0], "cpu": cpu_name(), "samples": len(calibration),
            "eval_chunks": {d: len(held[d]) for d in DOMAINS}, "tokens": TOKENS,
            "train": json.loads((args.models / "train.json").read_text())}
    args.results.joinpath("hf_lm.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    args.results.joinpath("hf_lm.md").write_text(table(rows))
    plot(rows, args.results / "hf_lm.png")
    print(table(rows))
    for verdict in targets(rows):
        print(verdict)


def _line(row: dict) -> str:
    return (f"{row['method']:<8} {row.get('budget', ''):>5}: code {row['code']:.3f}  prose {row['prose']:.3f}"
            f"  ({row.get('merge_s', 0)} s)")


def _commit() -> str:
    import subprocess

    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    return out.stdout.strip() or "–"


def table(rows: list[dict]) -> str:
    lines = ["| model | budget | FLOPs ratio | perplexity, code | perplexity, prose | merge s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r.get('budget', 1.0)} | {r.get('relative_flops', r.get('budget', 1.0)):.3f} "
                     f"| {r['code']:.3f} | {r['prose']:.3f} | {r.get('merge_s', '–')} |")
    return "\n".join(lines) + "\n"


def targets(rows: list[dict]) -> list[str]:
    """The benchmark's targets, each said as met or not."""
    ensemble = next(r for r in rows if r["method"].startswith("ensemble"))
    merged = [r for r in rows if r["method"] in VARIANTS]
    out = []
    for r in (r for r in merged if r["budget"] == 2.0):
        out.append(f"{r['method']} at 2.0 vs the ensemble: relative logit difference {r['vs_ensemble']:.1e}")
    behind = [f"{r['method']} at {r['budget']} on {d}" for r in merged if r["method"] in BASELINES and r["budget"] < 2
              for d in DOMAINS
              if r[d] <= next(p[d] for p in merged if p["method"] == "pleas" and p["budget"] == r["budget"])]
    out.append("pleas ahead of every baseline below 2.0: " + ("yes" if not behind else "no: " + ", ".join(behind)))
    for variant in ("pleas", "pleas, 64 positions"):
        at_one = next(r for r in merged if r["method"] == variant and r["budget"] == 1.0)
        out.append(f"{variant} at 1.0 against the ensemble's perplexity (target: within 25%): "
                   + ", ".join(f"{d} {at_one[d] / ensemble[d]:.2f}×" for d in DOMAINS))
    return out


def plot(rows: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, domain in zip(axes, DOMAINS):
        for method in VARIANTS:
            points = [(r["budget"], r[domain]) for r in rows if r["method"] == method]
            ax.plot(*zip(*points), marker="o", label=method)
        for r, style in zip(rows[:3], (":", "-.", "--")):
            ax.axhline(r[domain], color="gray", linestyle=style, label=r["method"])
        ax.set(title=f"held-out {domain}", xlabel="budget (FLOPs ÷ one model's)", ylabel="perplexity (bytes)",
               yscale="log")
    axes[0].legend(fontsize=8)
    fig.suptitle("Two GPT-2s (code, prose) merged: python examples/bench_hf_lm.py merge")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--models", type=Path, default=MODELS, help="where to save A and B")
    m = sub.add_parser("merge")
    m.add_argument("--samples", type=int, default=512, help="calibration chunks, half from each domain")
    m.add_argument("--eval-chunks", type=int, default=512, help="held-out chunks per domain")
    m.add_argument("--threads", type=int, default=2)
    m.add_argument("--models", type=Path, default=MODELS, help="A and B, as train saved them")
    m.add_argument("--results", type=Path, default=RESULTS, help="where hf_lm.{json,md,png} go")
    args = parser.parse_args()
    (train if args.command == "train" else merge)(args)


if __name__ == "__main__":
    main()
