# systemd/install.cmake — install rules for the systemd units, the sysusers
# entry, the example config and the operations guide (owner: ops helper).
# include()d by the top-level CMakeLists.txt (GNUInstallDirs already loaded).
# Binaries, libraries, headers and the pkg-config file are installed by the
# CMakeLists of the directories that build them.
#
#   cmake --install build [--prefix /usr]   then (as root):
#   systemd-sysusers; systemctl daemon-reload; systemctl enable --now nsad.socket
include(GNUInstallDirs)

set(NSAD_SYSTEMD_UNITDIR "lib/systemd/system" CACHE STRING
    "Where to install nsad.service/nsad.socket (relative to the prefix, or absolute)")
set(NSAD_SYSUSERSDIR "lib/sysusers.d" CACHE STRING
    "Where to install the sysusers.d entry (relative to the prefix, or absolute)")

# Units name the installed binary, config and docs by absolute paths fixed at
# configure time: configure with -DCMAKE_INSTALL_PREFIX=/usr for a system
# install (config then in /etc/nsad); `cmake --install --prefix` moves the
# files but not these paths.
set(NSAD_BINDIR ${CMAKE_INSTALL_FULL_BINDIR})
set(NSAD_DOCDIR ${CMAKE_INSTALL_FULL_DOCDIR})
set(NSAD_CONFDIR ${CMAKE_INSTALL_FULL_SYSCONFDIR}/nsad)
configure_file(${CMAKE_CURRENT_LIST_DIR}/nsad.service ${CMAKE_BINARY_DIR}/systemd/nsad.service
               @ONLY)
configure_file(${CMAKE_CURRENT_LIST_DIR}/nsad.socket ${CMAKE_BINARY_DIR}/systemd/nsad.socket @ONLY)

install(FILES ${CMAKE_BINARY_DIR}/systemd/nsad.service ${CMAKE_BINARY_DIR}/systemd/nsad.socket
        DESTINATION ${NSAD_SYSTEMD_UNITDIR} COMPONENT systemd)
install(FILES ${CMAKE_CURRENT_LIST_DIR}/nsad.sysusers DESTINATION ${NSAD_SYSUSERSDIR}
        RENAME nsad.conf COMPONENT systemd)
# GNUInstallDirs maps prefix /usr to /etc (FULL_SYSCONFDIR) but keeps the
# relative "etc" (which would mean /usr/etc); use the absolute path exactly
# when it lies outside the prefix.
if(IS_ABSOLUTE ${CMAKE_INSTALL_SYSCONFDIR} OR NOT CMAKE_INSTALL_FULL_SYSCONFDIR STREQUAL
                                               "${CMAKE_INSTALL_PREFIX}/${CMAKE_INSTALL_SYSCONFDIR}")
  set(_nsad_confdest ${CMAKE_INSTALL_FULL_SYSCONFDIR}/nsad)
else()
  set(_nsad_confdest ${CMAKE_INSTALL_SYSCONFDIR}/nsad)
endif()
install(FILES ${CMAKE_CURRENT_LIST_DIR}/nsad.conf.example DESTINATION ${_nsad_confdest}
        COMPONENT config)
# The live config is installed only when absent: an upgrade must not
# overwrite an operator's settings.
install(CODE "
  set(_dir \"${_nsad_confdest}\")
  if(NOT IS_ABSOLUTE \"\${_dir}\")
    set(_dir \"\${CMAKE_INSTALL_PREFIX}/\${_dir}\")
  endif()
  set(_dst \"\$ENV{DESTDIR}\${_dir}/nsad.conf\")
  if(NOT EXISTS \"\${_dst}\")
    file(INSTALL \"${CMAKE_CURRENT_LIST_DIR}/nsad.conf.example\"
         DESTINATION \"\${_dir}\" RENAME nsad.conf)
  else()
    message(STATUS \"Keeping existing \${_dst}\")
  endif()" COMPONENT config)
if(EXISTS ${CMAKE_CURRENT_LIST_DIR}/../docs/OPERATIONS.md)
  install(FILES ${CMAKE_CURRENT_LIST_DIR}/../docs/OPERATIONS.md DESTINATION ${CMAKE_INSTALL_DOCDIR}
          COMPONENT doc)
endif()
