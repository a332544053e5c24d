/*
 * test_api.c — nsad's protocol surface against a real daemon process:
 * hello/ping, hello-first, protocol version, shm regions, forward/backward on
 * every path (chosen through flags) vs the float64 reference, and every error
 * code reachable from outside.
 */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <fcntl.h>
#include <grp.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"

TestSuite(api, .fini = th_fini, .timeout = 240);

static nsa_proto_decoder_t *dec_new(void) { return nsa_proto_decoder_new(1u << 20); }

#define EXPECT_CODE(c, want)                                                             \
  cr_expect_str_eq(nsa_client_error_code(c), want, "code %s (%s), want %s",              \
                   nsa_client_error_code(c), nsa_client_error_message(c), want)

Test(api, hello_and_ping) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  nsa_client_t *c = th_client(&d, "t");
  cr_assert_not_null(c);
  const nsa_client_info_t *in = nsa_client_info(c);
  cr_expect_eq(in->protocol, 1);
  cr_expect_str_eq(in->backend, "cpu");
  cr_expect_gt(in->session, 0);
  cr_expect_geq(in->ndevices, 1);
  cr_expect(strncmp(in->server, "nsad ", 5) == 0, "server '%s'", in->server);
  for (int i = 0; i < 5; i++) cr_expect_eq(nsa_client_ping(c), 0);
  nsa_client_close(c);
  cr_expect_eq(th_stop(&d, 1), 0);
}

Test(api, hello_must_come_first_and_protocol_version) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  int fd = th_raw_connect(d.sock);
  cr_assert_geq(fd, 0);
  nsa_proto_decoder_t *dec = dec_new();
  uint32_t id;
  char code[32];
  cr_assert_eq(th_raw_request(fd, 7, "ping"), 0);
  cr_assert_eq(th_raw_response(fd, dec, 5000, &id, code, sizeof code), 1);
  cr_expect_eq(id, 7);
  cr_expect_str_eq(code, "bad_request");
  /* wrong protocol */
  nsa_proto_writer_t w;
  nsa_proto_writer_init(&w);
  nsa_proto_write_request_begin(&w, 8, "hello");
  msgpack_pack_map(&w.pk, 3);
  nsa_proto_pack_kv_int(&w.pk, "protocol", 2);
  nsa_proto_pack_kv_str(&w.pk, "client", "old");
  nsa_proto_pack_kv_int(&w.pk, "pid", 1);
  th_raw_send(fd, w.sbuf.data, w.sbuf.size);
  nsa_proto_writer_destroy(&w);
  cr_assert_eq(th_raw_response(fd, dec, 5000, &id, code, sizeof code), 1);
  cr_expect_eq(id, 8);
  cr_expect_str_eq(code, "protocol_version");
  /* the connection is still usable: a proper hello, then ping */
  th_raw_hello(fd, 9);
  cr_assert_eq(th_raw_response(fd, dec, 5000, &id, code, sizeof code), 1);
  cr_expect_str_eq(code, "");
  th_raw_hello(fd, 10);
  cr_assert_eq(th_raw_response(fd, dec, 5000, &id, code, sizeof code), 1);
  cr_expect_str_eq(code, "bad_request", "a second hello is refused");
  th_raw_request(fd, 11, "ping");
  cr_assert_eq(th_raw_response(fd, dec, 5000, &id, code, sizeof code), 1);
  cr_expect_eq(id, 11);
  cr_expect_str_eq(code, "");
  th_raw_request(fd, 12, "no.such.method");
  cr_assert_eq(th_raw_response(fd, dec, 5000, &id, code, sizeof code), 1);
  cr_expect_str_eq(code, "unknown_method");
  th_raw_request(fd, 13, "region.unregister"); /* missing key 'region' */
  cr_assert_eq(th_raw_response(fd, dec, 5000, &id, code, sizeof code), 1);
  cr_expect_str_eq(code, "bad_request");
  nsa_proto_decoder_free(dec);
  close(fd);
  cr_expect_eq(th_stop(&d, 1), 0);
}

