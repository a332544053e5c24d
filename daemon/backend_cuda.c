/* backend_cuda.c — nsad's CUDA backend (the interface is backend.h; read its
 * header comment first). Compiled only with NSA_HAVE_CUDA.
 *
 * Layout:
 *   queues/workers  one per served GPU (--devices / NSAD_DEVICES, default all):
 *                   queue i ↔ physical device cb->dev[i], served by worker i,
 *                   which owns an nsa_cuda_ctx_t (stream + workspace arena
 *                   under the cap NSAD_CUDA_WORKSPACE_CAP, then `busy`).
 *   cuda_ipc        a daemon-wide table of opened IPC mappings keyed by
 *                   (device, 64-byte handle), refcounted: the same allocation
 *                   registered twice (by one session, or again by a client that
 *                   reconnected while its old session drains) shares one
 *                   cudaIpcOpenMemHandle, which CUDA allows only once per
 *                   process and handle. Guarded by cb->ipc_mu (the loop thread,
 *                   the closer thread, the opens on libuv's pool). Opens also
 *                   hold cb->open_mu from the lookup to the insert, so two
 *                   sessions registering one handle at once open it once.
 *   events          IPC events go through the same table (cudaEvent_t).
 *   shm             nsad_shm_open + cudaHostRegister(Mapped|Portable): kernels
 *                   read host memory over the bus through its device alias.
 *
 * sync=false: fwd/bwd return once the work is queued on the worker's stream.
 * The job then comes back to the loop, which may drop the last reference of a
 * region while the GPU still reads it. So each queue has an `unsynced` flag
 * (set by the worker after it queued async work). The job's completion goes
 * through the job queue's mutex, so a flag set by the worker for that job is
 * visible to the loop thread when it closes the region.
 *
 * Deferred closes: closing a region/event never waits for the GPU on the
 * loop thread (that would stall every client's requests for as long as the
 * queued work runs). When a queue's flag is set, the loop records an event on
 * that queue's stream and hands the close (cudaIpcCloseMemHandle, or
 * cudaHostUnregister + munmap for shm) to the closer thread, which waits for
 * the events and then closes. With no async work outstanding the close runs
 * at once on the loop thread. A handle registered again before its deferred
 * close ran revives the table entry (refs > 0), and the closer skips it.
 *
 * Sticky CUDA errors come back from kernels/cuda as NSA_ERR_DEVICE_FATAL and
 * are passed through: dispatch replies device_error and nsad exits 70.
 *
 * Workspace gauge: NSAD_G_WORKSPACE_BYTES cannot be set from here (backend.h
 * gives the backend no metrics handle); the per-request peak still reaches
 * metrics through nsa_run_info_t.workspace_bytes (nsad_workspace_peak_bytes),
 * and the arena size is logged at debug level after it grows.
 */
#include <cuda.h>
#include <cuda_runtime.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "log.h"
#include "nsa/sel_attn_cuda.h"
#include "shadow.h"

/* Default workspace cap per device when NSAD_CUDA_WORKSPACE_CAP is unset. */
#define CB_DEFAULT_WS_CAP ((size_t)8 << 30)

/* One opened IPC object: a device mapping or an event. */
typedef struct cb_ipc {
  int is_event;
  int device;
  unsigned char handle[64];
  void *ptr;     /* mapped device base, or cudaEvent_t */
  size_t extent; /* bytes from ptr to the allocation's end (mappings) */
  int refs;     /* registrations holding it (cb->ipc_mu) */
  int pending;  /* deferred closes queued for it (cb->ipc_mu) */
  struct cb_ipc *next;
} cb_ipc_t;

/* A close handed to the closer thread: wait for ev[], then close. */
typedef struct cb_close {
  struct cb_close *next;
  cb_ipc_t *m;       /* an IPC mapping or event whose refs reached 0, or NULL */
  nsad_region_t shm; /* m == NULL: a copy of the shm region (host base in priv) */
  int nev;
  cudaEvent_t ev[NSAD_MAX_DEVICES];
  int evdev[NSAD_MAX_DEVICES];
} cb_close_t;

typedef struct {
  pthread_mutex_t mu;     /* guards `stream` against worker teardown */
  void *stream;           /* cudaStream_t of the worker's context, NULL if none */
  atomic_int unsynced;    /* sync=false work may still be running */
} cb_queue_t;

typedef struct {
  int nq;
  int dev[NSAD_MAX_DEVICES]; /* queue → physical device */
  size_t ws_cap;
  cb_queue_t q[NSAD_MAX_DEVICES];
  pthread_mutex_t ipc_mu; /* cb->ipc, each entry's refs / pending */
  pthread_mutex_t open_mu; /* one IPC open (lookup .. insert) at a time */
  cb_ipc_t *ipc;
  /* The closer thread and its FIFO of deferred closes (guarded by close_mu). */
  pthread_t closer;
  int closer_on;
  pthread_mutex_t close_mu;
  pthread_cond_t close_cv;
  cb_close_t *close_head, **close_tail;
  int close_busy; /* queued + running closes */
  int close_stop;
  char devlist[160];
} cb_t;

