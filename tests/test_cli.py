"""The command line end to end: successful merges, and every bad input as exit 2 with one line and no output."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torchvision

import pleascc
import pleascc.least_squares
from conftest import ARCH, cli_error, merge_args, save_npz
from pleascc.cli import main
from pleascc.demo import digits_cnn
from pleascc.export import onnx_predict

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- success


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"pleascc {pleascc.__version__}"


def test_the_command_line_the_api_and_the_docs_derive_from_one_options_class():
    """``MergeOptions`` is the one source: the command line's flags and defaults, ``pleascc.merge``'s keywords
    (an unknown one is an error) and docs/merge.md's table."""
    import dataclasses
    from pathlib import Path

    from pleascc.cli import _parser
    from pleascc.options import MergeOptions, flag, from_arguments, markdown_table
    from pleascc.passes.budget import WIDTHS

    args = _parser().parse_args(["merge", "a.pt", "b.pt", "-o", "m.onnx", "--data", "d"])
    assert from_arguments(args) == MergeOptions()
    flagged = _parser().parse_args(["merge", "a.pt", "b.pt", "-o", "m.onnx", "--data", "d", "--widths", "stages",
                                    "--positions", "0", "--budget", "1.5", "--reset-bn", "--method", "zipit"])
    assert from_arguments(flagged) == MergeOptions(width_search="stages", positions=None, budget=1.5, reset_bn=True,
                                                   method="zipit")
    kept = _parser().parse_args(["merge", "a.pt", "b.pt", "-o", "m.onnx", "--data", "d", "--no-reset-bn"])
    assert from_arguments(kept) == MergeOptions(reset_bn=False)
    assert [f.name for f in dataclasses.fields(MergeOptions) if flag(f) is None] == [
        "ridge", "samples", "seed", "progress"]  # the API's only, or flags shared with other commands
    with pytest.raises(TypeError):
        pleascc.merge(None, None, None, budgets=1.5)
    page = (Path(__file__).parents[1] / "docs" / "merge.md").read_text()
    assert markdown_table() in page, "docs/merge.md: paste pleascc.options.markdown_table() over its table"
    assert tuple(WIDTHS) == pleascc.options.WIDTH_SEARCHES


def test_merge_pleas_writes_onnx_and_report(files, tmp_path, capsys):
    import onnxruntime as ort

    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    argv = merge_args(files, out, "--labels", "separate", "--budget", "1.5", "--report", str(report))
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "least squares: sequential" in printed
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.load(files["calib"])["x"][:3]
    outputs = session.run(None, {session.get_inputs()[0].name: x})
    assert [o.shape for o in outputs] == [(3, 5), (3, 5)]
    r = json.loads(report.read_text())
    assert {"relative_flops", "groups", "onnx", "timings_s", "least_squares_residuals"} <= set(r)
    assert 1.0 <= r["relative_flops"] <= 1.5 + 1e-9
    assert r["least_squares_residuals"] and r["groups"]
    assert r["least_squares"] == "sequential" and r["least_squares_passes"] > 1
    phases = {"matching_statistics", "least_squares_statistics", "solves", "emit", "export"}
    assert phases <= set(r["timings_s"]) and all(r["timings_s"][p] > 0 for p in phases)
    assert r["least_squares_memory_peak_mb"] > 0 and r["least_squares_disk_peak_mb"] == 0  # a small model: memory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "r.json", "r.png"]  # no temporary files left
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # widths, correlations, residuals


@pytest.mark.parametrize("options", [("--method", "permute"), ("--method", "average"), ("--least-squares", "one-pass"),
                                     ("--method", "zipit", "--reset-bn"), ("--method", "regmean"),
                                     ("--method", "permute", "--matching", "weight"),
                                     ("--budget", "1.5", "--widths", "uniform"),
                                     ("--budget", "1.5", "--widths", "stages")])
def test_merge_other_methods(files, tmp_path, options):
    out = tmp_path / "out.onnx"
    assert main(merge_args(files, out, *options, "--labels", "separate")) == 0
    assert out.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]


def test_an_underdetermined_classifier_is_reported_not_refused(files, tmp_path, capsys):
    """Fewer samples than the classifier's unknowns: its fit is the smallest change from the warm start."""
    out = tmp_path / "out.onnx"
    assert main(merge_args(files, out, "--report", str(tmp_path / "report.json"), data="ten")) == 0
    assert "fewer observations than unknowns" in capsys.readouterr().out
    assert json.loads((tmp_path / "report.json").read_text())["underdetermined_layers"] == ["_10"]


