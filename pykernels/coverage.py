"""``python -m pykernels coverage``: which Hugging Face layer types ``pykernels.swap`` converts, skips (and why), or
does not handle at all.

Reads a list of layer type names (the project's seed ``000_5b8ca7d65ec66c80.txt``: the layer types of Hugging Face
models by task, markdown tables of ``| LayerType |`` under ``### <task>`` headings), and for every type whose name
says it is one of the kinds swap handles (attention, MLP, drop-path, ConvNeXt block, MBConv block):

1. finds its class in ``transformers`` (by reading the sources, without importing every model);
2. builds it from a small configuration (its model's config class with hidden size 32, 2 heads, MLP 64, ...), as
   ``Class(config)`` (or with ``layer_idx=0`` / ``dim=`` where the constructor wants them);
3. runs ``pykernels.swap(..., dry_run=True)`` over it with every kind, probe verification on.

Each type ends up ``converted`` (kind, replacement class), ``skipped`` (the reason swap reports), ``not built`` (why
it could not be instantiated from a small config) or ``not found``. Types whose names say they are none of those
kinds are counted, not listed. The result is a markdown table (``docs/coverage.md`` is this command's output).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from torch import nn

DEFAULT_LIST = Path(__file__).resolve().parents[2] / "shared" / "seeds" / "000_5b8ca7d65ec66c80.txt"

KIND_PATTERNS = {
    "attention": re.compile(r"(Attention|SelfAttention|MultiHeadAttention)$"),
    "mlp": re.compile(r"(MLP|Mlp|Intermediate|FFN|FeedForward|DenseActDense)$"),
    "drop_path": re.compile(r"(DropPath|StochasticDepth)$"),
    "convnext_block": re.compile(r"ConvNe[Xx]t\w*Layer$"),
    "mbconv": re.compile(r"(InvertedResidual|MBConv|EfficientNetBlock)$"),
}
ALL_KINDS = ["convnext_block", "mbconv", "mlp", "drop_path", "attention"]
SMALL = dict(
    hidden_size=32,
    num_attention_heads=2,
    num_key_value_heads=2,
    intermediate_size=64,
    num_hidden_layers=1,
    embed_dim=32,
    d_model=32,
    d_ff=64,
    d_kv=16,
    num_heads=2,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    n_embd=32,
    n_head=2,
    n_inner=64,
    head_dim=16,
)


@dataclass
class Entry:
    task: str
    layer: str
    kind: str
    status: str  # converted / skipped / not built / not found
    detail: str


def read_layer_types(path: Path) -> dict[str, list[str]]:
    """{task: [layer type, ...]} from the seed's ``### <task>`` / ``| Layer Type |`` tables."""
    tasks: dict[str, list[str]] = {}
    task = None
    in_components = False
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            in_components = "Component" in line and "Task-Specific" in line
        elif line.startswith("### ") and in_components:
            task = line[4:].strip()
            tasks.setdefault(task, [])
        elif in_components and task and line.startswith("| ") and not line.startswith("| Layer Type"):
            name = line.strip("| ").strip()
            if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                tasks[task].append(name)
    return tasks


def kind_of(name: str) -> str | None:
    for kind, pattern in KIND_PATTERNS.items():
        if pattern.search(name):
            return kind
    return None


_CLASS_INDEX: dict[str, list[Path]] = {}


def _class_index() -> dict[str, list[Path]]:
    """{class name: [modeling files defining it]} over transformers' model sources (read once, nothing imported)."""
    if not _CLASS_INDEX:
        import transformers

        root = Path(transformers.__file__).parent / "models"
        for path in sorted(root.glob("*/modeling_*.py")):
            for name in re.findall(r"^class (\w+)\(", path.read_text(errors="ignore"), flags=re.M):
                _CLASS_INDEX.setdefault(name, []).append(path)
    return _CLASS_INDEX


def _find_class(name: str):
    """(class, its modeling module) for a transformers layer type."""
    for path in _class_index().get(name, []):
        try:
            module = importlib.import_module(f"transformers.models.{path.parent.name}.{path.stem}")
        except Exception:  # noqa: BLE001 - a model whose optional dependency is missing here
            continue
        cls = getattr(module, name, None)
        if cls is not None:
            return cls, module
    return None, None


def _small_config(module):
    """The model's config class with small sizes (and its sub-configs small too)."""
    package = module.__name__.rsplit(".", 1)[0]
    config_module = importlib.import_module(
        package + "." + module.__name__.rsplit(".", 1)[1].replace("modeling_", "configuration_")
    )
    candidates = [
        c
        for _, c in inspect.getmembers(config_module, inspect.isclass)
        if c.__name__.endswith("Config") and c.__module__ == config_module.__name__
    ]
    if not candidates:
        raise LookupError(f"no config class in {config_module.__name__}")
    configs = []
    for cls in candidates:
        try:
            config = cls()
        except Exception:  # noqa: BLE001 - a config that needs arguments: not this one
            continue
        for key, value in SMALL.items():
            if isinstance(getattr(config, key, None), int):
                setattr(config, key, value)
        configs.append(config)
    if not configs:
        raise LookupError(f"no config class of {config_module.__name__} builds without arguments")
    return configs


