"""Full-size image pipelines from their published configs, never downloaded: SD1.5, SDXL and SD3-medium.

``write_published(name, folder)`` writes a folder that holds only configs (``model_index.json``, each component's
config, the tokenizers): what ``dmdx plan`` reads.  With ``weights=True`` every model gets random weights (float16
files), which measure speed and memory exactly as the real weights would.

The denoisers and VAEs are the published architectures (the values of each model's ``config.json`` on the hub:
``runwayml/stable-diffusion-v1-5``, ``stabilityai/stable-diffusion-xl-base-1.0``,
``stabilityai/stable-diffusion-3-medium-diffusers``); the CLIP text encoders too.  Stand-ins, where only the shape of
their output matters (prompts are encoded once, before training): the tokenizers (the byte-level vocabulary of
:mod:`.tiny`, padded to the published lengths) and SD3's T5-XXL (one layer at its published width, 4096).
"""

from __future__ import annotations

from pathlib import Path

from ...pipelines.folder import write_pipeline
from .tiny import _tokenizer

SD15_UNET = dict(attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, in_channels=4, out_channels=4,
                 layers_per_block=2, sample_size=64, norm_num_groups=32)  # 859.5 M parameters
SDXL_UNET = dict(addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
                 attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], in_channels=4,
                 out_channels=4, layers_per_block=2, projection_class_embeddings_input_dim=2816, sample_size=128,
                 transformer_layers_per_block=[1, 2, 10], use_linear_projection=True)  # 2,567.5 M
SD3_MEDIUM = dict(attention_head_dim=64, caption_projection_dim=1536, in_channels=16, joint_attention_dim=4096,
                  num_attention_heads=24, num_layers=24, out_channels=16, patch_size=2, pooled_projection_dim=2048,
                  pos_embed_max_size=192, sample_size=128)  # 2,028.3 M
SD_VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, in_channels=3, out_channels=3, latent_channels=4,
              layers_per_block=2, norm_num_groups=32, sample_size=512)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu")
SCALED_LINEAR = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)

PUBLISHED = ("sd15", "sdxl", "sd3-medium")


def _clip(tok, arch: dict, projection: bool):
    def make(device):
        import torch
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **arch)
        with torch.device(device):
            return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)

    return make


def _model(cls_name: str, config: dict):
    def make(device):
        import diffusers
        import torch

        with torch.device(device):
            return getattr(diffusers, cls_name).from_config(config)

    return make


def _t5_stand_in(tok):
    def make(device):
        import torch
        from transformers import T5Config, T5EncoderModel

        cfg = T5Config(vocab_size=len(tok), d_model=4096, d_ff=256, d_kv=64, num_layers=1, num_heads=64,
                       pad_token_id=tok.pad_token_id or 0, eos_token_id=tok.eos_token_id)
        with torch.device(device):
            return T5EncoderModel(cfg)

    return make


def published_components(name: str) -> tuple[str, dict]:
    """(pipeline class, components for :func:`dmdx.pipelines.folder.write_pipeline`) of a published pipeline."""
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, PNDMScheduler

    tok = _tokenizer()
    tok.model_max_length = 77
    if name == "sd15":
        return "StableDiffusionPipeline", {
            "unet": _model("UNet2DConditionModel", SD15_UNET),
            "vae": _model("AutoencoderKL", {**SD_VAE, "scaling_factor": 0.18215}),
            "text_encoder": _clip(tok, CLIP_L, projection=False), "tokenizer": tok,
            "scheduler": PNDMScheduler(**SCALED_LINEAR, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)}
    if name == "sdxl":
        return "StableDiffusionXLPipeline", {
            "unet": _model("UNet2DConditionModel", SDXL_UNET),
            "vae": _model("AutoencoderKL", {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025,
                                            "force_upcast": True}),
            "text_encoder": _clip(tok, CLIP_L, projection=False), "tokenizer": tok,
            "text_encoder_2": _clip(tok, CLIP_G, projection=True), "tokenizer_2": tok,
            "scheduler": EulerDiscreteScheduler(**SCALED_LINEAR, steps_offset=1, timestep_spacing="leading")}
    if name == "sd3-medium":
        return "StableDiffusion3Pipeline", {
            "transformer": _model("SD3Transformer2DModel", SD3_MEDIUM),
            "vae": _model("AutoencoderKL", {**SD_VAE, "latent_channels": 16, "sample_size": 1024,
                                            "scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False,
                                            "use_post_quant_conv": False}),
            "text_encoder": _clip(tok, CLIP_L, projection=True), "tokenizer": tok,
            "text_encoder_2": _clip(tok, CLIP_G, projection=True), "tokenizer_2": tok,
            "text_encoder_3": _t5_stand_in(tok), "tokenizer_3": tok,
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0)}
    raise ValueError(f"unknown published image pipeline {name!r}; allowed: {', '.join(PUBLISHED)}")


def write_published(name: str, folder: str | Path, weights: bool = False) -> Path:
    """Write the published pipeline ``name`` (sd15, sdxl, sd3-medium) to ``folder``: configs only, or with random
    float16 weights (``weights=True``)."""
    pipeline, components = published_components(name)
    return write_pipeline(Path(folder), pipeline, components, weights=weights)
