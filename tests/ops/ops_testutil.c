/* ops_testutil.c — see ops_testutil.h. */
#define _GNU_SOURCE
#include "ops_testutil.h"

#include <criterion/criterion.h>
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

char *ops_tmpdir(void) {
  const char *base = getenv("TMPDIR");
  char buf[512];
  snprintf(buf, sizeof buf, "%s/nsad-ops-XXXXXX", base && *base ? base : "/tmp");
  char *d = mkdtemp(buf);
  cr_assert_not_null(d, "mkdtemp failed");
  return strdup(d);
}

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw) {
  (void)sb;
  (void)flag;
  (void)ftw;
  return remove(p);
}

void ops_rmtree(const char *path) { nftw(path, rm_cb, 16, FTW_DEPTH | FTW_PHYS); }

void ops_write_file(const char *path, const char *text) {
  FILE *fp = fopen(path, "w");
  cr_assert_not_null(fp, "cannot write %s", path);
  fputs(text, fp);
  fclose(fp);
}

char *ops_read_file(const char *path, size_t *len) {
  FILE *fp = fopen(path, "r");
  if (!fp) return NULL;
  size_t cap = 4096, n = 0;
  char *b = malloc(cap);
  size_t r;
  while (b && (r = fread(b + n, 1, cap - n - 1, fp)) > 0) {
    n += r;
    if (cap - n < 2) {
      cap *= 2;
      char *nb = realloc(b, cap);
      if (!nb) { free(b); b = NULL; }
      else b = nb;
    }
  }
  fclose(fp);
  if (b) b[n] = 0;
  if (len) *len = n;
  return b;
}

const msgpack_object *ops_map_get(const msgpack_object *map, const char *key) {
  if (!map || map->type != MSGPACK_OBJECT_MAP) return NULL;
  size_t kl = strlen(key);
  for (uint32_t i = 0; i < map->via.map.size; i++) {
    const msgpack_object *k = &map->via.map.ptr[i].key;
    if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == kl &&
        memcmp(k->via.str.ptr, key, kl) == 0)
      return &map->via.map.ptr[i].val;
  }
  return NULL;
}

double ops_num(const msgpack_object *o) {
  if (!o) return NAN;
  switch (o->type) {
    case MSGPACK_OBJECT_POSITIVE_INTEGER: return (double)o->via.u64;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER: return (double)o->via.i64;
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64: return o->via.f64;
    default: return NAN;
  }
}

static void strobj(const msgpack_object *o, char *buf, size_t len) {
  buf[0] = 0;
  if (!o || o->type != MSGPACK_OBJECT_STR) return;
  size_t n = o->via.str.size < len - 1 ? o->via.str.size : len - 1;
  memcpy(buf, o->via.str.ptr, n);
  buf[n] = 0;
}

void ops_flags_get(nsad_flags_t *f, const nsa_proto_label_t *labels, int n, const char *name,
                   ops_flag_info_t *out) {
  memset(out, 0, sizeof *out);
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  msgpack_packer pk;
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  nsad_flags_pack_get(f, labels, n, &pk);
  msgpack_unpacked u;
  msgpack_unpacked_init(&u);
  size_t off = 0;
  cr_assert_eq(msgpack_unpack_next(&u, sb.data, sb.size, &off), MSGPACK_UNPACK_SUCCESS);
  const msgpack_object *e = ops_map_get(ops_map_get(&u.data, "flags"), name);
  cr_assert_not_null(e, "flags.get lacks %s", name);
  out->value = ops_num(ops_map_get(e, "value"));
  strobj(ops_map_get(e, "source"), out->source, sizeof out->source);
  const msgpack_object *ro = ops_map_get(e, "rollout");
  cr_assert_not_null(ro);
  if (ro->type == MSGPACK_OBJECT_MAP) {
    out->has_rollout = 1;
    const msgpack_object *p = ops_map_get(ro, "percent"), *m = ops_map_get(ro, "match");
    cr_assert(p && m, "rollout has percent and match");
    if (p->type != MSGPACK_OBJECT_NIL) {
      out->has_percent = 1;
      out->percent = ops_num(p);
    }
    cr_assert_eq(m->type, MSGPACK_OBJECT_MAP);
    out->nmatch = (int)m->via.map.size;
    if (out->nmatch) {
      strobj(&m->via.map.ptr[0].key, out->match_key, sizeof out->match_key);
      strobj(&m->via.map.ptr[0].val, out->match_value, sizeof out->match_value);
    }
  } else {
    cr_assert_eq(ro->type, MSGPACK_OBJECT_NIL);
  }
  out->effective = ops_num(ops_map_get(ops_map_get(&u.data, "effective"), name));
  msgpack_unpacked_destroy(&u);
  msgpack_sbuffer_destroy(&sb);
}
