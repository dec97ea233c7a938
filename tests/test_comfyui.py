"""The pack inside a real ComfyUI: startup imports it without errors, every node is in /object_info, the web
extension is served, and each shipped API-format workflow executes through POST /prompt on the tiny stand-ins,
with progress, previews and the saved mp4 reported the way core's nodes report them.

Runs only when COMFYUI_DIR names a ComfyUI checkout; its Python is COMFYUI_PYTHON, else COMFYUI_DIR/.venv/bin/python
(the pack's runtime dependencies must be installed there). ComfyUI's own folders are left alone: `--base-directory`
points it at a temporary folder holding custom_nodes/ (a link to this repository), models/ (the stand-ins), input/
and output/.

    COMFYUI_DIR=/path/to/ComfyUI python -m pytest -q tests/test_comfyui.py
"""
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
from test_workflows import EXPECTED, FOLDER, SHRINK, probe

from sora import standins
from sora.nodes import load_node_mappings
from sora.workflow import node_spec

COMFYUI_DIR = Path(os.environ.get("COMFYUI_DIR", "")).expanduser()
pytestmark = pytest.mark.skipif(not os.environ.get("COMFYUI_DIR") or not (COMFYUI_DIR / "main.py").is_file(),
                                reason="set COMFYUI_DIR to a ComfyUI checkout to run the pack inside ComfyUI")
PACK = "sora_pack_under_test"  # any folder name works: ComfyUI imports the folder as a package of that name
STARTUP_SECONDS = 300
RUN_SECONDS = 300


