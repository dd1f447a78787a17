"""Loading checkpoints and architecture specs: every success path and every user error."""

import os
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import raises

from pleascc.load import build_arch, check_same_architecture, load_checkpoint, load_model

SPEC_MODULE = "tiny_arch_for_pleascc_tests"


class Tiny(nn.Sequential):
    def __init__(self, width: int = 4, num_classes: int = 3):
        super().__init__(
            nn.Conv2d(3, width, 3),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, num_classes),
        )




@pytest.fixture
def arch_file(tmp_path):
    path = tmp_path / "arch.py"
    path.write_text(textwrap.dedent("""
        from torch import nn

        def make(width=4, num_classes=3):
            return nn.Sequential(
                nn.Conv2d(3, width, 3), nn.BatchNorm2d(width), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
            )

        def broken():
            raise ValueError("width must be even")

        def not_a_model():
            return 42

        NOT_CALLABLE = 3
    """))
    return str(path)


@pytest.fixture
def arch_module(tmp_path, monkeypatch, arch_file):
    """The same file, importable as a package module for the pkg.module:factory form."""
    pkg = tmp_path / "pkgroot" / SPEC_MODULE
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(open(arch_file).read())
    monkeypatch.syspath_prepend(str(tmp_path / "pkgroot"))
    return f"{SPEC_MODULE}.models"


@pytest.fixture
def trained():
    torch.manual_seed(0)
    model = Tiny()
    model.train()(torch.randn(4, 3, 8, 8))  # give BatchNorm non-default running stats
    return model.eval()


def save(tmp_path, obj, name="a.pt") -> str:
    path = str(tmp_path / name)
    torch.save(obj, path)
    return path


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k].float(), sb[k].float()), k


# ---------------------------------------------------------------------------- build_arch


def test_build_torchvision():
    model = build_arch("torchvision:resnet18", {"num_classes": 10})
    assert model.fc.out_features == 10


def test_build_timm():
    model = build_arch("timm:test_resnet", {"num_classes": 5})
    assert model.get_classifier().out_features == 5


def test_build_module_factory(arch_module):
    model = build_arch(f"{arch_module}:make", {"width": 6})
    assert model[0].out_channels == 6


def test_build_file_factory(arch_file):
    model = build_arch(f"{arch_file}:make", {"num_classes": 7})
    assert model[-1].out_features == 7


@pytest.mark.parametrize(
    "spec, match",
    [
        ("resnet18", "not a known form"),
        ("torchvision:resnet1800", "torchvision has no model 'resnet1800'"),
        ("timm:resnet1800", "timm has no model 'resnet1800'"),
        ("no_such_pkg_for_pleascc.models:make", "cannot import module 'no_such_pkg_for_pleascc.models'"),
        ("missing/arch.py:make", "not found"),
    ],
)
def test_build_bad_spec(spec, match):
    raises(match, build_arch, spec)


def test_build_unknown_name_suggests_close_match():
    assert "resnet18" in raises("did you mean", build_arch, "torchvision:resnet19")


def test_build_file_factory_errors(arch_file):
    raises("has no 'nope'", build_arch, f"{arch_file}:nope")
    raises("not callable", build_arch, f"{arch_file}:NOT_CALLABLE")
    raises("width must be even", build_arch, f"{arch_file}:broken")
    raises("returned int, not a torch.nn.Module", build_arch, f"{arch_file}:not_a_model")
    raises("unexpected keyword", build_arch, f"{arch_file}:make", {"depth": 3})


def test_build_module_factory_missing(arch_module):
    raises("has no 'nope'", build_arch, f"{arch_module}:nope")


def test_build_file_that_fails_to_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import no_such_pkg_for_pleascc\n")
    raises("no_such_pkg_for_pleascc", build_arch, f"{bad}:make")


# ---------------------------------------------------------------------------- load_checkpoint


def test_checkpoint_state_dict(tmp_path, trained):
    state = load_checkpoint(save(tmp_path, trained.state_dict()))
    assert list(state) == list(trained.state_dict())


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict", "state_dict_ema"])
def test_checkpoint_nested(tmp_path, trained, key):
    path = save(tmp_path, {"epoch": 3, "optimizer": {"lr": 0.1}, key: trained.state_dict()})
    assert list(load_checkpoint(path)) == list(trained.state_dict())


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_checkpoint_strips_wrapper_prefixes(tmp_path, trained, prefix):
    wrapped = {prefix + k: v for k, v in trained.state_dict().items()}
    assert list(load_checkpoint(save(tmp_path, wrapped))) == list(trained.state_dict())


def test_checkpoint_safetensors(tmp_path, trained):
    path = str(tmp_path / "a.safetensors")
    save_file(trained.state_dict(), path)
    assert sorted(load_checkpoint(path)) == sorted(trained.state_dict())  # safetensors sorts keys


def test_checkpoint_missing(tmp_path):
    raises("not found", load_checkpoint, str(tmp_path / "nope.pt"))


