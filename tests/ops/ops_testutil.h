/* ops_testutil.h — small helpers shared by the ops test suites. */
#ifndef NSAD_OPS_TESTUTIL_H
#define NSAD_OPS_TESTUTIL_H

#include <msgpack.h>
#include <stddef.h>

#include "flags.h"

/* mkdtemp under $TMPDIR or /tmp; malloc'd path. */
char *ops_tmpdir(void);
void ops_rmtree(const char *path);
void ops_write_file(const char *path, const char *text);
/* Reads a whole file (malloc'd, NUL-terminated) or NULL. */
char *ops_read_file(const char *path, size_t *len);

/* Value for a string key in a msgpack map, or NULL. */
const msgpack_object *ops_map_get(const msgpack_object *map, const char *key);
/* A number (int/uint/float) as double; NAN for other types/NULL. */
double ops_num(const msgpack_object *o);

/* One flag's entry of the flags.get map, decoded. */
typedef struct {
  double value, effective, percent;
  char source[16];
  int has_rollout, has_percent, nmatch;
  char match_key[64], match_value[256];
} ops_flag_info_t;
/* Packs flags.get for the labels and decodes flag `name`; asserts shape. */
void ops_flags_get(nsad_flags_t *f, const nsa_proto_label_t *labels, int n, const char *name,
                   ops_flag_info_t *out);

#endif
