#!/usr/bin/env python3
"""peers.py -- issue 7's peers on the exact selections nsa_bench_cuda used.

    python3 bench/peers.py --sel-dir DIR [--nsa-triton PATH] [--v2-csv FILE]
                           [--csv OUT] [--peers A,B,dense] [--peer-a-budget-gib G]
                           [--reps N] [--deadline-s S] [--quick]
    python3 bench/peers.py --cpu-selftest [--sel-dir DIR]   # no GPU needed

DIR is what `nsa_bench_cuda --dump-sel DIR` wrote: manifest.tsv (one line per
config: T h Dk Dv sel file) and per (T, pattern) a raw int32 file [T][G][n]
(-1 = unused slot) with a .json header. One sequence (B = 1), S = Skv = T,
G = 4 KV heads, H = G*h query heads (head j of group g is g*h + j, as in
DESIGN.md), block 64, bf16. Inputs are random (uniform in [-1, 1)), not the
C bench's values: only the selections are shared, and timings do not depend
on the values.

Peers, all timed like nsa_bench_cuda (CUDA events around each call, 3
warm-ups, median of --reps; inputs are not rotated, so K/V stay in L2 as
they do for v2):
  A  the seed's approach: gather every row's selected keys (causally
     clipped) into packed K/V buffers with vectorized PyTorch indexing, then
     one varlen attention call with each row (t, g) as a sequence of 1 query
     x h heads against its packed keys (1 KV head, GQA). Attention through
     torch.nn.attention.varlen.varlen_attn when that exists, else
     torch.ops.aten._flash_attention_forward (the kernel varlen_attn wraps);
     the row says which ran. Forward only. Reports packing time, attention
     time and packed bytes; skipped ("skipped (N GiB)") when the packed K/V
     would exceed --peer-a-budget-gib.
  B  XunhaoLai/native-sparse-attention-triton's topk_sparse_attention,
     imported from --nsa-triton PATH (a checkout of that repository, fetched
     at run time and never committed). API (read from the repository):
       topk_sparse_attention(q [N, Hq, D], k [N, Hkv, D], v [N, Hkv, D],
                             topk_idx int32 [Hkv, N, topk] (-1 = padding),
                             block_size in {32, 64, 128, 256},
                             cu_seqlens int32 [B + 1], softmax_scale=None)
     -> o [N, Hq, D], an autograd.Function (backward gives dq, dk, dv).
     Its kernels walk the first `real_topk` entries of each row, so valid
     indices must come first: rows are sorted ascending with -1 last here
     (attention does not depend on the order). One head_dim for q, k and v:
     Dk != Dv configs print "n/a". Backward timed as
     torch.autograd.grad(o, (q, k, v), do, retain_graph=True).
  dense  causal SDPA restricted to the flash backend (K/V expanded to H
     heads), forward and backward, for scale; it does not depend on the
     selection, so it runs once per (T, h, Dk, Dv).

With --v2-csv (nsa_bench_cuda --csv) it ends with one merged table: v2 and
peer B per config and the ratios against issue 7's targets (v2 fwd <= 0.5x
peer B, v2 bwd <= 0.6x peer B).
"""
import argparse
import csv
import inspect
import json
import math
import os
import sys
import time

import torch

BS = 64


# ----------------------------------------------------------------- inputs --

def read_manifest(sel_dir):
    rows = []
    with open(os.path.join(sel_dir, "manifest.tsv")) as f:
        for rec in csv.DictReader(f, delimiter="\t"):
            rows.append({"T": int(rec["T"]), "h": int(rec["h"]), "Dk": int(rec["Dk"]),
                         "Dv": int(rec["Dv"]), "sel": rec["sel"], "file": rec["file"]})
    return rows


