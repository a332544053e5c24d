/*
 * flags.c — the daemon's central flag store (DESIGN.md §3, flags.h).
 *
 * Model: each flag has three layers, low to high precedence:
 *   default  (built in, k_defs below)
 *   config   (config file + daemon environment, replaced as a whole by
 *             nsad_flags_set_config on start and SIGHUP)
 *   runtime  (flags.set; optional rollout rule; persisted in state_dir)
 * A session sees the runtime value only when the rule admits it (percent
 * bucket of a hash of its sorted labels + flag name, AND every match label
 * equal); otherwise the config value, otherwise the default.
 *
 * Concurrency: `mu` guards the state and is held only for short reads and the
 * final swap, so request threads never wait on disk. `wmu` serialises writers
 * (set / reset / set_config) across the slow part: build the new state in a
 * copy, persist it (write, fsync, rename, fsync dir), then swap it in. A
 * reader therefore sees either the whole old or the whole new state, with its
 * epoch — one consistent snapshot per call.
 *
 * Epoch: bumped on every change, persisted with the runtime layer, and bumped
 * once more when a store is opened on an existing state file (a restart may
 * come with a different config), so it never goes backwards across restarts.
 */
#include "flags.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "metrics.h"

extern char **environ;

/* ------------------------------------------------------------ defs --- */

typedef enum { FT_BOOL = 0, FT_INT, FT_RATE } ftype_t;

typedef struct {
  const char *name;
  ftype_t type;
  double def;
  const char *allowed; /* for messages */
} fdef_t;

/* Index = nsad_flag_id_t. MIN_L is capped at INT32_MAX because the request's
 * max row length it is compared with is an int32. */
#define MIN_L_MAX 2147483647.0
static const fdef_t k_defs[NSAD_FLAG_COUNT] = {
    {"NSA_SEL_VARLEN_V2", FT_BOOL, 1, "a boolean: 1/true/yes/on or 0/false/no/off"},
    {"NSA_SEL_VARLEN_MIN_L", FT_INT, 0, "a non-negative integer (0..2147483647)"},
    {"NSA_USE_SEL_VARLEN", FT_BOOL, 1, "a boolean: 1/true/yes/on or 0/false/no/off"},
    {"NSA_SEL_SHADOW_RATE", FT_RATE, 0, "a number from 0 to 1 (fraction of requests)"},
};

#define KNOWN_FLAGS "NSA_SEL_VARLEN_V2, NSA_SEL_VARLEN_MIN_L, NSA_USE_SEL_VARLEN, NSA_SEL_SHADOW_RATE"

typedef struct {
  int has_config;
  double config;
  int has_runtime;
  double runtime;
  int has_percent;
  double percent; /* 0..100 */
  int nmatch;
  nsa_proto_label_t match[NSA_PROTO_MAX_MATCH];
} fstate_t;

typedef struct {
  uint64_t epoch;
  fstate_t fl[NSAD_FLAG_COUNT];
} state_t;

struct nsad_flags {
  pthread_mutex_t mu;  /* guards st (short holds only) */
  pthread_mutex_t wmu; /* serialises writers incl. persistence */
  state_t st;
  char *state_dir;     /* NULL: memory only */
  nsad_metrics_t *metrics;
  nsad_flags_audit_fn audit_fn;
  void *audit_ud;
  /* nsad_flags_load_config: which NSA_* environment variables merely repeat
   * the config file as it was at the first load (systemd EnvironmentFile=
   * pointing at the same file). Those yield to the file on later loads, so
   * a SIGHUP after editing the file takes effect. */
  pthread_mutex_t cmu;
  int env_init;
  int env_from_file[NSAD_FLAG_COUNT];
};

/* ------------------------------------------------------- helpers --- */

static void setmsg(char *msg, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void setmsg(char *msg, size_t len, const char *fmt, ...) {
  if (!msg || !len) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, len, fmt, ap);
  va_end(ap);
}

