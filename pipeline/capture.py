"""Forward hooks that capture named UNet layers at chosen denoising calls."""

from __future__ import annotations

import torch

from iosd.errors import UserError


class FeatureCapture:
    """Context manager: while ``armed``, each hooked module's output is kept (detached).

    Block outputs may be tuples (down blocks return their skip states too; transformer
    blocks return ``(sample,)``): the first tensor is the feature map. ``keep`` selects
    the batch rows to keep (the conditional half under classifier-free guidance).
    """

    def __init__(self, unet: torch.nn.Module, paths: tuple[str, ...]) -> None:
        self.paths = paths
        self.modules = {}
        for path in paths:
            try:
                self.modules[path] = unet.get_submodule(path)
            except AttributeError:
                raise UserError(f"UNet has no module {path!r}", "use a preset (compact, iosd, gd) or paths from unet.named_modules()") from None
        self.armed = False
        self.keep: slice = slice(None)
        self.captured: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, path: str):
        def hook(_module, _inputs, output):
            if not self.armed:
                return
            tensor = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
            self.captured[path] = tensor[self.keep].detach()

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


def sdxl_layer_shapes(paths: tuple[str, ...], resolution: int = 512) -> dict[str, list[int]]:
    """(C, H, W) of each layer of SDXL(-Turbo)'s UNet at ``resolution`` px, with no weights.

    The UNet is built on the meta device from SDXL's config, so the feature presets' costs
    can be stated (README, bench/presets.py) and tested without a download or a GPU.
    """
    from diffusers import UNet2DConditionModel

    from iosd.pipeline.tiny import SDXL_UNET_CONFIG

    side = resolution // 8
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    with FeatureCapture(unet, paths) as cap, torch.device("meta"):
        cap.armed = True
        conditions = {"text_embeds": torch.zeros(1, 1280), "time_ids": torch.zeros(1, 6)}
        unet(torch.zeros(1, 4, side, side), torch.tensor([999]), encoder_hidden_states=torch.zeros(1, 77, 2048), added_cond_kwargs=conditions)
        return {p: list(t.shape[1:]) for p, t in cap.take().items()}
