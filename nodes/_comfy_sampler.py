"""Core's SAMPLER (KSamplerSelect and friends) driving Sora Sampler, inside ComfyUI.

A core SAMPLER (`comfy.samplers.KSAMPLER`) runs a k-diffusion sampler function over a denoiser `model(x, σ) -> x0`
that it expects to look like ComfyUI's guided model: an `inner_model` with the `model_sampling` of the model's
family and a `model_patcher` that hands it out. Wan is a flow model (ComfyUI's CONST sampling: `x = σ·ε + (1 −
σ)·x0`, `x0 = x − σ·v`), so the denoiser here carries ComfyUI's own discrete-flow sampling with shift 1 (our sigmas
are already shifted by the scheduler) and computes x0 with our guided model. CFG++ samplers ask for the
unconditional prediction through `sampler_post_cfg_function`; they get it.
"""
from __future__ import annotations

from types import SimpleNamespace


def core_sampler(ksampler, seed: int):
    """A `sora.samplers.ExternalSampler` that runs core's `ksampler` (a KSAMPLER object)."""
    import comfy.model_sampling  # only inside ComfyUI: a SAMPLER socket is connected only there

    class FlowSampling(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    model_sampling = FlowSampling()

    def run(denoise, noise, start, sigmas, callback):
        model = _Denoiser(denoise, model_sampling)
        sigmas = sigmas.to(noise.device)
        samples = ksampler.sample(model, sigmas, {"model_options": {}, "seed": seed},
                                  lambda step, x0, x, total: callback(step, x0), noise, latent_image=start,
                                  denoise_mask=None, disable_pbar=True)
        return samples * (1.0 - sigmas[-1])  # KSAMPLER divides by (1 − σ_end); `solve_with` wants the sample itself
    return run


class _Denoiser:
    """What core's sampler functions call: `model(x, sigma, model_options=..., seed=...) -> x0`."""

    def __init__(self, denoise, model_sampling):
        self.denoise = denoise
        self.inner_model = SimpleNamespace(model_sampling=model_sampling)
        self.model_patcher = SimpleNamespace(get_model_object=lambda name: {"model_sampling": model_sampling}[name])

    def __call__(self, x, sigma, model_options=None, seed=None, **_):
        x0 = self.denoise(x, sigma)
        for post_cfg in (model_options or {}).get("sampler_post_cfg_function", []):
            uncond = self.denoise.uncond if self.denoise.uncond is not None else self.denoise.cond
            x0 = post_cfg({"denoised": x0, "cond_denoised": self.denoise.cond, "uncond_denoised": uncond, "model": self,
                           "sigma": sigma, "model_options": model_options, "input": x, "cond": None,
                           "uncond": None, "cond_scale": None})
        return x0
