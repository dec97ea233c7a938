"""Loading images and videos, and saving the result as an H.264 mp4.

Which files a load node reads is `sora.runtime`'s rule: inside ComfyUI only files in its input folder (the list
offers them, with the editor's upload button, as core's Load Image and Load Video do; core's annotated names such as
`clip.mp4 [input]` work) and the pack's shipped `workflows/assets/`; headless, also any path. A name the rule refuses
fails validation, before the graph runs.

Saving: the mp4 goes under the output folder (ComfyUI's, or `--output-dir` headless) with ComfyUI's counter naming
(`prefix_00001_.mp4`), never outside it whatever the prefix says, written atomically (no partial file when
encoding fails), and is shown in the editor the way core's Save Video shows its result. Like core's, it stores
the graph in the file ("prompt", "workflow"), so the mp4 dropped into the editor brings its workflow back.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ._common import about, category, checked, mappings
from ._sora import sora

SIZE_TOOLTIP = "Resize to this many pixels (0 keeps the file's {}); use the model's size grid (e.g. {})."


def file_input(kind: str, suffixes: tuple[str, ...], tooltip: str) -> tuple:
    """The file widget of a load node: inside ComfyUI a list of the input files with the upload button (`kind`:
    "image" or "video"), headless a text field for any path."""
    runtime = sora.runtime
    if runtime.in_comfyui():
        return (runtime.input_files(suffixes), {f"{kind}_upload": True, "tooltip": tooltip})
    return ("STRING", {"default": "", "tooltip": tooltip})


def input_file(node: type, name: str, value: str) -> Path:
    """The file a load node's `value` names, under `sora.runtime`'s rule of what a name may reach."""
    with about(node, name):
        return sora.runtime.input_path(value, what=name)


def _check(node: type, name: str, value) -> bool | str:
    """VALIDATE_INPUTS for a file input: True, or the reason (so the graph is refused before it runs)."""
    if value is None:  # linked from another node: checked when the value exists
        return True
    try:
        sora.runtime.input_path(value, what=name)
    except sora.errors.InputError as e:
        return str(e)
    return True


def _changed(value: str) -> str:
    """ComfyUI's IS_CHANGED value for a file name: reload when the file's bytes change."""
    try:
        return hashlib.sha256(sora.runtime.input_path(value).read_bytes()).hexdigest()
    except (sora.errors.InputError, OSError):
        return value  # the node itself reports the missing or refused file


def _resize(node: type, frames, width: int, height: int):
    """Frames resized to width x height, where a 0 keeps that side of the file (both 0: unchanged)."""
    if not width and not height:
        return frames
    _, H, W, _ = frames.shape
    # one side 0: keep the aspect ratio, rounded to whole pixels
    width = width or max(1, round(W * height / H))
    height = height or max(1, round(H * width / W))
    with about(node, "width"):
        return sora.video_io.resize_frames(frames, width, height)


class SoraLoadImage:
    DISPLAY_NAME = "Sora Load Image"
    DESCRIPTION = "Loads an image file (png, jpg, webp, ...) as IMAGE [1, H, W, 3], optionally resized."
    CATEGORY = category("video")
    FUNCTION = "load"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": file_input("image", sora.runtime.IMAGE_SUFFIXES,
                                "An image file: one in ComfyUI's input folder (upload it here) or the pack's "
                                "workflows/assets; headless, any path."),
            "width": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 1,
                              "tooltip": SIZE_TOOLTIP.format("width", "832 or 1280")}),
            "height": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 1,
                               "tooltip": SIZE_TOOLTIP.format("height", "480 or 704")}),
        }}

    @classmethod
    def IS_CHANGED(cls, image, **_):
        return _changed(image)

    @classmethod
    def VALIDATE_INPUTS(cls, image):
        return _check(cls, "image", image)

    def load(self, image, width, height):
        path = input_file(type(self), "image", image)
        with about(type(self), "image"):
            frames = sora.video_io.read_image(path)
        return (_resize(type(self), frames, width, height),)


class SoraLoadVideo:
    DISPLAY_NAME = "Sora Load Video"
    DESCRIPTION = "Loads a video file (mp4, webm, mov, gif, ...) as IMAGE frames [frames, H, W, 3] and its fps."
    CATEGORY = category("video")
    FUNCTION = "load"
    RETURN_TYPES = ("IMAGE", "FLOAT")
    RETURN_NAMES = ("frames", "fps")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "video": file_input("video", sora.runtime.VIDEO_SUFFIXES,
                                "A video file: one in ComfyUI's input folder (upload it here) or the pack's "
                                "workflows/assets; headless, any path."),
            "max_frames": ("INT", {"default": 81, "min": 0, "max": 100000,
                                   "tooltip": "The most frames to load (0 = all). Encoding needs 1 + 4k frames "
                                              "(e.g. 81)."}),
            "skip_frames": ("INT", {"default": 0, "min": 0, "max": 100000,
                                    "tooltip": "Frames to skip at the start."}),
            "width": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 1,
                              "tooltip": SIZE_TOOLTIP.format("width", "832")}),
            "height": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 1,
                               "tooltip": SIZE_TOOLTIP.format("height", "480")}),
        }}

    @classmethod
    def IS_CHANGED(cls, video, **_):
        return _changed(video)

    @classmethod
    def VALIDATE_INPUTS(cls, video):
        return _check(cls, "video", video)

    def load(self, video, max_frames, skip_frames, width, height):
        path = input_file(type(self), "video", video)
        with about(type(self), "video"):
            loaded = sora.video_io.read_video(path, max_frames=max_frames, skip_frames=skip_frames)
        return (_resize(type(self), loaded.frames, width, height), loaded.fps)


class SoraSaveVideo:
    DISPLAY_NAME = "Sora Save Video"
    DESCRIPTION = ("Saves frames as an H.264 mp4 under the output folder (prefix_00001_.mp4, counting up) and "
                   "shows it in the editor.")
    CATEGORY = category("video")
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "frames": ("IMAGE", {"tooltip": "The video frames (from Sora VAE Decode)."}),
            "fps": ("FLOAT", {"default": 16.0, "min": 1.0, "max": 240.0, "step": 1.0,
                              "tooltip": "Frames per second: 16 for Wan 2.1 and 2.2 A14B, 24 for TI2V-5B."}),
            "crf": ("INT", {"default": sora.video_io.DEFAULT_CRF, "min": 0, "max": sora.video_io.MAX_CRF,
                            "tooltip": "Quality (H.264 constant rate factor): lower is better and bigger; 0 is "
                                       "lossless, 17-23 looks clean."}),
            "filename_prefix": ("STRING", {"default": "sora/video",
                                           "tooltip": "File name start, with optional subfolders inside the output "
                                                      "folder; a counter and .mp4 are added."}),
        }, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None):
        return checked(cls, {"filename_prefix": (filename_prefix, lambda node, name, prefix:
                                                 sora.runtime.split_prefix(prefix))})

    def save(self, frames, fps, crf, filename_prefix, prompt=None, extra_pnginfo=None):
        with about(type(self), "filename_prefix"):
            target = sora.runtime.save_path(filename_prefix, "mp4")
        with about(type(self), "frames"):
            sora.video_io.write_mp4(target.path, frames, fps, crf=crf, metadata=_metadata(prompt, extra_pnginfo))
        return {"ui": {"images": [target.ui()], "animated": [True]}, "result": ()}


def _metadata(prompt: dict | None, extra_pnginfo: dict | None) -> dict[str, str]:
    """The graph stored in the mp4 as core's Save Video stores it: "prompt" and each extra_pnginfo entry
    ("workflow") as JSON text; nothing when ComfyUI runs with --disable-metadata."""
    if sora.runtime.in_comfyui():
        from comfy.cli_args import args  # imported here: ComfyUI is only there when running inside it
        if args.disable_metadata:
            return {}
    metadata = {key: json.dumps(value) for key, value in (extra_pnginfo or {}).items()}
    if prompt is not None:
        metadata["prompt"] = json.dumps(prompt)
    return metadata


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(SoraLoadImage, SoraLoadVideo, SoraSaveVideo)
