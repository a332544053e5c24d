/*
 * server.h — the nsad server: one libuv loop thread owning the listening
 * socket, every session, signal handlers and the completion async; worker
 * threads run jobs (jobq.h). Only the loop thread touches libuv handles.
 *
 * Shutdown (SIGTERM, SIGINT, `shutdown`): stop accepting and reading, let
 * in-flight jobs finish and their replies go out, shut every connection down
 * (pending writes flushed; force-closed after a grace period), join workers,
 * close every handle; uv_run returns and uv_loop_close must return 0.
 */
#ifndef NSAD_SERVER_H
#define NSAD_SERVER_H

#include <stdint.h>
#include <sys/types.h>
#include <uv.h>

#include "backend.h"
#include "config.h"
#include "flags.h"
#include "jobq.h"
#include "metrics.h"

#define NSAD_VERSION "0.1.0"

struct nsad_session;

typedef struct nsad_server {
  uv_loop_t loop;
  uv_pipe_t listener;
  uv_async_t done_async;
  uv_signal_t sig_term, sig_int, sig_hup;
  uv_timer_t grace_timer; /* shutdown: force-close connections that do not flush */
  int listening, loop_ready;
  nsad_config_t *cfg;
  nsad_backend_t backend;
  int backend_ready;
  nsad_jobq_t jq;
  int jq_ready;
  nsad_workers_t workers;
  nsad_flags_t *flags;
  nsad_metrics_t *metrics;
  void *metrics_http; /* ops: metrics_http.h server, when --metrics-listen */
  struct nsad_session *sessions; /* every session not yet freed */
  int nsessions;
  int64_t inflight; /* jobs queued or running, all sessions */
  uint64_t next_session_id;
  int shutting_down; /* stop accepting/reading; waiting for in-flight work */
  int closing_all;   /* connections being shut down */
  int exit_code;
  char socket_path[108];
  int own_socket_file; /* unlink it at exit (not when inherited from systemd) */
  /* NSAD_SPIN_US (0 = off): busy-poll window after activity, loop thread
   * and workers (docs/DAEMON.md, "Forward overhead on the CUDA backend") */
  double spin_s;
  double last_activity; /* loop thread: last socket read or job completion */
  /* SIGHUP: the flag layer of a reload runs on libuv's thread pool, one at
   * a time (server.c); a SIGHUP meanwhile sets reload_again. */
  uv_work_t reload_req;
  int reload_busy, reload_again, reload_rc;
  char reload_msg[512];
} nsad_server_t;

/* Sets everything up (backend, flags, metrics, workers, listening socket).
 * Returns 0, or -1 with msg (everything set up so far is torn down again by
 * nsad_server_teardown, which is always safe to call). */
int nsad_server_init(nsad_server_t *srv, nsad_config_t *cfg, char *msg, size_t msglen);
/* Runs the loop until shutdown completed; returns the process exit code. */
int nsad_server_run(nsad_server_t *srv);
void nsad_server_teardown(nsad_server_t *srv);

void nsad_server_begin_shutdown(nsad_server_t *srv, const char *why, int exit_code);
/* Called whenever in-flight work or sessions went away during shutdown. */
void nsad_server_check_drained(nsad_server_t *srv);
/* Re-reads the config file (SIGHUP). */
void nsad_server_reload(nsad_server_t *srv);
/* Pushes current gauges (sessions, regions, bytes, queue depth, epoch). */
void nsad_server_update_gauges(nsad_server_t *srv);

double nsad_now(void); /* monotonic seconds */

#endif
