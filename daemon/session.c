/* session.c — connections: accept, read/decode, write, backpressure, close
 * (see session.h). Loop thread only. */
#define _GNU_SOURCE /* struct ucred (SO_PEERCRED) */
#include "session.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "dispatch.h"
#include "log.h"
#include "server.h"

/* Notifications are skipped while this much output is still unsent. */
#define NSAD_NOTIFY_BACKLOG (1u << 20)
/* A peer that sends requests but does not read its replies: stop reading
 * its socket while this much output is queued (resume below half). */
#define NSAD_WRITE_BACKLOG (16u << 20)
#define NSAD_READ_CHUNK (64u * 1024u)

static void session_maybe_free(nsad_session_t *s);
static void session_pump(nsad_session_t *s);

nsad_out_t *nsad_out_new(void) {
  nsad_out_t *o = calloc(1, sizeof *o);
  if (o) nsa_proto_writer_init(&o->w);
  return o;
}

void nsad_out_free(nsad_out_t *o) {
  if (!o) return;
  nsa_proto_writer_destroy(&o->w);
  free(o);
}

static void on_write(uv_write_t *req, int status) {
  nsad_out_t *o = req->data;
  nsad_session_t *s = o->s;
  nsad_out_free(o);
  if (status < 0 && status != UV_ECANCELED && s && !s->closing) {
    nsad_debug("session %llu: write failed: %s", (unsigned long long)s->id, uv_strerror(status));
    nsad_session_close(s, 0, "write failed");
    return;
  }
  if (s && s->write_paused && !s->closing &&
      uv_stream_get_write_queue_size((uv_stream_t *)&s->pipe) < NSAD_WRITE_BACKLOG / 2) {
    s->write_paused = 0;
    session_pump(s);
  }
}

void nsad_session_send(nsad_session_t *s, nsad_out_t *o) {
  if (!o) return;
  if (s->write_shut || uv_is_closing((uv_handle_t *)&s->pipe)) {
    nsad_out_free(o);
    return;
  }
  o->s = s;
  o->req.data = o;
  uv_buf_t buf = uv_buf_init(o->w.sbuf.data, (unsigned)o->w.sbuf.size);
  int rc = uv_write(&o->req, (uv_stream_t *)&s->pipe, &buf, 1, on_write);
  if (rc < 0) {
    nsad_out_free(o);
    nsad_session_close(s, 0, "write failed");
  }
}

void nsad_session_send_error(nsad_session_t *s, uint32_t msgid, nsa_proto_code_t code,
                             const char *message) {
  nsad_out_t *o = nsad_out_new();
  if (!o) return;
  nsa_proto_write_error(&o->w, msgid, code, message);
  nsad_session_send(s, o);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  nsad_session_t *s = h->data;
  size_t avail = 0;
  char *p = nsa_proto_decoder_buffer(s->dec, NSAD_READ_CHUNK, &avail);
  *buf = uv_buf_init(p, p ? (unsigned)(avail > NSAD_READ_CHUNK ? NSAD_READ_CHUNK : avail) : 0);
}

/* After EOF: 1 when the peer only shut its sending side (it still reads our
 * replies), 0 when it is gone. A Unix stream socket whose peer closed
 * reports POLLHUP (both directions shut); a half-close only POLLRDHUP. */
static int peer_half_closed(nsad_session_t *s) {
  uv_os_fd_t fd;
  if (uv_fileno((uv_handle_t *)&s->pipe, &fd) != 0) return 0;
  struct pollfd p = {.fd = fd, .events = POLLOUT};
  if (poll(&p, 1, 0) < 0) return 0;
  return !(p.revents & (POLLHUP | POLLERR));
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf) {
  nsad_session_t *s = st->data;
  if (nread > 0) {
    s->t_read = nsad_now(); /* start of the "decode" phase of what it completes */
    s->srv->last_activity = s->t_read;
    nsa_proto_decoder_commit(s->dec, (size_t)nread);
    session_pump(s);
  } else if (nread < 0) {
    if (nread == UV_ENOBUFS)
      nsad_warn("session %llu: out of memory for input", (unsigned long long)s->id);
    if (nread == UV_EOF && peer_half_closed(s)) {
      /* shutdown(SHUT_WR) by the peer ("that was my last request"): answer
       * what is in flight, then close. */
      s->eof = 1;
      nsad_session_stop_reading(s);
      if (s->inflight == 0) nsad_session_close(s, 1, "peer finished sending");
      return;
    }
    nsad_session_close(s, 0, nread == UV_EOF ? "peer closed" : uv_strerror((int)nread));
  }
}

static void start_reading(nsad_session_t *s) {
  if (s->reading || s->closing) return;
  if (uv_read_start((uv_stream_t *)&s->pipe, on_alloc, on_read) == 0) s->reading = 1;
}

void nsad_session_stop_reading(nsad_session_t *s) {
  if (!s->reading) return;
  uv_read_stop((uv_stream_t *)&s->pipe);
  s->reading = 0;
}

