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

The C entry points this module needs (declared in nsaclient.h by the CUDA
client work, see REQUIRED below) are looked up at run time; while the loaded
libnsaclient does not export them, CUDA tensors raise NsadError
('unsupported') naming what is missing, and CPU tensors keep working.
"""
import ctypes

import torch

from . import _lib
from ._lib import BF16, F16, F32, I32
from .client import NsadError, Reply

# Proposed libnsaclient additions (see docs/PYTHON.md "CUDA"):
#
#   /* Region + byte offset for a device pointer: base/extent from
#    * cuMemGetAddressRange, cudaIpcGetMemHandle cached per allocation,
#    * region.register kind=cuda_ipc once per (session, allocation). */
#   int nsa_client_cuda_region(nsa_client_t *c, const void *dptr, size_t bytes,
#                              uint64_t *region, uint64_t *offset);
#   /* event.register of an interprocess event the caller created
#    * (cudaEventInterprocess|cudaEventDisableTiming), by its handle. */
#   int nsa_client_cuda_event_register(nsa_client_t *c, int device, const void *handle64,
#                                      uint64_t *event);
#   /* forward/backward with wait_event/done_event/sync=false. */
#   int nsa_client_forward_async(nsa_client_t *c, const nsa_client_fwd_t *a, uint64_t wait_event,
#                                uint64_t done_event, nsa_client_result_t *res);
#   int nsa_client_backward_async(nsa_client_t *c, const nsa_client_bwd_t *a, uint64_t wait_event,
#                                 uint64_t done_event, nsa_client_result_t *res);
REQUIRED = ("nsa_client_cuda_region", "nsa_client_cuda_event_register",
            "nsa_client_forward_async", "nsa_client_backward_async")

_CODES = {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16, torch.int32: I32}
_declared = False


def available():
    """True when the loaded libnsaclient has the CUDA client API."""
    return all(_lib.has(n) for n in REQUIRED)


def _declare(L):
    global _declared
    if _declared:
        return
    c = ctypes
    L.nsa_client_cuda_region.restype = c.c_int
    L.nsa_client_cuda_region.argtypes = [c.c_void_p, c.c_void_p, c.c_size_t,
                                         c.POINTER(c.c_uint64), c.POINTER(c.c_uint64)]
    L.nsa_client_cuda_event_register.restype = c.c_int
    L.nsa_client_cuda_event_register.argtypes = [c.c_void_p, c.c_int, c.c_char_p,
                                                 c.POINTER(c.c_uint64)]
    for n, A in (("nsa_client_forward_async", _lib.FwdArgs),
                 ("nsa_client_backward_async", _lib.BwdArgs)):
        f = getattr(L, n)
        f.restype = c.c_int
        f.argtypes = [c.c_void_p, c.POINTER(A), c.c_uint64, c.c_uint64, c.POINTER(_lib.Result)]
    _declared = True


def _require(client):
    if not available():
        missing = [n for n in REQUIRED if not _lib.has(n)]
        raise NsadError("unsupported", "CUDA tensors need libnsaclient's device-pointer API (%s "
                        "missing in the loaded library); move the tensors to the CPU or use a "
                        "libnsaclient built with the CUDA client" % ", ".join(missing))
    if client.backend != "cuda":
        raise NsadError("unsupported", "CUDA tensors need an nsad with the cuda backend; this one "
                        "runs '%s'" % client.backend)
    _declare(client._L)


class _Events:
    """A pair of interprocess events per (client, device), registered once."""

    def __init__(self, client, device):
        self.ready = torch.cuda.Event(interprocess=True)
        self.done = torch.cuda.Event(interprocess=True)
        self.ids = []
        with torch.cuda.device(device):
            s = torch.cuda.current_stream()
            for e in (self.ready, self.done):
                e.record(s)  # materialize the cudaEvent_t before taking its handle
                out = ctypes.c_uint64()
                client._check(client._L.nsa_client_cuda_event_register(
                    client._h, device, bytes(e.ipc_handle()), ctypes.byref(out)), "event.register")
                self.ids.append(int(out.value))


def _events(client, device):
    cache = client.__dict__.setdefault("_cuda_events", {})
    ev = cache.get(device)
    if ev is None:
        ev = cache[device] = _Events(client, device)
    return ev


def _ref(client, t):
    r = _lib.Tensor()
    region, off = ctypes.c_uint64(), ctypes.c_uint64()
    nbytes = max(1, t.numel() * t.element_size())
    client._check(client._L.nsa_client_cuda_region(client._h, ctypes.c_void_p(t.data_ptr()),
                                                   nbytes, ctypes.byref(region),
                                                   ctypes.byref(off)), "region.register")
    r.region, r.offset, r.dtype, r.ndim = region.value, off.value, _CODES[t.dtype], t.dim()
    for i, s in enumerate(t.shape):
        r.shape[i] = s
    return r


def _run(client, fn, args, device, tensors):
    ev = _events(client, device)
    stream = torch.cuda.current_stream(device)
    ev.ready.record(stream)
    r = _lib.Result()
    client._check(fn(client._h, ctypes.byref(args), ev.ids[0], ev.ids[1], ctypes.byref(r)),
                  "sel_attn")
    ev.done.wait(stream)  # the current stream, not the host, waits for nsad
    for t in tensors:
        t.record_stream(stream)
    client.last_reply = Reply(r)


def forward(client, q, k, v, sel, block_size, scale, kind):
    _require(client)
    B, S, H, _ = q.shape
    o = torch.empty((B, S, H, v.shape[3]), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, S, H), dtype=torch.float32, device=q.device)
    sel = sel.to(q.device)
    with client._lock:
        client._live()
        a = _lib.FwdArgs()
        a.q, a.k, a.v, a.o, a.lse = (_ref(client, t) for t in (q, k, v, o, lse))
        a.has_lse = 1
        a.sel.kind, a.sel.t = kind, _ref(client, sel)
        a.sel.block_size = int(block_size or 0)
        a.scale = float(scale) if scale else 0.0
        _run(client, client._L.nsa_client_forward_async, a, q.device.index,
             (q, k, v, sel, o, lse))
    return o, lse


def backward(client, q, k, v, o, lse, do, sel, block_size, scale, kind):
    _require(client)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    sel = sel.to(q.device)
    with client._lock:
        client._live()
        a = _lib.BwdArgs()
        (a.q, a.k, a.v, a.o, a.lse, a.dout, a.dq, a.dk,
         a.dv) = (_ref(client, t) for t in (q, k, v, o, lse, do, dq, dk, dv))
        a.sel.kind, a.sel.t = kind, _ref(client, sel)
        a.sel.block_size = int(block_size or 0)
        a.scale = float(scale) if scale else 0.0
        _run(client, client._L.nsa_client_backward_async, a, q.device.index,
             (q, k, v, o, lse, do, sel, dq, dk, dv))
    return dq, dk, dv
