#!/usr/bin/env python3
"""CUDA tensors through a cuda-backend nsad (ctest labels python;gpu): forward
and backward of torch CUDA tensors (f32/f16/bf16) vs the float64 reference,
producers and consumers on a side stream (ordering through IPC events only,
no device-wide sync), the 4-process train smoke on the GPU.
Skipped (exit 77) without torch+CUDA, without libnsaclient's device-pointer
API, or when nsad cannot start its cuda backend."""
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nsadtest  # noqa: E402


def _other_python_with_cuda_torch():
    """ctest runs Debian's /usr/bin/python3; on a GPU machine torch with CUDA
    may live in another python3 on PATH (e.g. a venv): use that one."""
    import shutil
    other = shutil.which("python3")
    if not other or os.path.realpath(other) == os.path.realpath(sys.executable) \
            or os.environ.get("NSAD_TEST_REEXEC"):
        return None
    r = subprocess.run([other, "-c", "import torch, numpy; print(torch.cuda.is_available())"],
                       capture_output=True, text=True)
    return other if r.returncode == 0 and r.stdout.strip() == "True" else None


try:
    import numpy as np
    import torch
    cuda_ok = torch.cuda.is_available()
except ImportError as e:
    np = torch = None
    cuda_ok, why = False, "torch/numpy not importable (%s)" % e
else:
    why = "no CUDA device visible to torch (this torch: %s)" % torch.__version__
if not cuda_ok:
    other = _other_python_with_cuda_torch()
    if other:
        print("re-running under %s (torch with CUDA)" % other, flush=True)
        os.environ["NSAD_TEST_REEXEC"] = "1"
        os.execv(other, [other] + sys.argv)
    nsadtest.skip_suite(why)

import nsad  # noqa: E402
from nsad import _cuda  # noqa: E402
from nsad.torch import selection_attention  # noqa: E402
import ref_numpy as ref  # noqa: E402

if not _cuda.available():
    nsadtest.skip_suite("libnsaclient lacks the device-pointer API")

RNG = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
# outputs NaN-filled on the stream before nsad runs: a consumer that did not
# wait for nsad's done_event would read NaN
_cuda._POISON = True
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 2e-2), torch.bfloat16: (2e-2, 1e-1)}


def check(c, case, dtype, stream=None):
    B, S, Skv, G, h, Dk, Dv, n, bs = case
    q, k, v, sel = ref.random_problem(RNG, B, S, Skv, G, h, Dk, Dv, n, bs, dtype=np.float64)
    dev = torch.device("cuda")
    stream = stream or torch.cuda.current_stream()
    with torch.cuda.stream(stream):
        # produced on this stream right before the call: nsad must wait for it
        qt, kt, vt = (torch.tensor(x, device=dev).to(dtype).mul_(1.0).requires_grad_()
                      for x in (q, k, v))
        st = torch.tensor(sel, device=dev)
        o, lse = selection_attention(qt, kt, vt, st, block_size=bs, client=c)
        w = torch.tensor(RNG.uniform(-1, 1, o.shape), device=dev).to(dtype)
        (o * w).sum().backward()
        res = [x.detach().double().cpu().numpy() for x in (o, lse, qt.grad, kt.grad, vt.grad)]
    qn, kn, vn = (x.detach().double().cpu().numpy() for x in (qt, kt, vt))
    ro, rl = ref.forward(qn, kn, vn, sel, bs)
    rq, rk, rv = ref.backward(qn, kn, vn, w.double().cpu().numpy(), sel, bs)
    tf, tb = TOL[dtype]
    ef = [ref.max_rel_err(res[0], ro), ref.max_rel_err(res[1], rl)]
    eb = [ref.max_rel_err(a, b) for a, b in zip(res[2:], (rq, rk, rv))]
    assert max(ef) <= tf and max(eb) <= tb, "case %s %s: fwd %s bwd %s" % (case, dtype, ef, eb)
    return c.last_reply