def test_groups_of_checkpoint(files, capsys, tmp_path):
    assert main(["groups", files["a"], *ARCH, "--input-shape", "1,8,8", "--draw", str(tmp_path / "g.png")]) == 0
    assert "4 permutation groups" in capsys.readouterr().out
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG" and [p.name for p in tmp_path.iterdir()] == ["g.png"]
    for data in ("calib", "calib_npy"):
        assert main(["groups", files["a"], *ARCH, "--data", files[data]]) == 0
        assert "4 permutation groups" in capsys.readouterr().out


def test_the_groups_picture_reads_top_to_bottom_at_normal_size(tmp_path):
    """A chain with residuals stays in one line; a deep graph wraps into columns, side branches beside it; the
    PNG is a page, not a strip, and ink covers it rather than a corner of it."""
    import matplotlib.image

    from pleascc.passes.groups import analyze
    from pleascc.plots import ROWS_PER_COLUMN, drawn_nodes, layout
    from pleascc.trace import trace

    gm = trace(digits_cnn(5, width=8))
    chain = layout(drawn_nodes(gm, analyze(gm, (torch.randn(2, 1, 8, 8),))))
    assert {x for x, _ in chain.pos.values()} == {0} and chain.rows == len(chain.pos)
    resnet = trace(torchvision.models.resnet18())
    wrapped = layout(drawn_nodes(resnet, analyze(resnet, (torch.randn(2, 3, 32, 32),))))
    assert set(wrapped.column.values()) == {0, 1} and wrapped.rows <= ROWS_PER_COLUMN and wrapped.width == 4
    path = tmp_path / "g.png"
    assert main(["groups", "none", "--arch", "torchvision:resnet18", "--input-shape", "3,32,32", "--draw",
                 str(path)]) == 0
    image = matplotlib.image.imread(path)[..., :3]
    height, width = image.shape[:2]
    assert 600 < width < 2000 and 600 < height < 1400
    inked = (image < 0.9).any(axis=2)
    assert all(part.any(axis=0).mean() > 0.2 for part in np.array_split(inked, 3))  # thirds from top to bottom


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("device", ["cuda", "gpu"])
def test_unusable_device_is_a_one_line_error(files, tmp_path, capsys, device):
    err = cli_error(capsys, merge_args(files, tmp_path / "out.onnx", "--device", device))
    assert f"device '{device}' is not usable" in err and "--device cpu" in err
    assert list(tmp_path.iterdir()) == []


def test_merge_reads_npy_data_from_disk_batch_by_batch(files, tmp_path):
    """A .npy stays on disk (memory flat in samples) and gives the same merge as the same samples in a .npz."""
    import onnxruntime as ort

    outputs = []
    for data in ("calib", "calib_npy"):
        out = tmp_path / f"{data}.onnx"
        assert main(merge_args(files, out, "--budget", "1.5", "--batch-size", "16", data=data)) == 0
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {session.get_inputs()[0].name: np.load(files["calib_npy"])[:4]}))
    for want, got in zip(*outputs):
        assert np.abs(want - got).max() <= 1e-5 * np.abs(want).max()


def test_groups_of_architecture_alone(capsys):
    assert main(["groups", "none", "--arch", "torchvision:resnet18", "--input-shape", "3,64,64"]) == 0
    assert capsys.readouterr().out.startswith("12 permutation groups")


# ---------------------------------------------------------------------------- bad input: exit 2, one line, no file

