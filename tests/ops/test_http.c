/*
 * test_http.c — GET /metrics over HTTP (daemon/metrics_http.c, libmicrohttpd)
 * with a plain socket client on 127.0.0.1:<ephemeral port>.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "metrics_http.h"
#include "prom_check.h"

/* Sends raw request bytes, returns the whole response (server closes: we send
 * Connection: close). */
static char *http(int port, const char *req, size_t *len) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  cr_assert_geq(fd, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  struct timeval tv = {.tv_sec = 10};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  cr_assert_eq(connect(fd, (struct sockaddr *)&a, sizeof a), 0, "connect to port %d", port);
  size_t rl = strlen(req);
  cr_assert_eq(write(fd, req, rl), (ssize_t)rl);
  size_t cap = 1 << 16, n = 0;
  char *buf = malloc(cap);
  ssize_t r;
  while ((r = read(fd, buf + n, cap - n - 1)) > 0) {
    n += (size_t)r;
    if (cap - n < 1024) buf = realloc(buf, cap *= 2);
  }
  close(fd);
  buf[n] = 0;
  *len = n;
  return buf;
}

static nsad_metrics_http_t *start(nsad_metrics_t *m) {
  char msg[256] = "";
  nsad_metrics_http_t *h = nsad_metrics_http_start("127.0.0.1:0", m, msg, sizeof msg);
  cr_assert_not_null(h, "start: %s", msg);
  cr_assert_gt(nsad_metrics_http_port(h), 0);
  return h;
}

Test(http, get_metrics_serves_valid_exposition) {
  if (!nsad_metrics_http_available()) cr_skip_test("built without libmicrohttpd");
  nsad_metrics_t *m = nsad_metrics_new();
  nsad_metrics_request(m, NSA_M_PING, -1, NSA_E_OK, 1e-4);
  nsad_metrics_gauge_set(m, NSAD_G_SESSIONS, 4);
  nsad_metrics_http_t *h = start(m);
  int port = nsad_metrics_http_port(h);
  size_t len;
  char *r = http(port, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", &len);
  cr_assert(strncmp(r, "HTTP/1.1 200", 12) == 0, "status: %.40s", r);
  cr_expect(strcasestr(r, "Content-Type: text/plain; version=0.0.4") != NULL, "%.400s", r);
  char *body = strstr(r, "\r\n\r\n");
  cr_assert_not_null(body);
  body += 4;
  char msg[512];
  cr_expect_eq(prom_check(body, strlen(body), msg, sizeof msg), 0, "%s", msg);
  double v;
  cr_assert_eq(prom_value(body, "nsad_sessions", &v), 0);
  cr_expect_eq(v, 4);
  cr_assert_eq(prom_value(body, "nsad_requests_total{method=\"ping\",path=\"none\",code=\"ok\"}", &v), 0);
  cr_expect_eq(v, 1);
  free(r);

  /* counters move between scrapes */
  for (int i = 0; i < 5; i++) nsad_metrics_request(m, NSA_M_PING, -1, NSA_E_OK, 1e-4);
  r = http(port, "GET /metrics HTTP/1.0\r\n\r\n", &len);
  body = strstr(r, "\r\n\r\n") + 4;
  cr_assert_eq(prom_value(body, "nsad_requests_total{method=\"ping\",path=\"none\",code=\"ok\"}", &v), 0);
  cr_expect_eq(v, 6);
  free(r);

  r = http(port, "GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", &len);
  cr_expect(strncmp(r, "HTTP/1.1 404", 12) == 0, "status: %.40s", r);
  free(r);
  r = http(port, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", &len);
  cr_expect(strncmp(r, "HTTP/1.1 404", 12) == 0, "status: %.40s", r);
  free(r);
  r = http(port, "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
           &len);
  cr_expect(strncmp(r, "HTTP/1.1 405", 12) == 0, "status: %.40s", r);
  free(r);
  r = http(port, "garbage\r\n\r\n", &len);
  cr_expect(len == 0 || strncmp(r, "HTTP/1.1 4", 10) == 0, "garbage answered with: %.40s", r);
  free(r);
  nsad_metrics_http_stop(h);
  /* the port is closed after stop */
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  cr_expect_neq(connect(fd, (struct sockaddr *)&a, sizeof a), 0, "still listening after stop");
  close(fd);
  nsad_metrics_free(m);
}

Test(http, bad_listen_addresses) {
  if (!nsad_metrics_http_available()) cr_skip_test("built without libmicrohttpd");
  nsad_metrics_t *m = nsad_metrics_new();
  const char *bad[] = {"localhost", "127.0.0.1:99999", "127.0.0.1:", "::1:9000",
                       "127.0.0.1:12ab", "no.such.host.invalid:9000"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    char msg[256] = "";
    nsad_metrics_http_t *h = nsad_metrics_http_start(bad[i], m, msg, sizeof msg);
    cr_expect_null(h, "accepted %s", bad[i]);
    cr_expect(strstr(msg, "metrics-listen") != NULL, "%s: message '%s'", bad[i], msg);
    nsad_metrics_http_stop(h);
  }
  /* port already in use */
  nsad_metrics_http_t *a = start(m);
  char addr[64], msg[256] = "";
  snprintf(addr, sizeof addr, "127.0.0.1:%d", nsad_metrics_http_port(a));
  nsad_metrics_http_t *b = nsad_metrics_http_start(addr, m, msg, sizeof msg);
  cr_expect_null(b, "second server on the same port");
  nsad_metrics_http_stop(b);
  nsad_metrics_http_stop(a);
  /* forms that parse */
  char host[64];
  int port;
  cr_expect_eq(nsad_metrics_http_parse_listen("[::1]:9464", host, sizeof host, &port, msg, sizeof msg), 0);
  cr_expect_str_eq(host, "::1");
  cr_expect_eq(port, 9464);
  cr_expect_eq(nsad_metrics_http_parse_listen(":0", host, sizeof host, &port, msg, sizeof msg), 0);
  cr_expect_str_eq(host, "");
  nsad_metrics_free(m);
}
