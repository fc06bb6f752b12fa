"""Resources (reliability issue, item 5): ten consecutive trainings in one process leave no
leaked tensors, hooks or optimizer state, and resident memory stops growing."""

from __future__ import annotations

import gc
import resource

import torch

from lib_ostaf.method.train import AttributeConfig, train_attribute

from .conftest import pristine, same_weights


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def test_ten_trainings_return_to_baseline(sd1_host, reference_image):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    before = pristine(sd1_host.unet)
    config = AttributeConfig(steps=3, lr=1e-2, n_views=2)
    tensors, rss = [], []
    try:
        for _ in range(10):
            result = train_attribute(sd1_host, reference_image, config)
            assert len(result.losses) == 3
            del result
            tensors.append(_live_tensors())
            rss.append(_rss_mb())
    finally:
        torch.set_num_threads(threads)
    print(f"live tensors {tensors}; RSS MiB {[round(x, 1) for x in rss]}")
    assert same_weights(sd1_host.unet, before)
    assert not any(m._forward_hooks for m in sd1_host.unet.modules())
    assert all(p.grad is None for p in sd1_host.unet.parameters())
    # after the first run (caches, allocator pools) nothing accumulates
    assert max(tensors[1:]) - min(tensors[1:]) == 0, tensors
    assert rss[-1] - rss[1] < 25, rss  # MiB; one training's graph would be far more


def test_object_trainings_return_to_baseline(sd1_host, reference_image):
    from lib_ostaf.method.objects import ObjectConfig, ObjectSpec, train_objects

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = ObjectConfig(steps=2, embedding_steps=1, n_probe=2, clip="none", flip=False)
    objects = [ObjectSpec("<thing1>", "toy")]
    tensors = []
    try:
        for _ in range(5):
            result = train_objects(sd1_host, reference_image, objects, config)
            del result
            tensors.append(_live_tensors())
    finally:
        torch.set_num_threads(threads)
    print(f"live tensors after object trainings {tensors}")
    assert max(tensors[1:]) - min(tensors[1:]) == 0, tensors
    assert not any(m._forward_hooks for m in sd1_host.unet.modules())
    encoder = sd1_host.text_encoders[0].model
    assert not any(m._forward_hooks for m in encoder.modules())
