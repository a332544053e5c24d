/* config.c — daemon settings and the KEY=VALUE config file (see config.h). */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "log.h"

void nsad_config_init(nsad_config_t *c) {
  memset(c, 0, sizeof *c);
  c->backend = NSAD_BACKEND_AUTO;
  c->max_message = 1u << 20;
  c->log_level = NSAD_LOG_INFO;
  c->workers = 2;
  c->max_inflight = 16;
  c->max_regions = 4096;
  c->max_sessions = 1024;
  c->hello_timeout_ms = 10000;
}

static void kv_free(nsad_kv_t *kv, int n) {
  for (int i = 0; i < n; i++) {
    free(kv[i].key);
    free(kv[i].value);
  }
  free(kv);
}

void nsad_config_destroy(nsad_config_t *c) {
  free(c->socket_path);
  free(c->devices);
  free(c->config_file);
  free(c->state_dir);
  free(c->metrics_listen);
  free(c->admin_group);
  kv_free(c->kv, c->nkv);
  memset(c, 0, sizeof *c);
}

int nsad_backend_kind_parse(const char *s) {
  if (!strcasecmp(s, "auto")) return NSAD_BACKEND_AUTO;
  if (!strcasecmp(s, "cpu")) return NSAD_BACKEND_CPU;
  if (!strcasecmp(s, "cuda")) return NSAD_BACKEND_CUDA;
  return -1;
}

const char *nsad_backend_kind_name(nsad_backend_kind_t k) {
  switch (k) {
    case NSAD_BACKEND_CPU: return "cpu";
    case NSAD_BACKEND_CUDA: return "cuda";
    default: return "auto";
  }
}

int nsad_parse_size(const char *s, size_t *out) {
  if (!s || !*s) return -1;
  errno = 0;
  char *end = NULL;
  unsigned long long v = strtoull(s, &end, 10);
  if (errno || end == s || s[0] == '-') return -1;
  unsigned long long mul = 1;
  if (*end) {
    switch (tolower((unsigned char)*end)) {
      case 'k': mul = 1ull << 10; break;
      case 'm': mul = 1ull << 20; break;
      case 'g': mul = 1ull << 30; break;
      default: return -1;
    }
    end++;
    if (*end == 'i' || *end == 'I') end++;
    if (*end == 'b' || *end == 'B') end++;
    if (*end) return -1;
  }
  if (v > SIZE_MAX / mul) return -1;
  *out = (size_t)(v * mul);
  return 0;
}

static int parse_int(const char *s, long lo, long hi, int *out) {
  errno = 0;
  char *end = NULL;
  long v = strtol(s, &end, 10);
  if (errno || end == s || *end || v < lo || v > hi) return -1;
  *out = (int)v;
  return 0;
}

static int set_str(char **dst, const char *v) {
  char *d = strdup(v);
  if (!d) return -1;
  free(*dst);
  *dst = d;
  return 0;
}

