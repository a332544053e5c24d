#!/usr/bin/env python3
"""nsad Python package, numpy API, against a real CPU nsad: forward/backward
vs the float64 reference on every path, shapes (h in 1..16, odd h, Dk != Dv,
decode S < Skv, ranges), dtypes, zero-copy shm arrays, error codes as
exceptions, flags round trip, metrics, status."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nsadtest  # noqa: E402  (sets sys.path for nsad)

try:
    import numpy as np
except ImportError:
    nsadtest.skip_suite("numpy not importable; install python3-numpy (scripts/install-deps.sh)")

import nsad  # noqa: E402
import ref_numpy as ref  # noqa: E402

RNG = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
print("seed-free run: fresh random inputs every time")

PATH_FLAGS = {
    "varlen_v2": {},
    "varlen_v1": {"NSA_SEL_VARLEN_V2": "0"},
    "packed": {"NSA_USE_SEL_VARLEN": "0"},
}

CASES = [  # B, S, Skv, G, h, Dk, Dv, n, block_size (None = ranges)
    (2, 16, 64, 2, 1, 32, 32, 4, 8),
    (1, 24, 96, 1, 2, 16, 48, 3, 16),
    (2, 8, 40, 2, 3, 16, 16, 5, 8),      # odd h, Skv not a multiple of block_size
    (1, 1, 128, 2, 4, 64, 64, 4, 32),    # decode: S = 1 with a KV cache
    (1, 12, 12, 1, 16, 8, 24, 2, 4),     # h = 16, Dk != Dv
    (2, 16, 48, 2, 2, 16, 16, 4, None),  # ranges
    (1, 6, 30, 3, 8, 32, 16, 3, None),   # ranges, h = 8
]


def with_path(c, path, fn):
    for name, val in PATH_FLAGS[path].items():
        c.flags_set(name, val)
    try:
        return fn()
    finally:
        for name in PATH_FLAGS[path]:
            c.flags_reset(name)


def check_case(c, case, dtype=np.float32, tol_f=1e-5, tol_b=1e-4, path=None):
    B, S, Skv, G, h, Dk, Dv, n, bs = case
    q, k, v, sel = ref.random_problem(RNG, B, S, Skv, G, h, Dk, Dv, n, bs, dtype=dtype)
    o, lse = c.forward(q, k, v, sel, block_size=bs)
    r = c.last_reply
    assert path is None or r.path == path, (r.path, path)
    assert r.rows == B * S * G, r
    ro, rl = ref.forward(q, k, v, sel, bs)
    eo, el = ref.max_rel_err(o, ro), ref.max_rel_err(lse, rl)
    assert o.dtype == dtype and lse.dtype == np.float32
    assert eo <= tol_f and el <= tol_f, "case %s path %s: o err %g, lse err %g" % (case, r.path,
                                                                               eo, el)
    do = RNG.uniform(-1, 1, o.shape).astype(dtype)
    dq, dk, dv = c.backward(q, k, v, o, lse, do, sel, block_size=bs)
    assert c.last_reply.path == r.path
    rq, rk, rv = ref.backward(q, k, v, do, sel, bs)
    errs = [ref.max_rel_err(a, b) for a, b in ((dq, rq), (dk, rk), (dv, rv))]
    assert all(e <= tol_b for e in errs), "case %s path %s: dq/dk/dv err %s" % (case, r.path, errs)
    return r


def test_forward_backward_every_path(d):
    with nsad.Client(socket=d.sock, name="test_numpy") as c:
        for path in ("varlen_v2", "varlen_v1", "packed"):
            for case in CASES:
                with_path(c, path, lambda: check_case(c, case, path=path))


def test_float16(d):
    with nsad.Client(socket=d.sock) as c:
        for case in CASES[:3]:
            check_case(c, case, dtype=np.float16, tol_f=2e-3, tol_b=2e-2)


def test_float64_is_computed_in_float32(d):
    with nsad.Client(socket=d.sock) as c:
        q, k, v, sel = ref.random_problem(RNG, 1, 8, 32, 1, 2, 16, 16, 3, 8, dtype=np.float64)
        o, lse = c.forward(q, k, v, sel, block_size=8)
        assert o.dtype == np.float32
        assert ref.max_rel_err(o, ref.forward(q, k, v, sel, 8)[0]) <= 1e-5


def test_scale_and_module_level_api(d):
    c = nsad.Client(socket=d.sock)
    nsad.set_default_client(c)
    q, k, v, sel = ref.random_problem(RNG, 1, 8, 32, 2, 2, 16, 16, 3, 8)
    o, lse = nsad.forward(q, k, v, sel, block_size=8, scale=0.37)
    ro, rl = ref.forward(q, k, v, sel, 8, scale=0.37)
    assert ref.max_rel_err(o, ro) <= 1e-5 and ref.max_rel_err(lse, rl) <= 1e-5
    do = RNG.uniform(-1, 1, o.shape).astype(np.float32)
    dq, dk, dv = nsad.backward(q, k, v, o, lse, do, sel, block_size=8, scale=0.37)
    rq, rk, rv = ref.backward(q, k, v, do, sel, 8, scale=0.37)
    assert max(ref.max_rel_err(a, b) for a, b in ((dq, rq), (dk, rk), (dv, rv))) <= 1e-4
    o2, none = nsad.forward(q, k, v, sel, block_size=8, lse=False)
    assert none is None
    assert ref.max_rel_err(o2, ref.forward(q, k, v, sel, 8)[0]) <= 1e-5
    c.close()
    c.close()  # twice is fine


def test_empty_rows_give_zero_and_minus_inf(d):
    with nsad.Client(socket=d.sock) as c:
        q, k, v, sel = ref.random_problem(RNG, 1, 8, 32, 1, 2, 16, 16, 2, 8)
        sel[:, ::2] = -1  # every other query selects nothing
        o, lse = c.forward(q, k, v, sel, block_size=8)
        assert np.all(o[:, ::2] == 0) and np.all(np.isneginf(lse[:, ::2]))
        assert ref.max_rel_err(o, ref.forward(q, k, v, sel, 8)[0]) <= 1e-5


def test_zero_copy_shm_arrays_and_strides(d):
    with nsad.Client(socket=d.sock) as c:
        B, S, Skv, G, h, Dk, Dv, n, bs = 2, 8, 32, 2, 2, 16, 16, 3, 8
        q0, k0, v0, sel = ref.random_problem(RNG, B, S, Skv, G, h, Dk, Dv, n, bs)
        # q lives in shm as a strided view (every other position of a wider array)
        qbig = c.shm_array((B, 2 * S, G * h, Dk), "float32")
        qbig[...] = RNG.uniform(-1, 1, qbig.shape)
        qbig[:, ::2] = q0
        qv = qbig[:, ::2]
        assert not qv.flags.c_contiguous
        o = c.shm_array((B, S, G * h, Dv), "float32")
        lse = c.shm_array((B, S, G * h), "float32")
        o[...] = np.nan
        lse[...] = np.nan
        ro_, rl_ = c.forward(qv, k0, v0, sel, block_size=bs, out=(o, lse))
        assert ro_ is o and rl_ is lse
        ro, rl = ref.forward(q0, k0, v0, sel, bs)
        assert ref.max_rel_err(o, ro) <= 1e-5 and ref.max_rel_err(lse, rl) <= 1e-5
        # arena reuse and growth: a larger call after a small one
        big = ref.random_problem(RNG, 2, 64, 256, 2, 4, 32, 32, 4, 16)
        ob, lb = c.forward(*big[:3], big[3], block_size=16)
        assert ref.max_rel_err(ob, ref.forward(*big[:3], big[3], 16)[0]) <= 1e-5
        try:
            c.forward(q0, k0, v0, sel, block_size=bs, out=(np.empty_like(o), None))
            raise AssertionError("out outside shm accepted")
        except nsad.NsadError as e:
            assert e.code == "invalid_argument"


def expect_code(code, fn):
    try:
        fn()
    except nsad.NsadError as e:
        assert e.code == code, "expected %s, got %s (%s)" % (code, e.code, e)
        assert e.message
        return e
    raise AssertionError("expected NsadError(%s), call succeeded" % code)


def test_error_codes(d):
    with nsad.Client(socket=d.sock) as c:
        q, k, v, sel = ref.random_problem(RNG, 1, 8, 32, 1, 2, 16, 16, 3, 8)
        bad = sel.copy()
        bad[0, 3, 0, 1] = 4   # ceil(32/8) = 4 blocks: id 4 is out of range
        bad[0, 5, 0, 0] = -2
        e = expect_code("invalid_selection", lambda: c.forward(q, k, v, bad, block_size=8))
        assert "2" in e.message, e.message  # the count of bad entries
        assert isinstance(e, RuntimeError) and "invalid_selection" in str(e)
        r = np.zeros((1, 8, 1, 2, 2), np.int32)
        r[0, 2, 0, 0] = (5, 3)  # start > end
        expect_code("invalid_selection", lambda: c.forward(q, k, v, r))
        expect_code("unknown_method", lambda: c.call("no.such.method"))
        e = expect_code("bad_request", lambda: c.call("flags.set", value="1"))
        assert "name" in e.message
        expect_code("bad_request", lambda: c.flags_set("NSA_SEL_VARLEN_V2", "maybe"))
        expect_code("bad_request", lambda: c.flags_set("NSA_NO_SUCH_FLAG", "1"))
        # tensor refs the daemon must refuse: a region that is not ours, and
        # a tensor reaching past the end of its region
        from nsad import _lib
        import ctypes
        reg = c.shm(4096)
        a = _lib.FwdArgs()
        from nsad.client import _tensor_ref
        for t, shp in ((a.q, (1, 4, 1, 8)), (a.k, (1, 4, 1, 8)), (a.v, (1, 4, 1, 8)),
                       (a.o, (1, 4, 1, 8))):
            _tensor_ref(t, reg.region, 0, _lib.F32, shp)
        _tensor_ref(a.sel.t, reg.region, 1024, _lib.I32, (1, 4, 1, 1))
        a.sel.kind, a.sel.block_size = _lib.SEL_BLOCK_INDICES, 4
        res = _lib.Result()

        def raw():
            c._check(c._L.nsa_client_forward(c._h, ctypes.byref(a), ctypes.byref(res)), "fwd")
        reg.ndarray((1024,), "int32")[...] = 0
        raw()  # well-formed: works
        a.o.offset = 4096 - 64
        expect_code("out_of_bounds", raw)
        a.o.offset = 0
        a.k.region = 987654
        expect_code("not_found", raw)
        # Python-side checks name the problem before anything is sent
        expect_code("invalid_argument", lambda: c.forward(q, k, v, sel))  # no block_size
        expect_code("invalid_argument", lambda: c.forward(q[..., :8], k, v, sel, block_size=8))
        c.ping()  # the session survived every error


def test_connect_error(d):
    e = expect_code("disconnected", lambda: nsad.Client(socket=d.dir + "/nope.sock",
                                                        reconnect_attempts=1))
    assert "nope.sock" in str(e) or e.message


def test_flags_round_trip(d):
    with nsad.Client(socket=d.sock, labels={"team": "py"}) as c:
        q, k, v, sel = ref.random_problem(RNG, 1, 8, 32, 1, 2, 16, 16, 3, 8)
        f0 = c.flags_get()
        assert set(nsad.FLAGS) <= set(f0["flags"]), f0
        e0 = f0["epoch"]
        c.forward(q, k, v, sel, block_size=8)
        assert c.last_reply.path == "varlen_v2" and c.last_reply.flags_epoch == e0
        e1 = c.flags_set("NSA_SEL_VARLEN_V2", "off")
        assert e1 > e0
        f1 = c.flags_get()
        assert f1["epoch"] == e1
        assert f1["flags"]["NSA_SEL_VARLEN_V2"]["source"] == "runtime"
        assert f1["effective"]["NSA_SEL_VARLEN_V2"] in (0, False, "0")
        c.forward(q, k, v, sel, block_size=8)
        assert c.last_reply.path == "varlen_v1" and c.last_reply.flags_epoch == e1
        e2 = c.flags_set("NSA_SEL_VARLEN_V2", True)
        assert e2 > e1
        c.forward(q, k, v, sel, block_size=8)
        assert c.last_reply.path == "varlen_v2" and c.last_reply.flags_epoch == e2
        # a label-matched rollout rule: only sessions with team=other get packed
        e3 = c.flags_set("NSA_USE_SEL_VARLEN", "0", match={"team": "other"})
        c.forward(q, k, v, sel, block_size=8)
        assert c.last_reply.path == "varlen_v2"
        with nsad.Client(socket=d.sock, labels={"team": "other"}) as c2:
            c2.forward(q, k, v, sel, block_size=8)
            assert c2.last_reply.path == "packed", c2.last_reply
            assert c2.last_reply.flags_epoch == e3
        e4 = c.flags_reset("NSA_USE_SEL_VARLEN")
        e5 = c.flags_reset("NSA_SEL_VARLEN_V2")
        assert e5 > e4 > e3
        f5 = c.flags_get()
        assert f5["flags"]["NSA_SEL_VARLEN_V2"]["source"] == "default"
        # nsactl and the package see the same store
        out = d.nsactl("flags", "set", "NSA_SEL_VARLEN_MIN_L=4096")
        assert c.flags_get()["effective"]["NSA_SEL_VARLEN_MIN_L"] == 4096, out
        c.forward(q, k, v, sel, block_size=8)
        assert c.last_reply.path == "packed"  # v2 bypassed: rows shorter than MIN_L
        d.nsactl("flags", "reset", "NSA_SEL_VARLEN_MIN_L")


def test_metrics_and_status(d):
    with nsad.Client(socket=d.sock, name="metrics-test") as c:
        q, k, v, sel = ref.random_problem(RNG, 1, 8, 32, 1, 2, 16, 16, 3, 8)
        c.forward(q, k, v, sel, block_size=8)
        m = c.metrics()
        fam = m["nsad_requests_total"]
        n = sum(s["value"] for s in fam["samples"]
                if s["labels"].get("method") == "sel_attn.forward"
                and s["labels"].get("code") == "ok")
        assert n >= 1, fam
        text = c.metrics("prometheus")
        assert "# TYPE nsad_requests_total counter" in text
        st = c.status()
        assert st["backend"] == os.environ.get("NSAD_TEST_BACKEND", "cpu") and st["protocol"] == 1
        assert st["sessions"] >= 1 and st["requests_total"] >= 2 and st["regions"] >= 1, st
        assert set(nsad.FLAGS) <= set(st["flags"])
        assert c.info["session"] > 0 and c.connections == 1
        c.subscribe(50)
        note = c.next_notification(5000)
        assert note is not None and note[0] == "metrics", note


def test_threads_share_a_client(d):
    import threading
    with nsad.Client(socket=d.sock) as c:
        errs = []

        def work():
            try:
                for _ in range(5):
                    q, k, v, sel = ref.random_problem(RNG, 1, 8, 32, 1, 2, 16, 16, 3, 8)
                    o, _ = c.forward(q, k, v, sel, block_size=8)
                    assert ref.max_rel_err(o, ref.forward(q, k, v, sel, 8)[0]) <= 1e-5
            except Exception as e:  # noqa: BLE001
                errs.append(e)
        ts = [threading.Thread(target=work) for _ in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errs, errs


def test_fork_needs_a_new_client(d):
    c = nsad.Client(socket=d.sock)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            try:
                c.ping()
            except nsad.NsadError as e:
                if e.code == "invalid_argument":
                    c2 = nsad.Client(socket=d.sock)
                    c2.ping()
                    c2.close()
                    code = 0
            c.close()  # must leave the parent's session alone
        finally:
            os._exit(code)
    _, st = os.waitpid(pid, 0)
    assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0, st
    c.ping()  # parent's session unaffected
    q, k, v, sel = ref.random_problem(RNG, 1, 8, 32, 1, 2, 16, 16, 3, 8)
    o, _ = c.forward(q, k, v, sel, block_size=8)
    assert ref.max_rel_err(o, ref.forward(q, k, v, sel, 8)[0]) <= 1e-5
    c.close()


def test_reconnect_after_daemon_restart(d):
    nd = nsadtest.Daemon()
    try:
        c = nsad.Client(socket=nd.sock, timeout_ms=20000)
        q, k, v, sel = ref.random_problem(RNG, 1, 8, 32, 1, 2, 16, 16, 3, 8)
        c.forward(q, k, v, sel, block_size=8)
        nd.proc.terminate()
        assert nd.proc.wait(20) == 0
        import subprocess
        nd.log = open(nd.logpath, "a")
        nd.proc = subprocess.Popen([nsadtest.binary("nsad"), "--backend", "cpu", "--socket",
                                    nd.sock, "--state-dir", nd.dir + "/state"],
                                   stderr=nd.log, stdout=nd.log)
        import time
        deadline = time.time() + 20
        while True:
            try:
                o, _ = c.forward(q, k, v, sel, block_size=8)
                break
            except nsad.NsadError as e:
                assert e.code in ("disconnected", "io_error"), e
                assert time.time() < deadline, e
                time.sleep(0.1)
        assert ref.max_rel_err(o, ref.forward(q, k, v, sel, 8)[0]) <= 1e-5
        assert c.connections >= 2
        c.close()
    finally:
        assert nd.stop() == 0


def test_ctypes_abi_matches_header(d):
    """Every struct nsad._lib mirrors has nsaclient.h's size and field
    offsets (compiled here with the system C compiler)."""
    import ctypes
    import shutil
    import subprocess
    import tempfile
    from nsad import _lib
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise nsadtest.Skip("no C compiler")
    structs = {"nsa_client_label_t": _lib.Label, "nsa_client_opts_t": _lib.Opts,
               "nsa_client_info_t": _lib.Info, "nsa_client_shm_t": _lib.Shm,
               "nsa_client_tensor_t": _lib.Tensor, "nsa_client_sel_t": _lib.Sel,
               "nsa_client_exec_t": _lib.Exec, "nsa_client_fwd_t": _lib.FwdArgs,
               "nsa_client_bwd_t": _lib.BwdArgs, "nsa_client_result_t": _lib.Result}
    rename = {"exec_": "exec", "async_": "async"}
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "nsaclient.h"',
             "int main(void) {"]
    expect = []
    for cname, py in structs.items():
        lines.append('printf("%%zu\\n", sizeof(%s));' % cname)
        expect.append(("sizeof " + cname, ctypes.sizeof(py)))
        for f in py._fields_:
            fn = f[0]
            lines.append('printf("%%zu\\n", offsetof(%s, %s));' % (cname, rename.get(fn, fn)))
            expect.append(("%s.%s" % (cname, fn), getattr(py, fn).offset))
    lines.append("return 0; }")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "abi.c"), os.path.join(tmp, "abi")
        with open(src, "w") as f:
            f.write("\n".join(lines) + "\n")
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        subprocess.run([cc, "-I", os.path.join(nsadtest.REPO, "client"), src, "-o", exe],
                       check=True, env=env)
        got = subprocess.run([exe], capture_output=True, text=True, check=True,
                             env=env).stdout.split()
    bad = [(what, py, int(c)) for (what, py), c in zip(expect, got) if py != int(c)]
    assert len(got) == len(expect) and not bad, "ctypes vs C (name, ctypes, C): %s" % bad


TESTS = [test_ctypes_abi_matches_header, test_forward_backward_every_path, test_float16, test_float64_is_computed_in_float32,
         test_scale_and_module_level_api, test_empty_rows_give_zero_and_minus_inf,
         test_zero_copy_shm_arrays_and_strides, test_error_codes, test_connect_error,
         test_flags_round_trip, test_metrics_and_status, test_threads_share_a_client,
         test_fork_needs_a_new_client, test_reconnect_after_daemon_restart]

if __name__ == "__main__":
    sys.exit(nsadtest.main(TESTS))
