#!/usr/bin/env python3
"""nsad.torch.selection_attention with CPU torch tensors against a real CPU
nsad: autograd gradients vs the float64 numpy reference, vs central finite
differences on tiny shapes, dtypes, partial requires_grad, errors.
Skipped (exit 77) when torch is not importable (Debian: python3-torch)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nsadtest  # noqa: E402

try:
    import numpy as np
    import torch
except ImportError as e:
    nsadtest.skip_suite("torch/numpy not importable (%s); apt-get install python3-torch" % e)

import nsad  # noqa: E402
from nsad.torch import selection_attention  # noqa: E402
import ref_numpy as ref  # noqa: E402

torch.set_num_threads(1)
RNG = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))


def problem(B, S, Skv, G, h, Dk, Dv, n, bs, dtype=torch.float32):
    q, k, v, sel = ref.random_problem(RNG, B, S, Skv, G, h, Dk, Dv, n, bs, dtype=np.float64)
    t = [torch.tensor(x, dtype=dtype, requires_grad=True) for x in (q, k, v)]
    return t + [torch.tensor(sel)]


def grads_vs_reference(c, case, dtype, tol):
    q, k, v, sel = problem(*case, dtype=dtype)
    bs = case[-1]
    o, lse = selection_attention(q, k, v, sel, block_size=bs, client=c)
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert o.requires_grad and not lse.requires_grad
    qn, kn, vn = (x.detach().double().numpy() for x in (q, k, v))
    ro, rl = ref.forward(qn, kn, vn, sel.numpy(), bs)
    assert ref.max_rel_err(o.detach().double().numpy(), ro) <= tol[0], case
    assert ref.max_rel_err(lse.numpy(), rl) <= tol[0], case
    w = torch.tensor(RNG.uniform(-1, 1, o.shape), dtype=dtype)
    (o * w).sum().backward()
    rq, rk, rv = ref.backward(qn, kn, vn, w.double().numpy(), sel.numpy(), bs)
    errs = [ref.max_rel_err(t.grad.double().numpy(), r) for t, r in ((q, rq), (k, rk), (v, rv))]
    assert all(e <= tol[1] for e in errs), "case %s %s: grad errs %s" % (case, dtype, errs)
    return c.last_reply


def test_autograd_vs_float64_reference(d):
    with nsad.Client(socket=d.sock, name="test_torch") as c:
        for case in [(2, 8, 32, 2, 1, 16, 16, 3, 8), (1, 12, 48, 1, 3, 16, 24, 4, 8),
                     (1, 1, 64, 2, 4, 32, 32, 4, 16), (2, 8, 24, 2, 2, 8, 8, 3, None)]:
            r = grads_vs_reference(c, case, torch.float32, (1e-5, 1e-4))
            assert r.path in nsad.PATHS


def test_float16_bfloat16_float64(d):
    with nsad.Client(socket=d.sock) as c:
        case = (1, 8, 32, 2, 2, 16, 16, 3, 8)
        grads_vs_reference(c, case, torch.float16, (2e-3, 2e-2))
        grads_vs_reference(c, case, torch.bfloat16, (2e-2, 1e-1))
        grads_vs_reference(c, case, torch.float64, (1e-5, 1e-4))  # computed in f32


def test_finite_differences(d):
    """Central differences of L = sum(o * w) in float64 around float64 inputs
    (nsad computes in f32: eps = 5e-3 keeps f32 rounding / (2 eps) near 1e-5
    while the O(eps^2) truncation stays below that; measured errors 5e-6..2e-5)."""
    with nsad.Client(socket=d.sock) as c:
        for bs in (2, None):
            q, k, v, sel = problem(1, 4, 8, 1, 2, 4, 3, 3, bs, dtype=torch.float64)
            w = torch.tensor(RNG.uniform(-1, 1, (1, 4, 2, 3)))

            def loss():
                o, _ = selection_attention(q, k, v, sel, block_size=bs, client=c)
                return (o * w).sum()
            loss().backward()
            eps = 5e-3
            for t in (q, k, v):
                g = t.grad.clone()
                fd = torch.zeros_like(g)
                with torch.no_grad():
                    flat = t.view(-1)
                    for i in range(flat.numel()):
                        x0 = flat[i].item()
                        flat[i] = x0 + eps
                        lp = loss().item()
                        flat[i] = x0 - eps
                        lm = loss().item()
                        flat[i] = x0
                        fd.view(-1)[i] = (lp - lm) / (2 * eps)
                err = (fd - g).abs().max().item()
                if os.environ.get("NSAD_TEST_VERBOSE"):
                    print("fd err %.3g (max grad %.3g)" % (err, g.abs().max().item()))
                assert err <= 1e-4 + 1e-3 * g.abs().max().item(), \
                    "bs=%s: autograd vs finite differences: max abs err %g\n%s\n%s" % (bs, err,
                                                                                      g, fd)
                assert g.abs().max().item() > 1e-3  # a real gradient, not zeros


def test_partial_requires_grad_and_default_client(d):
    os.environ["NSAD_SOCKET"] = d.sock
    q, k, v, sel = problem(1, 8, 32, 1, 2, 16, 16, 3, 8)
    k.requires_grad_(False)
    v.requires_grad_(False)
    o, _ = selection_attention(q, k, v, sel.numpy(), block_size=8)  # numpy selection ok
    o.pow(2).sum().backward()
    assert q.grad is not None and k.grad is None and v.grad is None
    assert nsad.default_client().last_reply.path == "varlen_v2"
    with torch.no_grad():
        o2, _ = selection_attention(q, k, v, sel, block_size=8)
    assert not o2.requires_grad and torch.equal(o2, o.detach())


def test_paths_follow_flags(d):
    with nsad.Client(socket=d.sock) as c:
        q, k, v, sel = problem(1, 8, 32, 1, 2, 16, 16, 3, 8)
        seen = []
        for name, val in (("NSA_SEL_VARLEN_V2", "0"), ("NSA_USE_SEL_VARLEN", "0")):
            c.flags_set(name, val)
            o, _ = selection_attention(q, k, v, sel, block_size=8, client=c)
            seen.append(c.last_reply.path)
            o.sum().backward()
            seen.append(c.last_reply.path)
        c.flags_reset("NSA_USE_SEL_VARLEN")
        c.flags_reset("NSA_SEL_VARLEN_V2")
        assert seen == ["varlen_v1", "varlen_v1", "packed", "packed"], seen


def test_errors(d):
    with nsad.Client(socket=d.sock) as c:
        q, k, v, sel = problem(1, 8, 32, 1, 2, 16, 16, 3, 8)
        bad = sel.clone()
        bad[0, 0, 0, 0] = 99
        try:
            selection_attention(q, k, v, bad, block_size=8, client=c)
            raise AssertionError("invalid selection accepted")
        except nsad.NsadError as e:
            assert e.code == "invalid_selection", e
        try:
            selection_attention(q, k, v.to(torch.float16), sel, block_size=8, client=c)
            raise AssertionError("mixed dtypes accepted")
        except nsad.NsadError as e:
            assert e.code == "invalid_argument"
        if not torch.cuda.is_available():
            pass  # CUDA tensors: tests/python/test_cuda.py (gpu label)


TESTS = [test_autograd_vs_float64_reference, test_float16_bfloat16_float64,
         test_finite_differences, test_partial_requires_grad_and_default_client,
         test_paths_follow_flags, test_errors]

if __name__ == "__main__":
    sys.exit(nsadtest.main(TESTS))