static int seterr(nsa_proto_err_t *e, nsa_proto_code_t code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int seterr(nsa_proto_err_t *e, nsa_proto_code_t code, const char *fmt, ...) {
  if (!e) return -1;
  e->code = code;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(e->message, sizeof e->message, fmt, ap);
  va_end(ap);
  return -1;
}

int nsad_flag_lookup(const char *name) {
  if (!name) return -1;
  for (int i = 0; i < NSAD_FLAG_COUNT; i++)
    if (strcmp(k_defs[i].name, name) == 0) return i;
  return -1;
}

const char *nsad_flag_name(int id) {
  return (id >= 0 && id < NSAD_FLAG_COUNT) ? k_defs[id].name : NULL;
}

/* Trims ASCII whitespace into buf; returns buf. */
static const char *trim(const char *s, char *buf, size_t len) {
  while (*s && isspace((unsigned char)*s)) s++;
  size_t n = strlen(s);
  while (n && isspace((unsigned char)s[n - 1])) n--;
  if (n >= len) n = len - 1;
  memcpy(buf, s, n);
  buf[n] = 0;
  return buf;
}

int nsad_flag_parse_value(int id, const char *text, double *out, char *msg, size_t msglen) {
  if (id < 0 || id >= NSAD_FLAG_COUNT) {
    setmsg(msg, msglen, "unknown flag; known flags: " KNOWN_FLAGS);
    return -1;
  }
  const fdef_t *d = &k_defs[id];
  char buf[NSA_PROTO_STR];
  const char *s = trim(text ? text : "", buf, sizeof buf);
  switch (d->type) {
    case FT_BOOL: {
      static const char *const t[] = {"1", "true", "yes", "on"};
      static const char *const f[] = {"0", "false", "no", "off"};
      for (int i = 0; i < 4; i++) {
        if (strcasecmp(s, t[i]) == 0) { *out = 1; return 0; }
        if (strcasecmp(s, f[i]) == 0) { *out = 0; return 0; }
      }
      break;
    }
    case FT_INT: {
      if (!*s) break;
      const char *p = s;
      if (*p == '+') p++;
      if (!*p) break;
      for (const char *c = p; *c; c++)
        if (!isdigit((unsigned char)*c)) goto bad;
      errno = 0;
      unsigned long long v = strtoull(p, NULL, 10);
      if (errno || (double)v > MIN_L_MAX) break;
      *out = (double)v;
      return 0;
    }
    case FT_RATE: {
      if (!*s) break;
      char *end = NULL;
      errno = 0;
      double v = strtod(s, &end);
      if (errno || !end || *end || !isfinite(v) || v < 0.0 || v > 1.0) break;
      *out = v == 0.0 ? 0.0 : v; /* no -0 */
      return 0;
    }
  }
bad:
  setmsg(msg, msglen, "invalid value '%s' for %s: must be %s", s, d->name, d->allowed);
  return -1;
}

/* Canonical text of a value: bools "1"/"0", ints decimal, rates %.17g
 * trimmed to the shortest text that reads back the same. */
void nsad_flag_format_value(int id, double v, char *buf, size_t len) {
  if (id >= 0 && id < NSAD_FLAG_COUNT && k_defs[id].type == FT_RATE) {
    for (int prec = 1; prec <= 17; prec++) {
      snprintf(buf, len, "%.*g", prec, v);
      if (strtod(buf, NULL) == v) return;
    }
    return;
  }
  snprintf(buf, len, "%lld", (long long)llround(v));
}

/* ---------------------------------------------------------- rollout --- */

/* splitmix64 finaliser: FNV-1a alone has weak low bits for mod 10000. */
static uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

static uint64_t fnv1a(uint64_t h, const void *p, size_t n) {
  const unsigned char *c = p;
  for (size_t i = 0; i < n; i++) {
    h ^= c[i];
    h *= 0x100000001b3ULL;
  }
  return h;
}

static int label_cmp(const void *a, const void *b) {
  const nsa_proto_label_t *x = *(const nsa_proto_label_t *const *)a;
  const nsa_proto_label_t *y = *(const nsa_proto_label_t *const *)b;
  int c = strcmp(x->key, y->key);
  return c ? c : strcmp(x->value, y->value);
}

/* Bucket 0..9999 of a session for a flag: FNV-1a over the labels sorted by
 * (key, value), each as key 0x00 value 0x01, then the flag name; mixed.
 * Label order on the wire does not matter; a worker that reconnects with the
 * same labels lands in the same bucket. Including the flag name keeps two
 * flags' rollouts independent. */
uint32_t nsad_flags_rollout_bucket(const nsa_proto_label_t *labels, int nlabels, const char *flag) {
  const nsa_proto_label_t *sorted[NSA_PROTO_MAX_LABELS];
  if (nlabels < 0) nlabels = 0;
  if (nlabels > NSA_PROTO_MAX_LABELS) nlabels = NSA_PROTO_MAX_LABELS;
  for (int i = 0; i < nlabels; i++) sorted[i] = &labels[i];
  qsort(sorted, (size_t)nlabels, sizeof sorted[0], label_cmp);
  uint64_t h = 0xcbf29ce484222325ULL;
  static const unsigned char s0 = 0, s1 = 1;
  for (int i = 0; i < nlabels; i++) {
    h = fnv1a(h, sorted[i]->key, strnlen(sorted[i]->key, sizeof sorted[i]->key));
    h = fnv1a(h, &s0, 1);
    h = fnv1a(h, sorted[i]->value, strnlen(sorted[i]->value, sizeof sorted[i]->value));
    h = fnv1a(h, &s1, 1);
  }
  h = fnv1a(h, flag, strlen(flag));
  return (uint32_t)(mix64(h) % 10000u);
}

static int rule_admits(const fstate_t *s, int id, const nsa_proto_label_t *labels, int nlabels) {
  for (int m = 0; m < s->nmatch; m++) {
    int ok = 0;
    for (int i = 0; i < nlabels && !ok; i++)
      ok = strcmp(labels[i].key, s->match[m].key) == 0 &&
           strcmp(labels[i].value, s->match[m].value) == 0;
    if (!ok) return 0;
  }
  if (s->has_percent) {
    long long cut = llround(s->percent * 100.0);
    if ((long long)nsad_flags_rollout_bucket(labels, nlabels, k_defs[id].name) >= cut) return 0;
  }
  return 1;
}

static double base_value(const fstate_t *s, int id) {
  return s->has_config ? s->config : k_defs[id].def;
}

static double effective(const fstate_t *s, int id, const nsa_proto_label_t *labels, int nlabels) {
  if (s->has_runtime && rule_admits(s, id, labels, nlabels)) return s->runtime;
  return base_value(s, id);
}

/* Value/source of the top layer (what flags.get shows as "value"). */
static double top_value(const fstate_t *s, int id, const char **source) {
  if (s->has_runtime) { *source = "runtime"; return s->runtime; }
  if (s->has_config) { *source = "config"; return s->config; }
  *source = "default";
  return k_defs[id].def;
}

/* ------------------------------------------------------ persistence --- */

/* Strings in the state file are percent-encoded so any label survives. */
static void enc(FILE *fp, const char *s) {
  for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
    if (isalnum(*c) || *c == '_' || *c == '-' || *c == '.' || *c == '/')
      fputc(*c, fp);
    else
      fprintf(fp, "%%%02X", *c);
  }
}

