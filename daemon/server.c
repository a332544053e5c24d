/* server.c — listening socket, signals, completions, shutdown and reload
 * (see server.h). Loop thread only, except where noted. */
#include "server.h"

#include <errno.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "dispatch.h"
#include "log.h"
#include "metrics_http.h"
#include "sd.h"
#include "session.h"

#define NSAD_SHUTDOWN_GRACE_MS 3000

double nsad_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void nsad_server_update_gauges(nsad_server_t *srv) {
  if (!srv->metrics) return;
  int live = 0;
  for (nsad_session_t *s = srv->sessions; s; s = s->next)
    if (!s->closing) live++;
  nsad_metrics_gauge_set(srv->metrics, NSAD_G_SESSIONS, live);
  nsad_metrics_gauge_set(srv->metrics, NSAD_G_REGIONS, (double)nsad_region_live_count);
  nsad_metrics_gauge_set(srv->metrics, NSAD_G_MAPPED_BYTES, (double)nsad_region_live_bytes);
  if (srv->jq_ready)
    nsad_metrics_gauge_set(srv->metrics, NSAD_G_QUEUE_DEPTH, (double)nsad_jobq_depth(&srv->jq));
}

/* ------------------------------------------------------------ callbacks --- */

static void on_done(uv_async_t *a) {
  nsad_server_t *srv = a->data;
  srv->last_activity = nsad_now();
  nsad_job_t *j = nsad_jobq_take_done(&srv->jq);
  while (j) {
    nsad_job_t *next = j->next;
    nsad_dispatch_job_done(srv, j);
    j = next;
  }
  nsad_server_update_gauges(srv);
}

static void on_connection(uv_stream_t *l, int status) {
  nsad_server_t *srv = l->data;
  if (status < 0) {
    nsad_warn("accept: %s", uv_strerror(status));
    return;
  }
  if (srv->shutting_down) return;
  if (nsad_session_accept(srv) != 0) nsad_warn("could not accept a connection");
}

static void on_signal(uv_signal_t *h, int signum) {
  nsad_server_t *srv = h->data;
  if (signum == SIGHUP) {
    nsad_server_reload(srv);
    return;
  }
  nsad_server_begin_shutdown(srv, signum == SIGTERM ? "SIGTERM" : "SIGINT", 0);
}

static uv_timer_t g_watchdog; /* systemd WatchdogSec pings */
static int g_watchdog_on;

static void on_watchdog(uv_timer_t *t) { nsad_sd_watchdog_ping(); }

static void close_if_open(uv_handle_t *h) {
  if (h->loop && !uv_is_closing(h)) uv_close(h, NULL);
}

static void on_grace(uv_timer_t *t) {
  nsad_server_t *srv = t->data;
  if (srv->nsessions > 0)
    nsad_warn("shutdown: %d connection(s) did not flush in %d ms; closing them", srv->nsessions,
              NSAD_SHUTDOWN_GRACE_MS);
  for (nsad_session_t *s = srv->sessions; s; s = s->next) nsad_session_close(s, 0, "grace expired");
  close_if_open((uv_handle_t *)t);
}

/* ------------------------------------------------------------- shutdown --- */

void nsad_server_begin_shutdown(nsad_server_t *srv, const char *why, int exit_code) {
  if (srv->shutting_down) {
    if (exit_code && !srv->exit_code) srv->exit_code = exit_code;
    nsad_info("shutdown already in progress (%s)", why);
    return;
  }
  srv->shutting_down = 1;
  srv->exit_code = exit_code;
  nsad_info("shutting down (%s): %lld job(s) in flight, %d connection(s)", why,
            (long long)srv->inflight, srv->nsessions);
  nsad_sd_notify_stopping();
  if (srv->listening) {
    uv_close((uv_handle_t *)&srv->listener, NULL);
    srv->listening = 0;
    if (srv->own_socket_file) unlink(srv->socket_path);
    srv->own_socket_file = 0;
  }
  for (nsad_session_t *s = srv->sessions; s; s = s->next) {
    nsad_session_stop_reading(s);
    uv_timer_stop(&s->sub_timer);
  }
  nsad_server_check_drained(srv);
}

void nsad_server_check_drained(nsad_server_t *srv) {
  if (!srv->shutting_down) return;
  if (!srv->closing_all) {
    if (srv->inflight > 0) return;
    /* Every job came back and its reply is queued: shut connections down
     * (flushing replies), stop workers, close the loop's own handles. */
    srv->closing_all = 1;
    nsad_workers_stop(&srv->workers);
    nsad_session_t *s = srv->sessions;
    while (s) {
      nsad_session_t *next = s->next; /* close never frees synchronously */
      nsad_session_close(s, 1, "server shutdown");
      s = next;
    }
    close_if_open((uv_handle_t *)&srv->done_async);
    close_if_open((uv_handle_t *)&srv->sig_term);
    close_if_open((uv_handle_t *)&srv->sig_int);
    close_if_open((uv_handle_t *)&srv->sig_hup);
    if (g_watchdog_on) close_if_open((uv_handle_t *)&g_watchdog);
    if (srv->nsessions > 0) {
      uv_timer_start(&srv->grace_timer, on_grace, NSAD_SHUTDOWN_GRACE_MS, 0);
      return;
    }
  }
  if (srv->nsessions == 0) close_if_open((uv_handle_t *)&srv->grace_timer);
}