Test(api, shm_regions) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  nsa_client_t *c = th_client(&d, "t");
  cr_assert_not_null(c);
  nsa_client_shm_t *a, *b;
  cr_assert_eq(nsa_client_shm_create(c, 4096, &a), 0);
  cr_assert_eq(nsa_client_shm_create(c, 1 << 20, &b), 0);
  cr_expect_neq(a->region, b->region);
  uint64_t id = a->region;
  cr_expect_eq(nsa_client_region_unregister(c, id), 0);
  cr_expect_eq(nsa_client_region_unregister(c, id), -1);
  EXPECT_CODE(c, "not_found");
  /* unknown object, object smaller than size, bad name */
  uint64_t r;
  cr_expect_eq(nsa_client_region_register_shm(c, "/nsa-test-does-not-exist", 64, &r), -1);
  EXPECT_CODE(c, "not_found");
  cr_expect_eq(nsa_client_region_register_shm(c, b->name, (2 << 20), &r), -1);
  EXPECT_CODE(c, "bad_request");
  cr_expect_eq(nsa_client_region_register_shm(c, "no-slash", 64, &r), -1);
  EXPECT_CODE(c, "bad_request");
  /* the same object twice is fine (two regions) */
  cr_expect_eq(nsa_client_region_register_shm(c, b->name, 4096, &r), 0);
  cr_expect_eq(nsa_client_region_unregister(c, r), 0);
  nsa_client_shm_destroy(c, a);
  nsa_client_shm_destroy(c, b);
  nsa_client_close(c);
  cr_expect_eq(th_stop(&d, 1), 0);
}

/* Sets one flag (or resets it when value is NULL) and returns the epoch. */
static uint64_t set_flag(nsa_client_t *c, const char *name, const char *value) {
  uint64_t e = 0;
  int rc = value ? nsa_client_flags_set(c, name, value, -1, NULL, 0, &e)
                 : nsa_client_flags_reset(c, name, &e);
  cr_assert_eq(rc, 0, "%s: %s", nsa_client_error_code(c), nsa_client_error_message(c));
  return e;
}

Test(api, forward_every_path_vs_reference) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  nsa_client_t *c = th_client(&d, "t");
  cr_assert_not_null(c);
  struct {
    const char *flag, *value, *path;
  } cases[] = {
      {NULL, NULL, "varlen_v2"},
      {"NSA_SEL_VARLEN_V2", "0", "varlen_v1"},
      {"NSA_USE_SEL_VARLEN", "off", "packed"},
      {"NSA_SEL_VARLEN_MIN_L", "100000", "packed"},
  };
  /* h = 3 (odd) and h = 1; block ids and ranges */
  const int64_t hs[2] = {3, 1};
  for (int sel = 0; sel < 2; sel++)
    for (int hi = 0; hi < 2; hi++) {
      th_prob_t p;
      cr_assert_eq(th_prob_init(&p, c, 2, 33, 200, 2, hs[hi], 32, 6, 16, sel, 1234 + sel * 7 + hi), 0);
      for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        uint64_t epoch = nsa_client_info(c)->flags_epoch;
        if (cases[k].flag) epoch = set_flag(c, cases[k].flag, cases[k].value);
        th_prob_fill(&p);
        nsa_client_result_t r;
        cr_assert_eq(nsa_client_forward(c, &p.fwd, &r), 0, "%s: %s", nsa_client_error_code(c),
                     nsa_client_error_message(c));
        cr_expect_str_eq(r.path, cases[k].path, "flags %s=%s", cases[k].flag, cases[k].value);
        if (cases[k].flag) cr_expect_eq(r.flags_epoch, epoch);
        cr_expect_eq(r.rows, p.B * p.S * p.G);
        cr_expect_gt(r.max_len, 0);
        cr_expect_gt(r.mean_len, 0);
        cr_expect_geq(r.device_us, 0);
        double err = th_prob_check_fwd(&p);
        cr_expect_leq(err, 1e-5, "path %s sel %d h %lld: rel err %g", r.path, sel,
                      (long long)hs[hi], err);
        if (cases[k].flag) set_flag(c, cases[k].flag, NULL);
      }
      th_prob_free(&p, c);
    }
  nsa_client_close(c);
  cr_expect_eq(th_stop(&d, 1), 0);
}

