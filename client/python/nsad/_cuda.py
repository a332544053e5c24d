"""CUDA tensors through nsad (DESIGN.md §4 cuda_ipc regions and events).

How a call is ordered without any device-wide or host synchronization:

  1. record `ready` (an interprocess event) on the tensors' current stream
     after the producers of q/k/v/selection (and of do in backward);
  2. send sel_attn.forward/backward with wait_event=ready, done_event=done,
     sync=false: nsad's stream waits on `ready`, runs, records `done`; the
     reply comes back as soon as the work is queued;
  3. make the current stream wait on `done` (cudaStreamWaitEvent through
     torch.cuda.Event.wait), so consumers of o/lse/dq/dk/dv run after nsad.

Device memory is named to nsad through libnsaclient's device-pointer API: the
library finds the allocation's base + offset, makes and caches the IPC
handle and registers the region once per allocation (as PyTorch's own CUDA
IPC does). Outputs are allocated here with torch (so the caching allocator
owns them) and written by nsad in place.

The C entry points (nsa_client_cuda_tensor, nsa_client_cuda_event,
nsa_client_cuda_forget, nsa_client_{forward,backward}_submit_ex with an
nsa_client_exec_t) are
looked up at run time; a libnsaclient without them, or an nsad without the
cuda backend, makes CUDA tensors raise NsadError('unsupported'), while CPU
tensors keep working.
"""
import ctypes
import os

import torch

from . import _lib
from ._lib import BF16, F16, F32, I32
from .client import NsadError, Reply

REQUIRED = ("nsa_client_cuda_tensor", "nsa_client_cuda_event", "nsa_client_cuda_forget",
            "nsa_client_forward_submit_ex", "nsa_client_backward_submit_ex")

_CODES = {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16, torch.int32: I32}


def available():
    """True when the loaded libnsaclient has the device-pointer API."""
    return all(_lib.has(n) for n in REQUIRED)


def _require(client):
    if not available():
        missing = [n for n in REQUIRED if not _lib.has(n)]
        raise NsadError("unsupported", "CUDA tensors need libnsaclient's device-pointer API (%s "
                        "missing in the loaded library)" % ", ".join(missing))
    if client.backend != "cuda":
        raise NsadError("unsupported", "CUDA tensors need an nsad with the cuda backend; this one "
                        "runs '%s' (move the tensors to the CPU)" % client.backend)


class _Events:
    """Two interprocess events (cudaEventInterprocess | DisableTiming, as
    torch.cuda.Event(interprocess=True) makes them) per client and device,
    registered once (libnsaclient caches them by cudaEvent_t). Reusing them
    is safe because calls on a client are serialized: nsad has enqueued its
    wait on `ready` before replying, and our stream's wait on `done` is
    enqueued before the next record."""

    def __init__(self, client, device):
        with torch.cuda.device(device):
            self.ready = torch.cuda.Event(interprocess=True)
            self.done = torch.cuda.Event(interprocess=True)
            s = torch.cuda.current_stream()
            self.ids = []
            for e in (self.ready, self.done):
                e.record(s)  # creates the cudaEvent_t
                out = ctypes.c_uint64()
                client._check(client._L.nsa_client_cuda_event(
                    client._h, ctypes.c_void_p(e.cuda_event), ctypes.byref(out)), "event.register")
                self.ids.append(int(out.value))


def _events(client, device):
    cache = client.__dict__.setdefault("_cuda_events", {})
    ev = cache.get(device)
    if ev is None:
        ev = cache[device] = _Events(client, device)
    return ev


_cu = None


