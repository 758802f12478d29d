import pytest
import torch

from stepadapt.models import build_unet


@pytest.fixture(autouse=True)
def _threads():
    # CI has 2 cores; keep tests from oversubscribing them.
    torch.set_num_threads(2)


@pytest.fixture
def tiny():
    return build_unet("tiny", seed=0).eval()
