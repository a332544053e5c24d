/*
 * test_flags.c — the flag store (daemon/flags.c) in isolation: defaults,
 * precedence, validation messages, persistence (incl. kill -9 right after
 * nsad_flags_set returns), epoch monotonicity, rollout determinism and
 * proportions, label match rules, audit lines (hook and real stderr), the
 * flags.get map, and snapshot consistency under concurrent changes.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <msgpack.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "flags.h"
#include "ops_testutil.h"

static const nsad_actor_t k_who = {1000, 42, "test-client"};

static nsa_req_flags_set_t mkreq(const char *name, const char *value) {
  nsa_req_flags_set_t r;
  memset(&r, 0, sizeof r);
  snprintf(r.name, sizeof r.name, "%s", name);
  snprintf(r.value, sizeof r.value, "%s", value);
  return r;
}

static void set_ok(nsad_flags_t *f, nsa_req_flags_set_t r, uint64_t *epoch) {
  nsa_proto_err_t e = {0};
  int rc = nsad_flags_set(f, &r, &k_who, epoch, &e);
  cr_assert_eq(rc, 0, "flags.set %s=%s failed: %s", r.name, r.value, e.message);
}

static nsa_proto_label_t L(const char *k, const char *v) {
  nsa_proto_label_t l;
  memset(&l, 0, sizeof l);
  snprintf(l.key, sizeof l.key, "%s", k);
  snprintf(l.value, sizeof l.value, "%s", v);
  return l;
}

static void quiet_audit(void *ud, const char *line) {
  (void)ud;
  (void)line;
}

static nsad_flags_t *open_store(const char *dir) {
  char msg[256] = "";
  nsad_flags_t *f = nsad_flags_new(dir, msg, sizeof msg);
  cr_assert_not_null(f, "nsad_flags_new(%s): %s", dir ? dir : "NULL", msg);
  nsad_flags_set_audit(f, quiet_audit, NULL);
  return f;
}

Test(flags, defaults) {
  nsad_flags_t *f = open_store(NULL);
  nsad_flag_snapshot_t s;
  memset(&s, 0x5a, sizeof s);
  nsad_flags_snapshot(f, NULL, 0, &s);
  cr_expect_eq(s.path.sel_varlen_v2, 1);
  cr_expect_eq(s.path.use_sel_varlen, 1);
  cr_expect_eq(s.path.sel_varlen_min_l, 0);
  cr_expect_eq(s.shadow_rate, 0.0);
  cr_expect_geq(s.epoch, 1);
  cr_expect_eq(s.epoch, nsad_flags_epoch(f));
  nsad_flags_free(f);
}

Test(flags, precedence_default_config_runtime) {
  nsad_flags_t *f = open_store(NULL);
  const char *k[] = {"NSA_SEL_VARLEN_V2", "NSAD_SOCKET", "NSA_SEL_VARLEN_MIN_L"};
  const char *v[] = {"off", "/tmp/whatever", "64"};
  char msg[256];
  uint64_t e0 = nsad_flags_epoch(f);
  cr_assert_eq(nsad_flags_set_config(f, k, v, 3, msg, sizeof msg), 0, "%s", msg);
  cr_expect_gt(nsad_flags_epoch(f), e0, "a config change bumps the epoch");
  nsad_flag_snapshot_t s;
  nsad_flags_snapshot(f, NULL, 0, &s);
  cr_expect_eq(s.path.sel_varlen_v2, 0, "config beats default");
  cr_expect_eq(s.path.sel_varlen_min_l, 64);
  ops_flag_info_t fi;
  ops_flags_get(f, NULL, 0, "NSA_SEL_VARLEN_V2", &fi);
  cr_expect_str_eq(fi.source, "config");

  uint64_t e1;
  set_ok(f, mkreq("NSA_SEL_VARLEN_V2", "yes"), &e1);
  nsad_flags_snapshot(f, NULL, 0, &s);
  cr_expect_eq(s.path.sel_varlen_v2, 1, "runtime beats config");
  cr_expect_eq(s.epoch, e1);
  ops_flags_get(f, NULL, 0, "NSA_SEL_VARLEN_V2", &fi);
  cr_expect_str_eq(fi.source, "runtime");

  /* A config reload (SIGHUP) does not remove the runtime layer. */
  const char *k2[] = {"NSA_SEL_VARLEN_V2"};
  const char *v2[] = {"0"};
  cr_assert_eq(nsad_flags_set_config(f, k2, v2, 1, msg, sizeof msg), 0, "%s", msg);
  nsad_flags_snapshot(f, NULL, 0, &s);
  cr_expect_eq(s.path.sel_varlen_v2, 1, "runtime stays on top after a config reload");
  cr_expect_eq(s.path.sel_varlen_min_l, 0, "MIN_L left the config: back to default");

  nsa_proto_err_t e = {0};
  uint64_t e2;
  cr_assert_eq(nsad_flags_reset(f, "NSA_SEL_VARLEN_V2", &k_who, &e2, &e), 0, "%s", e.message);
  cr_expect_gt(e2, e1);
  nsad_flags_snapshot(f, NULL, 0, &s);
  cr_expect_eq(s.path.sel_varlen_v2, 0, "after reset the config value shows again");
  nsad_flags_free(f);
}

