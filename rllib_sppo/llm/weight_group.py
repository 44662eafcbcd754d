"""A torch.distributed group of its own for weight sync: the sending learner (rank 0) and the remote LLM EnvRunners
(ranks 1..N), which receive the policy as bucketed broadcasts and feed them to their engine as they arrive.

The group is stateless as verl's and OpenRLHF's "weight update groups" are: a ``TCPStore`` the driver serves (a new
one each time the group is formed) and a ``ProcessGroupGloo`` (CPU) or ``ProcessGroupNCCL`` (CUDA) built on it,
outside torch.distributed's default group (the learners' own DDP/ZeRO group is untouched). A sync is one broadcast of
the layout (names, shapes, dtypes of each bucket, pickled) and one broadcast per bucket of at most ``max_bytes``
(a larger tensor is a bucket of its own): each tensor is copied once into its bucket on the sender and read as a
view of the received bucket on a receiver. Every operation is bounded by the group's timeout.
"""

from __future__ import annotations

import datetime
import pickle
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

#: The values of the config key ``weight_sync`` (None: "collective" where it works, see
#: ``SPPOConfig.resolved_weight_sync``).
WEIGHT_SYNCS = ("collective", "object_store", None)
_ALIGN = 16  # bytes: each tensor starts at a multiple of this in its bucket (a view of any dtype is aligned)


def open_store(host: str, timeout_s: float) -> dist.TCPStore:
    """The store the group's members meet at, served by this process on a free port (``store.port``)."""
    return dist.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def plan(sizes: Iterable[int], max_bytes: int) -> list[list[int]]:
    """The indices of tensors of ``sizes`` bytes in buckets of at most ``max_bytes`` (a larger tensor is a bucket of
    its own), in order."""
    out, bucket, total = [], [], 0
    for i, nbytes in enumerate(sizes):
        nbytes = _aligned(nbytes)
        if bucket and total + nbytes > max_bytes:
            out.append(bucket)
            bucket, total = [], 0
        bucket.append(i)
        total += nbytes
    return out + [bucket] if bucket else out


def buckets(named: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """``named`` in buckets of at most ``max_bytes`` (a larger tensor is a bucket of its own), in order."""
    named = list(named)
    return [[named[i] for i in bucket] for bucket in plan((t.numel() * t.element_size() for _, t in named), max_bytes)]


def describe(name: str, shape, dtype: torch.dtype) -> tuple[str, tuple, str]:
    """One tensor in a layout: (name, shape, dtype's name), what a receiver reads it by."""
    return name, tuple(shape), str(dtype).removeprefix("torch.")


def layout(parts: list[list[tuple[str, torch.Tensor]]]) -> list[list[tuple[str, tuple, str]]]:
    """Each bucket's tensors ``describe``d: what a receiver needs to read the buckets of ``parts``."""
    return [[describe(name, t.shape, t.dtype) for name, t in bucket] for bucket in parts]


def drain(iterator: Iterable) -> None:
    """Consumes what is left of ``iterator`` (a sender's or receiver's buckets: each one is a collective)."""
    for _ in iterator:
        pass


class WeightGroup:
    """This process's membership of one weight-sync group: ``rank`` of ``size``, tensors on ``device``."""

    def __init__(self, host: str, port: int, rank: int, size: int, device: str, timeout_s: float):
        self.rank, self.size = rank, size
        self.device = torch.device(device)
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
        if self.device.type == "cuda":
            self.group = dist.ProcessGroupNCCL(store, rank, size, dist.ProcessGroupNCCL.Options())
        else:
            self.group = dist.ProcessGroupGloo(store, rank, size, timeout)
        self._broadcast(torch.zeros(1, device=self.device))  # every member is connected (NCCL connects lazily)

    def _broadcast(self, tensor: torch.Tensor) -> None:
        self.group.broadcast(tensor, 0).wait()

    def send(self, shapes: list, parts: Iterable[list[tuple[str, torch.Tensor]]], **meta) -> int:
        """Rank 0: the buckets ``parts`` ((name, tensor) pairs, ``shapes`` their ``layout``, known before any is
        read: a bucket may be gathered only when its turn comes) to every other member, with ``meta`` (small,
        picklable); returns the bytes sent."""
        header = torch.frombuffer(bytearray(pickle.dumps((meta, shapes))), dtype=torch.uint8).to(self.device)
        self._broadcast(torch.tensor([header.numel()], device=self.device))
        self._broadcast(header)
        sent = 0
        for bucket in parts:
            buffer = torch.empty(sum(_aligned(t.numel() * t.element_size()) for _, t in bucket), dtype=torch.uint8,
                                 device=self.device)
            offset = 0
            for _, tensor in bucket:
                nbytes = tensor.numel() * tensor.element_size()
                buffer[offset:offset + nbytes].view(tensor.dtype).copy_(tensor.reshape(-1))
                offset += _aligned(nbytes)
            self._broadcast(buffer)
            sent += buffer.numel()
        return sent

    def receive(self) -> tuple[dict, Iterator[tuple[str, torch.Tensor]]]:
        """Ranks 1..N: what rank 0 sends, as ``(meta, pairs)``; ``pairs`` receives a bucket each time the last one is
        consumed (views of a fresh buffer per bucket) and must be consumed to the end (rank 0 sends every bucket)."""
        length = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._broadcast(length)
        header = torch.empty(int(length.item()), dtype=torch.uint8, device=self.device)
        self._broadcast(header)
        meta, shapes = pickle.loads(header.cpu().numpy().tobytes())  # (from this run's own learner)
        return meta, self._buckets(shapes)

    def _buckets(self, shapes: list) -> Iterator[tuple[str, torch.Tensor]]:
        for bucket in shapes:
            dtypes = [getattr(torch, dtype) for _, _, dtype in bucket]
            sizes = [_aligned(torch.Size(shape).numel() * dtype.itemsize)
                     for (_, shape, _), dtype in zip(bucket, dtypes)]
            buffer = torch.empty(sum(sizes), dtype=torch.uint8, device=self.device)
            self._broadcast(buffer)
            offset = 0
            for (name, shape, _), dtype, size in zip(bucket, dtypes, sizes):
                numel = torch.Size(shape).numel()
                yield name, buffer[offset:offset + numel * dtype.itemsize].view(dtype).view(shape)
                offset += size


def weight_sync_problems(config):
    """What is wrong with the config's ``weight_sync`` (``SPPOConfig.validate``), each with its fix."""
    if config.weight_sync not in WEIGHT_SYNCS:
        yield (f"weight_sync={config.weight_sync!r}; choose one of {WEIGHT_SYNCS[:2]} or None (collective, but the "
               f"object store with async_rollouts).")
    elif config.weight_sync == "collective" and config.async_rollouts:
        yield ("weight_sync='collective' works with synchronous rollouts (a broadcast waits for every runner, which "
               "async_rollouts keeps sampling); set weight_sync='object_store' (or leave it unset) with "
               "async_rollouts.")
