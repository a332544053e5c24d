/*
 * mpbuild.h — test helper: msgpack bytes from a JSON-like text, so malformed
 * requests read like what they are. Syntax (whitespace ignored):
 *   {"k": v, ...}  [v, ...]  "str" (escapes \" \\ \0)  nil true false
 *   123  -5  (ints; 18446744073709551615 fits as uint64)
 *   1.5  -2e3  nan  inf   (float64)
 *   binN   a bin of N bytes (N decimal, bytes i & 0xff)
 *   strN   a str of N 'a' bytes
 * Returns the byte count written into w, or -1 on a syntax error.
 */
#ifndef NSA_TEST_MPBUILD_H
#define NSA_TEST_MPBUILD_H

#include <stdint.h>

#include "nsa_proto.h"

int mpb_pack(msgpack_packer *pk, const char *text);
/* [0, msgid, method, <params text>] into w (reset first). */
int mpb_request(nsa_proto_writer_t *w, uint32_t msgid, const char *method, const char *params);

#endif
