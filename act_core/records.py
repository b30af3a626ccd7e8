"""Tensors recorded between the steps of a replay, and the memory budget they share.

A RecordStore lives as long as one replay: recorded tensors stay on the accelerator while its
device budget allows, the rest go to the CPU, whose bytes it counts (bench/estimation reports the
peak). The tree helpers apply a function to every tensor inside the arguments and outputs of
module calls (lists, tuples, dicts, named tuples, transformers' ModelOutput).
"""
from __future__ import annotations

import math
import sys

import torch

__all__ = ["RecordStore", "Record", "map_tree", "leaves", "load_all", "shapes_only", "has_nan", "live_tensors"]


class RecordStore:
    """The budget of one replay: `device_room` bytes may stay on the accelerator; the bytes held on
    the CPU are counted, with their peak."""

    def __init__(self, device_room: int = 0):
        self.device_room = device_room
        self.cpu_bytes = 0
        self.cpu_peak_bytes = 0

    def keep(self, tensor: torch.Tensor) -> "Record":
        size = tensor.numel() * tensor.element_size()
        if tensor.device.type != "cpu" and size <= self.device_room:
            return Record(self, tensor.detach().clone(), tensor.device)
        return Record(self, tensor.detach().to("cpu", copy=True), tensor.device)

    def keep_all(self, tree):
        """`tree` with every tensor recorded."""
        return map_tree(self.keep, tree, torch.Tensor)


class Record:
    """A recorded tensor with the device it goes back to; gives its bytes back to the store when it
    is dropped."""
    __slots__ = ("store", "data", "device", "bytes", "on_device")

    def __init__(self, store: RecordStore, data: torch.Tensor, device: torch.device):
        self.store, self.data, self.device = store, data, device
        self.bytes = 0 if data.device.type == "meta" else data.numel() * data.element_size()
        self.on_device = data.device.type not in ("cpu", "meta")
        if self.on_device:
            store.device_room -= self.bytes
        else:
            store.cpu_bytes += self.bytes
            store.cpu_peak_bytes = max(store.cpu_peak_bytes, store.cpu_bytes)

    def __del__(self):
        if self.on_device:
            self.store.device_room += self.bytes
        else:
            self.store.cpu_bytes -= self.bytes

    def load(self) -> torch.Tensor:
        return self.data.to(self.device, copy=True)  # a copy: the model may change its inputs in place

    def shape_only(self) -> "Record":
        """The same record without its values (a meta tensor): what is kept of a dropped record."""
        return Record(self.store, torch.empty(self.data.shape, dtype=self.data.dtype, device="meta"), self.device)

    def stand_in(self) -> torch.Tensor:
        """Stands in for an output nothing reads any more; NaN, so that a wrong guess shows (the replay
        never drops a record without NaN: integers and booleans are kept)."""
        if not self.data.is_floating_point():
            raise ValueError("a record of integers has no NaN stand-in")
        return torch.full(self.data.shape, math.nan, dtype=self.data.dtype, device=self.device)


def map_tree(fn, value, kind):
    """`value` with fn applied to each `kind` inside lists, tuples and dicts (rebuilt, so that the
    model may change what it is handed), everything else as it is. Lighter than torch's pytree for
    the option dicts that come with every UNet call."""
    if isinstance(value, kind):
        return fn(value)
    if type(value) is dict:
        return {k: map_tree(fn, v, kind) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(map_tree(fn, v, kind) for v in value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(map_tree(fn, v, kind) for v in value))
    if isinstance(value, dict) and hasattr(value, "to_tuple"):  # transformers' ModelOutput
        return type(value)(**{k: map_tree(fn, v, kind) for k, v in value.items()})
    return value


def leaves(value, kind) -> list:
    found = []
    map_tree(found.append, value, kind)
    return found


def load_all(tree, stand_in: bool = False):
    """`tree` with every record loaded (or replaced by its NaN stand-in)."""
    return map_tree(Record.stand_in if stand_in else Record.load, tree, Record)


def shapes_only(tree):
    return map_tree(Record.shape_only, tree, Record)


def has_nan(tree) -> bool:
    tensors = [x.data if isinstance(x, Record) else x for x in leaves(tree, (torch.Tensor, Record))]
    return any(isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta"
               and bool(torch.isnan(t).any()) for t in tensors)


def live_tensors(until) -> list[torch.Tensor]:
    """Tensors held by the local variables of the calling frames, up to the frame running `until`
    (a code object): what the code being replayed can still read."""
    found: list[torch.Tensor] = []

    def collect(value, depth):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif depth and isinstance(value, (list, tuple)):
            for item in value:
                collect(item, depth - 1)
        elif depth and isinstance(value, dict):
            for item in value.values():
                collect(item, depth - 1)

    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not until:
        for value in frame.f_locals.values():
            collect(value, 3)
        frame = frame.f_back
    return found