static int hexv(int c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

static int dec(const char *s, size_t n, char *out, size_t outlen) {
  size_t o = 0;
  for (size_t i = 0; i < n; i++) {
    int c = (unsigned char)s[i];
    if (c == '%') {
      if (i + 2 >= n) return -1;
      int a = hexv(s[i + 1]), b = hexv(s[i + 2]);
      if (a < 0 || b < 0) return -1;
      c = a * 16 + b;
      i += 2;
    }
    if (o + 1 >= outlen || c == 0) return -1;
    out[o++] = (char)c;
  }
  out[o] = 0;
  return 0;
}

#define STATE_FILE "flags.state"
#define STATE_MAGIC "nsad-flags-state 1"

static int fsync_dir(const char *dir) {
  int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return -1;
  int rc = fsync(fd);
  close(fd);
  return rc;
}

/* Writes st to state_dir/flags.state atomically: a crash at any instant
 * leaves either the old or the new complete file. */
static int persist(const char *dir, const state_t *st, char *msg, size_t msglen) {
  char path[4096], tmp[4096];
  snprintf(path, sizeof path, "%s/%s", dir, STATE_FILE);
  snprintf(tmp, sizeof tmp, "%s/%s.tmp", dir, STATE_FILE);
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) {
    setmsg(msg, msglen, "cannot write %s: %s", tmp, strerror(errno));
    return -1;
  }
  FILE *fp = fdopen(fd, "w");
  if (!fp) {
    setmsg(msg, msglen, "fdopen %s: %s", tmp, strerror(errno));
    close(fd);
    return -1;
  }
  fprintf(fp, STATE_MAGIC "\n# runtime flag changes (flags.set); written by nsad, do not edit\n");
  fprintf(fp, "epoch %llu\n", (unsigned long long)st->epoch);
  for (int i = 0; i < NSAD_FLAG_COUNT; i++) {
    const fstate_t *s = &st->fl[i];
    if (!s->has_runtime) continue;
    char v[64];
    nsad_flag_format_value(i, s->runtime, v, sizeof v);
    fprintf(fp, "flag %s %s", k_defs[i].name, v);
    if (s->has_percent) fprintf(fp, " percent=%.17g", s->percent);
    for (int m = 0; m < s->nmatch; m++) {
      fputs(" match=", fp);
      enc(fp, s->match[m].key);
      fputc('=', fp);
      enc(fp, s->match[m].value);
    }
    fputc('\n', fp);
  }
  fputs("end\n", fp);
  int rc = 0;
  if (fflush(fp) != 0 || ferror(fp)) rc = -1;
  if (rc == 0 && fsync(fd) != 0) rc = -1;
  int saved = errno;
  if (fclose(fp) != 0 && rc == 0) { rc = -1; saved = errno; }
  if (rc != 0) {
    setmsg(msg, msglen, "writing %s failed: %s", tmp, strerror(saved));
    unlink(tmp);
    return -1;
  }
  if (rename(tmp, path) != 0) {
    setmsg(msg, msglen, "rename %s -> %s: %s", tmp, path, strerror(errno));
    unlink(tmp);
    return -1;
  }
  if (fsync_dir(dir) != 0) {
    setmsg(msg, msglen, "fsync of directory %s: %s", dir, strerror(errno));
    return -1;
  }
  return 0;
}

/* Parses the state file into st (runtime layer + epoch). 0 = loaded,
 * 1 = no file, -1 = error (msg). */
