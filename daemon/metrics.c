/*
 * metrics.c — the telemetry registry (metrics.h).
 *
 * Every metric cell is a C11 atomic in one fixed struct, so worker threads,
 * the loop thread and the HTTP thread record and read without any lock:
 *   counters    _Atomic uint64_t, relaxed fetch_add
 *   gauges      _Atomic uint64_t holding the bits of a double (set = store,
 *               add / max = compare-exchange loop on that one cell)
 *   histograms  one _Atomic uint64_t per bucket (non-cumulative) + a sum
 *               cell in integer units (ns, keys) so it stays exact
 * Cells are indexed by small enums (method × path × code), so no allocation
 * or lookup happens on the hot path. Rendering reads each cell once; a
 * histogram's _count is the sum of the bucket counts read, so +Inf == _count
 * always holds even while workers keep recording.
 *
 * Label index maps:
 *   path index p = 0..NSA_PATH_COUNT-1 (nsa_path_t), NSA_PATH_COUNT = "none"
 *   req[method][p][code]   method NSA_M_COUNT = "unknown" (unparseable name)
 *   shadow[primary][shadow] (paths only)
 */
#include "metrics.h"

#include <math.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#define NP (NSA_PATH_COUNT + 1) /* paths + "none" */
#define MAX_FLAGS 16

/* Request latency and device time bucket upper bounds, seconds. */
static const double k_lat_le[] = {25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3,
                                  5e-3,  10e-3, 25e-3,  50e-3,  0.1,  0.25, 0.5,
                                  1.0,   2.5,   5.0,    10.0};
#define NLAT ((int)(sizeof k_lat_le / sizeof k_lat_le[0]))
#define NROWK NSA_LEN_HIST_BUCKETS /* incl. +Inf */

/* Request phase bucket upper bounds, seconds: the host-side phases are
 * microseconds to a few milliseconds (the backend phase of a sync request
 * includes its device time). */
static const double k_ph_le[] = {1e-6,   2.5e-6, 5e-6,   10e-6, 25e-6, 50e-6, 100e-6, 250e-6,
                                 500e-6, 1e-3,   2.5e-3, 5e-3,  10e-3, 25e-3, 0.1,    1.0};
#define NPH ((int)(sizeof k_ph_le / sizeof k_ph_le[0]))
static const char *const k_ph_names[NSAD_PH_COUNT] = {
    "decode", "submit", "queue", "backend", "post", "complete", "reply", "total"};

typedef struct {
  _Atomic uint64_t b[NLAT + 1]; /* last = +Inf */
  _Atomic uint64_t sum_ns;
} lat_hist_t;

typedef struct {
  _Atomic uint64_t b[NPH + 1]; /* last = +Inf */
  _Atomic uint64_t sum_ns;
} ph_hist_t;

typedef struct {
  _Atomic uint64_t b[NROWK];
  _Atomic uint64_t sum; /* keys */
} rowk_hist_t;

typedef struct {
  _Atomic int state; /* 0 empty, 1 being named, 2 ready */
  char name[64];
  _Atomic uint64_t bits;
} flag_cell_t;

struct nsad_metrics {
  _Atomic uint64_t req[NSA_M_COUNT + 1][NP][NSA_E_COUNT];
  _Atomic uint64_t errors[NSA_E_COUNT];
  lat_hist_t req_lat[NP];
  lat_hist_t dev_lat[NSA_PATH_COUNT];
  ph_hist_t phase[2][NSAD_PH_COUNT]; /* [sync][phase] */
  rowk_hist_t rowk[NSA_PATH_COUNT];
  _Atomic uint64_t rows[NSA_PATH_COUNT];
  _Atomic uint64_t gauge[NSAD_G_COUNT];
  _Atomic uint64_t ws_peak;
  flag_cell_t flags[MAX_FLAGS];
  _Atomic uint64_t sh_count[NSA_PATH_COUNT][NSA_PATH_COUNT];
  _Atomic uint64_t sh_abs[NSA_PATH_COUNT][NSA_PATH_COUNT]; /* double bits */
  _Atomic uint64_t sh_rel[NSA_PATH_COUNT][NSA_PATH_COUNT];
  double start_time;
};