typedef struct {
  int queue;
  int device;
  nsa_cuda_ctx_t *ctx;
  int last_async; /* the last fwd was sync=false (see cb_shadow_fwd) */
  size_t last_ws;
  void *scratch; /* shadow outputs (device) */
  size_t scratch_bytes;
} cb_worker_t;

/* ------------------------------------------------------------ helpers --- */

static int queue_of_device(const cb_t *cb, int device) {
  for (int i = 0; i < cb->nq; i++)
    if (cb->dev[i] == device) return i;
  return -1;
}

/* Parses "0,2" into cb->dev. */
static int parse_devices(cb_t *cb, const char *list, int ngpu, char *msg, size_t msglen) {
  cb->nq = 0;
  if (!list || !*list) {
    for (int i = 0; i < ngpu && i < NSAD_MAX_DEVICES; i++) cb->dev[cb->nq++] = i;
    return 0;
  }
  const char *p = list;
  while (*p) {
    char *end = NULL;
    long d = strtol(p, &end, 10);
    if (end == p || d < 0) {
      snprintf(msg, msglen, "--devices '%s': expected a comma-separated list of GPU ids", list);
      return -1;
    }
    if (d >= ngpu) {
      snprintf(msg, msglen, "--devices '%s': GPU %ld does not exist (%d visible)", list, d, ngpu);
      return -1;
    }
    if (queue_of_device(cb, (int)d) >= 0) {
      snprintf(msg, msglen, "--devices '%s': GPU %ld named twice", list, d);
      return -1;
    }
    if (cb->nq == NSAD_MAX_DEVICES) {
      snprintf(msg, msglen, "--devices '%s': at most %d GPUs", list, NSAD_MAX_DEVICES);
      return -1;
    }
    cb->dev[cb->nq++] = (int)d;
    p = end;
    if (*p == ',') p++;
  }
  if (cb->nq == 0) {
    snprintf(msg, msglen, "--devices '%s': no GPU named", list);
    return -1;
  }
  return 0;
}

/* NSAD_CUDA_WORKSPACE_CAP from the environment, else the config file's pair,
 * else the default. "0" = no cap. */
static int read_ws_cap(const nsad_config_t *cfg, size_t *cap, char *msg, size_t msglen) {
  const char *v = getenv("NSAD_CUDA_WORKSPACE_CAP");
  for (int i = 0; !v && i < cfg->nkv; i++)
    if (!strcmp(cfg->kv[i].key, "NSAD_CUDA_WORKSPACE_CAP")) v = cfg->kv[i].value;
  *cap = CB_DEFAULT_WS_CAP;
  if (!v || !*v) return 0;
  if (nsad_parse_size(v, cap) != 0) {
    snprintf(msg, msglen, "NSAD_CUDA_WORKSPACE_CAP: '%s' is not a size (e.g. 4G, 512M, 0 = none)",
             v);
    return -1;
  }
  return 0;
}

/* Records, into c, an event after the queued sync=false work of queue qi
 * (every queue when qi < 0) whose `unsynced` flag is set, and clears those
 * flags. Returns how many were recorded. A stream whose event cannot be made
 * is waited for here instead (the blocking way) rather than closed early.
 * c NULL (no memory, no closer thread): waits for every one of those streams,
 * flag or not (an earlier deferred close may have cleared its flag). */
static int mark_unsynced(cb_t *cb, int qi, cb_close_t *c) {
  if (c) c->nev = 0;
  for (int i = 0; i < cb->nq; i++) {
    if (qi >= 0 && i != qi) continue;
    cb_queue_t *q = &cb->q[i];
    if (!atomic_exchange(&q->unsynced, 0) && c) continue;
    pthread_mutex_lock(&q->mu);
    if (q->stream) {
      cudaSetDevice(cb->dev[i]);
      cudaEvent_t ev = NULL;
      cudaError_t e = c ? cudaEventCreateWithFlags(&ev, cudaEventDisableTiming) : cudaErrorMemoryAllocation;
      if (e == cudaSuccess) e = cudaEventRecord(ev, (cudaStream_t)q->stream);
      if (e == cudaSuccess) {
        c->ev[c->nev] = ev;
        c->evdev[c->nev++] = cb->dev[i];
      } else {
        cudaGetLastError();
        if (ev) cudaEventDestroy(ev);
        e = cudaStreamSynchronize((cudaStream_t)q->stream);
        if (e != cudaSuccess) {
          nsad_warn("cuda: waiting for GPU %d before closing a region: %s", cb->dev[i],
                    cudaGetErrorString(e));
          cudaGetLastError();
        }
      }
    }
    pthread_mutex_unlock(&q->mu);
  }
  return c ? c->nev : 0;
}

