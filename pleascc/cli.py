"""Command line: ``pleascc merge | eval | groups | demo``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import time

from pleascc import __version__, options
from pleascc.outputs import beside, check_writable, check_writable_folder, write_atomically
from pleascc.passes.errors import PleasccError, first_line

EXAMPLES = """examples:
  pleascc demo
  pleascc merge a.pt b.pt --arch torchvision:resnet18 --data calib/ -o merged.onnx
  pleascc merge a.pt b.pt --arch models.py:make_net --arch-kwargs '{"width": 2}' \\
      --data calib.npz --budget 1.5 --labels separate --report report.json -o merged.onnx
  pleascc eval merged.onnx --data test.npz
  pleascc groups a.pt --arch timm:resnet18
"""


MERGE_EXAMPLES = """examples:
  pleascc merge a.pt b.pt --arch torchvision:resnet18 --data calib/ -o merged.onnx
  pleascc merge a.pt b.pt --arch models.py:make_net --data calib.npz --budget 1.5 --labels separate \\
      --report report.json -o merged.onnx
  pleascc merge a.pt b.pt --arch timm:resnet18 --data other_domain/ -o merged.onnx     # PLeaS-free
  pleascc merge a.pt b.pt --arch timm:resnet18 --data calib/ --method zipit --zip-until layer3 -o zipped.onnx
  pleascc merge a.pt b.pt --arch timm:resnet18 --data calib/ --method permute --matching weight -o rebasin.onnx
  pleascc merge a.pt b.pt --arch timm:resnet18 --data calib/ --format pt -o merged.pt
  pleascc merge a.pt b.pt --arch timm:resnet18 --data calib/ --budget 0.5 -o smaller.onnx   # merge and compress
  pleascc merge a.pt --arch timm:resnet18 --data calib/ --budget 0.5 -o compressed.onnx     # one model, compressed
  pleascc merge a.pt b.pt c.pt --arch timm:resnet18 --data calib/ -o merged3.onnx            # three into one
