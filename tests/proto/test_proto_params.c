/*
 * test_proto_params.c — typed validation (nsa_proto_parse_request): unknown
 * methods, missing keys named with their path, wrong types, negative and
 * overflowing numbers, strings never truncated, flag values; and the tensor
 * extent against an independent 128-bit computation.
 */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mpbuild.h"
#include "nsa_proto.h"
#include "proto_tu.h"

/* ------------------------------------------------------------ params --- */

#define T(r) "{\"region\": " #r ", \"offset\": 0, \"dtype\": \"f32\", \"shape\": [1, 4, 2, 8]}"
#define TI "{\"region\": 9, \"offset\": 0, \"dtype\": \"i32\", \"shape\": [1, 4, 1, 2]}"
#define SEL "{\"kind\": \"block_indices\", \"indices\": " TI ", \"block_size\": 16}"

Test(params, unknown_method) {
  expect_err("sel_attn.fwd", "{}", NSA_E_UNKNOWN_METHOD, "'sel_attn.fwd'");
  expect_err("", "{}", NSA_E_UNKNOWN_METHOD, "unknown method");
  expect_err("PING", "{}", NSA_E_UNKNOWN_METHOD, "'PING'");
  nsa_request_t req;
  expect_ok("ping", "{}", &req);
  cr_assert(eq(int, req.method, NSA_M_PING));
  expect_ok("ping", "nil", &req);
  expect_ok("flags.get", "{\"whatever\": [1, 2]}", &req); /* unknown keys ignored */
  expect_ok("shutdown", "nil", &req);
}

Test(params, missing_keys_are_named) {
  expect_err("hello", "{\"client\": \"a\", \"pid\": 1}", NSA_E_BAD_REQUEST, "missing key 'protocol'");
  expect_err("hello", "{\"protocol\": 1, \"pid\": 1}", NSA_E_BAD_REQUEST, "missing key 'client'");
  expect_err("hello", "{\"protocol\": 1, \"client\": \"a\"}", NSA_E_BAD_REQUEST, "missing key 'pid'");
  expect_err("hello", "nil", NSA_E_BAD_REQUEST, "missing key 'protocol'");
  expect_err("region.register", "{\"size\": 1}", NSA_E_BAD_REQUEST, "missing key 'kind'");
  expect_err("region.register", "{\"kind\": \"shm\", \"size\": 1}", NSA_E_BAD_REQUEST, "missing key 'name'");
  expect_err("region.register", "{\"kind\": \"shm\", \"name\": \"/nsa-1\"}", NSA_E_BAD_REQUEST, "missing key 'size'");
  expect_err("region.register", "{\"kind\": \"cuda_ipc\", \"handle\": bin64, \"size\": 1}", NSA_E_BAD_REQUEST, "missing key 'device'");
  expect_err("region.register", "{\"kind\": \"cuda_ipc\", \"device\": 0, \"size\": 1}", NSA_E_BAD_REQUEST, "missing key 'handle'");
  expect_err("region.unregister", "{}", NSA_E_BAD_REQUEST, "missing key 'region'");
  expect_err("event.register", "{\"handle\": bin64}", NSA_E_BAD_REQUEST, "missing key 'device'");
  expect_err("event.register", "{\"device\": 0}", NSA_E_BAD_REQUEST, "missing key 'handle'");
  expect_err("event.unregister", "{}", NSA_E_BAD_REQUEST, "missing key 'event'");
  expect_err("sel_attn.forward", "{\"k\": " T(1) ", \"v\": " T(1) ", \"o\": " T(1) ", \"sel\": " SEL "}",
             NSA_E_BAD_REQUEST, "missing key 'q'");
  expect_err("sel_attn.forward", "{\"q\": " T(1) ", \"k\": " T(1) ", \"v\": " T(1) ", \"o\": " T(1) "}",
             NSA_E_BAD_REQUEST, "missing key 'sel'");
  expect_err("sel_attn.forward", "{\"q\": {\"region\": 1, \"offset\": 0, \"shape\": [1]}, \"k\": " T(1) "}",
             NSA_E_BAD_REQUEST, "missing key 'q.dtype'");
  expect_err("sel_attn.forward", "{\"q\": " T(1) ", \"k\": {\"region\": 1, \"dtype\": \"f32\", \"shape\": [1]}}",
             NSA_E_BAD_REQUEST, "missing key 'k.offset'");
  expect_err("sel_attn.forward", "{\"q\": " T(1) ", \"k\": " T(1) ", \"v\": " T(1) ", \"o\": {\"region\": 1, \"offset\": 0, \"dtype\": \"f32\"}}",
             NSA_E_BAD_REQUEST, "missing key 'o.shape'");
  expect_err("sel_attn.forward", "{\"q\": " T(1) ", \"k\": " T(1) ", \"v\": " T(1) ", \"o\": " T(1)
             ", \"sel\": {\"kind\": \"block_indices\", \"indices\": " TI "}}",
             NSA_E_BAD_REQUEST, "missing key 'sel.block_size'");
  expect_err("sel_attn.forward", "{\"q\": " T(1) ", \"k\": " T(1) ", \"v\": " T(1) ", \"o\": " T(1)
             ", \"sel\": {\"kind\": \"ranges\"}}", NSA_E_BAD_REQUEST, "missing key 'sel.ranges'");
  expect_err("sel_attn.forward", "{\"q\": " T(1) ", \"k\": " T(1) ", \"v\": " T(1) ", \"o\": " T(1)
             ", \"sel\": {\"kind\": \"block_indices\", \"block_size\": 4, \"indices\": {\"offset\": 0}}}",
             NSA_E_BAD_REQUEST, "missing key 'sel.indices.region'");
  expect_err("sel_attn.forward", "{\"q\": " T(1) ", \"k\": " T(1) ", \"v\": " T(1) ", \"o\": " T(1)
             ", \"sel\": {\"indices\": " TI "}}", NSA_E_BAD_REQUEST, "missing key 'sel.kind'");
  const char *bwd_missing[] = {"lse", "do", "dq", "dk", "dv"};
  for (int i = 0; i < 5; i++) {
    char p[2048];
    int n = snprintf(p, sizeof p, "{\"q\": " T(1) ", \"k\": " T(1) ", \"v\": " T(1) ", \"o\": " T(1)
                     ", \"sel\": " SEL);
    for (int j = 0; j < 5; j++)
      if (j != i) n += snprintf(p + n, sizeof p - n, ", \"%s\": " T(2), bwd_missing[j]);
    snprintf(p + n, sizeof p - n, "}");
    char want[32];
    snprintf(want, sizeof want, "missing key '%s'", bwd_missing[i]);
    expect_err("sel_attn.backward", p, NSA_E_BAD_REQUEST, want);
  }
  expect_err("flags.set", "{\"value\": \"1\"}", NSA_E_BAD_REQUEST, "missing key 'name'");
  expect_err("flags.set", "{\"name\": \"NSA_SEL_VARLEN_V2\"}", NSA_E_BAD_REQUEST, "missing key 'value'");
  expect_err("flags.reset", "{}", NSA_E_BAD_REQUEST, "missing key 'name'");
  expect_err("metrics.subscribe", "{}", NSA_E_BAD_REQUEST, "missing key 'interval_ms'");
  /* nil counts as missing for required keys */
  expect_err("region.unregister", "{\"region\": nil}", NSA_E_BAD_REQUEST, "missing key 'region'");
}

