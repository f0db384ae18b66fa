"""``python -m pykernels info``: what is built, what runs where, and why not.
``python -m pykernels coverage [--list FILE] [--out docs/coverage.md]``: which Hugging Face layer types swap converts,
skips (and why) or does not handle (see :mod:`pykernels.coverage`)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pykernels", description=__doc__)
    parser.add_argument(
        "command",
        choices=["info", "coverage"],
        help="info: versions, devices, and each op's backends; coverage: Hugging Face layer types vs swap",
    )
    parser.add_argument("--list", default=None, help="coverage: the layer-type list (default: the project's seed)")
    parser.add_argument("--out", default=None, help="coverage: write the markdown table here (default: print it)")
    args = parser.parse_args(argv)
    if args.command == "coverage":
        import sys
        from pathlib import Path

        from pykernels import coverage

        source = Path(args.list) if args.list else coverage.DEFAULT_LIST
        if not source.exists():
            parser.error(f"no layer-type list at {source} (pass --list)")
        entries, other = coverage.run(source, progress=lambda line: print(line, file=sys.stderr, flush=True))
        text = coverage.markdown(entries, other, source)
        if args.out:
            Path(args.out).write_text(text)
            print(f"wrote {args.out}", file=sys.stderr)
        else:
            print(text)
        return 0
    import pykernels

    print(pykernels.info())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
