"""The host environment: model folders, safe output paths, progress and interrupt, headless and inside ComfyUI.

"Inside ComfyUI" is simulated with stand-in modules under ComfyUI's names (`folder_paths`, `comfy.utils`,
`comfy.model_management`, `comfy.cli_args`) that record how they are called; they follow the signatures of
ComfyUI's own functions.
"""
import os
import signal
import sys
import types
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sora import runtime
from sora.errors import InputError, Interrupted


@pytest.fixture
def host(tmp_path, monkeypatch):
    """Headless host with output and models folders under tmp_path; settings restored afterwards."""
    monkeypatch.setattr(runtime, "_headless", dict(runtime._headless))
    return runtime.configure(output_dir=tmp_path / "out", models_dir=tmp_path / "models")


def touch(path: Path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Model files
# ---------------------------------------------------------------------------------------------------------------

def test_headless_model_files_and_paths(host):
    models = host.models_dir
    touch(models / "diffusion_models" / "wan2.1_t2v_1.3B_bf16.safetensors")
    touch(models / "diffusion_models" / "wan" / "high_noise.sft")
    touch(models / "diffusion_models" / "readme.txt")
    touch(models / "diffusion_models" / ".cache" / "hidden.safetensors")
    touch(models / "text_encoders" / "umt5" / "model.safetensors.index.json")
    touch(models / "text_encoders" / "umt5" / "model-00001-of-00002.safetensors")
    touch(models / "LLM" / "Qwen2.5-0.5B-Instruct" / "config.json")
    touch(models / "LLM" / "Qwen2.5-0.5B-Instruct" / "model.safetensors")
    touch(models / "LLM" / "smollm2.gguf")
    assert runtime.model_files("diffusion_models") == ["wan/high_noise.sft", "wan2.1_t2v_1.3B_bf16.safetensors"]
    assert runtime.model_files("text_encoders") == ["umt5/model-00001-of-00002.safetensors",
                                                    "umt5/model.safetensors.index.json"]
    assert runtime.model_files("LLM") == ["Qwen2.5-0.5B-Instruct", "smollm2.gguf"]
    assert runtime.model_files("vae") == []
    high_noise = models / "diffusion_models" / "wan" / "high_noise.sft"
    assert runtime.model_path("diffusion_models", "wan/high_noise.sft") == high_noise
    assert runtime.model_path("diffusion_models", "wan\\high_noise.sft").is_file()  # a name saved on Windows
    assert runtime.model_path("LLM", "Qwen2.5-0.5B-Instruct").is_dir()
    elsewhere = touch(host.output_dir.parent / "elsewhere" / "vae.safetensors")
    assert runtime.model_path("vae", str(elsewhere)) == elsewhere


def test_model_path_errors_say_where_they_looked(host):
    touch(host.models_dir / "vae" / "wan_2.1_vae.safetensors")
    with pytest.raises(InputError) as e:
        runtime.model_path("vae", "wan2.2_vae.safetensors")
    message = str(e.value)
    assert str(host.models_dir / "vae") in message and "wan_2.1_vae.safetensors" in message
    assert "--models-dir" in message
    with pytest.raises(InputError, match="no such file"):
        runtime.model_path("vae", str(host.models_dir / "missing.safetensors"))
    # headless the machine's own user runs the graph: a name may climb out of the model folder
    assert runtime.model_path("vae", "../vae/wan_2.1_vae.safetensors").is_file()
    with pytest.raises(InputError, match="no vae model chosen"):
        runtime.model_path("vae", "")
    with pytest.raises(InputError, match="unknown model kind"):
        runtime.model_files("checkpoints")


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    """Stand-ins for the ComfyUI modules runtime uses, recording calls; 'inside ComfyUI' while active."""
    state = types.SimpleNamespace(bars=[], interrupted=False, base=tmp_path / "ComfyUI")
    models = state.base / "models"
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.models_dir = str(models)
    folder_paths.folder_names_and_paths = {
        "diffusion_models": ([str(models / "unet"), str(models / "diffusion_models")], set()),
        "text_encoders": ([str(models / "text_encoders"), str(models / "clip")], set()),
        "vae": ([str(models / "vae")], set()),
    }
    folder_paths.get_folder_paths = lambda name: list(folder_paths.folder_names_and_paths[name][0])
    folder_paths.get_output_directory = lambda: str(state.base / "output")
    folder_paths.get_input_directory = lambda: str(state.base / "input")
    folder_paths.get_temp_directory = lambda: str(state.base / "temp")

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.calls = []
            state.bars.append(self)

        def update_absolute(self, value, total=None, preview=None):
            self.calls.append((value, total, preview))

    class InterruptProcessingException(Exception):
        pass

    def processing_interrupted():
        return state.interrupted

    def interrupt_current_processing(value=True):
        state.interrupted = value

    package = types.ModuleType("comfy")
    package.utils = types.SimpleNamespace(ProgressBar=ProgressBar)
    package.model_management = types.SimpleNamespace(
        InterruptProcessingException=InterruptProcessingException, processing_interrupted=processing_interrupted,
        interrupt_current_processing=interrupt_current_processing)
    package.cli_args = types.SimpleNamespace(args=types.SimpleNamespace(preview_size=384, preview_method="auto"),
                                             LatentPreviewMethod=types.SimpleNamespace(NoPreviews="none"))
    for name, module in {"folder_paths": folder_paths, "comfy": package, "comfy.utils": package.utils,
                         "comfy.model_management": package.model_management,
                         "comfy.cli_args": package.cli_args}.items():
        monkeypatch.setitem(sys.modules, name, module)
    runtime._comfy_interrupted_type.cache_clear()
    yield state
    runtime._comfy_interrupted_type.cache_clear()


def test_inside_comfyui_model_folders_come_from_folder_paths(comfy, host, tmp_path):
    models = comfy.base / "models"
    touch(models / "unet" / "old_place.safetensors")
    touch(models / "diffusion_models" / "wan2.1_t2v_1.3B_bf16.safetensors")
    touch(models / "clip" / "umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    touch(models / "LLM" / "smollm2.gguf")
    touch(tmp_path / "models" / "vae" / "headless_only.safetensors")  # the headless setting does not apply here
    assert runtime.in_comfyui() and runtime.current().inside_comfyui
    assert runtime.model_files("diffusion_models") == ["old_place.safetensors", "wan2.1_t2v_1.3B_bf16.safetensors"]
    assert runtime.model_files("text_encoders") == ["umt5_xxl_fp8_e4m3fn_scaled.safetensors"]
    assert runtime.model_files("LLM") == ["smollm2.gguf"]  # no "LLM" folder registered: models/LLM
    assert runtime.model_files("vae") == []
    assert runtime.model_path("text_encoders", "umt5_xxl_fp8_e4m3fn_scaled.safetensors").parent == models / "clip"


def test_inside_comfyui_errors_do_not_suggest_cli_flags(comfy, host):
    with pytest.raises(InputError) as e:
        runtime.model_path("vae", "headless_only.safetensors")
    assert str(comfy.base / "models" / "vae") in str(e.value) and "--models-dir" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# What a name may reach inside ComfyUI
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def server_files(comfy, tmp_path, monkeypatch):
    """Inside ComfyUI: an input folder with an image (and one in a subfolder), a secret file outside every ComfyUI
    folder, and a symlink in the input folder pointing at it."""
    monkeypatch.delenv(runtime.ALLOW_ANY_PATH, raising=False)
    files = types.SimpleNamespace(input=comfy.base / "input", secret=touch(tmp_path / "private" / "secret.png"))
    files.image = touch(files.input / "frame.png")
    files.nested = touch(files.input / "shots" / "clip.mp4")
    files.output = touch(comfy.base / "output" / "render_00001_.mp4")
    (files.input / "link.png").symlink_to(files.secret)
    (files.input / "linked_dir").symlink_to(files.secret.parent, target_is_directory=True)
    return files


def escaping_names(files) -> list[str]:
    """Names that lead out of ComfyUI's folders, each for an existing target and a missing one."""
    names = []
    for target in (files.secret, files.secret.with_name("missing.png")):
        names += [str(target), f"../{target.parent.name}/{target.name}", f"~/{target.name}",
                  f"C:\\Users\\me\\{target.name}", f"C:/Users/me/{target.name}", f"\\\\server\\share\\{target.name}",
                  f"//server/share/{target.name}", f"shots/../../{target.name}", f"linked_dir/{target.name}"]
    return names + ["link.png"]


def test_inside_comfyui_input_names_outside_its_folders_are_refused_alike(server_files):
    messages = set()
    for name in escaping_names(server_files):
        with pytest.raises(InputError) as e:
            runtime.input_path(name, what="image")
        messages.add(str(e.value).replace(repr(name), "NAME"))
    assert messages == {"image NAME is outside ComfyUI's input folder and the pack's workflows/assets, which is all a "
                        "ComfyUI client may make the server read; put the file there (the server's owner can allow "
                        f"any path with {runtime.ALLOW_ANY_PATH}=1)"}  # one message, target there or not


def test_inside_comfyui_input_names_inside_its_folders_load(server_files, comfy):
    files = server_files
    assert runtime.input_path("frame.png") == files.image
    assert runtime.input_path("shots/clip.mp4") == files.nested  # subfolders allowed
    assert runtime.input_path("shots\\clip.mp4") == files.nested  # a name saved on Windows
    assert runtime.input_path("frame.png [input]") == files.image  # core's annotated names
    assert runtime.input_path("render_00001_.mp4 [output]") == files.output
    assert runtime.input_path("sora_start_frame.png") == runtime.ASSETS / "sora_start_frame.png"  # shipped assets
    # the link out is not listed
    assert runtime.input_files((".png",)) == ["frame.png", "sora_end_frame.png", "sora_start_frame.png"]
    with pytest.raises(InputError, match="'nothing.png' was not found"):
        runtime.input_path("nothing.png")
    with pytest.raises(InputError, match="is outside ComfyUI's output folder"):
        runtime.input_path("../input/link.png [output]")


def test_the_server_owner_can_allow_any_path(server_files, monkeypatch):
    with pytest.raises(InputError, match="is outside"):
        runtime.input_path(str(server_files.secret))
    monkeypatch.setenv(runtime.ALLOW_ANY_PATH, "1")
    assert runtime.input_path(str(server_files.secret)) == server_files.secret
    assert runtime.input_path("link.png").resolve() == server_files.secret


def test_inside_comfyui_model_paths_stay_in_the_model_folders(server_files, comfy, tmp_path):
    models = comfy.base / "models"
    dit = touch(models / "diffusion_models" / "wan.safetensors")
    extra = touch(tmp_path / "extra_models" / "vae" / "wan_2.1_vae.safetensors")  # extra_model_paths.yaml
    import folder_paths
    folder_paths.folder_names_and_paths["vae"][0].append(str(extra.parent))
    assert runtime.model_path("diffusion_models", str(dit), typed=True) == dit  # absolute, but inside
    assert runtime.model_path("vae", "wan_2.1_vae.safetensors") == extra
    assert runtime.model_path("vae", str(extra), typed=True) == extra
    messages = set()
    names = [n for n in escaping_names(server_files) if not n.startswith(("link", "shots"))]  # those are input names
    for name in names + [str(server_files.image)]:  # the input folder is no model folder
        with pytest.raises(InputError) as e:
            runtime.model_path("vae", name, typed=True)
        messages.add(str(e.value).replace(repr(name), "NAME"))
    assert len(messages) == 1 and "outside ComfyUI's model folders" in messages.pop()


def test_inside_comfyui_load_nodes_list_the_input_folder_and_refuse_other_names_before_running(server_files):
    from sora.nodes import loaders, media
    image = media.SoraLoadImage.INPUT_TYPES()["required"]["image"]
    video = media.SoraLoadVideo.INPUT_TYPES()["required"]["video"]
    assert image[0] == ["frame.png", "sora_end_frame.png", "sora_start_frame.png"] and image[1]["image_upload"] is True
    assert video[0] == ["shots/clip.mp4", "sora_source_clip.mp4"] and video[1]["video_upload"] is True
    assert media.SoraLoadImage.VALIDATE_INPUTS("frame.png") is True
    refusal = media.SoraLoadImage.VALIDATE_INPUTS(str(server_files.secret))
    assert "is outside ComfyUI's input folder" in refusal
    assert media.SoraLoadImage.IS_CHANGED(str(server_files.secret)) == str(server_files.secret)  # never read
    assert "is outside ComfyUI's model folders" in loaders.SoraVAELoader.VALIDATE_INPUTS(
        "nano (embedded)", path=str(server_files.secret))
    assert loaders.SoraVAELoader.VALIDATE_INPUTS("nano (embedded)", path="") is True


# ---------------------------------------------------------------------------------------------------------------
# Output paths
# ---------------------------------------------------------------------------------------------------------------

def test_save_path_uses_comfyui_counter_naming(host):
    out = host.output_dir
    first = runtime.save_path("clip", "mp4")
    assert first.path == out / "clip_00001_.mp4" and first.subfolder == "" and out.is_dir()
    assert first.ui() == {"filename": "clip_00001_.mp4", "subfolder": "", "type": "output"}
    assert not first.path.exists()  # only the folder is created; the save node writes the file
    touch(out / "clip_00001_.mp4")
    touch(out / "clip_00007_.webm")
    touch(out / "clipper_00020_.mp4")  # another prefix
    assert runtime.save_path("clip", ".mp4").filename == "clip_00008_.mp4"
    nested = runtime.save_path("sora/t2v/clip", "mp4")
    assert nested.path == out / "sora" / "t2v" / "clip_00001_.mp4" and nested.subfolder == "sora/t2v"
    assert runtime.save_path("sora\\t2v\\clip", "mp4").subfolder == "sora/t2v"
    os.symlink(out / "nowhere", out / "clip_00008_.mp4")  # a dangling link is taken: never write through it
    assert runtime.save_path("clip", "mp4").filename == "clip_00009_.mp4"


def test_save_path_inside_comfyui_uses_its_output_folder(comfy, host):
    saved = runtime.save_path("video/sora", "mp4")
    assert saved.path == comfy.base / "output" / "video" / "sora_00001_.mp4"


@pytest.mark.parametrize("prefix", ["../clip", "../../etc/passwd", "/tmp/clip", "\\\\server\\share\\clip",
                                    "C:\\Users\\clip", "c:clip", "sub/C:clip", "a/../../clip", "..\\clip", "a/..",
                                    "", "/", "sub/", "..", "nul\0byte"])
def test_save_path_refuses_to_leave_the_output_folder(prefix, host):
    with pytest.raises(InputError, match="filename_prefix"):
        runtime.save_path(prefix, "mp4")
    assert not host.output_dir.exists()


def test_save_path_refuses_a_symlinked_subfolder_pointing_out(host, tmp_path):
    (tmp_path / "outside").mkdir()
    host.output_dir.mkdir()
    os.symlink(tmp_path / "outside", host.output_dir / "escape")
    with pytest.raises(InputError, match="leads outside the output folder"):
        runtime.save_path("escape/clip", "mp4")
    with pytest.raises(InputError, match="extension"):
        runtime.save_path("clip", "../mp4")


@settings(max_examples=300, deadline=None)
@given(prefix=st.text(alphabet=st.sampled_from(list("ab./\\:C~ _%\0")), max_size=12))
def test_save_path_never_escapes(prefix, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    settings_before = dict(runtime._headless)
    runtime.configure(output_dir=out)
    try:
        saved = runtime.save_path(prefix, "mp4")
    except InputError:
        return
    finally:
        runtime._headless.update(settings_before)
    assert saved.path.resolve().is_relative_to(out.resolve())
    assert saved.path.parent == (out.joinpath(*saved.subfolder.split("/")) if saved.subfolder else out)
    assert saved.filename.endswith("_00001_.mp4")


# ---------------------------------------------------------------------------------------------------------------
# Progress and interrupt
# ---------------------------------------------------------------------------------------------------------------

def test_terminal_progress(host, capsys):
    with runtime.progress(4, "sampling") as bar:
        bar.update()
        bar.update(3, preview=object())  # previews cannot be shown on a terminal and are ignored
    err = capsys.readouterr().err
    assert "sampling" in err and "4/4" in err
    assert not runtime.wants_previews()


def test_comfyui_progress_and_previews(comfy):
    preview = object()  # stands for the PIL image a latent previewer makes
    with runtime.progress(3, "sampling") as bar:
        bar.update()
        bar.update(preview=preview)
        bar.update(5)
    assert comfy.bars[0].calls == [(1, 3, None), (2, 3, ("JPEG", preview, 384)), (3, 3, None)]
    assert runtime.wants_previews()
    sys.modules["comfy.cli_args"].args.preview_method = "none"
    assert not runtime.wants_previews()


def test_comfyui_interrupt_raises_both_exception_types(comfy):
    runtime.check_interrupt()  # not requested: nothing happens
    comfy.interrupted = True
    with pytest.raises(Interrupted) as e:
        runtime.check_interrupt()
    assert isinstance(e.value, sys.modules["comfy.model_management"].InterruptProcessingException)
    assert comfy.interrupted is False  # cleared, as ComfyUI's own check does
    runtime.check_interrupt()


def test_ctrl_c_requests_a_stop_between_steps():
    before = signal.getsignal(signal.SIGINT)
    with runtime.ctrl_c_interrupts():
        runtime.check_interrupt()
        os.kill(os.getpid(), signal.SIGINT)  # handled: no KeyboardInterrupt here
        with pytest.raises(Interrupted, match="Ctrl-C"):
            runtime.check_interrupt()
        runtime.check_interrupt()  # the request was consumed
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # a second Ctrl-C aborts
    assert signal.getsignal(signal.SIGINT) is before
    runtime.request_interrupt()
    with pytest.raises(Interrupted):
        runtime.check_interrupt()
