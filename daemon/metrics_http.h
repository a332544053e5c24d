/*
 * metrics_http.h — `--metrics-listen HOST:PORT`: GET /metrics for Prometheus.
 *
 * libmicrohttpd with its own internal thread; the handler renders
 * nsad_metrics_prometheus() (lock-free reads), so the libuv loop is never
 * involved. GET/HEAD /metrics → 200 text/plain; version=0.0.4; other paths
 * 404; other methods on /metrics 405. Built without libmicrohttpd
 * (NSAD_HAVE_MHD undefined), start fails with a message saying so.
 *
 * HOST:PORT forms: "127.0.0.1:9464", "localhost:9464", "[::1]:9464",
 * ":9464" (all IPv4 interfaces), port 0 = ephemeral (see _port()).
 */
#ifndef NSAD_METRICS_HTTP_H
#define NSAD_METRICS_HTTP_H

#include <stddef.h>

#include "metrics.h"

typedef struct nsad_metrics_http nsad_metrics_http_t;

/* Starts serving; m must outlive the server. NULL + msg on failure (bad
 * address, port in use, no libmicrohttpd). */
nsad_metrics_http_t *nsad_metrics_http_start(const char *listen, nsad_metrics_t *m, char *msg,
                                             size_t msglen);
/* The bound TCP port (useful with port 0). */
int nsad_metrics_http_port(const nsad_metrics_http_t *h);
/* Stops the thread, closes the socket, frees. NULL is fine. */
void nsad_metrics_http_stop(nsad_metrics_http_t *h);

/* 1 when built with libmicrohttpd (else start always fails). */
int nsad_metrics_http_available(void);

/* Splits "HOST:PORT" (host may be [v6], empty = any). 0 or -1 with msg. */
int nsad_metrics_http_parse_listen(const char *listen, char *host, size_t hostlen, int *port,
                                   char *msg, size_t msglen);

#endif
