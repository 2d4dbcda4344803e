"""The shape every ``critic-align`` maintenance command shares: ``add_arguments(parser)`` + ``run(args)``, callable
as ``critic-align NAME ...`` (train/cli.py adds the subparser) or as ``python -m train.MODULE ...`` (``main``)."""

from __future__ import annotations

import argparse


def parser_for(prog: str, doc: str | None, add_arguments) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def standalone(prog: str, doc: str | None, add_arguments, run, argv=None):
    """``python -m train.MODULE`` entry point: parse ``argv`` with the command's own options, then run it."""
    return run(parser_for(prog, doc, add_arguments).parse_args(argv))
