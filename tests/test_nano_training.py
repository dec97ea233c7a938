"""The nano training scripts: their differentiable passes equal the real encode/decode, their losses count what
they should, a few steps learn, and what they write loads back through the real loaders."""
import dataclasses

import pytest
import torch

from sora.checkpoints import read_metadata
from sora.dit import WanDiT, load_dit
from sora.latent_formats import FORMATS
from sora.nano import data, latent_format_from_metadata
from sora.nano import train_dit as td
from sora.nano import train_vae as tv
from sora.nano import vocabulary as vocab
from sora.vae import WanVAE, load_vae

VAE_CFG = tv.VAETrainConfig(base_dim=4, decoder_base_dim=4, z_dim=4, short_crop=16, crop=16, batch=2, stats_clips=2,
                             eval_clips=1)
DIT_CFG = td.DiTTrainConfig(dim=32, num_heads=2, num_layers=2, ffn_dim=64, text_len=8, batch=4)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return WanVAE(VAE_CFG.vae_config())


# ---------------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("residual_shortcuts", [True, False], ids=["2.2 stages", "2.1 layout"])
def test_training_passes_equal_the_inference_encode_and_decode(residual_shortcuts):
    torch.manual_seed(0)
    vae = WanVAE(dataclasses.replace(VAE_CFG, residual_shortcuts=residual_shortcuts).vae_config())
    video = data.make_clip(1, frames=9, height=16, width=16).video[None]
    mu, logvar = tv.encode_posterior(vae, video)
    with torch.no_grad():
        assert torch.allclose(mu, vae.encode(video), atol=1e-5)
        assert torch.allclose(tv.decode_frames(vae, mu).clamp(-1, 1), vae.decode(mu), atol=1e-5)
    assert mu.shape == logvar.shape == (1, 4, 3, 2, 2)


def test_vae_batches_are_crops_around_the_object_whose_pixels_carry_their_share_of_the_loss():
    video, weight = tv.training_batch(VAE_CFG, step=3)
    again, _ = tv.training_batch(VAE_CFG, step=3)
    assert video.shape == (2, 3, 5, 16, 16) and weight.shape == (2, 1, 5, 16, 16) and torch.equal(video, again)
    for w in weight:
        values = w.unique()
        assert len(values) == 2  # the object is in every crop, and weighs more than the background per pixel
        on_object = w == values.max()
        assert w.mean() == pytest.approx(1.0)
        assert (w * on_object).sum() / w.sum() == pytest.approx(VAE_CFG.object_share)


def test_a_few_vae_steps_lower_the_loss_on_a_batch():
    torch.manual_seed(0)
    vae = WanVAE(VAE_CFG.vae_config())
    optimizer = torch.optim.Adam(vae.parameters(), lr=5e-3)
    video, weight = tv.training_batch(dataclasses.replace(VAE_CFG, short_frames=5, batch=1), step=0)
    losses = []
    for _ in range(8):
        loss, _ = tv.loss_terms(vae, video, weight, VAE_CFG, torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_decoder_phase_trains_the_decoder_on_whole_clips_and_keeps_the_encoder():
    cfg = dataclasses.replace(VAE_CFG, size=16, short_steps=1, steps=2, decoder_frames=9)
    video, weight = tv.training_batch(cfg, step=2)
    assert video.shape == (1, 3, 9, 16, 16) and weight.shape == (1, 1, 9, 16, 16)
    torch.manual_seed(0)
    vae = WanVAE(cfg.vae_config())
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    optimizer = tv._optimizer(vae, cfg, step=2)
    loss, _ = tv.loss_terms(vae, video, weight, cfg, torch.Generator().manual_seed(0), train_encoder=False)
    loss.backward()
    optimizer.step()
    after = vae.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("decoder.", "conv2.")) for k in changed)
    assert any(k.startswith("decoder.head") for k in changed)


def test_pooled_rgb_averages_the_pixels_behind_each_latent_cell():
    video = torch.rand(1, 3, 9, 16, 16)
    pooled = tv.pooled_rgb(video, spatial=8, temporal=4)
    assert pooled.shape == (1, 3, 3, 2, 2)
    assert torch.allclose(pooled[0, :, 0, 1, 0], video[0, :, 0, 8:, :8].mean(dim=(1, 2)))
    assert torch.allclose(pooled[0, :, 2, 0, 1], video[0, :, 5:9, :8, 8:].mean(dim=(1, 2, 3)))


def test_latent_statistics_and_preview_fit(vae):
    fmt = tv.measure_latent_format(vae, clips=2, seed_base=5)
    videos = torch.stack([data.make_clip(5 + i).video for i in range(2)])
    raw = vae.encode(videos)
    assert torch.allclose(torch.tensor(fmt.mean), raw.mean(dim=(0, 2, 3, 4)), atol=1e-5)
    assert torch.allclose(torch.tensor(fmt.std), raw.transpose(0, 1).reshape(4, -1).std(dim=1), atol=1e-5)
    # least squares: the residual of the preview fit is orthogonal to every latent channel and to the bias
    cells = fmt.normalize(raw).transpose(0, 1).reshape(4, -1).T
    rgb = tv.pooled_rgb(videos, 8, 4).transpose(0, 1).reshape(3, -1).T
    residual = cells @ torch.tensor(fmt.rgb_factors) + torch.tensor(fmt.rgb_bias) - rgb
    design = torch.cat([cells, torch.ones(len(cells), 1)], dim=1)
    assert (design.T @ residual).abs().max() < 1e-3 * len(cells)


