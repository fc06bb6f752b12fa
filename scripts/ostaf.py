# OSTAF for AUTOMATIC1111: thin glue between the WebUI and lib_ostaf.
# Tab "OSTAF", extra network <ostaf:name:λ>, Extra Networks page, always-visible script
# (accordion + infotext), X/Y/Z axes, settings and REST routes. Logic lives in lib_ostaf;
# callbacks are registered from this file's body so "Reload UI" re-registers them.

import html
import inspect
import os
import types
from dataclasses import replace
from pathlib import Path

import gradio as gr
from modules import (
    call_queue,
    extra_networks,
    paths,
    script_callbacks,
    scripts,
    shared,
    ui_extra_networks,
)

from lib_ostaf.errors import InputError, OstafError
from lib_ostaf.files.naming import ATTN_NAMES, PROJ_NAMES
from lib_ostaf.hosts import a1111, forge
from lib_ostaf.method import schedule
from lib_ostaf.method.hypernet import OFFSET_NETWORKS
from lib_ostaf.method.masks import auto_masks, mask_from_editor, mask_overlay
from lib_ostaf.method.memory import CHECKPOINTING, PRECISIONS
from lib_ostaf.method.objects import EMBEDDINGS_FOLDER, ObjectConfig
from lib_ostaf.method.train import ATTRIBUTE_CHOICES, DEFAULT_PROMPTS, AttributeConfig
from lib_ostaf.webui import activation, cards, prompt_tags
from lib_ostaf.webui.api import (
    PREFIX,
    WRITE_ROUTES,
    ApiError,
    ImplantBody,
    OstafApi,
    TrainBody,
    api_enabled,
    check_basic_auth,
)
from lib_ostaf.webui.object_job import ObjectRequest
from lib_ostaf.webui.registry import resolve_adapters_dir
from lib_ostaf.webui.run_settings import RUN
from lib_ostaf.webui.share import share_adapter
from lib_ostaf.webui.training_job import TrainRequest


def _sdnext() -> bool:
    """SD.Next (vladmandic/sdnext), by feature: its ``modules.shared`` runs the model on the
    diffusers backend (``shared.backend`` is its ``Backend.DIFFUSERS``, ``shared.native`` is
    True). A1111 and the Forges have neither attribute; their models are ldm/sgm modules,
    which this extension's hosts need."""
    backend = getattr(shared, "backend", None)
    return getattr(shared, "native", None) is True and getattr(backend, "name", "") == "DIFFUSERS"


SDNEXT = _sdnext()
SDNEXT_MESSAGE = (
    "[OSTAF] SD.Next (diffusers backend): the OSTAF tab, <ostaf:…> tags, accordion, X/Y/Z "
    "axes and /ostaf API are not available here; OSTAF adapter files load through SD.Next's "
    "own LoRA: put the .safetensors in models/Lora and use <lora:name:λ>"
)
if SDNEXT:  # one line, then nothing is registered (see the end of this file)
    print(SDNEXT_MESSAGE)

N_SLOTS = 3  # adapters the accordion can pick
SLOT_WIDTH = 3  # each slot: adapter, λ, dials ("shape=0.6:end=0.8")
PART_AXES = ("shape", "appearance")  # parts with their own X/Y/Z axis
OBJECT_SLOTS = 3  # objects the Object implantation sub-tab offers (lib_ostaf allows 4)
GRADIO4 = int(str(getattr(gr, "__version__", "3")).split(".")[0]) >= 4
FORGE = forge.is_forge()  # one codebase: Forge gets its own host/applier (research §8.7)
HOST = forge if FORGE else a1111
STATE = HOST.webui_state()  # survives "Reload UI" (lives in lib_ostaf, not in this file)


def wire(fn, components: dict) -> list:
    """The ``inputs`` of an event that calls ``fn``: ``components[name]`` for each parameter
    of ``fn``, in the signature's order, so the list cannot drift from the function (the
    rule: every ``.click``/``.change`` builds its inputs this way). A ``*args`` parameter
    takes a list of components under its own name. Pass the plain function, not a wrapper:
    ``wire(_train_ui, …)`` beside ``fn=wrap_gradio_gpu_call(_train_ui)``. A parameter
    without a component, or a component without a parameter, is an error at UI build."""
    params = inspect.signature(fn).parameters.values()
    fed = [p for p in params if p.kind not in (p.KEYWORD_ONLY, p.VAR_KEYWORD)]
    missing = [p.name for p in fed if p.name not in components]
    unused = sorted(set(components) - {p.name for p in fed})
    if missing or unused:
        raise ValueError(
            f"wire({fn.__name__}): no component for {missing}, no parameter for {unused}"
        )
    inputs = []
    for p in fed:
        if p.kind is p.VAR_POSITIONAL:
            inputs += components[p.name]
        else:
            inputs.append(components[p.name])
    return inputs


# --------------------------------------------------------------------------- settings
def _adapters_dir() -> Path:
    return resolve_adapters_dir(
        getattr(shared.cmd_opts, "ostaf_dir", None),
        getattr(shared.opts, "ostaf_dir", ""),
        paths.models_path,
    )


REGISTRY = STATE.registry(_adapters_dir)
JOBS, APPLIER = STATE.jobs, STATE.applier

