/*
 * fuzz_seeds.c — writes the seed corpus for fuzz_proto into a directory:
 * one valid request per method (several feed patterns), all methods in one
 * stream, responses/notifications, and the malformed classes of test_proto.c.
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
  /* over the 4 KiB limit (ctl bit 0) by a long string */
  mpb_request(&w, 11, "hello", "{\"protocol\": 1, \"client\": str5000, \"pid\": 1}");
  if (emit(0x01, w.sbuf.data, w.sbuf.size)) return 1;

  nsa_proto_writer_destroy(&w);
  nsa_proto_writer_destroy(&all);
  printf("wrote %d seeds to %s\n", count, dir);
  return 0;
}