def test_vae_export_loads_back_with_its_latent_format(vae, tmp_path):
    fmt = tv.measure_latent_format(vae, clips=2, seed_base=5)
    path = tmp_path / "nano_vae.safetensors"
    tv.export(vae, fmt, path, {"sora.train_steps": "0"})
    loaded = load_vae(path)
    assert loaded.config == vae.config
    latent = torch.randn(1, 4, 2, 2, 2)
    assert torch.equal(loaded.decode(latent), vae.decode(latent))
    metadata = read_metadata(path)
    assert metadata["sora.family"] == "nano" and latent_format_from_metadata(metadata) == fmt


# ---------------------------------------------------------------------------------------------------------------
# DiT
# ---------------------------------------------------------------------------------------------------------------

def toy_dataset(clips=6, channels=4):
    generator = torch.Generator().manual_seed(0)
    return {"latents": torch.randn(clips, channels, 9, 2, 2, generator=generator).half(),
            "context": torch.randn(clips * DIT_CFG.captions_per_clip, 8, 384, generator=generator).half(),
            "empty": torch.randn(1, 8, 384, generator=generator),
            "object": torch.rand(clips, 9, 2, 2, generator=generator).half()}


def test_batches_cover_text_to_video_first_frames_known_leading_frames_and_framewise_noise():
    dataset = toy_dataset()
    generator = torch.Generator().manual_seed(1)
    t2v = dataclasses.replace(DIT_CFG, i2v_share=0.0, extend_share=0.0, short_share=0.0, framewise_share=0.0,
                              image_share=0.0, text_dropout=0.0)
    x0, sigma, context, cells = td.training_batch(dataset, t2v, generator)
    assert x0.shape == (4, 4, 9, 2, 2) and sigma.shape == (4, 9) and cells.shape == (4, 9, 2, 2)
    assert (sigma > 0).all() and (sigma == sigma[:, :1]).all()  # one noise level per clip
    assert any(torch.equal(context[0], c.float()) for c in dataset["context"])
    (i,) = [i for i, c in enumerate(dataset["latents"]) if torch.equal(x0[0], c.float())]
    assert torch.equal(cells[0], 1 + t2v.object_gain * dataset["object"][i].float())  # the clip's own coverage

    i2v = dataclasses.replace(DIT_CFG, i2v_share=1.0)
    lengths = set()
    for _ in range(30):
        x0, sigma, _, _ = td.training_batch(dataset, i2v, generator)
        assert (sigma[:, 0] == 0).all() and (sigma[:, 1:] > 0).all()
        assert any(torch.equal(x0[0], c[:, :x0.shape[2]].float()) for c in dataset["latents"])  # from frame 0 on
        lengths.add(x0.shape[2])
    assert lengths == {5, 6, 7, 8, 9}

    extend = dataclasses.replace(DIT_CFG, i2v_share=0.0, extend_share=1.0, text_dropout=1.0)
    for _ in range(20):
        x0, sigma, context, _ = td.training_batch(dataset, extend, generator)
        k, length = int((sigma[0] == 0).sum()), x0.shape[2]
        assert 5 <= length <= 9 and 1 <= k <= min(3, length - 2)
        assert (sigma[:, :k] == 0).all() and (sigma[:, k:] > 0).all()
        # windows run to the clip's end, so a window's known frames are the frames before its new ones
        start = 9 - length
        assert any(torch.equal(x0[0], c[:, start:].float()) for c in dataset["latents"])
        assert torch.equal(context, dataset["empty"].expand(4, -1, -1))

    short = dataclasses.replace(DIT_CFG, i2v_share=0.0, extend_share=0.0, short_share=1.0)
    lengths = {td.training_batch(dataset, short, generator)[0].shape[2] for _ in range(30)}
    assert lengths == {5, 6, 7, 8}

    framewise = dataclasses.replace(DIT_CFG, i2v_share=0.0, extend_share=0.0, short_share=0.0, framewise_share=1.0)
    x0, sigma, _, _ = td.training_batch(dataset, framewise, generator)
    assert x0.shape[2] == 9 and len(sigma[0].unique()) == 9 and (sigma > 0).all()

    first = dataclasses.replace(DIT_CFG, i2v_share=0.0, extend_share=0.0, short_share=0.0, framewise_share=0.0,
                                image_share=1.0)
    x0, sigma, _, cells = td.training_batch(dataset, first, generator)
    assert x0.shape == (4, 4, 1, 2, 2) and sigma.shape == (4, 1) and (sigma > 0).all() and cells.shape == (4, 1, 2, 2)
    assert any(torch.equal(x0[0], c[:, :1].float()) for c in dataset["latents"])  # a clip's first latent frame


