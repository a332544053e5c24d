/* mpbuild.c — JSON-like text → msgpack (see mpbuild.h). */
#include "mpbuild.h"

#include <ctype.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
  const char *p;
  msgpack_packer *pk;
} mpb_t;

static void ws(mpb_t *b) {
  while (*b->p && isspace((unsigned char)*b->p)) b->p++;
}

static int value(mpb_t *b);

/* Counts the elements of the container starting after its open bracket. */
static int count_items(const char *p, char close) {
  int depth = 0, n = 0, any = 0, instr = 0;
  for (; *p; p++) {
    if (instr) {
      if (*p == '\\' && p[1]) p++;
      else if (*p == '"') instr = 0;
      continue;
    }
    if (*p == '"') { instr = 1; any = 1; continue; }
    if (*p == '[' || *p == '{') { depth++; any = 1; continue; }
    if (*p == ']' || *p == '}') {
      if (depth == 0) return any ? n + 1 : 0;
      depth--;
      continue;
    }
    if (*p == ',' && depth == 0) n++;
    else if (!isspace((unsigned char)*p)) any = 1;
  }
  (void)close;
  return -1;
}

static int string(mpb_t *b) {
  b->p++; /* opening quote */
  char *buf = malloc(strlen(b->p) + 1);
  size_t n = 0;
  while (*b->p && *b->p != '"') {
    if (*b->p == '\\' && b->p[1]) {
      b->p++;
      buf[n++] = *b->p == '0' ? '\0' : *b->p;
    } else {
      buf[n++] = *b->p;
    }
    b->p++;
  }
  if (*b->p != '"') { free(buf); return -1; }
  b->p++;
  msgpack_pack_str(b->pk, n);
  msgpack_pack_str_body(b->pk, buf, n);
  free(buf);
  return 0;
}

static int value(mpb_t *b) {
  ws(b);
  char c = *b->p;
  if (c == '{' || c == '[') {
    int n = count_items(b->p + 1, c == '{' ? '}' : ']');
    if (n < 0) return -1;
    if (c == '{') msgpack_pack_map(b->pk, n);
    else msgpack_pack_array(b->pk, n);
    b->p++;
    for (int i = 0; i < n; i++) {
      if (i) {
        ws(b);
        if (*b->p != ',') return -1;
        b->p++;
      }
      if (value(b)) return -1;
      if (c == '{') {
        ws(b);
        if (*b->p != ':') return -1;
        b->p++;
        if (value(b)) return -1;
      }
    }
    ws(b);
    if (*b->p != (c == '{' ? '}' : ']')) return -1;
    b->p++;
    return 0;
  }
  if (c == '"') return string(b);
  if (!strncmp(b->p, "nil", 3)) { b->p += 3; msgpack_pack_nil(b->pk); return 0; }
  if (!strncmp(b->p, "true", 4)) { b->p += 4; msgpack_pack_true(b->pk); return 0; }
  if (!strncmp(b->p, "false", 5)) { b->p += 5; msgpack_pack_false(b->pk); return 0; }
  if (!strncmp(b->p, "nan", 3)) { b->p += 3; msgpack_pack_double(b->pk, NAN); return 0; }
  if (!strncmp(b->p, "inf", 3)) { b->p += 3; msgpack_pack_double(b->pk, INFINITY); return 0; }
  if (!strncmp(b->p, "bin", 3) || !strncmp(b->p, "str", 3)) {
    int is_bin = b->p[0] == 'b';
    char *end;
    unsigned long n = strtoul(b->p + 3, &end, 10);
    if (end == b->p + 3) return -1;
    b->p = end;
    char *buf = malloc(n + 1);
    for (unsigned long i = 0; i < n; i++) buf[i] = is_bin ? (char)(i & 0xff) : 'a';
    if (is_bin) { msgpack_pack_bin(b->pk, n); msgpack_pack_bin_body(b->pk, buf, n); }
    else { msgpack_pack_str(b->pk, n); msgpack_pack_str_body(b->pk, buf, n); }
    free(buf);
    return 0;
  }
  if (c == '-' || isdigit((unsigned char)c)) {
    const char *s = b->p;
    const char *e = s + (c == '-');
    while (isdigit((unsigned char)*e)) e++;
    if (*e == '.' || *e == 'e' || *e == 'E') {
      char *end;
      double d = strtod(s, &end);
      b->p = end;
      msgpack_pack_double(b->pk, d);
      return 0;
    }
    char *end;
    if (c == '-') msgpack_pack_int64(b->pk, strtoll(s, &end, 10));
    else msgpack_pack_uint64(b->pk, strtoull(s, &end, 10));
    b->p = end;
    return 0;
  }
  return -1;
}

int mpb_pack(msgpack_packer *pk, const char *text) {
  mpb_t b = {text, pk};
  if (value(&b)) return -1;
  ws(&b);
  return *b.p ? -1 : 0;
}

int mpb_request(nsa_proto_writer_t *w, uint32_t msgid, const char *method, const char *params) {
  nsa_proto_writer_reset(w);
  nsa_proto_write_request_begin(w, msgid, method);
  if (mpb_pack(&w->pk, params)) return -1;
  return (int)w->sbuf.size;
}
