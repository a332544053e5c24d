/* nsaclient.c — libnsaclient (see nsaclient.h). */
#define _GNU_SOURCE
#include "nsaclient.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "nsa_proto.h"
#include "nsaclient_internal.h"

#define DEFAULT_SOCKET "/run/nsad/nsad.sock"

static double nsac_now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

/* ------------------------------------------------------------- errors --- */

int nsac_fail(nsa_client_t *c, const char *code, const char *fmt, ...) {
  snprintf(c->err_code, sizeof c->err_code, "%s", code);
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(c->err_msg, sizeof c->err_msg, fmt, ap);
  va_end(ap);
  return -1;
}

static void clear_error(nsa_client_t *c) {
  c->err_code[0] = 0;
  c->err_msg[0] = 0;
}

const char *nsa_client_error_code(const nsa_client_t *c) { return c ? c->err_code : "invalid_argument"; }
const char *nsa_client_error_message(const nsa_client_t *c) { return c ? c->err_msg : "no client"; }
const nsa_client_info_t *nsa_client_info(const nsa_client_t *c) { return &c->info; }
int nsa_client_connections(const nsa_client_t *c) { return c->connections; }
int nsa_client_fd(const nsa_client_t *c) { return c->fd; }

static __thread char t_open_error[600];
const char *nsa_client_open_error(void) { return t_open_error; }

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* --------------------------------------------------------- connection --- */

/* Drops the connection: requests in flight on it will fail "disconnected". */
static void disconnect(nsa_client_t *c) {
  if (c->fd >= 0) close(c->fd);
  c->fd = -1;
  c->gen++;
  nsa_proto_decoder_free(c->dec);
  c->dec = NULL;
  /* Replies stashed from the dead connection are still valid answers. */
}

static int send_all(nsa_client_t *c, const void *data, size_t len) {
  const char *p = data;
  while (len > 0) {
    ssize_t n = send(c->fd, p, len, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) {
        struct pollfd pfd = {.fd = c->fd, .events = POLLOUT};
        poll(&pfd, 1, 1000);
        continue;
      }
      return -1;
    }
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

static void stash_push(nsa_client_t *c, nsac_stash_t *s) {
  s->next = NULL;
  if (c->stash_tail)
    c->stash_tail->next = s;
  else
    c->stash_head = s;
  c->stash_tail = s;
}

static char *pack_obj(const msgpack_object *o, size_t *len) {
  msgpack_sbuffer sb;
  msgpack_packer pk;
  msgpack_sbuffer_init(&sb);
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  msgpack_pack_object(&pk, *o);
  *len = sb.size;
  return msgpack_sbuffer_release(&sb);
}

static int outstanding_find(nsa_client_t *c, uint32_t msgid) {
  for (int i = 0; i < c->nout; i++)
    if (c->out[i].msgid == msgid) return i;
  return -1;
}

static void outstanding_remove(nsa_client_t *c, int i) { c->out[i] = c->out[--c->nout]; }

/* Handles one decoded message: a response is stashed by msgid, a
 * notification queued. */
static void take_message(nsa_client_t *c, const nsa_proto_msg_t *m) {
  nsac_stash_t *s = calloc(1, sizeof *s);
  if (!s) return;
  if (m->type == NSA_MSG_RESPONSE) {
    if (outstanding_find(c, m->msgid) < 0) { /* nobody asked (abandoned) */
      free(s);
      return;
    }
    s->msgid = m->msgid;
    s->err = pack_obj(&m->error, &s->err_len);
    s->res = pack_obj(&m->result, &s->res_len);
  } else if (m->type == NSA_MSG_NOTIFICATION) {
    s->notification = 1;
    size_t n = m->method_len < sizeof s->method - 1 ? m->method_len : sizeof s->method - 1;
    memcpy(s->method, m->method, n);
    s->res = pack_obj(&m->params, &s->res_len);
  } else {
    free(s);
    return;
  }
  stash_push(c, s);
}

/* Reads what is available (blocking up to timeout_ms; 0 = just poll).
 * Returns 1 if messages were taken, 0 on timeout, -1 when the connection
 * broke (then disconnected). */
static int pump(nsa_client_t *c, int timeout_ms) {
  if (c->fd < 0) return -1;
  struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
  int pr = 0;
  if (timeout_ms != 0 && c->spin_us > 0) {
    /* Spin briefly before sleeping: a reply that comes within spin_us costs
     * no wake-up of this thread (NSACLIENT_SPIN_US). */
    const double end = nsac_now_us() + c->spin_us;
    do pr = poll(&pfd, 1, 0);
    while ((pr == 0 || (pr < 0 && errno == EINTR)) && nsac_now_us() < end);
  }
  if (pr == 0 || (pr < 0 && errno == EINTR)) {
    do pr = poll(&pfd, 1, timeout_ms);
    while (pr < 0 && errno == EINTR);
  }
  if (pr == 0) return 0;
  if (pr < 0) {
    disconnect(c);
    return -1;
  }
  size_t avail = 0;
  char *buf = nsa_proto_decoder_buffer(c->dec, 64 * 1024, &avail);
  if (!buf) {
    disconnect(c);
    return -1;
  }
  ssize_t n;
  do n = read(c->fd, buf, avail);
  while (n < 0 && errno == EINTR);
  if (n <= 0) {
    disconnect(c);
    return -1;
  }
  nsa_proto_decoder_commit(c->dec, (size_t)n);
  int got = 0;
  for (;;) {
    nsa_proto_msg_t m;
    nsa_proto_err_t err;
    int known = 0;
    uint32_t id = 0;
    int rc = nsa_proto_decoder_next(c->dec, &m, &err, &known, &id);
    if (rc == 0) break;
    if (rc < 0) {
      disconnect(c);
      return -1;
    }
    take_message(c, &m);
    got = 1;
  }
  return got;
}

static int connect_once(nsa_client_t *c) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno;
  struct sockaddr_un sa;
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  snprintf(sa.sun_path, sizeof sa.sun_path, "%s", c->path);
  if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
    int e = errno;
    close(fd);
    return -e;
  }
  return fd;
}