Test(params, forward_defaults_and_options) {
  nsa_request_t req;
  expect_ok("sel_attn.forward", "{\"q\": " T(1) ", \"k\": " T(2) ", \"v\": " T(3) ", \"o\": " T(4)
            ", \"sel\": " SEL ", \"lse\": nil, \"extra\": {\"x\": 1}}", &req);
  const nsa_req_sel_attn_t *s = &req.u.sel_attn;
  cr_assert(eq(int, req.method, NSA_M_SEL_FORWARD));
  cr_assert(eq(int, s->sync, 1));
  cr_assert(eq(int, s->has_lse, 0));
  cr_assert(eq(int, s->has_scale, 0));
  cr_assert(eq(int, s->has_wait_event + s->has_done_event, 0));
  cr_assert(eq(u64, s->k.region, 2));
  cr_assert(eq(int, s->q.ndim, 4));
  cr_assert(eq(int, s->q.has_strides, 0));
  cr_assert(eq(i64, s->q.strides[0], 64));
  cr_assert(eq(i64, s->q.strides[1], 16));
  cr_assert(eq(i64, s->q.strides[2], 8));
  cr_assert(eq(i64, s->q.strides[3], 1));
  cr_assert(eq(int, s->sel.kind, NSA_SEL_BLOCK_INDICES));
  cr_assert(eq(i32, s->sel.block_size, 16));
  cr_assert(eq(int, s->sel.t.dtype, NSA_I32));
  expect_ok("sel_attn.forward", "{\"q\": " T(1) ", \"k\": " T(2) ", \"v\": " T(3) ", \"o\": " T(4)
            ", \"sel\": {\"kind\": \"ranges\", \"ranges\": " TI "}, \"lse\": " T(5)
            ", \"scale\": 2, \"sync\": false, \"wait_event\": 3, \"done_event\": 0}", &req);
  cr_assert(eq(int, s->sel.kind, NSA_SEL_RANGES));
  cr_assert(eq(int, s->has_lse, 1));
  cr_assert(eq(u64, s->lse.region, 5));
  cr_assert(eq(int, s->has_scale, 1));
  cr_assert(eq(dbl, s->scale, 2.0));
  cr_assert(eq(int, s->sync, 0));
  cr_assert(eq(int, s->has_wait_event, 1));
  cr_assert(eq(u64, s->wait_event, 3));
  cr_assert(eq(int, s->has_done_event, 1));
  cr_assert(eq(u64, s->done_event, 0));
}

