"""ctypes view of libnsaclient (client/nsaclient.h).

Every struct here mirrors nsaclient.h field by field; keep them in step with
that header. The library is found, in order, through:

1. ``$NSACLIENT_LIB`` (a path to libnsaclient.so),
2. the build directories of the repository this package came from
   (``$NSAD_BUILD_DIR/lib``, ``<repo>/build/lib``, then ``<repo>/build-*/lib``;
   ``<repo>`` is the checkout around this file, or the one recorded at
   ``pip install`` time in ``nsad/_buildinfo.py``),
3. the system loader (``libnsaclient.so.0``, ``libnsaclient.so``).
"""
import ctypes
import glob
import os
import threading

MAX_DIMS = 5

# nsa_client_dtype_t
BF16, F16, F32, I32 = 0, 1, 2, 3
DTYPE_NAMES = {BF16: "bf16", F16: "f16", F32: "f32", I32: "i32"}
DTYPE_BYTES = {BF16: 2, F16: 2, F32: 4, I32: 4}

# nsa_client_sel_kind_t
SEL_BLOCK_INDICES, SEL_RANGES = 0, 1


class Label(ctypes.Structure):
    _fields_ = [("key", ctypes.c_char_p), ("value", ctypes.c_char_p)]


class Opts(ctypes.Structure):
    _fields_ = [
        ("socket_path", ctypes.c_char_p),
        ("name", ctypes.c_char_p),
        ("labels", ctypes.POINTER(Label)),
        ("nlabels", ctypes.c_int),
        ("timeout_ms", ctypes.c_int),
        ("reconnect_attempts", ctypes.c_int),
    ]


class Info(ctypes.Structure):
    _fields_ = [
        ("protocol", ctypes.c_int),
        ("server", ctypes.c_char * 64),
        ("backend", ctypes.c_char * 16),
        ("ndevices", ctypes.c_int),
        ("devices", (ctypes.c_char * 96) * 8),
        ("session", ctypes.c_uint64),
        ("flags_epoch", ctypes.c_uint64),
    ]


class Shm(ctypes.Structure):
    _fields_ = [
        ("region", ctypes.c_uint64),
        ("ptr", ctypes.c_void_p),
        ("size", ctypes.c_size_t),
        ("name", ctypes.c_char * 64),
    ]