static int rpc_raw(nsa_client_t *c, nsa_proto_writer_t *w, uint32_t msgid, char **res,
                   size_t *res_len);

/* hello + re-registration of this client's regions on a fresh connection. */
static int handshake(nsa_client_t *c) {
  nsa_request_t *req = calloc(1, sizeof *req);
  if (!req) return nsac_fail(c, "io_error", "out of memory");
  req->method = NSA_M_HELLO;
  req->msgid = c->next_msgid++;
  req->u.hello.protocol = NSA_PROTO_VERSION;
  snprintf(req->u.hello.client, sizeof req->u.hello.client, "%s", c->name);
  req->u.hello.pid = getpid();
  req->u.hello.nlabels = c->nlabels;
  memcpy(req->u.hello.labels, c->labels, sizeof(c->labels[0]) * (size_t)c->nlabels);
  nsa_proto_writer_t w;
  nsa_proto_writer_init(&w);
  nsa_proto_write_request(&w, req->msgid, req);
  uint32_t msgid = req->msgid;
  free(req);
  char *res = NULL;
  size_t rl = 0;
  int rc = rpc_raw(c, &w, msgid, &res, &rl);
  nsa_proto_writer_destroy(&w);
  if (rc) return -1;
  msgpack_unpacked up;
  msgpack_unpacked_init(&up);
  memset(&c->info, 0, sizeof c->info);
  if (msgpack_unpack_next(&up, res, rl, NULL) == MSGPACK_UNPACK_SUCCESS &&
      up.data.type == MSGPACK_OBJECT_MAP) {
    const msgpack_object *r = &up.data;
    int64_t v;
    uint64_t u;
    if (!nsa_proto_get_int(r, "protocol", &v)) c->info.protocol = (int)v;
    nsa_proto_get_str(r, "server", c->info.server, sizeof c->info.server);
    nsa_proto_get_str(r, "backend", c->info.backend, sizeof c->info.backend);
    if (!nsa_proto_get_uint(r, "session", &u)) c->info.session = u;
    if (!nsa_proto_get_uint(r, "flags_epoch", &u)) c->info.flags_epoch = u;
    const msgpack_object *d = nsa_proto_map_get(r, "devices");
    if (d && d->type == MSGPACK_OBJECT_ARRAY)
      for (uint32_t i = 0; i < d->via.array.size && c->info.ndevices < 8; i++) {
        const msgpack_object *e = &d->via.array.ptr[i];
        if (e->type != MSGPACK_OBJECT_STR) continue;
        size_t n = e->via.str.size < 95 ? e->via.str.size : 95;
        memcpy(c->info.devices[c->info.ndevices], e->via.str.ptr, n);
        c->info.devices[c->info.ndevices++][n] = 0;
      }
  }
  msgpack_unpacked_destroy(&up);
  free(res);
  /* Same ids for the caller, new ids on the wire. */
  for (int i = 0; i < c->nregions; i++) {
    nsac_region_t *r = &c->regions[i];
    uint64_t id = 0;
    if (nsac_register_wire(c, r, &id) != 0) {
      if (c->fd < 0) return -1; /* the daemon went away again */
      /* e.g. the object was unlinked meanwhile: requests naming this region
       * get not_found from the daemon (id 0 is never handed out). */
      r->wire_id = 0;
      continue;
    }
    r->wire_id = id;
  }
  /* A subscription belongs to the daemon's session: ask the new one again. */
  if (c->sub_interval_ms > 0) {
    nsa_proto_writer_t sw;
    nsa_proto_writer_init(&sw);
    uint32_t sid = c->next_msgid++;
    nsa_proto_write_request_begin(&sw, sid, "metrics.subscribe");
    msgpack_pack_map(&sw.pk, 1);
    nsa_proto_pack_kv_uint(&sw.pk, "interval_ms", c->sub_interval_ms);
    char *sres = NULL;
    size_t srl = 0;
    int src = rpc_raw(c, &sw, sid, &sres, &srl);
    nsa_proto_writer_destroy(&sw);
    free(sres);
    if (src != 0 && c->fd < 0) return -1; /* the daemon went away again */
  }
  return 0;
}