static int load(const char *dir, state_t *st, char *msg, size_t msglen) {
  char path[4096];
  snprintf(path, sizeof path, "%s/%s", dir, STATE_FILE);
  FILE *fp = fopen(path, "re");
  if (!fp) {
    if (errno == ENOENT) return 1;
    setmsg(msg, msglen, "cannot read %s: %s", path, strerror(errno));
    return -1;
  }
  char line[8192];
  int lineno = 0, have_magic = 0, have_end = 0, rc = 0;
  while (fgets(line, sizeof line, fp)) {
    lineno++;
    size_t n = strlen(line);
    if (n && line[n - 1] == '\n') line[--n] = 0;
    if (lineno == 1) {
      if (strcmp(line, STATE_MAGIC) != 0) { rc = -1; break; }
      have_magic = 1;
      continue;
    }
    if (line[0] == '#' || line[0] == 0) continue;
    if (strcmp(line, "end") == 0) { have_end = 1; continue; }
    char *save = NULL;
    char *tok = strtok_r(line, " ", &save);
    if (!tok) continue;
    if (strcmp(tok, "epoch") == 0) {
      char *e = strtok_r(NULL, " ", &save), *end = NULL;
      if (!e) { rc = -1; break; }
      st->epoch = strtoull(e, &end, 10);
      if (*end) { rc = -1; break; }
    } else if (strcmp(tok, "flag") == 0) {
      char *name = strtok_r(NULL, " ", &save), *val = strtok_r(NULL, " ", &save);
      int id = nsad_flag_lookup(name);
      double v;
      if (id < 0 || !val || nsad_flag_parse_value(id, val, &v, NULL, 0) != 0) { rc = -1; break; }
      fstate_t *s = &st->fl[id];
      s->has_runtime = 1;
      s->runtime = v;
      while ((tok = strtok_r(NULL, " ", &save))) {
        if (strncmp(tok, "percent=", 8) == 0) {
          char *end = NULL;
          s->has_percent = 1;
          s->percent = strtod(tok + 8, &end);
          if (*end || !(s->percent >= 0 && s->percent <= 100)) { rc = -1; break; }
        } else if (strncmp(tok, "match=", 6) == 0 && s->nmatch < NSA_PROTO_MAX_MATCH) {
          char *kv = tok + 6, *eq = strchr(kv, '=');
          nsa_proto_label_t *l = &s->match[s->nmatch];
          if (!eq || dec(kv, (size_t)(eq - kv), l->key, sizeof l->key) ||
              dec(eq + 1, strlen(eq + 1), l->value, sizeof l->value)) {
            rc = -1;
            break;
          }
          s->nmatch++;
        } else {
          rc = -1;
          break;
        }
      }
      if (rc) break;
    } else {
      rc = -1;
      break;
    }
  }
  fclose(fp);
  if (rc == 0 && (!have_magic || !have_end)) rc = -1;
  if (rc) setmsg(msg, msglen, "corrupt flag state file %s (line %d); move it away to start with "
                 "no runtime flag changes", path, lineno);
  return rc;
}

/* --------------------------------------------------------- lifecycle --- */

static void export_metrics(nsad_flags_t *f, const state_t *st) {
  if (!f->metrics) return;
  for (int i = 0; i < NSAD_FLAG_COUNT; i++) {
    const char *src;
    nsad_metrics_flag_value(f->metrics, i, k_defs[i].name, top_value(&st->fl[i], i, &src));
  }
  nsad_metrics_gauge_set(f->metrics, NSAD_G_FLAGS_EPOCH, (double)st->epoch);
}

nsad_flags_t *nsad_flags_new(const char *state_dir, char *msg, size_t msglen) {
  nsad_flags_t *f = calloc(1, sizeof *f);
  if (!f) {
    setmsg(msg, msglen, "out of memory");
    return NULL;
  }
  pthread_mutex_init(&f->mu, NULL);
  pthread_mutex_init(&f->wmu, NULL);
  pthread_mutex_init(&f->cmu, NULL);
  f->st.epoch = 1;
  if (state_dir && *state_dir) {
    f->state_dir = strdup(state_dir);
    struct stat sb;
    if (stat(state_dir, &sb) != 0) {
      if (errno != ENOENT || mkdir(state_dir, 0750) != 0) {
        setmsg(msg, msglen, "state directory %s: %s", state_dir, strerror(errno));
        nsad_flags_free(f);
        return NULL;
      }
    } else if (!S_ISDIR(sb.st_mode)) {
      setmsg(msg, msglen, "state directory %s is not a directory", state_dir);
      nsad_flags_free(f);
      return NULL;
    }
    state_t st;
    memset(&st, 0, sizeof st);
    int rc = load(state_dir, &st, msg, msglen);
    if (rc < 0) {
      nsad_flags_free(f);
      return NULL;
    }
    if (rc == 0) {
      /* A restart is a new epoch: the config may have changed meanwhile. */
      st.epoch += 1;
      if (persist(state_dir, &st, msg, msglen) != 0) {
        nsad_flags_free(f);
        return NULL;
      }
      f->st = st;
    }
  }
  return f;
}