/* The table's entry for the handle with one more registration, or NULL. */
static cb_ipc_t *ipc_get(cb_t *cb, int is_event, int device, const void *handle) {
  pthread_mutex_lock(&cb->ipc_mu);
  cb_ipc_t *m = cb->ipc;
  for (; m; m = m->next)
    if (m->is_event == is_event && m->device == device && !memcmp(m->handle, handle, 64)) break;
  if (m) m->refs++;
  pthread_mutex_unlock(&cb->ipc_mu);
  return m;
}

/* Adds a freshly opened m with its first registration. */
static void ipc_insert(cb_t *cb, cb_ipc_t *m) {
  pthread_mutex_lock(&cb->ipc_mu);
  m->refs = 1;
  m->next = cb->ipc;
  cb->ipc = m;
  pthread_mutex_unlock(&cb->ipc_mu);
}

/* Closes m's CUDA object and frees it (m is out of the table). */
static void ipc_destroy(cb_ipc_t *m) {
  cudaSetDevice(m->device);
  if (m->is_event) {
    cudaEventDestroy((cudaEvent_t)m->ptr);
  } else {
    cudaError_t e = cudaIpcCloseMemHandle(m->ptr);
    if (e != cudaSuccess) nsad_warn("cuda: cudaIpcCloseMemHandle: %s", cudaGetErrorString(e));
  }
  cudaGetLastError();
  free(m);
}

/* Unlinks m when nothing holds it (no registration, no queued close).
 * Caller holds ipc_mu. Returns 1 when the caller must ipc_destroy it. */
static int ipc_unlink_if_idle(cb_t *cb, cb_ipc_t *m) {
  if (m->refs > 0 || m->pending > 0) return 0;
  for (cb_ipc_t **pp = &cb->ipc; *pp; pp = &(*pp)->next)
    if (*pp == m) {
      *pp = m->next;
      break;
    }
  return 1;
}

/* The close itself: m's CUDA object unless it was registered again in the
 * meantime (refs > 0) or another close of it is still queued, else shm. */
static void run_close(cb_t *cb, cb_ipc_t *m, const nsad_region_t *shm) {
  if (m) {
    /* Under the lock, so a registration of the same handle on libuv's pool
     * either revives m first or finds it gone and closed (CUDA opens
     * a handle only once per process). */
    pthread_mutex_lock(&cb->ipc_mu);
    if (ipc_unlink_if_idle(cb, m)) ipc_destroy(m);
    pthread_mutex_unlock(&cb->ipc_mu);
    return;
  }
  nsad_region_t r = *shm;
  if (r.priv) {
    cudaHostUnregister(r.priv);
    cudaGetLastError();
    r.base = r.priv;
    r.priv = NULL;
  }
  nsad_shm_close(&r);
}

/* The closer thread: runs deferred closes in order, each after its events. */
static void *closer_main(void *arg) {
  cb_t *cb = arg;
  pthread_mutex_lock(&cb->close_mu);
  for (;;) {
    while (!cb->close_head && !cb->close_stop) pthread_cond_wait(&cb->close_cv, &cb->close_mu);
    cb_close_t *c = cb->close_head;
    if (!c) break; /* stopping, and nothing left */
    cb->close_head = c->next;
    if (!cb->close_head) cb->close_tail = &cb->close_head;
    pthread_mutex_unlock(&cb->close_mu);
    for (int i = 0; i < c->nev; i++) {
      cudaSetDevice(c->evdev[i]);
      cudaError_t e = cudaEventSynchronize(c->ev[i]);
      if (e != cudaSuccess) {
        nsad_warn("cuda: waiting for GPU %d before closing a region: %s", c->evdev[i],
                  cudaGetErrorString(e));
        cudaGetLastError();
      }
      cudaEventDestroy(c->ev[i]);
      cudaGetLastError();
    }
    if (c->m) {
      pthread_mutex_lock(&cb->ipc_mu);
      c->m->pending--;
      pthread_mutex_unlock(&cb->ipc_mu);
    }
    run_close(cb, c->m, c->m ? NULL : &c->shm);
    free(c);
    pthread_mutex_lock(&cb->close_mu);
    cb->close_busy--;
  }
  pthread_mutex_unlock(&cb->close_mu);
  return NULL;
}

/* Closes m (an IPC entry whose last registration was dropped, shm NULL)
 * or the shm region *shm (m NULL) once the queued work that may read it
 * (queue qi, every queue when qi < 0) is done: at once when nothing is
 * outstanding, else on the closer thread. A close also waits behind the
 * deferred closes before it: their events cover work queued before them,
 * whose `unsynced` flags they already cleared. */
