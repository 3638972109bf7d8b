"""Tiny random-weight diffusers pipelines saved as local folders, for tests and CPU benchmarks.

Built like diffusers' own ``get_dummy_components`` (``block_out_channels=(4, 8)``, 32-wide text encoders) after
``torch.manual_seed(0)``.  No download: the CLIP tokenizer is a byte-level vocabulary written here (every byte a
token, no merges); the T5 slots use the same tokenizer, which the pipelines only call for token ids.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("sd", "sd_v", "sdxl", "sd3", "flux")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _tokenizer():
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab[c] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)


def _clip(tok, projection: int | None = None, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=len(tok), max_position_embeddings=77, projection_dim=projection or hidden)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _t5(tok, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=len(tok), d_model=d_model, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                   pad_token_id=tok.pad_token_id or 0, eos_token_id=tok.eos_token_id)
    return T5EncoderModel(cfg)


def _vae(latent_channels: int = 4, flow: bool = False):
    from diffusers import AutoencoderKL

    extra = dict(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False) \
        if flow else {}
    return AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=latent_channels, norm_num_groups=2, sample_size=16, **extra)


def make_tiny_pipeline(family: str, folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random pipeline of ``family`` (sd, sd_v, sdxl, sd3, flux) to ``folder``; 16x16 pixels, 8x8
    latents."""
    from diffusers import (DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; allowed: {', '.join(FAMILIES)}")
    folder = Path(folder)
    torch.manual_seed(seed)
    tok = _tokenizer()
    if family in ("sd", "sd_v", "sdxl"):
        xl = family == "sdxl"
        unet = UNet2DConditionModel(
            block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64 if xl else 32, norm_num_groups=2, attention_head_dim=(2, 4),
            **(dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=32 + 6 * 8) if xl else {}))
        sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, prediction_type="v_prediction" if family == "sd_v" else "epsilon")
        if xl:
            pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=_clip(tok), text_encoder_2=_clip(tok, 32),
                                             tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=sched)
        else:
            pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=_clip(tok), tokenizer=tok, unet=unet,
                                           scheduler=sched, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    elif family == "sd3":
        tr = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                                   attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                   joint_attention_dim=64, pooled_projection_dim=64)
        pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                        vae=_vae(flow=True), text_encoder=_clip(tok, 32), tokenizer=tok,
                                        text_encoder_2=_clip(tok, 32), tokenizer_2=tok, text_encoder_3=_t5(tok, 64),
                                        tokenizer_3=tok)
    else:
        tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                    pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
        sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
        pipe = FluxPipeline(transformer=tr, scheduler=sched, vae=_vae(flow=True), text_encoder=_clip(tok),
                            tokenizer=tok, text_encoder_2=_t5(tok), tokenizer_2=tok)
    pipe.save_pretrained(str(folder))
    return folder
