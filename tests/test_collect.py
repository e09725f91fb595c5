"""Streaming collection: seeded position sampling independent of batching, rows from the
layer-only LRP pass; heatmap files."""

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from cnp_core.collect import collect_instances, sample_positions
from cnp_core.heatmaps import save_heatmap_grid
from cnp_core.lrp import Explainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_positions_depend_on_image_and_seed_not_on_the_batch():
    torch.manual_seed(0)
    a, c = torch.randn(4, 6, 5, 5), torch.randn(4, 6, 5, 5)
    whole_a, whole_c = sample_positions(a, c, [10, 11, 12, 13], 7, seed=3)
    parts = [
        sample_positions(a[i : i + 2], c[i : i + 2], [10 + i, 11 + i], 7, seed=3) for i in (0, 2)
    ]
    np.testing.assert_array_equal(whole_a, np.concatenate([p[0] for p in parts]))
    np.testing.assert_array_equal(whole_c, np.concatenate([p[1] for p in parts]))
    assert whole_a.shape == (28, 6)
    # Rows are real (activation, context) pairs at one position of the right image.
    row = whole_a[7]
    matches = (a[1].reshape(6, -1).T.double().numpy() == row).all(1)
    assert matches.any()
    position = int(np.flatnonzero(matches)[0])
    np.testing.assert_array_equal(whole_c[7], c[1].reshape(6, -1)[:, position].double().numpy())
    other_a, _ = sample_positions(a, c, [10, 11, 12, 13], 7, seed=4)
    assert not np.array_equal(other_a, whole_a)


def test_heatmap_grid_is_a_png_with_one_row_per_image(tmp_path):
    rng = np.random.default_rng(0)
    path = save_heatmap_grid(
        rng.random((2, 16, 16, 3)), rng.normal(size=(2, 6, 16, 16)), tmp_path / "h" / "grid.png"
    )
    with Image.open(path) as image:
        width, height = image.size
    assert image.format == "PNG" and width > height > 100


def test_collected_rows_are_those_of_the_full_lrp_pass():
    # collect_instances takes the layer-only pass; the rows must be the full pass's.
    torch.manual_seed(0)
    model = torchvision.models.get_model("resnet18", num_classes=2).eval()
    images = torch.randn(6, 3, 32, 32)
    loader = [(images[:3], torch.arange(3)), (images[3:], torch.arange(3, 6))]
    with Explainer(model, ["layer3"]) as explainer:
        got = collect_instances(explainer, loader, 1, per_image=5, seed=2)["layer3"]
        full = explainer.explain(images, torch.ones(6, dtype=torch.long))
    a, c = sample_positions(full.activations["layer3"], full.contexts["layer3"], range(6), 5, 2)
    np.testing.assert_array_equal(got.image_ids, np.repeat(np.arange(6), 5))
    np.testing.assert_allclose(got.activations, a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.contexts, c, rtol=1e-5, atol=1e-6 * np.abs(c).max())
    assert np.abs(c).max() > 0 and (a == 0).any()
