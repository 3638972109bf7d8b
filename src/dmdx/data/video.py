"""Folders of video files (mp4, webm, mov, mkv, avi) read with PyAV (``pip install dmdx[video]``).

Each video gives its first ``frames`` frames, resized (shorter side) and centre-cropped to ``height x width``,
as a float tensor [3, F, H, W] in [-1, 1].  A caption sits beside its video as ``NAME.txt`` (optional; videos
without one are paired with random prompts of the run, as uncaptioned images are).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .files import files_in

Tensor = torch.Tensor
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")


def _av():
    try:
        import av
    except ImportError:
        raise ImportError("reading video files needs PyAV: pip install 'dmdx[video]' (or pip install av)") from None
    return av


def video_files(folder: str | Path) -> list[Path]:
    return files_in(folder, VIDEO_SUFFIXES, "video folder", "video files")


def read_video(path: Path, frames: int, height: int, width: int) -> Tensor:
    """The first ``frames`` frames of a video, [3, frames, height, width] in [-1, 1]."""
    av = _av()
    out = []
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                out.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
                if len(out) == frames:
                    break
    except av.error.FFmpegError as e:  # type: ignore[attr-defined]
        raise ValueError(f"cannot read video {path}: {e}") from None
    if len(out) < frames:
        raise ValueError(f"{path} has {len(out)} frames; the teacher needs {frames} (video.frames)")
    x = torch.stack(out).permute(0, 3, 1, 2).float() / 127.5 - 1  # [F, 3, h, w]
    h, w = x.shape[-2:]
    s = max(height / h, width / w)
    nh, nw = max(height, round(h * s)), max(width, round(w * s))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - height) // 2, (nw - width) // 2
    x = x[..., top:top + height, left:left + width]
    return x.permute(1, 0, 2, 3).clamp(-1, 1).contiguous()


@dataclass
class VideoFolder:
    videos: Tensor  # [N, 3, F, H, W] in [-1, 1]
    captions: list[str | None]
    files: list[Path]


def load_video_folder(folder: str | Path, frames: int, height: int, width: int) -> VideoFolder:
    files = video_files(folder)
    vids = [read_video(p, frames, height, width) for p in files]
    caps = []
    for p in files:
        txt = p.with_suffix(".txt")
        caps.append(txt.read_text().strip() or None if txt.is_file() else None)
    return VideoFolder(torch.stack(vids), caps, files)


def write_video(path: str | Path, frames: Tensor, fps: int = 8) -> Path:
    """Write frames [3, F, H, W] in [-1, 1] as an H.264 mp4 (even sizes are padded by one pixel if odd)."""
    av = _av()
    path = Path(path)
    x = ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)  # [F, H, W, 3]
    if x.shape[1] % 2 or x.shape[2] % 2:  # yuv420p needs even sizes
        x = F.pad(x.permute(0, 3, 1, 2), (0, x.shape[2] % 2, 0, x.shape[1] % 2), mode="replicate").permute(0, 2, 3, 1)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = x.shape[2], x.shape[1]
        stream.pix_fmt = "yuv420p"
        for f in x.numpy():
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_preview(path: str | Path, frames: Tensor, fps: int = 8) -> Path:
    """An animated GIF of frames [3, F, H, W] in [-1, 1] (Pillow)."""
    from PIL import Image

    x = ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    imgs = [Image.fromarray(f) for f in x]
    imgs[0].save(str(path), save_all=True, append_images=imgs[1:], duration=max(1, 1000 // fps), loop=0)
    return Path(path)
