/*
 * test_units.c — `systemd-analyze verify` on the configured units
 * (build/systemd/nsad.service, nsad.socket written by systemd/install.cmake)
 * plus checks of the directives the operations contract relies on.
 * verify needs ExecStart's binary to exist, so a copy of the service whose
 * ExecStart names an existing executable is verified next to the socket.
 * Warnings (unknown keys, bad values) make verify print but still exit 0, so
 * any output at all fails the test.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ops_testutil.h"

static char *unit(const char *name) {
  const char *dir = getenv("NSAD_UNIT_DIR");
  cr_assert_not_null(dir, "NSAD_UNIT_DIR not set (run through ctest)");
  char path[1024];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  char *t = ops_read_file(path, NULL);
  cr_assert_not_null(t, "cannot read %s", path);
  return t;
}

static int have(const char *text, const char *line) {
  /* whole-line match */
  size_t n = strlen(line);
  for (const char *p = text; (p = strstr(p, line)); p += n)
    if ((p == text || p[-1] == '\n') && (p[n] == '\n' || p[n] == 0)) return 1;
  return 0;
}

Test(units, service_directives) {
  char *s = unit("nsad.service");
  const char *want[] = {"Type=notify", "NotifyAccess=main", "WatchdogSec=10s",
                        "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure",
                        "StateDirectory=nsad", "RuntimeDirectory=nsad", "NoNewPrivileges=yes",
                        "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                        "DeviceAllow=/dev/nvidiactl rw", "DeviceAllow=/dev/nvidia-uvm rw",
                        "DeviceAllow=/dev/nvidia0 rw", "Requires=nsad.socket"};
  for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
    cr_expect(have(s, want[i]), "nsad.service lacks '%s'", want[i]);
  cr_expect(strstr(s, "EnvironmentFile=-/") != NULL);
  cr_expect(strstr(s, "\nMemoryDenyWriteExecute=") == NULL,
            "MemoryDenyWriteExecute breaks CUDA's JIT");
  cr_expect(strstr(s, "@NSAD_") == NULL, "unconfigured placeholder left");
  free(s);
  char *k = unit("nsad.socket");
  cr_expect(have(k, "ListenStream=/run/nsad/nsad.sock"));
  cr_expect(have(k, "SocketMode=0660"));
  free(k);
}

Test(units, example_config_is_plain_key_value) {
  const char *src = getenv("NSAD_SRC_DIR");
  cr_assert_not_null(src);
  char path[1024];
  snprintf(path, sizeof path, "%s/systemd/nsad.conf.example", src);
  char *t = ops_read_file(path, NULL);
  cr_assert_not_null(t);
  int lineno = 0, pairs = 0;
  for (char *save = NULL, *l = strtok_r(t, "\n", &save); l; l = strtok_r(NULL, "\n", &save)) {
    lineno++;
    if (l[0] == '#' || l[0] == 0) continue;
    char *eq = strchr(l, '=');
    cr_expect(eq && eq > l && eq[-1] != ' ' && eq[1] != ' ', "line %d not KEY=VALUE: %s", lineno,
              l);
    pairs++;
  }
  cr_expect_geq(pairs, 4, "the four flags are set in the example");
  free(t);
  /* and the flag store accepts it */
  char msg[256];
  nsad_flags_t *f = nsad_flags_new(NULL, msg, sizeof msg);
  char *env[] = {NULL};
  cr_expect_eq(nsad_flags_load_config(f, path, env, msg, sizeof msg), 0, "%s", msg);
  nsad_flags_free(f);
}

static int run(char *const argv[], char *out, size_t outlen) {
  int p[2];
  cr_assert_eq(pipe(p), 0);
  pid_t pid = fork();
  if (pid == 0) {
    dup2(p[1], 1);
    dup2(p[1], 2);
    close(p[0]);
    execvp(argv[0], argv);
    _exit(127);
  }
  close(p[1]);
  size_t n = 0;
  ssize_t r;
  while ((r = read(p[0], out + n, outlen - n - 1)) > 0) n += (size_t)r;
  out[n] = 0;
  close(p[0]);
  int st;
  waitpid(pid, &st, 0);
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

Test(units, systemd_analyze_verify, .timeout = 120) {
  if (access("/usr/bin/systemd-analyze", X_OK) != 0 && access("/bin/systemd-analyze", X_OK) != 0)
    cr_skip_test("systemd-analyze not installed: units not verified");
  char *dir = ops_tmpdir();
  char *svc = unit("nsad.service"), *sock = unit("nsad.socket");
  /* ExecStart must name an existing executable: /bin/true stands in for the
   * installed nsad (the rest of the line is kept). */
  char *es = strstr(svc, "\nExecStart=");
  cr_assert_not_null(es);
  es += strlen("\nExecStart=");
  char *sp = strchr(es, ' ');
  cr_assert_not_null(sp);
  char path[1024];
  snprintf(path, sizeof path, "%s/nsad.service", dir);
  FILE *fp = fopen(path, "w");
  fprintf(fp, "%.*s/bin/true%s", (int)(es - svc), svc, sp);
  fclose(fp);
  snprintf(path, sizeof path, "%s/nsad.socket", dir);
  ops_write_file(path, sock);
  char a1[1024], a2[1024];
  snprintf(a1, sizeof a1, "%s/nsad.service", dir);
  snprintf(a2, sizeof a2, "%s/nsad.socket", dir);
  char *argv[] = {"systemd-analyze", "verify", "--man=no", a1, a2, NULL};
  char out[8192];
  int rc = run(argv, out, sizeof out);
  cr_expect_eq(rc, 0, "systemd-analyze verify failed (%d):\n%s", rc, out);
  cr_expect_eq(out[0], 0, "systemd-analyze verify warned:\n%s", out);

  /* the check can fail: a unit with an unknown key and a bad type */
  snprintf(path, sizeof path, "%s/broken.service", dir);
  ops_write_file(path, "[Service]\nType=notifyx\nExecStart=/bin/true\nBogusKey=1\n");
  char *argv2[] = {"systemd-analyze", "verify", "--man=no", path, NULL};
  rc = run(argv2, out, sizeof out);
  cr_expect(rc != 0 || out[0] != 0, "a broken unit passed verify silently");
  free(svc);
  free(sock);
  ops_rmtree(dir);
  free(dir);
}
