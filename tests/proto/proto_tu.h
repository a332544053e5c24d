/*
 * proto_tu.h — helpers shared by the tests/proto suites: a seeded RNG (seed
 * logged), random valid requests of every method (filled exactly as
 * nsa_proto_parse_request fills them), and decode/validate/expect helpers
 * that assert with Criterion.
 */
#ifndef NSA_PROTO_TU_H
#define NSA_PROTO_TU_H

#include <stddef.h>
#include <stdint.h>

#include "nsa_proto.h"

uint64_t rng_u64(void);
int64_t rng_int(int64_t lo, int64_t hi); /* [lo, hi] */
void rng_init(void);                      /* fresh seed per run, logged */
void rand_str(char *buf, size_t cap);     /* 1..cap-1 printable bytes */

/* Feeds a whole buffer and returns nsa_proto_decoder_next()'s status. */
int decode1(nsa_proto_decoder_t *d, const void *buf, size_t len, nsa_proto_msg_t *m,
            nsa_proto_err_t *e, int *known, uint32_t *id);
/* [0, 42, method, params-text] decoded (must succeed) and validated: returns
 * nsa_proto_parse_request()'s status. */
int parse_text(const char *method, const char *params, nsa_request_t *req, nsa_proto_err_t *err);
/* Validation fails with `code` and a message containing `needle`. */
void expect_err(const char *method, const char *params, nsa_proto_code_t code, const char *needle);
void expect_ok(const char *method, const char *params, nsa_request_t *req);
/* Decoding buf fails fatally with bad_request, the given msgid recovery and a
 * message containing needle (NULL: any); the failure is sticky. */
void expect_fatal(const void *buf, size_t len, size_t max, int want_known, uint32_t want_id,
                  const char *needle);

void rand_tensor(nsa_proto_tensor_t *t);
void rand_labels(nsa_proto_label_t *l, int *n, int max);
void rand_request(nsa_method_t m, nsa_request_t *r);

#endif
