"""Client: one nsad session (libnsaclient handle) with the numpy API.

Shapes (DESIGN.md §2; H = G*h, head j of group g is index g*h + j):

    q   [B, S,   H, Dk]      o   [B, S, H, Dv]
    k   [B, Skv, G, Dk]      lse [B, S, H]        (f32)
    v   [B, Skv, G, Dv]      selection: block ids [B, S, G, n] (i32, -1 unused)
                                        or ranges [B, S, G, n, 2] (half-open spans)

Host tensors travel through POSIX shared memory: the client keeps one shm
region (its "arena"), registered once with nsad and grown when a call needs
more, copies inputs into it, and copies outputs out. Arrays that already live
in one of this client's regions (see Client.shm_array) are passed by
reference with their strides, without copies.
"""
import ctypes
import json
import math
import os
import threading

from . import _lib
from ._lib import BF16, F16, F32, I32, SEL_BLOCK_INDICES, SEL_RANGES

ALIGN = 64


class NsadError(RuntimeError):
    """A failed call. ``code`` is the daemon's error code (DESIGN.md §4:
    ``bad_request``, ``invalid_selection``, ``out_of_bounds``, ...) verbatim,
    or a client-side code from libnsaclient (``disconnected``, ``timeout``,
    ``io_error``, ``bad_reply``, ``invalid_argument``)."""

    def __init__(self, code, message, method=None):
        self.code = code
        self.message = message
        self.method = method
        where = (method + ": ") if method else ""
        super().__init__("%s%s: %s" % (where, code, message))


