/* log.c — leveled, timestamped stderr logging (see log.h). */
#include "log.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <strings.h>
#include <time.h>

static atomic_int g_level = NSAD_LOG_INFO;
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static const char *const k_names[] = {"error", "warn", "info", "debug"};

int nsad_log_level_parse(const char *s) {
  if (!s) return -1;
  for (int i = 0; i < 4; i++)
    if (strcasecmp(s, k_names[i]) == 0) return i;
  if (strcasecmp(s, "warning") == 0) return NSAD_LOG_WARN;
  return -1;
}

const char *nsad_log_level_name(int level) {
  return (level >= 0 && level < 4) ? k_names[level] : "?";
}

void nsad_log_set_level(int level) {
  if (level >= NSAD_LOG_ERROR && level <= NSAD_LOG_DEBUG) atomic_store(&g_level, level);
}

int nsad_log_get_level(void) { return atomic_load(&g_level); }

void nsad_log(int level, const char *fmt, ...) {
  if (level > atomic_load(&g_level)) return;
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  struct tm tm;
  gmtime_r(&ts.tv_sec, &tm);
  char line[2048];
  int n = snprintf(line, sizeof line, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %-5s [nsad] ",
                   tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                   ts.tv_nsec / 1000000, nsad_log_level_name(level));
  va_list ap;
  va_start(ap, fmt);
  if (n > 0 && (size_t)n < sizeof line) vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
  va_end(ap);
  /* Messages carry peer-controlled text (client names, labels, shm names):
   * escape control characters so that one call is always one log line and a
   * client cannot forge records (e.g. a fake "audit" line). */
  char out[sizeof line * 4];
  size_t o = 0;
  for (const unsigned char *p = (const unsigned char *)line; *p && o + 5 < sizeof out; p++) {
    if (*p >= 0x20 && *p != 0x7f) {
      out[o++] = (char)*p;
    } else {
      out[o++] = '\\';
      if (*p == '\n') out[o++] = 'n';
      else if (*p == '\r') out[o++] = 'r';
      else if (*p == '\t') out[o++] = 't';
      else o += (size_t)snprintf(out + o, sizeof out - o, "x%02x", *p);
    }
  }
  out[o] = 0;
  pthread_mutex_lock(&g_mu);
  fprintf(stderr, "%s\n", out);
  fflush(stderr);
  pthread_mutex_unlock(&g_mu);
}
