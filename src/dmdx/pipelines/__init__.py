"""Local diffusers pipeline folders, read and never stepped: their configs, components, schedules, prompt encoders
and VAEs (``folder`` for any pipeline, ``image`` for SD / SDXL / SD3 / Flux, ``video`` for CogVideoX / Wan).

This layer knows no dmdx network and no training: the backbones behind the dmdx contract are in
:mod:`dmdx.nets.pipeline` and :mod:`dmdx.nets.video`, and each teacher kind's set-up, sampling and export in
:mod:`dmdx.teachers`.  Nothing is ever downloaded: a hub id or a folder without its weights gets a clear error.
"""
