"""PyTorch front end: selection attention as a torch.autograd.Function.

    from nsad.torch import selection_attention
    o, lse = selection_attention(q, k, v, block_ids, block_size=64)
    loss(o).backward()          # dq, dk, dv through sel_attn.backward

CPU tensors (float32, float16, bfloat16; float64 is computed in float32 and
cast back) travel through the client's reusable shm arena: inputs are copied
in, outputs copied out. CUDA tensors go through libnsaclient's device-pointer
API (nsad._cuda), ordered against the tensors' current stream with
interprocess events, without device-wide synchronization.

lse is returned for inspection and is not differentiable (its gradient is
not part of sel_attn.backward); using it in a loss raises no error but
contributes no gradient, so it is marked non-differentiable.
"""
import ctypes
import math

import torch
from torch.autograd.function import once_differentiable

from . import _lib
from ._lib import BF16, F16, F32, I32
from .client import NsadError, Reply, default_client, shapes_of, _tensor_ref

_CODES = {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16}


def _compute_dtype(dt):
    """Dtype nsad computes in for an input dtype."""
    if dt in _CODES:
        return dt
    if dt.is_floating_point:
        return torch.float32  # float64: nsad's widest is f32
    raise NsadError("invalid_argument", "unsupported dtype %s" % dt)


def _arena_views(client, specs):
    """Lays out [(name, shape, dtype)] in the client's arena; returns
    {name: (torch view over shm, byte offset)}. Call with client._lock held."""
    sizes = [int(math.prod(s)) * torch.tensor([], dtype=d).element_size() for _, s, d in specs]
    offs = client._arena.layout(sizes)
    reg = client._arena.region
    base = torch.frombuffer(reg._raw, dtype=torch.uint8)
    out = {}
    for (nm, shp, dt), off, nb in zip(specs, offs, sizes):
        out[nm] = (base[off:off + nb].view(dt).view(*shp), off)
    return out, reg.region


def _ref(region, off, t):
    r = _lib.Tensor()
    _tensor_ref(r, region, off, _CODES.get(t.dtype, I32), tuple(t.shape))
    return r


def _sel_into(s, ref, kind, block_size):
    s.kind = kind
    s.t = ref
    s.block_size = int(block_size) if block_size is not None else 0


def _cpu_forward(client, q, k, v, sel, block_size, scale, kind):
    B, S, H, _ = q.shape
    Dv = v.shape[3]
    cdt = q.dtype
    with client._lock:
        client._live()
        views, region = _arena_views(client, [
            ("q", q.shape, cdt), ("k", k.shape, cdt), ("v", v.shape, cdt),
            ("sel", sel.shape, torch.int32), ("o", (B, S, H, Dv), cdt),
            ("lse", (B, S, H), torch.float32)])
        for nm, t in (("q", q), ("k", k), ("v", v), ("sel", sel)):
            views[nm][0].copy_(t)
        views["o"][0].fill_(float("nan"))  # poison: nsad must write every element
        views["lse"][0].fill_(float("nan"))
        a = _lib.FwdArgs()
        a.q, a.k, a.v = (_ref(region, views[n][1], views[n][0]) for n in ("q", "k", "v"))
        a.o = _ref(region, views["o"][1], views["o"][0])
        a.lse = _ref(region, views["lse"][1], views["lse"][0])
        a.has_lse = 1
        _sel_into(a.sel, _ref(region, views["sel"][1], views["sel"][0]), kind, block_size)
        a.scale = float(scale) if scale else 0.0
        r = _lib.Result()
        client._check(client._L.nsa_client_forward(client._h, ctypes.byref(a), ctypes.byref(r)),
                      "sel_attn.forward")
        client.last_reply = Reply(r)
        return views["o"][0].clone(), views["lse"][0].clone()