Test(flags, load_config_file_and_env) {
  char *dir = ops_tmpdir();
  char path[512];
  snprintf(path, sizeof path, "%s/nsad.conf", dir);
  ops_write_file(path,
                 "# comment\n"
                 "\n"
                 "NSA_SEL_VARLEN_MIN_L=64\n"
                 "export NSA_USE_SEL_VARLEN=\"off\"\n"
                 "NSA_SEL_SHADOW_RATE = '0.25'\n"
                 "NSAD_LOG_LEVEL=debug\n");
  nsad_flags_t *f = open_store(NULL);
  char msg[256];
  char *env0[] = {"PATH=/bin", NULL};
  cr_assert_eq(nsad_flags_load_config(f, path, env0, msg, sizeof msg), 0, "%s", msg);
  nsad_flag_snapshot_t s;
  nsad_flags_snapshot(f, NULL, 0, &s);
  cr_expect_eq(s.path.sel_varlen_min_l, 64);
  cr_expect_eq(s.path.use_sel_varlen, 0);
  cr_expect_eq(s.shadow_rate, 0.25);

  char *env1[] = {"NSA_SEL_VARLEN_MIN_L=128", "HOME=/root", NULL};
  cr_assert_eq(nsad_flags_load_config(f, path, env1, msg, sizeof msg), 0, "%s", msg);
  nsad_flags_snapshot(f, NULL, 0, &s);
  cr_expect_eq(s.path.sel_varlen_min_l, 128, "environment beats the config file");

  /* A bad file changes nothing and names the problem. */
  ops_write_file(path, "NSA_SEL_VARLEN_MIN_L=32\nNSA_SEL_BOGUS=1\n");
  uint64_t e = nsad_flags_epoch(f);
  cr_expect_neq(nsad_flags_load_config(f, path, env0, msg, sizeof msg), 0);
  cr_expect(strstr(msg, "NSA_SEL_BOGUS") != NULL, "message: %s", msg);
  cr_expect(strstr(msg, "NSA_SEL_VARLEN_V2") != NULL, "lists known flags: %s", msg);
  nsad_flags_snapshot(f, NULL, 0, &s);
  cr_expect_eq(s.path.sel_varlen_min_l, 128, "nothing applied from a bad config");
  cr_expect_eq(nsad_flags_epoch(f), e);
  ops_write_file(path, "NSA_SEL_VARLEN_V2=maybe\n");
  cr_expect_neq(nsad_flags_load_config(f, path, env0, msg, sizeof msg), 0);
  cr_expect(strstr(msg, "1/true/yes/on") != NULL, "message: %s", msg);
  ops_write_file(path, "this line has no equals sign\n");
  cr_expect_neq(nsad_flags_load_config(f, path, env0, msg, sizeof msg), 0);
  cr_expect(strstr(msg, ":1:") != NULL, "names the line: %s", msg);
  nsad_flags_free(f);
  ops_rmtree(dir);
  free(dir);
}

Test(flags, sighup_reload_with_environmentfile) {
  /* Under systemd, EnvironmentFile= puts the config file's pairs into the
   * environment at start; a later edit + SIGHUP must still take effect,
   * while a variable set only in the environment keeps winning. */
  char *dir = ops_tmpdir();
  char path[512];
  snprintf(path, sizeof path, "%s/nsad.conf", dir);
  ops_write_file(path, "NSA_SEL_VARLEN_MIN_L=64\nNSA_SEL_VARLEN_V2=on\n");
  char *env[] = {"NSA_SEL_VARLEN_MIN_L=64", "NSA_SEL_VARLEN_V2=1", "NSA_USE_SEL_VARLEN=0", NULL};
  nsad_flags_t *f = open_store(NULL);
  char msg[256];
  cr_assert_eq(nsad_flags_load_config(f, path, env, msg, sizeof msg), 0, "%s", msg);
  nsad_flag_snapshot_t s;
  nsad_flags_snapshot(f, NULL, 0, &s);
  cr_expect_eq(s.path.sel_varlen_min_l, 64);
  cr_expect_eq(s.path.use_sel_varlen, 0);
  ops_write_file(path, "NSA_SEL_VARLEN_MIN_L=128\n");
  cr_assert_eq(nsad_flags_load_config(f, path, env, msg, sizeof msg), 0, "%s", msg);
  nsad_flags_snapshot(f, NULL, 0, &s);
  cr_expect_eq(s.path.sel_varlen_min_l, 128, "the edited file wins over its stale copy in env");
  cr_expect_eq(s.path.sel_varlen_v2, 1, "removed from the file: default");
  cr_expect_eq(s.path.use_sel_varlen, 0, "an environment-only variable still applies");
  nsad_flags_free(f);
  ops_rmtree(dir);
  free(dir);
}

