/*
 * log.h — nsad logging: one line per event on stderr,
 *   2026-11-27T03:20:18.123Z info  [nsad] message
 * Thread safe (one mutex around one fprintf), so worker threads may log.
 */
#ifndef NSAD_LOG_H
#define NSAD_LOG_H

typedef enum { NSAD_LOG_ERROR = 0, NSAD_LOG_WARN, NSAD_LOG_INFO, NSAD_LOG_DEBUG } nsad_log_level_t;

/* Parses "error", "warn"/"warning", "info", "debug" (case-insensitive). -1 if unknown. */
int nsad_log_level_parse(const char *s);
const char *nsad_log_level_name(int level);
void nsad_log_set_level(int level);
int nsad_log_get_level(void);

void nsad_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define nsad_err(...) nsad_log(NSAD_LOG_ERROR, __VA_ARGS__)
#define nsad_warn(...) nsad_log(NSAD_LOG_WARN, __VA_ARGS__)
#define nsad_info(...) nsad_log(NSAD_LOG_INFO, __VA_ARGS__)
#define nsad_debug(...) nsad_log(NSAD_LOG_DEBUG, __VA_ARGS__)

#endif
