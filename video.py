"""Video in and out for predict.py, through PyAV (FFmpeg's libraries): frames as uint8 (3, H, W) tensors.

    for index, seconds, frame in read_frames("dashcam.mp4"): ...
    with VideoWriter("out.mp4", fps=30) as writer: writer.write(frame)
"""
import fractions
import os

import av
import numpy as np
import torch

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm")


class VideoError(ValueError):
    """A video that is missing or cannot be decoded; the message is one line naming the file."""


def open_video(path):
    """The PyAV container and its first video stream; VideoError when the file is missing, not a video or empty."""
    try:
        container = av.open(str(path))
    except FileNotFoundError:
        raise VideoError(f"video not found: {path}") from None
    except (av.FFmpegError, OSError, ValueError) as error:
        raise VideoError(f"cannot decode video {path}: {str(error).splitlines()[0]}") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path} has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # FFmpeg decodes with its own threads
    return container, stream


def video_fps(stream):
    """Frames per second of a stream (its average rate, else its base rate, else 25)."""
    rate = stream.average_rate or stream.base_rate
    return fractions.Fraction(rate) if rate else fractions.Fraction(25)


def read_frames(path):
    """Yield (frame index, time in seconds, uint8 (3, H, W) RGB tensor) for every frame of the video.

    Raises:
        VideoError: the file is missing or cannot be decoded (also when decoding fails part way).
    """
    container, stream = open_video(path)
    fps = video_fps(stream)
    try:
        for index, frame in enumerate(container.decode(stream)):
            seconds = float(frame.time) if frame.time is not None else index / float(fps)
            rgb = frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8
            yield index, seconds, torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
    except av.FFmpegError as error:
        raise VideoError(f"cannot decode video {path}: {str(error).splitlines()[0]}") from None
    finally:
        container.close()


class VideoWriter:
    """Encode uint8 (3, H, W) frames to a video (H.264 where FFmpeg has it, else MPEG-4), at `fps`; the size is
    the first frame's, rounded up to even sides (yuv420p needs them) with black. The folder is made if missing."""

    def __init__(self, path, fps):
        self.path, self.fps = str(path), fractions.Fraction(fps).limit_denominator(100000)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.container, self.stream = av.open(self.path, mode="w"), None

    def write(self, frame):
        height, width = frame.shape[-2:]
        if self.stream is None:
            codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
            self.stream = self.container.add_stream(codec, rate=self.fps)
            self.stream.width, self.stream.height = width + width % 2, height + height % 2
            self.stream.pix_fmt = "yuv420p"
        frame = torch.nn.functional.pad(frame, (0, self.stream.width - width, 0, self.stream.height - height))
        video_frame = av.VideoFrame.from_ndarray(frame.permute(1, 2, 0).contiguous().numpy(), format="rgb24")
        for packet in self.stream.encode(video_frame):
            self.container.mux(packet)

    def close(self):
        if self.stream is not None:
            for packet in self.stream.encode():  # flush the encoder
                self.container.mux(packet)
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