/* Decodes and dispatches every complete buffered message, as long as the
 * session is below its in-flight limit. */
static void session_pump(nsad_session_t *s) {
  nsad_server_t *srv = s->srv;
  while (!s->closing && !srv->shutting_down) {
    if (s->held) { /* resumed by nsad_session_unhold */
      nsad_session_stop_reading(s);
      return;
    }
    if (uv_stream_get_write_queue_size((uv_stream_t *)&s->pipe) > NSAD_WRITE_BACKLOG) {
      s->write_paused = 1;
      nsad_session_stop_reading(s);
      return;
    }
    if (s->inflight >= srv->cfg->max_inflight) {
      /* Backpressure: stop reading this socket until work drains, instead of
       * queueing without bound. */
      s->paused = 1;
      nsad_session_stop_reading(s);
      return;
    }
    nsa_proto_msg_t msg;
    nsa_proto_err_t err;
    int known = 0;
    uint32_t msgid = 0;
    int rc = nsa_proto_decoder_next(s->dec, &msg, &err, &known, &msgid);
    if (rc == 0) break;
    if (rc < 0) {
      nsad_warn("session %llu (pid %d): %s; closing the connection", (unsigned long long)s->id,
                (int)s->peer_pid, err.message);
      if (known) nsad_session_send_error(s, msgid, err.code, err.message);
      if (srv->metrics) nsad_metrics_request(srv->metrics, NSA_M_COUNT, -1, err.code, 0.0);
      nsad_session_close(s, 1, "protocol error");
      return;
    }
    if (msg.type != NSA_MSG_REQUEST) {
      nsad_debug("session %llu: ignoring a non-request message (type %d)",
                 (unsigned long long)s->id, (int)msg.type);
      continue;
    }
    nsad_dispatch(s, &msg);
  }
  if (!s->closing && !srv->shutting_down && !s->paused && !s->write_paused && !s->eof)
    start_reading(s);
}

void nsad_session_hold(nsad_session_t *s) { s->held = 1; }

void nsad_session_unhold(nsad_session_t *s) {
  s->held = 0;
  if (!s->closing && !s->paused) session_pump(s);
}

void nsad_session_job_queued(nsad_session_t *s) {
  s->inflight++;
  s->srv->inflight++;
}

void nsad_session_job_finished(nsad_session_t *s) {
  nsad_server_t *srv = s->srv; /* s may be freed below */
  s->inflight--;
  srv->inflight--;
  if (s->closing) {
    session_maybe_free(s); /* s may be gone after this */
  } else {
    if (s->paused && s->inflight < srv->cfg->max_inflight) {
      s->paused = 0;
      session_pump(s); /* buffered requests first, then read again */
    }
    /* close never frees synchronously, so s is still valid here */
    if (!s->closing && s->eof && s->inflight == 0)
      nsad_session_close(s, 1, "peer finished sending");
  }
  if (srv->shutting_down) nsad_server_check_drained(srv);
}

static void on_handle_closed(uv_handle_t *h) {
  nsad_session_t *s = h->data;
  s->handles_open--;
  session_maybe_free(s);
}

static void session_maybe_free(nsad_session_t *s) {
  if (s->handles_open > 0 || s->inflight > 0) return;
  nsad_server_t *srv = s->srv;
  if (s->prev)
    s->prev->next = s->next;
  else
    srv->sessions = s->next;
  if (s->next) s->next->prev = s->prev;
  srv->nsessions--;
  nsa_proto_decoder_free(s->dec);
  free(s);
  nsad_server_update_gauges(srv);
  if (srv->shutting_down) nsad_server_check_drained(srv);
}

static void on_shutdown_done(uv_shutdown_t *req, int status) {
  nsad_session_t *s = req->data;
  if (!uv_is_closing((uv_handle_t *)&s->pipe)) uv_close((uv_handle_t *)&s->pipe, on_handle_closed);
}

void nsad_session_close(nsad_session_t *s, int flush, const char *why) {
  if (s->closing) {
    /* A flushing close that is taking too long can be forced. */
    if (!flush && !uv_is_closing((uv_handle_t *)&s->pipe))
      uv_close((uv_handle_t *)&s->pipe, on_handle_closed);
    return;
  }
  s->closing = 1;
  nsad_debug("session %llu (client '%s', pid %d): closing: %s", (unsigned long long)s->id,
             s->client, (int)s->peer_pid, why);
  nsad_session_stop_reading(s);
  uv_timer_stop(&s->sub_timer);
  uv_close((uv_handle_t *)&s->sub_timer, on_handle_closed);
  /* Jobs not started yet are dropped; running ones finish (their replies are
   * discarded) and release their regions when they come back. */
  for (int q = 0; q < s->srv->jq.nqueues; q++) {
    nsad_job_t *j = nsad_jobq_cancel_lane(&s->srv->jq, &s->lanes[q]);
    while (j) {
      nsad_job_t *next = j->next;
      nsad_dispatch_job_free(s->srv, j);
      s->inflight--;
      s->srv->inflight--;
      j = next;
    }
  }
  nsad_registry_teardown(&s->reg, &s->srv->backend);
  if (flush && !s->write_shut) {
    s->write_shut = 1;
    s->shut_req.data = s;
    if (uv_shutdown(&s->shut_req, (uv_stream_t *)&s->pipe, on_shutdown_done) == 0) {
      nsad_server_update_gauges(s->srv);
      return;
    }
  }
  s->write_shut = 1;
  uv_close((uv_handle_t *)&s->pipe, on_handle_closed);
  nsad_server_update_gauges(s->srv);
}

