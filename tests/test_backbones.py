"""Every registered backbone builds, and what the registry says about it is true."""

from __future__ import annotations

import pytest

from tledge.backbones import BACKBONES


@pytest.mark.parametrize("name", list(BACKBONES))
def test_backbone_builds_at_its_minimum_size_with_the_registered_layer_count(name):
    backbone = BACKBONES[name]
    size = (backbone.min_size, backbone.min_size)
    model = backbone.create(size, weights=None, alpha=backbone.alphas[-1] if backbone.alphas else None)
    assert len(model.layers) == backbone.layers
    assert backbone.default_unfreeze < backbone.layers
    assert model.output_shape[-1] > 0