static void close_or_defer(cb_t *cb, int qi, cb_ipc_t *m, const nsad_region_t *shm) {
  cb_close_t *c = cb->closer_on ? calloc(1, sizeof *c) : NULL;
  int nev = mark_unsynced(cb, qi, c); /* c NULL: waits for the streams here */
  if (c) {
    c->m = m;
    if (shm) c->shm = *shm;
    if (m) {
      pthread_mutex_lock(&cb->ipc_mu);
      m->pending++;
      pthread_mutex_unlock(&cb->ipc_mu);
    }
    pthread_mutex_lock(&cb->close_mu);
    const int defer = nev > 0 || cb->close_busy > 0;
    if (defer) {
      c->next = NULL;
      *cb->close_tail = c;
      cb->close_tail = &c->next;
      cb->close_busy++;
      pthread_cond_signal(&cb->close_cv);
    }
    pthread_mutex_unlock(&cb->close_mu);
    if (defer) return;
    free(c);
    if (m) {
      pthread_mutex_lock(&cb->ipc_mu);
      m->pending--;
      pthread_mutex_unlock(&cb->ipc_mu);
    }
  }
  run_close(cb, m, shm);
}

/* Drops one registration of m; the last one closes it (close_or_defer). */
static void ipc_release(cb_t *cb, cb_ipc_t *m, int qi) {
  pthread_mutex_lock(&cb->ipc_mu);
  const int last = --m->refs == 0;
  pthread_mutex_unlock(&cb->ipc_mu);
  if (last) close_or_defer(cb, qi, m, NULL);
}

/* cuMemGetAddressRange through cudart's driver entry point: nsad must not
 * link libcuda.so.1 directly, or it would not even start (for the cpu
 * backend) on a machine without the NVIDIA driver. */
typedef CUresult (*mem_range_fn)(CUdeviceptr *, size_t *, CUdeviceptr);
static CUresult mem_range(CUdeviceptr *base, size_t *size, CUdeviceptr p) {
  static mem_range_fn fn;
  if (!fn) {
    void *f = NULL;
    enum cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &f, CUDART_VERSION,
                                         cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess || !f) {
      cudaGetLastError();
      return CUDA_ERROR_NOT_FOUND;
    }
    fn = (mem_range_fn)f;
  }
  return fn(base, size, p);
}

/* ------------------------------------------------------- init/teardown --- */

static int cb_init(nsad_backend_t *b, const nsad_config_t *cfg, char *msg, size_t msglen) {
  int ngpu = nsa_cuda_device_count();
  if (ngpu <= 0) {
    snprintf(msg, msglen, "cuda backend: no usable CUDA device");
    return -1;
  }
  cb_t *cb = calloc(1, sizeof *cb);
  if (!cb) {
    snprintf(msg, msglen, "out of memory");
    return -1;
  }
  if (parse_devices(cb, cfg->devices, ngpu, msg, msglen) != 0 ||
      read_ws_cap(cfg, &cb->ws_cap, msg, msglen) != 0) {
    free(cb);
    return -1;
  }
  size_t off = 0;
  for (int i = 0; i < cb->nq; i++) {
    pthread_mutex_init(&cb->q[i].mu, NULL);
    atomic_init(&cb->q[i].unsynced, 0);
    char name[80] = "?";
    nsa_cuda_device_name(cb->dev[i], name, sizeof name);
    snprintf(b->devices[i], sizeof b->devices[i], "cuda:%d %s", cb->dev[i], name);
    off += (size_t)snprintf(cb->devlist + off, off < sizeof cb->devlist ? sizeof cb->devlist - off : 0,
                            "%s%d", i ? "," : "", cb->dev[i]);
    if (off >= sizeof cb->devlist) off = sizeof cb->devlist - 1;
  }
  pthread_mutex_init(&cb->ipc_mu, NULL);
  pthread_mutex_init(&cb->open_mu, NULL);
  pthread_mutex_init(&cb->close_mu, NULL);
  pthread_cond_init(&cb->close_cv, NULL);
  cb->close_tail = &cb->close_head;
  /* Without the thread (it could not start) closes wait on the loop thread. */
  cb->closer_on = pthread_create(&cb->closer, NULL, closer_main, cb) == 0;
  if (!cb->closer_on) nsad_warn("cuda backend: no closer thread; region closes will wait for the GPU");
  b->nqueues = cb->nq;
  b->nworkers = cb->nq;
  b->ndevices = cb->nq;
  b->priv = cb;
  nsad_info("cuda backend: %d GPU(s) [%s], workspace cap %zu bytes per GPU%s", cb->nq,
            cb->devlist, cb->ws_cap, cb->ws_cap ? "" : " (none)");
  for (int i = 0; i < cb->nq; i++) nsad_info("  queue %d: %s", i, b->devices[i]);
  return 0;
}

