"""Shared fixtures: the embedded tiny hosts (built once per session) and trained adapters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lib_ostaf.cli import DEMO_IMAGE

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def sd1_host():
    from lib_ostaf.hosts.diffusers_host import DiffusersHost

    return DiffusersHost.load("tiny-sd1")


@pytest.fixture(scope="session")
def sdxl_host():
    from lib_ostaf.hosts.diffusers_host import DiffusersHost

    return DiffusersHost.load("tiny-sdxl")


@pytest.fixture(scope="session")
def reference_image():
    return DEMO_IMAGE


def pristine(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_weights(module: torch.nn.Module, saved: dict[str, torch.Tensor]) -> bool:
    state = module.state_dict()
    return state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)


@pytest.fixture()
def one_thread():
    """The tiny UNets run ~80× slower with 2 threads on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def disc_image(size: int = 64) -> Image.Image:
    """A red disc on a pale background: one object the automatic mask can find."""
    y, x = np.mgrid[:size, :size]
    img = np.full((size, size, 3), 225, np.uint8)
    r = size * 15 // 64
    img[(x - size * 30 // 64) ** 2 + (y - size * 34 // 64) ** 2 < r**2] = (200, 30, 30)
    return Image.fromarray(img)


@pytest.fixture(autouse=True)
def _no_machine_hf_cache(monkeypatch):
    """Tower auto-detection never sees this machine's Hugging Face cache (tests that want
    a cache pass ``env=`` explicitly)."""
    from lib_ostaf.method import towers

    real = towers.hf_cache_dirs
    monkeypatch.setattr(towers, "hf_cache_dirs", lambda env=None: real(env) if env else [])