def test_checkpoint_directory(tmp_path):
    raises("is a directory", load_checkpoint, str(tmp_path))


@pytest.mark.parametrize(
    "content, reason",
    [
        (os.urandom(512), "unrecognized binary data"),
        (b"epoch 3, loss 0.1\n", "text file"),
        (b"", "empty"),
    ],
)
def test_checkpoint_unreadable(tmp_path, content, reason):
    path = tmp_path / "a.pt"
    path.write_bytes(content)
    msg = raises("is not a PyTorch checkpoint", load_checkpoint, str(path))
    assert reason in msg and "torch.save" in msg


def test_checkpoint_truncated_zip(tmp_path, trained):
    path = save(tmp_path, trained.state_dict())
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    raises("is not a PyTorch checkpoint (truncated", load_checkpoint, path)


def test_checkpoint_bad_safetensors(tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(os.urandom(64))
    raises("is not a PyTorch checkpoint", load_checkpoint, str(path))


def test_checkpoint_without_tensors(tmp_path):
    msg = raises("without a state dict", load_checkpoint, save(tmp_path, {"epoch": 3, "lr": 0.1}))
    assert "epoch" in msg


def test_checkpoint_pickled_module_needs_trust(tmp_path, trained):
    path = save(tmp_path, trained)
    msg = raises("--trust-pickle", load_checkpoint, path)
    assert "Tiny" in msg and "state_dict()" in msg


def test_checkpoint_pickled_module_with_trust(tmp_path, trained):
    loaded = load_checkpoint(save(tmp_path, trained), trust_pickle=True)
    assert isinstance(loaded, Tiny)


def test_checkpoint_trusted_dict_with_module(tmp_path, trained):
    loaded = load_checkpoint(save(tmp_path, {"model": trained, "epoch": 1}), trust_pickle=True)
    assert isinstance(loaded, Tiny)


# ---------------------------------------------------------------------------- load_model


def test_load_model_state_dict(tmp_path, trained, arch_file):
    model = load_model(save(tmp_path, trained.state_dict()), arch=f"{arch_file}:make")
    assert not model.training
    assert_same_weights(model, trained)


def test_load_model_half_precision_becomes_float32(tmp_path, trained, arch_file):
    model = load_model(save(tmp_path, trained.half().state_dict()), arch=f"{arch_file}:make")
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_load_model_trusted_module(tmp_path, trained):
    model = load_model(save(tmp_path, trained.train().bfloat16()), trust_pickle=True)
    assert isinstance(model, Tiny) and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_load_model_trusted_module_into_arch(tmp_path, trained, arch_file):
    model = load_model(save(tmp_path, trained), arch=f"{arch_file}:make", trust_pickle=True)
    assert not isinstance(model, Tiny)
    assert_same_weights(model, trained)


def test_load_model_torchvision(tmp_path):
    ref = build_arch("torchvision:resnet18", {"num_classes": 10})
    path = save(tmp_path, {"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}})
    assert_same_weights(load_model(path, "torchvision:resnet18", {"num_classes": 10}), ref)


def test_load_model_state_dict_needs_arch(tmp_path, trained):
    raises("pass --arch (e.g. torchvision:resnet18)", load_model, save(tmp_path, trained.state_dict()))


def test_load_model_wrong_shape_names_key(tmp_path, trained, arch_file):
    path = save(tmp_path, trained.state_dict())
    msg = raises("5.weight", load_model, path, arch=f"{arch_file}:make", arch_kwargs={"num_classes": 10})
    assert "(3, 4)" in msg and "(10, 4)" in msg


def test_load_model_missing_and_unexpected_keys(tmp_path, trained, arch_file):
    state = trained.state_dict()
    state["extra.weight"] = state.pop("5.weight")
    msg = raises("missing 5.weight", load_model, save(tmp_path, state), arch=f"{arch_file}:make")
    assert "unexpected extra.weight" in msg


# ---------------------------------------------------------------------------- check_same_architecture


def test_same_architecture_ok():
    check_same_architecture(Tiny(), Tiny())


def test_different_shapes_name_first_parameter():
    msg = raises("differ at 0.weight", check_same_architecture, Tiny(4), Tiny(6), names=("a.pt", "b.pt"))
    assert "(4, 3, 3, 3) vs (6, 3, 3, 3)" in msg and "same architecture" in msg


def test_different_layers_name_first_parameter():
    shorter = nn.Sequential(*list(Tiny())[:1])
    raises("only A has 1.weight", check_same_architecture, Tiny(), shorter)
    renamed = nn.Sequential(nn.Identity(), *list(Tiny()))
    raises("A has 0.weight where B has 1.weight", check_same_architecture, Tiny(), renamed)


def test_different_torchvision_architectures():
    a = build_arch("torchvision:resnet18")
    b = build_arch("torchvision:resnet34")
    raises("layer1.2.conv1.weight", check_same_architecture, a, b)