/* Packs the register request of r: region.register {kind shm|cuda_ipc} or
 * event.register. Returns the method name. */
const char *nsac_pack_register(msgpack_packer *pk, const nsac_region_t *r) {
  if (r->kind == NSAC_SHM) {
    msgpack_pack_map(pk, 3);
    nsa_proto_pack_kv_str(pk, "kind", "shm");
    nsa_proto_pack_kv_str(pk, "name", r->name);
    nsa_proto_pack_kv_uint(pk, "size", r->size);
    return "region.register";
  }
  int ev = r->kind == NSAC_EVENT;
  msgpack_pack_map(pk, ev ? 2 : 4);
  if (!ev) nsa_proto_pack_kv_str(pk, "kind", "cuda_ipc");
  nsa_proto_pack_kv_int(pk, "device", r->device);
  nsa_proto_pack_str(pk, "handle");
  msgpack_pack_bin(pk, 64);
  msgpack_pack_bin_body(pk, r->handle, 64);
  if (!ev) nsa_proto_pack_kv_uint(pk, "size", r->size);
  return ev ? "event.register" : "region.register";
}

int nsac_register_wire(nsa_client_t *c, const nsac_region_t *r, uint64_t *wire_id) {
  nsa_proto_writer_t w, body;
  nsa_proto_writer_init(&w);
  nsa_proto_writer_init(&body);
  uint32_t id = c->next_msgid++;
  const char *method = nsac_pack_register(&body.pk, r);
  nsa_proto_write_request_begin(&w, id, method);
  msgpack_sbuffer_write(&w.sbuf, body.sbuf.data, body.sbuf.size);
  nsa_proto_writer_destroy(&body);
  char *res = NULL;
  size_t rl = 0;
  int rc = rpc_raw(c, &w, id, &res, &rl);
  nsa_proto_writer_destroy(&w);
  if (rc) return -1;
  const char *key = r->kind == NSAC_EVENT ? "event" : "region";
  msgpack_unpacked up;
  msgpack_unpacked_init(&up);
  rc = -1;
  if (msgpack_unpack_next(&up, res, rl, NULL) == MSGPACK_UNPACK_SUCCESS &&
      up.data.type == MSGPACK_OBJECT_MAP && nsa_proto_get_uint(&up.data, key, wire_id) == 0)
    rc = 0;
  msgpack_unpacked_destroy(&up);
  free(res);
  if (rc) nsac_fail(c, "bad_reply", "register reply has no '%s'", key);
  return rc;
}

