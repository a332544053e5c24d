#!/usr/bin/env python3
"""ring_model.py — a discrete-event model of the persistent row-block forward's ring, per SM.

The persistent forward (kernels/cuda/fwd_rows_persist.cu) streams each row
block's union of 64-key tiles through a ring of NS slots; a slot is refilled
(in step order) only when every row of the block that uses its tile has
computed it, and each of the R consumer warps computes its own row's tiles
in ascending order. With random selections a tile has few users, so how
many warps can work at once depends on the order of the steps
(kernels/cuda/fwd_rows_order.cu). This model replays that protocol on the
bench's own selections (`nsa_bench_cuda --dump-sel DIR --dump-only`) for a
sample of row blocks built by the grouping's rule (bench/grouping_model.py)
and prints the time per block for several step orders:

  asc     ascending tiles (the kernel without the step order)
  depth   depth order (fwd_rows_order.cu: depth descending, then tile)
  lru     list scheduling: of the tiles that are the next tile of all their
          users, the one whose users' latest step is the earliest

Model: a step lands max(issue + L0, previous landing + tb) after its slot is
free (tb: one tile at the SM's share of the L2 bandwidth); warp w computes
on sub-partition w % 4, a tile costing one unit of work at rate
min(r1, rmax / warps computing there). Calibrated against the 64k h16
random forward measured four ways on the H200 (docs/PERF.md, "What bounds
the row-block kernels": as shipped, loads only, compute with and without
the ring; rows in t order): tb = 0.47 us, L0 = 0.5 us, r1 = rmax = 1
unit/us give those times within 10 %. Its 4-5 % for depth order against
ascending came out as 3.3 % of the forward kernel's time on the GPU
(session 26). A model, not a measurement.

  python3 bench/ring_model.py DIR --T 65536 --blocks 80
"""
import argparse
import heapq
import random

import grouping_model as gm


def tiles(m):
    out = []
    while m:
        lb = m & -m
        out.append(lb.bit_length() - 1)
        m ^= lb
    return out


def users_of(rts):
    users = {}
    for w, rt in enumerate(rts):
        for x in rt:
            users.setdefault(x, []).append(w)
    return users


def order_asc(rts):
    return sorted(users_of(rts))


def order_depth(rts):
    users = users_of(rts)
    dn, d = [0] * len(rts), {}
    for x in sorted(users, reverse=True):
        d[x] = max(dn[w] for w in users[x])
        for w in users[x]:
            dn[w] = d[x] + 1
    return sorted(users, key=lambda x: (-d[x], x))


def order_lru(rts):
    users = users_of(rts)
    ptr, last, out = [0] * len(rts), [-1] * len(rts), []
    done = set()
    for v in range(len(users)):
        ready = [x for x in users if x not in done and
                 all(ptr[w] < len(rts[w]) and rts[w][ptr[w]] == x for w in users[x])]
        best = min(ready, key=lambda x: (max(last[w] for w in users[x]), -len(users[x]), x))
        out.append(best)
        done.add(best)
        for w in users[best]:
            ptr[w] += 1
            last[w] = v
    return out


def simulate(items, R, NS, L0, tb, r1, rmax, nsp=4):
    """items: [(step order, rows' tile lists)], walked by one SM in turn."""
    st_users, warpq = [], [[] for _ in range(R)]
    for order, rts in items:
        pos = {x: i for i, x in enumerate(order)}
        base, us = len(st_users), [[] for _ in order]
        for w, rt in enumerate(rts):
            steps = [base + pos[x] for x in rt]
            assert steps == sorted(steps), "a row's tiles out of order"
            for x in rt:
                us[pos[x]].append(w)
            warpq[w].extend(steps)
        st_users.extend(us)
    N = len(st_users)
    remaining = [len(u) for u in st_users]
    released, landed = [False] * N, [False] * N
    qi, active, pend = [0] * R, {}, []
    t, issued, link = 0.0, 0, 0.0
    while True:
        while issued < N and (issued < NS or released[issued - NS]):
            link = max(t + L0, link + tb)
            heapq.heappush(pend, (link, issued))
            issued += 1
        for w in range(R):
            if w not in active and qi[w] < len(warpq[w]) and landed[warpq[w][qi[w]]]:
                active[w] = 1.0
        if not active and not pend:
            return t
        cnt = [0] * nsp
        for w in active:
            cnt[w % nsp] += 1
        rate = {w: min(r1, rmax / cnt[w % nsp]) for w in active}
        dt = min([active[w] / rate[w] for w in active] + ([pend[0][0] - t] if pend else []))
        dt = max(dt, 0.0)
        for w in active:
            active[w] -= rate[w] * dt
        t += dt
        while pend and pend[0][0] <= t + 1e-12:
            landed[heapq.heappop(pend)[1]] = True
        for w in [w for w in active if active[w] <= 1e-9]:
            del active[w]
            s = warpq[w][qi[w]]
            qi[w] += 1
            remaining[s] -= 1
            released[s] = remaining[s] == 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir", help="nsa_bench_cuda --dump-sel directory")
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--sel", default="random", choices=["random", "corr"])
    ap.add_argument("--R", type=int, default=11)
    ap.add_argument("--window", type=int, default=64, help="row blocks per grouping window (16 at a time)")
    ap.add_argument("--blocks", type=int, default=80, help="row blocks sampled")
    ap.add_argument("--slots", type=int, default=5)
    ap.add_argument("--L0", type=float, default=0.5)
    ap.add_argument("--tb", type=float, default=0.47)
    ap.add_argument("--r1", type=float, default=1.0)
    ap.add_argument("--rmax", type=float, default=1.0)
    ap.add_argument("--orders", nargs="+", default=["asc", "depth", "lru"])
    a = ap.parse_args()
    ids, G, n, bs = gm.load(a.dir, a.T, a.sel)
    masks = gm.row_masks(ids, a.T, G, n, 0, bs)
    W = a.window * a.R
    rng = random.Random(1)
    blocks = []
    for k in range(0, a.T // W, max(1, a.T // W // 6)):
        p0 = a.T - W * (k + 1)
        blocks.extend(gm.wide_window_rows(masks, list(range(p0, p0 + W)), a.R))
    rng.shuffle(blocks)
    rts = [[tiles(masks[r]) for r in b] for b in blocks[:a.blocks]]
    fn = {"asc": order_asc, "depth": order_depth, "lru": order_lru}
    base = None
    for name in a.orders:
        items = [(fn[name](rt), rt) for rt in rts]
        us = simulate(items, a.R, a.slots, a.L0, a.tb, a.r1, a.rmax) / len(items)
        base = base or us
        print("%-6s %7.2f us per row block (%+.1f %% against %s)" % (name, us, 100.0 * (us / base - 1), a.orders[0]),
              flush=True)


if __name__ == "__main__":
    main()