SLOTS_ENABLED = False  # the accordion applies nothing until ticked
# Every default of the tab comes from the method's settings or the run's (one home each).
ATTR, OBJ = AttributeConfig, ObjectConfig
OPTION_DEFAULTS = {
    "ostaf_dir": "",
    "ostaf_preview_every": RUN.tab_preview_every,
    "ostaf_preview_steps": RUN.preview_steps,
    "ostaf_preview_size": RUN.preview_size,
    "ostaf_sweep": ", ".join(f"{lam:g}" for lam in RUN.sweep),
    "ostaf_default_steps": ATTR.steps,
    "ostaf_default_rank": ATTR.rank,
    "ostaf_default_lr": 0.0,  # 0 = the attribute's own learning rate
    "ostaf_clip_tower": "",  # empty = automatic
    "ostaf_infotext": True,
}

if not SDNEXT:  # no settings for what SD.Next does not get
    shared.options_templates.update(
        shared.options_section(
            ("ostaf", "OSTAF"),
            {
                "ostaf_dir": shared.OptionInfo(
                    OPTION_DEFAULTS["ostaf_dir"],
                    "Adapters folder (empty: models/ostaf; --ostaf-dir overrides)",
                ),
                "ostaf_preview_every": shared.OptionInfo(
                    OPTION_DEFAULTS["ostaf_preview_every"],
                    "Training: live preview every N steps (0 = off)",
                    gr.Slider,
                    {"minimum": 0, "maximum": 1000, "step": 1},
                ),
                "ostaf_preview_steps": shared.OptionInfo(
                    OPTION_DEFAULTS["ostaf_preview_steps"],
                    "Training: sampling steps of a preview",
                    gr.Slider,
                    {"minimum": 1, "maximum": 50, "step": 1},
                ),
                "ostaf_preview_size": shared.OptionInfo(
                    OPTION_DEFAULTS["ostaf_preview_size"],
                    "Training: preview size in pixels (0 = training size)",
                    gr.Number,
                    {"precision": 0},
                ),
                "ostaf_sweep": shared.OptionInfo(
                    OPTION_DEFAULTS["ostaf_sweep"],
                    "Training: λ values of the result sweep (empty = none)",
                ),
                "ostaf_default_steps": shared.OptionInfo(
                    OPTION_DEFAULTS["ostaf_default_steps"],
                    "Training: default steps",
                    gr.Number,
                    {"precision": 0},
                ),
                "ostaf_default_rank": shared.OptionInfo(
                    OPTION_DEFAULTS["ostaf_default_rank"],
                    "Training: default rank",
                    gr.Number,
                    {"precision": 0},
                ),
                "ostaf_default_lr": shared.OptionInfo(
                    OPTION_DEFAULTS["ostaf_default_lr"],
                    "Training: default learning rate (0 = the attribute's own default)",
                    gr.Number,
                ),
                "ostaf_clip_tower": shared.OptionInfo(
                    OPTION_DEFAULTS["ostaf_clip_tower"],
                    "OSTAF: CLIP vision tower for the prototype (a folder with config.json; "
                    "empty = auto: IP-Adapter image-encoder folders, then the local Hugging Face "
                    "cache; never downloads)",
                ),
                "ostaf_infotext": shared.OptionInfo(
                    OPTION_DEFAULTS["ostaf_infotext"],
                    "Write applied OSTAF adapters (name:λ (hash)) into infotext",
                ),
            },
        )
    )


def _opt(key: str, default=None):
    """A WebUI setting; ours default to :data:`OPTION_DEFAULTS`."""
    default = OPTION_DEFAULTS.get(key, default)
    value = getattr(shared.opts, key, default)
    return default if value is None else value


def _sweep_lambdas() -> tuple:
    text = str(_opt("ostaf_sweep"))
    return tuple(float(x) for x in text.replace(";", ",").split(",") if x.strip())


# --------------------------------------------------------------------------- extra network
class ExtraNetworkOstaf(extra_networks.ExtraNetwork):
    """Parses <ostaf:name:λ>; the script applies after the built-in Lora has activated."""

    def __init__(self):
        super().__init__(prompt_tags.NETWORK)

    def activate(self, p, params_list):
        p._ostaf_tags = [list(params.items) for params in params_list]

    def deactivate(self, p):
        pass  # not reliable (research §3.2); activate(p, []) + the script reset instead


# --------------------------------------------------------------------------- cards page
class ExtraNetworksPageOstaf(ui_extra_networks.ExtraNetworksPage):
    def __init__(self):
        super().__init__("OSTAF")

    def refresh(self):
        REGISTRY.forget()

    def create_item(self, name, index=None, enable_filter=True):
        try:
            e = REGISTRY.entry(name)
        except OstafError:
            return None
        stem = str(e.path)[: -len(".safetensors")]
        as_html = bool(_opt("extra_networks_card_description_is_html", False))
        item = {
            "name": name,
            "filename": str(e.path),
            "shorthash": e.short_hash,
            "preview": self.find_preview(stem),
            "search_terms": [
                html.escape(self.search_terms_from_path(str(e.path))),
                html.escape(e.short_hash),
                html.escape(e.attribute),
            ],
            "local_preview": f"{stem}.{shared.opts.samples_format}",
            "metadata": e.metadata,
            "sort_keys": {"default": index, **self.get_sort_keys(str(e.path))},
            "sd_version": cards.sd_version_name(e.family),
        }
        self.read_user_metadata(item)
        item["description"] = cards.card_description(e, as_html=as_html)
        weight = prompt_tags.format_weight(e.weight)
        item["prompt"] = " + ".join(
            ui_extra_networks.quote_js(x) for x in (f"<ostaf:{name}:", weight, ">")
        )
        return item

    def list_items(self):
        for index, name in enumerate(REGISTRY.names()):
            item = self.create_item(name, index)
            if item is not None:
                yield item

    def allowed_directories_for_previews(self):
        return [str(REGISTRY.root)]

    def create_dirs_view_html(self, tabname):
        # object adapters keep their token embeddings in <name>.embeddings/: not a folder
        # of adapters, so no filter button for it (the tree view already skips it)
        return cards.without_folder_buttons(
            super().create_dirs_view_html(tabname), EMBEDDINGS_FOLDER
        )