void nsad_flags_free(nsad_flags_t *f) {
  if (!f) return;
  pthread_mutex_destroy(&f->mu);
  pthread_mutex_destroy(&f->wmu);
  pthread_mutex_destroy(&f->cmu);
  free(f->state_dir);
  free(f);
}

void nsad_flags_attach_metrics(nsad_flags_t *f, struct nsad_metrics *m) {
  pthread_mutex_lock(&f->wmu);
  pthread_mutex_lock(&f->mu);
  f->metrics = m;
  export_metrics(f, &f->st);
  pthread_mutex_unlock(&f->mu);
  pthread_mutex_unlock(&f->wmu);
}

void nsad_flags_set_audit(nsad_flags_t *f, nsad_flags_audit_fn fn, void *ud) {
  pthread_mutex_lock(&f->wmu);
  f->audit_fn = fn;
  f->audit_ud = ud;
  pthread_mutex_unlock(&f->wmu);
}

/* Copies the current state (caller holds wmu, so it cannot change under us
 * except by us). */
static void copy_state(nsad_flags_t *f, state_t *out) {
  pthread_mutex_lock(&f->mu);
  *out = f->st;
  pthread_mutex_unlock(&f->mu);
}

/* Persists (when configured) and swaps in. Caller holds wmu. */
static int commit(nsad_flags_t *f, const state_t *st, char *msg, size_t msglen) {
  if (f->state_dir && persist(f->state_dir, st, msg, msglen) != 0) return -1;
  pthread_mutex_lock(&f->mu);
  f->st = *st;
  export_metrics(f, st);
  pthread_mutex_unlock(&f->mu);
  return 0;
}

/* ------------------------------------------------------------ audit --- */

static void rule_text(const fstate_t *s, char *buf, size_t len) {
  size_t o = 0;
  buf[0] = 0;
  if (!s->has_percent && !s->nmatch) {
    snprintf(buf, len, "none");
    return;
  }
  if (s->has_percent) o += (size_t)snprintf(buf + o, len - o, "percent=%g", s->percent);
  for (int m = 0; m < s->nmatch && o < len; m++)
    o += (size_t)snprintf(buf + o, len - o, "%smatch:%s=%s", o ? "," : "", s->match[m].key,
                          s->match[m].value);
}

static void layer_text(const fstate_t *s, int id, char *buf, size_t len) {
  const char *src;
  char v[64];
  nsad_flag_format_value(id, top_value(s, id, &src), v, sizeof v);
  snprintf(buf, len, "%s(%s)", v, src);
}

/* Client names come from the peer: quote and neutralise control characters
 * and quotes so one audit record is always one parseable line. */
static void safe_str(const char *s, char *out, size_t len) {
  size_t o = 0;
  for (; s && *s && o + 2 < len; s++) {
    unsigned char c = (unsigned char)*s;
    out[o++] = (c < 0x20 || c == 0x7f || c == '"' || c == '\\') ? '?' : (char)c;
  }
  out[o] = 0;
}

static void audit(nsad_flags_t *f, const nsad_actor_t *who, const char *action, int id,
                  const fstate_t *old, const fstate_t *neu, uint64_t epoch) {
  char ts[64], oldt[96], newt[96], rule[1024], client[160];
  struct timeval tv;
  gettimeofday(&tv, NULL);
  struct tm tm;
  gmtime_r(&tv.tv_sec, &tm);
  size_t n = strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
  snprintf(ts + n, sizeof ts - n, ".%03dZ", (int)(tv.tv_usec / 1000));
  layer_text(old, id, oldt, sizeof oldt);
  layer_text(neu, id, newt, sizeof newt);
  if (neu->has_runtime)
    rule_text(neu, rule, sizeof rule);
  else
    snprintf(rule, sizeof rule, "none");
  safe_str(who && who->client ? who->client : "-", client, sizeof client);
  char line[2048];
  snprintf(line, sizeof line,
           "%s audit [nsad] %s uid=%u pid=%d client=\"%s\" flag=%s old=%s new=%s rule=%s "
           "epoch=%llu",
           ts, action, who ? who->uid : 0u, who ? who->pid : 0, client, k_defs[id].name, oldt,
           newt, rule, (unsigned long long)epoch);
  if (f->audit_fn)
    f->audit_fn(f->audit_ud, line);
  else
    fprintf(stderr, "%s\n", line);
}

/* --------------------------------------------------------- changes --- */

