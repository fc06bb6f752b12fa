"""Command line: ``python -m lib_ostaf {train,implant,generate,sweep,share,demo}``."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from PIL import Image

from lib_ostaf.errors import InputError, OstafError
from lib_ostaf.files.adapter_file import AdapterFile, load_adapter
from lib_ostaf.files.filenames import ADAPTER_SUFFIX, PREVIEW_SUFFIX
from lib_ostaf.hosts.devices import DTYPES
from lib_ostaf.method.embeddings import (
    adapter_embeddings,
    load_embedding,
    scaled_embeddings,
    validate_token,
)
from lib_ostaf.method.images import grid
from lib_ostaf.method.memory import CHECKPOINTING, PRECISIONS
from lib_ostaf.method.offsets import check_lambda
from lib_ostaf.method.parts import part_names, token_weight
from lib_ostaf.method.schedule import StepSchedule
from lib_ostaf.method.train import ATTRIBUTE_CHOICES, AttributeConfig
from lib_ostaf.webui.prompt_tags import Dials
from lib_ostaf.webui.run_settings import RUN

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_IMAGE = ASSETS / "reference.png"
DEFAULT_OUT = Path("ostaf_adapters")
SWEEP_LAMBDAS = ",".join(f"{lam:g}" for lam in RUN.sweep)  # the WebUI's result strip too


def resolve_adapter(spec: str, adapters_dir: Path) -> tuple[AdapterFile, float | None]:
    """``name``, ``name:λ``, ``path.safetensors`` or ``path.safetensors:λ`` → (file, λ)."""
    lam: float | None = None
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            lam = check_lambda(tail)
            spec = head
        except InputError:
            if not Path(spec).exists():
                raise
    path = Path(spec)
    if path.suffix != ADAPTER_SUFFIX:
        path = adapters_dir / (spec + ADAPTER_SUFFIX)
    if not path.exists():
        raise InputError(f"adapter not found: {path}")
    return load_adapter(path), lam


def resolve_request(spec: str, adapters_dir: Path) -> tuple[AdapterFile, float | None, Dials]:
    """:func:`resolve_adapter` plus trailing dials, as in a prompt tag:
    ``name:1:shape=0.5:appearance=1.2:start=0.2:end=0.8``."""
    items = spec.split(":")
    split = len(items)
    while split > 1 and "=" in items[split - 1]:
        split -= 1
    dials = Dials.parse(items[split:])
    adapter, lam = resolve_adapter(":".join(items[:split]), adapters_dir)
    names = part_names(adapter)
    unknown = [p for p, _ in dials.parts if p not in names]
    if unknown:
        has = ", ".join(names) or "none recorded"
        raise InputError(f"{adapter.name} has no {', '.join(unknown)} part (its parts: {has})")
    return adapter, lam, dials


def lambda_sweep(
    host,
    adapter: AdapterFile,
    prompts: Sequence[str],
    lambdas: Sequence[float],
    *,
    seed: int,
    steps: int,
    embeddings: dict | None = None,
) -> Image.Image:
    """Rows = prompts, columns = λ; the same seed in every cell. Model restored after.

    ``embeddings``: the adapter's tokens. Object tokens stay on at every λ (λ scales the
    LoRA); an attribute adapter's learned placeholder is scaled with λ as ΔW is."""
    cells = []
    extra = {
        lam: {"embeddings": scaled_embeddings(adapter, embeddings, lam, host.text_encoders)}
        if embeddings
        else {}
        for lam in lambdas
    }
    try:
        for prompt in prompts:
            for lam in lambdas:
                host.apply_adapters([(adapter, lam)])
                cells.append(host.generate(prompt, seed=seed, steps=steps, **extra[lam]))
    finally:
        host.apply_adapters([])
    return grid(cells, len(lambdas), [f"lambda {lam:g}" for lam in lambdas])