# constructor arguments besides the config, by name
_ARGS = {
    "dim": 32,
    "hidden_size": 32,
    "embed_dim": 32,
    "in_features": 32,
    "num_heads": 2,
    "num_attention_heads": 2,
    "window_size": 4,
    "intermediate_size": 64,
    "layer_idx": 0,
    "drop_prob": 0.1,
    "drop_path_rate": 0.1,
}


def _build(cls, configs):
    """An instance from the first config it accepts, other required constructor arguments filled by name."""
    try:
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        params = []
    errors = []
    for config in configs:
        args, kwargs, missing = [], {}, []
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if p.name == "config" or "config" in p.name:
                value = config
            elif p.name in _ARGS:
                value = _ARGS[p.name]
            elif p.default is not p.empty:
                continue
            else:
                missing.append(p.name)
                continue
            if p.kind == p.POSITIONAL_ONLY:
                args.append(value)
            else:
                kwargs[p.name] = value
        if missing:
            return None, f"constructor needs {', '.join(missing)}"
        if getattr(config, "_attn_implementation", "") is None:  # set by from_pretrained / a model, not the config
            with contextlib.suppress(Exception):
                config._attn_implementation = "sdpa"
        # window_size: an int for Swin-like layers, a (height, width) tuple for BEiT-like ones
        variants = [kwargs] + ([{**kwargs, "window_size": (4, 4)}] if "window_size" in kwargs else [])
        for attempt in variants:
            try:
                with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                    warnings.simplefilter("ignore")
                    return cls(*args, **attempt), None
            except Exception as exc:  # noqa: BLE001 - reported as "not built"
                errors.append(f"{type(config).__name__}: {type(exc).__name__}: {exc}")
    return None, (errors[0][:160] if errors else "no constructor call worked")


def classify(task: str, name: str) -> Entry:
    import pykernels

    kind = kind_of(name)
    cls, module = _find_class(name)
    if cls is None:
        return Entry(task, name, kind, "not found", "no class of this name in this transformers version")
    try:
        configs = _small_config(module)
    except Exception as exc:  # noqa: BLE001
        return Entry(task, name, kind, "not built", f"config: {exc}"[:160])
    layer, why = _build(cls, configs)
    if layer is None:
        return Entry(task, name, kind, "not built", why)
    holder = nn.ModuleDict({"layer": layer.eval()})
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        report = pykernels.swap(holder, include=ALL_KINDS, dry_run=True)
    top = [r for r in report.replaced if r.path == "layer"]
    if top:
        return Entry(task, name, top[0].kind, "converted", f"-> {top[0].new}")
    skipped = [s for s in report.skipped if s.path == "layer"]
    if skipped:
        return Entry(task, name, skipped[0].kind, "skipped", skipped[0].reason)
    inner = [f"{r.path.removeprefix('layer.')} -> {r.new}" for r in report.replaced]
    if inner:
        return Entry(task, name, kind, "converted inside", ", ".join(inner)[:160])
    return Entry(task, name, kind, "skipped", "not a layout swap matches (a container, or another layer type)")


def run(path: Path = DEFAULT_LIST, progress=print) -> tuple[list[Entry], dict[str, int]]:
    tasks = read_layer_types(path)
    entries, other = [], {}
    seen: dict[str, Entry] = {}
    total = sum(1 for names in tasks.values() for n in names if kind_of(n))
    done = 0
    for task, names in tasks.items():
        other[task] = sum(1 for n in names if kind_of(n) is None)
        for name in names:
            if kind_of(name) is None:
                continue
            done += 1
            if name not in seen:
                seen[name] = classify(task, name)
                progress(f"[{done}/{total}] {name}: {seen[name].status}")
            entry = seen[name]
            entries.append(Entry(task, name, entry.kind, entry.status, entry.detail))
    return entries, other


def markdown(entries: list[Entry], other: dict[str, int], source: Path) -> str:
    import torch
    import transformers

    counts: dict[str, int] = {}
    for e in {e.layer: e for e in entries}.values():
        counts[e.status] = counts.get(e.status, 0) + 1
    lines = [
        "# Coverage: Hugging Face layer types and `pykernels.swap`",
        "",
        f"Written by `python -m pykernels coverage` from `{source.name}` (the layer types of Hugging Face models by "
        f"task) with transformers {transformers.__version__}, torch {torch.__version__}. Each layer type whose name "
        "says it is an attention, MLP, drop-path, ConvNeXt or MBConv layer is built from a small config and given to "
        "`pykernels.swap(..., dry_run=True)` with every kind (probe verification on).",
        "",
        "Distinct layer types: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ".",
        "",
        "| task | layer type | kind | swap | detail |",
        "|---|---|---|---|---|",
    ]
    for e in entries:
        detail = e.detail.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {e.task} | `{e.layer}` | {e.kind} | {e.status} | {detail} |")
    lines += ["", "Other layer types (embeddings, norms, containers, heads, ...), not a kind swap handles:", ""]
    lines += [f"- {task}: {n}" for task, n in other.items()]
    return "\n".join(lines) + "\n"
