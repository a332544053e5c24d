/*
 * test_sd.c — systemd integration (daemon/sd.c): notify messages read from a
 * NOTIFY_SOCKET this test owns (an AF_UNIX datagram socket), the watchdog
 * interval, and LISTEN_FDS socket adoption (in a forked child, because fd 3
 * must be replaced). Criterion runs each test in its own process, so setenv
 * does not leak between tests.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ops_testutil.h"
#include "sd.h"

static int notify_sock(char *dir_out, size_t n) {
  char *dir = ops_tmpdir();
  snprintf(dir_out, n, "%s", dir);
  free(dir);
  struct sockaddr_un a = {.sun_family = AF_UNIX};
  cr_assert_lt(strlen(dir_out) + 8, sizeof a.sun_path, "tmpdir path too long for a socket");
  memcpy(a.sun_path, dir_out, strlen(dir_out));
  memcpy(a.sun_path + strlen(dir_out), "/notify", 8);
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  cr_assert_geq(fd, 0);
  cr_assert_eq(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
  struct timeval tv = {.tv_sec = 5};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setenv("NOTIFY_SOCKET", a.sun_path, 1);
  return fd;
}

static void expect_msg(int fd, const char *want_prefix) {
  char buf[1024];
  ssize_t n = recv(fd, buf, sizeof buf - 1, 0);
  cr_assert_gt(n, 0, "no datagram for %s", want_prefix);
  buf[n] = 0;
  cr_expect(strncmp(buf, want_prefix, strlen(want_prefix)) == 0, "got '%s', want '%s...'", buf,
            want_prefix);
}

Test(sd, notify_messages) {
  if (!nsad_sd_available()) cr_skip_test("built without libsystemd: sd functions are no-ops");
  char dir[512];
  int fd = notify_sock(dir, sizeof dir);
  cr_expect_gt(nsad_sd_notify_status("serving on %s, backend %s", "/run/x.sock", "cpu"), 0);
  expect_msg(fd, "STATUS=serving on /run/x.sock, backend cpu");
  cr_expect_gt(nsad_sd_notify_ready(), 0);
  expect_msg(fd, "READY=1");
  cr_expect_gt(nsad_sd_watchdog_ping(), 0);
  expect_msg(fd, "WATCHDOG=1");
  cr_expect_gt(nsad_sd_notify_reloading(), 0);
  expect_msg(fd, "RELOADING=1\nMONOTONIC_USEC=");
  cr_expect_gt(nsad_sd_notify_status("line1\nline2"), 0);
  expect_msg(fd, "STATUS=line1 line2");
  cr_expect_gt(nsad_sd_notify_stopping(), 0);
  expect_msg(fd, "STOPPING=1");
  /* the environment is kept, so repeated notifications keep working */
  cr_expect_gt(nsad_sd_notify_ready(), 0);
  expect_msg(fd, "READY=1");
  close(fd);
  ops_rmtree(dir);
}

Test(sd, not_under_systemd) {
  unsetenv("NOTIFY_SOCKET");
  unsetenv("WATCHDOG_USEC");
  unsetenv("LISTEN_FDS");
  cr_expect_eq(nsad_sd_notify_ready(), 0);
  cr_expect_eq(nsad_sd_watchdog_ping(), 0);
  cr_expect_eq(nsad_sd_watchdog_usec(), 0);
  char msg[128];
  cr_expect_eq(nsad_sd_listen_fd(msg, sizeof msg), -1);
}

Test(sd, watchdog_interval) {
  if (!nsad_sd_available()) cr_skip_test("built without libsystemd");
  char pid[32];
  snprintf(pid, sizeof pid, "%d", (int)getpid());
  setenv("WATCHDOG_USEC", "10000000", 1);
  setenv("WATCHDOG_PID", pid, 1);
  cr_expect_eq(nsad_sd_watchdog_usec(), 10000000u);
  setenv("WATCHDOG_PID", "1", 1); /* meant for another process */
  cr_expect_eq(nsad_sd_watchdog_usec(), 0);
}

/* In a child: put `sock` at fd 3, set LISTEN_FDS for ourselves, adopt. The
 * exit code reports: 0 adopted fd 3 and can accept, 10 got -1, 11 got -2,
 * other failures 20+. */
static int adopt_in_child(int type, int listening, int nfds) {
  pid_t pid = fork();
  cr_assert_neq(pid, -1);
  if (pid == 0) {
    char dir[] = "/tmp/nsad-sd-XXXXXX";
    if (!mkdtemp(dir)) _exit(20);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s/s", dir);
    int s = socket(AF_UNIX, type, 0);
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) != 0) _exit(21);
    if (listening && listen(s, 8) != 0) _exit(22);
    if (dup2(s, 3) != 3) _exit(23);
    if (s != 3) close(s);
    if (nfds > 1 && dup2(3, 4) != 4) _exit(24);
    char p[32], n[8];
    snprintf(p, sizeof p, "%d", (int)getpid());
    snprintf(n, sizeof n, "%d", nfds);
    setenv("LISTEN_PID", p, 1);
    setenv("LISTEN_FDS", n, 1);
    char msg[256];
    int fd = nsad_sd_listen_fd(msg, sizeof msg);
    int code;
    if (fd == -1) code = 10;
    else if (fd == -2) code = 11;
    else if (fd != 3) code = 25;
    else if (getenv("LISTEN_FDS")) code = 26; /* must be cleared */
    else {
      /* really the listening socket: connect and accept */
      int c = socket(AF_UNIX, SOCK_STREAM, 0);
      code = (connect(c, (struct sockaddr *)&a, sizeof a) == 0 && accept(fd, NULL, NULL) >= 0) ? 0 : 27;
    }
    unlink(a.sun_path);
    rmdir(dir);
    _exit(code);
  }
  int st;
  cr_assert_eq(waitpid(pid, &st, 0), pid);
  cr_assert(WIFEXITED(st));
  return WEXITSTATUS(st);
}

Test(sd, listen_fds_adoption) {
  if (!nsad_sd_available()) cr_skip_test("built without libsystemd");
  cr_expect_eq(adopt_in_child(SOCK_STREAM, 1, 1), 0, "a listening unix stream socket is adopted");
  cr_expect_eq(adopt_in_child(SOCK_DGRAM, 0, 1), 11, "a datagram socket is refused");
  cr_expect_eq(adopt_in_child(SOCK_STREAM, 0, 1), 11, "a non-listening socket is refused");
  cr_expect_eq(adopt_in_child(SOCK_STREAM, 1, 2), 11, "two sockets are refused");
}
