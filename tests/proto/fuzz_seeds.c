/*
 * fuzz_seeds.c — writes the seed corpus for fuzz_proto into a directory:
 * one valid request per method (several feed patterns), all methods in one
 * stream, responses/notifications, and the malformed classes of test_proto_wire.c.
 * Usage: proto_fuzz_seeds DIR
 */
#include <stdio.h>
#include <string.h>

#include "mpbuild.h"
#include "nsa_proto.h"

static const char *dir;
static int count;

static int emit(unsigned char ctl, const void *data, size_t len) {
  char path[4096];
  snprintf(path, sizeof path, "%s/seed-%03d", dir, count++);
  FILE *f = fopen(path, "wb");
  if (!f) {
    perror(path);
    return -1;
  }
  int ok = fwrite(&ctl, 1, 1, f) == 1 && fwrite(data, 1, len, f) == len;
  if (fclose(f) != 0 || !ok) {
    perror(path);
    return -1;
  }
  return 0;
}

#define T(r) "{\"region\": " #r ", \"offset\": 64, \"dtype\": \"f32\", \"shape\": [1, 4, 2, 8]}"
#define TS(r) \
  "{\"region\": " #r ", \"offset\": 0, \"dtype\": \"bf16\", \"shape\": [1, 4, 2, 8], " \
  "\"strides\": [64, 16, 8, 1]}"
#define TI "{\"region\": 9, \"offset\": 0, \"dtype\": \"i32\", \"shape\": [1, 4, 1, 2]}"

static const struct {
  const char *method, *params;
} k_valid[] = {
    {"hello", "{\"protocol\": 1, \"client\": \"trainer\", \"pid\": 4242, \"labels\": {\"job\": \"rl\", \"rank\": \"3\"}}"},
    {"ping", "{}"},
    {"region.register", "{\"kind\": \"shm\", \"name\": \"/nsa-4242-1\", \"size\": 1048576}"},
    {"region.register", "{\"kind\": \"cuda_ipc\", \"device\": 0, \"handle\": bin64, \"size\": 4096}"},
    {"region.unregister", "{\"region\": 3}"},
    {"event.register", "{\"device\": 1, \"handle\": bin64}"},
    {"event.unregister", "{\"event\": 7}"},
    {"sel_attn.forward", "{\"q\": " T(1) ", \"k\": " TS(2) ", \"v\": " T(3) ", \"o\": " T(4)
                         ", \"sel\": {\"kind\": \"block_indices\", \"indices\": " TI
                         ", \"block_size\": 16}, \"scale\": 0.125}"},
    {"sel_attn.forward", "{\"q\": " T(1) ", \"k\": " T(2) ", \"v\": " T(3) ", \"o\": " T(4)
                         ", \"lse\": " T(5) ", \"sel\": {\"kind\": \"ranges\", \"ranges\": " TI
                         "}, \"sync\": false, \"wait_event\": 1, \"done_event\": 2}"},
    {"sel_attn.backward", "{\"q\": " T(1) ", \"k\": " T(2) ", \"v\": " T(3) ", \"o\": " T(4)
                          ", \"lse\": " T(5) ", \"do\": " T(6) ", \"dq\": " T(7) ", \"dk\": " T(8)
                          ", \"dv\": " T(9) ", \"sel\": {\"kind\": \"block_indices\", \"indices\": "
                          TI ", \"block_size\": 64}}"},
    {"flags.get", "nil"},
    {"flags.set", "{\"name\": \"NSA_SEL_VARLEN_V2\", \"value\": \"off\", \"percent\": 25, \"match\": {\"job\": \"rl\"}}"},
    {"flags.set", "{\"name\": \"NSA_SEL_VARLEN_MIN_L\", \"value\": 128}"},
    {"flags.set", "{\"name\": \"NSA_USE_SEL_VARLEN\", \"value\": true}"},
    {"flags.reset", "{\"name\": \"NSA_SEL_VARLEN_V2\"}"},
    {"metrics.get", "{\"format\": \"prometheus\"}"},
    {"metrics.subscribe", "{\"interval_ms\": 1000}"},
    {"shutdown", "{}"},
    /* invalid params (validator error paths) */
    {"hello", "{\"protocol\": -1, \"client\": 5}"},
    {"sel_attn.forward", "{\"q\": {\"region\": 1, \"offset\": 0, \"dtype\": \"f64\", \"shape\": [1, -2]}}"},
    {"nope.method", "{}"},
};

