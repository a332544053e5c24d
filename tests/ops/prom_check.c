/* prom_check.c — see prom_check.h. */
#include "prom_check.h"

#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAXFAM 256
#define MAXSER 4096

typedef struct {
  char name[128];
  char type[16];
  int has_help, has_type, has_samples, closed;
} fam_t;

typedef struct {
  /* histogram state of the current series (labels without le) */
  char key[512];
  double last_le;
  double last_cum;
  int have_inf;
  double inf_cum;
  int have_sum, have_count;
  double count;
} hstate_t;

typedef struct {
  fam_t fam[MAXFAM];
  int nfam;
  char *series[MAXSER];
  int nser;
  int cur; /* index of the family whose samples are being read, -1 none */
  hstate_t h[64];
  int nh;
  char *msg;
  size_t msglen;
  int line;
} st_t;

static int fail(st_t *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(st_t *s, const char *fmt, ...) {
  int n = snprintf(s->msg, s->msglen, "line %d: ", s->line);
  va_list ap;
  va_start(ap, fmt);
  if (n >= 0 && (size_t)n < s->msglen) vsnprintf(s->msg + n, s->msglen - (size_t)n, fmt, ap);
  va_end(ap);
  return -1;
}

static int is_name_start(int c) { return isalpha(c) || c == '_' || c == ':'; }
static int is_name_char(int c) { return isalnum(c) || c == '_' || c == ':'; }

/* Reads a metric name at *p; returns its length (0 if none). */
static size_t read_name(const char *p, int metric) {
  size_t n = 0;
  if (!(metric ? is_name_start((unsigned char)p[0]) : (isalpha((unsigned char)p[0]) || p[0] == '_')))
    return 0;
  while (p[n] && (metric ? is_name_char((unsigned char)p[n])
                         : (isalnum((unsigned char)p[n]) || p[n] == '_')))
    n++;
  return n;
}

/* Prometheus float: Go ParseFloat syntax or +Inf/-Inf/NaN. */
static int parse_value(const char *t, double *v) {
  if (!strcmp(t, "+Inf") || !strcmp(t, "Inf")) { *v = INFINITY; return 0; }
  if (!strcmp(t, "-Inf")) { *v = -INFINITY; return 0; }
  if (!strcmp(t, "NaN")) { *v = NAN; return 0; }
  /* digits, sign, '.', exponent only (strtod would also take "inf"/hex) */
  for (const char *c = t; *c; c++)
    if (!(isdigit((unsigned char)*c) || *c == '.' || *c == 'e' || *c == 'E' || *c == '+' ||
          *c == '-'))
      return -1;
  char *end = NULL;
  *v = strtod(t, &end);
  return (end && *end == 0 && end != t) ? 0 : -1;
}

static fam_t *find_fam(st_t *s, const char *name) {
  for (int i = 0; i < s->nfam; i++)
    if (!strcmp(s->fam[i].name, name)) return &s->fam[i];
  return NULL;
}

static fam_t *get_fam(st_t *s, const char *name) {
  fam_t *f = find_fam(s, name);
  if (f || s->nfam == MAXFAM) return f;
  f = &s->fam[s->nfam++];
  memset(f, 0, sizeof *f);
  snprintf(f->name, sizeof f->name, "%s", name);
  return f;
}

static int ends_with(const char *s, const char *suf) {
  size_t a = strlen(s), b = strlen(suf);
  return a >= b && !strcmp(s + a - b, suf);
}

/* Family a sample name belongs to: the histogram/summary base name when a
 * TYPE declared it so, else the name itself. */
static fam_t *family_of(st_t *s, const char *name, const char **suffix) {
  static const char *const suf[] = {"_bucket", "_sum", "_count"};
  *suffix = "";
  for (int i = 0; i < 3; i++) {
    if (!ends_with(name, suf[i])) continue;
    char base[128];
    size_t n = strlen(name) - strlen(suf[i]);
    if (n >= sizeof base) continue;
    memcpy(base, name, n);
    base[n] = 0;
    fam_t *f = find_fam(s, base);
    if (f && (!strcmp(f->type, "histogram") || !strcmp(f->type, "summary"))) {
      *suffix = suf[i];
      return f;
    }
  }
  return get_fam(s, name);
}

static int enter_family(st_t *s, fam_t *f) {
  int idx = (int)(f - s->fam);
  if (s->cur == idx) return 0;
  if (f->has_samples || f->closed) return fail(s, "samples of %s are not contiguous", f->name);
  if (s->cur >= 0) s->fam[s->cur].closed = 1;
  s->cur = idx;
  return 0;
}

static int finish_hist(st_t *s) {
  for (int i = 0; i < s->nh; i++) {
    hstate_t *h = &s->h[i];
    if (!h->have_inf) return fail(s, "histogram series %s has no le=\"+Inf\" bucket", h->key);
    if (!h->have_sum || !h->have_count)
      return fail(s, "histogram series %s lacks _sum or _count", h->key);
    if (h->count != h->inf_cum)
      return fail(s, "histogram series %s: _count %g != +Inf bucket %g", h->key, h->count,
                  h->inf_cum);
  }
  s->nh = 0;
  return 0;
}

static hstate_t *hist_series(st_t *s, const char *key) {
  for (int i = 0; i < s->nh; i++)
    if (!strcmp(s->h[i].key, key)) return &s->h[i];
  if (s->nh == 64) return NULL;
  hstate_t *h = &s->h[s->nh++];
  memset(h, 0, sizeof *h);
  snprintf(h->key, sizeof h->key, "%s", key);
  h->last_le = -INFINITY;
  return h;
}

static int sample_line(st_t *s, const char *p) {
  size_t n = read_name(p, 1);
  if (!n) return fail(s, "expected a metric name");
  char name[128];
  if (n >= sizeof name) return fail(s, "metric name too long");
  memcpy(name, p, n);
  name[n] = 0;
  p += n;
  /* labels; canonical key without le for histogram series */
  char key[512], le[256] = "";
  int has_le = 0;
  size_t kl = 0;
  key[0] = 0;
  char seen[16][64];
  int nseen = 0;
  if (*p == '{') {
    p++;
    while (*p != '}') {
      size_t ln = read_name(p, 0);
      if (!ln) return fail(s, "expected a label name in %s", name);
      char lname[64];
      if (ln >= sizeof lname) return fail(s, "label name too long");
      memcpy(lname, p, ln);
      lname[ln] = 0;
      if (!strncmp(lname, "__", 2)) return fail(s, "label name %s is reserved", lname);
      for (int i = 0; i < nseen; i++)
        if (!strcmp(seen[i], lname)) return fail(s, "duplicate label %s", lname);
      if (nseen < 16) snprintf(seen[nseen++], 64, "%s", lname);
      p += ln;
      if (*p++ != '=') return fail(s, "expected '=' after label %s", lname);
      if (*p++ != '"') return fail(s, "label value of %s must be quoted", lname);
      char val[256];
      size_t vl = 0;
      while (*p != '"') {
        if (!*p) return fail(s, "unterminated label value");
        char c = *p++;
        if (c == '\\') {
          c = *p++;
          if (c == 'n') c = '\n';
          else if (c != '\\' && c != '"') return fail(s, "bad escape \\%c in label value", c);
        }
        if (vl + 1 < sizeof val) val[vl++] = c;
      }
      val[vl] = 0;
      p++;
      if (!strcmp(lname, "le")) {
        has_le = 1;
        snprintf(le, sizeof le, "%s", val);
      } else {
        kl += (size_t)snprintf(key + kl, sizeof key - kl, "%s=%s,", lname, val);
        if (kl >= sizeof key) kl = sizeof key - 1;
      }
      if (*p == ',') p++;
      else if (*p != '}') return fail(s, "expected ',' or '}' in labels of %s", name);
    }
    p++;
  }
  if (*p != ' ') return fail(s, "expected a space before the value of %s", name);
  while (*p == ' ') p++;
  char vt[64];
  size_t vn = 0;
  while (*p && *p != ' ' && vn + 1 < sizeof vt) vt[vn++] = *p++;
  vt[vn] = 0;
  double v;
  if (parse_value(vt, &v) != 0) return fail(s, "bad value '%s' for %s", vt, name);
  if (*p == ' ') { /* optional timestamp, an integer */
    while (*p == ' ') p++;
    if (*p == '-') p++;
    if (!isdigit((unsigned char)*p)) return fail(s, "bad timestamp");
    while (isdigit((unsigned char)*p)) p++;
  }
  if (*p) return fail(s, "trailing characters after the value of %s", name);

  const char *suffix;
  fam_t *f = family_of(s, name, &suffix);
  if (!f) return fail(s, "too many families");
  if (s->cur < 0 || &s->fam[s->cur] != f) {
    if (finish_hist(s)) return -1;
  }
  if (enter_family(s, f)) return -1;
  f->has_samples = 1;

  /* duplicate series */
  char full[1280]; /* name + labels + le, each bounded by the parser */
  snprintf(full, sizeof full, "%s{%sle=%s}", name, key, has_le ? le : "");
  for (int i = 0; i < s->nser; i++)
    if (!strcmp(s->series[i], full)) return fail(s, "duplicate series %s", full);
  if (s->nser < MAXSER) s->series[s->nser++] = strdup(full);

  if (!strcmp(f->type, "counter")) {
    if (!ends_with(name, "_total")) return fail(s, "counter %s must end in _total", name);
    if (!(v >= 0)) return fail(s, "counter %s is negative or NaN", name);
  }
  if (!strcmp(f->type, "histogram")) {
    if (!*suffix) return fail(s, "histogram %s sample must be _bucket, _sum or _count", name);
    hstate_t *h = hist_series(s, key);
    if (!h) return fail(s, "too many histogram series");
    if (!strcmp(suffix, "_bucket")) {
      if (!has_le) return fail(s, "%s without an le label", name);
      double b;
      if (parse_value(le, &b) != 0 || isnan(b)) return fail(s, "bad le \"%s\"", le);
      if (!(b > h->last_le)) return fail(s, "le buckets of %s not ascending at %s", name, le);
      if (v < h->last_cum) return fail(s, "bucket counts of %s not cumulative at le=%s", name, le);
      if (h->have_inf) return fail(s, "bucket after +Inf in %s", name);
      h->last_le = b;
      h->last_cum = v;
      if (isinf(b)) {
        h->have_inf = 1;
        h->inf_cum = v;
      }
    } else if (has_le) {
      return fail(s, "le label on %s", name);
    } else if (!strcmp(suffix, "_sum")) {
      h->have_sum = 1;
    } else {
      h->have_count = 1;
      h->count = v;
    }
  } else if (has_le && strcmp(f->type, "histogram")) {
    /* le is allowed on untyped families only by convention; we reject */
    return fail(s, "le label on non-histogram %s", name);
  }
  return 0;
}

static int comment_line(st_t *s, const char *p) {
  /* "# HELP name text" | "# TYPE name type" | other comment */
  const char *q = p + 1;
  while (*q == ' ') q++;
  int help = !strncmp(q, "HELP ", 5), type = !strncmp(q, "TYPE ", 5);
  if (!help && !type) return 0;
  q += 5;
  while (*q == ' ') q++;
  size_t n = read_name(q, 1);
  if (!n) return fail(s, "%s without a metric name", help ? "HELP" : "TYPE");
  char name[128];
  if (n >= sizeof name) return fail(s, "metric name too long");
  memcpy(name, q, n);
  name[n] = 0;
  q += n;
  fam_t *f = get_fam(s, name);
  if (!f) return fail(s, "too many families");
  if (f->has_samples) return fail(s, "%s for %s after its samples", help ? "HELP" : "TYPE", name);
  if (help) {
    if (f->has_help) return fail(s, "second HELP for %s", name);
    f->has_help = 1;
    if (*q && *q != ' ') return fail(s, "bad HELP line");
    for (const char *c = q; *c; c++)
      if (*c == '\\' && c[1] != '\\' && c[1] != 'n') return fail(s, "bad escape in HELP");
      else if (*c == '\\') c++;
  } else {
    if (f->has_type) return fail(s, "second TYPE for %s", name);
    f->has_type = 1;
    if (*q++ != ' ') return fail(s, "TYPE %s without a type", name);
    static const char *const types[] = {"counter", "gauge", "histogram", "summary", "untyped"};
    int ok = 0;
    for (int i = 0; i < 5; i++)
      if (!strcmp(q, types[i])) ok = 1;
    if (!ok) return fail(s, "unknown type '%s'", q);
    snprintf(f->type, sizeof f->type, "%s", q);
  }
  return 0;
}

int prom_check(const char *text, size_t len, char *msg, size_t msglen) {
  st_t *s = calloc(1, sizeof *s);
  if (!s) return -1;
  s->msg = msg;
  s->msglen = msglen;
  s->cur = -1;
  int rc = 0;
  if (len == 0 || text[len - 1] != '\n') {
    snprintf(msg, msglen, "text must end with a newline");
    rc = -1;
  }
  size_t i = 0;
  char line[2048];
  while (rc == 0 && i < len) {
    size_t j = i;
    while (j < len && text[j] != '\n') j++;
    s->line++;
    size_t n = j - i;
    if (n >= sizeof line) {
      rc = fail(s, "line too long");
      break;
    }
    memcpy(line, text + i, n);
    line[n] = 0;
    if (memchr(line, 0, n)) rc = fail(s, "NUL byte");
    else if (n == 0) { /* blank lines are allowed */
    } else if (line[0] == '#') rc = comment_line(s, line);
    else rc = sample_line(s, line);
    i = j + 1;
  }
  if (rc == 0) rc = finish_hist(s);
  for (int k = 0; k < s->nser; k++) free(s->series[k]);
  free(s);
  return rc;
}

int prom_value(const char *text, const char *series, double *v) {
  size_t sl = strlen(series);
  for (const char *p = text; p && *p;) {
    if (!strncmp(p, series, sl) && p[sl] == ' ') {
      char buf[64];
      size_t n = 0;
      const char *q = p + sl + 1;
      while (*q && *q != '\n' && *q != ' ' && n + 1 < sizeof buf) buf[n++] = *q++;
      buf[n] = 0;
      return parse_value(buf, v);
    }
    p = strchr(p, '\n');
    if (p) p++;
  }
  return -1;
}

double prom_sum(const char *text, const char *name, const char *const *frags) {
  double sum = 0;
  size_t nl = strlen(name);
  for (const char *p = text; p && *p;) {
    const char *eol = strchr(p, '\n');
    size_t n = eol ? (size_t)(eol - p) : strlen(p);
    if (*p != '#' && !strncmp(p, name, nl) && (p[nl] == '{' || p[nl] == ' ')) {
      char line[2048];
      if (n < sizeof line) {
        memcpy(line, p, n);
        line[n] = 0;
        int ok = 1;
        char *sp = strrchr(line, ' ');
        if (sp) *sp = 0;
        for (int i = 0; frags && frags[i]; i++)
          if (!strstr(line, frags[i])) ok = 0;
        double v;
        if (ok && sp && parse_value(sp + 1, &v) == 0) sum += v;
      }
    }
    p = eol ? eol + 1 : NULL;
  }
  return sum;
}