# --------------------------------------------------------------------------- script
class OstafScript(scripts.Script):
    def title(self):
        return "OSTAF"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        choices = [activation.NONE_CHOICE, *REGISTRY.names()]
        with gr.Accordion("OSTAF", open=False, elem_id=self.elem_id("ostaf")):
            enabled = gr.Checkbox(
                SLOTS_ENABLED,
                label="Apply the adapters below",
                elem_id=self.elem_id("ostaf_enabled"),
            )
            slots = []
            for i in range(N_SLOTS):
                with gr.Row():
                    name = gr.Dropdown(
                        choices=choices,
                        value=activation.NONE_CHOICE,
                        label=f"OSTAF adapter {i + 1}",
                        elem_id=self.elem_id(f"ostaf_name_{i}"),
                    )
                    lam = gr.Slider(
                        minimum=-2.0,
                        maximum=3.0,
                        value=activation.SLOT_WEIGHT,
                        step=0.05,
                        label=f"OSTAF λ {i + 1}",
                        elem_id=self.elem_id(f"ostaf_lambda_{i}"),
                    )
                    dials = gr.Textbox(
                        value="",
                        label=f"OSTAF dials {i + 1}",
                        placeholder="shape=0.6:appearance=1.2:start=0.2:end=0.8",
                        elem_id=self.elem_id(f"ostaf_dials_{i}"),
                    )
                slots += [name, lam, dials]
            refresh = gr.Button("Refresh adapter list", elem_id=self.elem_id("ostaf_refresh"))
        names = slots[0::SLOT_WIDTH]
        refresh.click(fn=_refresh_names, inputs=wire(_refresh_names, {}), outputs=names)
        self.infotext_fields = [(enabled, _paste_enabled)] + [
            (slots[j], _paste_slot(j // SLOT_WIDTH, j % SLOT_WIDTH)) for j in range(len(slots))
        ]
        return [enabled, *slots]

    def process(self, p, enabled=False, *slots):
        messages = prompt_tags.strip_negative_tags(p)
        picks = [tuple(slots[i : i + SLOT_WIDTH]) for i in range(0, len(slots), SLOT_WIDTH)]
        p._ostaf_ui = (
            [x for x in picks if x[0] and x[0] != activation.NONE_CHOICE] if enabled else []
        )
        _report(p, messages)

    def after_extra_networks_activate(self, p, *args, **kwargs):
        requests, messages = activation.requests_for(
            getattr(p, "_ostaf_tags", []),
            getattr(p, "_ostaf_ui", []),
            xyz_adapter=getattr(p, "_ostaf_xyz_adapter", None),
            xyz_lambda=getattr(p, "_ostaf_xyz_lambda", None),
            xyz_parts=getattr(p, "_ostaf_xyz_parts", None),
        )
        sd_model = shared.sd_model
        plan = activation.plan_generation(requests, REGISTRY, HOST.model_family(sd_model), messages)
        messages = plan.messages + APPLIER.apply(sd_model, plan.adapters)
        _report(p, messages)
        if plan.adapters and _opt("ostaf_infotext"):
            p.extra_generation_params[prompt_tags.INFOTEXT_KEY] = plan.infotext()
        else:
            p.extra_generation_params.pop(prompt_tags.INFOTEXT_KEY, None)

    def postprocess(self, p, processed, *args):
        APPLIER.finish()  # weights a step schedule changed go back (Forge; A1111 is lazy)

    def process_before_every_sampling(self, p, *args, **kwargs):
        # Forge only: patch a clone of forge_objects.unet (Forge resets it before each call)
        if FORGE:
            _report(p, APPLIER.patch_unet(p))


def _refresh_names():
    return [gr.update(choices=[activation.NONE_CHOICE, *REGISTRY.names()])] * N_SLOTS


def _report(p, messages):
    seen = p.__dict__.setdefault("_ostaf_reported", set())
    for msg in messages:
        if msg not in seen:
            seen.add(msg)
            print(msg)
            p.comment(html.escape(msg))


def _paste_enabled(params):
    return gr.update(value=bool(prompt_tags.untagged_from_infotext(params)))


def _paste_slot(i, field):
    """Paste-back of slot ``i``'s ``field`` (0 name, 1 λ, 2 dials) from an infotext."""

    def paste(params):
        picks = prompt_tags.untagged_from_infotext(params)
        if i < len(picks):
            name, weight, dials = picks[i]
            return gr.update(value=(name, weight, ":".join(dials.items))[field])
        return gr.update(value=(activation.NONE_CHOICE, activation.SLOT_WEIGHT, "")[field])

    return paste


# --------------------------------------------------------------------------- X/Y/Z
XYZ_LABELS = ("OSTAF λ", "OSTAF adapter")
XYZ_PART_LABEL = "OSTAF λ {part}"  # one axis per part: a λ for that part of every adapter


def _xyz_lambda(p, x, xs):
    p._ostaf_xyz_lambda = float(x)


def _xyz_part(part):
    def apply(p, x, xs):
        p.__dict__.setdefault("_ostaf_xyz_parts", {})[part] = float(x)

    return apply


def _xyz_adapter(p, x, xs):
    p._ostaf_xyz_adapter = str(x)


def _xyz_plain(p, opt, x):  # A1111's xyz_grid.format_value: the value, floats rounded
    return round(x, 8) if isinstance(x, float) else x


def _xyz_module():
    """The X/Y/Z script's module, by what it exposes (``axis_options`` + ``AxisOption``):
    A1111/Forge ``scripts/xyz_grid.py``, Forge Classic ``extensions-builtin/xyz`` (its
    ``AxisOption`` lives in ``lib_xyz``)."""
    found = [
        s.module
        for s in scripts.scripts_data
        if isinstance(getattr(s.module, "axis_options", None), list)
        and callable(getattr(s.module, "AxisOption", None))
    ]
    named = [m for m in found if getattr(m, "__name__", "").startswith("xyz_grid")]
    return (named or found or [None])[0]


def _add_xyz_axes():
    xyz = _xyz_module()
    if xyz is None:
        return
    try:
        parts = [XYZ_PART_LABEL.format(part=part) for part in PART_AXES]
        ours = (*XYZ_LABELS, *parts)
        xyz.axis_options[:] = [o for o in xyz.axis_options if o.label not in ours]
        xyz.axis_options.extend(
            [
                xyz.AxisOption(XYZ_LABELS[0], float, _xyz_lambda),
                xyz.AxisOption(
                    XYZ_LABELS[1],
                    str,
                    _xyz_adapter,
                    format_value=getattr(xyz, "format_value", _xyz_plain),
                    choices=lambda: [activation.NONE_CHOICE, *REGISTRY.names()],
                ),
                *(
                    xyz.AxisOption(label, float, _xyz_part(part))
                    for label, part in zip(parts, PART_AXES, strict=True)
                ),
            ]
        )
    except Exception as e:  # an X/Y/Z of another shape: the rest of OSTAF still loads
        print(f"OSTAF: X/Y/Z axes not added ({type(e).__name__}: {e})")


# --------------------------------------------------------------------------- training tab
def _train_ui(
    id_task,
    image,
    attribute,
    name,
    token,
    prompt,
    steps,
    rank,
    lr,
    seed,
    network,
    include_mid,
    attn,
    proj,
    blocks,
    default_lambda,
    resolution,
    preview_every,
    overwrite,
    precision="auto",
    checkpointing="auto",
):
    try:
        request = TrainRequest(
            image=image,
            name=(name or "").strip(),
            attribute=attribute,
            token=token,
            prompt=prompt,
            steps=int(steps),
            rank=int(rank),
            lr=float(lr),
            seed=int(seed),
            network=network,
            include_mid=bool(include_mid),
            attn=tuple(attn or ()),
            proj=tuple(proj or ()),
            blocks=tuple(b.strip() for b in (blocks or "").split(",") if b.strip()) or None,
            n_views=8,
            **_run_settings(
                default_lambda, resolution, overwrite, preview_every, precision, checkpointing
            ),
        )
    except (OstafError, ValueError, TypeError) as e:
        return [], "", cards.error_html(e)
    return _run_job("attribute", request)


def _run_settings(default_lambda, resolution, overwrite, preview_every, precision, checkpointing):
    """The settings both tabs send: their own fields plus the previews/sweep of Settings."""
    return {
        "default_lambda": float(default_lambda),
        "resolution": int(resolution or 0),
        "overwrite": bool(overwrite),
        "preview_every": int(preview_every or 0),
        "preview_steps": int(_opt("ostaf_preview_steps")),
        "preview_size": int(_opt("ostaf_preview_size") or 0),
        "sweep": _sweep_lambdas(),
        "precision": precision,
        "gradient_checkpointing": checkpointing,
    }


def _tower_dirs() -> tuple[str, ...]:
    """Folders where WebUI users keep image encoders (IP-Adapter): searched by "auto"."""
    models = Path(paths.models_path)
    found = [models / "clip_vision", models / "ipadapter", models / "ControlNet"]
    root = getattr(paths, "script_path", None)
    if root:
        found.append(Path(root) / "extensions" / "sd-webui-controlnet" / "annotator")
    return tuple(str(d) for d in found if d.is_dir())


def _with_tower(request):
    """An object request with the tower setting (when it asks for "auto") and the folders."""
    if not isinstance(request, ObjectRequest):
        return request
    clip = request.clip
    if str(clip or "auto").strip().lower() == "auto":
        clip = str(_opt("ostaf_clip_tower") or "").strip() or "auto"
    return replace(request, clip=clip, clip_dirs=_tower_dirs())


def _for_gallery(images):
    """Gradio saves the images a gallery shows into the WebUI's "temp_dir" setting. Forge
    Neo defaults it to <data>/tmp and never creates it (A1111 creates its own): a fresh
    Neo then fails every gallery of images made in memory. Create it."""
    folder = str(getattr(shared.opts, "temp_dir", "") or "")
    if images and folder:
        os.makedirs(folder, exist_ok=True)
    return images


def _run_job(kind, request):
    """Run a validated request on the loaded model: (gallery, log, result card)."""
    try:
        request = _with_tower(request)
        request.validate(REGISTRY.root)
        job = JOBS.begin(kind)
    except (OstafError, ValueError, TypeError) as e:
        return [], "", cards.error_html(e)
    JOBS.run(job, lambda j: HOST.train_on_loaded_model(JOBS, j, request, REGISTRY.root, APPLIER))
    log = "\n".join(job.log)
    if job.status != "done":
        return [], log, cards.error_html(job.error, interrupted=job.status == "interrupted")
    images = [job.images["sweep"]] if "sweep" in job.images else []
    return _for_gallery(images), log, cards.result_html(job.result)


def _interrupt_ui():
    JOBS.interrupt()  # our job's own stop flag: never the WebUI's running generation


_OBJECT_METHOD = (  # the method's own fields among them, as ObjectRequest names them
    "steps", "embedding_steps", "rank", "lr", "embedding_lr", "class_weight",
    "background_weight", "seed",
)  # fmt: skip


def _object_settings(
    steps, embedding_steps, rank, lr, embedding_lr, class_weight, background_weight, seed,
    default_lambda, resolution, preview_every, overwrite, precision="auto", checkpointing="auto",
):  # fmt: skip
    """The Object sub-tab's values after its slots, by name: this signature is their order."""
    return types.SimpleNamespace(**locals())


def _object_ui(id_task, image, name, *values):
    """The Object implantation sub-tab's Train. ``values``: (token, class, drawing, file) for
    each slot, then the parameters of :func:`_object_settings` in its order."""
    slots, s = values[: 4 * OBJECT_SLOTS], _object_settings(*values[4 * OBJECT_SLOTS :])
    try:
        tokens, classes, masks = [], [], []
        for i in range(OBJECT_SLOTS):
            token, cls, drawn, upload = slots[4 * i : 4 * i + 4]
            if not (token or "").strip() and not (cls or "").strip():
                continue  # an unused slot
            tokens.append((token or "").strip())
            classes.append((cls or "").strip())
            masks.append(upload if upload is not None else mask_from_editor(drawn))
        request = ObjectRequest(
            image=image,
            name=(name or "").strip(),
            tokens=tokens,
            classes=classes,
            masks=masks if any(m is not None for m in masks) else [],
            # gradio's numbers as they are: ObjectRequest.config() converts and checks them
            **{field: getattr(s, field) for field in _OBJECT_METHOD},
            **_run_settings(
                s.default_lambda,
                s.resolution,
                s.overwrite,
                s.preview_every,
                s.precision,
                s.checkpointing,
            ),
        )
    except (OstafError, ValueError, TypeError) as e:
        return [], "", cards.error_html(e)
    return _run_job("objects", request)


def _auto_masks_ui(image, *tokens):
    """Automatic masks for the filled slots: overlays to check, masks into the file slots."""
    used = sum(1 for t in tokens if (t or "").strip()) or 1
    try:
        if image is None:
            raise InputError("upload the image first")
        found = [mask_overlay(image, m) for m in auto_masks(image.convert("RGB"), used)]
    except OstafError as e:
        return [[], cards.error_html(e)] + [gr.update()] * OBJECT_SLOTS
    files = [gr.update(value=m) for _, m in found]
    files += [gr.update()] * (OBJECT_SLOTS - len(files))
    note = "Automatic masks: check them; replace a wrong one by drawing or uploading."
    return [_for_gallery([o for o, _ in found]), html.escape(note), *files]


def _mask_editor(label, elem_id):
    """A mask drawn over the image: gradio 4 ImageEditor (Forge), gradio 3 sketch (A1111)."""
    if GRADIO4:
        return gr.ImageEditor(
            label=label,
            type="pil",
            brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
            eraser=gr.Eraser(),
            sources=["upload"],
            elem_id=elem_id,
        )
    return gr.Image(
        label=label, type="pil", tool="sketch", source="upload", brush_color="#ffffff",
        elem_id=elem_id,
    )  # fmt: skip


def _object_tab():
    dummy = gr.Textbox(visible=False, elem_id="ostaf_obj_dummy")
    slots, editors, files, tokens = [], [], [], []
    with gr.Row(equal_height=False):
        with gr.Column():
            image = gr.Image(
                label="Image with the object(s)", type="pil", elem_id="ostaf_obj_image"
            )
            name = gr.Textbox(label="Adapter name", placeholder="my_mug", elem_id="ostaf_obj_name")
            for i in range(OBJECT_SLOTS):
                with gr.Accordion(f"Object {i + 1}", open=i == 0, elem_id=f"ostaf_obj_{i}"):
                    with gr.Row():
                        token = gr.Textbox(
                            value="<obj1>" if i == 0 else "",
                            label=f"Object {i + 1}: new token",
                            placeholder=f"<obj{i + 1}>",
                            elem_id=f"ostaf_obj_token_{i}",
                        )
                        cls = gr.Textbox(
                            label=f"Object {i + 1}: class (what it is)",
                            placeholder="mug",
                            elem_id=f"ostaf_obj_class_{i}",
                        )
                    with gr.Row():
                        drawn = _mask_editor(
                            f"Object {i + 1}: draw the mask (white)", f"ostaf_obj_draw_{i}"
                        )
                        upload = gr.Image(
                            label=f"Object {i + 1}: …or a mask file (white = object)",
                            type="pil",
                            image_mode="L",
                            elem_id=f"ostaf_obj_mask_{i}",
                        )
                slots += [token, cls, drawn, upload]
                editors.append(drawn)
                files.append(upload)
                tokens.append(token)
            auto = gr.Button("Automatic masks (to check)", elem_id="ostaf_obj_auto")
            with gr.Row():
                steps = gr.Number(
                    value=OBJ.steps, precision=0, label="Steps", elem_id="ostaf_obj_steps"
                )
                embedding_steps = gr.Number(
                    value=OBJ.embedding_steps,
                    precision=0,
                    label="Token-only steps first",
                    elem_id="ostaf_obj_esteps",
                )
                rank = gr.Number(
                    value=OBJ.rank, precision=0, label="Rank", elem_id="ostaf_obj_rank"
                )
                seed = gr.Number(
                    value=OBJ.seed, precision=0, label="Seed", elem_id="ostaf_obj_seed"
                )
            with gr.Accordion("Method weights", open=False, elem_id="ostaf_obj_advanced"):
                with gr.Row():
                    lr = gr.Number(value=OBJ.lr, label="LoRA learning rate", elem_id="ostaf_obj_lr")
                    embedding_lr = gr.Number(
                        value=OBJ.embedding_lr, label="Token learning rate", elem_id="ostaf_obj_elr"
                    )
                with gr.Row():
                    class_weight = gr.Number(
                        value=OBJ.class_weight,
                        label="Class-characterizing regularization",
                        elem_id="ostaf_obj_class_weight",
                    )
                    background_weight = gr.Slider(
                        0.0, 1.0, value=OBJ.background_weight, step=0.05,
                        label="Loss weight outside the masks", elem_id="ostaf_obj_bg",
                    )  # fmt: skip
                run = _run_controls("ostaf_obj", OBJ, "Training size (0 = native)")
            interrupt, train = _train_buttons("ostaf_obj")
        gallery, log, result, share_dir = _result_column("ostaf_obj", name)
    # A1111 keys saved UI defaults (ui-config.json) by tab + label: the attribute tab's
    # labels (Steps, Rank, Seed, …) would be shared, so this tab's components opt out.
    shared = ("default_lambda", "preview_every", "overwrite", "precision", "checkpointing")
    shared_labels = [name, steps, rank, seed, *(run[k] for k in shared), log, gallery, share_dir]
    for component in shared_labels:
        component.do_not_save_to_config = True
    image.change(
        fn=_image_to_editors, inputs=wire(_image_to_editors, {"image": image}), outputs=editors
    )
    auto.click(
        fn=_auto_masks_ui,
        inputs=wire(_auto_masks_ui, {"image": image, "tokens": tokens}),
        outputs=[gallery, result, *files],
    )
    settings = {
        "steps": steps,
        "embedding_steps": embedding_steps,
        "rank": rank,
        "lr": lr,
        "embedding_lr": embedding_lr,
        "class_weight": class_weight,
        "background_weight": background_weight,
        "seed": seed,
        **run,
    }
    values = [*slots, *wire(_object_settings, settings)]
    train.click(
        fn=call_queue.wrap_gradio_gpu_call(_object_ui, extra_outputs=[[], ""]),
        _js="ostaf_start_implant",
        inputs=wire(_object_ui, {"id_task": dummy, "image": image, "name": name, "values": values}),
        outputs=[gallery, log, result],
    )
    interrupt.click(fn=_interrupt_ui, inputs=wire(_interrupt_ui, {}), outputs=[])


def _image_to_editors(image):
    """The drawing canvases start from the uploaded image: only the strokes need drawing."""
    return [image] * OBJECT_SLOTS


def _ui_tab():
    with gr.Blocks(analytics_enabled=False) as tab, gr.Tabs(elem_id="ostaf_tabs"):
        with gr.Tab("Attribute tuning", elem_id="ostaf_attribute_tab"):
            _attribute_tab()
        with gr.Tab("Object implantation", elem_id="ostaf_object_tab"):
            _object_tab()
    return [(tab, "OSTAF", "ostaf")]


def _attribute_tab():
    dummy = gr.Textbox(visible=False, elem_id="ostaf_dummy")
    with gr.Row(equal_height=False):
        with gr.Column():
            image = gr.Image(label="Reference image", type="pil", elem_id="ostaf_image")
            attribute = gr.Radio(
                list(ATTRIBUTE_CHOICES),
                value=ATTR.attribute,
                label=(
                    "Attribute to learn (shape+appearance: one file, a dial per part; "
                    "one part at a time works best)"
                ),
                elem_id="ostaf_attribute",
            )
            name = gr.Textbox(label="Adapter name", placeholder="my_texture", elem_id="ostaf_name")
            with gr.Row():
                token = gr.Textbox(
                    value=ATTR.token, label="Placeholder token", elem_id="ostaf_token"
                )
                prompt = gr.Textbox(
                    label="Training prompt ({token} = the token)",
                    placeholder=DEFAULT_PROMPTS[ATTR.attribute],
                    elem_id="ostaf_prompt",
                )
            with gr.Row():
                steps = gr.Number(
                    value=int(_opt("ostaf_default_steps")),
                    precision=0,
                    label="Steps",
                    elem_id="ostaf_steps",
                )
                rank = gr.Number(
                    value=int(_opt("ostaf_default_rank")),
                    precision=0,
                    label="Rank",
                    elem_id="ostaf_rank",
                )
                lr = gr.Number(
                    value=float(_opt("ostaf_default_lr") or 0.0),
                    label="Learning rate (0 = the attribute's default)",
                    elem_id="ostaf_lr",
                )
                seed = gr.Number(value=ATTR.seed, precision=0, label="Seed", elem_id="ostaf_seed")
            with gr.Accordion("Advanced", open=False, elem_id="ostaf_advanced"):
                network = gr.Radio(
                    list(OFFSET_NETWORKS),
                    value=ATTR.network,
                    label="Offset network (lora = ablation)",
                    elem_id="ostaf_network",
                )
                include_mid = gr.Checkbox(
                    ATTR.include_mid,
                    label="Also train the middle block",
                    elem_id="ostaf_include_mid",
                )
                attn = gr.CheckboxGroup(
                    list(ATTN_NAMES),
                    value=list(ATTR.attn),
                    label="Attention",
                    elem_id="ostaf_attn",
                )
                proj = gr.CheckboxGroup(
                    list(PROJ_NAMES),
                    value=list(ATTR.proj),
                    label="Projections",
                    elem_id="ostaf_proj",
                )
                blocks = gr.Textbox(
                    label="Blocks (diffusers ids, comma separated; empty = by attribute)",
                    placeholder="up_blocks.1.attentions.0, up_blocks.1.attentions.1",
                    elem_id="ostaf_blocks",
                )
                run = _run_controls("ostaf", ATTR, "Training size (0 = model's native)")
            interrupt, train = _train_buttons("ostaf")
        gallery, log, result, _ = _result_column("ostaf", name)
    inputs = {
        "id_task": dummy,
        "image": image,
        "attribute": attribute,
        "name": name,
        "token": token,
        "prompt": prompt,
        "steps": steps,
        "rank": rank,
        "lr": lr,
        "seed": seed,
        "network": network,
        "include_mid": include_mid,
        "attn": attn,
        "proj": proj,
        "blocks": blocks,
        **run,
    }
    train.click(
        fn=call_queue.wrap_gradio_gpu_call(_train_ui, extra_outputs=[[], ""]),
        _js="ostaf_start_training",
        inputs=wire(_train_ui, inputs),
        outputs=[gallery, log, result],
    )
    interrupt.click(fn=_interrupt_ui, inputs=wire(_interrupt_ui, {}), outputs=[])


def _share_row(prefix, name, result):
    """*Share*: the adapter named in ``name`` as a folder ready for a model hub
    (lib_ostaf.webui.share: LoRA, embeddings, card picture, README.md model card with hashes)."""
    with gr.Row():
        share_dir = gr.Textbox(
            label="Share to folder (empty: outputs/ostaf-share/<name>)",
            elem_id=f"{prefix}_share_dir",
        )
        share = gr.Button("Share", elem_id=f"{prefix}_share")
    share.click(
        fn=_share_ui,
        inputs=wire(_share_ui, {"name": name, "share_dir": share_dir}),
        outputs=[result],
    )
    return share_dir


def _share_ui(name, share_dir):
    name = str(name or "").strip()
    try:
        root = Path(getattr(shared.cmd_opts, "data_dir", "") or ".") / "outputs" / "ostaf-share"
        out = Path(share_dir.strip()) if str(share_dir or "").strip() else root / name
        path = share_adapter(REGISTRY.root, name, out)
    except (OstafError, OSError) as e:
        return cards.error_html(e)
    where = html.escape(str(Path(path).absolute()))
    ready = f"OSTAF: {html.escape(name)} is ready to upload in <code>{where}</code>"
    return f"<p>{ready} (its README.md is the model card).</p>"


def _run_controls(prefix, config, size_label):
    """The last rows of a sub-tab's advanced settings, by the names its Train function takes:
    preferred λ, training size, preview interval, overwrite, precision, checkpointing."""
    with gr.Row():
        default_lambda = gr.Number(
            value=config.default_lambda, label="Preferred λ", elem_id=f"{prefix}_default_lambda"
        )
        resolution = gr.Number(
            value=RUN.resolution,
            precision=0,
            label=size_label,
            elem_id=f"{prefix}_resolution",
        )
        preview_every = gr.Number(
            value=int(_opt("ostaf_preview_every")),
            precision=0,
            label="Preview every N steps (0 = off)",
            elem_id=f"{prefix}_preview_every",
        )
    overwrite = gr.Checkbox(
        RUN.overwrite, label="Overwrite an adapter of the same name", elem_id=f"{prefix}_overwrite"
    )
    precision, checkpointing = _memory_options(prefix, config)
    return {
        "default_lambda": default_lambda,
        "resolution": resolution,
        "preview_every": preview_every,
        "overwrite": overwrite,
        "precision": precision,
        "checkpointing": checkpointing,
    }


def _train_buttons(prefix):
    with gr.Row():
        interrupt = gr.Button("Interrupt", elem_id=f"{prefix}_interrupt")
        train = gr.Button("Train", variant="primary", elem_id=f"{prefix}_train")
    return interrupt, train


def _result_column(prefix, name):
    """Right-hand column: progress (JS), result gallery, log, result text, *Share*."""
    with gr.Column():
        gr.HTML(elem_id=f"{prefix}_textinfo")
        gallery = _result_gallery(f"{prefix}_gallery")
        log = gr.Textbox(label="Log", lines=6, interactive=False, elem_id=f"{prefix}_log")
        result = gr.HTML(elem_id=f"{prefix}_result")
        share_dir = _share_row(prefix, name, result)
    return gallery, log, result, share_dir


def _result_gallery(elem_id):
    """The live preview while training, then the λ-sweep strip. A wide strip is shown
    whole ("contain"); Gradio's default "cover" crops it to its middle."""
    return gr.Gallery(
        label="Live preview, then the λ sweep",
        show_label=True,
        elem_id=elem_id,
        columns=1,
        object_fit="contain",
        preview=True,
    )


def _memory_options(prefix, config):
    """Precision and gradient checkpointing (lib_ostaf.method.memory); 'auto' suits most GPUs."""
    with gr.Row():
        precision = gr.Radio(
            list(PRECISIONS),
            value=config.precision,
            label="Precision",
            elem_id=f"{prefix}_precision",
        )
        checkpointing = gr.Radio(
            list(CHECKPOINTING),
            value=config.gradient_checkpointing,
            label="Gradient checkpointing (less memory, ~30 % slower)",
            elem_id=f"{prefix}_checkpointing",
        )
    return precision, checkpointing


# --------------------------------------------------------------------------- API
def _api_runner(job, request):
    with call_queue.queue_lock:
        shared.state.begin(job="ostaf_train")
        try:
            request = _with_tower(request)
            return HOST.train_on_loaded_model(JOBS, job, request, REGISTRY.root, APPLIER)
        finally:
            shared.state.end()


def _auth_dependencies():
    """The WebUI's --api-auth on our routes too (HTTP basic), as on /sdapi."""
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    if not getattr(shared.cmd_opts, "api_auth", None):
        return []
    basic = HTTPBasic()

    def auth(credentials: HTTPBasicCredentials = Depends(basic)):  # noqa: B008
        if not check_basic_auth(
            shared.cmd_opts.api_auth, credentials.username, credentials.password
        ):
            raise HTTPException(
                status_code=401,
                detail="Incorrect username or password",
                headers={"WWW-Authenticate": "Basic"},
            )
        return True

    return [Depends(auth)]


def _add_routes(_demo, app):
    from fastapi import HTTPException

    api = OstafApi(REGISTRY, JOBS, _api_runner)
    deps = _auth_dependencies()

    def call(fn, *args):
        try:
            return fn(*args)
        except ApiError as e:
            raise HTTPException(status_code=e.status, detail=e.detail) from None

    def adapters():
        return call(api.list_adapters)

    def adapter(name: str):
        return call(api.adapter, name)

    def train(body: TrainBody):
        return call(api.train, body)

    def implant(body: ImplantBody):
        return call(api.implant, body)

    def progress(job_id: str = "", preview: bool = False):
        return call(api.progress, job_id or None, preview)

    def interrupt(job_id: str = ""):
        return call(api.interrupt, job_id or None)  # our job only, never shared.state

    def refresh():
        REGISTRY.forget()
        return call(api.list_adapters)

    write = api_enabled(shared.cmd_opts)
    if not write:
        print(f"OSTAF: {', '.join(WRITE_ROUTES)} not mounted (start the WebUI with --api)")
    for path, fn, method in (
        ("/adapters", adapters, "GET"),
        ("/adapter", adapter, "GET"),
        ("/train", train, "POST"),
        ("/implant", implant, "POST"),
        ("/progress", progress, "GET"),
        ("/interrupt", interrupt, "POST"),
        ("/refresh", refresh, "POST"),
    ):
        if write or path not in WRITE_ROUTES:
            app.add_api_route(PREFIX + path, fn, methods=[method], dependencies=deps)


# --------------------------------------------------------------------------- callbacks
def _before_ui():
    ui_extra_networks.register_page(ExtraNetworksPageOstaf())
    extra_networks.register_extra_network(ExtraNetworkOstaf())
    _add_xyz_axes()


def _model_loaded(sd_model):
    APPLIER.forget()


def _on_cfg_denoiser(params):
    """Before each model call of a pass: the step schedule's boundaries (start=/end=)."""
    denoiser = getattr(params, "denoiser", None)
    calls = getattr(denoiser, "step", params.sampling_step)
    step = schedule.webui_step(params.sampling_step, calls)
    for msg in APPLIER.on_step(shared.sd_model, step, params.total_sampling_steps):
        print(msg)


def _unloaded():
    APPLIER.reset(getattr(shared, "sd_model", None))


if SDNEXT:  # SD.Next registers every Script subclass in a script module's namespace
    del OstafScript
else:
    script_callbacks.on_before_ui(_before_ui)
    script_callbacks.on_ui_tabs(_ui_tab)
    script_callbacks.on_app_started(_add_routes)
    script_callbacks.on_model_loaded(_model_loaded)
    script_callbacks.on_cfg_denoiser(_on_cfg_denoiser)
    script_callbacks.on_script_unloaded(_unloaded)
