"""Shared fixtures: the embedded tiny hosts (built once per session) and trained adapters."""

from __future__ import annotations

import pytest
import torch

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