/* Makes sure there is a live connection: notices a dead one (EOF waiting on
 * the socket) and reconnects with backoff. */
static int ensure_connected(nsa_client_t *c) {
  if (c->fd >= 0) {
    /* Take whatever is already there; EOF means the daemon went away. */
    while (pump(c, 0) > 0) {
    }
    if (c->fd >= 0) return 0;
  }
  int attempts = c->attempts;
  int delay = 20;
  int last = 0;
  for (int a = 0; a < attempts; a++) {
    if (a > 0) {
      usleep((useconds_t)delay * 1000);
      delay = delay * 2 > 1000 ? 1000 : delay * 2;
    }
    int fd = connect_once(c);
    if (fd < 0) {
      last = -fd;
      continue;
    }
    c->fd = fd;
    c->dec = nsa_proto_decoder_new(64u << 20);
    if (!c->dec) {
      disconnect(c);
      return nsac_fail(c, "io_error", "out of memory");
    }
    c->connections++;
    if (handshake(c) != 0) {
      if (c->fd >= 0) {
        /* The daemon refused hello (or did not answer it): report its error.
         * This connection has no session, so it must not be reused: the
         * next call would send a request before hello and get a misleading
         * bad_request instead of the daemon's verdict. */
        disconnect(c);
        return -1;
      }
      continue; /* it died during the handshake: retry */
    }
    return 0;
  }
  return nsac_fail(c, "disconnected", "cannot connect to nsad at %s: %s", c->path,
                   last ? strerror(last) : "connection lost during hello");
}

int nsac_connected(nsa_client_t *c) {
  if (c->fd >= 0)
    while (pump(c, 0) > 0) {
    }
  return c->fd >= 0;
}

/* Sends a request already packed in w and waits for its reply. */
static int send_request(nsa_client_t *c, nsa_proto_writer_t *w, uint32_t msgid) {
  if (c->nout == c->capout) {
    int cap = c->capout ? c->capout * 2 : 16;
    nsac_out_t *no = realloc(c->out, (size_t)cap * sizeof *no);
    if (!no) return nsac_fail(c, "io_error", "out of memory");
    c->out = no;
    c->capout = cap;
  }
  if (send_all(c, w->sbuf.data, w->sbuf.size) != 0) {
    int e = errno;
    disconnect(c);
    return nsac_fail(c, "disconnected", "send to nsad failed: %s", strerror(e));
  }
  c->out[c->nout].msgid = msgid;
  c->out[c->nout].gen = c->gen;
  c->nout++;
  return 0;
}

/* Waits for the reply of msgid. On success *res and *res_len hold the packed
 * result (malloc'd). A daemon error sets the verbatim code and message. */
