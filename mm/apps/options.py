"""Checks of the options that several `mm` commands share, so that each says the same thing."""
from __future__ import annotations


def check_threads(threads: int) -> None:
    """ValueError unless --threads is >= 0 (0: torch's choice)."""
    if threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: torch's choice), got {threads}")


def set_threads(threads: int) -> None:
    """Check --threads, then use that many CPU threads (0: leave torch's choice)."""
    check_threads(threads)
    if threads:
        import torch

        torch.set_num_threads(threads)


def check_port(port: int) -> None:
    """ValueError unless --port is a TCP port number."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must lie in 0..65535, got {port}")