#define FWD_WITH(extra) \
  "{\"q\": " T(1) ", \"k\": " T(2) ", \"v\": " T(3) ", \"o\": " T(4) ", \"sel\": " SEL extra "}"
#define FWD_Q(q) "{\"q\": " q ", \"k\": " T(2) ", \"v\": " T(3) ", \"o\": " T(4) ", \"sel\": " SEL "}"

Test(params, wrong_types) {
  expect_err("hello", "{\"protocol\": \"1\", \"client\": \"a\", \"pid\": 1}", NSA_E_BAD_REQUEST, "key 'protocol'");
  expect_err("hello", "{\"protocol\": 1, \"client\": 5, \"pid\": 1}", NSA_E_BAD_REQUEST, "key 'client' must be a string");
  expect_err("hello", "{\"protocol\": 1, \"client\": \"a\", \"pid\": 3.0}", NSA_E_BAD_REQUEST, "key 'pid'");
  expect_err("hello", "{\"protocol\": 1, \"client\": \"a\", \"pid\": 1, \"labels\": [\"a\"]}", NSA_E_BAD_REQUEST, "key 'labels'");
  expect_err("hello", "{\"protocol\": 1, \"client\": \"a\", \"pid\": 1, \"labels\": {\"a\": 1}}", NSA_E_BAD_REQUEST, "key 'labels.a' must be a string");
  expect_err("hello", "{\"protocol\": 1, \"client\": \"a\", \"pid\": 1, \"labels\": {\"a\": \"x\", \"a\": \"y\"}}", NSA_E_BAD_REQUEST, "repeats");
  expect_err("hello", "{\"protocol\": 1, \"client\": \"a\", \"pid\": 1, \"labels\": {1: \"x\"}}", NSA_E_BAD_REQUEST, "key 'labels'");
  expect_err("region.register", "{\"kind\": \"tmpfs\", \"name\": \"/x\", \"size\": 1}", NSA_E_BAD_REQUEST, "key 'kind'");
  expect_err("region.register", "{\"kind\": 1, \"size\": 1}", NSA_E_BAD_REQUEST, "key 'kind'");
  expect_err("region.register", "{\"kind\": \"cuda_ipc\", \"device\": 0, \"handle\": bin63, \"size\": 1}", NSA_E_BAD_REQUEST, "key 'handle' must be a bin of exactly 64");
  expect_err("region.register", "{\"kind\": \"cuda_ipc\", \"device\": 0, \"handle\": bin65, \"size\": 1}", NSA_E_BAD_REQUEST, "key 'handle'");
  expect_err("region.register", "{\"kind\": \"cuda_ipc\", \"device\": 0, \"handle\": str64, \"size\": 1}", NSA_E_BAD_REQUEST, "key 'handle'");
  expect_err("region.register", "{\"kind\": \"shm\", \"name\": \"/x\", \"size\": 0}", NSA_E_BAD_REQUEST, "key 'size' must be a positive integer");
  expect_err("region.register", "{\"kind\": \"shm\", \"name\": \"\", \"size\": 4}", NSA_E_BAD_REQUEST, "key 'name' must not be empty");
  expect_err("region.register", "{\"kind\": \"shm\", \"name\": \"/nsa\\0x\", \"size\": 4}", NSA_E_BAD_REQUEST, "NUL");
  expect_err("region.register", "{\"kind\": \"shm\", \"name\": \"nsa-1\", \"size\": 4}", NSA_E_BAD_REQUEST, "key 'name' must be a shared-memory name");
  expect_err("region.register", "{\"kind\": \"shm\", \"name\": \"/\", \"size\": 4}", NSA_E_BAD_REQUEST, "key 'name'");
  expect_err("region.register", "{\"kind\": \"shm\", \"name\": \"/../etc/passwd\", \"size\": 4}", NSA_E_BAD_REQUEST, "key 'name'");
  expect_err("event.register", "{\"device\": true, \"handle\": bin64}", NSA_E_BAD_REQUEST, "key 'device'");
  expect_err("sel_attn.forward", FWD_Q("[1]"), NSA_E_BAD_REQUEST, "key 'q' must be a map");
  expect_err("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": 0, \"dtype\": \"f64\", \"shape\": [1]}"), NSA_E_BAD_REQUEST, "key 'q.dtype'");
  expect_err("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": 0, \"dtype\": 2, \"shape\": [1]}"), NSA_E_BAD_REQUEST, "key 'q.dtype'");
  expect_err("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": 0, \"dtype\": \"f32\", \"shape\": []}"), NSA_E_BAD_REQUEST, "key 'q.shape'");
  expect_err("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": 0, \"dtype\": \"f32\", \"shape\": [1,2,3,4,5,6]}"), NSA_E_BAD_REQUEST, "key 'q.shape'");
  expect_err("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": 0, \"dtype\": \"f32\", \"shape\": 4}"), NSA_E_BAD_REQUEST, "key 'q.shape'");
  expect_err("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": 0, \"dtype\": \"f32\", \"shape\": [1, 2.0]}"), NSA_E_BAD_REQUEST, "key 'q.shape[1]'");
  expect_err("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": 0, \"dtype\": \"f32\", \"shape\": [1, 2], \"strides\": [2]}"), NSA_E_BAD_REQUEST, "key 'q.strides'");
  expect_err("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": 0, \"dtype\": \"f32\", \"shape\": [1, 2], \"strides\": [2, \"1\"]}"), NSA_E_BAD_REQUEST, "key 'q.strides[1]'");
  expect_err("sel_attn.forward", FWD_Q("{\"region\": \"1\", \"offset\": 0, \"dtype\": \"f32\", \"shape\": [1]}"), NSA_E_BAD_REQUEST, "key 'q.region'");
  expect_err("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": 0.5, \"dtype\": \"f32\", \"shape\": [1]}"), NSA_E_BAD_REQUEST, "key 'q.offset'");
  expect_err("sel_attn.forward", FWD_WITH(", \"scale\": \"2\""), NSA_E_BAD_REQUEST, "key 'scale'");
  expect_err("sel_attn.forward", FWD_WITH(", \"scale\": 0"), NSA_E_BAD_REQUEST, "key 'scale'");
  expect_err("sel_attn.forward", FWD_WITH(", \"scale\": -0.5"), NSA_E_BAD_REQUEST, "key 'scale'");
  expect_err("sel_attn.forward", FWD_WITH(", \"scale\": nan"), NSA_E_BAD_REQUEST, "key 'scale'");
  expect_err("sel_attn.forward", FWD_WITH(", \"scale\": inf"), NSA_E_BAD_REQUEST, "key 'scale'");
  expect_err("sel_attn.forward", FWD_WITH(", \"sync\": 1"), NSA_E_BAD_REQUEST, "key 'sync' must be a boolean");
  expect_err("sel_attn.forward", FWD_WITH(", \"wait_event\": \"e\""), NSA_E_BAD_REQUEST, "key 'wait_event'");
  expect_err("sel_attn.forward", FWD_WITH(", \"done_event\": -1"), NSA_E_BAD_REQUEST, "key 'done_event'");
  expect_err("sel_attn.forward", FWD_WITH(", \"lse\": 5"), NSA_E_BAD_REQUEST, "key 'lse' must be a map");
  expect_err("sel_attn.forward", "{\"q\": " T(1) ", \"k\": " T(2) ", \"v\": " T(3) ", \"o\": " T(4)
             ", \"sel\": {\"kind\": \"blocks\", \"indices\": " TI "}}", NSA_E_BAD_REQUEST, "key 'sel.kind'");
  expect_err("sel_attn.forward", "{\"q\": " T(1) ", \"k\": " T(2) ", \"v\": " T(3) ", \"o\": " T(4)
             ", \"sel\": {\"kind\": \"block_indices\", \"indices\": " TI ", \"block_size\": 0}}",
             NSA_E_BAD_REQUEST, "key 'sel.block_size' must be a positive integer");
  expect_err("sel_attn.forward", "{\"q\": " T(1) ", \"k\": " T(2) ", \"v\": " T(3) ", \"o\": " T(4)
             ", \"sel\": {\"kind\": \"block_indices\", \"indices\": " TI ", \"block_size\": 16.0}}",
             NSA_E_BAD_REQUEST, "key 'sel.block_size' must be a positive integer");
  expect_err("sel_attn.forward", "{\"q\": " T(1) ", \"k\": " T(2) ", \"v\": " T(3) ", \"o\": " T(4)
             ", \"sel\": 7}", NSA_E_BAD_REQUEST, "key 'sel' must be a map");
  expect_err("flags.set", "{\"name\": \"X\", \"value\": [1]}", NSA_E_BAD_REQUEST, "key 'value'");
  expect_err("flags.set", "{\"name\": \"X\", \"value\": nil}", NSA_E_BAD_REQUEST, "missing key 'value'");
  expect_err("flags.set", "{\"name\": \"X\", \"value\": \"1\", \"percent\": 101}", NSA_E_BAD_REQUEST, "key 'percent'");
  expect_err("flags.set", "{\"name\": \"X\", \"value\": \"1\", \"percent\": -1}", NSA_E_BAD_REQUEST, "key 'percent'");
  expect_err("flags.set", "{\"name\": \"X\", \"value\": \"1\", \"percent\": \"50\"}", NSA_E_BAD_REQUEST, "key 'percent'");
  expect_err("flags.set", "{\"name\": \"X\", \"value\": \"1\", \"match\": {\"a\": 2}}", NSA_E_BAD_REQUEST, "key 'match.a'");
  expect_err("flags.set", "{\"name\": \"X\", \"value\": \"1\", \"match\": \"a=b\"}", NSA_E_BAD_REQUEST, "key 'match'");
  expect_err("flags.set", "{\"name\": \"\", \"value\": \"1\"}", NSA_E_BAD_REQUEST, "key 'name'");
  expect_err("flags.reset", "{\"name\": 3}", NSA_E_BAD_REQUEST, "key 'name' must be a string");
  expect_err("metrics.get", "{\"format\": \"xml\"}", NSA_E_BAD_REQUEST, "key 'format'");
  expect_err("metrics.get", "{\"format\": 1}", NSA_E_BAD_REQUEST, "key 'format'");
  expect_err("metrics.subscribe", "{\"interval_ms\": 5}", NSA_E_BAD_REQUEST, "key 'interval_ms'");
  expect_err("metrics.subscribe", "{\"interval_ms\": 100.0}", NSA_E_BAD_REQUEST, "key 'interval_ms'");
  expect_err("metrics.subscribe", "{\"interval_ms\": 3600001}", NSA_E_BAD_REQUEST, "key 'interval_ms'");
}