def comfy_python() -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    venv = COMFYUI_DIR / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: Path, port: int, log: Path):
        self.base, self.url, self.log = base, f"http://127.0.0.1:{port}", log
        self.port = port

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as response:
            return json.load(response) if "json" in response.headers.get("Content-Type", "") else response.read()

    def post(self, path: str, body: bytes, content_type: str = "application/json"):
        request = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.load(response) if "json" in response.headers.get("Content-Type", "") else response.read()
        except urllib.error.HTTPError as e:
            raise AssertionError(f"POST {path} -> {e.code}: {e.read().decode()}") from None

    def upload(self, path: Path, name: str) -> dict:
        """POST /upload/image (multipart), as the editor uploads an input file."""
        boundary = uuid.uuid4().hex
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n")
        tail = (f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\ntrue\r\n"
                f"--{boundary}--\r\n")
        body = head.encode() + path.read_bytes() + tail.encode()
        return self.post("/upload/image", body, f"multipart/form-data; boundary={boundary}")

    def refused(self, prompt: dict) -> dict:
        """POST an API-format prompt the server must refuse at validation (400); its JSON answer."""
        request = urllib.request.Request(self.url + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == 400
        return json.loads(refused.value.read())

    def run(self, prompt: dict, client_id: str | None = None) -> dict:
        """Queue an API-format prompt with a client_id and wait for its history entry."""
        queued = self.post("/prompt", json.dumps({"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})
                           .encode())
        assert queued["node_errors"] == {}, queued
        deadline = time.monotonic() + RUN_SECONDS
        while time.monotonic() < deadline:
            history = self.get(f"/history/{queued['prompt_id']}")
            entry = history.get(queued["prompt_id"])
            if entry and (entry["status"]["completed"] or entry["status"]["status_str"] == "error"):
                return entry
            time.sleep(0.5)
        raise AssertionError(f"prompt {queued['prompt_id']} did not finish in {RUN_SECONDS} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK).symlink_to(FOLDER.parent, target_is_directory=True)
    standins.write_standins(base / "models")
    port = free_port()
    log = base / "comfyui.log"
    command = [comfy_python(), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
               str(base), "--database-url", "sqlite:///:memory:", "--preview-method", "latent2rgb"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=COMFYUI_DIR, stdout=out, stderr=subprocess.STDOUT)
    server = Server(base, port, log)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                raise AssertionError(f"ComfyUI exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                server.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise AssertionError(f"ComfyUI did not start in {STARTUP_SECONDS} s:\n{log.read_text()[-4000:]}") \
                        from None
                time.sleep(1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def test_startup_imports_the_pack_without_errors(server):
    text = server.log.read_text()
    timing = [line for line in text.splitlines() if line.strip().endswith(f"custom_nodes/{PACK}") or
              f"custom_nodes/{PACK} " in line]
    assert timing and not any("IMPORT FAILED" in line for line in timing), timing
    assert f"{PACK}" not in "\n".join(line for line in text.splitlines()
                                      if "Cannot import" in line or "Traceback" in line)
    assert "sora nodes: could not load" not in text


def test_every_node_is_in_object_info(server):
    info = server.get("/object_info")
    classes, names, _ = load_node_mappings()
    for node_id, cls in classes.items():
        assert node_id in info, node_id
        entry = info[node_id]
        assert entry["display_name"] == names[node_id] and entry["category"] == cls.CATEGORY
        assert entry["python_module"] == f"custom_nodes.{PACK}"
        assert entry["output_node"] == getattr(cls, "OUTPUT_NODE", False)
        spec = node_spec(cls)
        order = entry["input_order"]
        assert order.get("required", []) + order.get("optional", []) == list(spec.inputs)
    loader = info["SoraModelLoader"]["input"]["required"]["model_name"][0]
    # the dropdown lists ComfyUI's diffusion_models folder (here: the stand-ins), after the embedded model
    stand_ins = sorted(p.name for p in (server.base / "models" / "diffusion_models").iterdir())
    assert loader == ["nano (embedded)", *stand_ins] and "wan2.1_t2v_1.3B_bf16.safetensors" in stand_ins


def test_the_web_extension_is_served(server):
    scripts = [path for path in server.get("/extensions") if f"/{PACK}/" in path]
    assert scripts == [f"/extensions/{PACK}/js/sora_show_text.js"]
    source = server.get(scripts[0]).decode()
    assert "SoraPromptExpansion" in source
    # the module it imports resolves, from where the editor loads it, to the editor's own app module
    imported = source.split('from "', 1)[1].split('"', 1)[0]
    resolved = urllib.parse.urlparse(urllib.parse.urljoin(server.url + scripts[0], imported)).path
    assert b"export const app" in server.get(resolved)


def shrunk(name: str, uploads: dict[str, str]) -> dict:
    prompt = json.loads((FOLDER / "api" / f"{name}.json").read_text())
    for node in prompt.values():
        if not name.startswith("nano"):
            node["inputs"].update(SHRINK.get(node["class_type"], {}))
        for key in ("image", "video"):
            if isinstance(node["inputs"].get(key), str) and node["inputs"][key] in uploads:
                node["inputs"][key] = uploads[node["inputs"][key]]
    return prompt


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_api_workflow_executes_through_post_prompt(server, name, tmp_path):
    uploads = {}
    for asset in ("sora_start_frame.png", "sora_source_clip.mp4"):  # under new names: found in the input folder
        uploaded = server.upload(FOLDER / "assets" / asset, f"uploaded_{asset}")
        uploads[asset] = uploaded["name"]
    entry = server.run(shrunk(name, uploads))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"]["messages"])[-3000:]
    (saved,) = [out for out in entry["outputs"].values() if "animated" in out]
    assert saved["animated"] == [True] and saved["images"][0]["type"] == "output"
    file = saved["images"][0]
    query = urllib.parse.urlencode({"filename": file["filename"], "subfolder": file["subfolder"], "type": "output"})
    (tmp_path / "clip.mp4").write_bytes(server.get(f"/view?{query}"))
    assert probe(tmp_path / "clip.mp4") == EXPECTED[name]


def test_sora_parallel_samples_on_two_worker_processes_with_the_same_frames(server, tmp_path):
    """nano_t2v with Sora Parallel (cpu,cpu) before the sampler: the workers start from inside the server, the
    clip equals the one-process clip."""
    from sora.video_io import read_video
    frames = {}
    for parallel in (False, True):
        prompt = shrunk("nano_t2v", {})
        ids = {node["class_type"]: node_id for node_id, node in prompt.items()}
        prompt[ids["SoraScheduler"]]["inputs"]["steps"] = 4
        prompt[ids["SoraEmptyLatentVideo"]]["inputs"]["frames"] = 9
        prompt[ids["SoraSaveVideo"]]["inputs"].update(filename_prefix=f"sora/parallel_{parallel}", crf=0)
        if parallel:
            prompt["100"] = {"class_type": "SoraParallel", "inputs": {"model": [ids["SoraModelLoader"], 0],
                                                                      "devices": "cpu,cpu", "mode": "auto"}}
            prompt[ids["SoraSampler"]]["inputs"]["model"] = ["100", 0]
        entry = server.run(prompt)
        errors = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
        assert entry["status"]["status_str"] == "success", [(e["exception_message"], e["traceback"][-3:])
                                                            for e in errors]
        (saved,) = [out for out in entry["outputs"].values() if "animated" in out]
        file = saved["images"][0]
        query = urllib.parse.urlencode({"filename": file["filename"], "subfolder": file["subfolder"],
                                        "type": "output"})
        (tmp_path / f"{parallel}.mp4").write_bytes(server.get(f"/view?{query}"))
        frames[parallel] = read_video(tmp_path / f"{parallel}.mp4").frames
    assert frames[True].shape == frames[False].shape == (9, 64, 64, 3)
    assert (frames[True] - frames[False]).abs().max() <= 1 / 255


def test_progress_and_previews_reach_the_client(server):
    websocket = pytest.importorskip("websocket")  # websocket-client, to listen like the editor does
    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}", timeout=RUN_SECONDS)
    try:
        prompt = shrunk("wan21_t2v_1.3B", {})
        sampler = next(i for i, n in prompt.items() if n["class_type"] == "SoraSampler")
        server.post("/prompt", json.dumps({"prompt": prompt, "client_id": client_id}).encode())
        progress, previews, executed = [], 0, []
        while True:
            message = ws.recv()
            if isinstance(message, bytes):
                previews += int.from_bytes(message[:4], "big") in (1, 4)  # PREVIEW_IMAGE(_WITH_METADATA)
                continue
            event = json.loads(message)
            if event["type"] == "progress" and event["data"]["node"] == sampler:
                progress.append((event["data"]["value"], event["data"]["max"]))
            elif event["type"] == "executed":
                executed.append(event["data"]["output"])
            elif event["type"] == "execution_error":
                raise AssertionError(event["data"]["exception_message"])
            elif event["type"] == "executing" and event["data"]["node"] is None:
                break
    finally:
        ws.close()
    steps = SHRINK["SoraScheduler"]["steps"]
    assert progress[-1] == (steps, steps) and previews >= steps
    assert any("animated" in output for output in executed)


def test_a_node_error_reaches_the_client_with_the_node_and_input(server):
    prompt = shrunk("wan21_t2v_1.3B", {})
    empty = next(i for i, n in prompt.items() if n["class_type"] == "SoraEmptyLatentVideo")
    prompt[empty]["inputs"]["frames"] = 30
    outputs_before = sorted(p for p in (server.base / "output").rglob("*") if p.is_file())
    body = server.refused(prompt)  # at validation, before any model loads
    errors = body["node_errors"][empty]["errors"]
    assert body["node_errors"][empty]["class_type"] == "SoraEmptyLatentVideo"
    assert all("input 'frames': 30 is not 1+4k" in e["details"] for e in errors), errors
    assert sorted(p for p in (server.base / "output").rglob("*") if p.is_file()) == outputs_before


def test_cancel_stops_sampling_between_steps(server):
    websocket = pytest.importorskip("websocket")
    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}", timeout=RUN_SECONDS)
    try:
        prompt = shrunk("wan21_t2v_1.3B", {})
        steps = 1000
        scheduler = next(i for i, n in prompt.items() if n["class_type"] == "SoraScheduler")
        prompt[scheduler]["inputs"]["steps"] = steps
        server.post("/prompt", json.dumps({"prompt": prompt, "client_id": client_id}).encode())
        last, interrupted = 0, None
        while interrupted is None:
            message = ws.recv()
            if isinstance(message, bytes):
                continue
            event = json.loads(message)
            if event["type"] == "progress" and event["data"]["max"] == steps:
                if last == 0:
                    server.post("/interrupt", b"{}")
                last = event["data"]["value"]
            elif event["type"] == "execution_interrupted":
                interrupted = event["data"]
            elif event["type"] in ("execution_error", "execution_success"):
                raise AssertionError(f"expected a cancel, got {event['type']}")
    finally:
        ws.close()
    assert interrupted["node_type"] == "SoraSampler" and 0 < last < steps


def test_core_nodes_and_ours_connect_both_ways(server, tmp_path):
    """Standard sockets: core's empty video latent and ConditioningZeroOut feed our sampler; our frames feed core's
    CreateVideo and SaveVideo."""
    prompt = shrunk("wan21_t2v_1.3B", {})
    by_class = {n["class_type"]: i for i, n in prompt.items()}
    prompt["90"] = {"class_type": "EmptyHunyuanLatentVideo",
                    "inputs": {"width": 64, "height": 32, "length": 9, "batch_size": 1}}
    prompt["91"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": [by_class["SoraTextEncode"], 0]}}
    prompt["92"] = {"class_type": "CreateVideo", "inputs": {"images": [by_class["SoraVAEDecode"], 0], "fps": 16.0}}
    prompt["93"] = {"class_type": "SaveVideo", "inputs": {"video": ["92", 0], "filename_prefix": "core/clip",
                                                           "format": "mp4", "codec": "h264"}}
    sampler = prompt[by_class["SoraSampler"]]["inputs"]
    sampler["latent"], sampler["negative"] = ["90", 0], ["91", 0]
    del prompt[by_class["SoraSaveVideo"]], prompt[by_class["SoraEmptyLatentVideo"]]
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"]["messages"])[-3000:]
    file = entry["outputs"]["93"]["images"][0]
    query = urllib.parse.urlencode({"filename": file["filename"], "subfolder": file["subfolder"], "type": "output"})
    (tmp_path / "core.mp4").write_bytes(server.get(f"/view?{query}"))
    assert probe(tmp_path / "core.mp4") == (9, 64, 32, 16)


def saved_latent(server, entry, node_id: str, tmp_path):
    """The latent core's SaveLatent wrote for `node_id`, fetched through /view."""
    from safetensors.torch import load_file
    file = entry["outputs"][node_id]["latents"][0]
    query = urllib.parse.urlencode({"filename": file["filename"], "subfolder": file["subfolder"], "type": "output"})
    path = tmp_path / file["filename"]
    path.write_bytes(server.get(f"/view?{query}"))
    return load_file(str(path))["latent_tensor"]


def test_core_samplers_drive_sora_sampler(server, tmp_path):
    """KSamplerSelect's SAMPLER replaces sampler_name: core's euler gives our euler's latent, and core's other
    samplers (lcm, res_multistep, er_sde, a CFG++ one) run our model; a ConditioningCombine positive runs too."""
    import torch

    latents = {}
    for name in ("ours", "euler", "lcm", "res_multistep", "er_sde", "euler_cfg_pp"):
        prompt = shrunk("wan21_t2v_1.3B", {})
        by_class = {n["class_type"]: i for i, n in prompt.items()}
        sampler = prompt[by_class["SoraSampler"]]["inputs"]
        sampler["sampler_name"] = "euler"
        if name != "ours":
            prompt["90"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": name}}
            sampler["sampler"] = ["90", 0]
        prompt["91"] = {"class_type": "SaveLatent", "inputs": {"samples": [by_class["SoraSampler"], 0],
                                                               "filename_prefix": f"latents/{name}"}}
        entry = server.run(prompt)
        assert entry["status"]["status_str"] == "success", (name, json.dumps(entry["status"]["messages"])[-3000:])
        latents[name] = saved_latent(server, entry, "91", tmp_path)
        assert torch.isfinite(latents[name]).all(), name
    torch.testing.assert_close(latents["euler"], latents["ours"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(latents["lcm"], latents["ours"], atol=1e-3)  # a different sampler, really used

    prompt = shrunk("wan21_t2v_1.3B", {})
    by_class = {n["class_type"]: i for i, n in prompt.items()}
    prompt["92"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": [by_class["SoraTextEncode"], 0],
                                                                    "conditioning_2": [by_class["SoraTextEncode"], 1]}}
    prompt[by_class["SoraSampler"]]["inputs"]["positive"] = ["92", 0]
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"]["messages"])[-3000:]


def test_a_client_cannot_make_the_server_read_outside_its_folders(server, tmp_path_factory):
    """The issue's attack: Sora Load Image given an absolute path of a PNG outside every ComfyUI folder, wired into
    Sora Save Video. The server refuses the graph at validation, naming the node and input, and writes nothing."""
    from PIL import Image

    secret = tmp_path_factory.mktemp("outside") / "secret.png"
    Image.new("RGB", (64, 32), (200, 30, 30)).save(secret)
    outputs_before = sorted(p for p in (server.base / "output").rglob("*") if p.is_file())
    for name in (str(secret), f"../../{secret.parent.name}/{secret.name}", str(secret.with_name("missing.png"))):
        prompt = {"1": {"class_type": "SoraLoadImage", "inputs": {"image": name, "width": 0, "height": 0}},
                  "2": {"class_type": "SoraSaveVideo", "inputs": {"frames": ["1", 0], "fps": 16.0, "crf": 19,
                                                                   "filename_prefix": "stolen"}}}
        body = server.refused(prompt)
        errors = body["node_errors"]["1"]["errors"]
        assert errors[0]["extra_info"]["input_name"] == "image", body
        assert "outside ComfyUI's input folder" in errors[0]["details"], body
    assert sorted(p for p in (server.base / "output").rglob("*") if p.is_file()) == outputs_before


@pytest.fixture(scope="module")
def full_size_image_models(server):
    """Files core's loaders accept, which insist on the released shapes: a random full-size CLIP ViT-H/14 in
    clip_vision_h's layout and a random full-size Wan 2.1 VAE; plus tiny Wan 2.1 I2V / FLF2V DiTs whose image
    branch reads 1280-wide tokens."""
    import torch
    from safetensors.torch import save_file

    from sora.clip_vision import CLIP_VISION_H, CLIPVisionEncoder
    from sora.vae import VAEConfig, WanVAE

    models = server.base / "models"
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CLIPVisionEncoder(CLIP_VISION_H).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    clip = {k: (torch.ones(s) if "layer_norm" in k or "layrnorm" in k else torch.randn(s, generator=generator) * 0.02)
            .half() for k, s in shapes.items()}
    save_file(clip, str(models / "clip_vision" / "clip_vision_h_full.safetensors"))
    del clip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        vae = {k: v.half().contiguous() for k, v in WanVAE(VAEConfig()).state_dict().items()}
    save_file(vae, str(models / "vae" / "wan_2.1_vae_full.safetensors"))
    shape = dict(standins._DIT_SHAPE, in_dim=36, out_dim=16, image_dim=1280)
    dits = {"wan2.1_i2v_480p_clip_h.safetensors": standins.DiTConfig(model_type="i2v", **shape),
            "wan2.1_flf2v_720p_clip_h.safetensors": standins.DiTConfig(model_type="flf2v", image_positions=514,
                                                                       **shape)}
    for seed, (name, config) in enumerate(dits.items()):
        save_file(standins._dit(config, torch.float16, 20 + seed)(), str(models / "diffusion_models" / name))
    return {"clip": "clip_vision_h_full.safetensors", "vae": "wan_2.1_vae_full.safetensors", "dits": list(dits)}


def image_to_video_prompt(dit: str, clip_loader: dict, clip_encoder: str, i2v: dict) -> dict:
    """Text, CLIP vision and image-to-video nodes (our or core's, as given) feeding our sampler, whose latent is
    saved; node 9 is the start image, 10 the end image, 11 the text encode, 12 the CLIP vision loader."""
    prompt = {
        "1": {"class_type": "SoraModelLoader", "inputs": {"model_name": dit, "weight_dtype": "default",
                                                         "compute_dtype": "auto", "attention": "sdpa",
                                                         "expert": "auto (from the file name)"}},
        "2": {"class_type": "SoraTextEncoderLoader", "inputs": {
            "text_encoder_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "weight_dtype": "default",
            "compute_dtype": "auto"}},
        "3": {"class_type": "SoraScheduler", "inputs": {"model": ["1", 0], "steps": 2, "shift": 0.0,
                                                       "schedule": "wan_unipc", "denoise": 1.0}},
        "9": {"class_type": "SoraLoadImage", "inputs": {"image": "sora_start_frame.png", "width": 0, "height": 0}},
        "10": {"class_type": "SoraLoadImage", "inputs": {"image": "sora_end_frame.png", "width": 0, "height": 0}},
        "11": {"class_type": "SoraTextEncode", "inputs": {"text_encoder": ["2", 0], "prompt": "a red ball",
                                                         "negative_preset": "wan i2v", "negative_prompt": ""}},
        "12": clip_loader,
        "13": {"class_type": clip_encoder, "inputs": {"clip_vision": ["12", 0], "image": ["9", 0], "crop": "none"}},
        "14": {"class_type": clip_encoder, "inputs": {"clip_vision": ["12", 0], "image": ["10", 0], "crop": "none"}},
        "15": i2v,
        "16": {"class_type": "SoraSampler", "inputs": {"model": ["1", 0], "positive": ["15", 0],
                                                      "negative": ["15", 1], "latent": ["15", 2], "sigmas": ["3", 0],
                                                      "seed": 3, "guidance": 5.0, "sampler_name": "unipc",
                                                      "denoise": 1.0}},
        "17": {"class_type": "SaveLatent", "inputs": {"samples": ["16", 0], "filename_prefix": "latents/i2v"}},
    }
    return prompt


def test_core_clip_vision_nodes_and_ours_interoperate(server, full_size_image_models, tmp_path):
    """Core's CLIPVisionLoader / CLIPVisionEncode drive Sora Wan Image To Video and our sampler, giving the latent
    our own CLIP nodes give; our CLIP outputs drive core's WanImageToVideo and WanFirstLastFrameToVideo."""
    import torch

    files = full_size_image_models
    i2v_dit, flf2v_dit = files["dits"]
    core_loader = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": files["clip"]}}
    our_loader = {"class_type": "SoraCLIPVisionLoader", "inputs": {"clip_name": files["clip"], "dtype": "fp32"}}
    ours_i2v = {"class_type": "SoraWanImageToVideo", "inputs": {
        "positive": ["11", 0], "negative": ["11", 1], "vae": ["18", 0], "start_image": ["9", 0], "width": 64,
        "height": 32, "frames": 9, "batch": 1, "clip_vision_start_image": ["13", 0]}}
    our_vae = {"class_type": "SoraVAELoader", "inputs": {"vae_name": "wan_2.1_vae.safetensors", "dtype": "auto"}}
    latents = {}
    for name, loader, encoder in (("core clip", core_loader, "CLIPVisionEncode"),
                                  ("our clip", our_loader, "SoraCLIPVisionEncode"),
                                  ("other image", our_loader, "SoraCLIPVisionEncode")):
        prompt = image_to_video_prompt(i2v_dit, loader, encoder, ours_i2v)
        prompt["18"] = our_vae
        if name == "other image":  # the CLIP tokens of the end frame, the same VAE condition
            prompt["13"]["inputs"]["image"] = ["10", 0]
        else:
            del prompt["14"], prompt["10"]
        entry = server.run(prompt)
        assert entry["status"]["status_str"] == "success", (name, json.dumps(entry["status"]["messages"])[-3000:])
        latents[name] = saved_latent(server, entry, "17", tmp_path)
    assert torch.isfinite(latents["our clip"]).all()
    # the same tokens from either encoder (both compute in float32 from the same fp16 weights): the latents differ
    # far less than another image's tokens make them differ
    tokens_effect = (latents["other image"] - latents["our clip"]).abs().max()
    assert tokens_effect > 1e-3
    assert (latents["core clip"] - latents["our clip"]).abs().max() < 0.01 * tokens_effect

    core_vae = {"class_type": "VAELoader", "inputs": {"vae_name": files["vae"]}}
    common = {"positive": ["11", 0], "negative": ["11", 1], "vae": ["18", 0], "width": 64, "height": 32,
              "length": 9, "batch_size": 1, "start_image": ["9", 0]}
    for dit, i2v in ((i2v_dit, {"class_type": "WanImageToVideo",
                                "inputs": {**common, "clip_vision_output": ["13", 0]}}),
                     (flf2v_dit, {"class_type": "WanFirstLastFrameToVideo",
                                  "inputs": {**common, "end_image": ["10", 0], "clip_vision_start_image": ["13", 0],
                                             "clip_vision_end_image": ["14", 0]}})):
        prompt = image_to_video_prompt(dit, our_loader, "SoraCLIPVisionEncode", i2v)
        prompt["18"] = core_vae
        if i2v["class_type"] == "WanImageToVideo":
            del prompt["14"], prompt["10"]
        entry = server.run(prompt)
        assert entry["status"]["status_str"] == "success", (dit, json.dumps(entry["status"]["messages"])[-3000:])
        latent = saved_latent(server, entry, "17", tmp_path)
        assert latent.shape == (1, 16, 3, 4, 8) and torch.isfinite(latent).all()


def test_core_vace_conditioning_drives_sora_sampler(server, full_size_image_models, tmp_path):
    """Core's WanVaceToVideo (control video, reference image, strength) feeds our sampler on a VACE model; core's
    TrimVideoLatent drops the reference frame, as core's workflows do."""
    import torch

    def prompt_with(strength):
        return {
            "1": {"class_type": "SoraModelLoader", "inputs": {"model_name": "wan2.1_vace_1.3B_fp16.safetensors",
                                                             "weight_dtype": "default", "compute_dtype": "auto",
                                                             "attention": "sdpa",
                                                             "expert": "auto (from the file name)"}},
            "2": {"class_type": "SoraTextEncoderLoader", "inputs": {
                "text_encoder_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "weight_dtype": "default",
                "compute_dtype": "auto"}},
            "3": {"class_type": "SoraScheduler", "inputs": {"model": ["1", 0], "steps": 2, "shift": 0.0,
                                                           "schedule": "wan_unipc", "denoise": 1.0}},
            "4": {"class_type": "SoraTextEncode", "inputs": {"text_encoder": ["2", 0], "prompt": "a red ball",
                                                            "negative_preset": "wan default", "negative_prompt": ""}},
            "5": {"class_type": "VAELoader", "inputs": {"vae_name": full_size_image_models["vae"]}},
            "6": {"class_type": "SoraLoadVideo", "inputs": {"video": "sora_source_clip.mp4", "max_frames": 9,
                                                           "skip_frames": 0, "width": 64, "height": 32}},
            "7": {"class_type": "SoraLoadImage", "inputs": {"image": "sora_start_frame.png", "width": 0,
                                                           "height": 0}},
            "8": {"class_type": "WanVaceToVideo", "inputs": {
                "positive": ["4", 0], "negative": ["4", 1], "vae": ["5", 0], "width": 64, "height": 32, "length": 9,
                "batch_size": 1, "strength": strength, "control_video": ["6", 0], "reference_image": ["7", 0]}},
            "9": {"class_type": "SoraSampler", "inputs": {"model": ["1", 0], "positive": ["8", 0],
                                                         "negative": ["8", 1], "latent": ["8", 2],
                                                         "sigmas": ["3", 0], "seed": 3, "guidance": 5.0,
                                                         "sampler_name": "unipc", "denoise": 1.0}},
            "10": {"class_type": "TrimVideoLatent", "inputs": {"samples": ["9", 0], "trim_amount": ["8", 3]}},
            "11": {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": "latents/vace"}},
        }

    latents = []
    for strength in (1.0, 0.0):
        entry = server.run(prompt_with(strength))
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"]["messages"])[-3000:]
        latents.append(saved_latent(server, entry, "11", tmp_path))
    assert latents[0].shape == (1, 16, 3, 4, 8) and torch.isfinite(latents[0]).all()  # the reference trimmed
    assert not torch.allclose(latents[0], latents[1], atol=1e-4)  # core's strength reaches the model
