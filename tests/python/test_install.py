#!/usr/bin/env python3
"""`pip install ./client/python` with no network (--no-index): into a target
dir, into a venv, editable; the installed package finds libnsaclient and
serves a forward; `import nsad` works without torch."""
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nsadtest  # noqa: E402

PKG = os.path.join(nsadtest.REPO, "client", "python")

PROBE = r"""
import sys, os
sys.modules["torch"] = None  # torch must not be needed for the numpy part
import numpy as np, nsad
print("FILE", nsad.__file__)
print("LIBS", nsad._lib.candidate_paths()[:1])
c = nsad.Client(socket=os.environ["PROBE_SOCK"])
rng = np.random.default_rng(1)
q = rng.uniform(-1, 1, (1, 4, 2, 8)).astype(np.float32)
k = rng.uniform(-1, 1, (1, 8, 1, 8)).astype(np.float32)
o, lse = c.forward(q, k, k, np.array([[[[0, 1]]] * 4], np.int32), block_size=4)
assert not np.isnan(o).any()
print("PATH", c.last_reply.path)
try:
    from nsad.torch import selection_attention
    print("TORCH importable?!")
except ImportError:
    print("NOTORCH ok")
c.close()
"""


def pip_ok():
    r = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True)
    return r.returncode == 0


def probe(d, python, env_extra, expect_under):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(env_extra)
    env["PROBE_SOCK"] = d.sock
    r = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, env=env,
                       cwd=tempfile.gettempdir(), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "FILE " + expect_under in out, out
    assert "PATH varlen_v2" in out and "NOTORCH ok" in out, out
    return out


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, "%s failed:\n%s%s" % (" ".join(cmd), r.stdout, r.stderr)
    return r.stdout


def test_pip_install_target_no_network(d):
    if not pip_ok():
        raise nsadtest.Skip("pip not available for %s (python3-pip)" % sys.executable)
    with tempfile.TemporaryDirectory() as tmp:
        run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
             "--target", tmp, PKG])
        with open(os.path.join(tmp, "nsad", "_buildinfo.py")) as f:
            assert repr(nsadtest.REPO) in f.read()
        # library via $NSACLIENT_LIB (as ctest sets it)
        probe(d, sys.executable, {"PYTHONPATH": tmp}, tmp)


def test_venv_and_editable_no_network(d):
    if not pip_ok():
        raise nsadtest.Skip("pip not available")
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "venv", "--system-site-packages",
                            os.path.join(tmp, "venv")], capture_output=True, text=True)
        if r.returncode != 0:
            raise nsadtest.Skip("python3 -m venv unavailable (python3-venv): " + r.stderr[-200:])
        py = os.path.join(tmp, "venv", "bin", "python")
        # --system-site-packages shows the base interpreter's packages; when
        # this python is itself a venv (e.g. /opt/torch/.venv), numpy lives
        # in ours: a .pth in the new venv appends its directory to sys.path
        # (after the venv's own site-packages, so the installed nsad wins).
        import numpy
        npdir = os.path.dirname(os.path.dirname(numpy.__file__))
        site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        with open(os.path.join(site, "zz_parent_numpy.pth"), "w") as f:
            f.write(npdir + "\n")
        run([py, "-m", "pip", "install", "--no-index", "--quiet", PKG])
        probe(d, py, {}, os.path.join(tmp, "venv"))
        run([py, "-m", "pip", "uninstall", "-y", "--quiet", "nsad"])
        run([py, "-m", "pip", "install", "--no-index", "--quiet", "-e", PKG])
        probe(d, py, {}, PKG)


def test_library_lookup_order(d):
    import nsad._lib as L
    old = os.environ.get("NSACLIENT_LIB")
    try:
        os.environ["NSACLIENT_LIB"] = "/nonexistent/libnsaclient.so"
        assert L.candidate_paths()[0] == "/nonexistent/libnsaclient.so"
        os.environ.pop("NSACLIENT_LIB")
        paths = L.candidate_paths()
        assert all("build" in p for p in paths), paths
        r = subprocess.run([sys.executable, "-c", "import nsad; nsad.Client(socket='/x')"],
                           env=dict(os.environ, NSACLIENT_LIB="/nonexistent/libnsaclient.so",
                                    PYTHONPATH=PKG),
                           capture_output=True, text=True)
        assert r.returncode != 0 and "NSACLIENT_LIB" in r.stderr, r.stderr
    finally:
        if old is not None:
            os.environ["NSACLIENT_LIB"] = old


TESTS = [test_pip_install_target_no_network, test_venv_and_editable_no_network,
         test_library_lookup_order]

if __name__ == "__main__":
    sys.exit(nsadtest.main(TESTS, needs=("numpy",)))
