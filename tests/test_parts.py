"""Both parts from one image (shape+appearance) and a λ per part: training, file, plan."""

from __future__ import annotations

import json

import pytest
import torch

from lib_ostaf.errors import InputError
from lib_ostaf.files.adapter_file import load_adapter
from lib_ostaf.method.parts import module_parts, part_names, split_by_part
from lib_ostaf.method.train import (
    SPLICE_LAMBDAS,
    AttributeConfig,
    Callbacks,
    export,
    train_attribute,
)
from lib_ostaf.webui.activation import plan_generation, requests_for
from lib_ostaf.webui.registry import AdapterRegistry

FAST = {"steps": 3, "n_views": 2}


@pytest.fixture(scope="module")
def both(sd1_host, reference_image):
    seen: list[tuple[int, int]] = []
    callbacks = Callbacks(progress=lambda step, total, loss: seen.append((step, total)))
    config = AttributeConfig(attribute="shape+appearance", **FAST)
    return train_attribute(sd1_host, reference_image, config, callbacks), seen


def test_token_part_is_trained_exactly_as_alone(sd1_host, reference_image, both):
    result, seen = both
    alone = {
        a: train_attribute(sd1_host, reference_image, AttributeConfig(attribute=a, **FAST))
        for a in ("shape", "appearance")
    }
    factors = result.factors()
    for key, (a, b) in alone["appearance"].factors().items():
        assert torch.equal(factors[key][0], a) and torch.equal(factors[key][1], b)
        assert result.parts[key] == "appearance"
    # the shape part has the single shape training's layers (disjoint from appearance's) ...
    shape_keys = {k for k, p in result.parts.items() if p == "shape"}
    assert shape_keys == set(alone["shape"].factors())
    assert len(factors) == sum(len(r.factors()) for r in alone.values())
    # ... but not its weights: it was trained on the learned token (next test)
    key = next(iter(shape_keys))
    assert not torch.equal(factors[key][0], alone["shape"].factors()[key][0])
    # the token is the appearance part's; shape learns none
    assert set(result.embeddings) == {"ostafv"}
    torch.testing.assert_close(
        result.embeddings["ostafv"][0], alone["appearance"].embeddings["ostafv"][0]
    )
    # one progress count over both parts, token part first
    assert seen == [(i, 6) for i in range(1, 7)]
    assert [c.attribute for c in result.config.part_configs()] == ["appearance", "shape"]


def test_shape_part_trains_on_the_learned_token_across_its_dial(
    sd1_host, reference_image, monkeypatch, tmp_path
):
    """At generation the shape part meets v₀ + λ·(v − v₀) (λ = the appearance dial), so it
    is trained on that word at λ ∈ {0, ¼, ½, ¾, 1}, not on the plain text."""
    calls: list[tuple[str, dict | None]] = []
    encode = sd1_host.encode_prompt

    def spy(prompt, embeddings=None):
        calls.append((prompt, embeddings))
        return encode(prompt, embeddings)

    monkeypatch.setattr(sd1_host, "encode_prompt", spy)
    config = AttributeConfig(attribute="shape+appearance", **FAST)
    result = train_attribute(sd1_host, reference_image, config)
    shape_prompt = AttributeConfig(attribute="shape").training_prompt
    seen = [e for p, e in calls if p == shape_prompt]
    assert len(seen) == len(SPLICE_LAMBDAS)  # encoded once per λ, before the steps
    v, v0 = result.embeddings["ostafv"][0], result.token_init["ostafv"][0]
    for lam, embeddings in zip(SPLICE_LAMBDAS, seen, strict=True):
        (got,) = embeddings["ostafv"]
        torch.testing.assert_close(got.cpu(), v0 + lam * (v - v0))  # independent formula
    meta = json.loads(load_adapter(export(result, tmp_path, "spliced")).metadata["ostaf.training"])
    assert meta["parts"]["shape"]["spliced_token_lambdas"] == list(SPLICE_LAMBDAS)
    assert "spliced_token_lambdas" not in meta["parts"]["appearance"]


def test_file_records_the_part_of_each_module(both, tmp_path):
    result, _ = both
    adapter = load_adapter(export(result, tmp_path, "duo"))
    table = json.loads(adapter.metadata["ostaf.parts"])
    assert set(table) == {"shape", "appearance"}
    assert sorted(k for keys in table.values() for k in keys) == sorted(adapter.modules)
    assert module_parts(adapter) == result.parts
    assert set(part_names(adapter)) == {"shape", "appearance"}
    assert adapter.metadata["ostaf.attribute"] == "shape+appearance"
    training = json.loads(adapter.metadata["ostaf.training"])
    assert training["parts"]["shape"]["lr"] == AttributeConfig(attribute="shape").lr_
    assert training["parts"]["appearance"]["timestep_range"] == [0.0, 0.5]
    # still a plain kohya LoRA: every key is lora_unet_*
    assert all(k.startswith("lora_unet_") for k in adapter.modules)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"attribute": "appearance+style"}, "unknown attribute"),
        ({"attribute": "shape+shape"}, "unknown attribute"),
        ({"attribute": "shape+appearance", "blocks": ("mid_block.attentions.0",)}, "blocks"),
        ({"attribute": "shape+appearance", "steps": 0}, "steps"),
    ],
)
def test_bad_combined_config(changes, match):
    with pytest.raises(InputError, match=match):
        AttributeConfig(**changes)


