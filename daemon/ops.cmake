# daemon/ops.cmake — owned by the ops helper (flags, telemetry, systemd).
# include()d by daemon/CMakeLists.txt (owner: the daemon helper), which adds
#   ${NSAD_OPS_SOURCES} to the nsad_core library,
#   target_link_libraries(nsad_core PUBLIC ${NSAD_OPS_LIBS}),
#   target_compile_definitions(nsad_core PRIVATE ${NSAD_OPS_DEFS}).
# libmicrohttpd and libsystemd are optional (found by the top-level
# CMakeLists as PkgConfig::MHD / PkgConfig::LIBSYSTEMD); without them
# metrics_http.c and sd.c compile to stubs.
set(NSAD_OPS_SOURCES
    ${CMAKE_CURRENT_LIST_DIR}/flags.c
    ${CMAKE_CURRENT_LIST_DIR}/metrics.c
    ${CMAKE_CURRENT_LIST_DIR}/metrics_http.c
    ${CMAKE_CURRENT_LIST_DIR}/sd.c
    ${CMAKE_CURRENT_LIST_DIR}/shadow.c)
set(NSAD_OPS_LIBS Threads::Threads m)
set(NSAD_OPS_DEFS)
if(TARGET PkgConfig::MHD)
  list(APPEND NSAD_OPS_LIBS PkgConfig::MHD)
  list(APPEND NSAD_OPS_DEFS NSAD_HAVE_MHD=1)
endif()
if(TARGET PkgConfig::LIBSYSTEMD)
  list(APPEND NSAD_OPS_LIBS PkgConfig::LIBSYSTEMD)
  list(APPEND NSAD_OPS_DEFS NSAD_HAVE_SYSTEMD=1)
endif()