def test_focus_batches_are_of_one_kind_at_high_noise():
    dataset, generator = toy_dataset(), torch.Generator().manual_seed(2)
    for _ in range(10):  # whatever the batch mix says
        x0, sigma, _, _ = td.training_batch(dataset, DIT_CFG, generator, focus=("i2v", 0.9))
        assert 5 <= x0.shape[2] <= 9 and (sigma[:, 0] == 0).all() and (sigma[:, 1:] >= 0.9).all()
        x0, sigma, _, _ = td.training_batch(dataset, DIT_CFG, generator, focus=("t2v", 0.85))
        assert x0.shape[2] == 9 and (sigma >= 0.85).all() and (sigma == sigma[:, :1]).all()


def test_caption_variants_end_with_the_direction_phrase_alone():
    for seed in range(12):
        clip = data.make_clip(seed)
        captions = td.caption_variants(clip, seed, 3)
        assert captions[0] == clip.caption and len(captions) == 3
        assert captions[2] in vocab.DIRECTION_PHRASES[clip.scene.direction]
        assert clip.scene.color in captions[1].split()  # a full wording


def test_flow_loss_counts_only_generated_frames_and_keeps_known_ones_clean():
    x0 = torch.randn(2, 4, 5, 2, 2)
    sigma = torch.tensor([[0.0, 0.0, 0.3, 0.5, 0.9], [0.0, 0.0, 0.7, 0.7, 0.7]])
    seen = {}

    def model(x, t, context):  # records what the DiT is given and predicts v = 0
        seen.update(x=x, t=t)
        return torch.zeros_like(x)

    loss = td.flow_loss(model, x0, sigma, torch.zeros(2, 8, 384), generator=torch.Generator().manual_seed(4))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    assert torch.equal(seen["t"], sigma * 1000)
    assert torch.equal(seen["x"][:, :, :2], x0[:, :, :2])
    expected = (1 - sigma[1, 3]) * x0[1, :, 3] + sigma[1, 3] * noise[1, :, 3]
    assert torch.allclose(seen["x"][1, :, 3], expected)
    assert torch.allclose(loss, (noise - x0)[:, :, 2:].square().mean())
    # cell weights: a weighted mean over the generated frames
    cells = torch.rand(2, 5, 2, 2)
    weighted = td.flow_loss(model, x0, sigma, torch.zeros(2, 8, 384), torch.Generator().manual_seed(4), cells)
    w = cells[:, None, 2:].expand(2, 4, 3, 2, 2)
    assert torch.allclose(weighted, ((noise - x0)[:, :, 2:].square() * w).sum() / w.sum())


def test_object_coverage_is_the_object_pixel_share_behind_each_latent_cell():
    cfg = dataclasses.replace(DIT_CFG, clips=2, frames=9, size=16)
    coverage = td.object_coverage(cfg, spatial=8, temporal=4)
    assert coverage.shape == (2, 3, 2, 2)
    pixels = data.object_pixels(data.make_clip(td.SEED_BASE + 1, 9, 16, 16))
    assert coverage[1, 0, 1, 0].item() == pytest.approx(pixels[0, 8:, :8].mean().item(), abs=1e-3)
    assert coverage[1, 2, 0, 1].item() == pytest.approx(pixels[5:9, :8, 8:].mean().item(), abs=1e-3)
    assert coverage.sum() > 0


def test_a_few_dit_steps_lower_the_loss_on_a_batch():
    torch.manual_seed(0)
    model = WanDiT(DIT_CFG.dit_config(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x0, sigma, context, cells = td.training_batch(toy_dataset(), DIT_CFG, torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        loss = td.flow_loss(model, x0, sigma, context, torch.Generator().manual_seed(0), cells)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_dit_export_loads_back_as_a_nano_model(vae, tmp_path):
    fmt = tv.measure_latent_format(vae, clips=2, seed_base=5)
    torch.manual_seed(0)
    model = WanDiT(DIT_CFG.dit_config(4))
    torch.nn.init.normal_(model.head.head.weight, std=0.02)  # a fresh head is zero; make the output depend on it
    path = tmp_path / "nano_dit.safetensors"
    td.export(model, DIT_CFG, fmt, path, {"sora.train_steps": "0"})
    FORMATS.setdefault("nano", fmt)
    loaded = load_dit(path, compute_dtype=torch.float32)
    cfg = loaded.config
    assert (cfg.latent_format, cfg.per_token_timesteps, cfg.num_heads, cfg.text_len) == ("nano", True, 2, 8)
    assert (cfg.dim, cfg.num_layers, cfg.in_dim, cfg.text_dim) == (32, 2, 4, 384)
    x, t, context = torch.randn(1, 4, 3, 2, 2), torch.tensor([[0.0, 500.0, 500.0]]), torch.randn(1, 5, 384)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, context), model(x, t, context))
    assert latent_format_from_metadata(read_metadata(path)) == fmt


def test_eval_prompts_cover_every_direction_and_name_their_colour():
    prompts = td.eval_prompts(16)
    assert {d for _, d, _ in prompts} == {"left", "right", "up", "down"}
    assert len({c for c, _, _ in prompts}) == 8
    for color, _, caption in prompts:
        assert color in caption.split()