class Tensor(ctypes.Structure):
    _fields_ = [
        ("region", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
        ("dtype", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("shape", ctypes.c_int64 * MAX_DIMS),
        ("strides", ctypes.c_int64 * MAX_DIMS),
        ("has_strides", ctypes.c_int),
    ]


class Sel(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("t", Tensor), ("block_size", ctypes.c_int32)]


class Exec(ctypes.Structure):
    """nsa_client_exec_t: CUDA stream ordering; all zero = blocking call."""
    _fields_ = [
        ("wait_event", ctypes.c_uint64),
        ("done_event", ctypes.c_uint64),
        ("has_wait_event", ctypes.c_int),
        ("has_done_event", ctypes.c_int),
        ("async_", ctypes.c_int),  # "async" in C (a Python keyword)
    ]


class FwdArgs(ctypes.Structure):
    _fields_ = [
        ("q", Tensor), ("k", Tensor), ("v", Tensor), ("o", Tensor), ("lse", Tensor),
        ("has_lse", ctypes.c_int),
        ("sel", Sel),
        ("scale", ctypes.c_double),
    ]


class BwdArgs(ctypes.Structure):
    _fields_ = [
        ("q", Tensor), ("k", Tensor), ("v", Tensor), ("o", Tensor), ("lse", Tensor),
        ("dout", Tensor), ("dq", Tensor), ("dk", Tensor), ("dv", Tensor),
        ("sel", Sel),
        ("scale", ctypes.c_double),
    ]


class Result(ctypes.Structure):
    _fields_ = [
        ("path", ctypes.c_char * 16),
        ("rows", ctypes.c_int64),
        ("max_len", ctypes.c_int64),
        ("mean_len", ctypes.c_double),
        ("flags_epoch", ctypes.c_uint64),
        ("device_us", ctypes.c_double),
    ]


_c = ctypes
_P = ctypes.c_void_p  # nsa_client_t *, nsa_client_value_t * (opaque)

# name: (restype, argtypes)
_SIGNATURES = {
    "nsa_client_open": (_c.c_int, [_c.POINTER(_P), _c.POINTER(Opts)]),
    "nsa_client_open_error": (_c.c_char_p, []),
    "nsa_client_close": (None, [_P]),
    "nsa_client_error_code": (_c.c_char_p, [_P]),
    "nsa_client_error_message": (_c.c_char_p, [_P]),
    "nsa_client_info": (_c.POINTER(Info), [_P]),
    "nsa_client_connections": (_c.c_int, [_P]),
    "nsa_client_fd": (_c.c_int, [_P]),
    "nsa_client_ping": (_c.c_int, [_P]),
    "nsa_client_shm_create": (_c.c_int, [_P, _c.c_size_t, _c.POINTER(_c.POINTER(Shm))]),
    "nsa_client_shm_destroy": (_c.c_int, [_P, _c.POINTER(Shm)]),
    "nsa_client_region_register_shm": (_c.c_int, [_P, _c.c_char_p, _c.c_uint64,
                                                  _c.POINTER(_c.c_uint64)]),
    "nsa_client_region_unregister": (_c.c_int, [_P, _c.c_uint64]),
    "nsa_client_forward": (_c.c_int, [_P, _c.POINTER(FwdArgs), _c.POINTER(Result)]),
    "nsa_client_backward": (_c.c_int, [_P, _c.POINTER(BwdArgs), _c.POINTER(Result)]),
    "nsa_client_forward_submit": (_c.c_int, [_P, _c.POINTER(FwdArgs), _c.POINTER(_c.c_uint32)]),
    "nsa_client_backward_submit": (_c.c_int, [_P, _c.POINTER(BwdArgs), _c.POINTER(_c.c_uint32)]),
    "nsa_client_wait": (_c.c_int, [_P, _c.c_uint32, _c.POINTER(Result)]),
    "nsa_client_value_free": (None, [_P]),
    # returns malloc'd char*: keep it a void* so we can free() it
    "nsa_client_value_json": (_c.c_void_p, [_P, _c.c_int]),
    "nsa_client_call": (_c.c_int, [_P, _c.c_char_p, _c.POINTER(Label), _c.c_int,
                                   _c.POINTER(_P)]),
    "nsa_client_flags_get": (_c.c_int, [_P, _c.POINTER(_P)]),
    "nsa_client_flags_set": (_c.c_int, [_P, _c.c_char_p, _c.c_char_p, _c.c_double,
                                        _c.POINTER(Label), _c.c_int, _c.POINTER(_c.c_uint64)]),
    "nsa_client_flags_reset": (_c.c_int, [_P, _c.c_char_p, _c.POINTER(_c.c_uint64)]),
    "nsa_client_metrics_get": (_c.c_int, [_P, _c.POINTER(_P)]),
    "nsa_client_metrics_prometheus": (_c.c_int, [_P, _c.POINTER(_c.c_void_p)]),
    "nsa_client_subscribe": (_c.c_int, [_P, _c.c_uint32]),
    "nsa_client_next_notification": (_c.c_int, [_P, _c.c_int, _c.POINTER(_c.c_char), _c.POINTER(_P)]),
    "nsa_client_shutdown": (_c.c_int, [_P]),
}

# CUDA entry points (libnsaclient with the device-pointer API); declared when
# the loaded library has them, see has().
_OPTIONAL = {
    "nsa_client_region_register_cuda_ipc": (_c.c_int, [_P, _c.c_int, _c.c_char_p, _c.c_uint64,
                                                       _c.POINTER(_c.c_uint64)]),
    "nsa_client_event_register": (_c.c_int, [_P, _c.c_int, _c.c_char_p,
                                              _c.POINTER(_c.c_uint64)]),
    "nsa_client_event_unregister": (_c.c_int, [_P, _c.c_uint64]),
    "nsa_client_cuda_tensor": (_c.c_int, [_P, _c.c_void_p, _c.c_int, _c.c_int,
                                          _c.POINTER(_c.c_int64), _c.POINTER(Tensor)]),
    "nsa_client_cuda_event": (_c.c_int, [_P, _c.c_void_p, _c.POINTER(_c.c_uint64)]),
    "nsa_client_cuda_forget": (_c.c_int, [_P, _c.c_void_p]),
    "nsa_client_forward_submit_ex": (_c.c_int, [_P, _c.POINTER(FwdArgs), _c.POINTER(Exec),
                                                _c.POINTER(_c.c_uint32)]),
    "nsa_client_backward_submit_ex": (_c.c_int, [_P, _c.POINTER(BwdArgs), _c.POINTER(Exec),
                                                 _c.POINTER(_c.c_uint32)]),
}


def _repo_roots():
    """Checkouts this package may belong to: the one around this file (source
    tree use), then the one recorded when it was pip-installed."""
    roots = []
    here = os.path.dirname(os.path.abspath(__file__))
    cand = os.path.normpath(os.path.join(here, "..", "..", ".."))  # client/python/nsad -> repo
    if os.path.isfile(os.path.join(cand, "client", "nsaclient.h")):
        roots.append(cand)
    try:
        from . import _buildinfo  # written by the in-tree build backend
        r = getattr(_buildinfo, "REPO_ROOT", None)
        if r and r not in roots and os.path.isfile(os.path.join(r, "client", "nsaclient.h")):
            roots.append(r)
    except ImportError:
        pass
    return roots


def _is_sanitized(path):
    """True for a library linked against the ASan runtime (its DT_NEEDED
    name is in the dynamic string table)."""
    try:
        with open(path, "rb") as f:
            return b"libasan.so" in f.read()
    except OSError:
        return True


def candidate_paths():
    """Where we look for libnsaclient, in order (for error messages too)."""
    paths = []
    env = os.environ.get("NSACLIENT_LIB")
    if env:
        paths.append(env)
    bdir = os.environ.get("NSAD_BUILD_DIR")
    if bdir:
        paths.append(os.path.join(bdir, "lib", "libnsaclient.so"))
    for root in _repo_roots():
        paths.append(os.path.join(root, "build", "lib", "libnsaclient.so"))
        # Other build dirs, newest first; sanitizer builds last (they only
        # load into a process that preloads the ASan runtime).
        extra = sorted(glob.glob(os.path.join(root, "build-*", "lib", "libnsaclient.so")),
                       key=lambda p: (_is_sanitized(p), -os.path.getmtime(p)))
        paths.extend(extra)
    return paths


_lock = threading.Lock()
_lib = None
_libc = None


def load():
    """Loads libnsaclient once and declares every function's signature."""
    global _lib, _libc
    with _lock:
        if _lib is not None:
            return _lib
        tried = []
        lib = None
        env = os.environ.get("NSACLIENT_LIB")
        for p in candidate_paths():
            if not os.path.exists(p):
                tried.append(p + " (missing)")
                if p == env:
                    raise OSError("NSACLIENT_LIB=%s does not exist" % env)
                continue
            lib = ctypes.CDLL(p)  # a present but broken library is an error, not a fallback
            break
        if lib is None:
            for name in ("libnsaclient.so.0", "libnsaclient.so"):
                try:
                    lib = ctypes.CDLL(name)
                    break
                except OSError:
                    tried.append(name + " (system loader)")
        if lib is None:
            raise OSError("libnsaclient not found; set NSACLIENT_LIB to the path of "
                          "libnsaclient.so (build/lib/). Tried: " + "; ".join(tried))
        for name, (res, args) in _SIGNATURES.items():
            f = getattr(lib, name)
            f.restype = res
            f.argtypes = args
        for name, (res, args) in _OPTIONAL.items():
            if hasattr(lib, name):
                f = getattr(lib, name)
                f.restype = res
                f.argtypes = args
        libc = ctypes.CDLL(None)
        libc.free.argtypes = [ctypes.c_void_p]
        libc.free.restype = None
        _libc = libc
        _lib = lib
        return lib


def free(ptr):
    _libc.free(ptr)


def has(name):
    """True when the loaded libnsaclient exports `name` (optional APIs such as
    the CUDA device-pointer calls)."""
    return hasattr(load(), name)


def library_path():
    lib = load()
    return getattr(lib, "_name", None)
