"""Whether third-party libraries may talk: diffusers' and transformers' loading bars and
warnings are noise to a user of iosd unless ``--verbose`` asks for them. A module-level
setting, so the CLI sets it once and the model loader reads it without threading a flag."""

from __future__ import annotations

import click

_verbose = False


def set_verbose(on: bool) -> None:
    """``--verbose``: let the libraries under iosd print their own bars and warnings."""
    global _verbose
    _verbose = bool(on)


def is_verbose() -> bool:
    return _verbose


# The one --verbose option of every command that loads a model: it sets the flag as it is
# parsed (no parameter to thread through the command's function).
verbose_option = click.option(
    "--verbose", is_flag=True, expose_value=False, is_eager=True,
    callback=lambda _ctx, _param, value: set_verbose(value),
    help="also show the diffusion libraries' own loading bars and warnings",
)
