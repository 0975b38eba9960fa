"""Test-wide setup: fully offline Hugging Face libraries, a throwaway HF cache, one torch thread, and the
transformers contract (tests marked `contract`) first: when it breaks, the run stops there.

The environment variables are set at import time, before any test module imports transformers or
datasets, because those libraries read them once on import. Tests use tiny models, for which intra-op
threads are pure overhead: with 2 threads tests/test_families.py took 50 s instead of 7 s on a busy
2-core machine (VLBRIDGE_TEST_THREADS overrides).
"""

from __future__ import annotations

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="vlbridge-test-hf-home-")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(int(os.environ.get("VLBRIDGE_TEST_THREADS", "1")))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("contract") is None)  # stable: contract first


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    report = yield
    if report.failed and item.get_closest_marker("contract") is not None:
        item.session.shouldstop = (
            "the installed transformers broke vlbridge's contract with it (tests/test_llm_calls.py, above); "
            "the feature tests would fail for that one reason, so none was run"
        )
    return report


def solid_image(color: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> Image.Image:
    """A one-colour RGB image with a contrasting square, so resizing keeps some structure."""
    image = Image.new("RGB", size, color)
    image.paste(tuple(255 - c for c in color), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return image


@pytest.fixture
def red_image() -> Image.Image:
    return solid_image((230, 40, 40))


@pytest.fixture
def blue_image() -> Image.Image:
    return solid_image((50, 100, 245), size=(48, 40))