int nsad_config_set(nsad_config_t *c, const char *key, const char *value, int from_cli, char *msg,
                    size_t msglen) {
  unsigned bit = 0;
  int rc = 0;
  if (!strcmp(key, "NSAD_SOCKET")) {
    bit = NSAD_CFG_SOCKET;
    if (!from_cli && (c->cli_set & bit)) return 0;
    if (!*value) goto bad;
    rc = set_str(&c->socket_path, value);
  } else if (!strcmp(key, "NSAD_BACKEND")) {
    bit = NSAD_CFG_BACKEND;
    int k = nsad_backend_kind_parse(value);
    if (k < 0) {
      snprintf(msg, msglen, "%s: '%s' is not one of auto, cpu, cuda", key, value);
      return -1;
    }
    if (!from_cli && (c->cli_set & bit)) return 0;
    c->backend = (nsad_backend_kind_t)k;
  } else if (!strcmp(key, "NSAD_DEVICES")) {
    bit = NSAD_CFG_DEVICES;
    for (const char *p = value; *p; p++)
      if (!isdigit((unsigned char)*p) && *p != ',') goto bad;
    if (!from_cli && (c->cli_set & bit)) return 0;
    rc = set_str(&c->devices, value);
  } else if (!strcmp(key, "NSAD_STATE_DIR")) {
    bit = NSAD_CFG_STATE_DIR;
    if (!from_cli && (c->cli_set & bit)) return 0;
    rc = set_str(&c->state_dir, value);
  } else if (!strcmp(key, "NSAD_METRICS_LISTEN")) {
    bit = NSAD_CFG_METRICS;
    if (!strchr(value, ':')) {
      snprintf(msg, msglen, "%s: '%s' must be HOST:PORT", key, value);
      return -1;
    }
    if (!from_cli && (c->cli_set & bit)) return 0;
    rc = set_str(&c->metrics_listen, value);
  } else if (!strcmp(key, "NSAD_ADMIN_GROUP")) {
    bit = NSAD_CFG_ADMIN;
    if (!from_cli && (c->cli_set & bit)) return 0;
    rc = set_str(&c->admin_group, value);
  } else if (!strcmp(key, "NSAD_MAX_MESSAGE")) {
    bit = NSAD_CFG_MAX_MESSAGE;
    size_t v;
    if (nsad_parse_size(value, &v) || v < 1024 || v > (1u << 30)) {
      snprintf(msg, msglen, "%s: '%s' must be a size between 1024 and 1G bytes", key, value);
      return -1;
    }
    if (!from_cli && (c->cli_set & bit)) return 0;
    c->max_message = v;
  } else if (!strcmp(key, "NSAD_LOG_LEVEL")) {
    bit = NSAD_CFG_LOG_LEVEL;
    int l = nsad_log_level_parse(value);
    if (l < 0) {
      snprintf(msg, msglen, "%s: '%s' is not one of error, warn, info, debug", key, value);
      return -1;
    }
    if (!from_cli && (c->cli_set & bit)) return 0;
    c->log_level = l;
  } else if (!strcmp(key, "NSAD_WORKERS")) {
    bit = NSAD_CFG_WORKERS;
    int v;
    if (parse_int(value, 1, 256, &v)) goto bad;
    if (!from_cli && (c->cli_set & bit)) return 0;
    c->workers = v;
  } else if (!strcmp(key, "NSAD_MAX_INFLIGHT")) {
    bit = NSAD_CFG_MAX_INFLIGHT;
    int v;
    if (parse_int(value, 1, 65536, &v)) goto bad;
    if (!from_cli && (c->cli_set & bit)) return 0;
    c->max_inflight = v;
  } else if (!strcmp(key, "NSAD_MAX_REGIONS")) {
    bit = NSAD_CFG_MAX_REGIONS;
    int v;
    if (parse_int(value, 1, 1 << 20, &v)) goto bad;
    if (!from_cli && (c->cli_set & bit)) return 0;
    c->max_regions = v;
  } else if (!strcmp(key, "NSAD_MAX_SESSIONS")) {
    bit = NSAD_CFG_MAX_SESSIONS;
    int v;
    if (parse_int(value, 1, 1 << 20, &v)) goto bad;
    if (!from_cli && (c->cli_set & bit)) return 0;
    c->max_sessions = v;
  } else if (!strcmp(key, "NSAD_HELLO_TIMEOUT_MS")) {
    bit = NSAD_CFG_HELLO_TIMEOUT;
    int v;
    if (parse_int(value, 10, 3600000, &v)) goto bad;
    if (!from_cli && (c->cli_set & bit)) return 0;
    c->hello_timeout_ms = v;
  } else if (!strcmp(key, "NSAD_CONFIG")) {
    return 0; /* the file naming itself: ignore */
  } else {
    return 1;
  }
  if (rc) {
    snprintf(msg, msglen, "out of memory");
    return -1;
  }
  if (from_cli) c->cli_set |= bit;
  return 0;
bad:
  snprintf(msg, msglen, "%s: bad value '%s'", key, value);
  return -1;
}

