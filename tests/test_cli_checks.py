"""What a new user hits first: outputs that cannot be written and bad options, refused before any heavy work
(one line, exit 2, no file); help that shows every default; files written under the user's umask."""

import argparse
import os
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import pleascc.api
import pleascc.data
import pleascc.demo
import pleascc.load
from conftest import ARCH, cli_error, merge_args, save_npz
from pleascc.cli import _Formatter, _parser, main

pytestmark = pytest.mark.usefixtures("one_thread")

UNWRITABLE = ["/proc/x", "/sys/x", "{tmp}/no_such_folder/x", "{a_file}/x"]  # no new files, even for root
OUTPUTS = [(command, path) for command in ("merge -o", "merge --report", "eval --report", "groups --draw", "demo --out")
           for path in UNWRITABLE if not (command == "demo --out" and "no_such_folder" in path)]  # demo makes it


def _fail(*args, **kwargs):
    raise AssertionError("heavy work started before the check")


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Loading a model or data, and the matching pass, fail the test: a check must come before them."""
    for module, name in ((pleascc.load, "load_model"), (pleascc.load, "build_arch"), (pleascc.data, "load_data"),
                         (pleascc.demo, "run_demo"), (pleascc.api, "feature_moments")):
        monkeypatch.setattr(module, name, _fail)


@pytest.mark.parametrize("command, path", OUTPUTS)
def test_an_output_that_cannot_be_written_is_refused_before_any_work(files, tmp_path, capsys, no_heavy_work,
                                                                      command, path):
    """/proc and /sys (which take no new files, even from root), a missing folder, a folder that is a file: one
    line naming the path and the option to change, exit 2, and nothing written anywhere."""
    target = path.format(tmp=tmp_path, a_file=files["a_file"])
    good = tmp_path / "out.onnx"
    argv = {"merge -o": merge_args(files, target + ".onnx"),
            "merge --report": merge_args(files, good, "--report", target + ".json"),
            "eval --report": ["eval", str(good), "--data", files["calib"], "--report", target + ".json"],
            "groups --draw": ["groups", files["a"], *ARCH, "--draw", target + ".png"],
            "demo --out": ["demo", "--out", target]}[command]
    err = cli_error(capsys, argv)
    assert target in err and f"choose another {command.split()[1]}" in err, err
    assert list(tmp_path.iterdir()) == [] and not os.path.exists(target)


@pytest.mark.parametrize("argv, words", [
    (["--budget", "5"], ["budget 5 is above 2.0", "two models side by side are 2.0"]),
    (["--samples", "0"], ["samples 0", "--samples 1 or more"]),
    (["--image-size", "0"], ["image size 0", "--image-size"]),
    (["--method", "pleas", "--reset-bn"], ["drop --reset-bn"]),
    (["--method", "zipit", "--matching", "weight"], ["weight matching"]),
    (["--dtype", "bfloat16"], ["bfloat16", "--format pt"]),
    (["--device", "gpu"], ["device 'gpu' is not usable", "--device cpu"]),
])
def test_merge_options_are_checked_before_any_model_or_data_loads(files, tmp_path, capsys, no_heavy_work, argv,
                                                                 words):
    err = cli_error(capsys, merge_args(files, tmp_path / "out.onnx", *argv))
    assert all(word in err for word in words), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, words", [
    (["eval", "m.onnx", "--data", "d.npz", "--batch-size", "0"], ["batch size 0"]),
    (["eval", "m.onnx", "--data", "d.npz", "--head-classes", "0-4,x"], ["--head-classes", "0-4,5-9"]),
    (["groups", "a.pt", "--input-shape", "0,8,8"], ["input shape 0,8,8", "--input-shape"]),
    (["groups", "none"], ["needs --arch"]),
])
def test_other_commands_check_their_options_before_loading(capsys, no_heavy_work, argv, words):
    err = cli_error(capsys, argv)
    assert all(word in err for word in words), err


def test_bad_options_and_outputs_answer_before_torch_is_imported(files, tmp_path):
    """The usual first mistakes answer at once: importing torch alone takes seconds."""
    code = textwrap.dedent(f"""
        import sys
        from pleascc.cli import main
        for argv in ({merge_args(files, tmp_path / "out.onnx", "--budget", "5")!r},
                     {merge_args(files, "/proc/x.onnx")!r},
                     {merge_args(files, tmp_path / "out.onnx", "--report", "/sys/r.json")!r}):
            assert main(argv) == 2
        assert "torch" not in sys.modules, "torch was imported"
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("pleascc: error: ") == 3 and list(tmp_path.iterdir()) == []


def test_too_few_samples_for_least_squares_is_refused_before_the_matching_pass(files, tmp_path, capsys,
                                                                              monkeypatch):
    monkeypatch.setattr(pleascc.api, "feature_moments", _fail)
    err = cli_error(capsys, merge_args(files, tmp_path / "out.onnx", data="few"))
    assert "6 samples" in err and "needs at least 10" in err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- help


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    return next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("command", ["merge", "eval", "groups", "demo"])
def test_help_shows_every_default(command):
    formatter = _Formatter(f"pleascc {command}")
    for action in _subcommands()[command]._actions:
        if action.option_strings and not action.required and action.default is not argparse.SUPPRESS:
            shown = formatter._get_help_string(action)
            assert "default" in shown and "default: None" not in shown and "default: —" not in shown, shown


def test_help_describes_each_commands_own_data_and_every_format_it_reads():
    helps = {name: {a.dest: a.help for a in parser._actions} for name, parser in _subcommands().items()}
    formats = pleascc.data.IMAGE_EXTENSIONS + pleascc.data.TENSOR_EXTENSIONS + pleascc.data.STREAMED_EXTENSIONS
    for command in ("merge", "eval", "groups"):
        assert all(ext in helps[command]["data"] for ext in formats), command
    assert "calibration" in helps["merge"]["data"] and "weight matching" in helps["merge"]["seed"]
    for command in ("eval", "groups"):
        assert "calibration" not in helps[command]["data"] and "weight matching" not in helps[command]["seed"]
    assert "--format pt" in helps["merge"]["output"] and ".pt2" in helps["merge"]["output"]


# ---------------------------------------------------------------------------- file modes


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_reports_and_pictures_are_written_under_the_umask(files, tmp_path, umask_022):
    """Like the ONNX file, the report, its PNG, eval's report and the groups picture are 0644 under umask 022."""
    out = tmp_path / "out.onnx"
    assert main(merge_args(files, out, "--method", "average", "--report", str(tmp_path / "r.json"))) == 0
    labeled = save_npz(tmp_path / "test.npz", x=np.load(files["calib"])["x"][:20], y=np.arange(20) % 5)
    assert main(["eval", str(out), "--data", labeled, "--report", str(tmp_path / "e.json")]) == 0
    assert main(["groups", files["a"], *ARCH, "--input-shape", "1,8,8", "--draw", str(tmp_path / "g.png")]) == 0
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["out.onnx", "r.json", "r.png", "test.npz", "e.json", "g.png"], 0o644)