int nsad_flags_set_config(nsad_flags_t *f, const char *const *keys, const char *const *values,
                          int n, char *msg, size_t msglen) {
  double val[NSAD_FLAG_COUNT];
  int has[NSAD_FLAG_COUNT] = {0};
  /* Validate everything first: a bad config changes nothing. Later pairs
   * win, so callers pass the file first, then the environment. */
  for (int i = 0; i < n; i++) {
    if (!keys[i]) continue;
    int id = nsad_flag_lookup(keys[i]);
    if (id < 0) {
      if (strncmp(keys[i], "NSA_", 4) == 0) {
        setmsg(msg, msglen, "unknown flag '%s'; known flags: " KNOWN_FLAGS, keys[i]);
        return -1;
      }
      continue; /* daemon settings and unrelated variables */
    }
    if (nsad_flag_parse_value(id, values[i], &val[id], msg, msglen) != 0) return -1;
    has[id] = 1;
  }
  pthread_mutex_lock(&f->wmu);
  state_t st;
  copy_state(f, &st);
  int changed = 0, flag_changed[NSAD_FLAG_COUNT] = {0};
  fstate_t old[NSAD_FLAG_COUNT];
  for (int i = 0; i < NSAD_FLAG_COUNT; i++) {
    fstate_t *s = &st.fl[i];
    old[i] = *s;
    if (s->has_config != has[i] || (has[i] && s->config != val[i]))
      changed = flag_changed[i] = 1;
    s->has_config = has[i];
    s->config = has[i] ? val[i] : 0;
  }
  int rc = 0;
  if (changed) {
    st.epoch++;
    rc = commit(f, &st, msg, msglen);
  }
  if (rc == 0 && changed) {
    /* Audit the config layer itself (the runtime layer, if any, still wins
     * and is shown by flags.get). The actor is the daemon. */
    nsad_actor_t self = {(uint32_t)getuid(), (int32_t)getpid(), "config"};
    for (int i = 0; i < NSAD_FLAG_COUNT; i++) {
      if (!flag_changed[i]) continue;
      fstate_t a = old[i], b = st.fl[i];
      a.has_runtime = b.has_runtime = 0;
      audit(f, &self, "config", i, &a, &b, st.epoch);
    }
  }
  pthread_mutex_unlock(&f->wmu);
  return rc;
}

/* Config file syntax (also a systemd EnvironmentFile): KEY=VALUE lines,
 * blank lines and lines starting with # or ; ignored, optional leading
 * "export ", values optionally in single or double quotes. */
static int parse_config_line(char *line, char **key, char **val) {
  char *s = line;
  while (isspace((unsigned char)*s)) s++;
  if (!*s || *s == '#' || *s == ';') return 0;
  if (strncmp(s, "export ", 7) == 0) s += 7;
  char *eq = strchr(s, '=');
  if (!eq) return -1;
  char *ke = eq;
  while (ke > s && isspace((unsigned char)ke[-1])) ke--;
  *ke = 0;
  char *v = eq + 1;
  while (isspace((unsigned char)*v)) v++;
  size_t n = strlen(v);
  while (n && isspace((unsigned char)v[n - 1])) v[--n] = 0;
  if (n >= 2 && (v[0] == '"' || v[0] == '\'') && v[n - 1] == v[0]) {
    v[n - 1] = 0;
    v++;
  }
  *key = s;
  *val = v;
  return 1;
}