BAD_INPUTS = {
    # name: (merge arguments, words the message must contain)
    "missing_checkpoint": (dict(a="missing"), ["missing.pt", "not found"]),
    "not_a_checkpoint": (dict(a="junk"), ["junk.pt", "not a PyTorch checkpoint"]),
    "pickled_module": (dict(a="whole", arch=[]), ["whole.pt", "--trust-pickle"]),
    "other_width": (dict(b="b16"), ["b16.pt", "0.weight", "(16, 1, 3, 3)"]),
    "other_factory": (dict(a="whole", b="whole_other", arch=["--trust-pickle"]), ["differ", "1.weight"]),
    "module_not_importable": (dict(arch=["--arch", "no_such_module_xyz:make"]), ["no_such_module_xyz"]),
    "factory_missing": (dict(arch=["--arch", "{untraceable}:no_such_factory"]), ["no_such_factory"]),
    "untraceable": (dict(arch=["--arch", "{untraceable}:make"]), ["cannot trace", "untraceable.py:7", "x.sum()"]),
    "wrong_data_shape": (dict(data="three_channels"), ["(300, 3, 8, 8)", "does not fit"]),
    "too_few_samples": (dict(data="few"), ["6 samples", "needs at least 10", "_7_conv1"]),
    "nan_data": (dict(data="nan_data"), ["nan_data.npz", "NaN"]),
    "nan_data_on_disk": (dict(data="nan_npy"), ["nan_npy.npy", "NaN"]),
    "nan_weight": (dict(a="nan_weight"), ["model A", "NaN"]),
    "data_without_x": (dict(data="no_x"), ["no_x.npz", "no 'x'", "inputs"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(files, tmp_path, capsys, case):
    kwargs, words = BAD_INPUTS[case]
    files = {**files, "missing": str(tmp_path / "missing.pt")}
    if "arch" in kwargs:
        kwargs = {**kwargs, "arch": [a.format(**files) for a in kwargs["arch"]]}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    err = cli_error(capsys, merge_args(files, out_dir / "out.onnx", "--report", str(out_dir / "r.json"), **kwargs))
    for word in words:
        assert word in err, err
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("output", ["/nonexistent_dir/out.onnx", "{a_file}/out.onnx"])
def test_unwritable_output(files, capsys, output):
    output = output.format(**files)
    err = cli_error(capsys, merge_args(files, output))
    assert output in err
    assert not os.path.exists(output)


def test_a_spill_directory_that_cannot_be_written_is_refused_up_front(files, tmp_path, capsys):
    """Sequential least squares that must spill (no memory for it) into a folder that is not one: one line
    naming the folder and the options that fix it, exit 2, no output file."""
    out = tmp_path / "out.onnx"
    err = cli_error(capsys, merge_args(files, out, "--cache-gb", "0", "--work-dir", files["a"]))
    assert files["a"] in err and "--work-dir" in err and "--cache-gb" in err
    assert not out.exists()


def test_read_only_output_folder(files, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root ignores folder permissions (test_unwritable_output covers a path under a file)")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        err = cli_error(capsys, merge_args(files, folder / "out.onnx"))
        assert "permission denied" in err
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize("which", ["output", "report"])
def test_output_is_a_folder(files, tmp_path, capsys, which):
    folder = tmp_path / "taken"
    folder.mkdir()
    out = folder if which == "output" else tmp_path / "out.onnx"
    extra = ["--report", str(folder)] if which == "report" else []
    err = cli_error(capsys, merge_args(files, out, *extra))
    assert "is a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"] and list(folder.iterdir()) == []


def test_groups_with_input_of_wrong_shape(files, capsys):
    err = cli_error(capsys, ["groups", files["a"], *ARCH])  # default input shape 3,224,224
    assert "(3, 224, 224)" in err and "--input-shape" in err


# ---------------------------------------------------------------------------- exit codes of the real process


def _run(*code_or_args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *code_or_args], capture_output=True, text=True, env=env, timeout=120)


def test_process_exit_code_on_bad_input(files, tmp_path):
    out = tmp_path / "out.onnx"
    proc = _run("-m", "pleascc", *merge_args(files, out, a="junk"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("pleascc: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_interrupt(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pleascc.least_squares, "layer_moments", _interrupt)
    out = tmp_path / "out.onnx"
    assert main(merge_args(files, out, "--report", str(tmp_path / "r.json"))) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_terminated_merge_leaves_no_output_and_no_spill_files(files, tmp_path):
    """SIGTERM mid-merge (``kill``) cleans up as Ctrl-C does: exit 130, no output, the spill directory gone."""
    out, work = tmp_path / "out.onnx", tmp_path / "work"
    work.mkdir()
    code = textwrap.dedent(f"""
        import os, signal, sys, time
        import pleascc.least_squares
        from pleascc.cli import main

        def terminate(*args, **kwargs):
            assert any(os.scandir({str(work)!r}))  # the matching pass has spilled by now
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)

        pleascc.least_squares.layer_moments = terminate
        sys.exit(main({merge_args(files, out, "--cache-gb", "0", "--work-dir", str(work))!r}))
    """)
    proc = _run("-c", code)
    assert proc.returncode == 130, proc.stderr
    assert "interrupted" in proc.stderr and proc.stderr.count("\n") == 1
    assert list(work.iterdir()) == [] and not out.exists()


def test_process_exit_code_on_interrupt(files, tmp_path):
    out = tmp_path / "out.onnx"
    code = textwrap.dedent(f"""
        import sys
        import pleascc.least_squares
        from pleascc.cli import main

        def interrupt(*args, **kwargs):
            raise KeyboardInterrupt

        pleascc.least_squares.layer_moments = interrupt
        sys.exit(main({merge_args(files, out)!r}))
    """)
    proc = _run("-c", code)
    assert proc.returncode == 130, proc.stderr
    assert "interrupted" in proc.stderr and proc.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_eval_reports_accuracy_per_head_and_latency(files, tmp_path, capsys):
    """The merged model with separate heads: head 0 on labels 0-4, head 1 on 5-9, and the joint argmax."""
    out = tmp_path / "out.onnx"
    assert main(merge_args(files, out, "--labels", "separate", "--method", "permute")) == 0
    x = np.load(files["calib"])["x"][:40]
    labeled = save_npz(tmp_path / "test.npz", x=x, y=np.arange(40) % 10)
    report = tmp_path / "eval.json"
    assert main(["eval", str(out), "--data", labeled, "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(report.read_text())
    assert {"head_0", "head_1", "per_head_mean", "joint", "batch_1_ms"} <= result.keys()
    assert "joint" in printed and "latency" in printed
    logits_0, logits_1 = onnx_predict(str(out), torch.from_numpy(x))
    y = np.arange(40) % 10
    assert result["head_0"] == pytest.approx(float((logits_0[y < 5].argmax(1) == y[y < 5]).mean()))
    assert result["head_1"] == pytest.approx(float((logits_1[y >= 5].argmax(1) + 5 == y[y >= 5]).mean()))


@pytest.mark.parametrize("case", ["missing", "not_onnx", "bad_ranges", "wrong_shape"])
def test_eval_bad_inputs_are_one_line_errors(files, tmp_path, capsys, case):
    out = tmp_path / "out.onnx"
    if case != "missing":
        assert main(merge_args(files, out, "--method", "average")) == 0
    args = {"missing": ["eval", str(tmp_path / "none.onnx"), "--data", files["calib"]],
            "not_onnx": ["eval", files["a"], "--data", files["calib"]],
            "bad_ranges": ["eval", str(out), "--data", files["calib"], "--head-classes", "0-9,x"],
            "wrong_shape": ["eval", str(out), "--data", files["three_channels"]]}[case]
    message = cli_error(capsys, args)
    assert {"missing": "not found", "not_onnx": "not an ONNX model", "bad_ranges": "--head-classes",
            "wrong_shape": "does not fit"}[case] in message


def test_same_inputs_and_seed_give_a_byte_identical_onnx_file(files, tmp_path):
    """Two merges in fresh processes (a subset of the data, partial budget, least squares): the same bytes."""
    outputs = []
    for k in range(2):
        out = tmp_path / f"m{k}.onnx"
        argv = merge_args(files, out, "--budget", "1.5", "--labels", "separate", "--samples", "200", "--seed", "3")
        subprocess.run([sys.executable, "-m", "pleascc", *argv], check=True, capture_output=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


def test_format_pt_writes_a_state_dict_and_a_torch_export_archive(files, tmp_path):
    out = tmp_path / "merged.pt"
    assert main(merge_args(files, out, "--format", "pt", "--labels", "separate", "--budget", "1.5")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.pt", "merged.pt2"]
    program = torch.export.load(str(tmp_path / "merged.pt2")).module()
    x = torch.from_numpy(np.load(files["calib"])["x"][:5])
    logits_a, logits_b = program(x)  # any batch size
    assert logits_a.shape == (5, 5) and logits_b.shape == (5, 5)
    state = torch.load(out, weights_only=True)
    assert sum(t.numel() for t in state.values()) > sum(t.numel() for t in torch.load(files["a"]).values())


def test_half_precision_outputs_stay_close_to_the_float32_merge(files, tmp_path, capsys):
    """float16 ONNX (input and weights) and a bfloat16 state dict; bfloat16 ONNX is refused before merging."""
    x = torch.from_numpy(np.load(files["calib"])["x"][:40])
    full, half = tmp_path / "full.onnx", tmp_path / "half.onnx"
    assert main(merge_args(files, full, "--method", "permute")) == 0
    assert main(merge_args(files, half, "--method", "permute", "--dtype", "float16")) == 0
    want, got = onnx_predict(str(full), x)[0], onnx_predict(str(half), x)[0]
    assert got.dtype == np.float16 and np.abs(got - want).max() < 3e-2 * np.abs(want).max()
    assert main(["eval", str(half), "--data", files["calib"]]) == 0  # eval feeds float16 to it
    out = tmp_path / "m.pt"
    assert main(merge_args(files, out, "--method", "permute", "--dtype", "bfloat16", "--format", "pt")) == 0
    assert {t.dtype for t in torch.load(out, weights_only=True).values() if t.is_floating_point()} == {torch.bfloat16}
    capsys.readouterr()
    assert "bfloat16" in cli_error(capsys, merge_args(files, tmp_path / "b.onnx", "--dtype", "bfloat16"))
    assert not (tmp_path / "b.onnx").exists()


def test_large_weights_go_to_an_external_data_file(tmp_path):
    """Past protobuf's 2 GB the weights must live beside the graph; forced here on a small model."""
    model = digits_cnn(5, width=8).eval()
    x = torch.randn(4, 1, 8, 8)
    check = pleascc.export_onnx(model, x, str(tmp_path / "m.onnx"), external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert check["external_data"] == str(tmp_path / "m.onnx.data")
    with torch.no_grad():
        assert np.allclose(onnx_predict(str(tmp_path / "m.onnx"), x)[0], model(x).numpy(), atol=1e-5)
