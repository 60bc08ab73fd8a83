"""Forward hooks that capture named UNet layers at chosen denoising calls."""

from __future__ import annotations

import torch

from iosd.errors import UserError
from iosd.recipes import HALVES


class FeatureCapture:
    """Context manager: while ``armed``, each hooked module's output is kept (detached).

    Block outputs may be tuples (down blocks return their skip states too; transformer
    blocks return ``(sample,)``): the first tensor is the feature map.

    ``guided`` (set by the caller) says the UNet batch is a classifier-free-guidance batch,
    the unconditional half first as diffusers (and GD's code) build it. ``halves`` says what
    is kept of it: "cond", the conditional rows; "both", per image the unconditional and the
    conditional maps concatenated along channels, unconditional first (GD's official code:
    ``h.reshape(B, 2C, H, W)`` on the ``[uncond; cond]`` batch of one image), so channel
    counts double. Without guidance, ``keep`` selects the rows ("both" then refuses).
    """

    def __init__(self, unet: torch.nn.Module, paths: tuple[str, ...], halves: str = "cond") -> None:
        if halves not in HALVES:
            raise UserError(f"unknown halves {halves!r}", f"use one of {', '.join(HALVES)}")
        self.paths = paths
        self.halves = halves
        self.modules = {}
        for path in paths:
            try:
                self.modules[path] = unet.get_submodule(path)
            except AttributeError:
                raise UserError(f"UNet has no module {path!r}", "use a preset of the model's family (iosd, gd, compact, ...) or paths from unet.named_modules()") from None
        self.armed = False
        self.guided = False
        self.keep: slice = slice(None)
        self.captured: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def select(self, tensor: torch.Tensor) -> torch.Tensor:
        """The rows (and halves) of one captured map that are kept."""
        if self.guided:
            if tensor.shape[0] % 2:
                raise RuntimeError(f"a guidance batch has an even number of rows, not {tensor.shape[0]}")
            uncond, cond = tensor.chunk(2)
            return torch.cat([uncond, cond], dim=1) if self.halves == "both" else cond
        if self.halves == "both":
            raise RuntimeError("halves='both' needs a classifier-free-guidance batch (guidance > 1): there is no unconditional half")
        return tensor[self.keep]

    def _hook(self, path: str):
        def hook(_module, _inputs, output):
            if not self.armed:
                return
            tensor = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
            self.captured[path] = self.select(tensor.detach())

        return hook

    def __enter__(self) -> FeatureCapture:
        self._handles = [m.register_forward_hook(self._hook(p)) for p, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def take(self) -> dict[str, torch.Tensor]:
        """The captured maps, in preset order; fails loudly if a layer never ran."""
        missing = [p for p in self.paths if p not in self.captured]
        if missing:
            raise RuntimeError(f"layers {missing} did not run in the captured UNet call")
        out = {p: self.captured[p] for p in self.paths}
        self.captured = {}
        return out


def layer_shapes(family, paths: tuple[str, ...], resolution: int = 512, *, halves: str = "cond", config: dict | None = None) -> dict[str, list[int]]:
    """(C, H, W) of each layer of a family's real UNet at ``resolution`` px, with no weights.

    The UNet is built on the meta device from the family's config (or ``config``), so the
    feature presets' costs can be stated (docs/recipes.md, bench/presets.py) and tested without a
    download or a GPU. With ``halves="both"`` the probe runs a guidance batch, so channels
    come out doubled as they are stored.
    """
    from diffusers import UNet2DConditionModel

    from iosd.pipeline.families import get_family

    fam = get_family(family)
    config = dict(config or fam.unet_config())
    side = resolution // 8  # the VAE of both families downsamples 8x
    rows = 2 if halves == "both" else 1
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    with FeatureCapture(unet, paths, halves=halves) as cap, torch.device("meta"):
        cap.armed, cap.guided = True, halves == "both"
        unet(torch.zeros(rows, config["in_channels"], side, side), torch.full((rows,), 999), **fam.meta_conditioning(config, rows))
        return {p: list(t.shape[1:]) for p, t in cap.take().items()}


def sdxl_layer_shapes(paths: tuple[str, ...], resolution: int = 512, *, halves: str = "cond") -> dict[str, list[int]]:
    """``layer_shapes`` on SDXL(-Turbo)'s UNet."""
    return layer_shapes("sdxl", paths, resolution, halves=halves)


def sd1_layer_shapes(paths: tuple[str, ...], resolution: int = 512, *, halves: str = "cond") -> dict[str, list[int]]:
    """``layer_shapes`` on SD 1.4/1.5's UNet."""
    return layer_shapes("sd", paths, resolution, halves=halves)


def preset_shapes(preset: str, resolution: int = 512, *, halves: str = "cond") -> dict[str, list[int]]:
    """``layer_shapes`` of a named preset on its own family's real UNet."""
    from iosd.layers import PRESETS

    return layer_shapes(PRESETS[preset].family, PRESETS[preset].layers, resolution, halves=halves)


def recipe_shapes(recipe: str, resolution: int = 512) -> dict[str, list[int]]:
    """The (C, H, W) of every map a recipe stores per sample, on the real UNet of its family."""
    from iosd.recipes import get_recipe

    r = get_recipe(recipe)
    return preset_shapes(r.value("gen", "layers"), resolution, halves=r.value("gen", "halves"))