static void cb_teardown(nsad_backend_t *b) {
  cb_t *cb = b->priv;
  if (!cb) return;
  /* Workers are joined (their streams drained): the closer runs what is
   * queued and exits. Sessions released their entries before this; anything
   * left is closed here. */
  if (cb->closer_on) {
    pthread_mutex_lock(&cb->close_mu);
    cb->close_stop = 1;
    pthread_cond_signal(&cb->close_cv);
    pthread_mutex_unlock(&cb->close_mu);
    pthread_join(cb->closer, NULL);
  }
  while (cb->ipc) {
    cb_ipc_t *m = cb->ipc;
    cb->ipc = m->next;
    ipc_destroy(m);
  }
  pthread_mutex_destroy(&cb->ipc_mu);
  pthread_mutex_destroy(&cb->open_mu);
  pthread_mutex_destroy(&cb->close_mu);
  pthread_cond_destroy(&cb->close_cv);
  for (int i = 0; i < cb->nq; i++) pthread_mutex_destroy(&cb->q[i].mu);
  free(cb);
  b->priv = NULL;
}

static int cb_worker_init(nsad_backend_t *b, int worker, void **wctx, char *msg, size_t msglen) {
  cb_t *cb = b->priv;
  *wctx = NULL;
  cb_worker_t *w = calloc(1, sizeof *w);
  if (!w) {
    snprintf(msg, msglen, "out of memory");
    return -1;
  }
  w->queue = worker % cb->nq;
  w->device = cb->dev[w->queue];
  cudaError_t e = cudaSetDevice(w->device);
  if (e != cudaSuccess) {
    snprintf(msg, msglen, "cudaSetDevice(%d): %s", w->device, cudaGetErrorString(e));
    free(w);
    return -1;
  }
  if (nsa_cuda_ctx_create(w->device, cb->ws_cap, &w->ctx, msg, msglen) != NSA_OK) {
    free(w);
    return -1;
  }
  pthread_mutex_lock(&cb->q[w->queue].mu);
  cb->q[w->queue].stream = nsa_cuda_ctx_stream(w->ctx);
  pthread_mutex_unlock(&cb->q[w->queue].mu);
  nsad_info("worker %d: GPU %d ready", worker, w->device);
  *wctx = w;
  return 0;
}

static void cb_worker_teardown(nsad_backend_t *b, int worker, void *wctx) {
  cb_t *cb = b->priv;
  cb_worker_t *w = wctx;
  if (!w) return;
  pthread_mutex_lock(&cb->q[w->queue].mu);
  cb->q[w->queue].stream = NULL;
  nsa_cuda_ctx_destroy(w->ctx); /* synchronizes its stream first */
  pthread_mutex_unlock(&cb->q[w->queue].mu);
  cudaSetDevice(w->device);
  if (w->scratch) cudaFree(w->scratch);
  cudaGetLastError();
  free(w);
}

/* ------------------------------------------------------------ requests --- */

static void after_run(cb_worker_t *w, int rc) {
  if (rc == NSA_OK) {
    size_t ws = nsa_cuda_ctx_workspace_bytes(w->ctx);
    if (ws != w->last_ws) {
      nsad_debug("GPU %d: workspace arena now %zu bytes", w->device, ws);
      w->last_ws = ws;
    }
  }
}

static int cb_fwd(nsad_backend_t *b, void *wctx, const nsa_fwd_args_t *a,
                  const nsa_path_flags_t *flags, nsa_path_t force_path, const nsad_exec_t *ex,
                  nsa_run_info_t *info, char *msg, size_t msglen) {
  cb_t *cb = b->priv;
  cb_worker_t *w = wctx;
  nsa_cuda_exec_t e = {ex ? ex->wait_event : NULL, ex ? ex->done_event : NULL, ex ? ex->sync : 1};
  w->last_async = !e.sync;
  int rc = nsa_cuda_sel_fwd(w->ctx, a, flags, force_path, &e, info, msg, msglen);
  /* After queuing (an event a close recorded in between may not cover this
   * job's work); an error may leave partial work queued too. */
  if (!e.sync || rc != NSA_OK) atomic_store(&cb->q[w->queue].unsynced, 1);
  after_run(w, rc);
  return rc;
}

static int cb_bwd(nsad_backend_t *b, void *wctx, const nsa_bwd_args_t *a,
                  const nsa_path_flags_t *flags, nsa_path_t force_path, const nsad_exec_t *ex,
                  nsa_run_info_t *info, char *msg, size_t msglen) {
  cb_t *cb = b->priv;
  cb_worker_t *w = wctx;
  nsa_cuda_exec_t e = {ex ? ex->wait_event : NULL, ex ? ex->done_event : NULL, ex ? ex->sync : 1};
  w->last_async = !e.sync;
  int rc = nsa_cuda_sel_bwd(w->ctx, a, flags, force_path, &e, info, msg, msglen);
  if (!e.sync || rc != NSA_OK) atomic_store(&cb->q[w->queue].unsynced, 1);
  after_run(w, rc);
  return rc;
}

/* Element span [lo, hi] of a strided tensor (elements, relative to data). */
static void tensor_span(const nsa_tensor_t *t, int64_t *lo, int64_t *hi) {
  *lo = 0, *hi = 0;
  for (int i = 0; i < t->ndim; i++) {
    if (t->shape[i] <= 0) {
      *lo = 0, *hi = -1;
      return;
    }
    int64_t r = (t->shape[i] - 1) * t->stride[i];
    if (r < 0) *lo += r;
    else *hi += r;
  }
}