int nsad_flags_load_config(nsad_flags_t *f, const char *config_path, char *const *envp, char *msg,
                           size_t msglen) {
  enum { MAXP = 256 };
  char *store[MAXP];
  const char *keys[MAXP], *vals[MAXP];
  int n = 0, rc = 0;
  if (config_path && *config_path) {
    FILE *fp = fopen(config_path, "re");
    if (!fp) {
      setmsg(msg, msglen, "cannot read config file %s: %s", config_path, strerror(errno));
      return -1;
    }
    char line[4096];
    int lineno = 0;
    while (fgets(line, sizeof line, fp)) {
      lineno++;
      char *k, *v;
      int r = parse_config_line(line, &k, &v);
      if (r < 0) {
        setmsg(msg, msglen, "%s:%d: expected KEY=VALUE", config_path, lineno);
        rc = -1;
        break;
      }
      if (r == 0 || strncmp(k, "NSA_", 4) != 0) continue;
      if (n >= MAXP) break;
      size_t kl = strlen(k);
      store[n] = malloc(kl + strlen(v) + 2);
      if (!store[n]) { rc = -1; setmsg(msg, msglen, "out of memory"); break; }
      memcpy(store[n], k, kl + 1);
      strcpy(store[n] + kl + 1, v);
      keys[n] = store[n];
      vals[n] = store[n] + kl + 1;
      n++;
    }
    fclose(fp);
  }
  int nfile = n;
  pthread_mutex_lock(&f->cmu);
  int from_file[NSAD_FLAG_COUNT];
  memcpy(from_file, f->env_from_file, sizeof from_file);
  if (rc == 0) {
    char *const *env = envp ? envp : environ;
    for (int i = 0; env && env[i] && n < MAXP; i++) {
      if (strncmp(env[i], "NSA_", 4) != 0) continue;
      const char *eq = strchr(env[i], '=');
      if (!eq) continue;
      size_t kl = (size_t)(eq - env[i]);
      char kbuf[128];
      if (kl < sizeof kbuf) {
        memcpy(kbuf, env[i], kl);
        kbuf[kl] = 0;
        int id = nsad_flag_lookup(kbuf);
        if (id >= 0 && !f->env_init) {
          /* Same value as the file's (last) entry for this key? */
          double ve, vf;
          from_file[id] = 0;
          for (int j = nfile - 1; j >= 0; j--) {
            if (strcmp(keys[j], kbuf) != 0) continue;
            from_file[id] = nsad_flag_parse_value(id, eq + 1, &ve, NULL, 0) == 0 &&
                            nsad_flag_parse_value(id, vals[j], &vf, NULL, 0) == 0 && ve == vf;
            break;
          }
        }
        if (id >= 0 && from_file[id]) continue; /* the file speaks for it */
      }
      store[n] = malloc(strlen(env[i]) + 1);
      if (!store[n]) { rc = -1; setmsg(msg, msglen, "out of memory"); break; }
      memcpy(store[n], env[i], kl);
      store[n][kl] = 0;
      strcpy(store[n] + kl + 1, eq + 1);
      keys[n] = store[n];
      vals[n] = store[n] + kl + 1;
      n++;
    }
  }
  if (rc == 0) {
    char sub[256];
    rc = nsad_flags_set_config(f, keys, vals, n, sub, sizeof sub);
    if (rc != 0) setmsg(msg, msglen, "%s%s%s", nfile && config_path ? config_path : "",
                        nfile && config_path ? " / environment: " : "", sub);
  }
  if (rc == 0 && !f->env_init) {
    memcpy(f->env_from_file, from_file, sizeof from_file);
    f->env_init = 1;
  }
  pthread_mutex_unlock(&f->cmu);
  for (int i = 0; i < n; i++) free(store[i]);
  return rc;
}

int nsad_flags_set(nsad_flags_t *f, const nsa_req_flags_set_t *req, const nsad_actor_t *who,
                   uint64_t *epoch, nsa_proto_err_t *err) {
  int id = nsad_flag_lookup(req->name);
  if (id < 0)
    return seterr(err, NSA_E_BAD_REQUEST, "unknown flag '%s'; known flags: " KNOWN_FLAGS,
                  req->name);
  double v;
  char m[256];
  if (nsad_flag_parse_value(id, req->value, &v, m, sizeof m) != 0)
    return seterr(err, NSA_E_BAD_REQUEST, "%s", m);
  if (req->has_percent && !(req->percent >= 0.0 && req->percent <= 100.0))
    return seterr(err, NSA_E_BAD_REQUEST, "percent must be a number from 0 to 100 (got %g)",
                  req->percent);
  if (req->nmatch < 0 || req->nmatch > NSA_PROTO_MAX_MATCH)
    return seterr(err, NSA_E_BAD_REQUEST, "match may have at most %d labels", NSA_PROTO_MAX_MATCH);
  for (int i = 0; i < req->nmatch; i++)
    if (!req->match[i].key[0])
      return seterr(err, NSA_E_BAD_REQUEST, "match label keys must be non-empty");

  pthread_mutex_lock(&f->wmu);
  state_t st;
  copy_state(f, &st);
  fstate_t old = st.fl[id];
  fstate_t *s = &st.fl[id];
  s->has_runtime = 1;
  s->runtime = v;
  s->has_percent = req->has_percent;
  s->percent = req->has_percent ? req->percent : 0;
  s->nmatch = req->nmatch;
  memset(s->match, 0, sizeof s->match);
  for (int i = 0; i < req->nmatch; i++) s->match[i] = req->match[i];
  st.epoch++;
  char pm[256];
  int rc = commit(f, &st, pm, sizeof pm);
  if (rc == 0) {
    audit(f, who, "flags.set", id, &old, s, st.epoch);
    if (epoch) *epoch = st.epoch;
  }
  pthread_mutex_unlock(&f->wmu);
  if (rc != 0) return seterr(err, NSA_E_INTERNAL, "flag change not applied: %s", pm);
  return 0;
}

int nsad_flags_reset(nsad_flags_t *f, const char *name, const nsad_actor_t *who, uint64_t *epoch,
                     nsa_proto_err_t *err) {
  int id = nsad_flag_lookup(name);
  if (id < 0)
    return seterr(err, NSA_E_BAD_REQUEST, "unknown flag '%s'; known flags: " KNOWN_FLAGS,
                  name ? name : "");
  pthread_mutex_lock(&f->wmu);
  state_t st;
  copy_state(f, &st);
  int rc = 0;
  char pm[256];
  if (st.fl[id].has_runtime) {
    fstate_t old = st.fl[id];
    fstate_t *s = &st.fl[id];
    s->has_runtime = 0;
    s->runtime = 0;
    s->has_percent = 0;
    s->percent = 0;
    s->nmatch = 0;
    memset(s->match, 0, sizeof s->match);
    st.epoch++;
    rc = commit(f, &st, pm, sizeof pm);
    if (rc == 0) audit(f, who, "flags.reset", id, &old, s, st.epoch);
  }
  /* Resetting a flag with no runtime layer is a successful no-op. */
  if (epoch) *epoch = st.epoch;
  pthread_mutex_unlock(&f->wmu);
  if (rc != 0) return seterr(err, NSA_E_INTERNAL, "flag reset not applied: %s", pm);
  return 0;
}

