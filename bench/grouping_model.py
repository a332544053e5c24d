#!/usr/bin/env python3
"""grouping_model.py — tile loads of the row-block forward, on the bench's own selections.

The row-block forward (kernels/cuda/fwd_rows.cu) runs one CTA per block of R
rows of one (b, g) and streams the union of the block's 64-key tiles, so its
L2 -> shared-memory bytes follow the sum over blocks of |union| (32 KB of K
and V per tile at Dk = Dv = 128). Which rows share a block is the row
grouping's choice (group_rows_kernel). This script computes that sum for

  * t order (consecutive rows),
  * the grouping's greedy in windows of W = blocks * R rows: per block the
    remaining row with the largest t seeds it, then R - 1 times the remaining
    row with the fewest tiles outside the union (ties: larger t); a window
    whose t-order blocks already have unions under 2.5x their largest row's
    tile count keeps t order; windows of 32 blocks or more build their
    blocks 16 at a time (fwd_rows_group_wide.cu, wide_window below),

on the selections `nsa_bench_cuda --dump-sel DIR --dump-only` writes
(DIR/sel_T<T>_<random|corr>.i32, int32 [T][G][n], -1 unused; no GPU needed).
Block ids with block size 64 are tile ids. It is a model of the kernel's
loads, not of its time: docs/PERF.md has what each ratio bought on the GPU.

  python3 bench/grouping_model.py DIR --T 16384 --sel random --windows 8 16
  python3 bench/grouping_model.py DIR --T 65536 --sel random --windows 8 64 128

prints, per configuration, tile loads per row and the ratio to t order;
--pairs adds the tiles that blocks 2k and 2k + 1 of a window share.
"""
import argparse
import json
import os
import struct
import sys


