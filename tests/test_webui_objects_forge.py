"""Object implantation inside Forge (fakes with Forge's text-engine semantics): training
calls the engines outside inference mode with the tokens registered for each call, the
gradient reaches the vectors, and the model and the engines' databases are left as found;
the trained tokens then work through :class:`ForgeApplier`."""

from __future__ import annotations

import pytest
import torch

from lib_ostaf.hosts.forge import ForgeApplier, ForgeHost, train_on_loaded_model
from lib_ostaf.method.embeddings import load_embedding
from lib_ostaf.webui.activation import plan_generation, requests_for
from lib_ostaf.webui.jobs import JobManager
from lib_ostaf.webui.object_job import ObjectRequest
from lib_ostaf.webui.registry import AdapterRegistry

from .conftest import disc_image
from .forge_fakes import FakeForgeModel, fake_forge_modules
from .test_webui_objects_a1111 import FAST as A1111_FAST

FAST = A1111_FAST | {"steps": 2, "embedding_steps": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


def _state(sd_model) -> dict[str, torch.Tensor]:
    out = {
        f"unet.{k}": v.clone() for k, v in sd_model.forge_objects.unet.model.state_dict().items()
    }
    for i, engine in enumerate(sd_model.engines()):
        out |= {f"te{i}.{k}": v.clone() for k, v in engine.text_encoder.state_dict().items()}
    return out


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_tokens_reach_forge_engines_with_gradients(family):
    sd_model = FakeForgeModel(family=family)
    host = ForgeHost(sd_model, resolution=64)
    widths = [t.width for t in host.text_encoders]
    assert widths == ([768] if family == "sd1" else [768, 1280])
    vecs = [torch.nn.Parameter(torch.randn(1, w) * 0.02) for w in widths]
    plain = host.encode_prompt("a photo of <mug1>")
    cond = host.encode_prompt("a photo of <mug1>", {"<mug1>": vecs})
    cross = cond["crossattn"] if family == "sdxl" else cond
    base = plain["crossattn"] if family == "sdxl" else plain
    assert cross.shape == base.shape and not torch.allclose(cross, base)
    if family == "sdxl":  # the size embedding comes from Forge's own conditioning
        assert torch.equal(cond["vector"][:, 16:], plain["vector"][:, 16:])
    cross.square().sum().backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in vecs)
    assert all(e.embeddings.word_embeddings == {} for e in sd_model.engines())


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_object_training_on_forge_and_tokens_apply(tmp_path, family):
    sd_model = FakeForgeModel(family=family)
    before = _state(sd_model)
    jobs = JobManager()
    request = ObjectRequest(
        image=disc_image(), name="mug", tokens=["<mug1>"], classes=["mug"], preview_every=1, **FAST
    )
    applier = ForgeApplier()
    with fake_forge_modules(sd_model) as fakes:
        job = jobs.begin("objects")
        jobs.run(job, lambda j: train_on_loaded_model(jobs, j, request, tmp_path, applier))
        assert job.status == "done", job.error
        assert fakes.shared.state.sampling_steps == 3 + 2 * 12  # steps, then the λ sweep
        assert len(fakes.shared.state.images) == 3
        after = _state(sd_model)
        assert all(torch.equal(after[k], before[k]) for k in before)
        assert all(e.embeddings.word_embeddings == {} for e in sd_model.engines())
        _, trained = load_embedding(job.result["embeddings"]["<mug1>"], family)
        host = ForgeHost(sd_model, resolution=64)
        want = host.encode_prompt("a photo of <mug1>", {"<mug1>": list(trained)})
        reqs, msgs = requests_for([["mug", "1"]], [])
        plan = plan_generation(reqs, AdapterRegistry(tmp_path), family, msgs)
        assert applier.apply(sd_model, plan.adapters) == []
        got = host.encode_prompt("a photo of <mug1>")
        key = "crossattn" if family == "sdxl" else None
        assert torch.allclose(got[key] if key else got, want[key] if key else want, atol=1e-5)