int nsac_wait_reply(nsa_client_t *c, uint32_t msgid, char **res, size_t *res_len) {
  int oi = outstanding_find(c, msgid);
  if (oi < 0) return nsac_fail(c, "invalid_argument", "unknown ticket %u", msgid);
  int64_t deadline = c->timeout_ms > 0 ? now_ms() + c->timeout_ms : -1;
  for (;;) {
    nsac_stash_t *prev = NULL;
    for (nsac_stash_t *s = c->stash_head; s; prev = s, s = s->next) {
      if (s->notification || s->msgid != msgid) continue;
      if (prev)
        prev->next = s->next;
      else
        c->stash_head = s->next;
      if (c->stash_tail == s) c->stash_tail = prev;
      outstanding_remove(c, outstanding_find(c, msgid));
      int rc = 0;
      msgpack_unpacked up;
      msgpack_unpacked_init(&up);
      if (msgpack_unpack_next(&up, s->err, s->err_len, NULL) == MSGPACK_UNPACK_SUCCESS &&
          up.data.type != MSGPACK_OBJECT_NIL) {
        char code[32] = "internal", msg[512] = "";
        if (up.data.type == MSGPACK_OBJECT_MAP) {
          nsa_proto_get_str(&up.data, "code", code, sizeof code);
          size_t n = 0;
          const char *m = nsa_proto_get_strn(&up.data, "message", &n);
          if (m) snprintf(msg, sizeof msg, "%.*s", (int)n, m);
        }
        rc = nsac_fail(c, code, "%s", msg);
      }
      msgpack_unpacked_destroy(&up);
      if (rc == 0 && res) {
        *res = s->res;
        *res_len = s->res_len;
        s->res = NULL;
      }
      free(s->err);
      free(s->res);
      free(s);
      return rc;
    }
    if (c->out[oi].gen != c->gen || c->fd < 0) {
      outstanding_remove(c, oi);
      return nsac_fail(c, "disconnected",
                       "the connection to nsad broke while this request was in flight");
    }
    int wait = -1;
    if (deadline >= 0) {
      int64_t left = deadline - now_ms();
      if (left <= 0) {
        outstanding_remove(c, oi);
        return nsac_fail(c, "timeout", "no reply from nsad within %d ms", c->timeout_ms);
      }
      wait = (int)left;
    }
    if (pump(c, wait) < 0) {
      /* loop once more: the reply may have arrived just before EOF */
    }
    oi = outstanding_find(c, msgid);
    if (oi < 0) return nsac_fail(c, "internal", "ticket %u lost", msgid);
  }
}

static int rpc_raw(nsa_client_t *c, nsa_proto_writer_t *w, uint32_t msgid, char **res,
                   size_t *res_len) {
  if (send_request(c, w, msgid) != 0) return -1;
  return nsac_wait_reply(c, msgid, res, res_len);
}

/* Connects if needed, then sends the request packed by fn and returns its
 * msgid in *msgid. fn runs after the connection is up, so region ids are
 * translated for the current connection. */
int nsac_submit(nsa_client_t *c, const char *method, nsac_pack_fn fn, const void *ctx,
                uint32_t *msgid) {
  clear_error(c);
  if (ensure_connected(c) != 0) return -1;
  for (int attempt = 0; attempt < 2; attempt++) {
    nsa_proto_writer_t w;
    nsa_proto_writer_init(&w);
    uint32_t id = c->next_msgid++;
    nsa_proto_write_request_begin(&w, id, method);
    if (fn)
      fn(c, &w.pk, ctx);
    else
      msgpack_pack_map(&w.pk, 0);
    int rc = send_request(c, &w, id);
    nsa_proto_writer_destroy(&w);
    if (rc == 0) {
      *msgid = id;
      return 0;
    }
    /* Never delivered: safe to reconnect and send once more. */
    clear_error(c);
    if (ensure_connected(c) != 0) return -1;
  }
  return nsac_fail(c, "disconnected", "cannot send to nsad");
}

int nsac_call(nsa_client_t *c, const char *method, nsac_pack_fn fn, const void *ctx, char **res,
              size_t *res_len) {
  uint32_t id;
  if (nsac_submit(c, method, fn, ctx, &id) != 0) return -1;
  return nsac_wait_reply(c, id, res, res_len);
}

/* ---------------------------------------------------------- lifecycle --- */

