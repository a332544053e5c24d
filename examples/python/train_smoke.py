#!/usr/bin/env python3
"""Training smoke run: 4 worker processes train one tiny NSA-selection model
through one nsad, while the operator flips NSA_SEL_VARLEN_V2 (v2 -> v1 -> v2)
with nsactl.

    python3 examples/python/train_smoke.py --nsad build/bin/nsad      # private nsad
    python3 examples/python/train_smoke.py --socket /run/nsad/nsad.sock

The model (per token t of a sequence):
    x      = embed(token) + embed_pos(t)
    q,k,v  = Wq x, Wk x, Wv x                 q [B,T,G*h,Dk], k/v [B,T,G,Dk]
    sel    = top-n blocks by (mean_h q) . (mean-pooled block of k), causal,
             own block always in                  (deterministic, no grad)
    o      = selection_attention(q, k, v, sel)    <- nsad forward / backward
    logits = Wout (x + Wo o)
trained on sequences of a fixed random Markov chain (so the loss has
somewhere to fall to) by torch.multiprocessing workers updating one shared
model Hogwild-style (model.share_memory()), each with its own nsad session.

The parent flips the flag with nsactl while the workers run and checks from
the replies that every request a worker sent after a flip completed ran
under the new flags epoch and on the new path (v2 -> v1 -> v2), that no
request failed, that the loss fell, and that nsad's metrics show forward and
backward traffic on both varlen_v2 and varlen_v1. Exit status 0 = all held.

CPU tensors (shm regions) by default, CUDA tensors with --device cuda (needs
nsad's cuda backend). --json FILE writes a machine-readable summary.
"""
import argparse
import json
import os
import queue as queue_mod
import shutil
import signal
import socket as socket_mod
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
if os.path.isdir(os.path.join(REPO, "client", "python", "nsad")):
    sys.path.insert(0, os.path.join(REPO, "client", "python"))  # run from a checkout

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import nsad  # noqa: E402
from nsad.torch import selection_attention  # noqa: E402

FLAG = "NSA_SEL_VARLEN_V2"


# ------------------------------------------------------------------ model --