Test(params, negative_and_overflowing_numbers) {
  expect_err("hello", "{\"protocol\": -1, \"client\": \"a\", \"pid\": 1}", NSA_E_BAD_REQUEST, "key 'protocol'");
  expect_err("hello", "{\"protocol\": 18446744073709551615, \"client\": \"a\", \"pid\": 1}", NSA_E_BAD_REQUEST, "key 'protocol'");
  expect_err("hello", "{\"protocol\": 1, \"client\": \"a\", \"pid\": -5}", NSA_E_BAD_REQUEST, "key 'pid'");
  expect_err("hello", "{\"protocol\": 1, \"client\": \"a\", \"pid\": 2147483648}", NSA_E_BAD_REQUEST, "key 'pid'");
  expect_err("region.register", "{\"kind\": \"cuda_ipc\", \"device\": 2147483648, \"handle\": bin64, \"size\": 1}", NSA_E_BAD_REQUEST, "key 'device'");
  expect_err("region.register", "{\"kind\": \"cuda_ipc\", \"device\": -1, \"handle\": bin64, \"size\": 1}", NSA_E_BAD_REQUEST, "key 'device'");
  expect_err("region.register", "{\"kind\": \"shm\", \"name\": \"/x\", \"size\": -4096}", NSA_E_BAD_REQUEST, "key 'size'");
  expect_err("region.unregister", "{\"region\": -1}", NSA_E_BAD_REQUEST, "key 'region'");
  expect_err("event.unregister", "{\"event\": -9223372036854775808}", NSA_E_BAD_REQUEST, "key 'event'");
  expect_err("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": -8, \"dtype\": \"f32\", \"shape\": [1]}"), NSA_E_BAD_REQUEST, "key 'q.offset'");
  expect_err("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": 0, \"dtype\": \"f32\", \"shape\": [1, -2]}"), NSA_E_BAD_REQUEST, "key 'q.shape[1]'");
  expect_err("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": 0, \"dtype\": \"f32\", \"shape\": [9223372036854775808]}"), NSA_E_BAD_REQUEST, "key 'q.shape[0]'");
  expect_err("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": 0, \"dtype\": \"f32\", \"shape\": [2, 2], \"strides\": [-1, 1]}"), NSA_E_BAD_REQUEST, "key 'q.strides[0]'");
  /* contiguous strides of this shape overflow 64 bits */
  expect_err("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": 0, \"dtype\": \"f32\", \"shape\": [2, 4294967296, 4294967296]}"), NSA_E_BAD_REQUEST, "key 'q.shape'");
  expect_err("sel_attn.forward", "{\"q\": " T(1) ", \"k\": " T(2) ", \"v\": " T(3) ", \"o\": " T(4)
             ", \"sel\": {\"kind\": \"block_indices\", \"indices\": " TI ", \"block_size\": 2147483648}}",
             NSA_E_BAD_REQUEST, "key 'sel.block_size'");
  expect_err("sel_attn.forward", "{\"q\": " T(1) ", \"k\": " T(2) ", \"v\": " T(3) ", \"o\": " T(4)
             ", \"sel\": {\"kind\": \"block_indices\", \"indices\": " TI ", \"block_size\": -16}}",
             NSA_E_BAD_REQUEST, "key 'sel.block_size'");
  expect_err("metrics.subscribe", "{\"interval_ms\": -100}", NSA_E_BAD_REQUEST, "key 'interval_ms'");
  expect_err("metrics.subscribe", "{\"interval_ms\": 4294967396}", NSA_E_BAD_REQUEST, "key 'interval_ms'");
  /* the largest accepted values */
  nsa_request_t req;
  expect_ok("region.unregister", "{\"region\": 18446744073709551615}", &req);
  cr_assert(eq(u64, req.u.region, UINT64_MAX));
  expect_ok("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": 18446744073709551615, \"dtype\": \"bf16\", \"shape\": [9223372036854775807], \"strides\": [9223372036854775807]}"), &req);
  cr_assert(eq(u64, req.u.sel_attn.q.offset, UINT64_MAX));
  cr_assert(eq(i64, req.u.sel_attn.q.shape[0], INT64_MAX));
  cr_assert(eq(int, req.u.sel_attn.q.dtype, NSA_BF16));
}