int nsa_client_open(nsa_client_t **out, const nsa_client_opts_t *opts) {
  *out = NULL;
  nsa_client_t *c = calloc(1, sizeof *c);
  if (!c) {
    snprintf(t_open_error, sizeof t_open_error, "io_error: out of memory");
    return -1;
  }
  c->fd = -1;
  c->next_msgid = 1;
  const char *path = opts && opts->socket_path ? opts->socket_path : getenv("NSAD_SOCKET");
  if (!path || !*path) path = DEFAULT_SOCKET;
  snprintf(c->path, sizeof c->path, "%s", path);
  snprintf(c->name, sizeof c->name, "%s", opts && opts->name ? opts->name : "nsaclient");
  c->timeout_ms = opts && opts->timeout_ms ? opts->timeout_ms : 120000;
  c->attempts = opts && opts->reconnect_attempts > 0 ? opts->reconnect_attempts : 8;
  /* Busy-poll for a reply this long before sleeping (default 50 us; 0 = never):
   * a blocked thread's wake-up costs more than a fast reply takes (on the
   * 2-core dev box: ping p50 60 us without, 18 us with; docs/PERF.md). */
  const char *sp = getenv("NSACLIENT_SPIN_US");
  c->spin_us = sp && *sp ? atoi(sp) : 50;
  if (c->spin_us < 0) c->spin_us = 0;
  if (c->spin_us > 10000) c->spin_us = 10000;
  if (opts)
    for (int i = 0; i < opts->nlabels && i < NSA_PROTO_MAX_LABELS; i++) {
      snprintf(c->labels[i].key, sizeof c->labels[i].key, "%s", opts->labels[i].key);
      snprintf(c->labels[i].value, sizeof c->labels[i].value, "%s", opts->labels[i].value);
      c->nlabels++;
    }
  if (ensure_connected(c) != 0) {
    snprintf(t_open_error, sizeof t_open_error, "%s: %s", c->err_code, c->err_msg);
    nsa_client_close(c);
    return -1;
  }
  *out = c;
  return 0;
}

void nsa_client_close(nsa_client_t *c) {
  if (!c) return;
  while (c->nshm > 0) nsa_client_shm_destroy(c, c->shms[c->nshm - 1]);
  if (c->fd >= 0) close(c->fd);
  nsa_proto_decoder_free(c->dec);
  nsac_stash_t *s = c->stash_head;
  while (s) {
    nsac_stash_t *n = s->next;
    free(s->err);
    free(s->res);
    free(s);
    s = n;
  }
  free(c->out);
  free(c->regions);
  free(c->shms);
  free(c);
}

/* ------------------------------------------------------------- simple --- */

int nsa_client_ping(nsa_client_t *c) { return nsac_call(c, "ping", NULL, NULL, NULL, NULL); }

int nsa_client_shutdown(nsa_client_t *c) { return nsac_call(c, "shutdown", NULL, NULL, NULL, NULL); }

int nsa_client_next_notification(nsa_client_t *c, int timeout_ms, char method[32],
                                 nsa_client_value_t **params) {
  clear_error(c);
  int64_t deadline = timeout_ms >= 0 ? now_ms() + timeout_ms : -1;
  for (;;) {
    nsac_stash_t *prev = NULL;
    for (nsac_stash_t *s = c->stash_head; s; prev = s, s = s->next) {
      if (!s->notification) continue;
      if (prev)
        prev->next = s->next;
      else
        c->stash_head = s->next;
      if (c->stash_tail == s) c->stash_tail = prev;
      if (method) snprintf(method, 32, "%s", s->method);
      int rc = 0;
      if (params) rc = nsac_value_from_bytes(c, s->res, s->res_len, params);
      free(s->err);
      free(s->res);
      free(s);
      return rc;
    }
    if (c->fd < 0) return nsac_fail(c, "disconnected", "not connected to nsad");
    int wait = -1;
    if (deadline >= 0) {
      int64_t left = deadline - now_ms();
      if (left <= 0) return nsac_fail(c, "timeout", "no notification within %d ms", timeout_ms);
      wait = (int)left;
    }
    if (pump(c, wait) < 0) return nsac_fail(c, "disconnected", "the connection to nsad broke");
  }
}