Test(api, backward_vs_reference) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  nsa_client_t *c = th_client(&d, "t");
  cr_assert_not_null(c);
  const char *v2[3] = {"1", "0", "1"}, *use[3] = {"1", "1", "0"};
  const char *want[3] = {"varlen_v2", "varlen_v1", "packed"};
  th_prob_t p;
  cr_assert_eq(th_prob_init(&p, c, 1, 24, 96, 2, 2, 16, 4, 16, 0, 99), 0);
  for (int k = 0; k < 3; k++) {
    set_flag(c, "NSA_SEL_VARLEN_V2", v2[k]);
    set_flag(c, "NSA_USE_SEL_VARLEN", use[k]);
    th_prob_fill(&p);
    nsa_client_result_t r;
    cr_assert_eq(nsa_client_forward(c, &p.fwd, &r), 0, "%s", nsa_client_error_message(c));
    cr_assert_eq(nsa_client_backward(c, &p.bwd, &r), 0, "%s: %s", nsa_client_error_code(c),
                 nsa_client_error_message(c));
    cr_expect_str_eq(r.path, want[k]);
    double err = th_prob_check_bwd(&p);
    cr_expect_leq(err, 1e-5, "backward on %s: rel err %g", r.path, err);
  }
  th_prob_free(&p, c);
  nsa_client_close(c);
  cr_expect_eq(th_stop(&d, 1), 0);
}