/* ---------------------------------------------------------- readers --- */

void nsad_flags_snapshot(nsad_flags_t *f, const nsa_proto_label_t *labels, int nlabels,
                         nsad_flag_snapshot_t *out) {
  pthread_mutex_lock(&f->mu);
  const state_t *st = &f->st;
  out->epoch = st->epoch;
  out->path.sel_varlen_v2 =
      effective(&st->fl[NSAD_FLAG_SEL_VARLEN_V2], NSAD_FLAG_SEL_VARLEN_V2, labels, nlabels) != 0;
  out->path.sel_varlen_min_l = (int64_t)llround(
      effective(&st->fl[NSAD_FLAG_SEL_VARLEN_MIN_L], NSAD_FLAG_SEL_VARLEN_MIN_L, labels, nlabels));
  out->path.use_sel_varlen =
      effective(&st->fl[NSAD_FLAG_USE_SEL_VARLEN], NSAD_FLAG_USE_SEL_VARLEN, labels, nlabels) != 0;
  out->shadow_rate =
      effective(&st->fl[NSAD_FLAG_SEL_SHADOW_RATE], NSAD_FLAG_SEL_SHADOW_RATE, labels, nlabels);
  pthread_mutex_unlock(&f->mu);
}

uint64_t nsad_flags_epoch(nsad_flags_t *f) {
  pthread_mutex_lock(&f->mu);
  uint64_t e = f->st.epoch;
  pthread_mutex_unlock(&f->mu);
  return e;
}

static void pk_str(msgpack_packer *pk, const char *s) {
  size_t n = strlen(s);
  msgpack_pack_str(pk, n);
  msgpack_pack_str_body(pk, s, n);
}

/* Bools and MIN_L as integers (as in the environment), the rate as a double. */
static void pk_value(msgpack_packer *pk, int id, double v) {
  if (k_defs[id].type == FT_RATE)
    msgpack_pack_double(pk, v);
  else
    msgpack_pack_int64(pk, (int64_t)llround(v));
}

void nsad_flags_pack_get(nsad_flags_t *f, const nsa_proto_label_t *labels, int nlabels,
                         msgpack_packer *pk) {
  /* Copy under the lock, pack outside it (packing may allocate). */
  state_t *st = malloc(sizeof *st);
  if (!st) {
    msgpack_pack_nil(pk);
    return;
  }
  pthread_mutex_lock(&f->mu);
  *st = f->st;
  pthread_mutex_unlock(&f->mu);

  msgpack_pack_map(pk, 3);
  pk_str(pk, "epoch");
  msgpack_pack_uint64(pk, st->epoch);
  pk_str(pk, "flags");
  msgpack_pack_map(pk, NSAD_FLAG_COUNT);
  for (int i = 0; i < NSAD_FLAG_COUNT; i++) {
    const fstate_t *s = &st->fl[i];
    const char *src;
    double v = top_value(s, i, &src);
    pk_str(pk, k_defs[i].name);
    msgpack_pack_map(pk, 5);
    pk_str(pk, "value");
    pk_value(pk, i, v);
    pk_str(pk, "source");
    pk_str(pk, src);
    pk_str(pk, "rollout");
    if (s->has_runtime && (s->has_percent || s->nmatch)) {
      msgpack_pack_map(pk, 2);
      pk_str(pk, "percent");
      if (s->has_percent)
        msgpack_pack_double(pk, s->percent);
      else
        msgpack_pack_nil(pk);
      pk_str(pk, "match");
      msgpack_pack_map(pk, (size_t)s->nmatch);
      for (int m = 0; m < s->nmatch; m++) {
        pk_str(pk, s->match[m].key);
        pk_str(pk, s->match[m].value);
      }
    } else {
      msgpack_pack_nil(pk);
    }
    /* Extra (documented) keys: what sessions outside the rule get, and the
     * built-in default. */
    pk_str(pk, "base");
    pk_value(pk, i, base_value(s, i));
    pk_str(pk, "default");
    pk_value(pk, i, k_defs[i].def);
  }
  pk_str(pk, "effective");
  msgpack_pack_map(pk, NSAD_FLAG_COUNT);
  for (int i = 0; i < NSAD_FLAG_COUNT; i++) {
    pk_str(pk, k_defs[i].name);
    pk_value(pk, i, effective(&st->fl[i], i, labels, nlabels));
  }
  free(st);
}