class TinyNSA(nn.Module):
    def __init__(self, vocab, seq, dim, groups, heads_per_group, dk, block_size, n_sel):
        super().__init__()
        self.G, self.h, self.dk = groups, heads_per_group, dk
        self.block_size, self.n_sel = block_size, n_sel
        H = groups * heads_per_group
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.wq = nn.Linear(dim, H * dk, bias=False)
        self.wk = nn.Linear(dim, groups * dk, bias=False)
        self.wv = nn.Linear(dim, groups * dk, bias=False)
        self.wo = nn.Linear(H * dk, dim, bias=False)
        self.head = nn.Linear(dim, vocab)

    @torch.no_grad()
    def select(self, q, k):
        """Block ids [B,T,G,n]: causal top-n of (mean over the group's heads
        of q) . (mean of each key block), own block forced in, -1 padding."""
        B, T, H, Dk = q.shape
        G, bs = self.G, self.block_size
        nb = -(-T // bs)
        kp = F.pad(k, (0, 0, 0, 0, 0, nb * bs - T))             # [B, nb*bs, G, Dk]
        kb = kp.view(B, nb, bs, G, Dk).mean(2)                  # [B, nb, G, Dk]
        qg = q.view(B, T, G, H // G, Dk).mean(3)                # [B, T, G, Dk]
        s = torch.einsum("btgd,bngd->btgn", qg, kb)             # [B, T, G, nb]
        t_blk = torch.arange(T, device=q.device) // bs          # block of query t
        n_idx = torch.arange(nb, device=q.device)
        future = (n_idx[None, :] > t_blk[:, None])[None, :, None, :]
        own = (n_idx[None, :] == t_blk[:, None])[None, :, None, :]
        s = s.masked_fill(future, float("-inf")).masked_fill(own, float("inf"))
        n = min(self.n_sel, nb)
        val, idx = torch.topk(s, n, dim=-1)
        return idx.masked_fill(val == float("-inf"), -1).to(torch.int32)

    def forward(self, tokens, client):
        B, T = tokens.shape
        x = self.embed(tokens) + self.pos(torch.arange(T, device=tokens.device))[None]
        q = self.wq(x).view(B, T, self.G * self.h, self.dk)
        k = self.wk(x).view(B, T, self.G, self.dk)
        v = self.wv(x).view(B, T, self.G, self.dk)
        sel = self.select(q, k)
        o, _ = selection_attention(q, k, v, sel, block_size=self.block_size, client=client)
        return self.head(x + self.wo(o.reshape(B, T, -1)))


def markov_chain(vocab, seed):
    """Transition matrix: each token goes to one of 2 successors."""
    g = torch.Generator().manual_seed(seed)
    P = torch.full((vocab, vocab), 0.02 / vocab)
    for a in range(vocab):
        succ = torch.randperm(vocab, generator=g)[:2]
        P[a, succ] += 0.49
    return P / P.sum(1, keepdim=True)


def sample_batch(P, batch, seq, gen):
    vocab = P.shape[0]
    toks = torch.empty(batch, seq + 1, dtype=torch.long)
    toks[:, 0] = torch.randint(vocab, (batch,), generator=gen)
    for t in range(seq):
        toks[:, t + 1] = torch.multinomial(P[toks[:, t]], 1, generator=gen)[:, 0]
    return toks[:, :-1], toks[:, 1:]


# ----------------------------------------------------------------- worker --

def worker(wid, args, model, P, records, stop):
    """One training process: its own nsad session; reports every step."""
    try:
        torch.set_num_threads(1)
        device = torch.device(args.device)
        client = nsad.Client(socket=args.socket, name="train-smoke-%d" % wid,
                             labels={"job": "train_smoke", "worker": str(wid)})
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        gen = torch.Generator().manual_seed(1000 + wid)
        step = 0
        while step < args.max_steps:
            if stop.is_set() and step >= args.min_total_steps:
                break
            x, y = sample_batch(P, args.batch, args.seq, gen)
            x, y = x.to(device), y.to(device)
            t_fwd = time.monotonic()
            logits = model(x, client)
            fwd = client.last_reply
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            opt.zero_grad()
            t_bwd = time.monotonic()
            loss.backward()
            bwd = client.last_reply
            opt.step()
            records.put(("step", wid, step, float(loss), t_fwd, fwd.path, fwd.flags_epoch,
                         t_bwd, bwd.path, bwd.flags_epoch))
            step += 1
            if args.step_sleep:
                time.sleep(args.step_sleep)
        client.close()
        records.put(("done", wid, step))
    except BaseException as e:  # noqa: BLE001  (report, then fail the process)
        import traceback
        records.put(("error", wid, "%s: %s\n%s" % (type(e).__name__, e, traceback.format_exc())))
        raise SystemExit(1)


# ----------------------------------------------------------------- parent --

def find_nsactl(arg):
    for c in (arg, os.environ.get("NSACTL_BIN"), os.path.join(REPO, "build", "bin", "nsactl"),
              shutil.which("nsactl")):
        if c and os.path.exists(c):
            return c
    raise SystemExit("train_smoke: nsactl not found (--nsactl PATH)")


def nsactl(path, sock, *a):
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    r = subprocess.run([path, "--socket", sock, "--json"] + list(a), capture_output=True,
                       text=True, timeout=60, env=env)
    if r.returncode != 0:
        raise RuntimeError("nsactl %s failed: %s%s" % (" ".join(a), r.stdout, r.stderr))
    return json.loads(r.stdout)


def start_nsad(binary, backend):
    tmp = tempfile.mkdtemp(prefix="nsad-train-smoke.")
    sock = os.path.join(tmp, "nsad.sock")
    log = open(os.path.join(tmp, "nsad.log"), "w")
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if os.environ.get("NSAD_TEST_ASAN_OPTIONS"):
        env["ASAN_OPTIONS"] = os.environ["NSAD_TEST_ASAN_OPTIONS"]
    p = subprocess.Popen([binary, "--backend", backend, "--socket", sock, "--state-dir",
                          os.path.join(tmp, "state")], stderr=log, stdout=log, env=env)
    deadline = time.time() + 20
    while time.time() < deadline:
        if p.poll() is not None:
            raise SystemExit("train_smoke: nsad exited early:\n" + open(log.name).read())
        s = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM)
        try:
            s.connect(sock)
            return p, sock, tmp, log
        except OSError:
            time.sleep(0.05)
        finally:
            s.close()
    raise SystemExit("train_smoke: nsad did not come up")


def path_counts(metrics):
    """{(method, path): ok count} from nsad_requests_total, plus error total."""
    out = {}
    for s in metrics.get("nsad_requests_total", {}).get("samples", []):
        lab = s["labels"]
        if lab.get("method", "").startswith("sel_attn.") and lab.get("code") == "ok":
            key = (lab["method"], lab.get("path"))
            out[key] = out.get(key, 0) + s["value"]
    errors = sum(s["value"] for s in metrics.get("nsad_errors_total", {}).get("samples", []))
    return out, errors


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--socket", default=os.environ.get("NSAD_SOCKET"),
                    help="nsad socket (default $NSAD_SOCKET)")
    ap.add_argument("--nsad", help="start a private nsad from this binary instead")
    ap.add_argument("--nsactl", help="nsactl binary (default: $NSACTL_BIN, build/bin, PATH)")
    ap.add_argument("--device", default="auto",
                    help="cpu, cuda, or auto (cuda when torch sees a GPU and nsad runs cuda)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--phase-steps", type=int, default=15,
                    help="steps every worker runs in each phase (v2, v1, v2) at least")
    ap.add_argument("--max-steps", type=int, default=2000, help="safety cap per worker")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32)
    ap.add_argument("--dk", type=int, default=None,
                    help="head dim (default 16 on cpu, 64 on cuda: the GPU kernels' sizes)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--json", help="write a summary here")
    args = ap.parse_args()
    args.min_total_steps = 3 * args.phase_steps

    daemon = None
    if args.nsad:
        backend = {"cuda": "cuda", "cpu": "cpu"}.get(args.device, "auto")
        daemon = start_nsad(args.nsad, backend)
        args.socket = daemon[1]
    if not args.socket:
        args.socket = "/run/nsad/nsad.sock"
    ctl = find_nsactl(args.nsactl)
    t_start = time.time()
    summary = {"ok": False, "workers": args.workers}
    try:
        ok = run(args, ctl, summary)
    finally:
        summary["seconds"] = round(time.time() - t_start, 2)
        if daemon:
            p, _, tmp, log = daemon
            p.send_signal(signal.SIGTERM)
            rc = p.wait(30)
            log.close()
            summary["nsad_exit"] = rc
            if rc != 0:
                print(open(log.name).read())
                ok = False
            shutil.rmtree(tmp, ignore_errors=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=1)
    print("train_smoke: %s (%.1f s)" % ("OK" if ok else "FAILED", summary["seconds"]))
    return 0 if ok else 1


