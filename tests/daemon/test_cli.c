/*
 * test_cli.c — nsad's command line, config file and SIGHUP reload, socket
 * path precedence and mode, against real processes.
 */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"

TestSuite(cli, .fini = th_fini, .timeout = 240);

/* Runs nsad with args (and optional NSAD_SOCKET), waits up to 10 s. */
static int run_nsad(const char *const *args, const char *env_sock, const char *log) {
  pid_t pid = fork();
  if (pid == 0) {
    int fd = open(log ? log : "/dev/null", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
    }
    if (env_sock) setenv("NSAD_SOCKET", env_sock, 1);
    const char *argv[16] = {NSAD_BIN};
    int n = 1;
    for (int i = 0; args && args[i] && n < 15; i++) argv[n++] = args[i];
    argv[n] = NULL;
    execv(NSAD_BIN, (char *const *)argv);
    _exit(127);
  }
  return th_wait_exit(pid, 10000);
}

static int file_has(const char *path, const char *needle) {
  FILE *f = fopen(path, "r");
  if (!f) return 0;
  static char buf[65536];
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  buf[n] = 0;
  fclose(f);
  return strstr(buf, needle) != NULL;
}

Test(cli, version_help_and_bad_arguments) {
  const char *v[] = {"--version", NULL}, *h[] = {"--help", NULL}, *b[] = {"--bogus", NULL};
  const char *be[] = {"--backend", "tpu", NULL}, *mm[] = {"--max-message", "lots", NULL};
  const char *ll[] = {"--log-level", "chatty", NULL}, *ex[] = {"extra", NULL};
  cr_expect_eq(run_nsad(v, NULL, NULL), 0);
  cr_expect_eq(run_nsad(h, NULL, NULL), 0);
  cr_expect_eq(run_nsad(b, NULL, NULL), 2);
  cr_expect_eq(run_nsad(be, NULL, NULL), 2);
  cr_expect_eq(run_nsad(mm, NULL, NULL), 2);
  cr_expect_eq(run_nsad(ll, NULL, NULL), 2);
  cr_expect_eq(run_nsad(ex, NULL, NULL), 2);
}

Test(cli, backend_cuda_without_gpu_refuses_to_start) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  nsa_client_t *c = th_client(&d, "t");
  int cpu = !strcmp(nsa_client_info(c)->backend, "cpu");
  nsa_client_close(c);
  cr_expect_eq(th_stop(&d, 0), 0);
  if (!cpu) {
    th_stop(&d, 1);
    cr_skip_test("a GPU is usable here: --backend cuda starts");
  }
  char log[256];
  snprintf(log, sizeof log, "%s/cuda.log", d.dir);
  const char *args[] = {"--socket", d.sock, "--backend", "cuda", NULL};
  int rc = run_nsad(args, NULL, log);
  cr_expect(rc > 0, "exit %d", rc);
  cr_expect(file_has(log, "cuda"), "the message names the problem");
  th_stop(&d, 1);
}

Test(cli, socket_from_environment_and_mode_0660) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  cr_assert_eq(th_stop(&d, 0), 0);
  char sock[256];
  snprintf(sock, sizeof sock, "%s/env.sock", d.dir);
  pid_t pid = fork();
  if (pid == 0) {
    setenv("NSAD_SOCKET", sock, 1);
    int fd = open(d.log, O_WRONLY | O_APPEND);
    if (fd >= 0) dup2(fd, 2);
    execl(NSAD_BIN, NSAD_BIN, (char *)NULL);
    _exit(127);
  }
  int up = 0;
  for (int i = 0; i < 500 && !up; i++) {
    int fd = th_raw_connect(sock);
    if (fd >= 0) {
      up = 1;
      close(fd);
    } else {
      usleep(10000);
    }
  }
  cr_expect(up, "nsad listens on $NSAD_SOCKET");
  struct stat st;
  cr_expect_eq(stat(sock, &st), 0);
  cr_expect_eq(st.st_mode & 0777, 0660, "mode %o", st.st_mode & 0777);
  kill(pid, SIGTERM);
  cr_expect_eq(th_wait_exit(pid, 20000), 0);
  th_stop(&d, 1);
}

static void write_file(const char *path, const char *text) {
  FILE *f = fopen(path, "w");
  cr_assert_not_null(f);
  fputs(text, f);
  fclose(f);
}

static const char *forward_path(nsa_client_t *c, th_prob_t *p, nsa_client_result_t *r) {
  th_prob_fill(p);
  if (nsa_client_forward(c, &p->fwd, r) != 0) return nsa_client_error_code(c);
  cr_expect_leq(th_prob_check_fwd(p), 1e-5);
  return r->path;
}

