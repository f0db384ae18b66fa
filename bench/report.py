"""Report writer: one pytest-benchmark run -> ``bench/results/<device-slug>.md`` + ``.json`` + ``.png``.

Usage::

    python -m pytest bench --benchmark-only --benchmark-json=bench/results/latest.raw.json
    python bench/report.py bench/results/latest.raw.json [--out-dir bench/results] [--name SLUG]

``pytest --benchmark-only`` runs this at the end of the session already (``bench/conftest.py``). The input may
also be a report's own JSON (``bench/results/<slug>.json``): its markdown and plot are drawn again from it.

Generic over ops: benchmarks are grouped by their pytest-benchmark group (``op[case]``, set by
``bench/conftest.py``), and within a group by ``extra_info["provider"]``. Per case the report gives each provider's
median and min time, GB/s (from ``extra_info["ideal_bytes"]``) or TFLOP/s (from ``extra_info["flops"]``), the bytes
saved for backward, and its speed relative to the ``eager`` and ``compile-eager`` providers of the same run
(``baseline median / provider median``; > 1 is faster). Case-level facts (shape, layout, dtype, ...) are the
``extra_info`` entries that all providers of the case share. The PNG has one small panel per op and per whole
model (``op == "model"``): speed-up vs eager per case, providers as grouped bars, ``torch.compile`` of the eager
version (and with freezing) as lines across each case's bars.

Needs only the standard library and matplotlib (no torch).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

BASELINES = ("eager", "compile-eager")
PROVIDER_ORDER = (
    "eager",
    "eager-explicit",
    "nn-mha",
    "pykernels",
    "compile-eager",
    "compile-eager-freezing",
    "compile-pykernels",
)
# extra_info keys that are per provider (shown in the table) or bookkeeping, never in a case's description
_NOT_CASE_INFO = {
    "device",
    "device_name",
    "op",
    "case",
    "provider",
    "backend",
    "first_call_s",
    "rounds",
    "gbps",
    "tflops",
    "saved_bytes",
    "saved_extra_bytes",
    "saved_tensors",
    "peak_mem_bytes",
    "peak_mem_over_base_bytes",
    "compile_options",
}
MB = 1e6


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _provider(bench: dict) -> str:
    return bench.get("extra_info", {}).get("provider") or (bench.get("params") or {}).get("provider") or bench["name"]


def _group(bench: dict) -> str:
    info = bench.get("extra_info", {})
    if bench.get("group"):
        return bench["group"]
    if "op" in info and "case" in info:
        return f"{info['op']}[{info['case']}]"
    return re.sub(r"\[.*\]$", "", bench["name"])


def _ratio(baseline: float | None, value: float) -> float | None:
    return None if baseline is None or value <= 0 else round(baseline / value, 3)


def _order(provider: str, first_seen: dict[str, int]) -> tuple[int, int]:
    if provider in PROVIDER_ORDER:
        return (0, PROVIDER_ORDER.index(provider))
    return (1, first_seen[provider])


def summarize(raw: dict) -> dict[str, Any]:
    """The compact form of a run: environment + per case, per provider the figures and ratios."""
    machine = raw.get("machine_info", {})
    env = dict(machine.get("pykernels") or {})
    if not env:  # a JSON written without bench/conftest.py: what pytest-benchmark knows
        cpu = machine.get("cpu", {})
        env = {"device_type": "cpu", "device_name": cpu.get("brand_raw") or machine.get("processor") or "unknown"}
    groups: dict[str, list[dict]] = {}
    for bench in raw.get("benchmarks", []):
        groups.setdefault(_group(bench), []).append(bench)

    cases = {}
    for group, benches in groups.items():
        first_seen = {_provider(b): i for i, b in reversed(list(enumerate(benches)))}
        benches = sorted(benches, key=lambda b: _order(_provider(b), first_seen))
        infos = [b.get("extra_info", {}) for b in benches]
        shared = {
            k: v for k, v in infos[0].items() if k not in _NOT_CASE_INFO and all(i.get(k) == v for i in infos[1:])
        }
        medians = {_provider(b): b["stats"]["median"] for b in benches}
        providers = {}
        for bench, info in zip(benches, infos, strict=True):
            stats, name = bench["stats"], _provider(bench)
            median = stats["median"]
            row: dict[str, Any] = {
                "backend": info.get("backend"),
                "median_ms": round(median * 1e3, 4),
                "min_ms": round(stats["min"] * 1e3, 4),
                "iqr_ms": round(stats.get("iqr", 0.0) * 1e3, 4),
                "rounds": stats.get("rounds"),
            }
            if info.get("ideal_bytes"):
                row["gbps"] = round(info["ideal_bytes"] / median / 1e9, 2)
            if info.get("flops"):
                row["tflops"] = round(info["flops"] / median / 1e12, 3)
            if "saved_bytes" in info:
                row["saved_mb"] = round(info["saved_bytes"] / MB, 3)
                row["saved_extra_mb"] = round(info.get("saved_extra_bytes", 0) / MB, 3)
            if "peak_mem_bytes" in info:
                row["peak_mem_mb"] = round(info["peak_mem_bytes"] / MB, 1)
                row["peak_mem_over_base_mb"] = round(info.get("peak_mem_over_base_bytes", 0) / MB, 1)
            if "first_call_s" in info:
                row["first_call_s"] = info["first_call_s"]
            for baseline in BASELINES:
                row[f"vs_{baseline.replace('-', '_')}"] = _ratio(medians.get(baseline), median)
            providers[name] = row
        cases[group] = {"info": shared, "providers": providers}

    return {
        "device_name": env.get("device_name", "unknown"),
        "device_slug": env.get("device_slug") or slugify(env.get("device_name", "unknown")),
        "env": env,
        "run_datetime": raw.get("datetime"),
        "commit": raw.get("commit_info", {}).get("id"),
        "commit_dirty": raw.get("commit_info", {}).get("dirty"),
        "bench_command": raw.get("pykernels_command"),
        "cases": cases,
    }


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def _fmt_info(key: str, value: Any) -> str:
    if key == "ideal_bytes":
        return f"ideal bytes per step {_human_bytes(value)}"
    if key == "flops":
        return f"FLOPs per step {value:.4g}"
    if isinstance(value, list):
        value = str(tuple(value))
    return f"{key.replace('_', ' ')} {value}"


def _dumps(data: Any, indent: int = 0) -> str:
    """JSON with one line per innermost object (compact, still diff-friendly)."""
    if not isinstance(data, dict) or not any(isinstance(v, dict) for v in data.values()):
        return json.dumps(data)
    pad = " " * (indent + 1)
    items = [f"{pad}{json.dumps(k)}: {_dumps(v, indent + 1)}" for k, v in data.items()]
    return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"


def _when(iso: str | None) -> str:
    if not iso:
        return "unknown"
    try:
        return dt.datetime.fromisoformat(iso).astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return iso


def render_markdown(summary: dict, report_command: str, png_name: str | None) -> str:
    env = summary["env"]
    if env.get("device_type") == "cuda":
        where = (
            "GPU",
            f"{env.get('gpu_name')} (compute capability {env.get('cuda_capability')}, CUDA {env.get('cuda_runtime')})",
        )
    else:
        where = (
            "CPU",
            f"{env.get('cpu_model', '?')}, {env.get('cpu_threads', '?')} torch threads "
            f"({env.get('cpu_count', '?')} CPUs)",
        )
    load = []  # on a CPU, other processes take cores from the benchmark: say how busy the machine was
    if env.get("load_avg_at_start") and env.get("device_type") != "cuda":
        load = [f"| load average at start (1/5/15 min) | {' / '.join(map(str, env['load_avg_at_start']))} |"]
    commit = summary.get("commit") or "unknown"
    if summary.get("commit_dirty"):
        commit += " (with uncommitted changes)"
    lines = [
        f"# pykernels benchmarks on {summary['device_name']}",
        "",
        "| | |",
        "|---|---|",
        f"| device | {summary['device_name']} |",
        f"| {where[0]} | {where[1]} |",
        *load,
        f"| torch | {env.get('torch', '?')} |",
        f"| Triton | {env.get('triton', '?')} |",
        f"| timm | {env.get('timm', '?')} |",
        f"| pykernels._C | {env.get('pykernels_C', '?')} |",
        f"| date of the run | {_when(summary.get('run_datetime'))} |",
        f"| commit | {commit} |",
        f"| benchmark command | `{summary.get('bench_command') or 'unknown'}` |",
        f"| report command | `{report_command}` |",
        "",
        "Times are per step (the `step` named per case), median and min over the rounds; the timed callable",
        "synchronizes the device, and on CUDA the L2 cache is flushed before each round. GB/s = ideal bytes / median.",
        "Saved for bwd = bytes of the unique storages autograd saves for backward (inputs included); *extra* = those",
        "that are not inputs. Ratios = baseline median / provider median, from this run only (> 1: faster).",
        "",
    ]
    if env.get("smoke"):
        lines += ["**Smoke run (tiny shapes): the times mean nothing.**", ""]
    if png_name:
        lines += [f"![speedup vs eager]({png_name})", ""]

    for group, case in summary["cases"].items():
        lines += [f"## {group}", ""]
        info = case["info"]
        if info:
            lines += ["; ".join(_fmt_info(k, v) for k, v in info.items()) + ".", ""]
        rows = case["providers"].values()
        has_gbps = any("gbps" in r for r in rows)
        has_tflops = any("tflops" in r for r in rows)
        has_peak = any("peak_mem_mb" in r for r in rows)
        header = ["provider", "backend", "median ms", "min ms"]
        header += ["GB/s"] * has_gbps + ["TFLOP/s"] * has_tflops
        header += ["saved for bwd MB", "extra MB"] + ["peak mem MB"] * has_peak
        header += ["vs eager (×)", "vs compile-eager (×)", "rounds", "1st call s"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name, r in case["providers"].items():
            cells = [f"`{name}`", _fmt(r.get("backend")), _fmt(r["median_ms"], 3), _fmt(r["min_ms"], 3)]
            cells += [_fmt(r.get("gbps"), 1)] * has_gbps + [_fmt(r.get("tflops"), 2)] * has_tflops
            cells += [_fmt(r.get("saved_mb"), 1), _fmt(r.get("saved_extra_mb"), 1)]
            cells += [_fmt(r.get("peak_mem_mb"), 1)] * has_peak
            cells += [_fmt(r.get("vs_eager")), _fmt(r.get("vs_compile_eager")), _fmt(r.get("rounds"))]
            cells += [_fmt(r.get("first_call_s"), 2)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


MAX_CASES_PER_PANEL = 6
MAX_PANELS_PER_ROW = 5
REFERENCES = {"compile-eager": "-", "compile-eager-freezing": ":"}  # drawn as lines across a case's bars
_COLORS = {
    "pykernels": "tab:blue",
    "compile-pykernels": "tab:orange",
    "eager-explicit": "tab:green",
    "nn-mha": "tab:purple",
}


def _wrap(label: str, width: int = 12) -> str:
    """Break a case name at '-' into lines of about ``width`` characters (x tick labels of a small panel)."""
    lines: list[str] = []
    for part in label.split("-"):
        if lines and len(lines[-1]) + 1 + len(part) <= width:
            lines[-1] += "-" + part
        else:
            lines.append(part)
    return "\n".join(lines)


def panels(summary: dict) -> dict[str, list[tuple[str, dict]]]:
    """The plot's panels: title -> [(x label, case)], one per op and one per model (``op == "model"``); an op with
    more than MAX_CASES_PER_PANEL cases is split by the last part of its case names (e.g. fwd / fwd_bwd)."""
    result: dict[str, list[tuple[str, dict]]] = {}
    for group, case in summary["cases"].items():
        if "eager" not in case["providers"]:
            continue
        op, _, name = group.partition("[")
        name = name.removesuffix("]")
        if op == "model":
            model = case["info"].get("model") or name.rsplit("-b", 1)[0]
            batch, _, mode = name.removeprefix(f"{model}-").partition("-")
            title = case["info"].get("model_name") or model
            label = f"{mode.replace('_step', '')} {batch}"
        else:
            title, label = op, name
        result.setdefault(title, []).append((label, case))
    split: dict[str, list[tuple[str, dict]]] = {}
    for title, entries in result.items():
        modes = {label.rsplit("-", 1)[-1] for label, _ in entries}
        if len(entries) <= MAX_CASES_PER_PANEL or len(modes) < 2 or any("-" not in label for label, _ in entries):
            split[title] = entries
            continue
        for label, case in entries:
            base, mode = label.rsplit("-", 1)
            split.setdefault(f"{title} ({mode})", []).append((base, case))
    return split


def plot(summary: dict, path: Path) -> bool:
    """One small panel per op and per model: speed-up vs eager per case (x), the providers as grouped bars,
    ``torch.compile`` of the eager version as a line across each case's bars. False when there is nothing to plot."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    grid = panels(summary)
    if not grid:
        return False
    bar_providers: list[str] = []
    refs: list[str] = []
    for entries in grid.values():
        for _, case in entries:
            for name in case["providers"]:
                target = refs if name in REFERENCES else bar_providers
                if name != "eager" and name not in target:
                    target.append(name)
    palette = iter(c for c in plt.rcParams["axes.prop_cycle"].by_key()["color"] if c not in _COLORS.values())
    colors = {name: _COLORS.get(name) or next(palette, "tab:gray") for name in bar_providers}

    ncols = min(MAX_PANELS_PER_ROW, len(grid))
    nrows = math.ceil(len(grid) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.5 * ncols, 2.9 * nrows + 0.6), squeeze=False)
    for ax, (title, entries) in zip(axes.flat, grid.items()):
        present = [p for p in bar_providers if any(p in case["providers"] for _, case in entries)]
        width = 0.8 / max(1, len(present))
        top = 1.0
        for x, (_, case) in enumerate(entries):  # each case's bars centred on it (a case may lack a provider)
            here = [(p, case["providers"][p]["vs_eager"]) for p in present if p in case["providers"]]
            here = [(p, ratio) for p, ratio in here if ratio is not None]
            for i, (provider, ratio) in enumerate(here):
                bars = ax.bar(x + width * (i - (len(here) - 1) / 2), ratio, width, color=colors[provider])
                for text in ax.bar_label(bars, labels=[f"{ratio:.2f}"], fontsize=6, padding=1, rotation=90):
                    text.set_bbox({"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 0.2})
                    text.set_zorder(4)
                top = max(top, ratio)
        for provider, style in REFERENCES.items():
            for x, (_, case) in enumerate(entries):
                ratio = case["providers"].get(provider, {}).get("vs_eager")
                if ratio is not None:
                    ax.hlines(ratio, x - 0.45, x + 0.45, colors="black", linestyles=style, linewidth=1.4)
                    top = max(top, ratio)
        ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(entries)), [_wrap(label) for label, _ in entries], fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlim(-0.5, len(entries) - 0.5)
        ax.set_ylim(0, top * 1.25)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", linewidth=0.3, alpha=0.5)
    for ax in axes.flat[len(grid) :]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel("speed-up vs eager (×)", fontsize=7)

    handles = [Patch(color=colors[p], label=p) for p in bar_providers]
    handles += [Line2D([], [], color="black", linestyle=REFERENCES[r], label=r) for r in refs]
    handles.append(Line2D([], [], color="gray", linestyle="--", label="eager (1.0)"))
    env = summary["env"]
    fig.suptitle(
        f"speed-up vs eager (higher is faster) - {summary['device_name']}, torch {env.get('torch', '?')}"
        + (", smoke run: meaningless times" if env.get("smoke") else ""),
        fontsize=10,
    )
    fig.legend(
        handles=handles,
        loc="upper center",
        ncol=len(handles),
        fontsize=8,
        frameon=False,
        bbox_to_anchor=(0.5, 1 - 0.3 / fig.get_figheight()),
    )
    fig.tight_layout()
    fig.subplots_adjust(top=1 - 0.9 / fig.get_figheight())  # room for the title and the legend
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def summary_lines(summary: dict) -> list[str]:
    lines = []
    for group, case in summary["cases"].items():
        parts = []
        for name, r in case["providers"].items():
            ratios = [
                f"{r[k]:.2f}x {b}"
                for b, k in zip(BASELINES, ("vs_eager", "vs_compile_eager"), strict=True)
                if r.get(k) is not None and b != name
            ]
            parts.append(f"{name} {r['median_ms']:.3f} ms" + (f" ({', '.join(ratios)})" if ratios else ""))
        lines.append(f"{group}: " + " | ".join(parts))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("raw_json", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--name", help="file name stem (default: the device's slug)")
    args = parser.parse_args(argv)

    raw = json.loads(args.raw_json.read_text())
    if "cases" in raw and "benchmarks" not in raw:  # a report's own JSON: drawn and written again as it is
        summary = raw
    elif raw.get("benchmarks"):
        summary = summarize(raw)
    else:
        print(f"{args.raw_json}: no benchmarks in this file", file=sys.stderr)
        return 1
    stem = args.name or summary["device_slug"]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    md_path, json_path, png_path = (args.out_dir / f"{stem}{ext}" for ext in (".md", ".json", ".png"))
    if argv is None:
        report_command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    else:  # called by bench/conftest.py at the end of a benchmark run: the command that redoes this report
        report_command = shlex.join(["python", "bench/report.py", *argv])
    summary["report_command"] = report_command

    have_png = plot(summary, png_path)
    md_path.write_text(render_markdown(summary, report_command, png_path.name if have_png else None))
    json_path.write_text(_dumps(summary) + "\n")

    print(f"wrote {md_path}")
    print(f"      {json_path}" + (f"\n      {png_path}" if have_png else ""))
    print(f"device: {summary['device_name']}; torch {summary['env'].get('torch', '?')}")
    for line in summary_lines(summary):
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
