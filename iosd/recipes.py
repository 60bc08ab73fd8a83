"""Recipes: one named set of generation, training and evaluation settings, read from data.

``iosd/data/recipes.json`` is the one definition. A recipe's settings fill every option the
user did not give; an option given explicitly wins and is recorded as an override. What was
resolved, and where each value came from, travels in manifests and checkpoints, and
``--show-config`` prints it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from iosd.errors import UserError
from iosd.worlds import WORLDS

STAGES = ("gen", "train", "eval")
DEFAULT_RECIPE = "iosd"
FAST_RECIPE = "fast"  # the default for CPU stand-in models, which cannot run the papers' schedules
FROM_RECIPE, FROM_USER = "recipe", "user"
SCHEDULERS = ("pipeline", "ddim")  # the pipeline's own, or DDIM on its config (GD)
HALVES = ("cond", "both")  # captured rows under guidance: the conditional half, or both side by side
# CPU stand-in models (random weights, embedded) and the recipe each runs by default: the
# papers' schedules take GPU hours, so a tiny SDXL runs the fast recipe and the tiny SD v1
# the only recipe of its family.
# The trained worlds (iosd/worlds.py) are CPU models too, each with its own recipe.
CPU_STAND_INS = {"tiny": FAST_RECIPE, "tiny-sd1": "gd", **{name: w["recipe"] for name, w in WORLDS.items()}}


def default_recipe(model: str | None) -> str:
    """The recipe a command runs when none is named: the published IOSD, or a stand-in's own."""
    return CPU_STAND_INS.get(model or "", DEFAULT_RECIPE)


@dataclass(frozen=True)
class Recipe:
    """A named set of settings per stage, each with the source of its value."""

    name: str
    title: str
    family: str  # the model family its layers and query assume ("sdxl" or "sd")
    settings: dict[str, dict[str, dict]]  # stage -> option -> {"value", "source"}

    def value(self, stage: str, option: str, classes: str | None = None) -> Any:
        """An option's value, resolved for a class set where it depends on one."""
        value = self.settings[stage][option]["value"]
        if isinstance(value, dict) and "by_classes" in value:
            return value["by_classes"].get(classes or "", value["default"])
        return value


@cache
def _data() -> dict:
    return json.loads(resources.files("iosd").joinpath("data/recipes.json").read_text())["recipes"]


def recipe_names() -> tuple[str, ...]:
    return tuple(_data())


def get_recipe(name: str) -> Recipe:
    """The recipe ``name``, or a one-line error listing the known ones."""
    data = _data()
    if name not in data:
        raise UserError(f"unknown recipe {name!r}", f"use one of {', '.join(data)}")
    entry = data[name]
    return Recipe(name, entry["title"], entry["family"], {stage: dict(entry[stage]) for stage in STAGES})


@dataclass
class Resolved:
    """Option values of one stage with their provenance."""

    recipe: str
    stage: str
    values: dict[str, Any]
    origin: dict[str, dict]  # option -> {"value", "from": "recipe"|"user", "source"}

    @property
    def overrides(self) -> dict[str, Any]:
        """Options the user set to something other than the recipe's value."""
        return {k: o["value"] for k, o in self.origin.items() if o["from"] == FROM_USER and o.get("recipe_value") != o["value"]}

    def record(self) -> dict:
        """What manifests and checkpoints keep."""
        return {"name": self.recipe, "stage": self.stage, "overrides": self.overrides, "settings": self.origin}


def resolve(recipe: str, stage: str, given: dict[str, Any], classes: str | None = None) -> Resolved:
    """Fill every option of ``stage`` that ``given`` leaves as None from the recipe.

    ``given`` maps option names to the user's values (None = not given). Options the recipe
    does not define are left to their caller's defaults.
    """
    r = get_recipe(recipe)
    values, origin = {}, {}
    for option, setting in r.settings[stage].items():
        recipe_value = r.value(stage, option, classes)
        user_value = given.get(option)
        if user_value is None:
            values[option] = recipe_value
            origin[option] = {"value": recipe_value, "from": FROM_RECIPE, "source": setting["source"]}
        else:
            values[option] = user_value
            origin[option] = {"value": user_value, "from": FROM_USER, "source": "given on the command line", "recipe_value": recipe_value}
    return Resolved(recipe, stage, values, origin)


def show_config(resolved: Resolved, extra: dict[str, Any] | None = None) -> None:
    """Print the resolved settings, each with where it comes from (``--show-config``)."""
    from rich.console import Console
    from rich.table import Table

    r = get_recipe(resolved.recipe)
    table = Table(title=f"{resolved.stage} settings: recipe {r.name} ({r.title})", title_justify="left")
    for col in ("option", "value", "from", "source"):
        table.add_column(col, overflow="fold")
    for option, o in resolved.origin.items():
        where = o["from"] if o["from"] == FROM_RECIPE else f"user (recipe: {o['recipe_value']!r})"
        table.add_row(option, repr(o["value"]), where, o["source"])
    for option, value in (extra or {}).items():
        table.add_row(option, repr(value), "default", "iosd default (not part of the recipe)")
    Console().print(table)


def recipe_of(record: dict | None) -> str | None:
    """The recipe name a manifest or checkpoint records (None for sets made before recipes)."""
    return (record or {}).get("recipe", {}).get("name") if isinstance((record or {}).get("recipe"), dict) else None


def recipe_layers(name: str) -> tuple[str, ...]:
    """The UNet module paths a recipe's features come from."""
    from iosd.layers import resolve_layers

    return resolve_layers(get_recipe(name).value("gen", "layers"))


def check_recipe_layout(name: str, own: str | None, layers: list[str], where: str) -> None:
    """Refuse a recipe whose features are not the ones ``where`` holds (made by recipe ``own``)."""
    if own is None or name == own:
        return
    wanted = recipe_layers(name)
    if tuple(layers) != wanted:
        made = f"recipe {own!r}" if own else "another configuration"
        raise UserError(f"{where} holds features of {made} ({len(layers)} maps); recipe {name!r} needs its {len(wanted)} maps", f"drop --recipe to follow {where}'s own, or generate shards with --recipe {name}")