/* ------------------------------------------------------------ cells --- */

static uint64_t d2u(double d) {
  uint64_t u;
  memcpy(&u, &d, sizeof u);
  return u;
}
static double u2d(uint64_t u) {
  double d;
  memcpy(&d, &u, sizeof d);
  return d;
}
static void cnt_add(_Atomic uint64_t *c, uint64_t n) {
  atomic_fetch_add_explicit(c, n, memory_order_relaxed);
}
static uint64_t cnt_get(_Atomic uint64_t *c) {
  return atomic_load_explicit(c, memory_order_relaxed);
}
static void dbl_set(_Atomic uint64_t *c, double v) {
  atomic_store_explicit(c, d2u(v), memory_order_relaxed);
}
static double dbl_get(_Atomic uint64_t *c) {
  return u2d(atomic_load_explicit(c, memory_order_relaxed));
}
static void dbl_add(_Atomic uint64_t *c, double dv) {
  uint64_t old = atomic_load_explicit(c, memory_order_relaxed);
  while (!atomic_compare_exchange_weak_explicit(c, &old, d2u(u2d(old) + dv), memory_order_relaxed,
                                                memory_order_relaxed)) {
  }
}
/* Max of the values seen; NaN counts as +Inf (a NaN difference is the worst
 * disagreement there is, and must not be lost by a comparison). */
static void dbl_max(_Atomic uint64_t *c, double v) {
  if (isnan(v)) v = INFINITY;
  uint64_t old = atomic_load_explicit(c, memory_order_relaxed);
  while (u2d(old) < v && !atomic_compare_exchange_weak_explicit(c, &old, d2u(v),
                                                                memory_order_relaxed,
                                                                memory_order_relaxed)) {
  }
}

static int lat_bucket(double s) {
  for (int i = 0; i < NLAT; i++)
    if (s <= k_lat_le[i]) return i;
  return NLAT;
}

static void lat_observe(lat_hist_t *h, double s) {
  if (!(s >= 0)) s = 0; /* NaN / negative clock skew */
  cnt_add(&h->b[lat_bucket(s)], 1);
  cnt_add(&h->sum_ns, (uint64_t)llround(s * 1e9));
}

static int pidx(int path) { return (path >= 0 && path < NSA_PATH_COUNT) ? path : NSA_PATH_COUNT; }
static const char *pname(int p) {
  return p < NSA_PATH_COUNT ? nsa_path_name((nsa_path_t)p) : "none";
}

/* -------------------------------------------------------- lifecycle --- */

nsad_metrics_t *nsad_metrics_new(void) {
  nsad_metrics_t *m = calloc(1, sizeof *m);
  if (!m) return NULL;
  /* calloc zero bits are 0.0 doubles and 0 counters; atomics of integer type
   * are lock-free on every target we build for, so zero bytes are valid. */
  struct timeval tv;
  gettimeofday(&tv, NULL);
  m->start_time = (double)tv.tv_sec + tv.tv_usec * 1e-6;
  return m;
}

void nsad_metrics_free(nsad_metrics_t *m) { free(m); }

/* -------------------------------------------------------- recording --- */

void nsad_metrics_request(nsad_metrics_t *m, nsa_method_t method, int path, nsa_proto_code_t code,
                          double latency_s) {
  if (!m) return;
  int p = pidx(path);
  int c = ((int)code >= 0 && code < NSA_E_COUNT) ? (int)code : NSA_E_INTERNAL;
  int a = ((int)method >= 0 && method < NSA_M_COUNT) ? (int)method : NSA_M_COUNT;
  cnt_add(&m->req[a][p][c], 1);
  if (c != NSA_E_OK) cnt_add(&m->errors[c], 1);
  lat_observe(&m->req_lat[p], latency_s);
}