Test(params, strings_never_truncated) {
  char p[1024];
  nsa_request_t req;
  /* client[128]: 127 bytes fit, 128 do not */
  snprintf(p, sizeof p, "{\"protocol\": 1, \"client\": str127, \"pid\": 1}");
  expect_ok("hello", p, &req);
  cr_assert(eq(sz, strlen(req.u.hello.client), 127));
  expect_err("hello", "{\"protocol\": 1, \"client\": str128, \"pid\": 1}", NSA_E_BAD_REQUEST, "key 'client' is too long");
  expect_err("region.register", "{\"kind\": \"shm\", \"name\": str256, \"size\": 1}", NSA_E_BAD_REQUEST, "key 'name' is too long");
  expect_err("region.register", "{\"kind\": \"shm\", \"name\": str255, \"size\": 1}", NSA_E_BAD_REQUEST, "shared-memory name");
  {
    char name[300] = "{\"kind\": \"shm\", \"name\": \"/";
    size_t k = strlen(name);
    memset(name + k, 'n', 254);
    strcpy(name + k + 254, "\", \"size\": 1}");
    expect_ok("region.register", name, &req);
    cr_assert(eq(sz, strlen(req.u.region_register.name), 255));
  }
  expect_err("flags.set", "{\"name\": str64, \"value\": \"1\"}", NSA_E_BAD_REQUEST, "key 'name' is too long");
  expect_err("flags.set", "{\"name\": \"X\", \"value\": str256}", NSA_E_BAD_REQUEST, "key 'value' is too long");
  expect_err("flags.reset", "{\"name\": str64}", NSA_E_BAD_REQUEST, "key 'name' is too long");
  expect_err("hello", "{\"protocol\": 1, \"client\": \"a\", \"pid\": 1, \"labels\": {str64: \"x\"}}", NSA_E_BAD_REQUEST, "key 'labels'");
  expect_err("hello", "{\"protocol\": 1, \"client\": \"a\", \"pid\": 1, \"labels\": {\"k\": str256}}", NSA_E_BAD_REQUEST, "key 'labels.k' is too long");
  /* 33 labels is one too many */
  int n = snprintf(p, sizeof p, "{\"protocol\": 1, \"client\": \"a\", \"pid\": 1, \"labels\": {");
  for (int i = 0; i < 33; i++) n += snprintf(p + n, sizeof p - n, "%s\"k%d\": \"v\"", i ? ", " : "", i);
  snprintf(p + n, sizeof p - n, "}}");
  expect_err("hello", p, NSA_E_BAD_REQUEST, "key 'labels' has 33 entries");
}