def load_sel(sel_dir, fname):
    """int32 tensor [T, G, n] from a --dump-sel file, checked against its header."""
    with open(os.path.join(sel_dir, fname[:-len(".i32")] + ".json")) as f:
        hdr = json.load(f)
    T, G, n = hdr["T"], hdr["G"], hdr["n"]
    if hdr["dtype"] != "int32" or hdr["layout"] != "[T][G][n]" or hdr["block_size"] != BS:
        raise ValueError("%s: unexpected header %r" % (fname, hdr))
    with open(os.path.join(sel_dir, fname), "rb") as f:
        raw = bytearray(f.read())
    if len(raw) != T * G * n * 4:
        raise ValueError("%s: %d bytes, header says %d" % (fname, len(raw), T * G * n * 4))
    ids = torch.frombuffer(raw, dtype=torch.int32).view(T, G, n)
    if sys.byteorder != "little":
        raise RuntimeError("selection files are little-endian")
    return ids, hdr


# ------------------------------------------------------------ peer A: pack --

def slot_lengths(ids, bs=BS):
    """Keys each slot contributes after causal clipping: [T, G, n] int64.
    Slot s of query t covers keys s*bs .. s*bs+bs-1, clipped to <= t;
    -1 (and anything past the query's own block) contributes nothing."""
    T = ids.shape[0]
    t = torch.arange(T, device=ids.device).view(T, 1, 1)
    start = ids.long() * bs
    valid = (ids >= 0) & (start <= t)
    return torch.where(valid, (t - start + 1).clamp(0, bs), torch.zeros_like(start))


def packed_bytes(ids, Dk, Dv, bs=BS):
    return int(slot_lengths(ids, bs).sum().item()) * (Dk + Dv) * 2


def pack_kv(ids, k, v, bs=BS):
    """The seed's packing, vectorized. ids [T, G, n] (device), k [T, G, Dk],
    v [T, G, Dv]. Row r = t*G + g gets its keys in slot order, each slot's
    keys ascending. Returns packed k [sumL, 1, Dk], packed v [sumL, 1, Dv],
    cu_seqlens_k int32 [T*G + 1], max row length."""
    T, G, n = ids.shape
    slen = slot_lengths(ids, bs)                                  # [T, G, n]
    off = torch.arange(bs, device=ids.device)
    key = ids.long().clamp(min=0).unsqueeze(-1) * bs + off        # [T, G, n, bs]
    g = torch.arange(G, device=ids.device).view(1, G, 1, 1)
    flat = (key * G + g)[off < slen.unsqueeze(-1)]                # row-major = row order
    pk = k.reshape(T * G, k.shape[-1]).index_select(0, flat).unsqueeze(1)
    pv = v.reshape(T * G, v.shape[-1]).index_select(0, flat).unsqueeze(1)
    rl = slen.sum(-1).reshape(-1)
    cu = torch.zeros(T * G + 1, dtype=torch.int32, device=ids.device)
    cu[1:] = torch.cumsum(rl, 0).to(torch.int32)
    return pk, pv, cu, int(rl.max().item())


