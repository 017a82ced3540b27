# Installs the headers and an exported bnorm::bnorm target with a config and version file, so
# that consumers can find_package(bnorm).
include(CMakePackageConfigHelpers)
set(BNORM_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/bnorm)

install(TARGETS bnorm EXPORT bnormTargets)
install(DIRECTORY include/bnorm DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT bnormTargets NAMESPACE bnorm:: DESTINATION ${BNORM_CMAKE_DIR})

configure_package_config_file(cmake/bnormConfig.cmake.in
  ${CMAKE_CURRENT_BINARY_DIR}/bnormConfig.cmake INSTALL_DESTINATION ${BNORM_CMAKE_DIR})
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/bnormConfigVersion.cmake
  COMPATIBILITY SameMinorVersion ARCH_INDEPENDENT)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/bnormConfig.cmake
  ${CMAKE_CURRENT_BINARY_DIR}/bnormConfigVersion.cmake DESTINATION ${BNORM_CMAKE_DIR})
install(FILES LICENSE DESTINATION ${CMAKE_INSTALL_DATADIR}/doc/bnorm)