Test(flags, validation_messages) {
  nsad_flags_t *f = open_store(NULL);
  struct {
    const char *name, *value, *want;
  } bad[] = {
      {"NSA_SEL_VARLEN_V3", "1", "known flags: NSA_SEL_VARLEN_V2"},
      {"nsa_sel_varlen_v2", "1", "unknown flag"},
      {"NSA_SEL_VARLEN_V2", "2", "1/true/yes/on or 0/false/no/off"},
      {"NSA_SEL_VARLEN_V2", "", "1/true/yes/on"},
      {"NSA_USE_SEL_VARLEN", "enabled", "1/true/yes/on"},
      {"NSA_SEL_VARLEN_MIN_L", "-1", "non-negative integer"},
      {"NSA_SEL_VARLEN_MIN_L", "1.5", "non-negative integer"},
      {"NSA_SEL_VARLEN_MIN_L", "abc", "non-negative integer"},
      {"NSA_SEL_VARLEN_MIN_L", "99999999999", "non-negative integer"},
      {"NSA_SEL_SHADOW_RATE", "1.5", "from 0 to 1"},
      {"NSA_SEL_SHADOW_RATE", "-0.1", "from 0 to 1"},
      {"NSA_SEL_SHADOW_RATE", "nan", "from 0 to 1"},
      {"NSA_SEL_SHADOW_RATE", "inf", "from 0 to 1"},
      {"NSA_SEL_SHADOW_RATE", "10%", "from 0 to 1"},
  };
  uint64_t e0 = nsad_flags_epoch(f);
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    nsa_req_flags_set_t r = mkreq(bad[i].name, bad[i].value);
    nsa_proto_err_t e = {0};
    uint64_t ep = 0;
    cr_expect_neq(nsad_flags_set(f, &r, &k_who, &ep, &e), 0, "%s=%s accepted", bad[i].name,
                  bad[i].value);
    cr_expect_eq(e.code, NSA_E_BAD_REQUEST, "%s=%s", bad[i].name, bad[i].value);
    cr_expect(strstr(e.message, bad[i].want) != NULL, "%s=%s: message '%s' lacks '%s'",
              bad[i].name, bad[i].value, e.message, bad[i].want);
  }
  /* rule validation */
  nsa_req_flags_set_t r = mkreq("NSA_SEL_VARLEN_V2", "0");
  r.has_percent = 1;
  r.percent = 100.5;
  nsa_proto_err_t e = {0};
  cr_expect_neq(nsad_flags_set(f, &r, &k_who, NULL, &e), 0);
  cr_expect(strstr(e.message, "0 to 100") != NULL, "%s", e.message);
  r.percent = -1;
  cr_expect_neq(nsad_flags_set(f, &r, &k_who, NULL, &e), 0);
  r.percent = 0.0 / 0.0;
  cr_expect_neq(nsad_flags_set(f, &r, &k_who, NULL, &e), 0);
  cr_expect_eq(nsad_flags_epoch(f), e0, "rejected changes do not bump the epoch");

  struct {
    const char *name, *value;
    double want;
  } good[] = {
      {"NSA_SEL_VARLEN_V2", "TRUE", 1},  {"NSA_SEL_VARLEN_V2", "oFf", 0},
      {"NSA_SEL_VARLEN_V2", "Yes", 1},   {"NSA_SEL_VARLEN_V2", "no", 0},
      {"NSA_SEL_VARLEN_V2", "On", 1},    {"NSA_SEL_VARLEN_V2", "false", 0},
      {"NSA_SEL_VARLEN_V2", "1", 1},     {"NSA_SEL_VARLEN_V2", " 0 ", 0},
      {"NSA_SEL_VARLEN_MIN_L", "128", 128}, {"NSA_SEL_VARLEN_MIN_L", "0", 0},
      {"NSA_SEL_SHADOW_RATE", "0.125", 0.125}, {"NSA_SEL_SHADOW_RATE", "1", 1},
  };
  for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
    int id = nsad_flag_lookup(good[i].name);
    double v = -7;
    char msg[256];
    cr_expect_eq(nsad_flag_parse_value(id, good[i].value, &v, msg, sizeof msg), 0, "%s", msg);
    cr_expect_eq(v, good[i].want, "%s=%s", good[i].name, good[i].value);
    uint64_t ep;
    set_ok(f, mkreq(good[i].name, good[i].value), &ep);
  }
  nsad_flag_snapshot_t s;
  nsad_flags_snapshot(f, NULL, 0, &s);
  cr_expect_eq(s.path.sel_varlen_v2, 0);
  cr_expect_eq(s.path.sel_varlen_min_l, 0);
  cr_expect_eq(s.shadow_rate, 1.0);
  nsad_flags_free(f);
}

