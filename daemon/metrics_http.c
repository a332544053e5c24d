/*
 * metrics_http.c — GET /metrics over HTTP with libmicrohttpd (metrics_http.h).
 */
#include "metrics_http.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int nsad_metrics_http_parse_listen(const char *listen, char *host, size_t hostlen, int *port,
                                   char *msg, size_t msglen) {
  const char *colon = listen ? strrchr(listen, ':') : NULL;
  if (!colon) {
    if (msg) snprintf(msg, msglen, "--metrics-listen must be HOST:PORT (got '%s')",
                      listen ? listen : "");
    return -1;
  }
  const char *h = listen;
  size_t hl = (size_t)(colon - listen);
  if (hl >= 2 && h[0] == '[' && h[hl - 1] == ']') {
    h++;
    hl -= 2;
  } else if (memchr(h, ':', hl)) {
    if (msg) snprintf(msg, msglen, "--metrics-listen: write IPv6 hosts in brackets, [::1]:9464");
    return -1;
  }
  if (hl >= hostlen) {
    if (msg) snprintf(msg, msglen, "--metrics-listen: host too long");
    return -1;
  }
  memcpy(host, h, hl);
  host[hl] = 0;
  char *end = NULL;
  long p = strtol(colon + 1, &end, 10);
  if (!colon[1] || *end || p < 0 || p > 65535) {
    if (msg) snprintf(msg, msglen, "--metrics-listen: port must be 0..65535 (got '%s')", colon + 1);
    return -1;
  }
  *port = (int)p;
  return 0;
}

#ifdef NSAD_HAVE_MHD
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>

#if MHD_VERSION >= 0x00097002
typedef enum MHD_Result mhd_result_t;
#else
typedef int mhd_result_t;
#endif

struct nsad_metrics_http {
  struct MHD_Daemon *d;
  nsad_metrics_t *m;
  int port;
};

static mhd_result_t reply(struct MHD_Connection *c, unsigned status, char *body, size_t len,
                          const char *ctype, int must_free) {
  struct MHD_Response *r = MHD_create_response_from_buffer(
      len, body, must_free ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_PERSISTENT);
  if (!r) {
    if (must_free) free(body);
    return MHD_NO;
  }
  MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
  if (status == MHD_HTTP_METHOD_NOT_ALLOWED) MHD_add_response_header(r, "Allow", "GET, HEAD");
  mhd_result_t ret = MHD_queue_response(c, status, r);
  MHD_destroy_response(r);
  return ret;
}

static mhd_result_t handler(void *cls, struct MHD_Connection *c, const char *url,
                            const char *method, const char *version, const char *upload,
                            size_t *upload_size, void **con_cls) {
  (void)version;
  (void)upload;
  nsad_metrics_http_t *h = cls;
  /* A request body (e.g. POST) arrives in later calls; we answer at once and
   * let MHD discard it. */
  if (upload_size && *upload_size) {
    *upload_size = 0;
    return MHD_YES;
  }
  (void)con_cls;
  static char nf[] = "not found; try /metrics\n";
  static char na[] = "method not allowed\n";
  if (strcmp(url, "/metrics") != 0)
    return reply(c, MHD_HTTP_NOT_FOUND, nf, sizeof nf - 1, "text/plain; charset=utf-8", 0);
  if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0)
    return reply(c, MHD_HTTP_METHOD_NOT_ALLOWED, na, sizeof na - 1, "text/plain; charset=utf-8",
                 0);
  size_t len = 0;
  char *text = nsad_metrics_prometheus(h->m, &len);
  if (!text) {
    static char oom[] = "out of memory\n";
    return reply(c, MHD_HTTP_INTERNAL_SERVER_ERROR, oom, sizeof oom - 1, "text/plain", 0);
  }
  return reply(c, MHD_HTTP_OK, text, len, "text/plain; version=0.0.4; charset=utf-8", 1);
}

nsad_metrics_http_t *nsad_metrics_http_start(const char *listen, nsad_metrics_t *m, char *msg,
                                             size_t msglen) {
  char host[256], port_s[16];
  int port;
  if (nsad_metrics_http_parse_listen(listen, host, sizeof host, &port, msg, msglen) != 0)
    return NULL;
  snprintf(port_s, sizeof port_s, "%d", port);
  struct addrinfo hints, *ai = NULL;
  memset(&hints, 0, sizeof hints);
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  hints.ai_family = host[0] ? AF_UNSPEC : AF_INET;
  int gai = getaddrinfo(host[0] ? host : NULL, port_s, &hints, &ai);
  if (gai != 0 || !ai) {
    if (msg) snprintf(msg, msglen, "--metrics-listen %s: %s", listen, gai_strerror(gai));
    return NULL;
  }
  nsad_metrics_http_t *h = calloc(1, sizeof *h);
  if (!h) {
    freeaddrinfo(ai);
    if (msg) snprintf(msg, msglen, "out of memory");
    return NULL;
  }
  h->m = m;
  /* MHD_USE_AUTO: epoll/poll rather than select(), which drops every
   * connection whose fd is >= FD_SETSIZE, and nsad holds one fd per shm
   * region, so scrapes failed on a busy daemon. */
  unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO | MHD_USE_ERROR_LOG;
  if (ai->ai_family == AF_INET6) flags |= MHD_USE_IPv6;
  h->d = MHD_start_daemon(flags, (uint16_t)port, NULL, NULL, handler, h, MHD_OPTION_SOCK_ADDR,
                          ai->ai_addr, MHD_OPTION_CONNECTION_LIMIT, (unsigned)64,
                          MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)10, MHD_OPTION_END);
  freeaddrinfo(ai);
  if (!h->d) {
    if (msg) snprintf(msg, msglen, "--metrics-listen %s: cannot listen (address in use or not "
                      "local?)", listen);
    free(h);
    return NULL;
  }
  h->port = port;
  const union MHD_DaemonInfo *info = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_LISTEN_FD);
  if (info) {
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockname(info->listen_fd, (struct sockaddr *)&ss, &sl) == 0) {
      if (ss.ss_family == AF_INET) h->port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
      else if (ss.ss_family == AF_INET6) h->port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    }
  }
  return h;
}

int nsad_metrics_http_port(const nsad_metrics_http_t *h) { return h ? h->port : -1; }

int nsad_metrics_http_available(void) { return 1; }

void nsad_metrics_http_stop(nsad_metrics_http_t *h) {
  if (!h) return;
  if (h->d) MHD_stop_daemon(h->d);
  free(h);
}

#else /* !NSAD_HAVE_MHD */

struct nsad_metrics_http {
  int unused;
};

nsad_metrics_http_t *nsad_metrics_http_start(const char *listen, nsad_metrics_t *m, char *msg,
                                             size_t msglen) {
  (void)listen;
  (void)m;
  if (msg) snprintf(msg, msglen, "--metrics-listen: nsad was built without libmicrohttpd");
  return NULL;
}
int nsad_metrics_http_port(const nsad_metrics_http_t *h) {
  (void)h;
  return -1;
}
void nsad_metrics_http_stop(nsad_metrics_http_t *h) { (void)h; }

int nsad_metrics_http_available(void) { return 0; }

#endif