Test(params, flags_set_values) {
  nsa_request_t req;
  expect_ok("flags.set", "{\"name\": \"NSA_USE_SEL_VARLEN\", \"value\": true}", &req);
  cr_assert(eq(str, req.u.flags_set.value, "1"));
  expect_ok("flags.set", "{\"name\": \"NSA_USE_SEL_VARLEN\", \"value\": false}", &req);
  cr_assert(eq(str, req.u.flags_set.value, "0"));
  expect_ok("flags.set", "{\"name\": \"NSA_SEL_VARLEN_MIN_L\", \"value\": 128}", &req);
  cr_assert(eq(str, req.u.flags_set.value, "128"));
  expect_ok("flags.set", "{\"name\": \"NSA_SEL_VARLEN_MIN_L\", \"value\": -3}", &req);
  cr_assert(eq(str, req.u.flags_set.value, "-3"));
  expect_ok("flags.set", "{\"name\": \"NSA_SEL_SHADOW_RATE\", \"value\": 0.1}", &req);
  cr_assert(eq(str, req.u.flags_set.value, "0.1"));
  expect_ok("flags.set", "{\"name\": \"NSA_SEL_VARLEN_V2\", \"value\": \"off\", \"percent\": 12.5, \"match\": {\"job\": \"rl\", \"rank\": \"0\"}}", &req);
  cr_assert(eq(str, req.u.flags_set.name, "NSA_SEL_VARLEN_V2"));
  cr_assert(eq(str, req.u.flags_set.value, "off"));
  cr_assert(eq(int, req.u.flags_set.has_percent, 1));
  cr_assert(eq(dbl, req.u.flags_set.percent, 12.5));
  cr_assert(eq(int, req.u.flags_set.nmatch, 2));
  cr_assert(eq(str, req.u.flags_set.match[1].key, "rank"));
  cr_assert(eq(str, req.u.flags_set.match[1].value, "0"));
  expect_ok("flags.set", "{\"name\": \"X\", \"value\": \"1\", \"percent\": 100}", &req);
  cr_assert(eq(dbl, req.u.flags_set.percent, 100.0));
  expect_ok("metrics.get", "{\"format\": \"prometheus\"}", &req);
  cr_assert(eq(int, req.u.metrics_get.prometheus, 1));
  expect_ok("metrics.get", "{}", &req);
  cr_assert(eq(int, req.u.metrics_get.prometheus, 0));
}