Test(flags, persistence_across_reopen) {
  char *dir = ops_tmpdir();
  nsad_flags_t *f = open_store(dir);
  nsa_req_flags_set_t r = mkreq("NSA_SEL_VARLEN_V2", "0");
  r.has_percent = 1;
  r.percent = 30;
  r.nmatch = 1;
  r.match[0] = L("team", "rl weird=\"value\"\n%");
  uint64_t e1, e2;
  set_ok(f, r, &e1);
  set_ok(f, mkreq("NSA_SEL_VARLEN_MIN_L", "256"), &e2);
  cr_expect_gt(e2, e1);
  nsad_flags_free(f);

  f = open_store(dir);
  cr_expect_gt(nsad_flags_epoch(f), e2, "epoch never goes backwards across a restart");
  ops_flag_info_t fi;
  ops_flags_get(f, NULL, 0, "NSA_SEL_VARLEN_V2", &fi);
  cr_expect_str_eq(fi.source, "runtime");
  cr_expect_eq(fi.value, 0);
  cr_expect_eq(fi.has_rollout, 1);
  cr_expect_eq(fi.percent, 30);
  cr_expect_eq(fi.nmatch, 1);
  cr_expect_str_eq(fi.match_key, "team");
  cr_expect_str_eq(fi.match_value, "rl weird=\"value\"\n%", "label survives encoding");
  ops_flags_get(f, NULL, 0, "NSA_SEL_VARLEN_MIN_L", &fi);
  cr_expect_eq(fi.value, 256);
  cr_expect_str_eq(fi.source, "runtime");

  /* reset is persisted too */
  nsa_proto_err_t e = {0};
  cr_assert_eq(nsad_flags_reset(f, "NSA_SEL_VARLEN_MIN_L", &k_who, NULL, &e), 0, "%s", e.message);
  uint64_t e3 = nsad_flags_epoch(f);
  nsad_flags_free(f);
  f = open_store(dir);
  ops_flags_get(f, NULL, 0, "NSA_SEL_VARLEN_MIN_L", &fi);
  cr_expect_str_eq(fi.source, "default");
  cr_expect_gt(nsad_flags_epoch(f), e3);
  nsad_flags_free(f);
  ops_rmtree(dir);
  free(dir);
}

Test(flags, survives_kill9_right_after_set) {
  char *dir = ops_tmpdir();
  for (int round = 0; round < 5; round++) {
    int pfd[2];
    cr_assert_eq(pipe(pfd), 0);
    pid_t pid = fork();
    cr_assert_neq(pid, -1);
    if (pid == 0) {
      close(pfd[0]);
      char msg[256];
      nsad_flags_t *f = nsad_flags_new(dir, msg, sizeof msg);
      if (!f) _exit(3);
      nsad_flags_set_audit(f, quiet_audit, NULL);
      char v[32];
      snprintf(v, sizeof v, "%d", 1000 + round);
      nsa_req_flags_set_t r = mkreq("NSA_SEL_VARLEN_MIN_L", v);
      nsa_proto_err_t e;
      uint64_t ep = 0;
      if (nsad_flags_set(f, &r, &k_who, &ep, &e) != 0) _exit(4);
      /* "the reply": tell the parent the epoch, then die without cleanup */
      if (write(pfd[1], &ep, sizeof ep) != (ssize_t)sizeof ep) _exit(5);
      kill(getpid(), SIGKILL);
      _exit(6);
    }
    close(pfd[1]);
    uint64_t ep = 0;
    ssize_t n = read(pfd[0], &ep, sizeof ep);
    close(pfd[0]);
    int st;
    cr_assert_eq(waitpid(pid, &st, 0), pid);
    cr_assert(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL, "child status %d", st);
    cr_assert_eq(n, (ssize_t)sizeof ep, "child died before replying");
    nsad_flags_t *f = open_store(dir);
    nsad_flag_snapshot_t s;
    nsad_flags_snapshot(f, NULL, 0, &s);
    cr_expect_eq(s.path.sel_varlen_min_l, 1000 + round, "round %d: change lost after kill -9",
                 round);
    cr_expect_gt(s.epoch, ep, "round %d: epoch went backwards", round);
    nsad_flags_free(f);
  }
  ops_rmtree(dir);
  free(dir);
}

