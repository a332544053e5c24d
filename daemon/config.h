/*
 * config.h — nsad settings: command line (main.c) over config file over
 * built-in defaults. The config file is KEY=VALUE lines with # comments (also
 * a valid systemd EnvironmentFile). Daemon settings use NSAD_* keys:
 *
 *   NSAD_SOCKET, NSAD_BACKEND, NSAD_DEVICES, NSAD_STATE_DIR, NSAD_METRICS_LISTEN,
 *   NSAD_ADMIN_GROUP, NSAD_MAX_MESSAGE, NSAD_LOG_LEVEL,
 *   NSAD_WORKERS       worker threads of the CPU backend (default 2)
 *   NSAD_MAX_INFLIGHT  per-session in-flight limit before backpressure (default 16)
 *   NSAD_MAX_REGIONS   regions+events one session may hold (default 4096; more → busy)
 *   NSAD_MAX_SESSIONS  connections at once (default 1024); beyond, the first
 *                      request is answered `busy` and the connection closed
 *   NSAD_HELLO_TIMEOUT_MS  a connection that has not said hello by then is
 *                      closed (default 10000)
 *
 * Flag keys (NSA_*) are handed to the flag store (nsad_flags_set_config).
 * Unknown NSAD_* keys are warned about and ignored.
 */
#ifndef NSAD_CONFIG_H
#define NSAD_CONFIG_H

#include <stddef.h>

#define NSAD_DEFAULT_SOCKET "/run/nsad/nsad.sock"

typedef enum { NSAD_BACKEND_AUTO = 0, NSAD_BACKEND_CPU, NSAD_BACKEND_CUDA } nsad_backend_kind_t;

/* One KEY=VALUE pair of the config file. */
typedef struct {
  char *key;
  char *value;
} nsad_kv_t;

typedef struct {
  char *socket_path;
  nsad_backend_kind_t backend;
  char *devices;        /* "0,1" or NULL = all */
  char *config_file;
  char *state_dir;
  char *metrics_listen; /* HOST:PORT or NULL */
  char *admin_group;
  size_t max_message;
  int log_level;
  int workers;
  int max_inflight;
  int max_regions;
  int max_sessions;
  int hello_timeout_ms;
  /* Which settings came from the command line (they beat the config file). */
  unsigned cli_set;
  /* The config file's pairs as read (NSA_* flags among them). */
  nsad_kv_t *kv;
  int nkv;
} nsad_config_t;

enum {
  NSAD_CFG_SOCKET = 1u << 0,
  NSAD_CFG_BACKEND = 1u << 1,
  NSAD_CFG_DEVICES = 1u << 2,
  NSAD_CFG_STATE_DIR = 1u << 3,
  NSAD_CFG_METRICS = 1u << 4,
  NSAD_CFG_ADMIN = 1u << 5,
  NSAD_CFG_MAX_MESSAGE = 1u << 6,
  NSAD_CFG_LOG_LEVEL = 1u << 7,
  NSAD_CFG_WORKERS = 1u << 8,
  NSAD_CFG_MAX_INFLIGHT = 1u << 9,
  NSAD_CFG_MAX_REGIONS = 1u << 10,
  NSAD_CFG_MAX_SESSIONS = 1u << 11,
  NSAD_CFG_HELLO_TIMEOUT = 1u << 12,
};

void nsad_config_init(nsad_config_t *c);
void nsad_config_destroy(nsad_config_t *c);

/* Sets one daemon setting from a string (CLI or file). from_cli marks it so a
 * later file read does not override it. Returns 0, or -1 with msg. Keys not
 * handled here (NSA_* flags) return 1. */
int nsad_config_set(nsad_config_t *c, const char *key, const char *value, int from_cli, char *msg,
                    size_t msglen);

/* Reads c->config_file (if set): replaces c->kv and applies NSAD_* keys that
 * the command line did not set. Returns 0, or -1 with msg (file unreadable,
 * syntax error with its line number, bad value). On error c is unchanged. */
int nsad_config_load_file(nsad_config_t *c, char *msg, size_t msglen);

/* Parses "auto"/"cpu"/"cuda"; -1 if unknown. */
int nsad_backend_kind_parse(const char *s);
const char *nsad_backend_kind_name(nsad_backend_kind_t k);

/* Parses a size ("1048576", "1M", "64k"); returns 0 or -1. */
int nsad_parse_size(const char *s, size_t *out);

#endif
