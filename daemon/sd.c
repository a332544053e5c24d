/*
 * sd.c — systemd integration (sd.h). Everything compiles to no-ops without
 * libsystemd (NSAD_HAVE_SYSTEMD undefined).
 */
#include "sd.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#ifdef NSAD_HAVE_SYSTEMD
#include <sys/socket.h>
#include <systemd/sd-daemon.h>

int nsad_sd_available(void) { return 1; }

int nsad_sd_listen_fd(char *msg, size_t msglen) {
  /* unset_environment=1: children (none today) must not think they were
   * activated. sd_listen_fds checks LISTEN_PID against our pid. */
  int n = sd_listen_fds(1);
  if (n < 0) {
    if (msg) snprintf(msg, msglen, "LISTEN_FDS is malformed: %s", strerror(-n));
    return -2;
  }
  if (n == 0) return -1;
  if (n > 1) {
    if (msg)
      snprintf(msg, msglen, "systemd passed %d sockets; nsad.socket must have exactly one "
               "ListenStream=", n);
    return -2;
  }
  int fd = SD_LISTEN_FDS_START;
  if (sd_is_socket_unix(fd, SOCK_STREAM, 1, NULL, 0) <= 0) {
    if (msg)
      snprintf(msg, msglen, "the socket passed by systemd (fd %d) is not a listening Unix "
               "stream socket", fd);
    return -2;
  }
  return fd;
}

static int notify(const char *s) { return sd_notify(0, s); }

int nsad_sd_notify_ready(void) { return notify("READY=1"); }

int nsad_sd_notify_reloading(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  char buf[96];
  snprintf(buf, sizeof buf, "RELOADING=1\nMONOTONIC_USEC=%llu",
           (unsigned long long)ts.tv_sec * 1000000ull + (unsigned long long)ts.tv_nsec / 1000);
  return notify(buf);
}

int nsad_sd_notify_stopping(void) { return notify("STOPPING=1"); }

int nsad_sd_notify_status(const char *fmt, ...) {
  char buf[512];
  int n = snprintf(buf, sizeof buf, "STATUS=");
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf + n, sizeof buf - (size_t)n, fmt, ap);
  va_end(ap);
  /* STATUS is one line */
  for (char *p = buf; *p; p++)
    if (*p == '\n') *p = ' ';
  return notify(buf);
}

int nsad_sd_watchdog_ping(void) { return notify("WATCHDOG=1"); }

uint64_t nsad_sd_watchdog_usec(void) {
  uint64_t usec = 0;
  if (sd_watchdog_enabled(0, &usec) > 0) return usec;
  return 0;
}

#else /* !NSAD_HAVE_SYSTEMD */

int nsad_sd_available(void) { return 0; }
int nsad_sd_listen_fd(char *msg, size_t msglen) {
  (void)msg;
  (void)msglen;
  return -1;
}
int nsad_sd_notify_ready(void) { return 0; }
int nsad_sd_notify_reloading(void) { return 0; }
int nsad_sd_notify_stopping(void) { return 0; }
int nsad_sd_notify_status(const char *fmt, ...) {
  (void)fmt;
  return 0;
}
int nsad_sd_watchdog_ping(void) { return 0; }
uint64_t nsad_sd_watchdog_usec(void) { return 0; }

#endif
