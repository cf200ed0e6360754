"""Where a sparse set of frames can be reached by seeking instead of decoding everything before them.

Sequential decoding of 32 frames spread over a 60 s video decodes all 1,500 frames up to the last one,
six times the work of a 10 s video. A decoder can only start at a keyframe, so the index here records,
from one demux pass (packets are read, nothing is decoded), every frame's presentation timestamp and
which frames are keyframes. A frame's index is the rank of its timestamp, which is what sequential
decoding counts, so both paths yield the same (index, frame) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import av
import numpy as np

# Containers whose packets carry a trustworthy keyframe flag (from the sample tables of MP4/MOV, the cue
# and block flags of Matroska/WebM). An MPEG program stream's demuxer flags P-frames too; a seek there
# would start a decoder on a frame it cannot decode, so those are decoded sequentially.
SEEKABLE_FORMATS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm"})


@dataclass(frozen=True)
class PacketIndex:
    pts: np.ndarray  # (frames,) int64 presentation timestamps, ascending: frame i has pts[i]
    keyframes: np.ndarray  # display indices of the frames a decoder can start from, ascending

    @classmethod
    def read(cls, container: av.container.InputContainer) -> PacketIndex | None:
        """The index of the container's first video stream, or None when its packets cannot give exact
        frame indices (a packet without a timestamp, or two packets with the same one) or the container's
        keyframe flags are not to be trusted."""
        if container.format.name not in SEEKABLE_FORMATS:
            return None
        stream = container.streams.video[0]
        pts: list[int] = []
        key: list[bool] = []
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's end-of-stream marker, not a frame
                continue
            if packet.pts is None:
                return None
            pts.append(packet.pts)
            key.append(packet.is_keyframe)
        if not pts:
            return None
        order = np.argsort(np.asarray(pts, np.int64), kind="stable")
        ordered = np.asarray(pts, np.int64)[order]
        if np.any(np.diff(ordered) <= 0):
            return None
        rank = np.empty(len(order), np.int64)
        rank[order] = np.arange(len(order))
        return cls(ordered, np.sort(rank[np.asarray(key, bool)]))

    def index_of(self, pts: int | None) -> int | None:
        """The display index of the frame with this timestamp; None for one the packets did not have."""
        if pts is None:
            return None
        i = int(np.searchsorted(self.pts, pts))
        return i if i < len(self.pts) and self.pts[i] == pts else None

    def seek_target(self, decoded_to: int, target: int) -> int | None:
        """The keyframe to seek to for frame `target` when the decoder has output frames up to
        `decoded_to` (-1 before the first), or None when decoding on reaches it with no more work: the
        last keyframe at or before `target` is no later than the next frame the decoder would give."""
        before = int(np.searchsorted(self.keyframes, target, side="right")) - 1
        if before < 0:
            return None
        keyframe = int(self.keyframes[before])
        return keyframe if keyframe > decoded_to + 1 else None