/* Every msgpack format family once (same bytes as test_proto_wire.c). */
static const unsigned char k_all_types[] = {
    0xdc, 0x00, 0x27,                                   /* array16 of 39 */
    0xc0, 0xc2, 0xc3,                                   /* nil false true */
    0x05, 0xe0,                                         /* fixint, negative fixint */
    0xcc, 0xff, 0xcd, 0xff, 0xff, 0xce, 0, 0, 0, 1,     /* uint8/16/32 */
    0xcf, 0, 0, 0, 0, 0, 0, 0, 2,                       /* uint64 */
    0xd0, 0x80, 0xd1, 0x80, 0x00, 0xd2, 0xff, 0xff, 0xff, 0xfe, /* int8/16/32 */
    0xd3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfd,       /* int64 */
    0xca, 0x3f, 0x80, 0x00, 0x00,                       /* float32 1.0 */
    0xcb, 0x40, 0x00, 0, 0, 0, 0, 0, 0,                 /* float64 2.0 */
    0xa2, 'h', 'i', 0xd9, 0x01, 'a', 0xda, 0x00, 0x01, 'b',
    0xdb, 0x00, 0x00, 0x00, 0x01, 'c',                  /* fixstr, str8/16/32 */
    0xc4, 0x01, 0x01, 0xc5, 0x00, 0x01, 0x02, 0xc6, 0, 0, 0, 1, 0x03, /* bin8/16/32 */
    0xd4, 0x01, 0xaa,                                   /* fixext1 */
    0xd5, 0x02, 0xaa, 0xbb,                             /* fixext2 */
    0xd6, 0x03, 1, 2, 3, 4,                             /* fixext4 */
    0xd7, 0xff, 0, 0, 0, 0, 0, 0, 0, 1,                 /* fixext8 (timestamp) */
    0xd8, 0x04, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, /* fixext16 */
    0xc7, 0x01, 0x05, 0xee, 0xc8, 0x00, 0x01, 0x06, 0xee,
    0xc9, 0x00, 0x00, 0x00, 0x01, 0x07, 0xee,           /* ext8/16/32 */
    0x92, 0x01, 0x02, 0xdc, 0x00, 0x01, 0x03, 0xdd, 0, 0, 0, 1, 0x04, /* arrays */
    0x81, 0x01, 0x02, 0xde, 0x00, 0x01, 0x03, 0x04,
    0xdf, 0, 0, 0, 1, 0x05, 0x06,                       /* maps */
    0x90, 0x80, 0xa0,                                   /* empty array, map, str */
};

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  dir = argv[1];
  nsa_proto_writer_t w, all;
  nsa_proto_writer_init(&w);
  nsa_proto_writer_init(&all);
  static const unsigned char ctls[] = {0x00, 0x02, 0x1c, 0x0e};
  for (size_t i = 0; i < sizeof k_valid / sizeof k_valid[0]; i++) {
    if (mpb_request(&w, (uint32_t)(i + 1), k_valid[i].method, k_valid[i].params) < 0) {
      fprintf(stderr, "bad seed text %zu\n", i);
      return 1;
    }
    if (emit(ctls[i % 4], w.sbuf.data, w.sbuf.size)) return 1;
    msgpack_sbuffer_write(&all.sbuf, w.sbuf.data, w.sbuf.size);
  }
  /* everything in one stream, two feed patterns */
  if (emit(0x00, all.sbuf.data, all.sbuf.size) || emit(0x1e, all.sbuf.data, all.sbuf.size))
    return 1;

  /* responses and a notification */
  nsa_proto_writer_reset(&w);
  nsa_proto_write_result_begin(&w, 9);
  msgpack_pack_map(&w.pk, 2);
  nsa_proto_pack_kv_str(&w.pk, "path", "varlen_v2");
  nsa_proto_pack_kv_double(&w.pk, "device_us", 12.5);
  nsa_proto_write_error(&w, 10, NSA_E_NOT_FOUND, "region 3 not found");
  nsa_proto_write_notification_begin(&w, "metrics");
  msgpack_pack_map(&w.pk, 1);
  nsa_proto_pack_kv_uint(&w.pk, "requests", 5);
  if (emit(0x00, w.sbuf.data, w.sbuf.size)) return 1;

  /* malformed classes */
  static const unsigned char str32[] = {0x94, 0x00, 0x09, 0xa5, 'h', 'e', 'l', 'l', 'o', 0x81,
                                        0xa6, 'c', 'l', 'i', 'e', 'n', 't', 0xdb, 0xff, 0xff,
                                        0xff, 0xff};
  static const unsigned char arr32[] = {0xdd, 0xff, 0xff, 0xff, 0xff, 0x00};
  static const unsigned char map32[] = {0x94, 0x00, 0x01, 0xa4, 'p', 'i', 'n', 'g', 0xdf, 0x7f,
                                        0xff, 0xff, 0xff};
  static const unsigned char c1[] = {0x94, 0x00, 0x07, 0xc1};
  static const unsigned char badid[] = {0x94, 0x00, 0xcf, 0xff, 0xff, 0xff, 0xff, 0xff,
                                        0xff, 0xff, 0xff, 0xa4, 'p', 'i', 'n', 'g', 0x80};
  static const unsigned char ext[] = {0x94, 0x00, 0x02, 0xa4, 'p', 'i', 'n', 'g', 0x81, 0xa1, 'x',
                                      0xd6, 0xff, 0x00, 0x00, 0x00, 0x01};
  unsigned char deep[64];
  memcpy(deep, "\x94\x00\x01\xa4ping\x81\xa1x", 11);
  memset(deep + 11, 0x91, sizeof deep - 12);
  deep[sizeof deep - 1] = 0x01;
  if (emit(0x00, str32, sizeof str32) || emit(0x01, arr32, sizeof arr32) ||
      emit(0x02, map32, sizeof map32) || emit(0x00, c1, sizeof c1) ||
      emit(0x00, badid, sizeof badid) || emit(0x10, ext, sizeof ext) ||
      emit(0x00, deep, sizeof deep))
    return 1;
  /* [0, 33, "ping", {"x": <every encoding>}] */
  {
    unsigned char buf[512];
    memcpy(buf, "\x94\x00\x21\xa4ping\x81\xa1x", 11);
    memcpy(buf + 11, k_all_types, sizeof k_all_types);
    if (emit(0x00, buf, 11 + sizeof k_all_types) || emit(0x02, buf, 11 + sizeof k_all_types))
      return 1;
  }
  /* over the 4 KiB limit (ctl bit 0) by a long string */
  mpb_request(&w, 11, "hello", "{\"protocol\": 1, \"client\": str5000, \"pid\": 1}");
  if (emit(0x01, w.sbuf.data, w.sbuf.size)) return 1;

  nsa_proto_writer_destroy(&w);
  nsa_proto_writer_destroy(&all);
  printf("wrote %d seeds to %s\n", count, dir);
  return 0;
}
