"""The sampling helpers train-local and the sample benchmarks share: the weight average and labelled grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from models.sampling import WeightAverage, save_grid


def _layers() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(3, 2), nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))]


def _params(layers: list[nn.Module]) -> list[torch.Tensor]:
    return [p.detach().clone() for layer in layers for p in layer.parameters()]


def test_decay_warms_up_to_its_ceiling() -> None:
    ema = WeightAverage(_layers(), decay=0.99)
    assert [ema.decay_at(n) for n in (0, 1, 10)] == [pytest.approx(0.1), pytest.approx(2 / 11), pytest.approx(11 / 20)]
    assert ema.decay_at(890) == pytest.approx(891 / 900) and ema.decay_at(891) == 0.99  # (1 + n)/(10 + n) passes 0.99


def test_update_is_the_warmed_up_moving_average() -> None:
    layers = _layers()
    start = _params(layers)
    ema = WeightAverage(layers, decay=0.5)
    expected = start
    for n in range(3):
        with torch.no_grad():
            for p in (p for layer in layers for p in layer.parameters()):
                p.add_(1.0 + n)
        d = min(0.5, (1 + n) / (10 + n))
        expected = [d * a + (1 - d) * p for a, p in zip(expected, _params(layers))]
        ema.update(layers)
    assert ema.updates == 3
    for got, want in zip(_params(ema.layers), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # a copy: the live layers are untouched by the average, and nothing in the average trains
    assert not any(p.requires_grad for layer in ema.layers for p in layer.parameters())
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(_params(ema.layers), layers[0].parameters()))


def test_decay_zero_follows_the_last_weights() -> None:
    layers = _layers()
    ema = WeightAverage(layers, decay=0.0)
    with torch.no_grad():
        layers[0].weight.mul_(3)
    ema.update(layers)
    assert all(torch.equal(a, b) for a, b in zip(_params(ema.layers), _params(layers)))


@pytest.mark.parametrize("decay", [-0.1, 1.0])
def test_decay_outside_the_unit_interval_is_refused(decay: float) -> None:
    with pytest.raises(ValueError, match="EMA decay must be in"):
        WeightAverage(_layers(), decay)


def test_labelled_grid_adds_a_column_with_each_rows_label(tmp_path) -> None:
    images = torch.full((6, 1, 8, 8), -1.0)  # black tiles: any white pixel is a label
    size = save_grid(images, tmp_path / "grid.png", nrow=3, pad=2, scale=4, row_labels=["5", "9"])
    with Image.open(tmp_path / "grid.png") as img:
        pixels = np.asarray(img)
    assert size == img.size == (4 * 32 + 5 * 2, 2 * 32 + 3 * 2)
    label_column, tiles = pixels[:, : 2 + 32], pixels[:, 2 + 32 :]
    assert tiles.max() == 0
    for row in range(2):  # each row's label is drawn inside its own band
        band = label_column[2 + row * 34 : 2 + row * 34 + 32]
        assert (band > 128).sum() > 10, row
    # the two labels differ, so their pixels do
    assert not np.array_equal(label_column[2:34], label_column[36:68])


def test_row_labels_must_match_the_rows(tmp_path) -> None:
    with pytest.raises(ValueError, match="row_labels: got 1 labels for 2 rows"):
        save_grid(torch.zeros(4, 1, 8, 8), tmp_path / "grid.png", nrow=2, row_labels=["0"])
