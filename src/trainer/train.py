"""``segthenseg-train``: train the rough and fine networks and write one model file.

Runs as one process (``segthenseg-train DATA --out DIR``) or as one rank per GPU/CPU process
under ``torchrun --nproc_per_node=N -m trainer DATA --out DIR``. See docs/TRAINING.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import typing

from .checkpoint import CheckpointError, WriteFailed
from .config import OPTIONS, TrainConfig
from .data import DataError
from .finetune import fine_tune_values

FILLED_IN = ("command",)  # TrainConfig fields the command line does not set


def _plain_type(annotation: object) -> type:
    """``int | None`` -> ``int``; ``Path`` -> ``Path``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation  # type: ignore[return-value]


def build_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """The options of :class:`TrainConfig`, with its defaults (one source) and :data:`OPTIONS`' help;
    ``defaults=False`` leaves out every option not given (to tell what the user set)."""
    p = argparse.ArgumentParser(
        prog="segthenseg-train", argument_default=None if defaults else argparse.SUPPRESS,
        description="Train Segment-then-Segment networks (rough on whole images at SxS, fine on "
                    "ground-truth crops) from a folder with images/ and masks/. See docs/TRAINING.md.")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in FILLED_IN:
            continue
        opt = OPTIONS[f.name]
        text = opt.help.replace("%", "%%")
        kind = _plain_type(hints[f.name])
        if f.default is dataclasses.MISSING and f.name == "data":
            p.add_argument(f.name, type=kind, help=text)
            continue
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            absent = {} if defaults else {"default": argparse.SUPPRESS}
            if f.default:  # on by default: the option turns it off
                p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                               help=text, **absent)
            else:
                p.add_argument(flag, action="store_true", help=text, **absent)
            continue
        if f.default is dataclasses.MISSING:
            p.add_argument(flag, type=kind, required=True, metavar=opt.metavar, help=text + " (required)")
            continue
        shown = opt.default_text if opt.default_text is not None else f.default
        p.add_argument(flag, type=kind, default=f.default if defaults else argparse.SUPPRESS,
                       choices=opt.choices, metavar=opt.metavar, help=f"{text} (default: {shown})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    words = sys.argv[1:] if argv is None else argv
    command = "segthenseg-train " + " ".join(shlex.quote(w) for w in words)
    given = vars(build_parser(defaults=False).parse_args(words))  # what the user set
    try:
        cfg = TrainConfig(**fine_tune_values(vars(args), given), command=command)
        from .loop import train  # the training loop's imports after the arguments are known to be valid

        train(cfg)
    except WriteFailed as exc:
        print(f"segthenseg-train: error: {exc}", file=sys.stderr)
        return 1
    except (DataError, CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"segthenseg-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("segthenseg-train: interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