/* Copies a (device or mapped) tensor's span to a new host buffer; *host is a
 * tensor with the same strides over it. Returns the malloc'd block or NULL. */
static void *span_to_host(const nsa_tensor_t *t, nsa_tensor_t *host, cudaStream_t st) {
  int64_t lo, hi;
  tensor_span(t, &lo, &hi);
  size_t es = nsa_dtype_size(t->dtype);
  size_t n = hi >= lo ? (size_t)(hi - lo + 1) : 0;
  char *buf = malloc(n * es + 1);
  if (!buf) return NULL;
  if (n && cudaMemcpyAsync(buf, (const char *)t->data + lo * (int64_t)es, n * es,
                           cudaMemcpyDefault, st) != cudaSuccess) {
    free(buf);
    return NULL;
  }
  *host = *t;
  host->data = buf - lo * (int64_t)es;
  return buf;
}

/* NSA_SEL_SHADOW_RATE: the same forward on shadow_path into worker-owned
 * device scratch, then both outputs copied to the host and compared.
 * Skipped after a sync=false forward: once done_event fired the client owns
 * its buffers again, so reading o (or q/k/v) now would race with it and
 * report differences that are not the paths' doing. */
static int cb_shadow_fwd(nsad_backend_t *b, void *wctx, const nsa_fwd_args_t *a,
                         const nsa_path_flags_t *flags, nsa_path_t shadow_path, nsad_shadow_t *out,
                         char *msg, size_t msglen) {
  cb_worker_t *w = wctx;
  if (w->last_async) {
    snprintf(msg, msglen, "no shadow run for a sync=false request (its buffers are the client's "
             "again after done_event)");
    return NSA_ERR_UNSUPPORTED;
  }
  int64_t no = 1, nl = 1;
  for (int i = 0; i < a->o.ndim; i++) no *= a->o.shape[i];
  if (a->lse.data)
    for (int i = 0; i < a->lse.ndim; i++) nl *= a->lse.shape[i];
  else
    nl = 0;
  size_t obytes = ((size_t)no * nsa_dtype_size(a->o.dtype) + 255) & ~(size_t)255;
  size_t need = obytes + (size_t)nl * sizeof(float) + 256;
  if (need > w->scratch_bytes) {
    if (w->scratch) cudaFree(w->scratch);
    w->scratch = NULL;
    w->scratch_bytes = 0;
    if (cudaMalloc(&w->scratch, need) != cudaSuccess) {
      cudaGetLastError();
      snprintf(msg, msglen, "shadow: cannot allocate %zu bytes of scratch", need);
      return NSA_ERR_BUSY;
    }
    w->scratch_bytes = need;
  }
  nsa_fwd_args_t s = *a;
  nsa_tensor_set_contiguous(&s.o);
  s.o.data = w->scratch;
  if (a->lse.data) {
    nsa_tensor_set_contiguous(&s.lse);
    s.lse.data = (char *)w->scratch + obytes;
  }
  nsa_run_info_t info;
  nsa_cuda_exec_t e = {NULL, NULL, 1};
  int rc = nsa_cuda_sel_fwd(w->ctx, &s, flags, shadow_path, &e, &info, msg, msglen);
  if (rc != NSA_OK) return rc;
  cudaStream_t st = (cudaStream_t)nsa_cuda_ctx_stream(w->ctx);
  nsa_tensor_t hp_o, hs_o, hp_l, hs_l;
  void *bp_o = span_to_host(&a->o, &hp_o, st), *bs_o = span_to_host(&s.o, &hs_o, st);
  void *bp_l = NULL, *bs_l = NULL;
  if (a->lse.data) {
    bp_l = span_to_host(&a->lse, &hp_l, st);
    bs_l = span_to_host(&s.lse, &hs_l, st);
  }
  cudaError_t ce = cudaStreamSynchronize(st);
  if (!bp_o || !bs_o || (a->lse.data && (!bp_l || !bs_l)) || ce != cudaSuccess) {
    cudaGetLastError();
    snprintf(msg, msglen, "shadow: copying outputs to the host failed");
    rc = NSA_ERR_DEVICE;
  } else {
    nsad_shadow_diff_t d;
    nsad_shadow_diff_init(&d);
    nsad_shadow_compare(&hp_o, &hs_o, &d);
    if (a->lse.data) nsad_shadow_compare(&hp_l, &hs_l, &d);
    out->shadow_path = info.path;
    out->max_abs = d.max_abs;
    out->max_rel = d.max_rel;
  }
  free(bp_o);
  free(bs_o);
  free(bp_l);
  free(bs_l);
  return rc;
}

/* ------------------------------------------------------ regions/events --- */

