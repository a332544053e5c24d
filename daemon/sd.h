/*
 * sd.h — systemd integration for nsad (sd-daemon protocol via libsystemd).
 *
 * Built with libsystemd (NSAD_HAVE_SYSTEMD=1, set by daemon/ops.cmake) these
 * talk to systemd; without it every function is a no-op that reports
 * "nothing inherited / not under systemd", so the daemon code calls them
 * unconditionally.
 *
 * Use from the daemon (loop thread):
 *   fd = nsad_sd_listen_fd(msg, len)  before binding: >= 0 adopt it (already
 *                                      listening; do not unlink/bind/chmod),
 *                                      -1 bind your own, <= -2 fatal (msg)
 *   nsad_sd_notify_ready()             once the socket listens and the backend is up
 *   nsad_sd_notify_status("...")       any time (shown by systemctl status)
 *   nsad_sd_notify_reloading() ... nsad_sd_notify_ready()   around a SIGHUP reload
 *   nsad_sd_notify_stopping()          when shutdown begins (before draining)
 *   usec = nsad_sd_watchdog_usec()     0 = no watchdog; else start a uv_timer
 *                                      every usec/2 that calls nsad_sd_watchdog_ping()
 * Notify functions return > 0 when sent, 0 when not under systemd
 * (no NOTIFY_SOCKET), < 0 on error.
 */
#ifndef NSAD_SD_H
#define NSAD_SD_H

#include <stddef.h>
#include <stdint.h>

/* 1 when built with libsystemd. */
int nsad_sd_available(void);

/* The socket passed by systemd socket activation (LISTEN_FDS/LISTEN_PID for
 * this process): exactly one listening AF_UNIX stream socket is accepted.
 * Clears LISTEN_* from the environment and marks the fd close-on-exec.
 * Returns the fd, -1 when nothing was passed, -2 (msg) when what was passed
 * is unusable (wrong type, several sockets). */
int nsad_sd_listen_fd(char *msg, size_t msglen);

int nsad_sd_notify_ready(void);
int nsad_sd_notify_reloading(void);
int nsad_sd_notify_stopping(void);
int nsad_sd_notify_status(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int nsad_sd_watchdog_ping(void);

/* Watchdog interval (WatchdogSec) in microseconds when systemd expects
 * WATCHDOG=1 pings from this process, else 0. Ping at half this interval. */
uint64_t nsad_sd_watchdog_usec(void);

#endif
