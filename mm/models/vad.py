"""Energy voice-activity detection: where the speech of a long recording is, cut into windows a model can take.

10 ms frames are speech when their energy is above max(-65 dBFS, min(noise + 10 dB, peak - 10 dB)) (noise = 10th,
peak = 99th percentile of frame energies); pauses under `min_silence` are bridged, speech runs are padded by `pad`,
and (with `pack`) consecutive runs are packed into windows of at most `max_window` seconds; a run longer than that
is cut at its quietest 10 ms frame in the second half of the window. Silence between windows is not decoded.
"""
from __future__ import annotations

import torch


def decode_windows(wave: torch.Tensor, sample_rate: int, max_window: float, pack: bool = True) -> list[tuple[int, int]]:
    """The [start, end) sample ranges a model decodes wave [S] in: the whole recording when it is at most max_window
    seconds long (as ESPnet and Dolphin decode), else its `speech_windows`."""
    if wave.numel() <= max_window * sample_rate:
        return [(0, wave.numel())]
    return speech_windows(wave, sample_rate, max_window, pack=pack)


def speech_windows(wave: torch.Tensor, sample_rate: int = 16000, max_window: float = 30.0, min_silence: float = 0.3,
                   pad: float = 0.2, pack: bool = True) -> list[tuple[int, int]]:
    """Energy VAD: [start, end) sample ranges of at most max_window seconds that hold the speech of wave [S].

    See the module docstring for the rule; `pack=False` keeps each speech run its own window (for models trained on
    single utterances). Returns [] when no frame is above the threshold.
    """
    hop = sample_rate // 100  # 10 ms frames
    n = wave.numel() // hop
    if n == 0:
        return []
    frames = wave[: n * hop].view(n, hop)
    chunk = 6000  # frames (a minute) at a time: the float64 copies stay small on hours of audio
    energy = torch.cat([10 * torch.log10(frames[i:i + chunk].double().pow(2).mean(1) + 1e-10)  # [n] dBFS
                        for i in range(0, n, chunk)])
    if n * hop < wave.numel():  # the last partial frame counts too
        tail = wave[n * hop:].double()
        energy = torch.cat([energy, 10 * torch.log10(tail.pow(2).mean()[None] + 1e-10)])
        n += 1
    noise, peak = torch.quantile(energy, 0.1).item(), torch.quantile(energy, 0.99).item()
    threshold = max(-65.0, min(noise + 10.0, peak - 10.0))
    speech = (energy > threshold).tolist()

    runs = _runs(speech)
    # bridge short pauses, then pad every run and merge those that touch
    bridged = []
    for s, e in runs:
        if bridged and s - bridged[-1][1] < min_silence * 100:
            bridged[-1] = (bridged[-1][0], e)
        else:
            bridged.append((s, e))
    p = int(round(pad * 100))
    padded = []
    for s, e in bridged:
        s, e = max(0, s - p), min(n, e + p)
        if padded and s <= padded[-1][1]:
            padded[-1] = (padded[-1][0], e)
        else:
            padded.append((s, e))

    max_frames = int(max_window * 100)
    pieces = []  # runs no longer than max_window, long ones cut at their quietest frame
    for s, e in padded:
        while e - s > max_frames:
            lo, hi = s + max_frames // 2, s + max_frames
            cut = lo + int(torch.argmin(energy[lo:hi]))
            pieces.append((s, cut))
            s = cut
        pieces.append((s, e))
    windows = []  # pack consecutive pieces while the window stays within max_window
    for s, e in pieces:
        if pack and windows and e - windows[-1][0] <= max_frames:
            windows[-1] = (windows[-1][0], e)
        else:
            windows.append((s, e))
    return [(s * hop, min(e * hop, wave.numel())) for s, e in windows]


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """[start, end) index ranges of the True runs."""
    runs, start = [], None
    for i, f in enumerate(flags + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            runs.append((start, i))
            start = None
    return runs
