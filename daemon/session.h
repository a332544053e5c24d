/*
 * session.h — one client connection: framing (read → decoder → dispatch),
 * replies, in-flight accounting with backpressure, its regions and lanes.
 *
 * A session is freed only when its pipe and timer handles are closed AND no
 * job of it is queued or running, so a worker never runs on freed state and
 * regions are unmapped only after the work that reads them has ended.
 */
#ifndef NSAD_SESSION_H
#define NSAD_SESSION_H

#include <stdint.h>
#include <sys/types.h>
#include <uv.h>

#include "jobq.h"
#include "nsa_proto.h"
#include "region.h"

struct nsad_server;

/* An outgoing message: a writer plus the libuv write request. */
typedef struct {
  uv_write_t req;
  nsa_proto_writer_t w;
  struct nsad_session *s;
} nsad_out_t;

typedef struct nsad_session {
  uv_pipe_t pipe;
  uv_timer_t sub_timer; /* hello deadline until hello, then metrics.subscribe */
  struct nsad_server *srv;
  struct nsad_session *prev, *next;
  uint64_t id;
  nsa_proto_decoder_t *dec;
  /* hello */
  int hello_done;
  char client[128];
  int64_t pid;
  int nlabels;
  nsa_proto_label_t labels[NSA_PROTO_MAX_LABELS];
  /* SO_PEERCRED */
  uid_t uid;
  gid_t gid;
  pid_t peer_pid;
  nsad_registry_t reg;
  nsad_lane_t lanes[NSAD_MAX_DEVICES];
  int inflight;
  int paused;      /* reading stopped by the in-flight limit */
  int held;        /* dispatch held: a flags change of this session is being persisted */
  int write_paused; /* reading stopped: too many unsent replies */
  int eof;          /* the peer shut its sending side; close once answered */
  int over_limit;   /* accepted beyond NSAD_MAX_SESSIONS: answered busy, closed */
  int reading;     /* uv_read_start active */
  int closing;     /* no more requests; handles closing */
  int write_shut;  /* uv_shutdown issued: no more writes */
  int handles_open;
  int sub_interval_ms;
  double t_read; /* monotonic seconds of the last socket read (request phases) */
  uv_shutdown_t shut_req;
} nsad_session_t;

/* Accepts a pending connection from the listener; 0 or -1. */
int nsad_session_accept(struct nsad_server *srv);

nsad_out_t *nsad_out_new(void);
void nsad_out_free(nsad_out_t *o);
/* Queues o for writing (takes ownership; dropped if the session is closing). */
void nsad_session_send(nsad_session_t *s, nsad_out_t *o);
void nsad_session_send_error(nsad_session_t *s, uint32_t msgid, nsa_proto_code_t code,
                             const char *message);

/* Closes the session. flush = let queued replies go out first (uv_shutdown). */
void nsad_session_close(nsad_session_t *s, int flush, const char *why);
/* Stops reading (server shutdown) without closing. */
void nsad_session_stop_reading(nsad_session_t *s);

/* Holds / resumes dispatching this session's requests (a flags change runs
 * off the loop; later requests must see it). Loop thread. */
void nsad_session_hold(nsad_session_t *s);
void nsad_session_unhold(nsad_session_t *s);

/* A job of this session was queued / finished (loop thread). */
void nsad_session_job_queued(nsad_session_t *s);
void nsad_session_job_finished(nsad_session_t *s);

/* hello succeeded: stops the hello deadline. */
void nsad_session_hello_done(nsad_session_t *s);
/* Starts/stops the metrics subscription timer. */
int nsad_session_subscribe(nsad_session_t *s, uint32_t interval_ms);

#endif
