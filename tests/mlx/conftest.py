"""The tiny model every MLX test shares: built once per session (in a temporary folder unless HARNESS_CACHE
names a cache to reuse)."""
import os

import pytest

from harness.mlx import modelbuild


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    cache_dir = None if os.environ.get("HARNESS_CACHE") else tmp_path_factory.mktemp("models")
    return modelbuild.build(modelbuild.qwen2_config("tiny"), cache_dir=cache_dir).path
