"""The `cmg` command line: `cmg data ...`, `cmg train ...`, `cmg evaluate ...`, `cmg explain ...`."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import CMGError


def _cmd_data_list(args) -> int:
    from .data.registry import DATASETS

    for name, (_, _, desc, needs_root) in DATASETS.items():
        print(f"{name:14s} {'(--root PATH) ' if needs_root else '              '}{desc}")
    return 0


def _parse_options(items: list[str]) -> dict:
    from .config import parse_override

    return dict(parse_override(i) for i in items)


def _cmd_data_show(args) -> int:
    from .data import load_dataset

    ds = load_dataset(args.name, args.root, **_parse_options(args.option))
    summary = ds.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"dataset   {summary['name']}" + (f"  (root {summary['root']})" if summary["root"] else ""))
    print(f"images    {summary['images']}")
    print(f"classes   {summary['classes']}")
    print(f"captions  {summary['captions']}")
    print("splits    " + ", ".join(f"{k} {v}" for k, v in sorted(summary["splits"].items())))
    print("per class " + ", ".join(f"{k} {v}" for k, v in summary["images_per_class"].items()))
    print("samples:")
    step = max(1, len(ds) // args.samples)
    for i in range(0, len(ds), step)[: args.samples]:
        it = ds[i]
        print(f"  [{it.class_name}] {it.path}")
        for c in it.captions[:2]:
            print(f"      - {c}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="list and inspect datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("list", help="the dataset loaders")
    p.set_defaults(func=_cmd_data_list)
    p = dsub.add_parser("show", help="counts of images, classes, captions and a few samples")
    p.add_argument("name")
    p.add_argument("--root", default=None, help="dataset folder (all but synthetic)")
    p.add_argument("--option", "-o", action="append", default=[], help="loader option key=value")
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_data_show)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CMGError as exc:
        print(f"cmg: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