def _generate(args: argparse.Namespace) -> int:
    host = _load(args)
    adapters, windows = [], []
    embeddings: dict = {}
    for spec in args.adapter:
        adapter, lam, dials = resolve_request(spec, args.adapters_dir)
        lam = adapter.default_lambda if lam is None else lam
        adapters.append((adapter, lam, dict(dials.parts)))
        windows.append((dials.start, dials.end))
        found = adapter_embeddings(adapter, host.family)
        token_lam = token_weight(adapter, lam, dict(dials.parts))
        embeddings |= scaled_embeddings(adapter, found, token_lam, host.text_encoders)
    for spec in args.embedding:
        token, vectors = _embedding_file(spec, host.family)
        embeddings[token] = vectors
    if embeddings:
        print(f"tokens: {', '.join(embeddings)}")
    schedule = StepSchedule(adapters, windows)

    def on_step(step: int, total: int) -> None:  # only where the active set changes
        on = schedule.at(step, total)
        if on is not None:
            host.apply_adapters(on)

    host.apply_adapters(schedule.first())
    try:
        image = host.generate(
            args.prompt,
            seed=args.seed,
            steps=args.steps,
            guidance=args.guidance,
            negative_prompt=args.negative,
            size=args.size,
            on_step=on_step if schedule.scheduled else None,
            **({"embeddings": embeddings} if embeddings else {}),
        )
    finally:
        host.apply_adapters([])
    image.save(args.output)
    print(f"wrote {args.output}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lib_ostaf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_train_parser, _implant_parser, _generate_parser, _sweep_parser):
        add(sub)
    _share_parser(sub)
    _demo_parser(sub)
    # --debug before or after the command; SUPPRESS keeps a subcommand from resetting it
    parser.add_argument("--debug", action="store_true", help="tracebacks for internal errors")
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    return parser


def _model_args(p: argparse.ArgumentParser, resolution: bool = False) -> None:
    """--model, --device, --dtype (and --resolution for training)."""
    p.add_argument(
        "--model",
        default=None,
        help="diffusers folder or .safetensors checkpoint; default: the embedded tiny model",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA, then MPS, then CPU; the embedded tiny models: CPU), cuda, "
        "cuda:N, mps or cpu",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="weights' dtype; auto: bf16 on a CUDA GPU that has it, else fp16 on a GPU, "
        "fp32 on the CPU",
    )
    if resolution:
        p.add_argument(
            "--resolution",
            type=int,
            default=None,
            help="training size in pixels, a multiple of 8 (default: the model's own)",
        )


def _training_run_args(p: argparse.ArgumentParser, config: Any, state: str) -> None:
    """What every training command shares: --overwrite, --save-state (``state``: what the
    state file holds), --precision and --gradient-checkpointing (defaults: the config's),
    and the model flags."""
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--save-state",
        action="store_true",
        help=f"also write <name>.ostaf-state ({state}; several times the LoRA's size; "
        "nothing in OSTAF reads it back)",
    )
    p.add_argument(
        "--precision", choices=PRECISIONS, default=None, help=f"default {config.precision}"
    )
    p.add_argument(
        "--gradient-checkpointing",
        choices=CHECKPOINTING,
        default=None,
        help=f"default {config.gradient_checkpointing}",
    )
    _model_args(p, resolution=True)


def _config_flags(p: argparse.ArgumentParser, kind: type, *names: str) -> None:
    """``--<name>`` flags of a config field: None when not given, the config's default."""
    for name in names:
        p.add_argument(f"--{name}", type=kind, default=None)


def _train_parser(sub: argparse._SubParsersAction) -> None:
    """train: flags default to None, AttributeConfig fills them in"""
    t = sub.add_parser("train", help="train an OSTAF adapter from one reference image")
    t.add_argument("--image", required=True, type=Path)
    t.add_argument("--attribute", required=True, choices=ATTRIBUTE_CHOICES)
    t.add_argument("--name", required=True, help="output name (file stem)")
    t.add_argument("--out", type=Path, default=DEFAULT_OUT)
    t.add_argument(
        "--token", default=None, help=f"placeholder word (default {AttributeConfig.token})"
    )
    t.add_argument("--prompt", default=None, help="training prompt containing {token}")
    _config_flags(t, int, "steps", "rank", "seed")
    _config_flags(t, float, "lr", "default-lambda")
    t.add_argument("--network", choices=("hypernet", "lora"), default=None)
    t.add_argument("--include-mid", action="store_true", default=None)
    t.add_argument(
        "--blocks", default=None, help="comma-separated diffusers block ids (expert override)"
    )
    _training_run_args(t, AttributeConfig, state="the hypernetwork's parameters")


