/* main.c — the nsad command line (DESIGN.md §4 "Command line"). */
#include <getopt.h>
#include <signal.h>
#include <sys/resource.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "log.h"
#include "server.h"

static void usage(FILE *f) {
  fprintf(f,
          "usage: nsad [--socket PATH] [--backend auto|cpu|cuda] [--devices LIST]\n"
          "            [--config FILE] [--state-dir DIR] [--metrics-listen HOST:PORT]\n"
          "            [--admin-group NAME] [--max-message BYTES] [--log-level LEVEL]\n"
          "            [--workers N] [--max-inflight N]\n"
          "\n"
          "Runs in the foreground and logs to stderr. SIGTERM/SIGINT drain in-flight\n"
          "work and exit 0; SIGHUP re-reads the config file.\n"
          "  --socket PATH          Unix socket (default $NSAD_SOCKET, else %s)\n"
          "  --backend B            auto (cuda when a GPU is usable, else cpu), cpu, cuda\n"
          "  --devices LIST         CUDA devices to serve, e.g. 0,1 (default: all)\n"
          "  --config FILE          KEY=VALUE file (NSA_* flags, NSAD_* settings, # comments)\n"
          "  --state-dir DIR        where runtime flag changes persist\n"
          "  --metrics-listen H:P   serve GET /metrics for Prometheus\n"
          "  --admin-group NAME     members may run flags.set/flags.reset/shutdown\n"
          "  --max-message BYTES    largest accepted message (default 1M)\n"
          "  --log-level LEVEL      error, warn, info (default), debug\n"
          "  --workers N            CPU backend worker threads (default 2)\n"
          "  --max-inflight N       per-connection in-flight limit (default 16)\n",
          NSAD_DEFAULT_SOCKET);
}

int main(int argc, char **argv) {
  static const struct option opts[] = {
      {"socket", required_argument, 0, 's'},      {"backend", required_argument, 0, 'b'},
      {"devices", required_argument, 0, 'd'},     {"config", required_argument, 0, 'c'},
      {"state-dir", required_argument, 0, 'S'},   {"metrics-listen", required_argument, 0, 'm'},
      {"admin-group", required_argument, 0, 'g'}, {"max-message", required_argument, 0, 'M'},
      {"log-level", required_argument, 0, 'l'},   {"workers", required_argument, 0, 'w'},
      {"max-inflight", required_argument, 0, 'i'}, {"help", no_argument, 0, 'h'},
      {"version", no_argument, 0, 'V'},           {0, 0, 0, 0}};
  /* libuv's thread pool (4 threads by default, sized at its first use) runs
   * registrations, flag persists and reloads (docs/DAEMON.md): a few
   * multi-GiB shm registrations or a stalled disk would otherwise hold every
   * thread and queue the rest. An operator's own setting wins. */
  setenv("UV_THREADPOOL_SIZE", "16", 0);
  nsad_config_t cfg;
  nsad_config_init(&cfg);
  char msg[512];
  int c, rc = 0;
  while ((c = getopt_long(argc, argv, "hV", opts, NULL)) != -1) {
    const char *key = NULL;
    switch (c) {
      case 's': key = "NSAD_SOCKET"; break;
      case 'b': key = "NSAD_BACKEND"; break;
      case 'd': key = "NSAD_DEVICES"; break;
      case 'S': key = "NSAD_STATE_DIR"; break;
      case 'm': key = "NSAD_METRICS_LISTEN"; break;
      case 'g': key = "NSAD_ADMIN_GROUP"; break;
      case 'M': key = "NSAD_MAX_MESSAGE"; break;
      case 'l': key = "NSAD_LOG_LEVEL"; break;
      case 'w': key = "NSAD_WORKERS"; break;
      case 'i': key = "NSAD_MAX_INFLIGHT"; break;
      case 'c':
        free(cfg.config_file);
        cfg.config_file = strdup(optarg);
        continue;
      case 'h': usage(stdout); nsad_config_destroy(&cfg); return 0;
      case 'V': printf("nsad %s\n", NSAD_VERSION); nsad_config_destroy(&cfg); return 0;
      default: usage(stderr); nsad_config_destroy(&cfg); return 2;
    }
    if (nsad_config_set(&cfg, key, optarg, 1, msg, sizeof msg) != 0) {
      fprintf(stderr, "nsad: %s\n", msg);
      nsad_config_destroy(&cfg);
      return 2;
    }
  }
  if (optind < argc) {
    fprintf(stderr, "nsad: unexpected argument '%s'\n", argv[optind]);
    usage(stderr);
    nsad_config_destroy(&cfg);
    return 2;
  }
  nsad_log_set_level(cfg.log_level);
  if (nsad_config_load_file(&cfg, msg, sizeof msg) != 0) {
    nsad_err("%s", msg);
    nsad_config_destroy(&cfg);
    return 1;
  }
  nsad_log_set_level(cfg.log_level);
  /* --socket, else $NSAD_SOCKET, else the config file's NSAD_SOCKET, else
   * the default. */
  const char *env_sock = getenv("NSAD_SOCKET");
  if (!(cfg.cli_set & NSAD_CFG_SOCKET) && env_sock && *env_sock)
    nsad_config_set(&cfg, "NSAD_SOCKET", env_sock, 1, msg, sizeof msg);
  if (!cfg.socket_path) cfg.socket_path = strdup(NSAD_DEFAULT_SOCKET);
  if (!cfg.socket_path) return 1;

  /* A peer that disconnects must not kill the daemon on write. */
  signal(SIGPIPE, SIG_IGN);

  /* Every shm region keeps an fd open (size re-checks at dispatch), so one
   * client registering a few hundred regions under the usual soft limit of
   * 1024 would exhaust it and every other client's connect would fail
   * (accept: EMFILE). Raise the soft limit to the hard one, as daemons do. */
  struct rlimit nofile;
  if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < nofile.rlim_max) {
    rlim_t was = nofile.rlim_cur;
    nofile.rlim_cur = nofile.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &nofile) == 0)
      nsad_debug("RLIMIT_NOFILE raised from %llu to %llu", (unsigned long long)was,
                 (unsigned long long)nofile.rlim_max);
  }

  nsad_server_t *srv = calloc(1, sizeof *srv);
  if (!srv) return 1;
  if (nsad_server_init(srv, &cfg, msg, sizeof msg) != 0) {
    nsad_err("cannot start: %s", msg);
    rc = 1;
  } else {
    rc = nsad_server_run(srv);
  }
  nsad_server_teardown(srv);
  if (srv->exit_code && !rc) rc = srv->exit_code;
  nsad_info("exit %d", rc);
  free(srv);
  nsad_config_destroy(&cfg);
  return rc;
}