/* --------------------------------------------------------------- reload --- */

/* The flag layer of a reload, on libuv's thread pool: re-reading the NSA_*
 * lines and persisting a changed config layer (write, fsync, rename, fsync
 * dir) may wait on the disk, and the loop thread serves every client
 * (flags.set takes the same road, dispatch.c). The flag store serialises
 * its writers itself; cfg->config_file is set once, from the command line. */
static void reload_work(uv_work_t *w) {
  nsad_server_t *srv = w->data;
  srv->reload_rc = nsad_flags_load_config(srv->flags, srv->cfg->config_file, NULL, srv->reload_msg,
                                          sizeof srv->reload_msg);
}

static void reload_done(uv_work_t *w, int status) {
  nsad_server_t *srv = w->data;
  if (status != 0 || srv->reload_rc != 0)
    nsad_err("reload: flags: %s; keeping the previous flag config",
             status ? uv_strerror(status) : srv->reload_msg);
  srv->reload_busy = 0;
  if (srv->shutting_down) return;
  nsad_sd_notify_ready();
  if (srv->reload_again) {
    srv->reload_again = 0;
    nsad_server_reload(srv);
  }
}

void nsad_server_reload(nsad_server_t *srv) {
  if (srv->reload_busy) { /* one at a time; the file is read again afterwards */
    srv->reload_again = 1;
    return;
  }
  char msg[512];
  nsad_sd_notify_reloading();
  nsad_info("SIGHUP: reloading %s", srv->cfg->config_file ? srv->cfg->config_file : "(no config file)");
  if (nsad_config_load_file(srv->cfg, msg, sizeof msg) != 0) {
    nsad_err("reload: %s; keeping the previous settings", msg);
    nsad_sd_notify_ready();
    return;
  }
  nsad_log_set_level(srv->cfg->log_level);
  srv->reload_busy = 1;
  srv->reload_req.data = srv;
  if (uv_queue_work(&srv->loop, &srv->reload_req, reload_work, reload_done) != 0) {
    reload_work(&srv->reload_req); /* no thread pool: here, as before */
    reload_done(&srv->reload_req, 0);
  }
}

/* ------------------------------------------------------------ listening --- */

/* 1: a process accepts connections on path; 0: nobody (stale file); -1 error. */
static int socket_is_live(const char *path, char *msg, size_t msglen) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    snprintf(msg, msglen, "socket: %s", strerror(errno));
    return -1;
  }
  struct sockaddr_un sa;
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
  int rc = connect(fd, (struct sockaddr *)&sa, sizeof sa);
  int e = errno;
  close(fd);
  if (rc == 0 || e == EAGAIN) return 1;
  if (e == ECONNREFUSED || e == ENOENT) return 0;
  snprintf(msg, msglen, "cannot probe existing socket %s: %s", path, strerror(e));
  return -1;
}