def run(args, ctl, summary):
    admin = nsad.Client(socket=args.socket, name="train-smoke-admin")
    if args.device == "auto":  # CUDA tensors when both torch and nsad have a GPU
        args.device = "cuda" if torch.cuda.is_available() and admin.backend == "cuda" else "cpu"
    summary["device"] = args.device
    print("device: %s" % args.device)
    eff = admin.flags_get()["effective"]
    print("nsad %s backend=%s flags epoch %s %s=%s" % (admin.info["server"], admin.backend,
                                                      admin.flags_get()["epoch"], FLAG, eff[FLAG]))
    if not (eff[FLAG] in (1, True) and eff["NSA_USE_SEL_VARLEN"] in (1, True)
            and int(eff["NSA_SEL_VARLEN_MIN_L"]) <= 1):
        print("train_smoke: needs %s=1, NSA_USE_SEL_VARLEN=1, NSA_SEL_VARLEN_MIN_L<=1 to start "
              "on varlen_v2; effective flags: %s" % (FLAG, eff))
        return False
    if args.device == "cuda" and admin.backend != "cuda":
        print("train_smoke: --device cuda needs nsad's cuda backend (this one: %s)"
              % admin.backend)
        return False
    before, err_before = path_counts(admin.metrics())

    torch.manual_seed(0)
    mp_ctx = mp.get_context("spawn")
    P = markov_chain(args.vocab, 0)
    dk = args.dk or (64 if args.device == "cuda" else 16)
    model = TinyNSA(args.vocab, args.seq, dim=32, groups=2, heads_per_group=2, dk=dk,
                    block_size=8, n_sel=3).to(args.device)
    if args.device == "cpu":
        model.share_memory()
    records, stop = mp_ctx.Queue(), mp_ctx.Event()
    procs = [mp_ctx.Process(target=worker, args=(w, args, model, P, records, stop))
             for w in range(args.workers)]
    for p in procs:
        p.start()

    steps = {w: [] for w in range(args.workers)}
    errors, done = [], set()
    flips = []   # (epoch, expected path, monotonic time the flip was complete)
    phase = 0
    plan = [("set", "0", "varlen_v1"), ("reset", None, "varlen_v2")]
    deadline = time.time() + args.timeout

    def seen_phase(w):
        """Steps worker w ran entirely after the last flip (both replies on
        the new epoch)."""
        if not flips:
            return len(steps[w])
        e = flips[-1][0]
        return sum(1 for r in steps[w] if r["fwd_epoch"] >= e and r["bwd_epoch"] >= e)

    while len(done) + len(errors) < args.workers and time.time() < deadline:
        try:
            m = records.get(timeout=0.5)
        except queue_mod.Empty:
            if all(not p.is_alive() for p in procs):
                break
            continue
        if m[0] == "step":
            _, w, step, loss, tf, fp, fe, tb, bp, be = m
            steps[w].append(dict(step=step, loss=loss, t_fwd=tf, fwd_path=fp, fwd_epoch=fe,
                                 t_bwd=tb, bwd_path=bp, bwd_epoch=be))
        elif m[0] == "done":
            done.add(m[1])
        elif m[0] == "error":
            errors.append((m[1], m[2]))
            print("worker %d FAILED:\n%s" % (m[1], m[2]))
            stop.set()
        if errors or stop.is_set():
            continue
        if all(seen_phase(w) >= args.phase_steps for w in steps):
            if phase < len(plan):
                how, val, path = plan[phase]
                if how == "set":
                    r = nsactl(ctl, args.socket, "flags", "set", "%s=%s" % (FLAG, val))
                else:
                    r = nsactl(ctl, args.socket, "flags", "reset", FLAG)
                flips.append((r["epoch"], path, time.monotonic()))
                print("operator: nsactl flags %s %s%s -> epoch %d (expect %s)"
                      % (how, FLAG, "=" + val if val else "", r["epoch"], path))
                phase += 1
            else:
                stop.set()
    stop.set()
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.terminate()
            p.join()
    while True:  # records sent before the workers exited
        try:
            m = records.get_nowait()
        except queue_mod.Empty:
            break
        if m[0] == "step":
            _, w, step, loss, tf, fp, fe, tb, bp, be = m
            steps[w].append(dict(step=step, loss=loss, t_fwd=tf, fwd_path=fp, fwd_epoch=fe,
                                 t_bwd=tb, bwd_path=bp, bwd_epoch=be))
        elif m[0] == "error":
            errors.append((m[1], m[2]))

    after, err_after = path_counts(admin.metrics())
    admin.close()
    return check(args, summary, steps, flips, errors, procs, before, after,
                 err_after - err_before)