def varlen_fn():
    """(callable(q, k, v, cu_q, cu_k, max_q, max_k) -> o, name)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
        params = inspect.signature(varlen_attn).parameters
        kw = {"enable_gqa": True} if "enable_gqa" in params else {}

        def f(q, k, v, cq, ck, mq, mk):
            return varlen_attn(q, k, v, cq, ck, mq, mk, **kw)
        return f, "varlen_attn" + ("(enable_gqa)" if kw else "")
    except ImportError:
        pass
    if hasattr(torch.ops.aten, "_flash_attention_forward"):
        def g(q, k, v, cq, ck, mq, mk):
            return torch.ops.aten._flash_attention_forward(q, k, v, cq, ck, mq, mk, 0.0, False, False)[0]
        return g, "aten._flash_attention_forward"
    return None, "none"


def fallback_fn():
    def g(q, k, v, cq, ck, mq, mk):
        return torch.ops.aten._flash_attention_forward(q, k, v, cq, ck, mq, mk, 0.0, False, False)[0]
    return g, "aten._flash_attention_forward"


# ------------------------------------------------------------ peer B: load --

def load_nsa_triton(path):
    """topk_sparse_attention from a checkout, importing only its module and
    utils (the package __init__ pulls in einops and other ops)."""
    import importlib
    import types
    root = os.path.join(os.path.abspath(path), "native_sparse_attention")
    if not os.path.isfile(os.path.join(root, "ops", "triton", "topk_sparse_attention.py")):
        raise FileNotFoundError("no native_sparse_attention/ops/triton/topk_sparse_attention.py under " + path)
    for name, sub in (("native_sparse_attention", ""), ("native_sparse_attention.ops", "ops"),
                      ("native_sparse_attention.ops.triton", os.path.join("ops", "triton"))):
        m = types.ModuleType(name)
        m.__path__ = [os.path.join(root, sub)]
        sys.modules[name] = m
    mod = importlib.import_module("native_sparse_attention.ops.triton.topk_sparse_attention")
    return mod.topk_sparse_attention


def topk_layout(ids):
    """[T, G, n] -> [G, T, n] int32, each row ascending with -1 last."""
    big = torch.iinfo(torch.int32).max
    x = torch.where(ids < 0, torch.full_like(ids, big), ids)
    x = torch.sort(x, dim=-1).values
    x = torch.where(x == big, torch.full_like(x, -1), x)
    return x.permute(1, 0, 2).contiguous()


# ----------------------------------------------------------------- timing --

def time_ms(fn, reps, warmup=3):
    for _ in range(warmup):
        fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    ms = sorted(a.elapsed_time(b) for a, b in ev)
    return ms[len(ms) // 2]


def rnd(shape, dev):
    return torch.empty(shape, device=dev, dtype=torch.float32).uniform_(-1, 1).to(torch.bfloat16)


def emsg(e, n=80):
    """First line of an exception's message, never raising on an empty one."""
    lines = str(e).splitlines()
    return "%s: %s" % (type(e).__name__, lines[0][:n] if lines else "")


def gib(b):
    return b / 2.0 ** 30


# ------------------------------------------------------------------ peers --