def test_cuda_forward_backward(d):
    with nsad.Client(socket=d.sock) as c:
        assert c.backend == "cuda"
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for case in [(2, 32, 256, 2, 4, 64, 64, 4, 32), (1, 16, 128, 1, 3, 128, 64, 3, 32),
                         (1, 1, 512, 2, 8, 64, 64, 8, 64), (2, 16, 64, 2, 2, 64, 64, 4, None)]:
                r = check(c, case, dtype)
                assert r.path in nsad.PATHS


def test_ordering_without_host_sync(d):
    """A long request (large S, Skv) consumed at once on the same side
    stream, many times in a row, with no host synchronization in between:
    every result must be complete (outputs are NaN-poisoned on the stream
    before the request, so an unordered read shows NaN)."""
    with nsad.Client(socket=d.sock) as c:
        s = torch.cuda.Stream()
        case = (4, 512, 4096, 2, 8, 128, 128, 16, 64)
        B, S, Skv, G, h, Dk, Dv, n, bs = case
        g = torch.Generator(device="cuda").manual_seed(int(RNG.integers(1 << 30)))
        with torch.cuda.stream(s):
            q = torch.rand(B, S, G * h, Dk, device="cuda", generator=g, dtype=torch.bfloat16)
            k = torch.rand(B, Skv, G, Dk, device="cuda", generator=g, dtype=torch.bfloat16)
            v = torch.rand(B, Skv, G, Dv, device="cuda", generator=g, dtype=torch.bfloat16)
            sel = torch.randint(-1, Skv // bs, (B, S, G, n), device="cuda", generator=g,
                                dtype=torch.int32)
            sums = []
            for _ in range(20):
                o, lse = selection_attention(q, k, v, sel, block_size=bs, client=c)
                sums.append(torch.isnan(o).sum() + torch.isnan(lse).sum())
            bad = int(torch.stack(sums).sum().item())  # the only host wait, at the end
        assert bad == 0, "%d NaN elements read before nsad finished" % bad
        # and the values are right (one check against the reference)
        ro, _ = ref.forward(*(x.double().cpu().numpy() for x in (q, k, v)),
                            sel.cpu().numpy(), bs)
        assert ref.max_rel_err(o.double().cpu().numpy(), ro) <= TOL[torch.bfloat16][0]


def test_side_stream_and_every_path(d):
    with nsad.Client(socket=d.sock) as c:
        s = torch.cuda.Stream()
        for name, val, path in (("NSA_SEL_VARLEN_V2", "0", "varlen_v1"),
                                ("NSA_USE_SEL_VARLEN", "0", "packed")):
            c.flags_set(name, val)
            r = check(c, (2, 32, 256, 2, 4, 64, 64, 4, 32), torch.bfloat16, stream=s)
            c.flags_reset(name)
            assert r.path == path, r
        r = check(c, (2, 32, 256, 2, 4, 64, 64, 4, 32), torch.float16, stream=s)
        assert r.path == "varlen_v2", r


def test_cuda_train_smoke(d):
    example = os.path.join(nsadtest.REPO, "examples", "python", "train_smoke.py")
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, example, "--socket", d.sock, "--nsactl",
                            nsadtest.binary("nsactl"), "--device", "cuda", "--phase-steps", "10",
                            "--json", os.path.join(tmp, "s.json")],
                           capture_output=True, text=True, timeout=280)
        print(r.stdout[-3000:])
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]


if __name__ == "__main__":
    try:
        nsadtest.Daemon(backend="cuda").stop()
    except RuntimeError as e:
        nsadtest.skip_suite("nsad --backend cuda does not start here: %s" % str(e)[-300:])
    sys.exit(nsadtest.main([test_cuda_forward_backward, test_ordering_without_host_sync,
                            test_side_stream_and_every_path, test_cuda_train_smoke],
                           backend="cuda"))
