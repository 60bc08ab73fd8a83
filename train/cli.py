"""``iosd-train``: fit a grounding head on cached-feature shards (single process or torchrun)."""

from __future__ import annotations

import json
import sys

import click
from click.core import ParameterSource

from iosd.choices import HEAD_KINDS, LOSS_SIZES, SCHEDULES, SUBSETS
from iosd.errors import UserError, user_errors
from iosd.recipes import recipe_names

RECIPES = ", ".join(recipe_names())


def parse_head_options(values: tuple[str, ...]) -> dict:
    """KEY=VALUE pairs, values read as JSON when they parse (numbers, lists), else as text."""
    options = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--head-option {item!r} is not KEY=VALUE", "e.g. --head-option d_model=256")
        try:
            options[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            options[key.strip()] = raw
    return options


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("shards")
@click.option("--recipe", default=None, help=f"one of {RECIPES}: published configuration the options marked [recipe] default to [default: the shards' own]")
@click.option("--show-config", is_flag=True, help="print the resolved settings and where each comes from, then exit")
@click.option("--head", type=click.Choice(HEAD_KINDS), default=None, help="head architecture: iosd, gd (the papers' official modules) or their -lite variants [recipe]")
@click.option("--steps", type=int, default=None, help="optimizer steps in all; a resumed run continues up to it [recipe]")
@click.option("--batch-size", type=int, default=None, help="samples per step and rank [recipe]")
@click.option("--lr", type=float, default=None, help="Adam learning rate [recipe]")
@click.option("--weight-decay", type=float, default=None, help="Adam weight decay [recipe]")
@click.option("--warmup", type=int, default=0, help="linear warm-up steps")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=None, help="learning-rate schedule after warm-up [recipe]")
@click.option("--decay-every", type=int, default=None, help="--schedule step: multiply the rate by --decay-factor every N steps [recipe]")
@click.option("--decay-factor", type=float, default=None, help="--schedule step: factor per decay [recipe]")
@click.option("--loss-size", type=click.Choice(LOSS_SIZES), default=None, help="compute the loss at the image's resolution or at the head's own map size [recipe]")
@click.option("--dice", type=float, default=None, help="weight of a dice term added to the BCE loss [recipe]")
@click.option("--min-score", type=float, default=0.0, help="train only on masks whose stored teacher score is at least this")
@click.option("--subset", type=click.Choice(SUBSETS), default="seen", help="classes that train: the split's seen ones, or every kept class")
@click.option("--val", default=None, help="held-out shards (directory, pattern or URL) for mean IoU by class")
@click.option("--val-every", type=int, default=200, help="validate every N steps (and at the end)")
@click.option("--save-every", type=int, default=200, help="checkpoint every N steps (and at the end)")
@click.option("--log-every", type=int, default=10, help="log loss and samples/s every N steps")
@click.option("--out", default=None, help="run directory [default: runs/<shard set>-<head>]")
@click.option("--resume", is_flag=True, help="continue the run in --out from its last checkpoint")
@click.option("--overwrite", is_flag=True, help="replace the run in --out")
@click.option("--init", default=None, help="start from the weights of this run or checkpoint (same head and layout)")
@click.option("--head-option", "head_option", multiple=True, metavar="KEY=VALUE", help="head architecture option, e.g. d_model=256 (repeatable)")
@click.option("--workers", type=int, default=None, help="decoding workers per rank [default: CPUs per rank - 1, at most 4]")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N")
@click.option("--amp/--no-amp", default=None, help="mixed precision [default: on with CUDA]")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the head")
@click.option("--on-corrupt", type=click.Choice(["warn", "fail"]), default="warn", help="a corrupt shard or sample: skip it with a warning, or stop")
@click.option("--seed", type=int, default=0)
@click.option("--keep", type=int, default=1, help="checkpoints kept in the run directory")
@click.option("--no-tensorboard", is_flag=True, help="do not write TensorBoard events even if it is installed")
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.pass_context
@user_errors(rerun="then rerun with --resume to continue from the last checkpoint", kept="checkpoints are kept")
def main(ctx: click.Context, show_config: bool, **options) -> None:
    """Train a grounding head (features + class embedding -> mask) on iosd-gen shards.

    SHARDS is a shard directory with its dataset.json, a brace pattern
    (dir/shard-{000000..000009}.tar) or a URL (http(s), s3://, gs:// with fsspec).
    Under `torchrun --nproc-per-node K iosd-train ...` it trains with DDP. Options marked
    [recipe] default to the recipe's value (--show-config lists them).
    """
    from iosd.train.trainer import TrainConfig, Trainer, train

    renames = {"head_option": "head_options", "compile_": "compile"}
    explicit = frozenset(renames.get(name, name) for name in options if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT))
    options["head_options"] = parse_head_options(options.pop("head_option"))
    options["compile"] = options.pop("compile_")
    options["tensorboard"] = not options.pop("no_tensorboard")
    if show_config:
        Trainer(TrainConfig(**options), explicit).show_config()
        return
    summary = train(TrainConfig(**options), explicit)
    if summary is None:
        return
    if summary.get("interrupted"):
        click.echo(json.dumps(summary))
        print(f"interrupted at step {summary['step']}: checkpoint saved; rerun with --resume to continue", file=sys.stderr)
        sys.exit(130)
    click.echo(json.dumps(summary))


if __name__ == "__main__":
    main()