def test_part_weights_and_plan(both, tmp_path):
    result, _ = both
    export(result, tmp_path, "duo")
    registry = AdapterRegistry(tmp_path)
    requests, messages = requests_for(
        [["duo", "0.5", "shape=1.5"], ["duo2", "1", "colour=1"]],
        [("duo", 1.0, "appearance=0.25:style=2")],
        xyz_parts={"shape": 0.75},
    )
    assert len(messages) == 1 and "not a dial" in messages[0]
    plan = plan_generation(requests, registry, "sd1")
    (planned,) = plan.adapters  # the accordion's pick replaces the tag's, with a message
    assert any("asked for twice" in m for m in plan.messages)
    assert any("has no style part" in m for m in plan.messages)
    assert planned.dials.parts == (("appearance", 0.25), ("shape", 0.75))  # style dropped
    groups = {part: (set(mods), w) for part, mods, w in planned.groups()}
    assert groups["shape"] == ({k for k, p in result.parts.items() if p == "shape"}, 0.75)
    assert groups["appearance"][1] == 0.25
    assert planned.split and planned.token_weight == 0.25
    assert "duo:1:appearance=0.25:shape=0.75 (" in plan.infotext()


def test_a_one_attribute_file_has_one_part(sd1_host, reference_image, tmp_path):
    single = train_attribute(sd1_host, reference_image, AttributeConfig(attribute="shape", **FAST))
    adapter = load_adapter(export(single, tmp_path, "s"))
    assert part_names(adapter) == ("shape",)
    # a file written before ostaf.parts existed: its attribute is its one part
    del adapter.metadata["ostaf.parts"]
    assert part_names(adapter) == ("shape",)
    groups = split_by_part(adapter, {"shape": 2.0}, 1.0)
    assert [(p, w) for p, _, w in groups] == [("shape", 2.0)]
    adapter.metadata.pop("ostaf.attribute")  # a plain LoRA: one group, the file's λ
    assert [(p, w) for p, _, w in split_by_part(adapter, {"shape": 2.0}, 1.0)] == [("", 1.0)]


def test_diffusers_host_merges_each_part_with_its_lambda(sd1_host, both, tmp_path):
    result, _ = both
    adapter = load_adapter(export(result, tmp_path, "duo"))
    table = json.loads(adapter.metadata["ostaf.parts"])
    names = {t.kohya: t.name for t in result.targets}
    linear = dict(sd1_host.unet.named_modules())
    before = {n: linear[n].weight.detach().clone() for n in names.values()}
    try:
        sd1_host.apply_adapters([(adapter, 1.0, {"shape": 0.5, "appearance": -2.0})])
        for part, lam in (("shape", 0.5), ("appearance", -2.0)):
            for key in table[part]:
                want = before[names[key]] + lam * adapter.modules[key].delta()
                torch.testing.assert_close(linear[names[key]].weight, want, rtol=0, atol=1e-6)
    finally:
        sd1_host.apply_adapters([])
    assert all(torch.equal(linear[n].weight, w) for n, w in before.items())


def test_schedule_on_the_diffusers_host_switches_at_boundaries_only(sd1_host, both, tmp_path):
    from lib_ostaf.method.schedule import StepSchedule

    result, _ = both
    adapter = load_adapter(export(result, tmp_path, "duo"))
    unet_weights = lambda: {k: v.clone() for k, v in sd1_host.unet.state_dict().items()}  # noqa: E731
    base = unet_weights()

    def render(window, record=None):
        schedule = StepSchedule([(adapter, 1.0, {"shape": 0.5})], [window])
        calls = []

        def on_step(step, total):
            on = schedule.at(step, total)
            if on is not None:
                calls.append(step)
                sd1_host.apply_adapters(on)
            if record is not None:
                record.append(sd1_host.patcher.active)

        sd1_host.apply_adapters(schedule.first())
        try:
            image = sd1_host.generate("a ostafv object", seed=3, steps=4, on_step=on_step)
        finally:
            sd1_host.apply_adapters([])
        return image.tobytes(), calls

    full, calls = render((0.0, 1.0))
    assert calls == []  # no schedule: merged once before the first step
    none, _ = render((0.0, 0.0001))  # off from step 1: only step 0 sees the adapter
    seen: list[bool] = []
    late, calls = render((0.5, 1.0), seen)
    assert calls == [2] and seen == [False, False, True, True]
    assert len({full, none, late}) == 3
    again, _ = render((0.0, 1.0))
    assert again == full  # the same seed, the same bytes
    assert all(torch.equal(v, base[k]) for k, v in sd1_host.unet.state_dict().items())


def test_cli_generate_with_dials(both, tmp_path, capsys):
    from lib_ostaf.cli import main, resolve_request

    result, _ = both
    export(result, tmp_path, "duo")
    adapter, lam, dials = resolve_request("duo:0.5:shape=2:end=0.5", tmp_path)
    assert (adapter.name, lam, dials.parts, dials.end) == ("duo", 0.5, (("shape", 2.0),), 0.5)
    with pytest.raises(InputError, match="no style part"):
        resolve_request("duo:1:style=1", tmp_path)
    with pytest.raises(InputError, match="not a dial"):
        resolve_request("duo:1:colour=1", tmp_path)
    images = {}
    for spec in ("duo:1", "duo:1:appearance=0:start=0.5"):
        out = tmp_path / f"{len(images)}.png"
        argv = ["generate", "--model", "tiny-sd1", "--prompt", "a ostafv object", "--adapter", spec]
        argv += ["--steps", "2"]
        assert main([*argv, "--adapters-dir", str(tmp_path), "--output", str(out)]) == 0
        images[spec] = out.read_bytes()
    assert len(set(images.values())) == 2
    bad = ["generate", "--model", "tiny-sd1", "--prompt", "x", "--adapter", "duo:1:shape"]
    assert main([*bad, "--adapters-dir", str(tmp_path), "--output", str(tmp_path / "x.png")]) == 2
    assert "must be a number, got 'shape'" in capsys.readouterr().err