static int start_listening(nsad_server_t *srv, char *msg, size_t msglen) {
  const char *path = srv->cfg->socket_path;
  int rc = uv_pipe_init(&srv->loop, &srv->listener, 0);
  if (rc) {
    snprintf(msg, msglen, "uv_pipe_init: %s", uv_strerror(rc));
    return -1;
  }
  srv->listener.data = srv;
  srv->listening = 1; /* the handle is initialized: closed at shutdown/teardown */
  /* ops: systemd socket activation (nsad.socket) hands us a listening fd. */
  int fd = nsad_sd_listen_fd(msg, msglen);
  if (fd <= -2) return -1;
  if (fd >= 0) {
    if ((rc = uv_pipe_open(&srv->listener, fd)) != 0) {
      snprintf(msg, msglen, "cannot adopt the socket from systemd: %s", uv_strerror(rc));
      return -1;
    }
    char name[108];
    size_t len = sizeof name;
    if (uv_pipe_getsockname(&srv->listener, name, &len) == 0 && len < sizeof name) {
      name[len] = 0;
      snprintf(srv->socket_path, sizeof srv->socket_path, "%s", name);
    }
    nsad_info("using the socket passed by systemd (%s)", srv->socket_path);
  } else {
    if (strlen(path) >= sizeof srv->socket_path) {
      snprintf(msg, msglen, "socket path too long (max %zu bytes): %s",
               sizeof srv->socket_path - 1, path);
      return -1;
    }
    snprintf(srv->socket_path, sizeof srv->socket_path, "%s", path);
    struct stat st;
    if (lstat(path, &st) == 0) {
      if (!S_ISSOCK(st.st_mode)) {
        snprintf(msg, msglen, "%s exists and is not a socket; refusing to replace it", path);
        return -1;
      }
      int live = socket_is_live(path, msg, msglen);
      if (live < 0) return -1;
      if (live) {
        snprintf(msg, msglen,
                 "another nsad is already serving %s; stop it first or use another --socket",
                 path);
        return -1;
      }
      nsad_info("replacing stale socket file %s", path);
      if (unlink(path) != 0 && errno != ENOENT) {
        snprintf(msg, msglen, "cannot remove stale socket %s: %s", path, strerror(errno));
        return -1;
      }
    } else {
      /* /run/nsad may not exist outside systemd (RuntimeDirectory=). */
      char dir[108];
      snprintf(dir, sizeof dir, "%s", path);
      char *d = dirname(dir);
      if (access(d, F_OK) != 0) (void)mkdir(d, 0755);
    }
    if ((rc = uv_pipe_bind(&srv->listener, path)) != 0) {
      snprintf(msg, msglen, "cannot bind %s: %s", path, uv_strerror(rc));
      return -1;
    }
    srv->own_socket_file = 1;
    if (chmod(path, 0660) != 0)
      nsad_warn("chmod 0660 %s: %s", path, strerror(errno));
  }
  if ((rc = uv_listen((uv_stream_t *)&srv->listener, 128, on_connection)) != 0) {
    snprintf(msg, msglen, "listen on %s: %s", srv->socket_path, uv_strerror(rc));
    return -1;
  }
  return 0;
}

/* ------------------------------------------------------------ lifecycle --- */

/* NSAD_SPIN_US from the environment, else the config file's pair: busy-poll
 * window in microseconds (0 = off, the default; at most 10 s). */
static int read_spin(nsad_server_t *srv, const nsad_config_t *cfg, char *msg, size_t msglen) {
  const char *v = getenv("NSAD_SPIN_US");
  for (int i = 0; (!v || !*v) && i < cfg->nkv; i++)
    if (!strcmp(cfg->kv[i].key, "NSAD_SPIN_US")) v = cfg->kv[i].value;
  srv->spin_s = 0;
  if (!v || !*v) return 0;
  char *end = NULL;
  errno = 0;
  long long us = strtoll(v, &end, 10);
  if (end == v || *end || errno || us < 0 || us > 10000000) {
    snprintf(msg, msglen, "NSAD_SPIN_US: '%s' is not a number of microseconds in [0, 10000000]",
             v);
    return -1;
  }
  srv->spin_s = (double)us * 1e-6;
  if (us > 0)
    nsad_info("busy-polling for %lld us after each request (NSAD_SPIN_US): the loop thread and "
              "each worker use a core while clients are active",
              us);
  return 0;
}

int nsad_server_init(nsad_server_t *srv, nsad_config_t *cfg, char *msg, size_t msglen) {
  memset(srv, 0, sizeof *srv);
  srv->cfg = cfg;
  int rc = uv_loop_init(&srv->loop);
  if (rc) {
    snprintf(msg, msglen, "uv_loop_init: %s", uv_strerror(rc));
    return -1;
  }
  srv->loop_ready = 1;
  if (nsad_shm_guard_install() != 0) nsad_warn("cannot install the SIGBUS guard for shm regions");
  if (nsad_backend_create(cfg, &srv->backend, msg, msglen) != 0) return -1;
  srv->backend_ready = 1;
  srv->metrics = nsad_metrics_new();
  if (!srv->metrics) {
    snprintf(msg, msglen, "out of memory (metrics)");
    return -1;
  }
  srv->flags = nsad_flags_new(cfg->state_dir, msg, msglen);
  if (!srv->flags) return -1;
  nsad_flags_attach_metrics(srv->flags, srv->metrics);
  if (nsad_flags_load_config(srv->flags, cfg->config_file, NULL, msg, msglen) != 0) return -1;

  uv_async_init(&srv->loop, &srv->done_async, on_done);
  srv->done_async.data = srv;
  uv_timer_init(&srv->loop, &srv->grace_timer);
  srv->grace_timer.data = srv;
  uv_signal_init(&srv->loop, &srv->sig_term);
  uv_signal_init(&srv->loop, &srv->sig_int);
  uv_signal_init(&srv->loop, &srv->sig_hup);
  srv->sig_term.data = srv->sig_int.data = srv->sig_hup.data = srv;
  uv_signal_start(&srv->sig_term, on_signal, SIGTERM);
  uv_signal_start(&srv->sig_int, on_signal, SIGINT);
  uv_signal_start(&srv->sig_hup, on_signal, SIGHUP);

  if (nsad_jobq_init(&srv->jq, srv->backend.nqueues, &srv->done_async) != 0) {
    snprintf(msg, msglen, "job queue init failed");
    return -1;
  }
  srv->jq_ready = 1;
  if (read_spin(srv, cfg, msg, msglen) != 0) return -1;
  srv->jq.spin_s = srv->spin_s;
  if (start_listening(srv, msg, msglen) != 0) return -1;
  if (nsad_workers_start(&srv->workers, &srv->backend, &srv->jq, msg, msglen) != 0) return -1;
  if (cfg->metrics_listen) {
    srv->metrics_http = nsad_metrics_http_start(cfg->metrics_listen, srv->metrics, msg, msglen);
    if (!srv->metrics_http) return -1;
    nsad_info("metrics on http://%s/metrics (port %d)", cfg->metrics_listen,
              nsad_metrics_http_port(srv->metrics_http));
  }
  uint64_t wd = nsad_sd_watchdog_usec();
  if (wd > 0) {
    uv_timer_init(&srv->loop, &g_watchdog);
    uint64_t ms = wd / 2000 ? wd / 2000 : 1;
    uv_timer_start(&g_watchdog, on_watchdog, ms, ms);
    g_watchdog_on = 1;
  }
  nsad_server_update_gauges(srv);
  nsad_info("nsad %s listening on %s (backend %s, %d worker(s), %s)", NSAD_VERSION,
            srv->socket_path, srv->backend.ops->name, srv->backend.nworkers,
            srv->backend.devices[0]);
  nsad_sd_notify_status("serving on %s (backend %s)", srv->socket_path, srv->backend.ops->name);
  nsad_sd_notify_ready();
  return 0;
}

