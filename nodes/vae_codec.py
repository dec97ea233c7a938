"""VAE encode and decode between IMAGE frames [frames, H, W, 3] (0..1) and video LATENTs (raw VAE output).

Tiling is automatic: the memory manager picks the largest tiles that fit its budget (whole frames when memory
allows). "manual" sets the tile size and overlap in pixels; "off" always works on whole frames.
"""
from __future__ import annotations

from ._common import about, category, input_error, latent_samples, mappings
from ._handles import VAE
from ._sora import sora

AUTO, OFF, MANUAL = "auto", "off", "manual"


def _tiling_inputs() -> dict:
    return {
        "tiling": ([AUTO, OFF, MANUAL], {
            "default": AUTO,
            "tooltip": "auto: tiles chosen from the free memory (whole frames when they fit); off: whole frames; "
                       "manual: the tile size and overlap below."}),
        "tile_size": ("INT", {"default": 512, "min": 64, "max": 8192, "step": 32,
                              "tooltip": "manual tiling: tile width and height in pixels."}),
        "tile_overlap": ("INT", {"default": 64, "min": 0, "max": 4096, "step": 32,
                                 "tooltip": "manual tiling: pixels neighbouring tiles share (blended)."}),
    }


class _ChunkProgress:
    """The VAE's per-chunk callback: a progress bar (made at the first report, when the total is known) and
    ComfyUI's cancel button (Ctrl-C headless) between chunks."""

    def __init__(self, what: str):
        self.what = what
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = sora.runtime.progress(total, self.what)
        self.bar.update(1)
        sora.runtime.check_interrupt()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run(node: type, vae, data, tiling: str, tile_size: int, tile_overlap: int, encode: bool, what: str):
    """Encode or decode `data` with the chosen tiling."""
    manager = sora.memory.get_manager()
    progress = _ChunkProgress(what)
    try:
        if tiling == AUTO:
            run = sora.vae.encode_video if encode else sora.vae.decode_video
            return run(vae, data, manager=manager, callback=progress)
        layout = None
        if tiling == MANUAL:
            if tile_overlap >= tile_size:
                raise input_error(node, "tile_overlap", tile_overlap, f"must be smaller than tile_size ({tile_size})")
            s = vae.config.spatial_factor
            with about(node, "tile_size"):
                layout = sora.vae_tiling.Tiling(tile_size // s, tile_size // s, -(-tile_overlap // s))
        with manager.use(vae):
            return (vae.encode if encode else vae.decode)(data, tiling=layout, callback=progress)
    finally:
        progress.close()


class SoraVAEDecode:
    DISPLAY_NAME = "Sora VAE Decode"
    DESCRIPTION = "Decodes a video latent into frames (IMAGE [frames, H, W, 3]); memory stays flat with length."
    CATEGORY = category("latent")
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": (VAE, {"tooltip": "The VAE that belongs to the model that made the latent."}),
                             "latent": ("LATENT", {"tooltip": "The video latent to decode (batches are "
                                                              "concatenated in time)."}),
                             **_tiling_inputs()}}

    def decode(self, vae, latent, tiling, tile_size, tile_overlap):
        samples = latent_samples(type(self), "latent", latent)
        with about(type(self), "latent"):
            video = _run(type(self), vae, samples, tiling, tile_size, tile_overlap, encode=False, what="decoding")
        return (sora.video_io.clip_to_frames(video),)


class SoraVAEEncode:
    DISPLAY_NAME = "Sora VAE Encode"
    DESCRIPTION = ("Encodes frames (IMAGE [frames, H, W, 3]) into a video latent: one image for image-to-video, "
                   "1 + 4k frames for a video.")
    CATEGORY = category("latent")
    FUNCTION = "encode"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": (VAE, {"tooltip": "The VAE of the model the latent is for."}),
                             "image": ("IMAGE", {"tooltip": "One image, or 1 + 4k video frames, sized to a multiple "
                                                            "of the VAE's compression (8 for Wan 2.1, 16 for "
                                                            "Wan 2.2)."}),
                             **_tiling_inputs()}}

    def encode(self, vae, image, tiling, tile_size, tile_overlap):
        with about(type(self), "image"):
            sora.video_io.check_frames(image, "image")
            video = sora.video_io.frames_to_clip(image)
            vae.check_video(video)
            samples = _run(type(self), vae, video, tiling, tile_size, tile_overlap, encode=True, what="encoding")
        return ({"samples": samples},)


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(SoraVAEDecode, SoraVAEEncode)