const char *nsad_phase_name(nsad_phase_t ph) {
  return ((int)ph >= 0 && ph < NSAD_PH_COUNT) ? k_ph_names[ph] : "?";
}

void nsad_metrics_phase(nsad_metrics_t *m, int sync, nsad_phase_t ph, double s) {
  if (!m || (int)ph < 0 || ph >= NSAD_PH_COUNT) return;
  if (!(s >= 0)) s = 0; /* NaN */
  int b = 0;
  while (b < NPH && s > k_ph_le[b]) b++;
  ph_hist_t *h = &m->phase[sync != 0][ph];
  cnt_add(&h->b[b], 1);
  cnt_add(&h->sum_ns, (uint64_t)llround(s * 1e9));
}

void nsad_metrics_kernel(nsad_metrics_t *m, int path, const nsa_run_info_t *info) {
  if (!m || !info || path < 0 || path >= NSA_PATH_COUNT) return;
  lat_observe(&m->dev_lat[path], info->device_us * 1e-6);
  if (info->rows > 0) cnt_add(&m->rows[path], (uint64_t)info->rows);
  rowk_hist_t *h = &m->rowk[path];
  for (int i = 0; i < NROWK; i++)
    if (info->len_hist[i] > 0) cnt_add(&h->b[i], (uint64_t)info->len_hist[i]);
  double keys = info->mean_len * (double)info->rows;
  if (keys > 0 && isfinite(keys)) cnt_add(&h->sum, (uint64_t)llround(keys));
  uint64_t ws = info->workspace_bytes, old = cnt_get(&m->ws_peak);
  while (old < ws && !atomic_compare_exchange_weak_explicit(&m->ws_peak, &old, ws,
                                                            memory_order_relaxed,
                                                            memory_order_relaxed)) {
  }
}

void nsad_metrics_shadow(nsad_metrics_t *m, int primary, int shadow, double max_abs,
                         double max_rel) {
  if (!m || primary < 0 || primary >= NSA_PATH_COUNT || shadow < 0 || shadow >= NSA_PATH_COUNT)
    return;
  cnt_add(&m->sh_count[primary][shadow], 1);
  dbl_max(&m->sh_abs[primary][shadow], max_abs);
  dbl_max(&m->sh_rel[primary][shadow], max_rel);
}

void nsad_metrics_gauge_set(nsad_metrics_t *m, nsad_gauge_t g, double v) {
  if (m && (int)g >= 0 && g < NSAD_G_COUNT) dbl_set(&m->gauge[g], v);
}

void nsad_metrics_gauge_add(nsad_metrics_t *m, nsad_gauge_t g, double dv) {
  if (m && (int)g >= 0 && g < NSAD_G_COUNT) dbl_add(&m->gauge[g], dv);
}

double nsad_metrics_gauge_get(nsad_metrics_t *m, nsad_gauge_t g) {
  if (!m || (int)g < 0 || g >= NSAD_G_COUNT) return 0;
  return dbl_get(&m->gauge[g]);
}

void nsad_metrics_flag_value(nsad_metrics_t *m, int flag_id, const char *name, double v) {
  if (!m || flag_id < 0 || flag_id >= MAX_FLAGS || !name) return;
  flag_cell_t *c = &m->flags[flag_id];
  int st = atomic_load_explicit(&c->state, memory_order_acquire);
  if (st == 0) {
    int expect = 0;
    if (atomic_compare_exchange_strong(&c->state, &expect, 1)) {
      snprintf(c->name, sizeof c->name, "%s", name);
      dbl_set(&c->bits, v);
      atomic_store_explicit(&c->state, 2, memory_order_release);
      return;
    }
  }
  dbl_set(&c->bits, v);
}