def _cpu_backward(client, q, k, v, o, lse, do, sel, block_size, scale, kind):
    cdt = q.dtype
    with client._lock:
        client._live()
        views, region = _arena_views(client, [
            ("q", q.shape, cdt), ("k", k.shape, cdt), ("v", v.shape, cdt), ("o", o.shape, cdt),
            ("lse", lse.shape, torch.float32), ("do", do.shape, cdt),
            ("sel", sel.shape, torch.int32), ("dq", q.shape, cdt), ("dk", k.shape, cdt),
            ("dv", v.shape, cdt)])
        for nm, t in (("q", q), ("k", k), ("v", v), ("o", o), ("lse", lse), ("do", do),
                      ("sel", sel)):
            views[nm][0].copy_(t)
        for nm in ("dq", "dk", "dv"):
            views[nm][0].fill_(float("nan"))
        a = _lib.BwdArgs()
        R = {n: _ref(region, views[n][1], views[n][0]) for n in views}
        a.q, a.k, a.v, a.o, a.lse = R["q"], R["k"], R["v"], R["o"], R["lse"]
        a.dout, a.dq, a.dk, a.dv = R["do"], R["dq"], R["dk"], R["dv"]
        _sel_into(a.sel, R["sel"], kind, block_size)
        a.scale = float(scale) if scale else 0.0
        r = _lib.Result()
        client._check(client._L.nsa_client_backward(client._h, ctypes.byref(a), ctypes.byref(r)),
                      "sel_attn.backward")
        client.last_reply = Reply(r)
        return tuple(views[n][0].clone() for n in ("dq", "dk", "dv"))


class SelectionAttentionFn(torch.autograd.Function):
    """o, lse = f(q, k, v); backward returns dq, dk, dv from nsad."""

    @staticmethod
    def forward(ctx, q, k, v, selection, block_size, scale, client, kind):
        in_dt = q.dtype
        cdt = _compute_dtype(in_dt)
        qc, kc, vc = (x.detach().to(cdt).contiguous() for x in (q, k, v))
        sel = selection.detach().to(torch.int32).contiguous()
        if q.is_cuda:
            from . import _cuda
            o, lse = _cuda.forward(client, qc, kc, vc, sel, block_size, scale, kind)
        else:
            o, lse = _cpu_forward(client, qc, kc, vc, sel, block_size, scale, kind)
        ctx.save_for_backward(qc, kc, vc, o, lse, sel)
        ctx.cfg = (block_size, scale, client, kind, in_dt)
        ctx.mark_non_differentiable(lse)
        return o.to(in_dt), lse

    @staticmethod
    @once_differentiable
    def backward(ctx, do, _dlse):
        qc, kc, vc, o, lse, sel = ctx.saved_tensors
        block_size, scale, client, kind, in_dt = ctx.cfg
        if do is None:
            return (None,) * 8
        doc = do.to(qc.dtype).contiguous()
        if qc.is_cuda:
            from . import _cuda
            dq, dk, dv = _cuda.backward(client, qc, kc, vc, o, lse, doc, sel, block_size,
                                        scale, kind)
        else:
            dq, dk, dv = _cpu_backward(client, qc, kc, vc, o, lse, doc, sel, block_size, scale,
                                       kind)
        need = ctx.needs_input_grad
        return (dq.to(in_dt) if need[0] else None, dk.to(in_dt) if need[1] else None,
                dv.to(in_dt) if need[2] else None, None, None, None, None, None)


def selection_attention(q, k, v, selection, block_size=None, scale=None, client=None):
    """Selection attention through nsad (DESIGN.md §2).

    q [B,S,H,Dk], k [B,Skv,G,Dk], v [B,Skv,G,Dv]; selection: int block ids
    [B,S,G,n] (-1 = unused) with block_size, or ranges [B,S,G,n,2] without.
    scale None = 1/sqrt(Dk). Returns (o [B,S,H,Dv], lse [B,S,H] float32).
    client None = this process's default Client ($NSAD_SOCKET). The reply of
    the last call (path, flags_epoch, ...) is in client.last_reply.
    """
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        raise NsadError("invalid_argument", "q, k, v must be torch tensors (numpy: Client.forward)")
    if not isinstance(selection, torch.Tensor):
        selection = torch.as_tensor(selection)
    if not (q.device == k.device == v.device):
        raise NsadError("invalid_argument", "q, k, v on different devices: %s %s %s"
                        % (q.device, k.device, v.device))
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise NsadError("invalid_argument", "q, k, v dtypes differ: %s %s %s"
                        % (q.dtype, k.dtype, v.dtype))
    kind = shapes_of(q.shape, k.shape, v.shape, selection.shape, block_size)[-1]
    client = client or default_client()
    return SelectionAttentionFn.apply(q, k, v, selection, block_size, scale, client, kind)