Test(params, response_is_not_a_request) {
  nsa_proto_writer_t w;
  nsa_proto_writer_init(&w);
  nsa_proto_write_result_begin(&w, 1);
  msgpack_pack_nil(&w.pk);
  nsa_proto_decoder_t *d = nsa_proto_decoder_new(0);
  nsa_proto_msg_t m;
  nsa_proto_err_t e;
  int known;
  uint32_t id;
  cr_assert(eq(int, decode1(d, w.sbuf.data, w.sbuf.size, &m, &e, &known, &id), 1));
  nsa_request_t req;
  cr_assert(eq(int, nsa_proto_parse_request(&m, &req, &e), -1));
  cr_assert(eq(int, e.code, NSA_E_BAD_REQUEST));
  nsa_proto_decoder_free(d);
  nsa_proto_writer_destroy(&w);
}

/* ------------------------------------------------------------ extent --- */

/* Independent reference in 128-bit arithmetic. Returns -1 on overflow. */
static int ref_extent(const nsa_proto_tensor_t *t, uint64_t *out) {
  unsigned __int128 last = 0;
  for (int i = 0; i < t->ndim; i++) {
    if (t->shape[i] == 0) {
      *out = 0;
      return 0;
    }
  }
  for (int i = 0; i < t->ndim; i++) {
    /* each product < 2^126 and last stays < 2^64 here, so no 128-bit wrap */
    last += (unsigned __int128)(uint64_t)(t->shape[i] - 1) * (uint64_t)t->strides[i];
    if (last > UINT64_MAX) return -1;
  }
  unsigned __int128 bytes = (last + 1) * (unsigned __int128)nsa_dtype_size(t->dtype);
  if (bytes > UINT64_MAX || bytes + t->offset > UINT64_MAX) return -1;
  *out = (uint64_t)bytes;
  return 0;
}

