/*
 * backend.h — the interface between nsad's core (loop, sessions, job queue,
 * workers) and a compute backend (backend_cpu.c; backend_cuda.c by the CUDA
 * helper, compiled only with NSA_HAVE_CUDA).
 *
 * ---- For the CUDA backend (backend_cuda.c) ----------------------------------
 * Provide `const nsad_backend_ops_t nsad_backend_cuda_ops` and fill
 * nsad_backend_t in init():
 *   nqueues  = number of devices served (--devices, cfg->devices; NULL = all);
 *              a job goes to queue = device of its `q` region (region.h
 *              `device`), clamped into [0, nqueues)
 *   nworkers = nqueues (one worker thread per GPU: worker i serves queue
 *              i % nqueues, see worker.c)
 *   devices  = device names for the hello reply
 * Threads: init, teardown, region_close and event_close run on the loop
 * thread (teardown after every worker is joined); region_open and event_open
 * run on libuv's thread pool (dispatch.c), possibly several at once and
 * beside the loop's closes, so they must be thread-safe; worker_init, fwd, bwd,
 * shadow_fwd and worker_teardown run on the worker thread that owns `wctx`
 * (create the nsa_cuda_ctx_t there; call cudaSetDevice first).
 * region_open: handle kind=cuda_ipc (nsa_cuda_ipc_open_mem on the device's
 *   ctx; fill r->base = device pointer, r->size = req->size after checking it
 *   against the real extent, r->device, r->priv). kind=shm MUST be served
 *   too (DESIGN.md §4: shm is how host tensors work; scripts/demo.sh and
 *   nsa_example use shm with --backend auto): nsad_shm_open, then
 *   cudaHostRegister(base, size, Mapped|Portable) and r->base = the device
 *   alias from cudaHostGetDevicePointer (keep the host pointer in r->priv;
 *   region_close: cudaHostUnregister, then nsad_shm_close; region_check:
 *   nsad_shm_check for shm entries).
 *   Entries are per session; if one session registers the same handle twice,
 *   the backend should share the mapping (refcount it in its own table).
 * region_close: called when the last reference drops, i.e. after every job
 *   that used the region came back from fwd/bwd (it may run from the loop
 *   thread while a worker runs other sessions' jobs). With sync=0 a job comes
 *   back once its work is QUEUED: before cudaIpcCloseMemHandle/unregister,
 *   wait for the work that may still read the region (e.g. an event recorded
 *   after each job on the worker's stream, or cudaStreamSynchronize).
 * event_open/event_close: kind NSAD_ENTRY_EVENT; r->base = cudaEvent_t.
 * fwd/bwd: nsa_cuda_sel_fwd/bwd with ex->wait_event/done_event (cudaEvent_t
 *   from event entries' base) and ex->sync. Return nsa_status_t; return
 *   NSA_ERR_DEVICE_FATAL for a sticky CUDA error: nsad replies device_error,
 *   logs, drains and exits non-zero (systemd restarts it).
 * ------------------------------------------------------------------------------
 */
#ifndef NSAD_BACKEND_H
#define NSAD_BACKEND_H

#include <stddef.h>
#include <sys/types.h>

#include "config.h"
#include "nsa/sel_attn.h"
#include "nsa_proto.h"
#include "region.h"

#define NSAD_MAX_DEVICES 16

typedef struct nsad_backend nsad_backend_t;

/* Options of one request (mirrors nsa_cuda_exec_t). */
typedef struct {
  void *wait_event; /* cudaEvent_t or NULL */
  void *done_event; /* cudaEvent_t or NULL */
  int sync;         /* the CPU backend always runs synchronously */
} nsad_exec_t;

/* A shadow comparison result (NSA_SEL_SHADOW_RATE). */
typedef struct {
  nsa_path_t shadow_path;
  double max_abs, max_rel;
} nsad_shadow_t;

typedef struct {
  const char *name; /* "cpu", "cuda" */
  int (*init)(nsad_backend_t *b, const nsad_config_t *cfg, char *msg, size_t msglen);
  void (*teardown)(nsad_backend_t *b);

  int (*worker_init)(nsad_backend_t *b, int worker, void **wctx, char *msg, size_t msglen);
  void (*worker_teardown)(nsad_backend_t *b, int worker, void *wctx);
  int (*fwd)(nsad_backend_t *b, void *wctx, const nsa_fwd_args_t *a, const nsa_path_flags_t *flags,
             nsa_path_t force_path, const nsad_exec_t *ex, nsa_run_info_t *info, char *msg,
             size_t msglen);
  int (*bwd)(nsad_backend_t *b, void *wctx, const nsa_bwd_args_t *a, const nsa_path_flags_t *flags,
             nsa_path_t force_path, const nsad_exec_t *ex, nsa_run_info_t *info, char *msg,
             size_t msglen);
  /* Optional (NULL = no shadow runs). NSA_SEL_SHADOW_RATE: after a successful
   * forward, the worker picks a second path (nsad_shadow_choose, shadow.h) and
   * calls this to run it into backend-owned scratch outputs and compare them
   * with the client's (already written) o/lse (nsad_shadow_compare). */
  int (*shadow_fwd)(nsad_backend_t *b, void *wctx, const nsa_fwd_args_t *a,
                    const nsa_path_flags_t *flags, nsa_path_t shadow_path, nsad_shadow_t *out,
                    char *msg, size_t msglen);

  int (*region_open)(nsad_backend_t *b, const nsa_req_region_register_t *req, uid_t peer_uid,
                     nsad_region_t *r, nsa_proto_err_t *err);
  void (*region_close)(nsad_backend_t *b, nsad_region_t *r);
  /* Optional: cheap re-validation just before a job using r is queued. */
  int (*region_check)(nsad_backend_t *b, const nsad_region_t *r, nsa_proto_err_t *err);
  int (*event_open)(nsad_backend_t *b, const nsa_req_event_register_t *req, nsad_region_t *ev,
                    nsa_proto_err_t *err);
  void (*event_close)(nsad_backend_t *b, nsad_region_t *ev);
  /* Optional: queue (0..nqueues-1) for a job whose q tensor lives in r.
   * NULL: host memory → 0, else r->device % nqueues. */
  int (*queue_for)(nsad_backend_t *b, const nsad_region_t *r);
} nsad_backend_ops_t;

struct nsad_backend {
  const nsad_backend_ops_t *ops;
  int nqueues;
  int nworkers;
  int ndevices;
  char devices[NSAD_MAX_DEVICES][96];
  void *priv;
};

extern const nsad_backend_ops_t nsad_backend_cpu_ops;
#ifdef NSA_HAVE_CUDA
extern const nsad_backend_ops_t nsad_backend_cuda_ops; /* backend_cuda.c (CUDA helper) */
#endif

/* Picks and initializes the backend for cfg->backend (auto = cuda when built
 * with CUDA and a device is usable, else cpu). Returns 0, or -1 with msg
 * (e.g. --backend cuda without a usable GPU). */
int nsad_backend_create(const nsad_config_t *cfg, nsad_backend_t *b, char *msg, size_t msglen);
void nsad_backend_destroy(nsad_backend_t *b);

#endif
