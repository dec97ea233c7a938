import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sora import ops
from sora.checkpoints import load_into, load_state_dict, strip_prefix
from sora.errors import CheckpointError


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = ops.Linear(4, 3)
        self.norm = nn.LayerNorm(3)


def test_safetensors_roundtrip_and_prefix(tmp_path):
    model = Tiny()
    sd = {f"model.diffusion_model.{k}": v for k, v in model.state_dict().items()}
    save_file(sd, tmp_path / "m.safetensors")
    loaded = strip_prefix(load_state_dict(tmp_path / "m.safetensors"), ("model.diffusion_model.",), "proj.weight")
    assert set(loaded) == set(model.state_dict())
    assert torch.equal(loaded["proj.weight"], model.proj.weight)


def test_truncated_file_is_named(tmp_path):
    save_file(Tiny().state_dict(), tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        load_state_dict(tmp_path / "cut.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="incomplete"):
        load_state_dict(tmp_path / "tiny.safetensors")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    with pytest.raises(CheckpointError, match="holds code or objects") as refused:
        load_state_dict(path)
    assert "weights_only" not in str(refused.value)  # torch's advice to run the file's code is never passed on


def test_pth_tensors_load(tmp_path):
    torch.save(Tiny().state_dict(), tmp_path / "m.pth")
    assert "norm.bias" in load_state_dict(tmp_path / "m.pth")


def test_sharded_index(tmp_path):
    sd = Tiny().state_dict()
    save_file({"proj.weight": sd["proj.weight"]}, tmp_path / "a.safetensors")
    rest = {k: v for k, v in sd.items() if k != "proj.weight"}
    save_file(rest, tmp_path / "b.safetensors")
    index = {"weight_map": {"proj.weight": "a.safetensors", **dict.fromkeys(rest, "b.safetensors")}}
    (tmp_path / "m.safetensors.index.json").write_text(__import__("json").dumps(index))
    assert set(load_state_dict(tmp_path)) == set(sd)


def test_load_into_names_bad_key_and_shape():
    src = Tiny().state_dict()
    with pytest.raises(CheckpointError, match="proj.bias"):
        load_into(Tiny(), {k: v for k, v in src.items() if k != "proj.bias"}, what="tiny")
    bad = dict(src, **{"norm.weight": torch.ones(5)})
    with pytest.raises(CheckpointError, match=r"norm.weight.*\[5\]"):
        load_into(Tiny(), bad, what="tiny")


def test_scaled_fp8_linear_matches_dequantised_weights():
    ref = Tiny()
    scale = ref.proj.weight.abs().max() / 448
    q = (ref.proj.weight / scale).to(torch.float8_e4m3fn)
    sd = dict(ref.state_dict(), **{"proj.weight": q, "proj.scale_weight": scale.float().reshape(()),
                                   "scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)})
    model = Tiny()
    load_into(model, sd, what="tiny")
    assert model.proj.weight.dtype == torch.float8_e4m3fn
    x = torch.randn(2, 4)
    expected = x @ (q.float() * scale).T + ref.proj.bias
    torch.testing.assert_close(model.proj(x), expected)
