/*
 * prom_check.h — a strict validator for the Prometheus text exposition
 * format 0.0.4, written from the format description (not a parser copied
 * from anywhere), used by the ops tests on nsad's /metrics and metrics.get
 * text. Checks every line's syntax (comments, HELP/TYPE, metric and label
 * names, label value escapes, values, optional timestamps) and the family
 * rules: TYPE/HELP at most once and before the family's samples, samples of
 * a family contiguous, no duplicate series, counters named *_total,
 * histograms complete (_bucket with le, ascending bounds, cumulative counts,
 * +Inf bucket == _count, _sum present).
 */
#ifndef NSAD_PROM_CHECK_H
#define NSAD_PROM_CHECK_H

#include <stddef.h>

/* 0 when valid; else -1 and msg says which line and why. */
int prom_check(const char *text, size_t len, char *msg, size_t msglen);

/* Value of the first sample whose text up to the value equals `series`
 * exactly, e.g. "nsad_sessions" or
 * "nsad_rows_total{path=\"packed\"}". Returns 0 and *v, or -1 if absent. */
int prom_value(const char *text, const char *series, double *v);

/* Sum of the values of every sample of metric `name` whose label set
 * contains all of the given "k=\"v\"" fragments (NULL-terminated list). */
double prom_sum(const char *text, const char *name, const char *const *frags);

#endif
