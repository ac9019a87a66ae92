"""The merge's stream: read tensor i+1, compute tensor i and write tensor i-1 at the same time.

Three stages, each on its own thread, with memory bounded by fixed pools of buffers::

    reader thread         main thread (compute)          writer thread
    pread -> read slot    kernels on the device          ShardWriter.write / copy / close
    (upload to device)    download -> write slot  ──▶    (wait for the copy) write, free the slot

* **Reads** (``read_ahead``) fill a ring of three host buffers: tensor k is computed while k+1 and
  k+2 are read. Entry k+3 reuses k's buffer only after k's compute returned.
* **Writes** (``Stream``) go through one writer thread, in file order. A computed tensor is first
  copied into one of ``slots`` write buffers (``SlotPool``): the kernels return views of scratch
  memory that the next tensor reuses, so the copy is what lets compute go on while the writer
  works. Compute waits for a free slot, so at most ``slots`` computed tensors are in flight
  (``SlotPool.peak_bytes`` counts them). Copied tensors (``copy_file_range``) hold no memory.
* **Errors** on any stage stop the stream: a writer error is raised in the main thread at its next
  call (or while it waits for a slot); an error in the main thread (a compute error, Ctrl-C) ends
  the writer after the write in progress. No thread is left behind, and the caller's atomic
  output removes what was written.

The device is an object (``CpuDevice``, ``CudaDevice``) that says where tensors are computed and
how they get there and back; the stream is the same code for both. ``CudaDevice`` uploads on its
own ``torch.cuda.Stream`` from the reader thread (the copy of k+1 overlaps the compute of k), and
downloads into pinned write slots on another, with events: the host waits for a download only in
the writer thread, and the GPU orders the next compute after it (the kernels' scratch memory is
reused), so nothing on the main thread synchronizes for the stream's sake.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Collection, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import torch

from adapterops.io.safetensors_file import Shard, ShardWriter, TensorEntry, read_tensor

Wait = Callable[[], None]
T = TypeVar("T")


def _ready() -> None:
    """A download that is already complete."""


class Device(Protocol):
    """Where a merge computes, and how tensors get there and back."""

    device: torch.device
    pin: bool  # host buffers in page-locked memory (fast, asynchronous copies to and from a GPU)

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """``host`` (a read slot) on the device; called on the reader thread. Once it returns the
        read slot may be reused, unless the result is the slot itself (the CPU)."""
        ...

    def download(self, value: torch.Tensor, into: torch.Tensor) -> Wait:
        """Start copying ``value`` into ``into`` (a write slot, same shape and dtype); the returned
        function blocks until ``into`` holds it (called on the writer thread)."""
        ...


class CpuDevice:
    """Compute on the CPU: uploads are the read slots themselves, downloads one ``copy_``."""

    pin = False

    def __init__(self) -> None:
        self.device = torch.device("cpu")

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        return host

    def download(self, value: torch.Tensor, into: torch.Tensor) -> Wait:
        into.copy_(value)
        return _ready


class CudaDevice:
    """Compute on a CUDA device; see the module docstring. Constructible where CUDA is absent
    (its streams are made on first use), so the same driver is importable and testable anywhere."""

    def __init__(self, device: torch.device | str = "cuda") -> None:
        self.device = torch.device(device)
        self.pin = torch.cuda.is_available()
        self._h2d: Any = None
        self._d2h: Any = None

    def _streams(self) -> tuple[Any, Any]:
        if self._h2d is None:
            self._h2d = torch.cuda.Stream(self.device)
            self._d2h = torch.cuda.Stream(self.device)
        return self._h2d, self._d2h

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        h2d, _ = self._streams()
        with torch.cuda.stream(h2d):
            on_device = host.to(self.device, non_blocking=True)
        done = torch.cuda.Event()
        done.record(h2d)
        done.synchronize()  # the reader thread waits, so the read slot can take the next tensor
        # computed on the default stream: keep the allocator from handing this memory to h2d too early
        on_device.record_stream(torch.cuda.default_stream(self.device))
        return on_device

    def download(self, value: torch.Tensor, into: torch.Tensor) -> Wait:
        if value.device.type != "cuda":  # a kernel that returned host memory
            into.copy_(value)
            return _ready
        _, d2h = self._streams()
        compute = torch.cuda.current_stream(self.device)
        computed = torch.cuda.Event()
        computed.record(compute)
        d2h.wait_event(computed)
        with torch.cuda.stream(d2h):
            into.copy_(value, non_blocking=True)
        value.record_stream(d2h)
        copied = torch.cuda.Event()
        copied.record(d2h)
        # the next tensor's kernels may reuse ``value``'s scratch memory: the GPU, not the host, waits
        compute.wait_event(copied)
        return copied.synchronize


def device_for(device: torch.device) -> CpuDevice | CudaDevice:
    return CudaDevice(device) if device.type == "cuda" else CpuDevice()


class SlotPool:
    """``count`` reusable host buffers for computed tensors on their way to the writer. Each grows
    to the largest tensor it held (``size`` up front avoids regrowing pinned memory). ``acquire``
    blocks while all are in use; ``peak_bytes`` is the most tensor bytes ever held at once."""

    def __init__(self, count: int, *, pin: bool = False, size: int = 0) -> None:
        if count < 1:
            raise ValueError("a stream needs at least one write slot")
        self.pin = pin
        self.buffers: list[torch.Tensor | None] = [self._alloc(size) if size else None for _ in range(count)]
        self.free = list(range(count))
        self.held: dict[int, int] = {}  # slot -> bytes
        self.peak_bytes = 0
        self.cond = threading.Condition()

    def _alloc(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)

    def acquire(self, nbytes: int, failed: Callable[[], BaseException | None]) -> tuple[int, torch.Tensor]:
        with self.cond:
            while not self.free:
                error = failed()
                if error is not None:
                    raise error  # the writer's own error (an OSError says what the disk said)
                self.cond.wait(0.1)
            slot = self.free.pop()
            self.held[slot] = nbytes
            self.peak_bytes = max(self.peak_bytes, sum(self.held.values()))
        buffer = self.buffers[slot]
        if buffer is None or buffer.numel() < nbytes:
            buffer = self.buffers[slot] = self._alloc(nbytes)
        return slot, buffer[:nbytes]

    def release(self, slot: int) -> None:
        with self.cond:
            del self.held[slot]
            self.free.append(slot)
            self.cond.notify_all()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()


_STOP = object()


class Stream:
    """Writes in order on one thread while the caller computes the next tensor. Use as a context
    manager: leaving it normally waits for every write (raising the writer's error, if any);
    leaving it by an exception stops the writer after the write in progress and closes the files.

    ``slots`` bounds the computed tensors in flight (2: one being written, one queued).
    """

    def __init__(self, device: Device, *, slots: int = 2, slot_size: int = 0) -> None:
        self.device = device
        self.pool = SlotPool(slots, pin=device.pin, size=slot_size)
        self.ops: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.cancelled = threading.Event()
        self.open: list[ShardWriter] = []
        self.thread = threading.Thread(target=self._run, name="adapterops-write", daemon=True)
        self.thread.start()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if kind is None:
            self.finish()
        else:
            self.abort()

    # -- the main thread's side --------------------------------------------------------------------

    def begin(self, writer: ShardWriter) -> ShardWriter:
        """A shard whose tensors follow; the stream closes it (``end``, or on an error)."""
        self.open.append(writer)
        return writer

    def write(self, writer: ShardWriter, entry: TensorEntry, value: torch.Tensor) -> None:
        """``value`` written as ``entry`` once the tensors before it are; returns once it is in a slot."""
        self._check()
        slot, buffer = self.pool.acquire(value.numel() * value.element_size(), self._failed)
        host = buffer.view(value.dtype).view(value.shape)  # ShardWriter checks it fills the entry
        try:
            wait = self.device.download(value, host)
        except BaseException:
            self.pool.release(slot)
            raise

        def op() -> None:
            try:
                wait()
                writer.write(entry, host)
            finally:
                self.pool.release(slot)

        self.ops.put(op)

    def copy(
        self, writer: ShardWriter, entry: TensorEntry, handle: Any, shard: Shard, source: TensorEntry
    ) -> None:
        """``source``'s bytes from ``shard`` (open as ``handle``) copied as ``entry``, in turn."""
        self._check()
        self.ops.put(lambda: writer.copy(entry, handle, shard, source))

    def end(self, writer: ShardWriter, then: Callable[[], None] | None = None) -> None:
        """Close ``writer`` after its last tensor, then call ``then`` (on the writer thread)."""
        self._check()

        def op() -> None:
            writer.close()
            self.open.remove(writer)
            if then is not None:
                then()

        self.ops.put(op)

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """``fn`` run on the writer thread after everything queued before it."""
        done: Future[T] = Future()

        def op() -> None:
            done.set_result(fn())

        self.ops.put(op)
        return done

    def finish(self) -> None:
        """Wait for every queued write; raise the writer's error, if any."""
        self.ops.put(_STOP)
        self.thread.join()
        self._close_open()
        self._check()

    def abort(self) -> None:
        """Stop after the write in progress; close open files. Never raises the writer's error."""
        self.cancelled.set()
        self.ops.put(_STOP)
        self.pool.wake()
        self.thread.join()
        self._close_open()

    def _failed(self) -> BaseException | None:
        return self.error

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def _close_open(self) -> None:
        while self.open:
            self.open.pop().close()

    # -- the writer thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            op = self.ops.get()
            if op is _STOP:
                return
            if self.error is not None or self.cancelled.is_set():
                continue  # drain to _STOP without writing; slots no longer matter
            try:
                op()
            except BaseException as exc:  # handed to the main thread
                self.error = exc
                self.pool.wake()


def read_ahead(
    shard: Shard,
    source: Any,
    names: Sequence[str],
    wanted: set[str],
    device: Device,
    upload: Collection[str] = (),
) -> Generator[tuple[str, torch.Tensor | None], None, None]:
    """``names`` in order, each with its base tensor where it is in ``wanted`` (this shard's tensor
    of that name), read ahead by one thread, two in flight; those in ``upload`` moved to the
    device on that thread too. A tensor yielded is valid until the next one is asked for."""
    by_name = {e.name: e for e in shard.entries}
    entries = [by_name[n] for n in names if n in wanted]
    # three reusable read buffers: one being computed on, two read ahead (entry k uses slot k % 3)
    size = max((e.nbytes for e in entries), default=0)
    slots = [torch.empty(size, dtype=torch.uint8, pin_memory=device.pin) for _ in range(3 if entries else 0)]

    def read(k: int, entry: TensorEntry) -> torch.Tensor:  # pread: no shared file offset with the copies
        host = read_tensor(source, shard, entry, into=slots[k % 3])
        return device.upload(host) if entry.name in upload else host

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapterops-read") as pool:
        pending: dict[str, Future[torch.Tensor]] = {}
        todo = iter(enumerate(entries))

        def top_up() -> None:
            while len(pending) < 2:
                nxt = next(todo, None)
                if nxt is None:
                    return
                pending[nxt[1].name] = pool.submit(read, *nxt)

        top_up()
        try:
            for name in names:
                if name in wanted:
                    tensor = pending.pop(name).result()
                    top_up()  # reads k+1 and k+2 while k is computed: three distinct slots
                    yield name, tensor
                else:
                    yield name, None
        finally:
            for future in pending.values():
                future.cancel()
