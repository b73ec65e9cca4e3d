"""The device names training and serving accept: 'auto', 'cpu', 'cuda' or 'cuda:N'."""
from __future__ import annotations


def check_device(device: str) -> str:
    """``device`` unchanged when it is a name this project accepts; a ``ValueError`` saying which are otherwise."""
    if device in ('auto', 'cpu', 'cuda') or (device.startswith('cuda:') and device[5:].isdigit()):
        return device
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}; use 'auto', 'cpu', 'cuda' "
                     "or 'cuda:<index>' ('auto' takes a GPU when there is one)")
