/* nsactl — command-line control of nsad (DESIGN.md §4 "Command line"). */
#define _GNU_SOURCE
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "nsaclient.h"

static void usage(FILE *f) {
  fprintf(f,
          "usage: nsactl [--socket PATH] [--json] COMMAND\n"
          "commands:\n"
          "  status                                  server, backend, sessions, flag epoch\n"
          "  ping                                    round trip to nsad\n"
          "  flags get                               values, sources, rollout, effective\n"
          "  flags set NAME=VALUE [--percent P] [--match k=v]...   (admin)\n"
          "  flags reset NAME                        drop the runtime value (admin)\n"
          "  metrics [--prometheus]                  telemetry snapshot\n"
          "  top [--interval MS] [--count N]         live view (q or Ctrl-C to quit)\n"
          "  shutdown                                drain and stop nsad (admin)\n"
          "The socket defaults to $NSAD_SOCKET, else /run/nsad/nsad.sock.\n");
}

static int g_json;

/* Prints s as a JSON string literal: error messages echo client input and
 * daemon text with quotes ("key 'kind' must be \"shm\""), which printed raw
 * made --json output unparseable. */
static void json_puts(const char *s) {
  putchar('"');
  for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
    if (*p == '"' || *p == '\\')
      printf("\\%c", *p);
    else if (*p < 0x20)
      printf("\\u%04x", *p);
    else
      putchar(*p);
  }
  putchar('"');
}