Test(flags, epoch_monotonic) {
  char *dir = ops_tmpdir();
  nsad_flags_t *f = open_store(dir);
  uint64_t last = nsad_flags_epoch(f), e;
  char msg[256];
  for (int i = 0; i < 20; i++) {
    switch (i % 4) {
      case 0: set_ok(f, mkreq("NSA_SEL_SHADOW_RATE", i % 8 ? "0.5" : "0.1"), &e); break;
      case 1: {
        nsa_proto_err_t er;
        cr_assert_eq(nsad_flags_reset(f, "NSA_SEL_SHADOW_RATE", &k_who, &e, &er), 0);
        break;
      }
      case 2: {
        const char *k[] = {"NSA_SEL_VARLEN_MIN_L"};
        const char *v[] = {i % 8 ? "8" : "16"};
        cr_assert_eq(nsad_flags_set_config(f, k, v, 1, msg, sizeof msg), 0, "%s", msg);
        e = nsad_flags_epoch(f);
        break;
      }
      case 3:
        nsad_flags_free(f);
        f = open_store(dir);
        e = nsad_flags_epoch(f);
        break;
    }
    cr_expect_gt(e, last, "step %d: epoch %llu after %llu", i, (unsigned long long)e,
                 (unsigned long long)last);
    last = e;
  }
  /* a reset of a flag with no runtime layer is a no-op, epoch unchanged */
  nsa_proto_err_t er;
  cr_assert_eq(nsad_flags_reset(f, "NSA_USE_SEL_VARLEN", &k_who, &e, &er), 0);
  cr_expect_eq(e, last);
  nsad_flags_free(f);
  ops_rmtree(dir);
  free(dir);
}

Test(flags, rollout_percent_deterministic_and_proportional) {
  nsad_flags_t *f = open_store(NULL);
  nsa_req_flags_set_t r = mkreq("NSA_SEL_VARLEN_V2", "0");
  r.has_percent = 1;
  r.percent = 30;
  set_ok(f, r, NULL);
  int in = 0;
  const int N = 1000;
  for (int i = 0; i < N; i++) {
    char host[32], rank[16];
    snprintf(host, sizeof host, "node-%03d", i / 8);
    snprintf(rank, sizeof rank, "%d", i % 8);
    nsa_proto_label_t a[3] = {L("host", host), L("rank", rank), L("job", "rl-7")};
    nsa_proto_label_t b[3] = {a[2], a[0], a[1]}; /* another order on the wire */
    nsad_flag_snapshot_t s1, s2;
    nsad_flags_snapshot(f, a, 3, &s1);
    nsad_flags_snapshot(f, b, 3, &s2);
    cr_assert_eq(s1.path.sel_varlen_v2, s2.path.sel_varlen_v2, "label order changed the value");
    cr_assert_eq(nsad_flags_rollout_bucket(a, 3, "NSA_SEL_VARLEN_V2"),
                 nsad_flags_rollout_bucket(b, 3, "NSA_SEL_VARLEN_V2"));
    if (s1.path.sel_varlen_v2 == 0) in++;
  }
  double frac = (double)in / N;
  /* binomial sd at p=0.3, N=1000 is 0.0145; +-0.05 is ~3.4 sd */
  cr_expect(frac > 0.25 && frac < 0.35, "30%% rule admitted %.3f of sessions", frac);

  /* stable across a new store (a daemon restart) with the same rule */
  nsad_flags_t *g = open_store(NULL);
  set_ok(g, r, NULL);
  for (int i = 0; i < 200; i++) {
    char host[32];
    snprintf(host, sizeof host, "h%d", i);
    nsa_proto_label_t a[1] = {L("host", host)};
    nsad_flag_snapshot_t s1, s2;
    nsad_flags_snapshot(f, a, 1, &s1);
    nsad_flags_snapshot(g, a, 1, &s2);
    cr_assert_eq(s1.path.sel_varlen_v2, s2.path.sel_varlen_v2);
  }
  /* 0 % admits nobody, 100 % everybody */
  int n0 = 0, n100 = 0;
  r.percent = 0;
  set_ok(f, r, NULL);
  r.percent = 100;
  set_ok(g, r, NULL);
  for (int i = 0; i < 300; i++) {
    char host[32];
    snprintf(host, sizeof host, "x%d", i);
    nsa_proto_label_t a[1] = {L("host", host)};
    nsad_flag_snapshot_t s;
    nsad_flags_snapshot(f, a, 1, &s);
    n0 += s.path.sel_varlen_v2 == 0;
    nsad_flags_snapshot(g, a, 1, &s);
    n100 += s.path.sel_varlen_v2 == 0;
  }
  cr_expect_eq(n0, 0);
  cr_expect_eq(n100, 300);
  nsad_flags_free(f);
  nsad_flags_free(g);
}

