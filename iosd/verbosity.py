"""Whether third-party libraries may talk: diffusers' and transformers' loading bars and
warnings are noise to a user of iosd unless ``--verbose`` asks for them. A module-level
setting, so the CLI sets it once and the model loader reads it without threading a flag."""

from __future__ import annotations

_verbose = False


def set_verbose(on: bool) -> None:
    """``--verbose``: let the libraries under iosd print their own bars and warnings."""
    global _verbose
    _verbose = bool(on)


def is_verbose() -> bool:
    return _verbose