def run_peer_a(cfg, ids_dev, q, k, v, budget_gib, reps, vfn, vname):
    T, h, G = cfg["T"], cfg["h"], ids_dev.shape[1]
    nbytes = packed_bytes(ids_dev, cfg["Dk"], cfg["Dv"])
    res = {"A_bytes": nbytes}
    if gib(nbytes) > budget_gib:
        res["A_note"] = "skipped (%.1f GiB)" % gib(nbytes)
        return res
    pack_ms = time_ms(lambda: pack_kv(ids_dev, k, v), max(3, reps // 2), warmup=1)
    pk, pv, cu_k, max_k = pack_kv(ids_dev, k, v)
    qr = q.view(T * G, h, q.shape[-1])  # row (t, g): its h heads, one query each
    cu_q = torch.arange(T * G + 1, dtype=torch.int32, device=q.device)
    names = [vname]
    try:
        vfn(qr, pk, pv, cu_q, cu_k, 1, max_k)
    except Exception as e:  # e.g. no GQA in this varlen_attn: the raw kernel has it
        fb, fname = fallback_fn()
        try:
            fb(qr, pk, pv, cu_q, cu_k, 1, max_k)
            names.append("failed: %s -> %s" % (type(e).__name__, fname))
            vfn = fb
        except Exception as e2:
            res["A_note"] = "error: %s; %s" % (emsg(e, 80), emsg(e2, 80))
            return res
    attn_ms = time_ms(lambda: vfn(qr, pk, pv, cu_q, cu_k, 1, max_k), reps)
    res.update(A_pack_ms=pack_ms, A_attn_ms=attn_ms, A_note=" ".join(names))
    return res


def run_peer_b(cfg, ids_dev, q, k, v, tsa, reps):
    if cfg["Dk"] != cfg["Dv"]:
        return {"B_note": "n/a (one head_dim for q, k, v)"}
    T = cfg["T"]
    idx = topk_layout(ids_dev)
    cu = torch.tensor([0, T], dtype=torch.int32, device=q.device)
    try:
        with torch.no_grad():
            fwd = time_ms(lambda: tsa(q, k, v, idx, BS, cu), reps)
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        o = tsa(qg, kg, vg, idx, BS, cu)
        do = torch.randn_like(o)
        bwd = time_ms(lambda: torch.autograd.grad(o, (qg, kg, vg), do, retain_graph=True), reps)
    except Exception as e:
        return {"B_note": "error: %s" % emsg(e, 120)}
    return {"B_fwd_ms": fwd, "B_bwd_ms": bwd, "B_note": ""}


def run_dense(cfg, q, k, v, reps):
    from torch.nn.functional import scaled_dot_product_attention as sdpa
    T, h = cfg["T"], cfg["h"]
    # [1, H, T, D], K/V repeated to H heads (head g*h + j reads group g)
    qd = q.transpose(0, 1).unsqueeze(0)
    kd = k.repeat_interleave(h, dim=1).transpose(0, 1).unsqueeze(0)
    vd = v.repeat_interleave(h, dim=1).transpose(0, 1).unsqueeze(0)
    note = "flash"
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        ctx = lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)  # noqa: E731
        with ctx():
            sdpa(qd, kd, vd, is_causal=True)
    except Exception as e:
        import contextlib
        ctx = contextlib.nullcontext
        note = "default backend (flash: %s)" % emsg(e, 60)
    try:
        with ctx():
            with torch.no_grad():
                fwd = time_ms(lambda: sdpa(qd, kd, vd, is_causal=True), reps)
            qg, kg, vg = (x.detach().requires_grad_() for x in (qd, kd, vd))
            o = sdpa(qg, kg, vg, is_causal=True)
            do = torch.randn_like(o)
            bwd = time_ms(lambda: torch.autograd.grad(o, (qg, kg, vg), do, retain_graph=True), reps)
    except Exception as e:
        return {"D_note": "error: %s" % emsg(e, 100)}
    return {"D_fwd_ms": fwd, "D_bwd_ms": bwd, "D_note": note}


# ------------------------------------------------------------------ table --

def f3(x):
    return "%.3f" % x if isinstance(x, float) and not math.isnan(x) else "-"


def read_v2(path):
    out = {}
    if not path or not os.path.exists(path):
        return out
    with open(path) as f:
        for r in csv.DictReader(f):
            key = (int(r["T"]), int(r["h"]), int(r["Dk"]), int(r["Dv"]), r["sel"])
            out[key] = {k: float(r[k]) for k in ("fwd_ms", "plan_ms", "bwd_ms", "tflops", "bwd_tflops")
                        if r.get(k)}  # C prints NaN as nan or -nan: float() takes both
            out[key]["ws"] = int(r["workspace_bytes"])
            if r.get("bwd_workspace_bytes"):
                out[key]["bws"] = int(r["bwd_workspace_bytes"])
    return out


def merged_table(results, v2):
    print("\n== merged table (ms, medians; targets: v2 fwd <= 0.5x peer B, v2 bwd <= 0.6x peer B; same run;"
          " v2 TFLOP/s: bwd counts 2.5x the fwd FLOPs; v2_ws_MB / v2_bws_MB: forward / backward workspace;"
          " A_GiB: peer A's packed K/V)")
    hdr = ("T", "h", "Dk", "Dv", "sel", "v2_fwd", "v2_bwd", "v2_TF_f", "v2_TF_b", "v2_plan", "v2_ws_MB",
           "v2_bws_MB", "B_fwd", "B_bwd",
           "fwd/B", "ok", "bwd/B", "ok", "A_pack", "A_attn", "A_GiB", "dense_f", "dense_b")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    met = {"fwd": [0, 0], "bwd": [0, 0]}
    for r in results:
        key = (r["T"], r["h"], r["Dk"], r["Dv"], r["sel"])
        w = v2.get(key, {})
        vf, vb = w.get("fwd_ms", float("nan")), w.get("bwd_ms", float("nan"))
        bf, bb = r.get("B_fwd_ms", float("nan")), r.get("B_bwd_ms", float("nan"))
        rf = vf / bf if bf == bf and vf == vf else float("nan")
        rb = vb / bb if bb == bb and vb == vb else float("nan")
        okf = "-" if rf != rf else ("yes" if rf <= 0.5 else "NO")
        okb = "-" if rb != rb else ("yes" if rb <= 0.6 else "NO")
        for tag, ok in (("fwd", okf), ("bwd", okb)):
            if ok != "-":
                met[tag][1] += 1
                met[tag][0] += ok == "yes"
        a_gib = "%.1f" % gib(r["A_bytes"]) if "A_bytes" in r else "-"
        tf = [w.get(x, float("nan")) for x in ("tflops", "bwd_tflops")]
        cells = ["%dk" % (r["T"] // 1024), str(r["h"]), str(r["Dk"]), str(r["Dv"]), r["sel"], f3(vf), f3(vb),
                 *["%.1f" % x if x == x else "-" for x in tf],
                 f3(w.get("plan_ms", float("nan"))), "%.1f" % (w["ws"] / 1e6) if "ws" in w else "-",
                 "%.1f" % (w["bws"] / 1e6) if "bws" in w else "-", f3(bf), f3(bb), "%.2f" % rf if rf == rf else "-", okf, "%.2f" % rb if rb == rb else "-", okb,
                 f3(r.get("A_pack_ms", float("nan"))), f3(r.get("A_attn_ms", float("nan"))), a_gib,
                 f3(r.get("D_fwd_ms", float("nan"))), f3(r.get("D_bwd_ms", float("nan")))]
        print("| " + " | ".join(cells) + " |")
    print("targets met: fwd %d of %d configs with a peer B time, bwd %d of %d"
          % (met["fwd"][0], met["fwd"][1], met["bwd"][0], met["bwd"][1]))


# ------------------------------------------------------------ CPU selftest --

def cpu_selftest(sel_dir):
    """Packing and selection handling on the CPU with tiny shapes: packed K/V
    against a per-row loop, packed attention against a dense masked
    reference, and the peer B index layout. Needs no GPU and no varlen."""
    torch.manual_seed(1)
    T, G, n, h, Dk, Dv = 300, 2, 4, 3, 8, 5
    ids = torch.full((T, G, n), -1, dtype=torch.int32)
    for t in range(T):
        own = t // BS
        for g in range(G):
            earlier = torch.randperm(own + 1)[:n].tolist()
            s = [0] + ([own] if own else []) + [b for b in earlier if b not in (0, own)]
            s = s[:n]
            ids[t, g, :len(s)] = torch.tensor(s, dtype=torch.int32)
    k = torch.randn(T, G, Dk)
    v = torch.randn(T, G, Dv)
    q = torch.randn(T, G * h, Dk)
    pk, pv, cu, mk = pack_kv(ids, k, v)
    nbytes = packed_bytes(ids, Dk, Dv)
    assert nbytes == pk.shape[0] * (Dk + Dv) * 2, (nbytes, pk.shape)
    err = 0.0
    for t in range(T):
        for g in range(G):
            r = t * G + g
            keys = [int(b) * BS + j for b in ids[t, g].tolist() if b >= 0 for j in range(BS) if int(b) * BS + j <= t]
            a, b = int(cu[r]), int(cu[r + 1])
            assert b - a == len(keys), (t, g, b - a, len(keys))
            assert torch.equal(pk[a:b, 0], k[keys, g]) and torch.equal(pv[a:b, 0], v[keys, g]), (t, g)
            # attention over the packed row vs a dense masked softmax
            qs = q[t, g * h:(g + 1) * h]                       # [h, Dk]
            s = qs @ pk[a:b, 0].T / math.sqrt(Dk)
            o_packed = torch.softmax(s, -1) @ pv[a:b, 0]
            mask = torch.full((T,), float("-inf"))
            mask[keys] = 0
            o_dense = torch.softmax(qs @ k[:, g].T / math.sqrt(Dk) + mask, -1) @ v[:, g]
            err = max(err, float((o_packed - o_dense).abs().max()))
    assert mk == int((cu[1:] - cu[:-1]).max())
    assert err < 1e-5, err
    idx = topk_layout(ids)
    assert idx.shape == (G, T, n)
    for t in (0, 63, 64, 299):
        for g in range(G):
            row = idx[g, t].tolist()
            valid = [x for x in row if x >= 0]
            assert row == valid + [-1] * (n - len(valid)) and valid == sorted(valid)
            assert sorted(valid) == sorted(x for x in ids[t, g].tolist() if x >= 0)
    print("cpu-selftest: packing (%d rows, %d keys, %d bytes) == per-row loop; packed attention == "
          "dense masked reference (max err %.2e); peer B index layout ok" % (T * G, pk.shape[0], nbytes, err))
    if sel_dir:
        seen = set()
        for cfg in read_manifest(sel_dir):
            if cfg["file"] in seen:
                continue
            seen.add(cfg["file"])
            ids, hdr = load_sel(sel_dir, cfg["file"])
            T = hdr["T"]
            t = torch.arange(T).view(T, 1)
            own = (t // BS).expand(T, ids.shape[1])
            assert bool((ids[:, :, 0] == 0).all()), "slot 0 is not block 0"
            assert bool(((ids == own.unsqueeze(-1)).any(-1)).all()), "own block missing"
            assert bool(((ids >= -1) & (ids <= own.unsqueeze(-1))).all()), "future block selected"
            if cfg["sel"] == "corr":
                first = ids.view(T // BS, BS, *ids.shape[1:])[:, :1]
                assert bool((ids.view(T // BS, BS, *ids.shape[1:]) == first).all()), "corr rows differ in a block"
            print("cpu-selftest: %s T=%d ok (block 0 and own block in every row, nothing in the future)"
                  % (cfg["file"], T))
            lens = slot_lengths(ids).sum(-1).double()
            print("  mean keys per row %.1f, peer A packed K/V at Dk=Dv=128: %.1f GiB"
                  % (float(lens.mean()), gib(float(lens.sum()) * 512)))
    return 0


# ------------------------------------------------------------------- main --

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sel-dir")
    ap.add_argument("--nsa-triton", help="checkout of XunhaoLai/native-sparse-attention-triton")
    ap.add_argument("--v2-csv", help="nsa_bench_cuda --csv output, for the merged table")
    ap.add_argument("--csv", help="write the peers' results here")
    ap.add_argument("--peers", default="A,B,dense")
    ap.add_argument("--peer-a-budget-gib", type=float, default=20.0)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--deadline-s", type=float, default=0, help="skip configs once this many seconds passed")
    ap.add_argument("--quick", action="store_true", help="T = 16k only")
    ap.add_argument("--cpu-selftest", action="store_true")
    args = ap.parse_args()
    if args.cpu_selftest:
        return cpu_selftest(args.sel_dir)
    if not args.sel_dir:
        ap.error("--sel-dir is required")
    if not torch.cuda.is_available():
        print("peers.py: no CUDA device, nothing to time")
        return 0
    t_start = time.time()
    dev = torch.device("cuda")
    peers = set(p.strip() for p in args.peers.split(","))
    print("peers.py: torch %s, %s" % (torch.__version__, torch.cuda.get_device_name(0)))
    tsa = None
    if "B" in peers:
        if not args.nsa_triton:
            print("peer B: no --nsa-triton PATH, not run")
        else:
            try:
                tsa = load_nsa_triton(args.nsa_triton)
                import triton
                print("peer B: topk_sparse_attention from %s (triton %s)" % (args.nsa_triton, triton.__version__))
            except Exception as e:
                print("peer B: import failed: %s: %s" % (type(e).__name__, e))
    vfn, vname = varlen_fn() if "A" in peers else (None, "")
    if "A" in peers:
        print("peer A: attention through %s; budget %.1f GiB of packed K/V" % (vname, args.peer_a_budget_gib))
    cfgs = read_manifest(args.sel_dir)
    if args.quick:
        cfgs = [c for c in cfgs if c["T"] == 16384]
    print("%6s %3s %4s %4s %6s | %-6s | %9s %9s %9s %9s | %s" % ("T", "h", "Dk", "Dv", "sel", "peer", "fwd_ms",
          "bwd_ms", "pack_ms", "GiB", "note"))
    results, dense_cache, sel_cache = [], {}, {}
    for cfg in cfgs:
        if args.deadline_s and time.time() - t_start > args.deadline_s:
            print("peers.py: deadline (%.0f s) passed, skipping T=%d h=%d Dk=%d %s"
                  % (args.deadline_s, cfg["T"], cfg["h"], cfg["Dk"], cfg["sel"]))
            continue
        T, h, Dk, Dv = cfg["T"], cfg["h"], cfg["Dk"], cfg["Dv"]
        if cfg["file"] not in sel_cache:
            sel_cache.clear()
            sel_cache[cfg["file"]] = load_sel(args.sel_dir, cfg["file"])[0].to(dev)
        ids = sel_cache[cfg["file"]]
        G = ids.shape[1]
        q, k, v = rnd((T, G * h, Dk), dev), rnd((T, G, Dk), dev), rnd((T, G, Dv), dev)
        res = dict(cfg)
        lead = "%6d %3d %4d %4d %6s" % (T, h, Dk, Dv, cfg["sel"])
        if "A" in peers and vfn is not None:
            try:
                res.update(run_peer_a(cfg, ids, q, k, v, args.peer_a_budget_gib, args.reps, vfn, vname))
            except Exception as e:  # OOM or anything else: report it, go on with the other peers
                res["A_note"] = "error: %s" % emsg(e)
            print("%s | %-6s | %9s %9s %9s %9s | %s" % (lead, "A", f3(res.get("A_attn_ms", float("nan"))), "-",
                  f3(res.get("A_pack_ms", float("nan"))), "%.2f" % gib(res.get("A_bytes", 0)), res.get("A_note", "")))
            torch.cuda.empty_cache()
        if "B" in peers and tsa is not None:
            res.update(run_peer_b(cfg, ids, q, k, v, tsa, args.reps))
            print("%s | %-6s | %9s %9s %9s %9s | %s" % (lead, "B", f3(res.get("B_fwd_ms", float("nan"))),
                  f3(res.get("B_bwd_ms", float("nan"))), "-", "-", res.get("B_note", "")))
            torch.cuda.empty_cache()
        if "dense" in peers:
            dk = (T, h, Dk, Dv)
            if dk not in dense_cache:
                try:
                    dense_cache[dk] = run_dense(cfg, q, k, v, max(3, args.reps // 2))
                except Exception as e:
                    dense_cache[dk] = {"D_note": "error: %s" % emsg(e)}
                torch.cuda.empty_cache()
            res.update(dense_cache[dk])
            print("%s | %-6s | %9s %9s %9s %9s | %s" % (lead, "dense", f3(res.get("D_fwd_ms", float("nan"))),
                  f3(res.get("D_bwd_ms", float("nan"))), "-", "-", res.get("D_note", "")))
        sys.stdout.flush()
        del q, k, v
        results.append(res)
    if args.csv:
        keys = ["T", "h", "Dk", "Dv", "sel", "A_pack_ms", "A_attn_ms", "A_bytes", "A_note", "B_fwd_ms",
                "B_bwd_ms", "B_note", "D_fwd_ms", "D_bwd_ms", "D_note"]
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            for r in results:
                w.writerow(r)
    if args.v2_csv:
        merged_table(results, read_v2(args.v2_csv))
    print("peers.py: %.0f s" % (time.time() - t_start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