uint64_t nsad_metrics_requests(nsad_metrics_t *m, int method, int path, int code) {
  uint64_t n = 0;
  for (int a = 0; a <= NSA_M_COUNT; a++)
    for (int p = 0; p < NP; p++)
      for (int c = 0; c < NSA_E_COUNT; c++)
        if ((method < 0 || a == method) && (path == -2 || p == pidx(path)) &&
            (code < 0 || c == code))
          n += cnt_get(&m->req[a][p][c]);
  return n;
}

/* -------------------------------------------------------- rendering --- */

/* One sample with up to three labels (all label values are static strings
 * or names stored in the registry). */
typedef struct {
  const char *k[3], *v[3];
  int nl;
  int is_int;
  uint64_t u;
  double d;
  /* histogram */
  int nb;
  const double *le;       /* nb-1 finite bounds */
  const int64_t *le_int;  /* or integer bounds */
  uint64_t cum[(NLAT > NPH ? NLAT : NPH) + 2];
  double sum;
} sample_t;

typedef struct {
  int prom;
  /* text */
  char *buf;
  size_t len, cap;
  int oom;
  /* map */
  msgpack_packer *pk;
  sample_t *s;
  int ns, cap_s;
  int nfam;
} emit_t;

static void tx(emit_t *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void tx(emit_t *e, const char *fmt, ...) {
  if (e->oom) return;
  for (;;) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(e->buf + e->len, e->cap - e->len, fmt, ap);
    va_end(ap);
    if (n < 0) {
      e->oom = 1;
      return;
    }
    if ((size_t)n < e->cap - e->len) {
      e->len += (size_t)n;
      return;
    }
    size_t nc = e->cap * 2 + (size_t)n + 1;
    char *nb = realloc(e->buf, nc);
    if (!nb) {
      e->oom = 1;
      return;
    }
    e->buf = nb;
    e->cap = nc;
  }
}

/* Exposition-format number: integers exact, doubles shortest round-trip,
 * +Inf / -Inf / NaN spelled as Prometheus reads them. */
static void fmt_num(double v, char *b, size_t n) {
  if (isnan(v)) { snprintf(b, n, "NaN"); return; }
  if (isinf(v)) { snprintf(b, n, v > 0 ? "+Inf" : "-Inf"); return; }
  if (v == floor(v) && fabs(v) < 1e15) { snprintf(b, n, "%.0f", v); return; }
  for (int p = 6; p <= 17; p++) {
    snprintf(b, n, "%.*g", p, v);
    if (strtod(b, NULL) == v) return;
  }
}

static void tx_escaped(emit_t *e, const char *s) {
  for (; *s; s++) {
    if (*s == '\\') tx(e, "\\\\");
    else if (*s == '"') tx(e, "\\\"");
    else if (*s == '\n') tx(e, "\\n");
    else tx(e, "%c", *s);
  }
}

static void tx_labels(emit_t *e, const sample_t *s, const char *extra_k, const char *extra_v) {
  if (!s->nl && !extra_k) return;
  tx(e, "{");
  for (int i = 0; i < s->nl; i++) {
    tx(e, "%s%s=\"", i ? "," : "", s->k[i]);
    tx_escaped(e, s->v[i]);
    tx(e, "\"");
  }
  if (extra_k) tx(e, "%s%s=\"%s\"", s->nl ? "," : "", extra_k, extra_v);
  tx(e, "}");
}

static sample_t *add_sample(emit_t *e) {
  if (e->ns == e->cap_s) {
    int nc = e->cap_s ? e->cap_s * 2 : 64;
    sample_t *ns = realloc(e->s, (size_t)nc * sizeof *ns);
    if (!ns) return NULL;
    e->s = ns;
    e->cap_s = nc;
  }
  sample_t *s = &e->s[e->ns++];
  memset(s, 0, sizeof *s);
  return s;
}

static void pk_str(msgpack_packer *pk, const char *s) {
  size_t n = strlen(s);
  msgpack_pack_str(pk, n);
  msgpack_pack_str_body(pk, s, n);
}

