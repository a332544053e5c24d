/* backend_cpu.c — the CPU backend: shm regions, nsa_cpu_sel_fwd/bwd on
 * worker threads (a real backend, not a mock; see DESIGN.md §5). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "shadow.h"
#ifdef _OPENMP
#include <omp.h>
#endif

static int cpu_init(nsad_backend_t *b, const nsad_config_t *cfg, char *msg, size_t msglen) {
  b->nqueues = 1;
  b->nworkers = cfg->workers > 0 ? cfg->workers : 1;
  b->ndevices = 1;
  long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
  snprintf(b->devices[0], sizeof b->devices[0], "cpu (%ld cores)", ncpu);
  return 0;
}

static void cpu_teardown(nsad_backend_t *b) {}

static int cpu_worker_init(nsad_backend_t *b, int worker, void **wctx, char *msg, size_t msglen) {
  *wctx = NULL;
#ifdef _OPENMP
  /* The kernels parallelize with OpenMP inside each request. N workers each
   * starting a team as wide as the machine oversubscribe the cores (measured
   * on 2 cores: a decode-size request took 163 us with 2 threads per worker,
   * 98 us with 1). Give each worker its share, unless OMP_NUM_THREADS says. */
  if (!getenv("OMP_NUM_THREADS")) {
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    long share = ncpu / (b->nworkers > 0 ? b->nworkers : 1);
    omp_set_num_threads(share > 0 ? (int)share : 1);
  }
#endif
  return 0;
}

static void cpu_worker_teardown(nsad_backend_t *b, int worker, void *wctx) {}

static int cpu_fwd(nsad_backend_t *b, void *wctx, const nsa_fwd_args_t *a,
                   const nsa_path_flags_t *flags, nsa_path_t force_path, const nsad_exec_t *ex,
                   nsa_run_info_t *info, char *msg, size_t msglen) {
  return nsa_cpu_sel_fwd(a, flags, force_path, info, msg, msglen);
}

static int cpu_bwd(nsad_backend_t *b, void *wctx, const nsa_bwd_args_t *a,
                   const nsa_path_flags_t *flags, nsa_path_t force_path, const nsad_exec_t *ex,
                   nsa_run_info_t *info, char *msg, size_t msglen) {
  return nsa_cpu_sel_bwd(a, flags, force_path, info, msg, msglen);
}

/* Runs the forward again on shadow_path into scratch o/lse and compares. */
static int cpu_shadow_fwd(nsad_backend_t *b, void *wctx, const nsa_fwd_args_t *a,
                          const nsa_path_flags_t *flags, nsa_path_t shadow_path,
                          nsad_shadow_t *out, char *msg, size_t msglen) {
  nsa_fwd_args_t s = *a;
  int64_t no = 1, nl = 1;
  for (int i = 0; i < a->o.ndim; i++) no *= a->o.shape[i];
  nsa_tensor_set_contiguous(&s.o);
  void *obuf = malloc((size_t)no * nsa_dtype_size(a->o.dtype) + 1);
  void *lbuf = NULL;
  if (a->lse.data) {
    for (int i = 0; i < a->lse.ndim; i++) nl *= a->lse.shape[i];
    nsa_tensor_set_contiguous(&s.lse);
    lbuf = malloc((size_t)nl * sizeof(float) + 1);
  }
  if (!obuf || (a->lse.data && !lbuf)) {
    free(obuf);
    free(lbuf);
    snprintf(msg, msglen, "shadow: out of memory");
    return NSA_ERR_INTERNAL;
  }
  s.o.data = obuf;
  s.lse.data = lbuf;
  nsa_run_info_t info;
  int rc = nsa_cpu_sel_fwd(&s, flags, shadow_path, &info, msg, msglen);
  if (rc == NSA_OK) {
    nsad_shadow_diff_t d;
    nsad_shadow_diff_init(&d);
    nsad_shadow_compare(&a->o, &s.o, &d);
    if (a->lse.data) nsad_shadow_compare(&a->lse, &s.lse, &d);
    out->shadow_path = info.path;
    out->max_abs = d.max_abs;
    out->max_rel = d.max_rel;
  }
  free(obuf);
  free(lbuf);
  return rc;
}

static int cpu_region_open(nsad_backend_t *b, const nsa_req_region_register_t *req,
                           uid_t peer_uid, nsad_region_t *r, nsa_proto_err_t *err) {
  if (req->kind != NSA_REGION_SHM)
    return nsa_proto_err_set(err, NSA_E_UNSUPPORTED,
                             "region kind cuda_ipc needs the cuda backend; this nsad runs the "
                             "cpu backend (use kind=shm)");
  r->kind = NSAD_ENTRY_SHM;
  return nsad_shm_open(req->name, req->size, peer_uid, r, err);
}

static void cpu_region_close(nsad_backend_t *b, nsad_region_t *r) { nsad_shm_close(r); }

static int cpu_region_check(nsad_backend_t *b, const nsad_region_t *r, nsa_proto_err_t *err) {
  return nsad_shm_check(r, err);
}

static int cpu_event_open(nsad_backend_t *b, const nsa_req_event_register_t *req,
                          nsad_region_t *ev, nsa_proto_err_t *err) {
  return nsa_proto_err_set(err, NSA_E_UNSUPPORTED,
                           "events need the cuda backend; the cpu backend runs every request "
                           "synchronously");
}

static void cpu_event_close(nsad_backend_t *b, nsad_region_t *ev) {}

const nsad_backend_ops_t nsad_backend_cpu_ops = {
    .name = "cpu",
    .init = cpu_init,
    .teardown = cpu_teardown,
    .worker_init = cpu_worker_init,
    .worker_teardown = cpu_worker_teardown,
    .fwd = cpu_fwd,
    .bwd = cpu_bwd,
    .shadow_fwd = cpu_shadow_fwd,
    .region_open = cpu_region_open,
    .region_close = cpu_region_close,
    .region_check = cpu_region_check,
    .event_open = cpu_event_open,
    .event_close = cpu_event_close,
};
