# run_fuzz.cmake — ctest driver for fuzz_proto (cmake -P, so it needs no shell).
#   -DFUZZ=<fuzzer> -DSEEDS=<seed generator> -DWORK=<scratch dir> -DSECONDS=<n>
#   -DINJECT=crash|leak : self-test — the harness plants that bug on every ping; the
#                         run must FAIL with the matching report, else this test fails.
# Without INJECT: fails (FATAL_ERROR → non-zero exit) when libFuzzer reports anything.
file(REMOVE_RECURSE ${WORK})
file(MAKE_DIRECTORY ${WORK}/seeds ${WORK}/corpus ${WORK}/artifacts)
execute_process(COMMAND ${SEEDS} ${WORK}/seeds RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "seed generation failed: ${rc}")
endif()

if(DEFINED INJECT)
  set(ENV{NSA_FUZZ_INJECT} ${INJECT})
  execute_process(COMMAND ${FUZZ} -runs=0 -artifact_prefix=${WORK}/artifacts/ ${WORK}/seeds
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(INJECT STREQUAL "leak")
    set(want "LeakSanitizer")
  else()
    set(want "deadly signal")
  endif()
  if(rc EQUAL 0 OR NOT out MATCHES "${want}")
    message("${out}")
    message(FATAL_ERROR "planted ${INJECT} was not reported (exit ${rc}); fuzz findings would go unnoticed")
  endif()
  message(STATUS "planted ${INJECT} reported as expected (exit ${rc})")
  return()
endif()

execute_process(COMMAND ${FUZZ} -max_total_time=${SECONDS} -timeout=10 -rss_limit_mb=2048
                        -max_len=16384 -print_final_stats=1
                        -artifact_prefix=${WORK}/artifacts/ ${WORK}/corpus ${WORK}/seeds
                RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  file(GLOB found ${WORK}/artifacts/*)
  message(FATAL_ERROR "fuzz_proto found a problem (exit ${rc}); reproducer(s): ${found}")
endif()