"""


DATA_FORMATS = ("a folder of images (.jpg .jpeg .png .bmp .gif .webp .tif .tiff .ppm .pgm) in one subfolder per "
                "class, or all at its top level (unlabeled); a .npz, .pt or .pth file holding a float array x (N, ...) "
                "of preprocessed inputs (or int64 token ids, N×tokens, as x or input_ids) and optional integer labels y; "
                "a .npy of x alone, read from disk batch by batch; or a text file (.txt, .md) cut into --seq-len "
                "tokens by --tokenizer")
DATA_HELP = {  # command -> what its --data is for, its --seed, and where images' preprocessing comes from
    "merge": ("calibration inputs (labels are not used)", options.help_of("seed"), "the timm model's own, else "),
    "eval": ("test data, labeled for accuracies (y, or the class subfolders; unlabeled: latency only)",
             "seed of the --samples subset", ""),
    "groups": ("example inputs, of which the analysis runs the first two (default: random inputs of "
               "--input-shape)", "seed of the --samples subset", "the timm model's own, else "),
}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written, and every option's default shown, unless its help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if "default" in help or action.required or not action.option_strings or action.default is argparse.SUPPRESS:
            return help
        return f"{help} (default: {options.shown(action.default)})"


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", help="the architecture of state-dict checkpoints: timm:NAME, torchvision:NAME, "
                                  "pkg.module:factory or path/to/file.py:factory (default: none; a state dict "
                                  "needs it, a whole pickled module does not)")
    p.add_argument("--arch-kwargs", default=None, type=_json_dict,
                   help="JSON keyword arguments for the factory, e.g. '{\"num_classes\": 10}' (default: none)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow checkpoints that are whole pickled modules (unpickling runs code)")


def _data_options(p: argparse.ArgumentParser, command: str) -> None:
    """--data and its preprocessing, described for what ``command`` does with the data."""
    purpose, seed, own = DATA_HELP[command]
    p.add_argument("--data", required=command != "groups", help=f"{purpose}: {DATA_FORMATS}")
    p.add_argument("--samples", type=int, default=None,
                   help="read a seeded subset of this many samples (default: all)")
    p.add_argument("--seed", type=int, default=0, help=seed)
    p.add_argument("--image-size", type=int, default=None,
                   help=f"images: resize and center-crop to this size (default: {own}224)")
    p.add_argument("--mean", type=_floats, default=None,
                   help=f"images: per-channel mean, e.g. 0.485,0.456,0.406 (default: {own}ImageNet's)")
    p.add_argument("--std", type=_floats, default=None,
                   help=f"images: per-channel std, e.g. 0.229,0.224,0.225 (default: {own}ImageNet's)")
    p.add_argument("--tokenizer", default=None, help="text: a local tokenizer directory (default: model A's "
                   "directory when it holds one)")
    p.add_argument("--seq-len", type=int, default=128, help="text: tokens per calibration sample")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pleascc", description="Merge two trained models of one architecture with PLeaS and emit ONNX.",
        epilog=EXAMPLES, formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"pleascc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_merge_parser, _eval_parser, _groups_parser, _demo_parser):
        add(sub)
    return parser


def _merge_parser(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("merge", help="merge models into one ONNX file", epilog=MERGE_EXAMPLES,
                       formatter_class=_Formatter)
    m.add_argument("model_a", help="checkpoint of model A (.pt, .pth, .safetensors), or a Hugging Face model "
                                   "directory (config.json and safetensors weights)")
    m.add_argument("others", nargs="*", metavar="MODEL", help="checkpoints of models B, C, … as A, merged with it; "
                   "none: model A alone is compressed (--budget below 1.0: its most similar units merged, refitted)")
    m.add_argument("-o", "--output", required=True,
                   help="where to write the merged model: an ONNX file (.onnx; weights past 1.8 GB go to "
                        "OUTPUT.data beside it), or with --format pt its state dict (.pt) and a torch.export archive "
                        "beside it (same name, .pt2), or with --format hf a Hugging Face model directory")
    m.add_argument("--format", choices=("onnx", "pt", "hf"), default="onnx",
                   help="onnx, pt for work in PyTorch, or hf: save_pretrained's directory, for Hugging Face "
                        "models whose merged widths their config holds (budget 1.0) (see -o)")
    m.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="precision of the written model's weights and input (merging itself is float32; "
                        "bfloat16 with --format pt only)")
    _model_options(m)
    _data_options(m, "merge")
    options.add_arguments(m)
    m.add_argument("--distributed", action="store_true",
                   help="shard the calibration data over the processes torchrun starts (all-reducing the "
                        "statistics with torch.distributed; on by itself under torchrun); rank 0 writes")
    m.add_argument("--report", help="write a JSON report here, and its PNG summary beside it (same name, .png) "
                                    "(default: no report)")
    m.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="accuracy per head and latency of an ONNX model, with ONNX Runtime",
                       epilog="examples:\n  pleascc eval merged.onnx --data test.npz\n"
                              "  pleascc eval merged.onnx --data test_images/ --image-size 32 --head-classes 0-4,5-9",
                       formatter_class=_Formatter)
    e.add_argument("model", help="an ONNX file (as written by 'pleascc merge')")
    _data_options(e, "eval")
    e.add_argument("--head-classes", default=None,
                   help="the labels each output head predicts, e.g. 0-4,5-9 (default: consecutive blocks, "
                        "in output order, as wide as each head)")
    e.add_argument("--batch-size", type=int, default=64,
                   help="samples per ONNX Runtime run, for the accuracies and the second latency figure")
    e.add_argument("--report", help="write the results as JSON here (default: printed only)")


def _groups_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("groups", help="print a model's permutation groups and fixed spaces",
                       epilog="examples:\n  pleascc groups a.pt --arch timm:resnet18\n"
                              "  pleascc groups none --arch timm:vit_tiny_patch16_224 --draw groups.png\n"
                              "  pleascc groups a.pt --arch models.py:make_net --input-shape 3,32,32",
                       formatter_class=_Formatter)
    g.add_argument("model", help="checkpoint, or 'none' to build the --arch model with random weights")
    _model_options(g)
    _data_options(g, "groups")
    g.add_argument("--input-shape", type=_ints, default=None,
                   help="one sample's shape when no --data is given, e.g. 3,32,32 (default: the timm model's own "
                        "input size, else 3,224,224)")
    g.add_argument("--draw", metavar="PNG",
                   help="also draw the groups over the model graph into this PNG (default: no picture)")


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="train two small CNNs on scikit-learn digits, merge them, evaluate the ONNX",
                       epilog="examples:\n  pleascc demo\n  pleascc demo --out /tmp/pleascc-demo",
                       formatter_class=_Formatter)
    d.add_argument("--out", default="pleascc-demo", help="folder for the checkpoints, data and ONNX files")


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err.msg}): {text}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return value


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    terminate = _terminate_as_interrupt()
    try:
        return {"merge": _merge, "eval": _eval, "groups": _groups, "demo": _demo}[args.command](args)
    except PleasccError as err:
        print(f"pleascc: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pleascc: interrupted; no output was written", file=sys.stderr)
        return 130
    finally:
        if terminate is not None:
            signal.signal(signal.SIGTERM, terminate)


def _terminate_as_interrupt():
    """Make SIGTERM (``kill``, a job scheduler's stop) raise KeyboardInterrupt, as Ctrl-C does, so that a
    stopped merge removes its partial output and spill files too; returns the handler it replaced (None
    off the main thread, where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, signal.default_int_handler)


def _load(args, path: str):
    from pleascc.load import load_model

    return load_model(path, args.arch, args.arch_kwargs, args.trust_pickle)


def _calibration(args, model):
    from pleascc.data import load_data
    from pleascc.hf_io import is_model_directory, tokenizer_of

    model_a = getattr(args, "model_a", "")
    tokenizer = args.tokenizer or (tokenizer_of(model_a) if is_model_directory(model_a) else None)
    return load_data(args.data, samples=args.samples, image_size=args.image_size, mean=args.mean, std=args.std,
                     model=model, seed=args.seed, tokenizer=tokenizer, seq_len=args.seq_len)


def _merge(args) -> int:
    start = time.perf_counter()
    choices = options.from_arguments(args)  # checked, with the output paths, before anything heavy is imported
    _check_counts(args, "image_size", "seq_len")
    choices.check_models(1 + len(args.others) if args.others else 2)
    if not args.others and choices.budget > 1.0:
        raise PleasccError(f"one checkpoint is compressed, not widened: pass --budget below 1.0 (not "
                           f"{choices.budget:g}), or a second checkpoint to merge")
    if args.format == "hf":
        _check_hf_output(args, choices.budget)
    for path, option in _merge_outputs(args):
        check_writable(path, option)
    import pleascc
    from pleascc.api import usable_device
    from pleascc.export import output_dtype
    from pleascc.passes import distributed
    from pleascc.passes.rows import model_inputs, read_rows

    dtype = output_dtype(args.dtype, args.format)
    if args.distributed or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        choices = dataclasses.replace(choices, device=distributed.init_from_environment(choices.device))
    usable_device(choices.device)
    model_a = _load(args, args.model_a)
    models = [model_a, *(_load(args, path) for path in args.others)] if args.others else [model_a, model_a]
    data = _calibration(args, model_a)
    result = pleascc.merge(models, data, choices, progress=not args.no_progress)
    if distributed.rank() > 0:  # every rank holds the same merged model; rank 0 writes it
        return 0
    example = model_inputs(read_rows(data.x[: min(len(data.x), 8)]))[0]  # token ids: the padding mask stays out
    exporting = time.perf_counter()
    if args.format == "pt":
        from pleascc.export import export_torch

        check = {"torch": export_torch(result.model, example, args.output, dtype=dtype)}
    elif args.format == "hf":
        from pleascc.hf_io import save_directory

        check = {"hf": save_directory(result.model, model_a, args.output, example)}
    else:
        check = {"onnx": pleascc.export_onnx(result.model, example, args.output, dtype=dtype)}
    result.report["timings_s"]["export"] = time.perf_counter() - exporting
    report = {**result.report, **check, "dtype": args.dtype, "total_time_s": time.perf_counter() - start}
    if args.report:
        from pleascc.plots import draw_report

        _write_json(args.report, report)
        draw_report(report, beside(args.report, ".png"))
    print(summary(report))
    return 0


def _check_hf_output(args, budget: float) -> None:
    """--format hf writes a Hugging Face model at its config's widths, into a directory of its own."""
    if not os.path.isdir(args.model_a):
        raise PleasccError("--format hf writes Hugging Face models: model A is not a model directory; pass "
                           "--format onnx or pt")
    if budget != 1.0:
        raise PleasccError(f"--format hf writes the config's widths, budget 1.0; budget {budget:g} makes "
                           "others: pass --format onnx or pt")
    if os.path.exists(args.output):
        raise PleasccError(f"cannot write {args.output}: it exists; pass a new directory to -o for --format hf")


def _check_counts(args, *names: str) -> None:
    """The command's counts and sizes that ``MergeOptions`` does not check, before anything is loaded."""
    for name in names:
        options.check_positive(name, getattr(args, name))


def _merge_outputs(args) -> list[tuple[str, str]]:
    """Every file a merge writes, with the option that names it."""
    paths = [(args.output, "-o")] + ([(beside(args.output, ".pt2"), "-o")] if args.format == "pt" else [])
    return paths + ([(args.report, "--report"), (beside(args.report, ".png"), "--report")] if args.report else [])


def summary(report: dict) -> str:
    """A short human-readable account of a merge."""
    groups = report["groups"]
    merged = sum(g["merged_pairs"] for g in groups)
    units = sum(len(g["corr"]) for g in groups)
    lines = [
        f"method {report['method']}, budget {report['budget']}: {report['relative_flops']:.3f}x the FLOPs of one "
        f"model, {report['params_merged']:,} parameters (one model: {report['params_a']:,})",
        f"{len(groups)} permutation groups, {merged}/{units} unit pairs merged; "
        f"coverage {report['coverage']:.1%} of parameters; labels {'separate' if report['separate'] else 'shared'}"
        + ("; BatchNorm statistics recomputed on the data" if report["reset_bn"] else ""),
    ]
    if report.get("least_squares"):
        lines.append(f"least squares: {report['least_squares']}, {report['least_squares_passes']} pass(es) over the "
                     f"data, {report['timings_s']['solve']:.1f} s; activations kept: at most "
                     f"{report['least_squares_memory_peak_mb']:.0f} MB in memory and "
                     f"{report['least_squares_disk_peak_mb']:.0f} MB on disk")
    if report["underdetermined_layers"]:
        lines.append("fewer observations than unknowns (the fit keeps the warm start outside the data's span): "
                     + ", ".join(report["underdetermined_layers"][:5]))
    if report["unsupported"]:
        lines.append(f"ops without a rule (their spaces stay fixed): {'; '.join(report['unsupported'][:5])}")
    if "onnx" in report:
        onnx = report["onnx"]
        lines.append(f"wrote {onnx['path']} (outputs {', '.join(onnx['outputs'])}); ONNX Runtime vs torch: "
                     f"max abs diff {onnx['max_abs_diff']:.2e}"
                     + (f"; weights in {onnx['external_data']}" if onnx.get("external_data") else ""))
    if "torch" in report:
        saved = report["torch"]
        lines.append(f"wrote {saved['path']} (state dict) and {saved['archive']} (torch.export archive; reloaded vs "
                     f"merged: max abs diff {saved['max_abs_diff']:.2e})")
    if "hf" in report:
        saved = report["hf"]
        lines.append(f"wrote {saved['path']} ({saved['class']}, save_pretrained; from_pretrained vs merged: max abs "
                     f"diff {saved['max_abs_diff']:.2e})")
    return "\n".join(lines)


def _write_json(path: str, value: dict) -> None:
    def dump(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(value, f, indent=1)

    write_atomically(path, dump)


def _eval(args) -> int:
    _check_counts(args, "samples", "image_size", "batch_size", "seq_len")
    if args.report:
        check_writable(args.report, "--report")
    from pleascc.evaluate import evaluate_onnx, parse_head_classes

    parse_head_classes(args.head_classes)
    data = _calibration(args, None)
    report = evaluate_onnx(args.model, data.x, data.y, args.head_classes, args.batch_size)
    if args.report:
        _write_json(args.report, report)
    scores = {k: v for k, v in report.items() if k in ("accuracy", "per_head_mean", "joint") or k.startswith("head_")}
    print(f"{args.model}: {report['samples']} samples, outputs {', '.join(report['outputs'])}")
    print("  " + (", ".join(f"{k} {v:.4f}" for k, v in scores.items() if v is not None) or "no labels in the data: "
                  "latency only"))
    print("  latency: " + ", ".join(f"{k[:-3].replace('_', ' ')} {v:.2f} ms" for k, v in report.items()
                                    if k.endswith("_ms")))
    return 0


def _groups(args) -> int:
    if args.model == "none" and not args.arch:
        raise PleasccError("'pleascc groups none' needs --arch to build the model")
    _check_counts(args, "samples", "image_size", "input_shape")
    if args.draw:
        check_writable(args.draw, "--draw")
    import torch

    from pleascc.passes.groups import analyze, coverage, permutation_groups
    from pleascc.passes.rows import model_inputs, read_rows
    from pleascc.trace import trace

    if args.model == "none":
        from pleascc.load import build_arch

        model = build_arch(args.arch, args.arch_kwargs).eval()
    else:
        model = _load(args, args.model)
    if args.data:
        example = model_inputs(read_rows(_calibration(args, model).x[:2]))[0]
    else:
        example = torch.randn(2, *(args.input_shape or _default_input_shape(model)))
    _check_fits(model, example, "check --data" if args.data else "pass --input-shape (e.g. 3,224,224) or --data")
    gm = trace(model)
    analysis = analyze(gm, (example,))
    print(format_groups(analysis, permutation_groups(analysis), coverage(analysis, model)))
    if args.draw:
        from pleascc.plots import draw_groups

        draw_groups(gm, analysis, args.draw)
        print(f"drew the groups into {args.draw}")
    return 0


def _check_fits(model, example, fix: str) -> None:
    """Run the model once, so inputs of the wrong shape fail in one line rather than inside the analysis."""
    import torch

    try:
        with torch.no_grad():
            model(example)
    except Exception as err:
        first = first_line(err)
        raise PleasccError(f"inputs of shape {tuple(example.shape[1:])} do not fit the model ({first}): "
                           f"{fix}") from None


def _default_input_shape(model) -> tuple[int, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))


def format_groups(analysis, groups, covered: float) -> str:
    free = [g for g in groups if g.fixed is None]
    fixed = [g for g in groups if g.fixed is not None]
    lines = [f"{len(free)} permutation groups; {covered:.1%} of parameters in permutable groups", ""]
    lines.append(f"{'group':>6} {'size':>6}  {'structure':<16} producers -> consumers")
    for g in free:
        structure = ",".join(sorted(g.structure))
        lines.append(f"{g.root:>6} {g.size:>6}  {structure:<16} {_short(g.producers)} -> {_short(g.consumers)}")
    reasons: dict[str, int] = {}
    for g in fixed:
        reasons[g.fixed] = reasons.get(g.fixed, 0) + 1
    lines += ["", f"{len(fixed)} fixed spaces (never permuted):"]
    lines += [f"  {count:>4} x {reason}" for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1])]
    if analysis.unsupported:
        lines += ["", "ops with no rule:"] + [f"  {u}" for u in analysis.unsupported]
    return "\n".join(lines)


def _short(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … (+{len(names) - limit})" if len(names) > limit else "") if names else "-"


def _demo(args) -> int:
    check_writable_folder(args.out, "--out")
    from pleascc.demo import run_demo

    run_demo(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
