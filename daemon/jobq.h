/*
 * jobq.h — the work queue between the loop thread and the worker threads.
 *
 * One queue per device (the CPU backend has one). Inside a queue, each
 * session has a lane (FIFO of its jobs); workers take the head job of the
 * first active lane and move that lane to the back, so sessions with pending
 * work are served round-robin and one busy client cannot starve the others.
 *
 * Finished jobs go on a done list and wake the loop with uv_async_send — the
 * only cross-thread wake-up. Jobs themselves (sessions, regions, replies) are
 * touched by the loop thread except for the fields a worker fills (result).
 */
#ifndef NSAD_JOBQ_H
#define NSAD_JOBQ_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <uv.h>

#include "backend.h"
#include "flags.h"
#include "nsa/sel_attn.h"

struct nsad_session;
struct nsad_lane;

#define NSAD_JOB_MAX_REFS 12

typedef enum { NSAD_JOB_FWD = 0, NSAD_JOB_BWD = 1 } nsad_job_kind_t;

typedef struct nsad_job {
  struct nsad_job *next;
  struct nsad_lane *lane;
  struct nsad_session *session; /* loop thread only */
  nsad_job_kind_t kind;
  int queue;
  uint32_t msgid;
  double t_recv; /* monotonic seconds when dispatch started on the request */
  /* Per-phase timeline (CLOCK_MONOTONIC seconds, metrics.h nsad_phase_t):
   * loop thread: t_read (its bytes were read), t_parsed, t_queued, then
   * t_loop (completion picked up) and t_reply (uv_write issued); worker:
   * t_picked, t_call0/t_call1 (around the backend call), t_posted. The
   * worker's fields are published to the loop by the job queue's mutex. */
  double t_read, t_parsed, t_queued, t_picked, t_call0, t_call1, t_posted, t_loop, t_reply;
  nsa_fwd_args_t fwd;
  nsa_bwd_args_t bwd;
  nsad_exec_t ex;
  nsad_flag_snapshot_t flags; /* the one snapshot this request is served with */
  nsad_region_t *refs[NSAD_JOB_MAX_REFS];
  int nrefs;
  /* Result, written by the worker. */
  int status;
  nsa_run_info_t info;
  int shadow_done;
  nsad_shadow_t shadow;
  char msg[256];
} nsad_job_t;

typedef struct nsad_lane {
  nsad_job_t *head, *tail;
  struct nsad_lane *next_active;
  int active;
  int queue;
} nsad_lane_t;

typedef struct {
  pthread_mutex_t mu;
  int nqueues;
  struct {
    nsad_lane_t *head, *tail; /* active lanes, round-robin order */
    pthread_cond_t cv;        /* this queue's workers wait here */
  } q[NSAD_MAX_DEVICES];
  atomic_int stopping;
  int64_t depth; /* queued, not yet started */
  nsad_job_t *done_head, *done_tail;
  uv_async_t *done_async;
  /* NSAD_SPIN_US (server.c; 0 = off): after each job a worker polls its
   * queue for this long before it sleeps on the condition variable, so a
   * request arriving within the window starts without a thread wake-up
   * (tens to hundreds of us on an idle core; docs/DAEMON.md). `avail`
   * mirrors the number of queued jobs per queue for that lock-free poll. */
  double spin_s;
  atomic_int avail[NSAD_MAX_DEVICES];
} nsad_jobq_t;

int nsad_jobq_init(nsad_jobq_t *jq, int nqueues, uv_async_t *done_async);
void nsad_jobq_teardown(nsad_jobq_t *jq);

void nsad_lane_init(nsad_lane_t *lane, int queue);

/* Loop thread: queue a job on its lane (job->lane, job->queue set). */
void nsad_jobq_push(nsad_jobq_t *jq, nsad_job_t *job);
/* Loop thread: unlink every not-yet-started job of the lane; returns them as
 * a list (the caller fails/frees them). */
nsad_job_t *nsad_jobq_cancel_lane(nsad_jobq_t *jq, nsad_lane_t *lane);
int64_t nsad_jobq_depth(nsad_jobq_t *jq);

/* Worker: next job of `queue` (blocks); NULL once stopping and drained. */
nsad_job_t *nsad_jobq_pop(nsad_jobq_t *jq, int queue);
/* Worker: hand a finished job back to the loop. */
void nsad_jobq_complete(nsad_jobq_t *jq, nsad_job_t *job);

/* Loop thread: take the whole done list (FIFO order). */
nsad_job_t *nsad_jobq_take_done(nsad_jobq_t *jq);
/* Wake every worker and let pop() return NULL once the queues are empty. */
void nsad_jobq_stop(nsad_jobq_t *jq);

/* Worker threads (worker.c). */
typedef struct {
  nsad_backend_t *backend;
  nsad_jobq_t *jq;
  int n;
  pthread_t *threads;
  struct nsad_worker_arg *args;
  int started;
} nsad_workers_t;

int nsad_workers_start(nsad_workers_t *w, nsad_backend_t *b, nsad_jobq_t *jq, char *msg,
                       size_t msglen);
/* Stops the queue and joins every worker. */
void nsad_workers_stop(nsad_workers_t *w);

#endif