static int too_large(const nsa_req_region_register_t *req, size_t extent, nsa_proto_err_t *err) {
  return nsa_proto_err_set(err, NSA_E_OUT_OF_BOUNDS,
                           "cuda_ipc size %llu is larger than the allocation (%llu bytes)",
                           (unsigned long long)req->size, (unsigned long long)extent);
}

/* The table's mapping of req's handle, opened here when absent; one more
 * registration holds it. NULL with err set on failure, including a size
 * past the allocation: that is checked before the reference is taken (or
 * the fresh mapping inserted), so a failed registration never drops a
 * reference here. Dropping one may close a mapping (close_or_defer), which
 * must stay on the loop thread: its `unsynced` flags and the deferred-close
 * queue are only consistent there. Caller holds cb->open_mu (CUDA opens a
 * handle only once per process). */
static cb_ipc_t *ipc_open_mem(cb_t *cb, const nsa_req_region_register_t *req,
                              nsa_proto_err_t *err) {
  pthread_mutex_lock(&cb->ipc_mu);
  cb_ipc_t *m = cb->ipc;
  for (; m; m = m->next)
    if (!m->is_event && m->device == req->device && !memcmp(m->handle, req->handle, 64)) break;
  if (m && req->size > m->extent) {
    const size_t ext = m->extent;
    pthread_mutex_unlock(&cb->ipc_mu);
    too_large(req, ext, err);
    return NULL;
  }
  if (m) m->refs++;
  pthread_mutex_unlock(&cb->ipc_mu);
  if (m) return m;
  m = calloc(1, sizeof *m);
  if (!m) return nsa_proto_err_set(err, NSA_E_INTERNAL, "out of memory"), NULL;
  m->device = req->device;
  memcpy(m->handle, req->handle, 64);
  cudaError_t e = cudaSetDevice(req->device);
  cudaIpcMemHandle_t h;
  memcpy(&h, req->handle, sizeof h);
  if (e == cudaSuccess) e = cudaIpcOpenMemHandle(&m->ptr, h, cudaIpcMemLazyEnablePeerAccess);
  if (e != cudaSuccess) {
    cudaGetLastError();
    free(m);
    nsa_proto_err_set(err, NSA_E_BAD_REQUEST,
                      "cannot open the CUDA IPC memory handle on GPU %d: %s (%s)", (int)req->device,
                      cudaGetErrorName(e), cudaGetErrorString(e));
    return NULL;
  }
  /* The real extent: the handle names the allocation's base, so the
   * mapping starts at the base; count from the mapped pointer. */
  CUdeviceptr base = 0;
  size_t size = 0;
  CUresult cr = mem_range(&base, &size, (CUdeviceptr)(uintptr_t)m->ptr);
  if (cr != CUDA_SUCCESS) {
    cudaIpcCloseMemHandle(m->ptr);
    cudaGetLastError();
    free(m);
    nsa_proto_err_set(err, NSA_E_DEVICE_ERROR,
                      "cuMemGetAddressRange on an opened IPC mapping failed (%d)", (int)cr);
    return NULL;
  }
  m->extent = size - (size_t)((uintptr_t)m->ptr - (uintptr_t)base);
  if (req->size > m->extent) { /* nobody else has it: not in the table yet */
    too_large(req, m->extent, err);
    cudaIpcCloseMemHandle(m->ptr);
    cudaGetLastError();
    free(m);
    return NULL;
  }
  ipc_insert(cb, m);
  return m;
}

static int cb_region_open(nsad_backend_t *b, const nsa_req_region_register_t *req, uid_t peer_uid,
                          nsad_region_t *r, nsa_proto_err_t *err) {
  cb_t *cb = b->priv;
  if (req->kind == NSA_REGION_SHM) {
    /* Host memory: pinned and mapped so every GPU's kernels can read it. */
    r->kind = NSAD_ENTRY_SHM;
    int rc = nsad_shm_open(req->name, req->size, peer_uid, r, err);
    if (rc) return rc;
    void *host = r->base;
    long pg = sysconf(_SC_PAGESIZE);
    size_t len = ((size_t)r->mapped + (size_t)pg - 1) & ~((size_t)pg - 1);
    cudaSetDevice(cb->dev[0]);
    cudaError_t e = cudaHostRegister(host, len, cudaHostRegisterMapped | cudaHostRegisterPortable);
    void *dp = NULL;
    if (e == cudaSuccess) {
      e = cudaHostGetDevicePointer(&dp, host, 0);
      if (e != cudaSuccess) cudaHostUnregister(host);
    }
    if (e != cudaSuccess) {
      cudaGetLastError();
      nsad_shm_close(r);
      return nsa_proto_err_set(err, e == cudaErrorMemoryAllocation ? NSA_E_BUSY : NSA_E_DEVICE_ERROR,
                               "shm object %s: cudaHostRegister/GetDevicePointer: %s", req->name,
                               cudaGetErrorString(e));
    }
    r->priv = host;
    r->base = dp; /* == host under UVA, but take what CUDA says */
    return 0;
  }
  /* cuda_ipc */
  if (queue_of_device(cb, req->device) < 0)
    return nsa_proto_err_set(err, NSA_E_BAD_REQUEST,
                             "device %d is not served by this nsad (GPUs %s)", (int)req->device,
                             cb->devlist);
  if (req->size == 0) return nsa_proto_err_set(err, NSA_E_BAD_REQUEST, "key 'size' must be > 0");
  pthread_mutex_lock(&cb->open_mu);
  cb_ipc_t *m = ipc_open_mem(cb, req, err);
  pthread_mutex_unlock(&cb->open_mu);
  if (!m) return -1;
  r->kind = NSAD_ENTRY_CUDA_IPC;
  r->device = req->device;
  r->base = m->ptr;
  r->size = req->size;
  r->mapped = req->size;
  r->priv = m;
  snprintf(r->name, sizeof r->name, "cuda_ipc:%d", (int)req->device);
  return 0;
}

