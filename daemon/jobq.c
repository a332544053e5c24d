/* jobq.c — fair job queue and completion list (see jobq.h). */
#include "jobq.h"

#include <string.h>
#include <time.h>

static double mono_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int nsad_jobq_init(nsad_jobq_t *jq, int nqueues, uv_async_t *done_async) {
  memset(jq, 0, sizeof *jq);
  if (nqueues < 1 || nqueues > NSAD_MAX_DEVICES) return -1;
  jq->nqueues = nqueues;
  jq->done_async = done_async;
  atomic_init(&jq->stopping, 0);
  for (int q = 0; q < NSAD_MAX_DEVICES; q++) atomic_init(&jq->avail[q], 0);
  if (pthread_mutex_init(&jq->mu, NULL)) return -1;
  for (int q = 0; q < nqueues; q++)
    if (pthread_cond_init(&jq->q[q].cv, NULL)) {
      while (q-- > 0) pthread_cond_destroy(&jq->q[q].cv);
      pthread_mutex_destroy(&jq->mu);
      return -1;
    }
  return 0;
}

void nsad_jobq_teardown(nsad_jobq_t *jq) {
  for (int q = 0; q < jq->nqueues; q++) pthread_cond_destroy(&jq->q[q].cv);
  pthread_mutex_destroy(&jq->mu);
}

void nsad_lane_init(nsad_lane_t *lane, int queue) {
  memset(lane, 0, sizeof *lane);
  lane->queue = queue;
}

static void activate(nsad_jobq_t *jq, nsad_lane_t *lane) {
  if (lane->active) return;
  lane->active = 1;
  lane->next_active = NULL;
  if (jq->q[lane->queue].tail)
    jq->q[lane->queue].tail->next_active = lane;
  else
    jq->q[lane->queue].head = lane;
  jq->q[lane->queue].tail = lane;
}

static void deactivate(nsad_jobq_t *jq, nsad_lane_t *lane) {
  if (!lane->active) return;
  nsad_lane_t **pp = &jq->q[lane->queue].head, *prev = NULL;
  while (*pp && *pp != lane) {
    prev = *pp;
    pp = &(*pp)->next_active;
  }
  if (*pp) {
    *pp = lane->next_active;
    if (jq->q[lane->queue].tail == lane) jq->q[lane->queue].tail = prev;
  }
  lane->active = 0;
  lane->next_active = NULL;
}

void nsad_jobq_push(nsad_jobq_t *jq, nsad_job_t *job) {
  nsad_lane_t *lane = job->lane;
  job->next = NULL;
  pthread_mutex_lock(&jq->mu);
  if (lane->tail)
    lane->tail->next = job;
  else
    lane->head = job;
  lane->tail = job;
  activate(jq, lane);
  jq->depth++;
  atomic_fetch_add(&jq->avail[lane->queue], 1);
  pthread_cond_signal(&jq->q[lane->queue].cv); /* one job: one worker of its queue */
  pthread_mutex_unlock(&jq->mu);
}

nsad_job_t *nsad_jobq_cancel_lane(nsad_jobq_t *jq, nsad_lane_t *lane) {
  pthread_mutex_lock(&jq->mu);
  nsad_job_t *list = lane->head;
  for (nsad_job_t *j = list; j; j = j->next) {
    jq->depth--;
    atomic_fetch_sub(&jq->avail[lane->queue], 1);
  }
  lane->head = lane->tail = NULL;
  deactivate(jq, lane);
  pthread_mutex_unlock(&jq->mu);
  return list;
}

int64_t nsad_jobq_depth(nsad_jobq_t *jq) {
  pthread_mutex_lock(&jq->mu);
  int64_t d = jq->depth;
  pthread_mutex_unlock(&jq->mu);
  return d;
}

nsad_job_t *nsad_jobq_pop(nsad_jobq_t *jq, int queue) {
  if (jq->spin_s > 0) {
    /* Poll (without the mutex) until a job is queued, stop, or the window
     * ends; then take it the normal way below. */
    double end = mono_s() + jq->spin_s;
    unsigned n = 0;
    while (atomic_load_explicit(&jq->avail[queue], memory_order_acquire) == 0 &&
           !atomic_load_explicit(&jq->stopping, memory_order_relaxed)) {
      if ((++n & 255) == 0 && mono_s() > end) break;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
  }
  pthread_mutex_lock(&jq->mu);
  for (;;) {
    nsad_lane_t *lane = jq->q[queue].head;
    if (lane) {
      nsad_job_t *job = lane->head;
      lane->head = job->next;
      if (!lane->head) lane->tail = NULL;
      job->next = NULL;
      /* Round-robin: this lane goes to the back (or leaves if empty). */
      deactivate(jq, lane);
      if (lane->head) activate(jq, lane);
      jq->depth--;
      atomic_fetch_sub(&jq->avail[queue], 1);
      pthread_mutex_unlock(&jq->mu);
      return job;
    }
    if (jq->stopping) break;
    pthread_cond_wait(&jq->q[queue].cv, &jq->mu);
  }
  pthread_mutex_unlock(&jq->mu);
  return NULL;
}

void nsad_jobq_complete(nsad_jobq_t *jq, nsad_job_t *job) {
  job->next = NULL;
  pthread_mutex_lock(&jq->mu);
  if (jq->done_tail)
    jq->done_tail->next = job;
  else
    jq->done_head = job;
  jq->done_tail = job;
  pthread_mutex_unlock(&jq->mu);
  uv_async_send(jq->done_async);
}

nsad_job_t *nsad_jobq_take_done(nsad_jobq_t *jq) {
  pthread_mutex_lock(&jq->mu);
  nsad_job_t *list = jq->done_head;
  jq->done_head = jq->done_tail = NULL;
  pthread_mutex_unlock(&jq->mu);
  return list;
}

void nsad_jobq_stop(nsad_jobq_t *jq) {
  pthread_mutex_lock(&jq->mu);
  atomic_store(&jq->stopping, 1);
  for (int q = 0; q < jq->nqueues; q++) pthread_cond_broadcast(&jq->q[q].cv);
  pthread_mutex_unlock(&jq->mu);
}