def _alloc_range(ptr):
    """(base, size) of the allocation holding ptr (cuMemGetAddressRange)."""
    global _cu
    if _cu is None:
        lib = ctypes.CDLL("libcuda.so.1")
        f = lib.cuMemGetAddressRange_v2
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t),
                      ctypes.c_uint64]
        _cu = f
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    rc = _cu(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
    if rc != 0:
        raise NsadError("invalid_argument", "cuMemGetAddressRange(%#x) failed (CUresult %d)"
                        % (ptr, rc))
    return base.value, size.value


def _ref(client, t):
    """Tensor ref of a contiguous CUDA tensor. libnsaclient caches one
    cuda_ipc region per allocation (base, size); when PyTorch's caching
    allocator has given a range back to the driver and a new allocation
    reuses the addresses with another extent, the stale entry is forgotten
    first so nsad never reads through an old mapping."""
    ptr = t.data_ptr()
    base, size = _alloc_range(ptr)
    seen = client.__dict__.setdefault("_cuda_allocs", {})
    for b, sz in list(seen.items()):
        if b < base + size and base < b + sz and (b, sz) != (base, size):
            client._L.nsa_client_cuda_forget(client._h, ctypes.c_void_p(b))
            del seen[b]
    seen[base] = size
    r = _lib.Tensor()
    shape = (ctypes.c_int64 * max(1, t.dim()))(*t.shape)
    client._check(client._L.nsa_client_cuda_tensor(client._h, ctypes.c_void_p(ptr),
                                                   _CODES[t.dtype], t.dim(), shape,
                                                   ctypes.byref(r)), "region.register")
    return r


def _run(client, submit, args, device, tensors):
    ev = _events(client, device)
    stream = torch.cuda.current_stream(device)
    ev.ready.record(stream)  # after the producers of the inputs on this stream
    x = _lib.Exec()
    x.wait_event, x.done_event = ev.ids
    x.has_wait_event = x.has_done_event = 1
    x.async_ = 1  # sync=false: the reply comes once the work is queued
    ticket = ctypes.c_uint32()
    client._check(submit(client._h, ctypes.byref(args), ctypes.byref(x), ctypes.byref(ticket)),
                  "sel_attn")
    r = _lib.Result()
    client._check(client._L.nsa_client_wait(client._h, ticket.value, ctypes.byref(r)), "sel_attn")
    ev.done.wait(stream)  # the current stream, not the host, waits for nsad
    for t in tensors:
        t.record_stream(stream)
    client.last_reply = Reply(r)


# NSAD_PYTHON_POISON=1: fill outputs with NaN on the stream before nsad runs
# (tests: a consumer that does not wait for nsad reads NaN, not stale data).
_POISON = os.environ.get("NSAD_PYTHON_POISON") == "1"


def _outputs(*ts):
    if _POISON:
        for t in ts:
            t.fill_(float("nan"))
    return ts


def forward(client, q, k, v, sel, block_size, scale, kind):
    _require(client)
    B, S, H, _ = q.shape
    o, lse = _outputs(torch.empty((B, S, H, v.shape[3]), dtype=q.dtype, device=q.device),
                      torch.empty((B, S, H), dtype=torch.float32, device=q.device))
    sel = sel.to(q.device)
    with client._lock:
        client._live()
        a = _lib.FwdArgs()
        a.q, a.k, a.v, a.o, a.lse = (_ref(client, t) for t in (q, k, v, o, lse))
        a.has_lse = 1
        a.sel.kind, a.sel.t = kind, _ref(client, sel)
        a.sel.block_size = int(block_size or 0)
        a.scale = float(scale) if scale else 0.0
        _run(client, client._L.nsa_client_forward_submit_ex, a, q.device.index,
             (q, k, v, sel, o, lse))
    return o, lse


def backward(client, q, k, v, o, lse, do, sel, block_size, scale, kind):
    _require(client)
    dq, dk, dv = _outputs(torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    sel = sel.to(q.device)
    with client._lock:
        client._live()
        a = _lib.BwdArgs()
        (a.q, a.k, a.v, a.o, a.lse, a.dout, a.dq, a.dk,
         a.dv) = (_ref(client, t) for t in (q, k, v, o, lse, do, dq, dk, dv))
        a.sel.kind, a.sel.t = kind, _ref(client, sel)
        a.sel.block_size = int(block_size or 0)
        a.scale = float(scale) if scale else 0.0
        _run(client, client._L.nsa_client_backward_submit_ex, a, q.device.index,
             (q, k, v, o, lse, do, sel, dq, dk, dv))
    return dq, dk, dv