def _implant_parser(sub: argparse._SubParsersAction) -> None:
    """implant: flags default to None, ObjectConfig fills them in"""
    from lib_ostaf.method.objects import ObjectConfig

    o = sub.add_parser(
        "implant",
        help="implant the object(s) of one image as new tokens (Lu, Xie, Guo 2024)",
        description="One --token and one --class per object, in the same order; one --mask "
        "per object or none (automatic masks, saved beside the output).",
    )
    o.add_argument("--image", required=True, type=Path)
    o.add_argument("--token", action="append", default=[], help="new word, e.g. <mug1>")
    o.add_argument(
        "--class", dest="classes", action="append", default=[], help="class word, e.g. mug"
    )
    o.add_argument("--mask", action="append", default=[], type=Path, help="white = object")
    o.add_argument("--name", required=True, help="output name (file stem)")
    o.add_argument("--out", type=Path, default=DEFAULT_OUT)
    o.add_argument(
        "--embeddings-dir",
        type=Path,
        default=None,
        help="where the portable embeddings go (default <out>/<name>.embeddings)",
    )
    o.add_argument(
        "--bundle", action="store_true", help="also write <name>.a1111.safetensors (bundle_emb)"
    )
    o.add_argument(
        "--clip",
        default=None,
        help="CLIP image tower folder for the prototypical embedding; 'auto' (local cache, "
        "default) or 'none' (class word)",
    )
    _config_flags(o, int, "steps", "embedding-steps", "rank", "prototype-steps", "seed")
    _config_flags(o, float, "lr", "embedding-lr", "background-weight", "feather", "default-lambda")
    o.add_argument("--class-weight", type=float, default=None, help="0 disables")
    o.add_argument("--probe", type=int, default=None, help="probe draws per prompt")
    o.add_argument("--no-flip", action="store_true")
    _training_run_args(o, ObjectConfig, state="the hypernetwork's parameters and token vectors")


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    """generate: sampling settings of one image"""
    g = sub.add_parser("generate", help="generate with adapters applied")
    g.add_argument("--prompt", required=True)
    g.add_argument(
        "--adapter",
        action="append",
        default=[],
        help="name[:λ][:shape=λ:appearance=λ][:start=f:end=f] or file[:λ…]; repeatable",
    )
    g.add_argument("--adapters-dir", type=Path, default=DEFAULT_OUT)
    g.add_argument(
        "--embedding",
        action="append",
        default=[],
        help="extra token embedding file[:token] (.safetensors); object adapters load theirs",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--guidance", type=float, default=5.0)
    g.add_argument("--negative", default="")
    g.add_argument("--size", type=int, default=None)
    g.add_argument("--output", type=Path, default=Path("ostaf.png"))
    _model_args(g)


def _sweep_parser(sub: argparse._SubParsersAction) -> None:
    """sweep: a grid of λ values × prompts"""
    s = sub.add_parser("sweep", help="a λ-sweep grid of one adapter")
    s.add_argument("--adapter", required=True)
    s.add_argument("--adapters-dir", type=Path, default=DEFAULT_OUT)
    s.add_argument("--prompt", action="append", required=True, help="repeatable: one row each")
    s.add_argument("--lambdas", default=SWEEP_LAMBDAS)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--output", type=Path, default=Path("ostaf_sweep.png"))
    _model_args(s)


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    """demo: the README's first command"""
    d = sub.add_parser(
        "demo", help="train on the bundled reference with the tiny model, write a λ sweep"
    )
    d.add_argument("--out", type=Path, default=Path("demo_out"))
    d.add_argument("--steps", type=int, default=150)


def _share_parser(sub: argparse._SubParsersAction) -> None:
    h = sub.add_parser(
        "share",
        help="write a folder ready for a model hub: LoRA, embeddings, previews, model card",
        description="Nothing is uploaded; docs/sharing.md says how to upload the folder.",
    )
    h.add_argument("name", help="adapter name (file stem in --adapters-dir)")
    h.add_argument("--out", required=True, type=Path, help="folder to write (new or empty)")
    h.add_argument("--adapters-dir", type=Path, default=DEFAULT_OUT)
    h.add_argument("--base-model", default=None, help="Hugging Face id for the model card")
    h.add_argument(
        "--sweep", action="store_true", help="render a fresh λ sweep with --model for the card"
    )
    h.add_argument(
        "--prompt",
        action="append",
        default=[],
        help="sweep row (repeatable; default: the adapter's training prompt)",
    )
    h.add_argument("--lambdas", default=SWEEP_LAMBDAS)
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--steps", type=int, default=20)
    h.add_argument("--overwrite", action="store_true", help="replace files in a non-empty --out")
    _model_args(h)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM: unwind like Ctrl-C (temp files removed)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(args)
    except OstafError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; files already in place are untouched", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: one line, the traceback on request
        if args.debug:
            traceback.print_exc()
        detail = " ".join(str(exc).split())  # one line, whatever the message
        what = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        print(f"error: internal error: {what}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    commands = {
        "train": _train,
        "implant": _implant,
        "share": _share,
        "generate": _generate,
        "sweep": _sweep,
        "demo": _demo,
    }
    return commands[args.command](args)


def _train(args: argparse.Namespace) -> int:
    from lib_ostaf.method.train import AttributeConfig, Callbacks, export, train_attribute

    blocks = tuple(b.strip() for b in args.blocks.split(",")) if args.blocks else None
    config = _config_from_flags(AttributeConfig(attribute=args.attribute), args, blocks=blocks)
    host = _load(args)
    result = train_attribute(host, args.image, config, Callbacks(progress=_print_progress))
    path = export(result, args.out, args.name, overwrite=args.overwrite, save_state=args.save_state)
    print(f"\nloss on probe set: {result.probe_loss_before:.4f} → {result.probe_loss_after:.4f}")
    print(f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB, {len(result.targets)} layers)")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    host = _load(args)
    adapter, _ = resolve_adapter(args.adapter, args.adapters_dir)
    lambdas = [check_lambda(x) for x in args.lambdas.split(",") if x.strip()]
    if not lambdas:
        raise InputError("--lambdas needs at least one value")
    embeddings = adapter_embeddings(adapter, host.family)
    image = lambda_sweep(
        host, adapter, args.prompt, lambdas, seed=args.seed, steps=args.steps,
        embeddings=embeddings or None,
    )  # fmt: skip
    image.save(args.output)
    print(f"wrote {args.output}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """The README's first command: the bundled reference on the embedded tiny model."""
    from lib_ostaf.hosts.diffusers_host import DiffusersHost
    from lib_ostaf.method.train import AttributeConfig, Callbacks, export, train_attribute

    host = DiffusersHost.load(None)
    config = AttributeConfig(attribute="appearance", steps=args.steps, seed=0)
    result = train_attribute(host, DEMO_IMAGE, config, Callbacks(progress=_print_progress))
    path = export(result, args.out, "demo_appearance", overwrite=True)
    adapter = load_adapter(path)
    prompts = [
        config.training_prompt,
        "a photo of a ostafv textured circle",
        "a blue ostafv textured star",
    ]
    sweep = lambda_sweep(
        host, adapter, prompts, list(RUN.sweep), seed=0, steps=20,
        embeddings=adapter_embeddings(adapter, host.family) or None,
    )  # fmt: skip
    sweep_path = args.out / "demo_sweep.png"
    sweep.save(sweep_path)
    print(f"\nloss on probe set: {result.probe_loss_before:.4f} → {result.probe_loss_after:.4f}")
    print(f"wrote {path} and {sweep_path}")
    return 0


def _load(args: argparse.Namespace):
    """The command's model on ``--device`` in ``--dtype`` (at ``--resolution`` if it has one)."""
    from lib_ostaf.hosts.diffusers_host import DiffusersHost

    return DiffusersHost.load(
        args.model,
        device=args.device,
        dtype=args.dtype,
        resolution=getattr(args, "resolution", None),
    )


def _embedding_file(spec: str, family: str):
    """``file.safetensors`` or ``file.safetensors:token`` → (token, vectors)."""
    path, token = Path(spec), None
    head, sep, tail = spec.rpartition(":")
    if sep and head.endswith(ADAPTER_SUFFIX) and not path.exists():
        path, token = Path(head), validate_token(tail)
    if not path.is_file():
        raise InputError(f"embedding not found: {path}")
    name, vectors = load_embedding(path, family)
    return token or name, vectors


def _config_from_flags(config: Any, args: argparse.Namespace, **special: Any) -> Any:
    """``config`` with the flags that were given (None: the config's default): each flag that
    bears a config field's name, then ``special`` (the flags named or spelt otherwise)."""
    given = {f.name: getattr(args, f.name) for f in fields(config) if hasattr(args, f.name)}
    given.update(special)
    return replace(config, **{k: v for k, v in given.items() if v is not None})


def _implant(args: argparse.Namespace) -> int:
    from lib_ostaf.method.objects import (
        ObjectConfig,
        export_objects,
        objects_from_lists,
        planned_files,
        refuse_existing,
        train_objects,
    )
    from lib_ostaf.method.train import Callbacks

    objects = objects_from_lists(args.token, args.classes, args.mask)
    config = _config_from_flags(
        ObjectConfig(), args, n_probe=args.probe, flip=False if args.no_flip else None
    )
    tokens = [o.token for o in objects]
    where = {"embeddings_dir": args.embeddings_dir, "save_state": args.save_state}
    planned = planned_files(
        args.out, args.name, tokens, [not args.mask] * len(objects), bundle=args.bundle, **where
    )
    if not args.overwrite:
        refuse_existing(planned)  # before training: a clash costs nothing
    host = _load(args)
    result = train_objects(host, args.image, objects, config, Callbacks(progress=_print_progress))
    files = export_objects(
        result, args.out, args.name, overwrite=args.overwrite, bundle=args.bundle, **where
    )
    _print_implant_summary(result)
    for path in files.all():
        print(f"wrote {path}")
    return 0


def _print_implant_summary(result: Any) -> None:
    print()
    for p in result.prototypes:
        if p.cos_prototype is not None:
            print(
                f"{p.token}: prototypical embedding ({p.encoder}), cosine to the prototype "
                f"{p.cos_class_word:.3f} (class word) → {p.cos_prototype:.3f}"
            )
        else:
            print(f"{p.token}: initialised from its class word ({p.note})")
    for label, (before, after) in result.probe.items():
        print(f"object loss '{label}': {before:.4f} → {after:.4f}")


def _share(args: argparse.Namespace) -> int:
    """``share``: every input checked before the model loads; the sweep only on request."""
    from lib_ostaf.webui.share import plan_share, preview_prompt, write_share

    plan = plan_share(
        args.adapters_dir,
        args.name,
        args.out,
        base_model=args.base_model,
        overwrite=args.overwrite,
    )
    if args.prompt and not args.sweep:
        raise InputError("--prompt sets the rows of a --sweep; add --sweep")
    sweep, prompts, lambdas = None, list(args.prompt), []
    if args.sweep:
        lambdas = [check_lambda(x) for x in args.lambdas.split(",") if x.strip()]
        if not lambdas:
            raise InputError("--lambdas needs at least one value")
        prompts = prompts or [preview_prompt(plan.adapter)]
        host = _load(args)
        embeddings = adapter_embeddings(plan.adapter, host.family)
        sweep = lambda_sweep(
            host,
            plan.adapter,
            prompts,
            lambdas,
            seed=args.seed,
            steps=args.steps,
            embeddings=embeddings or None,
        )
    out = write_share(plan, sweep=sweep, sweep_prompts=prompts, sweep_lambdas=lambdas)
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        print(f"wrote {path}")
    if sweep is None and not (out / (plan.name + PREVIEW_SUFFIX)).exists():
        print("no preview picture: add --sweep to render a λ sweep for the card")
    return 0


def _print_progress(step: int, total: int, loss: float) -> None:
    if step == total or step % max(1, total // 20) == 0:
        print(f"\rstep {step}/{total}  loss {loss:.4f}", end="", flush=True)