Test(api, error_codes) {
  th_nsad_t d;
  char cfg[256];
  /* NSAD_MAX_REGIONS from a config file makes `busy` reachable cheaply. */
  cr_assert_eq(th_start(&d, NULL), 0);
  cr_assert_eq(th_stop(&d, 0), 0);
  snprintf(cfg, sizeof cfg, "%s/nsad.conf", d.dir);
  FILE *f = fopen(cfg, "w");
  cr_assert_not_null(f);
  fprintf(f, "# test config\nNSAD_MAX_REGIONS=3\nNSA_SEL_VARLEN_V2=1\n");
  fclose(f);
  const char *args[] = {"--config", cfg, NULL};
  d.pid = th_spawn(&d, d.sock, args, 1);
  cr_assert_gt(d.pid, 0);
  nsa_client_t *c = th_client(&d, "t");
  cr_assert_not_null(c);
  th_prob_t p;
  cr_assert_eq(th_prob_init(&p, c, 1, 8, 64, 1, 2, 16, 3, 16, 0, 5), 0);
  th_prob_fill(&p);
  nsa_client_result_t r;
  cr_assert_eq(nsa_client_forward(c, &p.fwd, &r), 0, "%s", nsa_client_error_message(c));

  nsa_client_fwd_t a = p.fwd;
  /* out_of_bounds: one byte past the region; absurd strides that overflow */
  a.o.offset = p.total - 4;
  cr_expect_eq(nsa_client_forward(c, &a, &r), -1);
  EXPECT_CODE(c, "out_of_bounds");
  a = p.fwd;
  a.k.has_strides = 1;
  a.k.strides[1] = (int64_t)1 << 62; /* (Skv-1) * 2^62 overflows 64 bits */
  cr_expect_eq(nsa_client_forward(c, &a, &r), -1);
  EXPECT_CODE(c, "out_of_bounds");
  /* bad_request: inconsistent shapes, misaligned offset */
  a = p.fwd;
  a.v.shape[1] = 63;
  cr_expect_eq(nsa_client_forward(c, &a, &r), -1);
  EXPECT_CODE(c, "bad_request");
  a = p.fwd;
  a.q.offset += 2;
  cr_expect_eq(nsa_client_forward(c, &a, &r), -1);
  EXPECT_CODE(c, "bad_request");
  /* not_found: a region this session never had */
  a = p.fwd;
  a.q.region = 999999;
  cr_expect_eq(nsa_client_forward(c, &a, &r), -1);
  EXPECT_CODE(c, "not_found");
  /* invalid_selection: block id beyond ceil(Skv/bs) and < -1 */
  p.sel[0] = 1000;
  p.sel[1] = -5;
  cr_expect_eq(nsa_client_forward(c, &p.fwd, &r), -1);
  EXPECT_CODE(c, "invalid_selection");
  cr_expect(strstr(nsa_client_error_message(c), "2") != NULL, "count in '%s'",
            nsa_client_error_message(c));
  th_prob_fill(&p);
  cr_expect_eq(nsa_client_forward(c, &p.fwd, &r), 0, "valid again");
  cr_expect_leq(th_prob_check_fwd(&p), 1e-5);
  /* unsupported: events and cuda_ipc regions need the CUDA backend */
  nsa_client_label_t dev[] = {{"device", "0"}};
  cr_expect_eq(nsa_client_call(c, "event.register", dev, 1, NULL), -1);
  /* (the client packs strings; either the type or the backend refuses) */
  cr_expect(!strcmp(nsa_client_error_code(c), "unsupported") ||
                !strcmp(nsa_client_error_code(c), "bad_request"),
            "%s", nsa_client_error_code(c));
  {
    int fd = th_raw_connect(d.sock);
    nsa_proto_decoder_t *dec = dec_new();
    uint32_t id;
    char code[32];
    th_raw_hello(fd, 1);
    th_raw_response(fd, dec, 5000, &id, code, sizeof code);
    nsa_proto_writer_t w;
    nsa_proto_writer_init(&w);
    uint8_t h[64];
    memset(h, 0xab, sizeof h);
    nsa_proto_write_request_begin(&w, 2, "event.register");
    msgpack_pack_map(&w.pk, 2);
    nsa_proto_pack_kv_int(&w.pk, "device", 0);
    nsa_proto_pack_str(&w.pk, "handle");
    msgpack_pack_bin(&w.pk, 64);
    msgpack_pack_bin_body(&w.pk, h, 64);
    nsa_proto_write_request_begin(&w, 3, "region.register");
    msgpack_pack_map(&w.pk, 4);
    nsa_proto_pack_kv_str(&w.pk, "kind", "cuda_ipc");
    nsa_proto_pack_kv_int(&w.pk, "device", 0);
    nsa_proto_pack_str(&w.pk, "handle");
    msgpack_pack_bin(&w.pk, 64);
    msgpack_pack_bin_body(&w.pk, h, 64);
    nsa_proto_pack_kv_uint(&w.pk, "size", 4096);
    th_raw_send(fd, w.sbuf.data, w.sbuf.size);
    nsa_proto_writer_destroy(&w);
    cr_assert_eq(th_raw_response(fd, dec, 5000, &id, code, sizeof code), 1);
    cr_expect_eq(id, 2);
    cr_expect_str_eq(code, "unsupported");
    cr_assert_eq(th_raw_response(fd, dec, 5000, &id, code, sizeof code), 1);
    cr_expect_eq(id, 3);
    cr_expect_str_eq(code, "unsupported");
    nsa_proto_decoder_free(dec);
    close(fd);
  }
  /* busy: this session already holds 1 region; the limit is 3 */
  nsa_client_shm_t *s2, *s3, *s4;
  cr_expect_eq(nsa_client_shm_create(c, 64, &s2), 0);
  cr_expect_eq(nsa_client_shm_create(c, 64, &s3), 0);
  cr_expect_eq(nsa_client_shm_create(c, 64, &s4), -1);
  EXPECT_CODE(c, "busy");
  nsa_client_shm_destroy(c, s3);
  cr_expect_eq(nsa_client_shm_create(c, 64, &s4), 0, "room again after unregister");
  /* flags: a bad value and an unknown flag are bad_request */
  uint64_t e;
  cr_expect_eq(nsa_client_flags_set(c, "NSA_SEL_VARLEN_V2", "maybe", -1, NULL, 0, &e), -1);
  EXPECT_CODE(c, "bad_request");
  cr_expect_eq(nsa_client_flags_set(c, "NSA_NO_SUCH_FLAG", "1", -1, NULL, 0, &e), -1);
  EXPECT_CODE(c, "bad_request");
  /* internal / device_error: not reachable from outside on the CPU backend
   * (out-of-memory and CUDA faults only). */
  th_prob_free(&p, c);
  nsa_client_close(c);
  cr_expect_eq(th_stop(&d, 1), 0);
}

