"""The statistics passes run channels-last copies where that holds; the merge is the same either way."""

import torch
import torch.nn as nn

import pleascc
from pleascc import api
from pleascc.channels_last import statistics_copies
from pleascc.trace import trace

CPU = torch.device("cpu")


class _Net(nn.Module):
    """Convolutions, a BatchNorm, a residual addition and a head: enough to route maps through every read."""

    def __init__(self, flatten_by_view: bool = False):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.branch = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 5)
        self.flatten_by_view = flatten_by_view

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = x + torch.relu(self.branch(x))
        x = nn.functional.avg_pool2d(x, 2)
        return self.head(x.view(x.shape[0], -1) if self.flatten_by_view else torch.flatten(x, 1))


def _nets(seed: int, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    net = _Net(**kwargs)
    net.bn.running_mean.uniform_(-0.5, 0.5)
    net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_conv_graphs_run_channels_last_copies_and_the_callers_models_stay_as_they_were():
    model = _nets(0)
    weight = model.stem.weight
    gms = (trace(model),)
    runs = statistics_copies(gms, CPU, torch.randn(2, 3, 8, 8))
    assert runs[0] is not gms[0] and runs[0].stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.stem.weight is weight and weight.is_contiguous() and not weight.is_contiguous(
        memory_format=torch.channels_last)


def test_a_graph_that_views_a_map_keeps_its_layout():
    """``x.view`` of a channels-last map raises: that graph runs as given."""
    gms = (trace(_nets(0, flatten_by_view=True)),)
    assert statistics_copies(gms, CPU, torch.randn(2, 3, 8, 8)) is gms


def test_graphs_without_convolutions_or_with_a_lone_patch_embedding_run_as_given():
    gms = (trace(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))),)
    assert statistics_copies(gms, CPU, torch.randn(2, 4)) is gms
    patches = (trace(nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten(2), nn.Linear(4, 5))),)
    assert statistics_copies(patches, CPU, torch.randn(2, 3, 8, 8)) is patches


def test_the_merge_is_the_same_in_either_layout(monkeypatch):
    """Only float32 rounding differs between the layouts' statistics.  On enough samples that the fits are well
    determined: on 96, a CPU without AVX-512 amplified the layouts' rounding to 2.6e-4 through the fits."""
    x = torch.randn(384, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    merged = pleascc.merge(_nets(0), _nets(1), x, budget=1.5, least_squares="one-pass", progress=False).model
    monkeypatch.setattr(api, "statistics_copies", lambda gms, device, example: gms)
    given = pleascc.merge(_nets(0), _nets(1), x, budget=1.5, least_squares="one-pass", progress=False).model
    with torch.no_grad():
        out, want = merged(x), given(x)
    assert (out - want).abs().max() <= 1e-4 * want.abs().max()