class Reply:
    """What sel_attn.forward/backward replied: the path that served it, plan
    statistics, the flags epoch it ran under and the device time."""

    __slots__ = ("path", "rows", "max_len", "mean_len", "flags_epoch", "device_us")

    def __init__(self, r):
        self.path = r.path.decode()
        self.rows = int(r.rows)
        self.max_len = int(r.max_len)
        self.mean_len = float(r.mean_len)
        self.flags_epoch = int(r.flags_epoch)
        self.device_us = float(r.device_us)

    def to_dict(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __repr__(self):
        return "Reply(%s)" % ", ".join("%s=%r" % (k, getattr(self, k)) for k in self.__slots__)


def _align(x):
    return (x + ALIGN - 1) // ALIGN * ALIGN


class ShmRegion:
    """A POSIX shm object created by this client, mapped here and registered
    with nsad (nsa_client_shm_create). ``buffer`` is a writable memoryview of
    the mapping; it is invalid after close()."""

    def __init__(self, client, nbytes):
        self._client = client
        p = ctypes.POINTER(_lib.Shm)()
        client._check(client._L.nsa_client_shm_create(client._h, nbytes, ctypes.byref(p)),
                      "shm_create")
        self._p = p
        self.region = int(p.contents.region)
        self.ptr = int(p.contents.ptr)
        self.size = int(p.contents.size)
        self.name = p.contents.name.decode()
        raw = (ctypes.c_char * self.size).from_address(self.ptr)
        raw._nsad_region = self  # numpy views keep the region (and its mapping) alive
        self._raw = raw
        self.buffer = memoryview(raw).cast("B")

    @property
    def closed(self):
        return self._p is None

    def contains(self, addr, nbytes):
        return self._p is not None and self.ptr <= addr and addr + nbytes <= self.ptr + self.size

    def ndarray(self, shape, dtype, offset=0):
        """A numpy view of part of the region (numpy required)."""
        import numpy as np
        dt = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
        return np.frombuffer(self._raw, dtype=dt, count=n, offset=offset).reshape(shape)

    def close(self):
        if self._p is None:
            return
        c = self._client
        p, self._p = self._p, None
        if c._h and c._pid == os.getpid():
            c._regions.discard(self)
            c._L.nsa_client_shm_destroy(c._h, p)


class _Arena:
    """One reusable shm region holding the operands of a call. Grows
    (replace by a region twice as large) when a call needs more."""

    def __init__(self, client):
        self.client = client
        self.region = None

    def layout(self, sizes):
        """Offsets for a list of byte sizes, each 64-byte aligned; makes sure
        the region is big enough."""
        offs, total = [], 0
        for s in sizes:
            offs.append(total)
            total = _align(total + int(s))
        total = max(total, ALIGN)
        if self.region is None or self.region.closed or self.region.size < total:
            old = self.region
            size = max(total, 2 * old.size if old is not None and not old.closed else 0, 1 << 16)
            if old is not None:
                old.close()
            self.region = None
            self.region = ShmRegion(self.client, size)
            self.client._regions.add(self.region)
        return offs

    def close(self):
        if self.region is not None:
            self.region.close()
            self.region = None


def _tensor_ref(t, region, offset, dtype, shape, strides=None):
    t.region = region
    t.offset = offset
    t.dtype = dtype
    t.ndim = len(shape)
    if t.ndim > _lib.MAX_DIMS:
        raise NsadError("invalid_argument", "at most %d dimensions" % _lib.MAX_DIMS)
    for i, s in enumerate(shape):
        t.shape[i] = int(s)
    if strides is not None:
        for i, s in enumerate(strides):
            t.strides[i] = int(s)
        t.has_strides = 1
    else:
        t.has_strides = 0


def shapes_of(q, k, v, sel_shape, block_size):
    """Checks the operand shapes against each other (DESIGN.md §2) and
    returns (B, S, Skv, H, G, Dk, Dv, n, kind). The daemon checks again; this
    gives Python-side errors with names."""
    if len(q) != 4 or len(k) != 4 or len(v) != 4:
        raise NsadError("invalid_argument", "q, k, v must be 4-d: q [B,S,H,Dk], k [B,Skv,G,Dk], "
                        "v [B,Skv,G,Dv]; got %s %s %s" % (tuple(q), tuple(k), tuple(v)))
    B, S, H, Dk = q
    _, Skv, G, _ = k
    Dv = v[3]
    if k[0] != B or v[0] != B or k[3] != Dk or tuple(v[:3]) != tuple(k[:3]):
        raise NsadError("invalid_argument", "inconsistent q/k/v shapes %s %s %s"
                        % (tuple(q), tuple(k), tuple(v)))
    if G <= 0 or H % G != 0:
        raise NsadError("invalid_argument", "H=%d is not a multiple of G=%d" % (H, G))
    sel_shape = tuple(sel_shape)
    if block_size is not None:
        kind = SEL_BLOCK_INDICES
        if len(sel_shape) != 4 or sel_shape[:3] != (B, S, G):
            raise NsadError("invalid_argument", "block ids must be [B,S,G,n] = [%d,%d,%d,n]; got %s"
                            % (B, S, G, sel_shape))
    else:
        kind = SEL_RANGES
        if len(sel_shape) != 5 or sel_shape[:3] != (B, S, G) or sel_shape[4] != 2:
            raise NsadError("invalid_argument", "without block_size the selection must be ranges "
                            "[B,S,G,n,2] = [%d,%d,%d,n,2]; got %s (pass block_size for block ids)"
                            % (B, S, G, sel_shape))
    return B, S, Skv, H, G, Dk, Dv, sel_shape[3], kind


def _np_dtype_code(dt):
    import numpy as np
    dt = np.dtype(dt)
    if dt == np.float32:
        return F32
    if dt == np.float16:
        return F16
    return None


class Client:
    """One session with nsad.

    ``Client(socket=None, name="python", labels=None, timeout_ms=0,
    reconnect_attempts=0)``: socket None means ``$NSAD_SOCKET``, else
    ``/run/nsad/nsad.sock``; labels (str -> str) are sent in ``hello`` and
    are what rollout rules match on. timeout_ms 0 = library default (120 s).

    A Client may be shared by threads (calls are serialized by a lock) but
    not across fork(): open a new one in the child.
    """

    def __init__(self, socket=None, name="python", labels=None, timeout_ms=0,
                 reconnect_attempts=0):
        self._L = _lib.load()
        self._h = None
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self._regions = set()
        self._arena = None
        self.last_reply = None
        labels = dict(labels or {})
        lab = (_lib.Label * max(1, len(labels)))()
        keep = []
        for i, (k, v) in enumerate(labels.items()):
            kb, vb = str(k).encode(), str(v).encode()
            keep += [kb, vb]
            lab[i].key, lab[i].value = kb, vb
        opts = _lib.Opts()
        opts.socket_path = os.fsencode(socket) if socket else None
        opts.name = (name or "python").encode()
        opts.labels = lab
        opts.nlabels = len(labels)
        opts.timeout_ms = int(timeout_ms)
        opts.reconnect_attempts = int(reconnect_attempts)
        h = ctypes.c_void_p()
        if self._L.nsa_client_open(ctypes.byref(h), ctypes.byref(opts)) != 0:
            err = (self._L.nsa_client_open_error() or b"").decode(errors="replace")
            code, _, msg = err.partition(": ")
            raise NsadError(code or "disconnected", msg or err, "open")
        self._h = h
        self._arena = _Arena(self)

    # ------------------------------------------------------------ basics --

    def _check(self, rc, method=None):
        if rc != 0:
            code = (self._L.nsa_client_error_code(self._h) or b"").decode(errors="replace")
            msg = (self._L.nsa_client_error_message(self._h) or b"").decode(errors="replace")
            raise NsadError(code or "internal", msg, method)

    def _live(self):
        if self._h is None:
            raise NsadError("invalid_argument", "client is closed")
        if self._pid != os.getpid():
            raise NsadError("invalid_argument",
                            "this Client was opened in process %d; open a new one after fork"
                            % self._pid)

    def close(self):
        """Unregisters and unlinks this client's shm regions and closes the
        session. Safe to call twice."""
        with self._lock:
            if self._h is None:
                return
            if self._pid != os.getpid():
                # Inherited through fork: the socket and regions belong to
                # the parent; leave them alone.
                self._h = None
                return
            for r in list(self._regions):
                r.close()
            self._regions.clear()
            self._L.nsa_client_close(self._h)
            self._h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @property
    def closed(self):
        return self._h is None

    @property
    def info(self):
        """What hello returned: protocol, server, backend, devices, session,
        flags_epoch (as of the last hello)."""
        self._live()
        i = self._L.nsa_client_info(self._h).contents
        return {
            "protocol": i.protocol,
            "server": i.server.decode(),
            "backend": i.backend.decode(),
            "devices": [i.devices[d].value.decode() for d in range(min(i.ndevices, 8))],
            "session": int(i.session),
            "flags_epoch": int(i.flags_epoch),
        }

    @property
    def backend(self):
        return self.info["backend"]

    @property
    def connections(self):
        """Connections made so far (1 after open; more after reconnects)."""
        self._live()
        return self._L.nsa_client_connections(self._h)

    def ping(self):
        with self._lock:
            self._live()
            self._check(self._L.nsa_client_ping(self._h), "ping")

    def _value(self, vp):
        """Decoded msgpack value (nsa_client_value_t*) -> Python object."""
        if not vp:
            return None
        s = self._L.nsa_client_value_json(vp, 0)
        try:
            text = ctypes.string_at(s).decode() if s else "null"
        finally:
            if s:
                _lib.free(s)
            self._L.nsa_client_value_free(vp)
        return json.loads(text)

    def call(self, method, **params):
        """Raw call with string-valued params (enough for control methods);
        returns the result as Python objects."""
        with self._lock:
            self._live()
            kv = (_lib.Label * max(1, len(params)))()
            keep = []
            for i, (k, v) in enumerate(params.items()):
                kb, vb = str(k).encode(), str(v).encode()
                keep += [kb, vb]
                kv[i].key, kv[i].value = kb, vb
            out = ctypes.c_void_p()
            self._check(self._L.nsa_client_call(self._h, method.encode(), kv, len(params),
                                                 ctypes.byref(out)), method)
            return self._value(out)

    # ------------------------------------------------------ flags/metrics --

    def flags_get(self):
        """flags.get: {epoch, flags: {NAME: {value, source, rollout}}, effective}."""
        with self._lock:
            self._live()
            out = ctypes.c_void_p()
            self._check(self._L.nsa_client_flags_get(self._h, ctypes.byref(out)), "flags.get")
            return self._value(out)

    def flags_set(self, name, value, percent=None, match=None):
        """flags.set (admin). value as in the environment ("1", "off", "128")
        or a bool/int. Returns the new epoch."""
        if isinstance(value, bool):
            value = "1" if value else "0"
        match = dict(match or {})
        m = (_lib.Label * max(1, len(match)))()
        keep = []
        for i, (k, v) in enumerate(match.items()):
            kb, vb = str(k).encode(), str(v).encode()
            keep += [kb, vb]
            m[i].key, m[i].value = kb, vb
        with self._lock:
            self._live()
            ep = ctypes.c_uint64()
            self._check(self._L.nsa_client_flags_set(
                self._h, str(name).encode(), str(value).encode(),
                -1.0 if percent is None else float(percent), m, len(match), ctypes.byref(ep)),
                "flags.set")
            return int(ep.value)

    def flags_reset(self, name):
        """flags.reset (admin): back to config/default. Returns the new epoch."""
        with self._lock:
            self._live()
            ep = ctypes.c_uint64()
            self._check(self._L.nsa_client_flags_reset(self._h, str(name).encode(),
                                                        ctypes.byref(ep)), "flags.reset")
            return int(ep.value)

    def metrics(self, format="map"):
        """metrics.get: the metrics map, or Prometheus text with
        format="prometheus"."""
        with self._lock:
            self._live()
            if format == "prometheus":
                t = ctypes.c_void_p()
                self._check(self._L.nsa_client_metrics_prometheus(self._h, ctypes.byref(t)),
                            "metrics.get")
                try:
                    return ctypes.string_at(t.value).decode()
                finally:
                    _lib.free(t.value)
            if format != "map":
                raise NsadError("invalid_argument", "format must be 'map' or 'prometheus'")
            out = ctypes.c_void_p()
            self._check(self._L.nsa_client_metrics_get(self._h, ctypes.byref(out)), "metrics.get")
            return self._value(out)

    def status(self):
        """What `nsactl status` shows: hello info, sessions, requests,
        regions, queue depth (sums over the metric families' samples), the
        flags epoch and each flag's value."""
        st = dict(self.info)
        m = self.metrics()
        for key, fam in (("sessions", "nsad_sessions"), ("requests_total", "nsad_requests_total"),
                         ("regions", "nsad_regions"), ("queue_depth", "nsad_queue_depth")):
            samples = (m.get(fam) or {}).get("samples") or []
            st[key] = sum(x["value"] for x in samples if isinstance(x.get("value"), (int, float)))
        f = self.flags_get()
        st["flags_epoch"] = f.get("epoch")
        st["flags"] = {k: v.get("value") if isinstance(v, dict) else v
                       for k, v in (f.get("flags") or {}).items()}
        st["effective"] = f.get("effective")
        return st

    def subscribe(self, interval_ms):
        """metrics.subscribe; read with next_notification()."""
        with self._lock:
            self._live()
            self._check(self._L.nsa_client_subscribe(self._h, int(interval_ms)),
                        "metrics.subscribe")

    def next_notification(self, timeout_ms=1000):
        """(method, params) of the next notification, or None on timeout."""
        with self._lock:
            self._live()
            buf = ctypes.create_string_buffer(32)
            out = ctypes.c_void_p()
            rc = self._L.nsa_client_next_notification(self._h, int(timeout_ms), buf,
                                                      ctypes.byref(out))
            if rc != 0:
                if self._L.nsa_client_error_code(self._h) == b"timeout":
                    return None
                self._check(rc, "notification")
            return buf.value.decode(), self._value(out)

    def shutdown(self):
        """shutdown (admin): nsad drains and exits 0."""
        with self._lock:
            self._live()
            self._check(self._L.nsa_client_shutdown(self._h), "shutdown")

    # ------------------------------------------------------------ regions --

    def shm(self, nbytes):
        """A new shm region of nbytes, registered with this session."""
        with self._lock:
            self._live()
            r = ShmRegion(self, int(nbytes))
            self._regions.add(r)
            return r

    def shm_array(self, shape, dtype="float32"):
        """A numpy array living in its own registered shm region: passing it
        (or a strided view of it) to forward/backward costs no copy. The
        region is freed when the client closes or region.close() is called
        (the array must not be used after that)."""
        import numpy as np
        dt = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
        r = self.shm(max(1, n * dt.itemsize))
        return r.ndarray(tuple(shape), dt)

    def _find_region(self, addr, nbytes):
        for r in self._regions:
            if r.contains(addr, nbytes):
                return r
        return None

    # ----------------------------------------------------- numpy sel_attn --

    def _in_place_ref(self, a, code):
        """Tensor ref for an array already inside one of our regions (any
        non-negative strides), else None."""
        if a.size == 0 or any(s < 0 for s in a.strides):
            return None
        isz = a.dtype.itemsize
        if any(s % isz for s in a.strides):
            return None
        lo = a.__array_interface__["data"][0]
        span = sum((d - 1) * s for d, s in zip(a.shape, a.strides)) + isz
        r = self._find_region(lo, span)
        if r is None or (lo - r.ptr) % isz:
            return None
        t = _lib.Tensor()
        _tensor_ref(t, r.region, lo - r.ptr, code, a.shape, [s // isz for s in a.strides])
        return t

    def forward(self, q, k, v, selection, block_size=None, scale=None, out=None, lse=True):
        """Selection attention forward on numpy arrays.

        q [B,S,H,Dk], k [B,Skv,G,Dk], v [B,Skv,G,Dv] (float32 or float16;
        float64 and other floats are computed in float32); selection int32
        block ids [B,S,G,n] with block_size, or ranges [B,S,G,n,2] without.
        scale None = 1/sqrt(Dk). out=(o, lse) arrays in this client's shm
        regions are written in place. Returns (o, lse) (lse None when
        lse=False); the reply (path, flags_epoch, ...) is in self.last_reply.
        """
        import numpy as np
        q, k, v, sel, code, ndt = self._coerce(q, k, v, selection)
        B, S, Skv, H, G, Dk, Dv, n, kind = shapes_of(q.shape, k.shape, v.shape, sel.shape,
                                                     block_size)
        o_shape, l_shape = (B, S, H, Dv), (B, S, H)
        a = _lib.FwdArgs()
        with self._lock:
            self._live()
            ins = [("q", q, code), ("k", k, code), ("v", v, code), ("sel", sel, I32)]
            outs = [("o", o_shape, ndt, code)]
            if lse:
                outs.append(("lse", l_shape, np.dtype(np.float32), F32))
            given = {}
            if out is not None:
                for (nm, shp, dt, c), arr in zip(outs, out):
                    if arr is None:
                        continue
                    if tuple(arr.shape) != shp or arr.dtype != dt:
                        raise NsadError("invalid_argument", "out %s must be %s %s" % (nm, shp, dt))
                    ref = self._in_place_ref(arr, c)
                    if ref is None:
                        raise NsadError("invalid_argument",
                                        "out %s must live in this client's shm (shm_array)" % nm)
                    given[nm] = (arr, ref)
            refs, views = self._stage(ins, [(nm, shp, dt, c) for nm, shp, dt, c in outs
                                            if nm not in given])
            for nm, (arr, ref) in given.items():
                refs[nm] = ref
            a.q, a.k, a.v, a.o = refs["q"], refs["k"], refs["v"], refs["o"]
            if lse:
                a.lse, a.has_lse = refs["lse"], 1
            self._sel(a.sel, refs["sel"], kind, block_size)
            a.scale = float(scale) if scale else 0.0
            r = _lib.Result()
            self._check(self._L.nsa_client_forward(self._h, ctypes.byref(a), ctypes.byref(r)),
                        "sel_attn.forward")
            self.last_reply = Reply(r)
            res = []
            for nm in ("o", "lse"):
                if nm == "lse" and not lse:
                    res.append(None)
                elif nm in given:
                    res.append(given[nm][0])
                else:
                    res.append(np.array(views[nm], copy=True))
            return tuple(res)

    def backward(self, q, k, v, o, lse, do, selection, block_size=None, scale=None):
        """Selection attention backward on numpy arrays: given the forward's
        o and lse and the output gradient do [B,S,H,Dv], returns
        (dq, dk, dv). Reply in self.last_reply."""
        import numpy as np
        q, k, v, sel, code, ndt = self._coerce(q, k, v, selection)
        o = self._as(o, ndt)
        do = self._as(do, ndt)
        lse = self._as(lse, np.float32)
        B, S, Skv, H, G, Dk, Dv, n, kind = shapes_of(q.shape, k.shape, v.shape, sel.shape,
                                                     block_size)
        if o.shape != (B, S, H, Dv) or do.shape != (B, S, H, Dv) or lse.shape != (B, S, H):
            raise NsadError("invalid_argument", "o/do must be [B,S,H,Dv] = %s and lse [B,S,H]; "
                            "got %s %s %s" % ((B, S, H, Dv), o.shape, do.shape, lse.shape))
        a = _lib.BwdArgs()
        with self._lock:
            self._live()
            ins = [("q", q, code), ("k", k, code), ("v", v, code), ("o", o, code),
                   ("lse", lse, F32), ("do", do, code), ("sel", sel, I32)]
            outs = [("dq", q.shape, ndt, code), ("dk", k.shape, ndt, code),
                    ("dv", v.shape, ndt, code)]
            refs, views = self._stage(ins, outs)
            a.q, a.k, a.v, a.o, a.lse = refs["q"], refs["k"], refs["v"], refs["o"], refs["lse"]
            a.dout, a.dq, a.dk, a.dv = refs["do"], refs["dq"], refs["dk"], refs["dv"]
            self._sel(a.sel, refs["sel"], kind, block_size)
            a.scale = float(scale) if scale else 0.0
            r = _lib.Result()
            self._check(self._L.nsa_client_backward(self._h, ctypes.byref(a), ctypes.byref(r)),
                        "sel_attn.backward")
            self.last_reply = Reply(r)
            return tuple(np.array(views[nm], copy=True) for nm in ("dq", "dk", "dv"))

    # -- helpers of the numpy API

    @staticmethod
    def _as(x, dt):
        import numpy as np
        x = np.asarray(x)
        return x if x.dtype == dt else x.astype(dt)

    def _coerce(self, q, k, v, selection):
        import numpy as np
        q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
        if not (q.dtype == k.dtype == v.dtype):
            raise NsadError("invalid_argument", "q, k, v dtypes differ: %s %s %s"
                            % (q.dtype, k.dtype, v.dtype))
        code = _np_dtype_code(q.dtype)
        if code is None:
            if q.dtype.kind not in "fiu":
                raise NsadError("invalid_argument", "unsupported dtype %s" % q.dtype)
            # float64 (and ints) are computed in float32: the daemon's widest
            q, k, v = (x.astype(np.float32) for x in (q, k, v))
            code = F32
        sel = np.asarray(selection)
        if sel.dtype != np.int32:
            if sel.dtype.kind not in "iu":
                raise NsadError("invalid_argument", "selection must be integer, got %s" % sel.dtype)
            sel = sel.astype(np.int32)
        return q, k, v, sel, code, q.dtype

    def _stage(self, ins, outs):
        """Places operands: inputs already in our regions by reference, the
        rest copied into the arena; outputs get arena space. Returns
        (refs by name, numpy views of arena outputs by name)."""
        refs, copies = {}, []
        for nm, arr, c in ins:
            ref = self._in_place_ref(arr, c)
            if ref is not None:
                refs[nm] = ref
            else:
                copies.append((nm, arr, c))
        sizes = [arr.size * arr.dtype.itemsize for _, arr, _ in copies]
        sizes += [int(math.prod(shp)) * dt.itemsize for _, shp, dt, _ in outs]
        offs = self._arena.layout(sizes)
        reg = self._arena.region
        i = 0
        for nm, arr, c in copies:
            view = reg.ndarray(arr.shape, arr.dtype, offs[i])
            view[...] = arr
            t = _lib.Tensor()
            _tensor_ref(t, reg.region, offs[i], c, arr.shape)
            refs[nm] = t
            i += 1
        views = {}
        for nm, shp, dt, c in outs:
            view = reg.ndarray(shp, dt, offs[i])
            view[...] = float("nan")  # poison: every element must be written by nsad
            t = _lib.Tensor()
            _tensor_ref(t, reg.region, offs[i], c, shp)
            refs[nm] = t
            views[nm] = view
            i += 1
        return refs, views

    @staticmethod
    def _sel(s, ref, kind, block_size):
        s.kind = kind
        s.t = ref
        s.block_size = int(block_size) if kind == SEL_BLOCK_INDICES else 0


# ------------------------------------------------------- default client --

_default = {}
_default_lock = threading.Lock()


def default_client():
    """This process's shared Client (opened on first use with $NSAD_SOCKET;
    a fresh one after fork)."""
    pid = os.getpid()
    with _default_lock:
        c = _default.get(pid)
        if c is None or c.closed:
            _default.clear()  # an inherited parent's client is dropped, not closed
            c = Client(name="python-%d" % pid)
            _default[pid] = c
        return c


def set_default_client(client):
    """Makes `client` this process's default (used by the module-level
    forward/backward and by selection_attention without client=)."""
    with _default_lock:
        _default.clear()
        _default[os.getpid()] = client


def forward(q, k, v, selection, block_size=None, scale=None, client=None, **kw):
    """Module-level forward on the default client; see Client.forward."""
    return (client or default_client()).forward(q, k, v, selection, block_size, scale, **kw)


def backward(q, k, v, o, lse, do, selection, block_size=None, scale=None, client=None):
    """Module-level backward on the default client; see Client.backward."""
    return (client or default_client()).backward(q, k, v, o, lse, do, selection, block_size,
                                                 scale)