static void on_hello_deadline(uv_timer_t *t) {
  nsad_session_t *s = t->data;
  if (s->hello_done || s->closing) return;
  nsad_warn("session %llu (uid %u pid %d): no hello within %d ms; closing",
            (unsigned long long)s->id, (unsigned)s->uid, (int)s->peer_pid,
            s->srv->cfg->hello_timeout_ms);
  nsad_session_close(s, 0, "hello timeout");
}

void nsad_session_hello_done(nsad_session_t *s) { uv_timer_stop(&s->sub_timer); }

int nsad_session_accept(nsad_server_t *srv) {
  nsad_session_t *s = calloc(1, sizeof *s);
  if (!s) return -1;
  s->srv = srv;
  s->id = ++srv->next_session_id;
  s->dec = nsa_proto_decoder_new(srv->cfg->max_message);
  if (!s->dec || uv_pipe_init(&srv->loop, &s->pipe, 0) != 0) {
    nsa_proto_decoder_free(s->dec);
    free(s);
    return -1;
  }
  s->pipe.data = s;
  uv_timer_init(&srv->loop, &s->sub_timer);
  s->sub_timer.data = s;
  s->handles_open = 2;
  nsad_registry_init(&s->reg);
  for (int q = 0; q < NSAD_MAX_DEVICES; q++) nsad_lane_init(&s->lanes[q], q);
  s->next = srv->sessions;
  if (srv->sessions) srv->sessions->prev = s;
  srv->sessions = s;
  srv->nsessions++;
  if (uv_accept((uv_stream_t *)&srv->listener, (uv_stream_t *)&s->pipe) != 0) {
    nsad_session_close(s, 0, "accept failed");
    return -1;
  }
  uv_os_fd_t fd;
  struct ucred cred;
  socklen_t len = sizeof cred;
  if (uv_fileno((uv_handle_t *)&s->pipe, &fd) == 0 &&
      getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0) {
    s->uid = cred.uid;
    s->gid = cred.gid;
    s->peer_pid = cred.pid;
  } else {
    /* Without credentials nobody can be authorized: treat as nobody. */
    s->uid = (uid_t)65534;
    s->gid = (gid_t)65534;
    s->peer_pid = -1;
  }
  nsad_debug("session %llu: connected (uid %u gid %u pid %d)", (unsigned long long)s->id,
             (unsigned)s->uid, (unsigned)s->gid, (int)s->peer_pid);
  int live = 0;
  /* Connections already refused (waiting to be told busy) hold no slot. */
  for (nsad_session_t *o = srv->sessions; o; o = o->next) live += !o->closing && !o->over_limit;
  if (live > srv->cfg->max_sessions) {
    /* Answer its first request with busy (a clear message beats a silent
     * close), then close. */
    s->over_limit = 1;
    nsad_warn("session %llu (uid %u pid %d): over the session limit (%d)",
              (unsigned long long)s->id, (unsigned)s->uid, (int)s->peer_pid,
              srv->cfg->max_sessions);
  }
  /* A connection that never says hello must not hold a slot forever. */
  uv_timer_start(&s->sub_timer, on_hello_deadline, (uint64_t)srv->cfg->hello_timeout_ms, 0);
  start_reading(s);
  nsad_server_update_gauges(srv);
  return 0;
}

static void on_sub_tick(uv_timer_t *t) {
  nsad_session_t *s = t->data;
  if (s->closing || s->write_shut || !s->srv->metrics) return;
  if (uv_stream_get_write_queue_size((uv_stream_t *)&s->pipe) > NSAD_NOTIFY_BACKLOG) return;
  nsad_out_t *o = nsad_out_new();
  if (!o) return;
  nsad_server_update_gauges(s->srv);
  nsa_proto_write_notification_begin(&o->w, "metrics");
  nsad_metrics_pack_map(s->srv->metrics, &o->w.pk);
  nsad_session_send(s, o);
}

int nsad_session_subscribe(nsad_session_t *s, uint32_t interval_ms) {
  uv_timer_stop(&s->sub_timer);
  s->sub_interval_ms = (int)interval_ms;
  if (interval_ms == 0) return 0;
  return uv_timer_start(&s->sub_timer, on_sub_tick, interval_ms, interval_ms);
}