Test(flags, rollout_match_and_effective) {
  nsad_flags_t *f = open_store(NULL);
  nsa_req_flags_set_t r = mkreq("NSA_USE_SEL_VARLEN", "off");
  r.nmatch = 2;
  r.match[0] = L("team", "rl");
  r.match[1] = L("zone", "a");
  set_ok(f, r, NULL);
  nsa_proto_label_t both[3] = {L("zone", "a"), L("x", "y"), L("team", "rl")};
  nsa_proto_label_t one[2] = {L("team", "rl"), L("zone", "b")};
  nsad_flag_snapshot_t s;
  nsad_flags_snapshot(f, both, 3, &s);
  cr_expect_eq(s.path.use_sel_varlen, 0, "all match labels equal: runtime value");
  nsad_flags_snapshot(f, one, 2, &s);
  cr_expect_eq(s.path.use_sel_varlen, 1, "one label differs: lower layer");
  nsad_flags_snapshot(f, NULL, 0, &s);
  cr_expect_eq(s.path.use_sel_varlen, 1);
  ops_flag_info_t fi;
  ops_flags_get(f, both, 3, "NSA_USE_SEL_VARLEN", &fi);
  cr_expect_eq(fi.value, 0);
  cr_expect_eq(fi.effective, 0);
  cr_expect_eq(fi.has_rollout, 1);
  cr_expect_eq(fi.has_percent, 0, "percent is nil without a percent rule");
  cr_expect_eq(fi.nmatch, 2);
  ops_flags_get(f, one, 2, "NSA_USE_SEL_VARLEN", &fi);
  cr_expect_eq(fi.value, 0, "value is the runtime layer's");
  cr_expect_eq(fi.effective, 1, "effective is this session's");
  nsad_flags_free(f);
}

Test(flags, pack_get_shape) {
  nsad_flags_t *f = open_store(NULL);
  set_ok(f, mkreq("NSA_SEL_SHADOW_RATE", "0.5"), NULL);
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  msgpack_packer pk;
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  nsad_flags_pack_get(f, NULL, 0, &pk);
  msgpack_unpacked u;
  msgpack_unpacked_init(&u);
  size_t off = 0;
  cr_assert_eq(msgpack_unpack_next(&u, sb.data, sb.size, &off), MSGPACK_UNPACK_SUCCESS);
  cr_expect_eq(off, sb.size, "exactly one object");
  const msgpack_object *root = &u.data;
  cr_assert_eq(root->type, MSGPACK_OBJECT_MAP);
  const msgpack_object *ep = ops_map_get(root, "epoch"), *fl = ops_map_get(root, "flags"),
                       *ef = ops_map_get(root, "effective");
  cr_assert(ep && fl && ef);
  cr_expect_eq(ep->type, MSGPACK_OBJECT_POSITIVE_INTEGER);
  cr_expect_eq(ep->via.u64, nsad_flags_epoch(f));
  cr_assert_eq(fl->type, MSGPACK_OBJECT_MAP);
  cr_expect_eq(fl->via.map.size, 4);
  cr_assert_eq(ef->type, MSGPACK_OBJECT_MAP);
  cr_expect_eq(ef->via.map.size, 4);
  const char *names[] = {"NSA_SEL_VARLEN_V2", "NSA_SEL_VARLEN_MIN_L", "NSA_USE_SEL_VARLEN",
                         "NSA_SEL_SHADOW_RATE"};
  for (int i = 0; i < 4; i++) {
    const msgpack_object *e = ops_map_get(fl, names[i]);
    cr_assert_not_null(e, "%s missing", names[i]);
    cr_expect_not_null(ops_map_get(e, "value"));
    cr_expect_not_null(ops_map_get(e, "source"));
    const msgpack_object *ro = ops_map_get(e, "rollout");
    cr_assert_not_null(ro);
    cr_expect_eq(ro->type, MSGPACK_OBJECT_NIL);
    cr_expect_not_null(ops_map_get(ef, names[i]));
  }
  const msgpack_object *rate = ops_map_get(ops_map_get(fl, "NSA_SEL_SHADOW_RATE"), "value");
  cr_expect_eq(rate->type, MSGPACK_OBJECT_FLOAT64);
  cr_expect_eq(rate->via.f64, 0.5);
  const msgpack_object *v2 = ops_map_get(ops_map_get(fl, "NSA_SEL_VARLEN_V2"), "value");
  cr_expect_eq(v2->type, MSGPACK_OBJECT_POSITIVE_INTEGER, "bools are 0/1 integers");
  cr_expect_eq(v2->via.u64, 1);
  msgpack_unpacked_destroy(&u);
  msgpack_sbuffer_destroy(&sb);
  nsad_flags_free(f);
}

