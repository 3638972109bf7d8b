"""Tiny random-weight CogVideoX and Wan text-to-video pipelines saved as local folders (tests, CPU benchmarks).

Built like diffusers' own CogVideoX / Wan pipeline tests (one or two blocks, 4 or 16 latent channels, a few frames)
after ``torch.manual_seed(0)``.  No download: the T5 / UMT5 tokenizer is a ``tokenizers`` Unigram model over a
small word list (no sentencepiece file), wrapped as a ``T5TokenizerFast``.  Native size: 9 frames of 16x16
pixels, i.e. latents [C, 3, 2, 2] (CogVideoX, 8x spatial VAE, patch 2 -> a 1x1 token grid per frame) and
[16, 3, 2, 2] (Wan).
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("cogvideox", "wan")
WORDS = ("a", "the", "red", "blue", "green", "cat", "dog", "bird", "runs", "flies", "over", "hills", "sunset",
         "river", "city", "at", "night", "in", "snow", "sea")


def t5_tokenizer(max_length: int = 16):
    """A T5-style tokenizer without sentencepiece: Unigram over ``WORDS`` + pad / eos / unk."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(w, -1.0 - i * 0.01) for i, w in enumerate(WORDS)]
    tk = Tokenizer(models.Unigram(vocab, unk_id=2))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers import processors

    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
                           model_max_length=max_length)


def make_tiny_video_pipeline(family: str, folder: str | Path, seed: int = 0, rotary: bool = True) -> Path:
    """Write a tiny random ``family`` (cogvideox, wan) text-to-video pipeline to ``folder``.

    CogVideoX: ``rotary=True`` builds a 5b-style transformer (3-D rotary embeddings), ``False`` a 2b-style one
    (fixed sinusoidal positions); both with the 2b scheduler (v-prediction, SNR shift 3, zero terminal SNR).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny video family {family!r}; allowed: {', '.join(FAMILIES)}")
    folder = Path(folder)
    torch.manual_seed(seed)
    tok = t5_tokenizer()
    if family == "cogvideox":
        from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                               CogVideoXTransformer3DModel)
        from transformers import T5Config, T5EncoderModel

        te = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_ff=37, d_kv=8, num_layers=1, num_heads=4,
                                     pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
        vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                     up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                     latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                     temporal_compression_ratio=4, sample_height=16, sample_width=16)
        tr = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                         time_embed_dim=2, text_embed_dim=32, num_layers=2, sample_width=2,
                                         sample_height=2, sample_frames=9, patch_size=1, temporal_compression_ratio=4,
                                         max_text_seq_length=16, use_rotary_positional_embeddings=rotary,
                                         use_learned_positional_embeddings=False)
        sched = CogVideoXDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       snr_shift_scale=3.0, rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                       timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)
        pipe = CogVideoXPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=tr, scheduler=sched)
    else:
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        te = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=32, d_ff=37, d_kv=8, num_layers=1, num_heads=4,
                                         pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
        tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                                   out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
                                   cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
        sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000)
        pipe = WanPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=tr, scheduler=sched)
    pipe.save_pretrained(str(folder))
    return folder
