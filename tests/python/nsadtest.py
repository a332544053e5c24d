"""Tiny test harness for the Python suites: a real CPU nsad on a temp
socket, and a plain runner (no pytest needed; /usr/bin/python3 on CI has
only Debian packages).

Environment (set by tests/client/CMakeLists.txt; defaults for manual runs):
  NSAD_BIN, NSACTL_BIN   the binaries (default: <repo>/build/bin/...)
  NSACLIENT_LIB          libnsaclient.so the package loads
  NSAD_TEST_ASAN_OPTIONS ASAN_OPTIONS for the nsad child (ASan builds: the
                         python process itself runs with detect_leaks=0)
Exit status: 0 all passed, 1 a failure, 77 the whole suite skipped.
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(REPO, "client", "python"))
sys.path.insert(0, HERE)

SKIP = 77


def binary(name):
    env = os.environ.get(name.upper() + "_BIN")
    if env:
        return env
    return os.path.join(os.environ.get("NSAD_BUILD_DIR", os.path.join(REPO, "build")), "bin", name)


def skip_suite(msg):
    print("SKIP: " + msg)
    sys.exit(SKIP)


class Daemon:
    """nsad --backend cpu on a private socket in a temp dir."""

    def __init__(self, extra=(), backend="cpu"):
        self.dir = tempfile.mkdtemp(prefix="nsad-pytest.")
        self.sock = os.path.join(self.dir, "nsad.sock")
        self.logpath = os.path.join(self.dir, "nsad.log")
        env = dict(os.environ)
        env.pop("LD_PRELOAD", None)  # nsad links its own sanitizer runtime when it has one
        if os.environ.get("NSAD_TEST_ASAN_OPTIONS"):
            env["ASAN_OPTIONS"] = os.environ["NSAD_TEST_ASAN_OPTIONS"]
        self.log = open(self.logpath, "w")
        self.proc = subprocess.Popen(
            [binary("nsad"), "--backend", backend, "--socket", self.sock, "--state-dir",
             os.path.join(self.dir, "state"), "--log-level", "info"] + list(extra),
            stderr=self.log, stdout=self.log, env=env)
        deadline = time.time() + 20
        import socket as so
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("nsad exited early (%s):\n%s" % (self.proc.returncode,
                                                                     self.read_log()))
            s = so.socket(so.AF_UNIX, so.SOCK_STREAM)
            try:
                s.connect(self.sock)
                s.close()
                return
            except OSError:
                s.close()
                time.sleep(0.02)
        raise RuntimeError("nsad did not come up:\n" + self.read_log())

    def read_log(self):
        try:
            with open(self.logpath) as f:
                return f.read()
        except OSError:
            return ""

    def nsactl(self, *args):
        env = dict(os.environ)
        env.pop("LD_PRELOAD", None)
        r = subprocess.run([binary("nsactl"), "--socket", self.sock] + list(args),
                           capture_output=True, text=True, timeout=60, env=env)
        if r.returncode != 0:
            raise RuntimeError("nsactl %s failed (%d): %s%s" % (" ".join(args), r.returncode,
                                                               r.stdout, r.stderr))
        return r.stdout

    def stop(self):
        """SIGTERM; returns nsad's exit status (0 expected)."""
        rc = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait()
        else:
            rc = self.proc.returncode
        self.log.close()
        if rc != 0:
            sys.stderr.write("---- nsad log ----\n" + self.read_log())
        shutil.rmtree(self.dir, ignore_errors=True)
        return rc


class Skip(Exception):
    pass


def run(tests, daemon=None, argv=None):
    """Runs test functions (each takes the Daemon); prints a line per test;
    returns the process exit status. argv[1:] may name tests to run."""
    argv = sys.argv if argv is None else argv
    only = set(argv[1:])
    failed, passed, skipped = [], 0, 0
    for fn in tests:
        if only and fn.__name__ not in only:
            continue
        t0 = time.time()
        try:
            fn(daemon)
            passed += 1
            print("PASS %-40s %.2fs" % (fn.__name__, time.time() - t0), flush=True)
        except Skip as e:
            skipped += 1
            print("SKIP %-40s %s" % (fn.__name__, e), flush=True)
        except Exception:
            failed.append(fn.__name__)
            print("FAIL %s" % fn.__name__, flush=True)
            traceback.print_exc()
    print("%d passed, %d failed, %d skipped" % (passed, len(failed), skipped))
    return 1 if failed else 0


def main(tests, needs=(), extra=(), backend=None):
    """Entry point of a suite: skips the suite when a module in `needs` is
    missing, starts nsad, runs, stops nsad (its exit status must be 0)."""
    for mod in needs:
        try:
            __import__(mod)
        except ImportError as e:
            skip_suite("%s not importable (%s); install python3-%s" % (mod, e, mod))
    # NSAD_TEST_BACKEND=cuda runs the host-tensor suites against the cuda
    # backend (shm regions through cudaHostRegister) on a GPU machine.
    d = Daemon(extra=extra, backend=backend or os.environ.get("NSAD_TEST_BACKEND", "cpu"))
    try:
        rc = run(tests, d)
    finally:
        drc = d.stop()
    if drc != 0:
        print("FAIL nsad exited with status %s" % drc)
        rc = 1
    return rc
