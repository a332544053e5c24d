/* worker.c — worker threads: pop a job, run it on the backend, hand it back
 * to the loop (nsad_jobq_complete → uv_async_send). Workers never touch
 * libuv handles, sessions or regions' refcounts. */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "jobq.h"
#include "log.h"
#include "shadow.h"

struct nsad_worker_arg {
  nsad_workers_t *w;
  int index;
  int queue;
};

/* Monotonic seconds, the same formula as nsad_now() (server.c), so that the
 * worker's phase stamps and the loop's are one timeline. */
static double mono_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void run_job(nsad_backend_t *b, void *wctx, nsad_job_t *job) {
  const nsa_path_flags_t *pf = &job->flags.path;
  memset(&job->info, 0, sizeof job->info);
  job->info.path = NSA_PATH_AUTO;
  job->msg[0] = 0;
  job->t_call0 = mono_s();
  if (job->kind == NSAD_JOB_FWD)
    job->status = b->ops->fwd(b, wctx, &job->fwd, pf, NSA_PATH_AUTO, &job->ex, &job->info,
                              job->msg, sizeof job->msg);
  else
    job->status = b->ops->bwd(b, wctx, &job->bwd, pf, NSA_PATH_AUTO, &job->ex, &job->info,
                              job->msg, sizeof job->msg);
  job->t_call1 = mono_s();
  if (job->info.device_us <= 0) job->info.device_us = (job->t_call1 - job->t_call0) * 1e6;
  /* NSA_SEL_SHADOW_RATE: a fraction of forwards also run on a second path
   * into backend scratch memory; the client keeps the primary's result.
   * Only for sync requests: with sync=false the client owns its buffers again
   * once done_event fires, so a later comparison would race with it (the CPU
   * backend always runs synchronously, so it shadows every sampled request). */
  int sync_done = job->ex.sync || !strcmp(b->ops->name, "cpu");
  if (job->status == NSA_OK && job->kind == NSAD_JOB_FWD && job->flags.shadow_rate > 0 &&
      sync_done && b->ops->shadow_fwd) {
    static atomic_uint_fast64_t seq;
    nsa_path_t sp = nsad_shadow_choose(job->flags.shadow_rate, job->info.path,
                                       (uint64_t)atomic_fetch_add(&seq, 1));
    if (sp != NSA_PATH_AUTO) {
      char m[256];
      if (b->ops->shadow_fwd(b, wctx, &job->fwd, pf, sp, &job->shadow, m, sizeof m) == NSA_OK)
        job->shadow_done = 1;
      else
        nsad_warn("shadow run on %s failed: %s", nsa_path_name(sp), m);
    }
  }
}

static void *worker_main(void *p) {
  struct nsad_worker_arg *a = p;
  nsad_workers_t *w = a->w;
  nsad_backend_t *b = w->backend;
  void *wctx = NULL;
  char msg[256] = "";
  int ok = b->ops->worker_init ? b->ops->worker_init(b, a->index, &wctx, msg, sizeof msg) == 0 : 1;
  if (!ok) nsad_err("worker %d: init failed: %s", a->index, msg);
  nsad_job_t *job;
  while ((job = nsad_jobq_pop(w->jq, a->queue)) != NULL) {
    job->t_picked = mono_s();
    if (ok) {
      run_job(b, wctx, job);
    } else {
      job->status = NSA_ERR_DEVICE_FATAL;
      snprintf(job->msg, sizeof job->msg, "worker %d failed to start: %.200s", a->index, msg);
      job->t_call0 = job->t_call1 = job->t_picked;
    }
    job->t_posted = mono_s();
    nsad_jobq_complete(w->jq, job);
  }
  if (ok && b->ops->worker_teardown) b->ops->worker_teardown(b, a->index, wctx);
  return NULL;
}

int nsad_workers_start(nsad_workers_t *w, nsad_backend_t *b, nsad_jobq_t *jq, char *msg,
                       size_t msglen) {
  memset(w, 0, sizeof *w);
  w->backend = b;
  w->jq = jq;
  w->n = b->nworkers;
  w->threads = calloc((size_t)w->n, sizeof *w->threads);
  w->args = calloc((size_t)w->n, sizeof *w->args);
  if (!w->threads || !w->args) {
    snprintf(msg, msglen, "out of memory");
    free(w->threads);
    free(w->args);
    return -1;
  }
  for (int i = 0; i < w->n; i++) {
    w->args[i].w = w;
    w->args[i].index = i;
    w->args[i].queue = i % b->nqueues;
    if (pthread_create(&w->threads[i], NULL, worker_main, &w->args[i]) != 0) {
      snprintf(msg, msglen, "pthread_create failed for worker %d", i);
      w->n = i;
      nsad_workers_stop(w);
      return -1;
    }
    w->started++;
  }
  return 0;
}

void nsad_workers_stop(nsad_workers_t *w) {
  if (!w->jq) return;
  nsad_jobq_stop(w->jq);
  for (int i = 0; i < w->started; i++) pthread_join(w->threads[i], NULL);
  free(w->threads);
  free(w->args);
  w->threads = NULL;
  w->args = NULL;
  w->started = 0;
  w->jq = NULL;
}