def check(args, summary, steps, flips, errors, procs, before, after, new_errors):
    ok = True

    def fail(msg):
        nonlocal ok
        ok = False
        print("CHECK FAILED: " + msg)

    if errors:
        fail("%d worker(s) failed" % len(errors))
    for w, p in enumerate(procs):
        if p.exitcode != 0:
            fail("worker %d exit code %s" % (w, p.exitcode))
    if len(flips) != 2:
        fail("only %d of 2 flips happened (timeout?)" % len(flips))
    # A request sent (t_fwd / t_bwd, taken just before the call) after a flip
    # had completed must run under that flip's epoch or later: that is "each
    # worker picks the change up on its next request". And every reply's
    # path must be the one its epoch stands for (v2, then v1, then v2);
    # requests sent while nsactl ran may land on either side of the flip.
    def epoch_due(t):
        due = None
        for e, _, tf in flips:
            if t > tf:
                due = e
        return due

    def path_of_epoch(e):
        path = "varlen_v2"
        for fe, p, _ in flips:
            if e >= fe:
                path = p
        return path

    pickups = {}
    for w, rs in steps.items():
        rs.sort(key=lambda r: r["step"])
        if len(rs) < args.min_total_steps:
            fail("worker %d ran only %d steps" % (w, len(rs)))
        pick = []
        for kind in ("fwd", "bwd"):
            for r in rs:
                due = epoch_due(r["t_" + kind])
                if due is not None and r[kind + "_epoch"] < due:
                    fail("worker %d step %d %s sent after epoch %d was set ran under epoch %d"
                         % (w, r["step"], kind, due, r[kind + "_epoch"]))
                want = path_of_epoch(r[kind + "_epoch"])
                if r[kind + "_path"] != want:
                    fail("worker %d step %d %s: path %s under epoch %d, expected %s"
                         % (w, r["step"], kind, r[kind + "_path"], r[kind + "_epoch"], want))
        for e, p, _ in flips:
            first = next((r for r in rs if r["fwd_epoch"] >= e), None)
            if first is None:
                fail("worker %d never saw epoch %d" % (w, e))
            else:
                pick.append({"epoch": e, "step": first["step"], "path": first["fwd_path"]})
        pickups[w] = pick
        line = ", ".join("epoch %d at step %d on %s" % (x["epoch"], x["step"], x["path"])
                         for x in pick)
        print("worker %d: %d steps, loss %.3f -> %.3f; picked up %s"
              % (w, len(rs), rs[0]["loss"] if rs else float("nan"),
                 rs[-1]["loss"] if rs else float("nan"), line))
    # loss: mean of each worker's first 5 vs last 5 steps
    k = 5
    first = [r["loss"] for rs in steps.values() for r in rs[:k]]
    last = [r["loss"] for rs in steps.values() for r in rs[-k:]]
    l0 = sum(first) / max(1, len(first))
    l1 = sum(last) / max(1, len(last))
    print("loss (mean over workers): first %d steps %.3f, last %d steps %.3f" % (k, l0, k, l1))
    if not (l1 < 0.8 * l0):
        fail("loss did not fall enough: %.3f -> %.3f" % (l0, l1))
    delta = {"%s/%s" % key: after.get(key, 0) - before.get(key, 0) for key in after}
    print("nsad metrics, requests served during the run (method/path: count):")
    for key in sorted(delta):
        if delta[key]:
            print("  %-32s %d" % (key, delta[key]))
    for m in ("sel_attn.forward", "sel_attn.backward"):
        for p in ("varlen_v2", "varlen_v1"):
            if delta.get("%s/%s" % (m, p), 0) <= 0:
                fail("metrics show no %s traffic on %s" % (m, p))
    nreq = sum(len(rs) for rs in steps.values()) * 2
    if sum(delta.values()) < nreq:
        fail("metrics count %d sel_attn requests, workers made %d" % (sum(delta.values()), nreq))
    if new_errors:
        fail("nsad counted %d error replies during the run" % new_errors)
    summary.update(ok=ok, flips=[{"epoch": e, "path": p} for e, p, _ in flips],
                   pickups=pickups, loss_first=l0, loss_last=l1, metrics_delta=delta,
                   steps={w: len(rs) for w, rs in steps.items()}, errors=len(errors),
                   nsad_error_replies=new_errors)
    return ok


if __name__ == "__main__":
    sys.exit(main())
