"""Independent float64 reference of selection attention, written from
DESIGN.md §2 only (no kernel code): explicit key sets, plain softmax.

    q [B,S,H,Dk]  k [B,Skv,G,Dk]  v [B,Skv,G,Dv]  H = G*h, head j of group g = g*h + j
    block ids [B,S,G,n] (-1 unused) with block_size, or ranges [B,S,G,n,2]
"""
import numpy as np


def key_set(sel_row, p, Skv, block_size):
    """Sorted unique keys of one (b,t,g) row; p = query's key position."""
    hi = min(p + 1, Skv)
    keys = np.zeros(Skv, dtype=bool)
    if block_size is not None:
        for i in sel_row:
            if i < 0:
                continue
            lo, up = i * block_size, min((i + 1) * block_size, hi)
            if lo < up:
                keys[lo:up] = True
    else:
        for start, end in sel_row:
            if start == 0 and end == 0:
                continue
            lo, up = max(start, 0), min(end, hi)
            if lo < up:
                keys[lo:up] = True
    return np.nonzero(keys)[0]


def _rows(q, k, sel, block_size):
    B, S, H, Dk = q.shape
    Skv, G = k.shape[1], k.shape[2]
    h = H // G
    for b in range(B):
        for t in range(S):
            p = t + (Skv - S)
            for g in range(G):
                yield b, t, g, h, key_set(sel[b, t, g], p, Skv, block_size)


def forward(q, k, v, sel, block_size=None, scale=None):
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, S, H, Dk = q.shape
    Dv = v.shape[3]
    scale = 1.0 / np.sqrt(Dk) if scale is None else scale
    o = np.zeros((B, S, H, Dv))
    lse = np.full((B, S, H), -np.inf)
    for b, t, g, h, keys in _rows(q, k, sel, block_size):
        if len(keys) == 0:
            continue
        K, V = k[b, keys, g], v[b, keys, g]          # [L,Dk], [L,Dv]
        Q = q[b, t, g * h:(g + 1) * h]               # [h,Dk]
        s = scale * Q @ K.T                          # [h,L]
        m = s.max(axis=1, keepdims=True)
        e = np.exp(s - m)
        z = e.sum(axis=1, keepdims=True)
        o[b, t, g * h:(g + 1) * h] = (e / z) @ V
        lse[b, t, g * h:(g + 1) * h] = (m + np.log(z))[:, 0]
    return o, lse


def backward(q, k, v, do, sel, block_size=None, scale=None):
    """(dq, dk, dv) of sum(o * do), recomputing the forward in float64."""
    q, k, v, do = (np.asarray(x, dtype=np.float64) for x in (q, k, v, do))
    Dk = q.shape[3]
    scale = 1.0 / np.sqrt(Dk) if scale is None else scale
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for b, t, g, h, keys in _rows(q, k, sel, block_size):
        if len(keys) == 0:
            continue
        K, V = k[b, keys, g], v[b, keys, g]
        hs = slice(g * h, (g + 1) * h)
        Q, dO = q[b, t, hs], do[b, t, hs]            # [h,Dk], [h,Dv]
        s = scale * Q @ K.T
        P = np.exp(s - s.max(axis=1, keepdims=True))
        P /= P.sum(axis=1, keepdims=True)            # [h,L]
        dP = dO @ V.T                                # [h,L]
        dS = P * (dP - (P * dP).sum(axis=1, keepdims=True))
        dq[b, t, hs] = scale * dS @ K
        dk[b, keys, g] += scale * dS.T @ Q
        dv[b, keys, g] += P.T @ dO
    return dq, dk, dv


def random_problem(rng, B, S, Skv, G, h, Dk, Dv, n, block_size=None, dtype=np.float32):
    """Fresh random q/k/v in [-1,1) (never zeros) and a random selection with
    unused slots, duplicates and spans past the query position."""
    H = G * h
    q = rng.uniform(-1, 1, (B, S, H, Dk)).astype(dtype)
    k = rng.uniform(-1, 1, (B, Skv, G, Dk)).astype(dtype)
    v = rng.uniform(-1, 1, (B, Skv, G, Dv)).astype(dtype)
    if block_size is not None:
        nb = -(-Skv // block_size)
        sel = rng.integers(-1, nb, (B, S, G, n)).astype(np.int32)
    else:
        a = rng.integers(0, Skv + 1, (B, S, G, n, 2))
        sel = np.sort(a, axis=-1).astype(np.int32)
        unused = rng.random((B, S, G, n)) < 0.2
        sel[unused] = 0
    return q, k, v, sel


def max_rel_err(got, ref):
    """max |got-ref| / max |ref| (NaN anywhere counts as failure; -inf must
    match -inf)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    inf = np.isinf(ref)
    if np.any(inf):
        if not np.array_equal(np.isinf(got) & (got < 0), inf & (ref < 0)):
            return float("inf")
        got, ref = got[~inf], ref[~inf]
    if got.size == 0:
        return 0.0
    if np.isnan(got).any():
        return float("nan")
    scale = max(np.abs(ref).max(), 1e-30)
    return float(np.abs(got - ref).max() / scale)