static void cb_region_close(nsad_backend_t *b, nsad_region_t *r) {
  cb_t *cb = b->priv;
  if (r->kind == NSAD_ENTRY_SHM) {
    close_or_defer(cb, -1, NULL, r); /* any GPU may have read it */
    r->priv = NULL;
    r->base = NULL;
    r->fd = -1;
    r->guard = -1;
    return;
  }
  if (r->priv) ipc_release(cb, r->priv, queue_of_device(cb, r->device));
  r->priv = NULL;
  r->base = NULL;
}

static int cb_region_check(nsad_backend_t *b, const nsad_region_t *r, nsa_proto_err_t *err) {
  if (r->kind == NSAD_ENTRY_SHM) return nsad_shm_check(r, err);
  return 0;
}

static int cb_event_open(nsad_backend_t *b, const nsa_req_event_register_t *req, nsad_region_t *ev,
                         nsa_proto_err_t *err) {
  cb_t *cb = b->priv;
  /* libnsaclient sends device 0; an event is usable from any device's
   * stream, so open it on the named GPU when served, else the first one. */
  int dev = queue_of_device(cb, req->device) >= 0 ? req->device : cb->dev[0];
  pthread_mutex_lock(&cb->open_mu); /* ipc_open_mem's reason */
  cb_ipc_t *m = ipc_get(cb, 1, dev, req->handle);
  if (!m) {
    m = calloc(1, sizeof *m);
    if (!m) {
      pthread_mutex_unlock(&cb->open_mu);
      return nsa_proto_err_set(err, NSA_E_INTERNAL, "out of memory");
    }
    m->is_event = 1;
    m->device = dev;
    memcpy(m->handle, req->handle, 64);
    cudaIpcEventHandle_t h;
    memcpy(&h, req->handle, sizeof h);
    cudaEvent_t e = NULL;
    cudaError_t ce = cudaSetDevice(dev);
    if (ce == cudaSuccess) ce = cudaIpcOpenEventHandle(&e, h);
    if (ce != cudaSuccess) {
      cudaGetLastError();
      free(m);
      pthread_mutex_unlock(&cb->open_mu);
      return nsa_proto_err_set(err, NSA_E_BAD_REQUEST,
                               "cannot open the CUDA IPC event handle (create the event with "
                               "cudaEventInterprocess|cudaEventDisableTiming): %s",
                               cudaGetErrorString(ce));
    }
    m->ptr = e;
    ipc_insert(cb, m);
  }
  pthread_mutex_unlock(&cb->open_mu);
  ev->kind = NSAD_ENTRY_EVENT;
  ev->device = dev;
  ev->base = m->ptr;
  ev->priv = m;
  snprintf(ev->name, sizeof ev->name, "cuda_event:%d", dev);
  return 0;
}

static void cb_event_close(nsad_backend_t *b, nsad_region_t *ev) {
  cb_t *cb = b->priv;
  /* A queued wait/record may still name it. */
  if (ev->priv) ipc_release(cb, ev->priv, -1);
  ev->priv = NULL;
  ev->base = NULL;
}

static int cb_queue_for(nsad_backend_t *b, const nsad_region_t *r) {
  cb_t *cb = b->priv;
  if (r->device < 0) return 0; /* host memory: the first GPU */
  int q = queue_of_device(cb, r->device);
  return q < 0 ? 0 : q;
}

const nsad_backend_ops_t nsad_backend_cuda_ops = {
    .name = "cuda",
    .init = cb_init,
    .teardown = cb_teardown,
    .worker_init = cb_worker_init,
    .worker_teardown = cb_worker_teardown,
    .fwd = cb_fwd,
    .bwd = cb_bwd,
    .shadow_fwd = cb_shadow_fwd,
    .region_open = cb_region_open,
    .region_close = cb_region_close,
    .region_check = cb_region_check,
    .event_open = cb_event_open,
    .event_close = cb_event_close,
    .queue_for = cb_queue_for,
};