Test(cli, config_file_flags_and_sighup_reload) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  cr_assert_eq(th_stop(&d, 0), 0);
  char cfg[256];
  snprintf(cfg, sizeof cfg, "%s/nsad.conf", d.dir);
  write_file(cfg, "# flags and settings\nNSA_USE_SEL_VARLEN=off\nNSAD_MAX_INFLIGHT=4\n");
  const char *args[] = {"--config", cfg, NULL};
  d.pid = th_spawn(&d, d.sock, args, 1);
  cr_assert_gt(d.pid, 0);
  nsa_client_t *c = th_client(&d, "t");
  th_prob_t p;
  cr_assert_eq(th_prob_init(&p, c, 1, 8, 64, 1, 2, 16, 3, 16, 0, 4), 0);
  nsa_client_result_t r;
  cr_expect_str_eq(forward_path(c, &p, &r), "packed");
  nsa_client_value_t *f = NULL;
  char src[32] = "";
  cr_assert_eq(nsa_client_flags_get(c, &f), 0);
  nsa_client_value_get_str(f, "flags.NSA_USE_SEL_VARLEN.source", src, sizeof src);
  cr_expect_str_eq(src, "config");
  int64_t epoch0 = 0, epoch = 0;
  nsa_client_value_get_int(f, "epoch", &epoch0);
  nsa_client_value_free(f);
  /* change the file, SIGHUP, and the new values apply without a restart */
  write_file(cfg, "NSA_USE_SEL_VARLEN=on\nNSA_SEL_VARLEN_V2=0\n");
  kill(d.pid, SIGHUP);
  for (int i = 0; i < 500; i++) {
    cr_assert_eq(nsa_client_flags_get(c, &f), 0);
    nsa_client_value_get_int(f, "epoch", &epoch);
    nsa_client_value_free(f);
    if (epoch != epoch0) break;
    usleep(10000);
  }
  cr_expect_gt(epoch, epoch0, "the reload bumped the epoch");
  cr_expect_str_eq(forward_path(c, &p, &r), "varlen_v1");
  cr_expect_eq((int64_t)r.flags_epoch, epoch);
  /* a broken file on SIGHUP changes nothing and nsad keeps running */
  write_file(cfg, "NSA_SEL_VARLEN_V2=banana\n");
  kill(d.pid, SIGHUP);
  usleep(200000);
  cr_expect_str_eq(forward_path(c, &p, &r), "varlen_v1");
  cr_expect(file_has(d.log, "banana"), "the bad value is logged");
  th_prob_free(&p, c);
  nsa_client_close(c);
  cr_expect_eq(th_stop(&d, 1), 0);
}

Test(cli, bad_config_file_at_start_exits_1) {
  char dir[] = "/tmp/nsad-test.XXXXXX";
  cr_assert_not_null(mkdtemp(dir));
  char cfg[256], sock[256], log[256];
  snprintf(cfg, sizeof cfg, "%s/bad.conf", dir);
  snprintf(sock, sizeof sock, "%s/s.sock", dir);
  snprintf(log, sizeof log, "%s/log", dir);
  write_file(cfg, "NSA_SEL_VARLEN_MIN_L=-5\n");
  const char *args[] = {"--socket", sock, "--config", cfg, NULL};
  cr_expect_eq(run_nsad(args, NULL, log), 1);
  write_file(cfg, "this line has no equals sign\n");
  cr_expect_eq(run_nsad(args, NULL, log), 1);
  cr_expect(file_has(log, "bad.conf"), "the message names the file");
  const char *missing[] = {"--socket", sock, "--config", "/nonexistent/nsad.conf", NULL};
  cr_expect_eq(run_nsad(missing, NULL, log), 1);
  char cmd[300];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  cr_expect_eq(system(cmd), 0);
}

Test(cli, session_limit_and_hello_timeout) {
  th_nsad_t d;
  cr_assert_eq(th_start(&d, NULL), 0);
  cr_assert_eq(th_stop(&d, 0), 0);
  char cfg[256];
  snprintf(cfg, sizeof cfg, "%s/nsad.conf", d.dir);
  write_file(cfg, "NSAD_MAX_SESSIONS=2\nNSAD_HELLO_TIMEOUT_MS=300\n");
  const char *args[] = {"--config", cfg, NULL};
  d.pid = th_spawn(&d, d.sock, args, 1);
  cr_assert_gt(d.pid, 0);
  nsa_client_t *a = th_client(&d, "a"), *b = th_client(&d, "b");
  cr_assert(a && b);
  nsa_client_opts_t o = {.socket_path = d.sock, .name = "c", .reconnect_attempts = 1};
  nsa_client_t *c = NULL;
  cr_expect_eq(nsa_client_open(&c, &o), -1, "a third connection is refused");
  cr_expect(strstr(nsa_client_open_error(), "busy") != NULL, "%s", nsa_client_open_error());
  nsa_client_close(b);
  int ok = 0;
  for (int i = 0; i < 100 && !ok; i++) {
    if (nsa_client_open(&c, &o) == 0)
      ok = 1;
    else
      usleep(20000);
  }
  cr_expect(ok, "room again once a client left");
  /* silent connections are closed after the hello timeout ... */
  int fd = th_raw_connect(d.sock);
  cr_assert_geq(fd, 0);
  cr_expect(th_raw_wait_closed(fd, 5000), "no hello: closed");
  close(fd);
  /* ... sessions that said hello are not */
  usleep(500000);
  cr_expect_eq(nsa_client_ping(a), 0);
  cr_expect_eq(nsa_client_connections(a), 1);
  nsa_client_close(a);
  nsa_client_close(c);
  cr_expect_eq(th_stop(&d, 1), 0);
}