static int fail(nsa_client_t *c, const char *what) {
  if (g_json) {
    printf("{\"ok\":false,\"error\":{\"code\":");
    json_puts(nsa_client_error_code(c));
    printf(",\"message\":");
    json_puts(nsa_client_error_message(c));
    printf("}}\n");
  }
  fprintf(stderr, "nsactl: %s: %s: %s\n", what, nsa_client_error_code(c),
          nsa_client_error_message(c));
  return 1;
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ------------------------------------------------------- metric helpers --- */

/* Sum of a family's sample values whose labels match (key=value pairs, NULL
 * value = any). */
static double family_sum2(const nsa_client_value_t *m, const char *fam, const char *lk,
                          const char *lv, const char *lk2, const char *lv2) {
  char path[256], buf[128];
  snprintf(path, sizeof path, "%s.samples", fam);
  int n = nsa_client_value_len(m, path);
  double sum = 0;
  for (int i = 0; i < n; i++) {
    if (lk) {
      snprintf(path, sizeof path, "%s.samples.%d.labels.%s", fam, i, lk);
      if (nsa_client_value_get_str(m, path, buf, sizeof buf) || strcmp(buf, lv)) continue;
    }
    if (lk2) {
      snprintf(path, sizeof path, "%s.samples.%d.labels.%s", fam, i, lk2);
      if (nsa_client_value_get_str(m, path, buf, sizeof buf) || strcmp(buf, lv2)) continue;
    }
    snprintf(path, sizeof path, "%s.samples.%d.value", fam, i);
    double v;
    if (!nsa_client_value_get_double(m, path, &v)) sum += v;
  }
  return sum;
}

static double family_sum(const nsa_client_value_t *m, const char *fam, const char *lk,
                         const char *lv) {
  return family_sum2(m, fam, lk, lv, NULL, NULL);
}

/* Histogram of one label value: cumulative counts into cnt[0..nle] and le[]. */
typedef struct {
  int nle;
  double le[64];
  double cnt[65];
  double sum, count;
} hist_t;

static int family_hist(const nsa_client_value_t *m, const char *fam, const char *lk,
                       const char *lv, hist_t *h) {
  char path[256], buf[128];
  memset(h, 0, sizeof *h);
  snprintf(path, sizeof path, "%s.samples", fam);
  int n = nsa_client_value_len(m, path), found = 0;
  for (int i = 0; i < n; i++) {
    if (lk) {
      snprintf(path, sizeof path, "%s.samples.%d.labels.%s", fam, i, lk);
      if (nsa_client_value_get_str(m, path, buf, sizeof buf) || strcmp(buf, lv)) continue;
    }
    snprintf(path, sizeof path, "%s.samples.%d.le", fam, i);
    int nle = nsa_client_value_len(m, path);
    if (nle < 0 || nle > 64) continue;
    h->nle = nle;
    for (int j = 0; j < nle; j++) {
      snprintf(path, sizeof path, "%s.samples.%d.le.%d", fam, i, j);
      nsa_client_value_get_double(m, path, &h->le[j]);
    }
    for (int j = 0; j <= nle; j++) {
      double v = 0;
      snprintf(path, sizeof path, "%s.samples.%d.counts.%d", fam, i, j);
      nsa_client_value_get_double(m, path, &v);
      h->cnt[j] += v;
    }
    double v = 0;
    snprintf(path, sizeof path, "%s.samples.%d.sum", fam, i);
    if (!nsa_client_value_get_double(m, path, &v)) h->sum += v;
    snprintf(path, sizeof path, "%s.samples.%d.count", fam, i);
    if (!nsa_client_value_get_double(m, path, &v)) h->count += v;
    found = 1;
  }
  return found;
}

/* Upper bound of the bucket holding quantile q of (cur - prev). */
static double hist_quantile(const hist_t *cur, const hist_t *prev, double q) {
  double total = cur->cnt[cur->nle] - (prev ? prev->cnt[cur->nle] : 0);
  if (total <= 0) return NAN;
  for (int j = 0; j <= cur->nle; j++) {
    double c = cur->cnt[j] - (prev ? prev->cnt[j] : 0);
    if (c >= q * total) return j < cur->nle ? cur->le[j] : INFINITY;
  }
  return INFINITY;
}

/* ------------------------------------------------------------ commands --- */

static int cmd_status(nsa_client_t *c) {
  const nsa_client_info_t *in = nsa_client_info(c);
  nsa_client_value_t *m = NULL, *f = NULL;
  if (nsa_client_metrics_get(c, &m) != 0) return fail(c, "metrics.get");
  if (nsa_client_flags_get(c, &f) != 0) {
    nsa_client_value_free(m);
    return fail(c, "flags.get");
  }
  double sessions = family_sum(m, "nsad_sessions", NULL, NULL);
  double reqs = family_sum(m, "nsad_requests_total", NULL, NULL);
  double regions = family_sum(m, "nsad_regions", NULL, NULL);
  double depth = family_sum(m, "nsad_queue_depth", NULL, NULL);
  int64_t epoch = 0;
  nsa_client_value_get_int(f, "epoch", &epoch);
  if (g_json) {
    char *fj = nsa_client_value_json(f, 0);
    printf("{\"ok\":true,\"server\":\"%s\",\"protocol\":%d,\"backend\":\"%s\",\"devices\":[", in->server,
           in->protocol, in->backend);
    for (int i = 0; i < in->ndevices; i++) printf("%s\"%s\"", i ? "," : "", in->devices[i]);
    printf("],\"session\":%llu,\"flags_epoch\":%lld,\"sessions\":%.0f,\"requests_total\":%.0f,"
           "\"regions\":%.0f,\"queue_depth\":%.0f,\"flags\":%s}\n",
           (unsigned long long)in->session, (long long)epoch, sessions, reqs, regions, depth, fj);
    free(fj);
  } else {
    printf("server:       %s (protocol %d)\n", in->server, in->protocol);
    printf("backend:      %s\n", in->backend);
    for (int i = 0; i < in->ndevices; i++) printf("device %d:     %s\n", i, in->devices[i]);
    printf("sessions:     %.0f\n", sessions);
    printf("requests:     %.0f\n", reqs);
    printf("regions:      %.0f\n", regions);
    printf("queue depth:  %.0f\n", depth);
    printf("flags epoch:  %lld\n", (long long)epoch);
    int n = nsa_client_value_len(f, "flags");
    for (int i = 0; i < n; i++) {
      char name[64], path[128], val[64], src[32];
      nsa_client_value_key(f, "flags", i, name, sizeof name);
      snprintf(path, sizeof path, "flags.%s.value", name);
      nsa_client_value_get_str(f, path, val, sizeof val);
      snprintf(path, sizeof path, "flags.%s.source", name);
      nsa_client_value_get_str(f, path, src, sizeof src);
      printf("  %-22s %-8s (%s)\n", name, val, src);
    }
  }
  nsa_client_value_free(m);
  nsa_client_value_free(f);
  return 0;
}

static int cmd_ping(nsa_client_t *c) {
  double t0 = now_s();
  if (nsa_client_ping(c) != 0) return fail(c, "ping");
  double ms = (now_s() - t0) * 1e3;
  if (g_json)
    printf("{\"ok\":true,\"rtt_ms\":%.3f}\n", ms);
  else
    printf("pong from %s (%s backend): %.3f ms\n", nsa_client_info(c)->server,
           nsa_client_info(c)->backend, ms);
  return 0;
}

static int cmd_flags_get(nsa_client_t *c) {
  nsa_client_value_t *f = NULL;
  if (nsa_client_flags_get(c, &f) != 0) return fail(c, "flags.get");
  if (g_json) {
    char *j = nsa_client_value_json(f, 0);
    printf("%s\n", j);
    free(j);
  } else {
    int64_t epoch = 0;
    nsa_client_value_get_int(f, "epoch", &epoch);
    printf("epoch %lld\n", (long long)epoch);
    printf("%-22s %-8s %-8s %-10s %s\n", "FLAG", "VALUE", "SOURCE", "EFFECTIVE", "ROLLOUT");
    int n = nsa_client_value_len(f, "flags");
    for (int i = 0; i < n; i++) {
      char name[64], path[160], val[64] = "", src[32] = "", eff[64] = "", roll[256] = "-";
      nsa_client_value_key(f, "flags", i, name, sizeof name);
      snprintf(path, sizeof path, "flags.%s.value", name);
      nsa_client_value_get_str(f, path, val, sizeof val);
      snprintf(path, sizeof path, "flags.%s.source", name);
      nsa_client_value_get_str(f, path, src, sizeof src);
      snprintf(path, sizeof path, "effective.%s", name);
      nsa_client_value_get_str(f, path, eff, sizeof eff);
      snprintf(path, sizeof path, "flags.%s.rollout", name);
      if (nsa_client_value_len(f, path) > 0) nsa_client_value_get_str(f, path, roll, sizeof roll);
      printf("%-22s %-8s %-8s %-10s %s\n", name, val, src, eff, roll);
    }
  }
  nsa_client_value_free(f);
  return 0;
}

static int cmd_flags_set(nsa_client_t *c, int argc, char **argv) {
  const char *assign = NULL;
  double percent = -1;
  nsa_client_label_t match[16];
  char mbuf[16][256];
  int nmatch = 0;
  for (int i = 0; i < argc; i++) {
    if (!strcmp(argv[i], "--percent") && i + 1 < argc) {
      char *end;
      percent = strtod(argv[++i], &end);
      if (*end || percent < 0 || percent > 100) {
        fprintf(stderr, "nsactl: --percent wants 0..100\n");
        return 2;
      }
    } else if (!strcmp(argv[i], "--match") && i + 1 < argc) {
      if (nmatch == 16) return 2;
      snprintf(mbuf[nmatch], sizeof mbuf[nmatch], "%s", argv[++i]);
      char *eq = strchr(mbuf[nmatch], '=');
      if (!eq) {
        fprintf(stderr, "nsactl: --match wants k=v\n");
        return 2;
      }
      *eq = 0;
      match[nmatch].key = mbuf[nmatch];
      match[nmatch].value = eq + 1;
      nmatch++;
    } else if (!assign) {
      assign = argv[i];
    } else {
      usage(stderr);
      return 2;
    }
  }
  char name[128];
  const char *eq = assign ? strchr(assign, '=') : NULL;
  if (!eq || eq == assign || (size_t)(eq - assign) >= sizeof name) {
    fprintf(stderr, "nsactl: flags set wants NAME=VALUE\n");
    return 2;
  }
  memcpy(name, assign, (size_t)(eq - assign));
  name[eq - assign] = 0;
  uint64_t epoch = 0;
  if (nsa_client_flags_set(c, name, eq + 1, percent, match, nmatch, &epoch) != 0)
    return fail(c, "flags.set");
  if (g_json)
    printf("{\"ok\":true,\"epoch\":%llu}\n", (unsigned long long)epoch);
  else
    printf("%s=%s set (epoch %llu)\n", name, eq + 1, (unsigned long long)epoch);
  return 0;
}

static int cmd_flags_reset(nsa_client_t *c, const char *name) {
  uint64_t epoch = 0;
  if (nsa_client_flags_reset(c, name, &epoch) != 0) return fail(c, "flags.reset");
  if (g_json)
    printf("{\"ok\":true,\"epoch\":%llu}\n", (unsigned long long)epoch);
  else
    printf("%s reset (epoch %llu)\n", name, (unsigned long long)epoch);
  return 0;
}

static void print_labels(const nsa_client_value_t *m, const char *path) {
  int n = nsa_client_value_len(m, path);
  if (n <= 0) return;
  printf("{");
  for (int i = 0; i < n; i++) {
    char k[64], v[128], p[480];
    nsa_client_value_key(m, path, i, k, sizeof k);
    snprintf(p, sizeof p, "%s.%s", path, k);
    nsa_client_value_get_str(m, p, v, sizeof v);
    printf("%s%s=\"%s\"", i ? "," : "", k, v);
  }
  printf("}");
}

static int cmd_metrics(nsa_client_t *c, int prometheus) {
  if (prometheus) {
    char *text = NULL;
    if (nsa_client_metrics_prometheus(c, &text) != 0) return fail(c, "metrics.get");
    fputs(text, stdout);
    free(text);
    return 0;
  }
  nsa_client_value_t *m = NULL;
  if (nsa_client_metrics_get(c, &m) != 0) return fail(c, "metrics.get");
  if (g_json) {
    char *j = nsa_client_value_json(m, 0);
    printf("%s\n", j);
    free(j);
  } else {
    int nf = nsa_client_value_len(m, "");
    for (int f = 0; f < nf; f++) {
      char fam[128], path[256], type[32] = "";
      nsa_client_value_key(m, "", f, fam, sizeof fam);
      snprintf(path, sizeof path, "%s.type", fam);
      nsa_client_value_get_str(m, path, type, sizeof type);
      snprintf(path, sizeof path, "%s.samples", fam);
      int ns = nsa_client_value_len(m, path);
      for (int s = 0; s < ns; s++) {
        char lp[400];
        snprintf(lp, sizeof lp, "%s.samples.%d.labels", fam, s);
        printf("%s", fam);
        print_labels(m, lp);
        double v = 0, sum = 0, cnt = 0;
        if (!strcmp(type, "histogram")) {
          snprintf(lp, sizeof lp, "%s.samples.%d.count", fam, s);
          nsa_client_value_get_double(m, lp, &cnt);
          snprintf(lp, sizeof lp, "%s.samples.%d.sum", fam, s);
          nsa_client_value_get_double(m, lp, &sum);
          printf(" count=%.0f sum=%g mean=%g\n", cnt, sum, cnt > 0 ? sum / cnt : 0.0);
        } else {
          snprintf(lp, sizeof lp, "%s.samples.%d.value", fam, s);
          nsa_client_value_get_double(m, lp, &v);
          printf(" %.17g\n", v);
        }
      }
    }
  }
  nsa_client_value_free(m);
  return 0;
}

static const char *const k_paths[] = {"varlen_v2", "varlen_v1", "packed"};

static int cmd_top(nsa_client_t *c, int interval_ms, int count) {
  nsa_client_value_t *prev = NULL;
  double tprev = 0;
  int tty = isatty(1);
  for (int it = 0; count <= 0 || it < count; it++) {
    nsa_client_value_t *m = NULL, *f = NULL;
    if (nsa_client_metrics_get(c, &m) != 0) return fail(c, "metrics.get");
    if (nsa_client_flags_get(c, &f) != 0) {
      nsa_client_value_free(m);
      return fail(c, "flags.get");
    }
    double t = now_s(), dt = prev ? t - tprev : 0;
    if (tty && !g_json) printf("\033[H\033[2J");
    int64_t epoch = 0;
    nsa_client_value_get_int(f, "epoch", &epoch);
    if (g_json) printf("{\"t\":%.3f,\"sessions\":%.0f,\"flags_epoch\":%lld,\"paths\":{", t,
                       family_sum(m, "nsad_sessions", NULL, NULL), (long long)epoch);
    else
      printf("%s  backend %s  sessions %.0f  queue %.0f  flags epoch %lld\n\n",
             nsa_client_info(c)->server, nsa_client_info(c)->backend,
             family_sum(m, "nsad_sessions", NULL, NULL),
             family_sum(m, "nsad_queue_depth", NULL, NULL), (long long)epoch);
    if (!g_json)
      printf("%-10s %10s %12s %12s %12s %10s\n", "PATH", "REQ/S", "TOTAL", "P50 LAT", "P99 LAT",
             "MEAN KEYS");
    for (int p = 0; p < 3; p++) {
      double tot = family_sum(m, "nsad_requests_total", "path", k_paths[p]);
      double rate = prev && dt > 0
                        ? (tot - family_sum(prev, "nsad_requests_total", "path", k_paths[p])) / dt
                        : 0;
      hist_t hc, hp, rk;
      double p50 = NAN, p99 = NAN, keys = NAN;
      if (family_hist(m, "nsad_request_duration_seconds", "path", k_paths[p], &hc)) {
        int hasp = prev && family_hist(prev, "nsad_request_duration_seconds", "path", k_paths[p], &hp);
        const hist_t *base = hasp && hc.cnt[hc.nle] > hp.cnt[hp.nle] ? &hp : NULL;
        p50 = hist_quantile(&hc, base, 0.5);
        p99 = hist_quantile(&hc, base, 0.99);
      }
      if (family_hist(m, "nsad_row_keys", "path", k_paths[p], &rk) && rk.count > 0)
        keys = rk.sum / rk.count;
      if (g_json)
        printf("%s\"%s\":{\"rate\":%.3f,\"total\":%.0f,\"p50_s\":%.9g,\"p99_s\":%.9g,\"mean_keys\":%.6g}",
               p ? "," : "", k_paths[p], rate, tot, isfinite(p50) ? p50 : -1,
               isfinite(p99) ? p99 : -1, isfinite(keys) ? keys : -1);
      else {
        char a[32] = "-", b[32] = "-", k[32] = "-";
        if (isfinite(p50)) snprintf(a, sizeof a, "%.3fms", p50 * 1e3);
        if (isfinite(p99)) snprintf(b, sizeof b, "%.3fms", p99 * 1e3);
        if (isfinite(keys)) snprintf(k, sizeof k, "%.1f", keys);
        printf("%-10s %10.1f %12.0f %12s %12s %10s\n", k_paths[p], rate, tot, a, b, k);
      }
    }
    if (g_json) {
      printf("}}\n");
    } else {
      printf("\nshadow (primary vs shadow): max abs / max rel difference\n");
      int ns = nsa_client_value_len(m, "nsad_shadow_max_abs_diff.samples"), shown = 0;
      for (int s = 0; s < ns; s++) {
        char path[160], a[32] = "?", b[32] = "?";
        double abs_d = 0, rel_d = 0;
        snprintf(path, sizeof path, "nsad_shadow_max_abs_diff.samples.%d.labels.primary", s);
        nsa_client_value_get_str(m, path, a, sizeof a);
        snprintf(path, sizeof path, "nsad_shadow_max_abs_diff.samples.%d.labels.shadow", s);
        nsa_client_value_get_str(m, path, b, sizeof b);
        snprintf(path, sizeof path, "nsad_shadow_max_abs_diff.samples.%d.value", s);
        nsa_client_value_get_double(m, path, &abs_d);
        snprintf(path, sizeof path, "nsad_shadow_max_rel_diff.samples.%d.value", s);
        nsa_client_value_get_double(m, path, &rel_d);
        double runs = family_sum2(m, "nsad_shadow_comparisons_total", "primary", a, "shadow", b);
        if (runs <= 0) continue;
        printf("  %-10s vs %-10s %12.3g %12.3g  (%.0f runs)\n", a, b, abs_d, rel_d, runs);
        shown++;
      }
      if (!shown) printf("  (no shadow runs; NSA_SEL_SHADOW_RATE=0?)\n");
      printf("\nflags\n");
      int n = nsa_client_value_len(f, "flags");
      for (int i = 0; i < n; i++) {
        char name[64], path[160], val[64] = "", src[32] = "";
        nsa_client_value_key(f, "flags", i, name, sizeof name);
        snprintf(path, sizeof path, "flags.%s.value", name);
        nsa_client_value_get_str(f, path, val, sizeof val);
        snprintf(path, sizeof path, "flags.%s.source", name);
        nsa_client_value_get_str(f, path, src, sizeof src);
        printf("  %-22s %-8s (%s)\n", name, val, src);
      }
    }
    fflush(stdout);
    nsa_client_value_free(f);
    nsa_client_value_free(prev);
    prev = m;
    tprev = t;
    if (count <= 0 || it + 1 < count) usleep((useconds_t)interval_ms * 1000);
  }
  nsa_client_value_free(prev);
  return 0;
}

int main(int argc, char **argv) {
  const char *sock = NULL;
  char *args[64];
  int nargs = 0;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--socket") && i + 1 < argc)
      sock = argv[++i];
    else if (!strncmp(argv[i], "--socket=", 9))
      sock = argv[i] + 9;
    else if (!strcmp(argv[i], "--json"))
      g_json = 1;
    else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
      usage(stdout);
      return 0;
    } else if (nargs < 64)
      args[nargs++] = argv[i];
  }
  if (nargs == 0) {
    usage(stderr);
    return 2;
  }
  const char *cmd = args[0];
  int prometheus = 0, interval = 1000, count = 0;
  if (!strcmp(cmd, "metrics")) {
    for (int i = 1; i < nargs; i++) {
      if (!strcmp(args[i], "--prometheus")) prometheus = 1;
      else {
        usage(stderr);
        return 2;
      }
    }
  } else if (!strcmp(cmd, "top")) {
    for (int i = 1; i < nargs; i++) {
      if (!strcmp(args[i], "--interval") && i + 1 < nargs) interval = atoi(args[++i]);
      else if (!strcmp(args[i], "--count") && i + 1 < nargs) count = atoi(args[++i]);
      else {
        usage(stderr);
        return 2;
      }
    }
    if (interval < 50) interval = 50;
  } else if (!strcmp(cmd, "flags")) {
    if (nargs < 2 || (strcmp(args[1], "get") && strcmp(args[1], "set") && strcmp(args[1], "reset")) ||
        (!strcmp(args[1], "reset") && nargs != 3) || (!strcmp(args[1], "get") && nargs != 2)) {
      usage(stderr);
      return 2;
    }
  } else if (strcmp(cmd, "status") && strcmp(cmd, "ping") && strcmp(cmd, "shutdown")) {
    fprintf(stderr, "nsactl: unknown command '%s'\n", cmd);
    usage(stderr);
    return 2;
  }
  nsa_client_opts_t o = {.socket_path = sock, .name = "nsactl", .timeout_ms = 30000,
                         .reconnect_attempts = 3};
  nsa_client_t *c = NULL;
  if (nsa_client_open(&c, &o) != 0) {
    if (g_json) {
      printf("{\"ok\":false,\"error\":");
      json_puts(nsa_client_open_error());
      printf("}\n");
    }
    fprintf(stderr, "nsactl: %s\n", nsa_client_open_error());
    return 1;
  }
  int rc;
  if (!strcmp(cmd, "status")) rc = cmd_status(c);
  else if (!strcmp(cmd, "ping")) rc = cmd_ping(c);
  else if (!strcmp(cmd, "metrics")) rc = cmd_metrics(c, prometheus);
  else if (!strcmp(cmd, "top")) rc = cmd_top(c, interval, count);
  else if (!strcmp(cmd, "shutdown")) {
    rc = nsa_client_shutdown(c) != 0 ? fail(c, "shutdown") : 0;
    if (!rc) printf(g_json ? "{\"ok\":true}\n" : "nsad is shutting down\n");
  } else if (!strcmp(args[1], "get")) rc = cmd_flags_get(c);
  else if (!strcmp(args[1], "set")) rc = cmd_flags_set(c, nargs - 2, args + 2);
  else rc = cmd_flags_reset(c, args[2]);
  nsa_client_close(c);
  return rc;
}