int nsad_server_run(nsad_server_t *srv) {
  if (srv->spin_s <= 0) {
    uv_run(&srv->loop, UV_RUN_DEFAULT);
    return srv->exit_code;
  }
  /* NSAD_SPIN_US: within the window after the last read or completion the
   * loop polls (epoll timeout 0) instead of sleeping, so the next request or
   * completion is seen without waking the thread; afterwards it blocks as
   * usual. Same exit condition as UV_RUN_DEFAULT (no uv_stop is used). */
  for (;;) {
    int hot = nsad_now() - srv->last_activity < srv->spin_s;
    if (uv_run(&srv->loop, hot ? UV_RUN_NOWAIT : UV_RUN_ONCE) == 0 && !uv_loop_alive(&srv->loop))
      break;
  }
  return srv->exit_code;
}

static void on_walk_report(uv_handle_t *h, void *arg) {
  nsad_err("handle still open at exit: %s%s", uv_handle_type_name(uv_handle_get_type(h)),
           uv_is_closing(h) ? " (closing)" : "");
}

static void on_walk_close(uv_handle_t *h, void *arg) {
  if (!uv_is_closing(h)) uv_close(h, NULL);
}

/* Returns 0 when the loop closed cleanly. */
static int close_loop(nsad_server_t *srv) {
  int rc = uv_loop_close(&srv->loop);
  if (rc == 0) return 0;
  nsad_err("uv_loop_close: %s", uv_strerror(rc));
  uv_walk(&srv->loop, on_walk_report, NULL);
  uv_walk(&srv->loop, on_walk_close, NULL);
  uv_run(&srv->loop, UV_RUN_DEFAULT);
  uv_loop_close(&srv->loop);
  return -1;
}

void nsad_server_teardown(nsad_server_t *srv) {
  int init_failed = !srv->shutting_down;
  if (srv->listening && init_failed) {
    /* Failed start: never shut down; close what was opened. */
    if (srv->own_socket_file) unlink(srv->socket_path);
    srv->own_socket_file = 0;
  }
  if (srv->jq_ready) nsad_workers_stop(&srv->workers);
  if (srv->loop_ready && init_failed) {
    uv_walk(&srv->loop, on_walk_close, NULL);
    uv_run(&srv->loop, UV_RUN_DEFAULT);
  }
  if (srv->metrics_http) nsad_metrics_http_stop(srv->metrics_http);
  srv->metrics_http = NULL;
  if (srv->jq_ready) nsad_jobq_teardown(&srv->jq);
  srv->jq_ready = 0;
  if (srv->flags) {
    nsad_flags_attach_metrics(srv->flags, NULL);
    nsad_flags_free(srv->flags);
  }
  srv->flags = NULL;
  if (srv->metrics) nsad_metrics_free(srv->metrics);
  srv->metrics = NULL;
  if (srv->backend_ready) nsad_backend_destroy(&srv->backend);
  srv->backend_ready = 0;
  if (srv->loop_ready && close_loop(srv) != 0 && srv->exit_code == 0) srv->exit_code = 1;
  srv->loop_ready = 0;
}