/* In a child running as uid/gid 65534 (nobody/nogroup): what is refused. */
static int nobody_child(const th_nsad_t *d, const char *root_shm, int expect_admin) {
  if (setgroups(0, NULL) != 0 || setgid(65534) != 0 || setuid(65534) != 0) return 100;
  int bad = 0;
  nsa_client_t *c = th_client(d, "nobody");
  if (!c) return 101;
  uint64_t e, r;
  int rc = nsa_client_flags_set(c, "NSA_SEL_VARLEN_V2", "0", -1, NULL, 0, &e);
  if (expect_admin) {
    if (rc != 0) bad |= 1;
  } else if (rc == 0 || strcmp(nsa_client_error_code(c), "permission_denied")) {
    bad |= 1;
  }
  if (!expect_admin) {
    if (nsa_client_flags_reset(c, "NSA_SEL_VARLEN_V2", &e) == 0 ||
        strcmp(nsa_client_error_code(c), "permission_denied"))
      bad |= 2;
    if (nsa_client_shutdown(c) == 0 || strcmp(nsa_client_error_code(c), "permission_denied"))
      bad |= 4;
  }
  /* another uid's shm object (root's) is refused */
  if (nsa_client_region_register_shm(c, root_shm, 4096, &r) == 0 ||
      strcmp(nsa_client_error_code(c), "permission_denied"))
    bad |= 8;
  /* its own object works, and a forward on it too */
  th_prob_t p;
  if (th_prob_init(&p, c, 1, 8, 64, 1, 2, 16, 3, 16, 0, 77) != 0) {
    bad |= 16;
  } else {
    th_prob_fill(&p);
    nsa_client_result_t res;
    if (nsa_client_forward(c, &p.fwd, &res) != 0 || th_prob_check_fwd(&p) > 1e-5) bad |= 32;
    th_prob_free(&p, c);
  }
  if (nsa_client_flags_get(c, NULL) != 0) bad |= 64; /* reading flags is for everyone */
  nsa_client_close(c);
  return bad;
}

static void run_nobody(const char *const *extra, int expect_admin) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, extra), 0);
  chmod(d.sock, 0666); /* the socket is 0660 root:root by default */
  char name[64];
  snprintf(name, sizeof name, "/nsa-test-root-%d", (int)getpid());
  int fd = shm_open(name, O_RDWR | O_CREAT | O_TRUNC, 0666);
  cr_assert_geq(fd, 0);
  cr_assert_eq(ftruncate(fd, 4096), 0);
  fchmod(fd, 0666); /* even readable by all, it is not the caller's */
  close(fd);
  pid_t pid = fork();
  if (pid == 0) _exit(nobody_child(&d, name, expect_admin));
  int st = 0;
  waitpid(pid, &st, 0);
  shm_unlink(name);
  cr_expect(WIFEXITED(st) && WEXITSTATUS(st) == 0, "nobody child failed: status %d (bits)",
            WIFEXITED(st) ? WEXITSTATUS(st) : -1);
  cr_expect_eq(th_stop(&d, 1), 0);
}

Test(api, permission_denied_for_other_uid) { run_nobody(NULL, 0); }

Test(api, admin_group_member_may_set_flags) {
  struct group *g = getgrgid(65534);
  if (!g) cr_skip_test("no group 65534 on this machine");
  const char *args[] = {"--admin-group", g->gr_name, NULL};
  run_nobody(args, 1);
}