def load(dirpath, T, sel):
    base = os.path.join(dirpath, "sel_T%d_%s" % (T, sel))
    with open(base + ".json") as f:
        meta = json.load(f)
    G, n = int(meta["G"]), int(meta["n"])
    with open(base + ".i32", "rb") as f:
        raw = f.read()
    ids = struct.unpack("<%di" % (len(raw) // 4), raw)
    if len(ids) != T * G * n:
        sys.exit("%s.i32: %d ints, expected T*G*n = %d" % (base, len(ids), T * G * n))
    return ids, G, n, int(meta.get("block_size", 64))


def row_masks(ids, T, G, n, g, bs):
    """Tile bitmask of each row t of KV head g (at most 32 tiles, as the kernel lists)."""
    if bs != 64:
        sys.exit("block size %d: this model takes 64-key blocks (one tile each)" % bs)
    out = []
    for t in range(T):
        row = ids[(t * G + g) * n:(t * G + g + 1) * n]
        m = 0
        for b in sorted(x for x in row if 0 <= x <= t // bs)[:32]:
            m |= 1 << b
        out.append(m)
    return out


def union_sum(masks, blocks):
    s = 0
    for blk in blocks:
        u = 0
        for r in blk:
            u |= masks[r]
        s += bin(u).count("1")
    return s


def greedy(masks, R, W, sequential=False):
    """The grouping's blocks, as the union bitmask of each (in window order)."""
    T = len(masks)
    out = []
    for p0 in range(0, T, W):
        rows = list(range(p0, min(T, p0 + W)))
        torder = [rows[i:i + R] for i in range(0, len(rows), R)]
        su = union_sum(masks, torder)
        tm = sum(max(bin(masks[r]).count("1") for r in blk) for blk in torder)
        if 2 * su <= 5 * tm:  # the t-order exit
            for blk in torder:
                u = 0
                for r in blk:
                    u |= masks[r]
                out.append(u)
            continue
        if W // R >= 32 and not sequential:  # wide windows (fwd_rows_group_wide.cu)
            out.extend(wide_window(masks, rows, R))
            continue
        left = set(rows)
        for _ in torder:
            seed = max(left)
            left.discard(seed)
            u, k = masks[seed], 1
            while k < R and left:
                best = min(left, key=lambda r: (bin(masks[r] & ~u).count("1"), -r))
                left.discard(best)
                u |= masks[best]
                k += 1
            out.append(u)
    return out


def wide_window_rows(masks, rows, R, P=16):
    """A wide window's blocks (fwd_rows_group_wide.cu), P at a time, as the
    rows of each block in the order they joined: block P k + w's seed is
    the (w + 1)-th largest remaining t; then in rounds every block with room
    proposes its remaining row with the fewest tiles outside its union
    (ties: larger t), all against the rows remaining at the round's start;
    a row proposed by several goes to the lowest block."""
    left = set(rows)
    nbw = (len(rows) + R - 1) // R
    caps = [min(R, len(rows) - b * R) for b in range(nbw)]
    out = []
    for b0 in range(0, nbw, P):
        act = range(b0, min(nbw, b0 + P))
        seeds = sorted(left, reverse=True)[:len(act)]
        u = {b: masks[s] for b, s in zip(act, seeds)}
        mem = {b: [s] for b, s in zip(act, seeds)}
        left.difference_update(seeds)
        while True:
            prop = {}
            for b in act:
                if len(mem[b]) < caps[b] and left:
                    prop[b] = min(left, key=lambda r: ((masks[r] & ~u[b]).bit_count(), -r))
            if not prop:
                break
            taken = set()
            for b in act:  # ascending: the lowest block wins a row
                r = prop.get(b)
                if r is None or r in taken:
                    continue
                taken.add(r)
                u[b] |= masks[r]
                mem[b].append(r)
            left -= taken
        out.extend(mem[b] for b in act)
    return out


def wide_window(masks, rows, R, P=16):
    """wide_window_rows' blocks as the union bitmask of each."""
    out = []
    for mem in wide_window_rows(masks, rows, R, P):
        u = 0
        for r in mem:
            u |= masks[r]
        out.append(u)
    return out


def pair_shared(unions, W, R):
    """Tiles that blocks 2k and 2k + 1 of a window both load (a 2-CTA
    cluster that fetched each once would read this many fewer)."""
    per = (W + R - 1) // R
    s = 0
    for w0 in range(0, len(unions), per):
        win = unions[w0:w0 + per]
        for i in range(0, len(win) - 1, 2):
            s += bin(win[i] & win[i + 1]).count("1")
    return s


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir", help="nsa_bench_cuda --dump-sel directory")
    ap.add_argument("--T", type=int, default=16384)
    ap.add_argument("--sel", default="random", choices=["random", "corr"])
    ap.add_argument("--R", type=int, default=11, help="rows per CTA (the kernel's 11)")
    ap.add_argument("--windows", type=int, nargs="+", default=[8, 16], help="row blocks per grouping window")
    ap.add_argument("--heads", type=int, default=1, help="KV heads to model (they are alike)")
    ap.add_argument("--sequential", action="store_true",
                    help="wide windows too one block at a time (the one-warp rule), not 16 at once")
    ap.add_argument("--pairs", action="store_true",
                    help="also the tiles two neighbouring blocks share (what a 2-CTA cluster could load once)")
    a = ap.parse_args()
    ids, G, n, bs = load(a.dir, a.T, a.sel)
    for g in range(min(a.heads, G)):
        masks = row_masks(ids, a.T, G, n, g, bs)
        c0 = union_sum(masks, [range(i, min(a.T, i + a.R)) for i in range(0, a.T, a.R)])
        print("T %d %s g %d R %d: t order %.3f tiles per row (%.2f rows per loaded tile)"
              % (a.T, a.sel, g, a.R, c0 / a.T, sum(bin(m).count("1") for m in masks) / c0))
        for nb in a.windows:
            un = greedy(masks, a.R, nb * a.R, a.sequential)
            c = sum(bin(u).count("1") for u in un)
            print("  grouped, windows of %d blocks (%d rows): %.3f tiles per row, %.3f of t order"
                  % (nb, nb * a.R, c / a.T, c / c0), flush=True)
            if a.pairs:
                ps = pair_shared(un, nb * a.R, a.R)
                print("    blocks paired (2k, 2k + 1): %.3f tiles per row shared by the pair, %.1f %% of the loads"
                      % (ps / a.T, 100.0 * ps / c), flush=True)


if __name__ == "__main__":
    main()