static char *trim(char *s) {
  while (isspace((unsigned char)*s)) s++;
  char *e = s + strlen(s);
  while (e > s && isspace((unsigned char)e[-1])) *--e = 0;
  return s;
}

/* Parses the file into pairs. Accepts `export KEY=VALUE` and quoted values
 * ("..." or '...') as systemd's EnvironmentFile does. */
static int read_pairs(const char *path, nsad_kv_t **out, int *nout, char *msg, size_t msglen) {
  FILE *f = fopen(path, "r");
  if (!f) {
    snprintf(msg, msglen, "cannot open config file %s: %s", path, strerror(errno));
    return -1;
  }
  nsad_kv_t *kv = NULL;
  int n = 0, cap = 0, lineno = 0, rc = 0;
  char line[4096];
  while (fgets(line, sizeof line, f)) {
    lineno++;
    char *s = trim(line);
    if (!*s || *s == '#' || *s == ';') continue;
    if (!strncmp(s, "export ", 7)) s = trim(s + 7);
    char *eq = strchr(s, '=');
    if (!eq || eq == s) {
      snprintf(msg, msglen, "%s:%d: expected KEY=VALUE", path, lineno);
      rc = -1;
      break;
    }
    *eq = 0;
    char *k = trim(s), *v = trim(eq + 1);
    for (char *p = k; *p; p++)
      if (!isalnum((unsigned char)*p) && *p != '_') {
        snprintf(msg, msglen, "%s:%d: bad key '%s'", path, lineno, k);
        rc = -1;
        goto done;
      }
    size_t vl = strlen(v);
    if (vl >= 2 && (v[0] == '"' || v[0] == '\'') && v[vl - 1] == v[0]) {
      v[vl - 1] = 0;
      v++;
    }
    if (n == cap) {
      cap = cap ? cap * 2 : 16;
      nsad_kv_t *nk = realloc(kv, (size_t)cap * sizeof *kv);
      if (!nk) {
        snprintf(msg, msglen, "out of memory");
        rc = -1;
        break;
      }
      kv = nk;
    }
    kv[n].key = strdup(k);
    kv[n].value = strdup(v);
    n++;
    if (!kv[n - 1].key || !kv[n - 1].value) {
      snprintf(msg, msglen, "out of memory");
      rc = -1;
      break;
    }
  }
done:
  fclose(f);
  if (rc) {
    kv_free(kv, n);
    return -1;
  }
  *out = kv;
  *nout = n;
  return 0;
}

int nsad_config_load_file(nsad_config_t *c, char *msg, size_t msglen) {
  if (!c->config_file) return 0;
  nsad_kv_t *kv = NULL;
  int n = 0;
  if (read_pairs(c->config_file, &kv, &n, msg, msglen)) return -1;
  /* Validate every daemon setting on a scratch config first, so a bad file
   * leaves the running settings untouched. */
  nsad_config_t scratch;
  nsad_config_init(&scratch);
  for (int i = 0; i < n; i++) {
    char m[256];
    int r = nsad_config_set(&scratch, kv[i].key, kv[i].value, 0, m, sizeof m);
    if (r < 0) {
      snprintf(msg, msglen, "%s: %s", c->config_file, m);
      nsad_config_destroy(&scratch);
      kv_free(kv, n);
      return -1;
    }
    /* Backend-specific settings are read by the backend itself (backend_cuda.c). */
    if (r == 1 && !strncmp(kv[i].key, "NSAD_", 5) && strcmp(kv[i].key, "NSAD_CUDA_WORKSPACE_CAP") &&
        strcmp(kv[i].key, "NSAD_SPIN_US"))
      nsad_warn("%s: unknown daemon setting %s ignored", c->config_file, kv[i].key);
  }
  nsad_config_destroy(&scratch);
  for (int i = 0; i < n; i++) {
    char m[256];
    (void)nsad_config_set(c, kv[i].key, kv[i].value, 0, m, sizeof m);
  }
  kv_free(c->kv, c->nkv);
  c->kv = kv;
  c->nkv = n;
  return 0;
}