static void bound_text(const sample_t *s, int i, char *b, size_t n) {
  if (i == s->nb - 1) snprintf(b, n, "+Inf");
  else if (s->le_int) snprintf(b, n, "%lld", (long long)s->le_int[i]);
  else fmt_num(s->le[i], b, n);
}

/* Emits one family from the samples collected in e->s, then clears them. */
static void flush_family(emit_t *e, const char *name, const char *type, const char *help) {
  if (e->prom) {
    tx(e, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
    char num[64], le[64];
    for (int i = 0; i < e->ns; i++) {
      const sample_t *s = &e->s[i];
      if (strcmp(type, "histogram") == 0) {
        for (int b = 0; b < s->nb; b++) {
          bound_text(s, b, le, sizeof le);
          tx(e, "%s_bucket", name);
          tx_labels(e, s, "le", le);
          tx(e, " %llu\n", (unsigned long long)s->cum[b]);
        }
        fmt_num(s->sum, num, sizeof num);
        tx(e, "%s_sum", name);
        tx_labels(e, s, NULL, NULL);
        tx(e, " %s\n%s_count", num, name);
        tx_labels(e, s, NULL, NULL);
        tx(e, " %llu\n", (unsigned long long)s->cum[s->nb - 1]);
      } else {
        tx(e, "%s", name);
        tx_labels(e, s, NULL, NULL);
        if (s->is_int)
          tx(e, " %llu\n", (unsigned long long)s->u);
        else {
          fmt_num(s->d, num, sizeof num);
          tx(e, " %s\n", num);
        }
      }
    }
  } else {
    msgpack_packer *pk = e->pk;
    pk_str(pk, name);
    msgpack_pack_map(pk, 3);
    pk_str(pk, "type");
    pk_str(pk, type);
    pk_str(pk, "help");
    pk_str(pk, help);
    pk_str(pk, "samples");
    msgpack_pack_array(pk, (size_t)e->ns);
    for (int i = 0; i < e->ns; i++) {
      const sample_t *s = &e->s[i];
      int hist = strcmp(type, "histogram") == 0;
      msgpack_pack_map(pk, hist ? 5 : 2);
      pk_str(pk, "labels");
      msgpack_pack_map(pk, (size_t)s->nl);
      for (int l = 0; l < s->nl; l++) {
        pk_str(pk, s->k[l]);
        pk_str(pk, s->v[l]);
      }
      if (hist) {
        pk_str(pk, "le");
        msgpack_pack_array(pk, (size_t)(s->nb - 1));
        for (int b = 0; b < s->nb - 1; b++)
          msgpack_pack_double(pk, s->le_int ? (double)s->le_int[b] : s->le[b]);
        pk_str(pk, "counts");
        msgpack_pack_array(pk, (size_t)s->nb);
        for (int b = 0; b < s->nb; b++) msgpack_pack_uint64(pk, s->cum[b]);
        pk_str(pk, "sum");
        msgpack_pack_double(pk, s->sum);
        pk_str(pk, "count");
        msgpack_pack_uint64(pk, s->cum[s->nb - 1]);
      } else {
        pk_str(pk, "value");
        if (s->is_int)
          msgpack_pack_uint64(pk, s->u);
        else
          msgpack_pack_double(pk, s->d);
      }
    }
  }
  e->ns = 0;
  e->nfam++;
}

static void lab(sample_t *s, const char *k, const char *v) {
  if (s->nl < 3) {
    s->k[s->nl] = k;
    s->v[s->nl] = v;
    s->nl++;
  }
}

static void lat_sample(emit_t *e, lat_hist_t *h, const char *path) {
  sample_t *s = add_sample(e);
  if (!s) return;
  lab(s, "path", path);
  s->nb = NLAT + 1;
  s->le = k_lat_le;
  uint64_t c = 0;
  for (int b = 0; b <= NLAT; b++) s->cum[b] = (c += cnt_get(&h->b[b]));
  s->sum = (double)cnt_get(&h->sum_ns) * 1e-9;
}

static void gauge_family(emit_t *e, const char *name, const char *help, double v) {
  sample_t *s = add_sample(e);
  if (s) s->d = v;
  flush_family(e, name, "gauge", help);
}

static void render(nsad_metrics_t *m, emit_t *e) {
  sample_t *s;
  /* requests: only non-zero cells, or the family would have 672 series. */
  for (int a = 0; a <= NSA_M_COUNT; a++)
    for (int p = 0; p < NP; p++)
      for (int c = 0; c < NSA_E_COUNT; c++) {
        uint64_t v = cnt_get(&m->req[a][p][c]);
        if (!v || !(s = add_sample(e))) continue;
        lab(s, "method", a < NSA_M_COUNT ? nsa_method_name((nsa_method_t)a) : "unknown");
        lab(s, "path", pname(p));
        lab(s, "code", nsa_proto_code_name((nsa_proto_code_t)c));
        s->is_int = 1;
        s->u = v;
      }
  flush_family(e, "nsad_requests_total", "counter",
               "Requests answered, by method, kernel path (none if no kernel ran) and result code.");

  for (int c = 1; c < NSA_E_COUNT; c++) {
    if (!(s = add_sample(e))) continue;
    lab(s, "code", nsa_proto_code_name((nsa_proto_code_t)c));
    s->is_int = 1;
    s->u = cnt_get(&m->errors[c]);
  }
  flush_family(e, "nsad_errors_total", "counter", "Error replies by error code.");

  for (int p = 0; p < NP; p++) lat_sample(e, &m->req_lat[p], pname(p));
  flush_family(e, "nsad_request_duration_seconds", "histogram",
               "Request latency from receipt to reply, by kernel path.");

  for (int p = 0; p < NSA_PATH_COUNT; p++) lat_sample(e, &m->dev_lat[p], pname(p));
  flush_family(e, "nsad_device_seconds", "histogram",
               "Device time of a kernel run (planner + kernels), by path.");

  for (int sy = 0; sy < 2; sy++)
    for (int ph = 0; ph < NSAD_PH_COUNT; ph++) {
      if (!(s = add_sample(e))) continue;
      lab(s, "sync", sy ? "1" : "0");
      lab(s, "phase", k_ph_names[ph]);
      s->nb = NPH + 1;
      s->le = k_ph_le;
      uint64_t c = 0;
      for (int b = 0; b <= NPH; b++) s->cum[b] = (c += cnt_get(&m->phase[sy][ph].b[b]));
      s->sum = (double)cnt_get(&m->phase[sy][ph].sum_ns) * 1e-9;
    }
  flush_family(e, "nsad_request_phase_seconds", "histogram",
               "Host time of sel_attn requests inside nsad by request sync flag and phase: "
               "decode, submit, queue (worker wake-up), backend (the fwd/bwd call), post, "
               "complete (loop wake-up), reply; total = read to reply.");

  for (int p = 0; p < NSA_PATH_COUNT; p++) {
    if (!(s = add_sample(e))) continue;
    lab(s, "path", pname(p));
    s->nb = NROWK;
    s->le_int = nsa_len_hist_le;
    uint64_t c = 0;
    for (int b = 0; b < NROWK; b++) s->cum[b] = (c += cnt_get(&m->rowk[p].b[b]));
    s->sum = (double)cnt_get(&m->rowk[p].sum);
  }
  flush_family(e, "nsad_row_keys", "histogram",
               "Selected keys per attention row (row length after merging spans), by path.");

  for (int p = 0; p < NSA_PATH_COUNT; p++) {
    if (!(s = add_sample(e))) continue;
    lab(s, "path", pname(p));
    s->is_int = 1;
    s->u = cnt_get(&m->rows[p]);
  }
  flush_family(e, "nsad_rows_total", "counter", "Attention rows (b, t, g) computed, by path.");

  gauge_family(e, "nsad_sessions", "Connected client sessions.",
               dbl_get(&m->gauge[NSAD_G_SESSIONS]));
  gauge_family(e, "nsad_regions", "Registered memory regions.",
               dbl_get(&m->gauge[NSAD_G_REGIONS]));
  gauge_family(e, "nsad_mapped_bytes", "Bytes of client memory mapped through regions.",
               dbl_get(&m->gauge[NSAD_G_MAPPED_BYTES]));
  gauge_family(e, "nsad_workspace_bytes", "Daemon workspace memory currently allocated.",
               dbl_get(&m->gauge[NSAD_G_WORKSPACE_BYTES]));
  gauge_family(e, "nsad_workspace_peak_bytes", "Largest scratch memory one kernel run used.",
               (double)cnt_get(&m->ws_peak));
  gauge_family(e, "nsad_queue_depth", "Jobs queued or running on device workers.",
               dbl_get(&m->gauge[NSAD_G_QUEUE_DEPTH]));
  gauge_family(e, "nsad_flags_epoch", "Flag epoch (bumped on every flag change).",
               dbl_get(&m->gauge[NSAD_G_FLAGS_EPOCH]));

  for (int i = 0; i < MAX_FLAGS; i++) {
    flag_cell_t *c = &m->flags[i];
    if (atomic_load_explicit(&c->state, memory_order_acquire) != 2 || !(s = add_sample(e)))
      continue;
    lab(s, "flag", c->name);
    s->d = dbl_get(&c->bits);
  }
  flush_family(e, "nsad_flag_value", "gauge",
               "Flag value of the highest layer set (default < config < runtime), rollout rules "
               "not applied.");

  for (int pass = 0; pass < 3; pass++) {
    for (int a = 0; a < NSA_PATH_COUNT; a++)
      for (int b = 0; b < NSA_PATH_COUNT; b++) {
        if (a == b || !(s = add_sample(e))) continue;
        lab(s, "primary", pname(a));
        lab(s, "shadow", pname(b));
        if (pass == 0) {
          s->is_int = 1;
          s->u = cnt_get(&m->sh_count[a][b]);
        } else {
          s->d = dbl_get(pass == 1 ? &m->sh_abs[a][b] : &m->sh_rel[a][b]);
        }
      }
    if (pass == 0)
      flush_family(e, "nsad_shadow_comparisons_total", "counter",
                   "Shadow runs compared against the primary path's output, by path pair.");
    else if (pass == 1)
      flush_family(e, "nsad_shadow_max_abs_diff", "gauge",
                   "Largest absolute output difference seen between primary and shadow path.");
    else
      flush_family(e, "nsad_shadow_max_rel_diff", "gauge",
                   "Largest relative output difference |p-s|/max(|p|,|s|,1e-6) seen between "
                   "primary and shadow path.");
  }

  gauge_family(e, "nsad_start_time_seconds", "Start time of the daemon, Unix seconds.",
               m->start_time);
}

void nsad_metrics_pack_map(nsad_metrics_t *m, msgpack_packer *pk) {
  /* Families are packed into a side buffer first: the map header needs
   * their count, then the body is appended through the packer's callback. */
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  msgpack_packer tmp;
  msgpack_packer_init(&tmp, &sb, msgpack_sbuffer_write);
  emit_t e = {.prom = 0, .pk = &tmp};
  render(m, &e);
  free(e.s);
  msgpack_pack_map(pk, (size_t)e.nfam);
  if (sb.size) pk->callback(pk->data, sb.data, sb.size);
  msgpack_sbuffer_destroy(&sb);
}

char *nsad_metrics_prometheus(nsad_metrics_t *m, size_t *len) {
  emit_t e = {.prom = 1};
  e.cap = 16384;
  e.buf = malloc(e.cap);
  if (!e.buf) return NULL;
  e.buf[0] = 0;
  render(m, &e);
  free(e.s);
  if (e.oom) {
    free(e.buf);
    return NULL;
  }
  if (len) *len = e.len;
  return e.buf;
}