typedef struct {
  char lines[8][2048];
  int n;
} audit_buf_t;

static void grab_audit(void *ud, const char *line) {
  audit_buf_t *b = ud;
  if (b->n < 8) snprintf(b->lines[b->n++], sizeof b->lines[0], "%s", line);
}

Test(flags, audit_lines) {
  nsad_flags_t *f = open_store(NULL);
  audit_buf_t b = {.n = 0};
  nsad_flags_set_audit(f, grab_audit, &b);
  nsa_req_flags_set_t r = mkreq("NSA_SEL_VARLEN_V2", "off");
  r.has_percent = 1;
  r.percent = 30;
  r.nmatch = 1;
  r.match[0] = L("team", "rl");
  nsad_actor_t who = {1234, 5678, "evil\nclient\"x"};
  nsa_proto_err_t e;
  uint64_t ep;
  cr_assert_eq(nsad_flags_set(f, &r, &who, &ep, &e), 0, "%s", e.message);
  cr_assert_eq(b.n, 1);
  const char *l = b.lines[0];
  char want[64];
  snprintf(want, sizeof want, "epoch=%llu", (unsigned long long)ep);
  const char *parts[] = {" audit ", "uid=1234", "pid=5678", "flag=NSA_SEL_VARLEN_V2",
                         "old=1(default)", "new=0(runtime)", "rule=percent=30", "match:team=rl",
                         want, "flags.set"};
  for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++)
    cr_expect(strstr(l, parts[i]) != NULL, "audit line lacks '%s': %s", parts[i], l);
  cr_expect(strchr(l, '\n') == NULL, "one line even with a newline in the client name");
  cr_expect(strstr(l, "client=\"evil?client?x\"") != NULL, "%s", l);
  /* timestamp first: 2026-11-27T03:20:18.123Z */
  cr_expect(strlen(l) > 24 && l[4] == '-' && l[10] == 'T' && l[23] == 'Z', "%s", l);

  cr_assert_eq(nsad_flags_reset(f, "NSA_SEL_VARLEN_V2", &k_who, &ep, &e), 0);
  cr_assert_eq(b.n, 2);
  cr_expect(strstr(b.lines[1], "flags.reset") && strstr(b.lines[1], "old=0(runtime)") &&
                strstr(b.lines[1], "new=1(default)") && strstr(b.lines[1], "client=\"test-client\""),
            "%s", b.lines[1]);
  nsad_flags_free(f);
}

Test(flags, config_changes_are_audited) {
  nsad_flags_t *f = open_store(NULL);
  audit_buf_t b = {.n = 0};
  nsad_flags_set_audit(f, grab_audit, &b);
  const char *k[] = {"NSA_SEL_VARLEN_V2", "NSA_SEL_SHADOW_RATE"};
  const char *v[] = {"off", "0"};
  char msg[256];
  cr_assert_eq(nsad_flags_set_config(f, k, v, 2, msg, sizeof msg), 0, "%s", msg);
  cr_assert_eq(b.n, 2, "both config layers changed (%d lines)", b.n);
  cr_expect(strstr(b.lines[1], "flag=NSA_SEL_SHADOW_RATE") && strstr(b.lines[1], "new=0(config)"),
            "the source changed even though the value did not: %s", b.lines[1]);
  cr_expect(strstr(b.lines[0], " config ") && strstr(b.lines[0], "client=\"config\"") &&
                strstr(b.lines[0], "flag=NSA_SEL_VARLEN_V2") &&
                strstr(b.lines[0], "old=1(default)") && strstr(b.lines[0], "new=0(config)"),
            "%s", b.lines[0]);
  cr_assert_eq(nsad_flags_set_config(f, k, v, 2, msg, sizeof msg), 0, "%s", msg);
  cr_expect_eq(b.n, 2, "an unchanged reload is silent");
  nsad_flags_free(f);
}

