"""``python -m pykernels info``: what is built, what runs where, and why not."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pykernels", description=__doc__)
    parser.add_argument("command", choices=["info"], help="info: versions, devices, and each op's backends")
    parser.parse_args(argv)
    import pykernels

    print(pykernels.info())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