Test(extent, known_values) {
  nsa_proto_tensor_t t = {0};
  t.dtype = NSA_F32;
  t.ndim = 3;
  t.shape[0] = 2, t.shape[1] = 3, t.shape[2] = 4;
  cr_assert(eq(int, nsa_proto_tensor_set_contiguous(&t), 0));
  uint64_t e;
  cr_assert(eq(int, nsa_proto_tensor_extent(&t, &e), 0));
  cr_assert(eq(u64, e, 96));
  /* transposed-ish: strides {1, 2, 6} reach element 1 + 4 + 18 = 23 → 24 elems */
  t.strides[0] = 1, t.strides[1] = 2, t.strides[2] = 6;
  cr_assert(eq(int, nsa_proto_tensor_extent(&t, &e), 0));
  cr_assert(eq(u64, e, 96));
  /* broadcast (stride 0) and gaps */
  t.strides[0] = 0, t.strides[1] = 100, t.strides[2] = 1;
  cr_assert(eq(int, nsa_proto_tensor_extent(&t, &e), 0));
  cr_assert(eq(u64, e, (200 + 3 + 1) * 4));
  /* a zero dimension: nothing reachable, even with absurd strides */
  t.shape[1] = 0;
  t.strides[0] = INT64_MAX;
  cr_assert(eq(int, nsa_proto_tensor_extent(&t, &e), 0));
  cr_assert(eq(u64, e, 0));
  /* overflow: (2^62-1)*4 + 3 + 1 elements = 2^64 */
  nsa_proto_tensor_t o = {0};
  o.dtype = NSA_I32;
  o.ndim = 2;
  o.shape[0] = (int64_t)1 << 62, o.shape[1] = 4;
  o.strides[0] = 4, o.strides[1] = 1;
  cr_assert(eq(int, nsa_proto_tensor_extent(&o, &e), -1));
  /* elements fit but bytes do not */
  o.shape[0] = (int64_t)1 << 61;
  cr_assert(eq(int, nsa_proto_tensor_extent(&o, &e), -1));
  o.shape[0] = (int64_t)1 << 59;
  cr_assert(eq(int, nsa_proto_tensor_extent(&o, &e), 0));
  cr_assert(eq(u64, e, (uint64_t)1 << 63));
  /* offset + extent overflow */
  o.offset = UINT64_MAX - ((uint64_t)1 << 63) + 1;
  cr_assert(eq(int, nsa_proto_tensor_extent(&o, &e), -1));
  o.offset -= 1;
  cr_assert(eq(int, nsa_proto_tensor_extent(&o, &e), 0));
  /* stride products overflow */
  o.offset = 0;
  o.shape[0] = 3, o.strides[0] = INT64_MAX;
  cr_assert(eq(int, nsa_proto_tensor_extent(&o, &e), -1));
  /* malformed structs */
  o.ndim = 0;
  cr_assert(eq(int, nsa_proto_tensor_extent(&o, &e), -1));
  o.ndim = 6;
  cr_assert(eq(int, nsa_proto_tensor_extent(&o, &e), -1));
  o.ndim = 2;
  o.shape[0] = -1;
  cr_assert(eq(int, nsa_proto_tensor_extent(&o, &e), -1));
  o.shape[0] = 1;
  o.dtype = (nsa_dtype_t)7;
  cr_assert(eq(int, nsa_proto_tensor_extent(&o, &e), -1));
}

Test(extent, random_against_int128) {
  rng_init();
  int overflows = 0, fits = 0;
  for (int it = 0; it < 200000; it++) {
    nsa_proto_tensor_t t = {0};
    t.dtype = (nsa_dtype_t)rng_int(0, 3);
    t.ndim = (int)rng_int(1, 5);
    int big = (int)rng_int(0, 3);
    for (int i = 0; i < t.ndim; i++) {
      t.shape[i] = big ? (int64_t)(rng_u64() >> rng_int(1, 63)) : rng_int(0, 64);
      t.strides[i] = big ? (int64_t)(rng_u64() >> rng_int(1, 63)) : rng_int(0, 4096);
    }
    t.offset = rng_int(0, 1) ? rng_u64() : (uint64_t)rng_int(0, 1 << 20);
    uint64_t got = 0, want = 0;
    int rg = nsa_proto_tensor_extent(&t, &got);
    int rw = ref_extent(&t, &want);
    cr_assert(eq(int, rg, rw), "iteration %d: status %d vs reference %d", it, rg, rw);
    if (rg == 0) {
      cr_assert(eq(u64, got, want), "iteration %d", it);
      fits++;
    } else {
      overflows++;
    }
  }
  cr_assert(gt(int, overflows, 1000));
  cr_assert(gt(int, fits, 1000));
}