Test(flags, audit_default_goes_to_stderr) {
  char msg[256];
  nsad_flags_t *f = nsad_flags_new(NULL, msg, sizeof msg);
  cr_assert_not_null(f);
  int pfd[2];
  cr_assert_eq(pipe(pfd), 0);
  fflush(stderr);
  int saved = dup(2);
  dup2(pfd[1], 2);
  close(pfd[1]);
  nsa_req_flags_set_t r = mkreq("NSA_SEL_VARLEN_MIN_L", "512");
  nsa_proto_err_t e;
  uint64_t ep;
  int rc = nsad_flags_set(f, &r, &k_who, &ep, &e);
  fflush(stderr);
  dup2(saved, 2);
  close(saved);
  cr_assert_eq(rc, 0);
  char buf[4096];
  ssize_t n = read(pfd[0], buf, sizeof buf - 1);
  close(pfd[0]);
  cr_assert_gt(n, 0, "nothing written to stderr");
  buf[n] = 0;
  cr_expect(strstr(buf, " audit ") && strstr(buf, "flag=NSA_SEL_VARLEN_MIN_L") &&
                strstr(buf, "old=0(default)") && strstr(buf, "new=512(runtime)") &&
                strstr(buf, "client=\"test-client\"") && strstr(buf, "uid=1000") &&
                strstr(buf, "pid=42") && strstr(buf, "rule=none"),
            "stderr: %s", buf);
  cr_expect_eq(buf[n - 1], '\n');
  nsad_flags_free(f);
}

Test(flags, corrupt_state_file_refuses_to_start) {
  char *dir = ops_tmpdir();
  char path[512];
  snprintf(path, sizeof path, "%s/flags.state", dir);
  ops_write_file(path, "nsad-flags-state 1\nepoch 5\nflag NSA_SEL_VARLEN_V2 maybe\nend\n");
  char msg[256] = "";
  nsad_flags_t *f = nsad_flags_new(dir, msg, sizeof msg);
  cr_expect_null(f);
  cr_expect(strstr(msg, "corrupt") && strstr(msg, "flags.state"), "%s", msg);
  nsad_flags_free(f);
  /* a truncated file (no "end") is also refused */
  ops_write_file(path, "nsad-flags-state 1\nepoch 5\n");
  f = nsad_flags_new(dir, msg, sizeof msg);
  cr_expect_null(f);
  nsad_flags_free(f);
  ops_rmtree(dir);
  free(dir);
}

Test(flags, failed_persist_changes_nothing) {
  char *dir = ops_tmpdir();
  nsad_flags_t *f = open_store(dir);
  uint64_t e0 = nsad_flags_epoch(f);
  ops_rmtree(dir); /* the state directory vanishes under the daemon */
  nsa_req_flags_set_t r = mkreq("NSA_SEL_VARLEN_V2", "0");
  nsa_proto_err_t e = {0};
  cr_expect_neq(nsad_flags_set(f, &r, &k_who, NULL, &e), 0);
  cr_expect_eq(e.code, NSA_E_INTERNAL);
  cr_expect(strstr(e.message, "not applied") != NULL, "%s", e.message);
  nsad_flag_snapshot_t s;
  nsad_flags_snapshot(f, NULL, 0, &s);
  cr_expect_eq(s.path.sel_varlen_v2, 1);
  cr_expect_eq(s.epoch, e0);
  nsad_flags_free(f);
  free(dir);
}

/* Readers must see one consistent state: the writer sets MIN_L = k at the
 * k-th change, so every snapshot must satisfy min_l == epoch - e0. */
typedef struct {
  nsad_flags_t *f;
  uint64_t e0;
  int stop;
  long checks, bad;
} race_t;

static void *reader(void *arg) {
  race_t *r = arg;
  while (!__atomic_load_n(&r->stop, __ATOMIC_ACQUIRE)) {
    nsad_flag_snapshot_t s;
    nsa_proto_label_t l[1] = {L("host", "a")};
    nsad_flags_snapshot(r->f, l, 1, &s);
    if (s.path.sel_varlen_min_l != (int64_t)(s.epoch - r->e0)) __atomic_add_fetch(&r->bad, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&r->checks, 1, __ATOMIC_RELAXED);
  }
  return NULL;
}

Test(flags, snapshots_consistent_under_changes) {
  char *dir = ops_tmpdir();
  race_t r = {.f = open_store(dir)};
  r.e0 = nsad_flags_epoch(r.f);
  pthread_t th[3];
  for (int i = 0; i < 3; i++) pthread_create(&th[i], NULL, reader, &r);
  for (int k = 1; k <= 150; k++) {
    char v[16];
    snprintf(v, sizeof v, "%d", k);
    set_ok(r.f, mkreq("NSA_SEL_VARLEN_MIN_L", v), NULL);
  }
  __atomic_store_n(&r.stop, 1, __ATOMIC_RELEASE);
  for (int i = 0; i < 3; i++) pthread_join(th[i], NULL);
  cr_expect_eq(r.bad, 0, "%ld of %ld snapshots mixed two epochs", r.bad, r.checks);
  cr_expect_gt(r.checks, 0);
  nsad_flags_free(r.f);
  ops_rmtree(dir);
  free(dir);
}
