"""Full-size video pipelines from their published configs, never downloaded: Wan2.1-T2V-1.3B and CogVideoX-2b.

As :mod:`dmdx.teachers.image.published`: ``write_published(name, folder)`` writes the configs (what ``dmdx plan``
reads), ``weights=True`` random float16 weights too.  The transformers, VAEs and schedulers are the published ones
(``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``, ``THUDM/CogVideoX-2b``); the UMT5-XXL / T5-XXL text encoders are stand-ins of
one layer at the published width (4096), whose output has the published shape, with the word-level tokenizer of
:mod:`.tiny` at the published lengths (512, 226).
"""

from __future__ import annotations

from pathlib import Path

from ...pipelines.folder import write_pipeline
from .tiny import t5_tokenizer

WAN_1_3B = dict(added_kv_proj_dim=None, attention_head_dim=128, cross_attn_norm=True, eps=1e-6, ffn_dim=8960,
                freq_dim=256, image_dim=None, in_channels=16, num_attention_heads=12, num_layers=30, out_channels=16,
                patch_size=[1, 2, 2], qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
                text_dim=4096)  # 1,419.0 M parameters
COGVIDEOX_2B = dict(activation_fn="gelu-approximate", attention_bias=True, attention_head_dim=64, in_channels=16,
                    max_text_seq_length=226, num_attention_heads=30, num_layers=30, out_channels=16, patch_size=2,
                    sample_frames=49, sample_height=60, sample_width=90, spatial_interpolation_scale=1.875,
                    temporal_compression_ratio=4, temporal_interpolation_scale=1.0, text_embed_dim=4096,
                    time_embed_dim=512, timestep_activation_fn="silu", use_learned_positional_embeddings=False,
                    use_rotary_positional_embeddings=False)  # 1,693.8 M

PUBLISHED = ("wan2.1-1.3b", "cogvideox-2b")


def _model(cls_name: str, config: dict):
    def make(device):
        import diffusers
        import torch

        with torch.device(device):
            return getattr(diffusers, cls_name).from_config(config)

    return make


def _text_stand_in(tok, umt5: bool):
    def make(device):
        import torch
        from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

        kw = dict(vocab_size=len(tok), d_model=4096, d_ff=256, d_kv=64, num_layers=1, num_heads=64, pad_token_id=0,
                  eos_token_id=1, decoder_start_token_id=0)
        with torch.device(device):
            return UMT5EncoderModel(UMT5Config(**kw)) if umt5 else T5EncoderModel(T5Config(**kw))

    return make


def published_components(name: str) -> tuple[str, dict]:
    """(pipeline class, components for :func:`dmdx.pipelines.folder.write_pipeline`) of a published pipeline."""
    from diffusers import CogVideoXDDIMScheduler, UniPCMultistepScheduler

    if name == "wan2.1-1.3b":
        tok = t5_tokenizer(max_length=512)
        return "WanPipeline", {
            "transformer": _model("WanTransformer3DModel", WAN_1_3B),
            "vae": _model("AutoencoderKLWan", {}),  # the defaults are Wan 2.1's VAE
            "text_encoder": _text_stand_in(tok, umt5=True), "tokenizer": tok,
            "scheduler": UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                 flow_shift=3.0, num_train_timesteps=1000)}
    if name == "cogvideox-2b":
        tok = t5_tokenizer(max_length=226)
        return "CogVideoXPipeline", {
            "transformer": _model("CogVideoXTransformer3DModel", COGVIDEOX_2B),
            "vae": _model("AutoencoderKLCogVideoX", {}),  # the defaults are CogVideoX-2b's VAE
            "text_encoder": _text_stand_in(tok, umt5=False), "tokenizer": tok,
            "scheduler": CogVideoXDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                snr_shift_scale=3.0, rescale_betas_zero_snr=True,
                                                prediction_type="v_prediction", timestep_spacing="trailing",
                                                clip_sample=False, set_alpha_to_one=True)}
    raise ValueError(f"unknown published video pipeline {name!r}; allowed: {', '.join(PUBLISHED)}")


def write_published(name: str, folder: str | Path, weights: bool = False) -> Path:
    """Write the published pipeline ``name`` (wan2.1-1.3b, cogvideox-2b) to ``folder``: configs only, or with random
    float16 weights (``weights=True``)."""
    pipeline, components = published_components(name)
    return write_pipeline(Path(folder), pipeline, components, weights=weights)
